#!/usr/bin/env bash
# DESIGN §9: "one instance handles 100 targets on 2 cores with poll cycles on time".
# Starts a throwaway PostgreSQL (max_connections 400), points one pgvigil at it as N
# targets (default 100; one database each, so N connections), lets it poll for RUN_SECS
# (default 90) at the default 15 s interval, then reports from pgvigil's own metrics:
# how stale each collector's last success is (on time = within one interval), collector
# run durations, pgvigil CPU and RSS. Everything runs on 127.0.0.1 and is stopped at the end.
# Usage: benches/many-targets.sh [N]   (build first: cargo build --release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-100}; RUN_SECS=${RUN_SECS:-90}
BIN=${PGVIGIL_BIN:-target/release/pgvigil}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /tmp/pgvigil-many.XXXXXX); chmod 755 "$WORK"
RUN=(); if [ "$(id -u)" -eq 0 ]; then id pgvigil-pg >/dev/null 2>&1 || useradd --system --no-create-home pgvigil-pg; chown -R pgvigil-pg "$WORK"; RUN=(runuser -u pgvigil-pg --); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); LISTEN=$(free_port)
cleanup() {
  [ -n "${PGV_PID:-}" ] && kill "$PGV_PID" 2>/dev/null || true
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"${RUN[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust -N >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK'
max_connections = 400
shared_preload_libraries = 'pg_stat_statements'
fsync = off
CONF
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
psql -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE EXTENSION pg_stat_statements"
{
  echo "listen: 127.0.0.1:$LISTEN"
  echo "targets:"
  for i in $(seq -w 1 "$N"); do
    echo "  - {name: t$i, dsn: \"postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable\", databases: {include: [\"^postgres\$\"]}}"
  done
} > "$WORK/pgvigil.yaml"
"$BIN" --config "$WORK/pgvigil.yaml" > "$WORK/pgvigil.log" 2>&1 &
PGV_PID=$!
ticks() { awk '{print $14+$15}' "/proc/$PGV_PID/stat"; }
sleep 20   # first cycle and jitter
t0=$(ticks); s0=$(date +%s.%N)
sleep "$RUN_SECS"
t1=$(ticks); s1=$(date +%s.%N)
curl -s "http://127.0.0.1:$LISTEN/metrics" > "$WORK/metrics.txt"
now=$(date +%s.%N)
hz=$(getconf CLK_TCK)
echo "targets: $N, run: ${RUN_SECS}s after a 20 s warm-up, interval 15s"
awk -v now="$now" '
  /^pgvigil_collector_last_success_timestamp_seconds\{/ { n++; age = now - $NF; if (age > max) max = age; if (age <= 15 + 2) ok++ }
  /^pgvigil_collector_errors_total\{/ { e += $NF }
  /^pg_up\{/ { up += $NF; t++ }
  END {
    printf "pg_up: %d of %d targets\n", up, t;
    printf "collectors on time (last success <= interval + 2 s ago): %d of %d; oldest %.1f s\n", ok, n, max;
    printf "collector errors: %d\n", e
  }' "$WORK/metrics.txt"
grep '^pgvigil_collector_duration_seconds{' "$WORK/metrics.txt" | awk '{print $NF}' | sort -g |
  awk '{ d[++m] = $1 } END { printf "collector run duration p50 %.4f s, p99 %.4f s, max %.4f s\n", d[int(m*0.5)], d[int(m*0.99)], d[m] }'
awk -v t0="$t0" -v t1="$t1" -v s0="$s0" -v s1="$s1" -v hz="$hz" 'BEGIN { printf "pgvigil CPU: %.1f %% of one core\n", 100 * (t1 - t0) / hz / (s1 - s0) }'
grep -E "VmRSS|VmHWM" "/proc/$PGV_PID/status"
echo "DB connections: $(psql -X -At -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvigil'")"
