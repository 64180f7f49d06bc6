#!/usr/bin/env bash
# DESIGN §9: "one instance handles 1,000 targets on 2 cores with every poll on time (poll lag
# p99 < 1 s), RSS stated".
# Starts SERVERS throwaway PostgreSQL servers (default one per 100 targets) and points one
# pgvigil at them as N targets (default 100): target i is a DSN to server i mod SERVERS,
# database `postgres`, default collectors, interval INTERVAL seconds (default 15, the
# built-in default; a fleet of 1,000 on one machine may poll less often), so each target is one
# two sessions (poller, activity sampler) and each server serves about 100 of them (as many sessions as the 100-target
# bench, so pg_stat_activity & co. are not 1,000 rows long for every target's query).
# After a 20 s warm-up it scrapes /metrics, lets pgvigil poll for RUN_SECS (default 90),
# scrapes again and reports, over that window, from pgvigil's own metrics: poll lag
# quantiles (the difference of the two scrapes' pgvigil_poll_lag_polls_total buckets),
# how stale each collector's last success is, errors, collector run durations; from /proc:
# pgvigil's CPU and RSS, the PostgreSQL servers' CPU and the machine's CPU.
# Everything binds 127.0.0.1 and is stopped by pid at the end; the temp dir is removed.
# Usage: benches/many-targets.sh [N]   (build first: cargo build --release)
# Heavy runs: flock /tmp/pgvigil-bench.lock benches/many-targets.sh 1000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-100}; RUN_SECS=${RUN_SECS:-90}; INTERVAL=${INTERVAL:-15}
WARMUP=${WARMUP:-$(( INTERVAL + 5 ))}   # a first cycle (jittered over one interval)
SERVERS=${SERVERS:-$(( (N + 99) / 100 ))}
PER_SERVER=$(( (N + SERVERS - 1) / SERVERS ))
BIN=${PGVIGIL_BIN:-target/release/pgvigil}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /tmp/pgvigil-many.XXXXXX); chmod 755 "$WORK"
RUN=(); if [ "$(id -u)" -eq 0 ]; then id pgvigil-pg >/dev/null 2>&1 || useradd --system --no-create-home pgvigil-pg; chown -R pgvigil-pg "$WORK"; RUN=(runuser -u pgvigil-pg --); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port)
PGPORTS=()
cleanup() {
  [ -n "${PGV_PID:-}" ] && kill "$PGV_PID" 2>/dev/null && wait "$PGV_PID" 2>/dev/null || true
  for s in $(seq 1 "$SERVERS"); do
    [ -f "$WORK/data$s/postmaster.pid" ] && "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data$s" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
for s in $(seq 1 "$SERVERS"); do
  port=$(free_port); PGPORTS+=("$port")
  "${RUN[@]}" "$PGBIN/initdb" -D "$WORK/data$s" -U postgres --auth=trust -N >/dev/null
  cat >> "$WORK/data$s/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK'
max_connections = $(( 2 * PER_SERVER + 50 ))
shared_preload_libraries = 'pg_stat_statements'
fsync = off
CONF
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data$s" -l "$WORK/pg$s.log" -w start >/dev/null
  psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE EXTENSION pg_stat_statements"
done
{
  echo "listen: 127.0.0.1:$LISTEN"
  echo "targets:"
  for i in $(seq -w 1 "$N"); do
    port=${PGPORTS[$(( 10#$i % SERVERS ))]}
    echo "  - {name: t$i, dsn: \"postgresql://postgres@127.0.0.1:$port/postgres?sslmode=disable\", databases: {include: [\"^postgres\$\"]}}"
  done
  [ "$INTERVAL" = 15 ] || printf 'collectors:\n  defaults:\n    interval: %ss\n' "$INTERVAL"
  # More top-level config, e.g. EXTRA_YAML=$'activity:\n  sample_interval: 15s'.
  [ -z "${EXTRA_YAML:-}" ] || echo "$EXTRA_YAML"
} > "$WORK/pgvigil.yaml"
"$BIN" --config "$WORK/pgvigil.yaml" > "$WORK/pgvigil.log" 2>&1 &
PGV_PID=$!
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# The servers' CPU: every postmaster and its live children, plus the children that exited.
pg_ticks() {
  local total=0 pm pid
  for s in $(seq 1 "$SERVERS"); do
    pm=$(head -1 "$WORK/data$s/postmaster.pid")
    total=$(( total + $(awk '{print $14+$15+$16+$17}' "/proc/$pm/stat") ))
    for pid in $(ps -o pid= --ppid "$pm"); do total=$(( total + $(ticks "$pid") )); done
  done
  echo "$total"
}
# Busy and total jiffies of the whole machine.
cpu_all() { awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }
scrape() { curl -s --max-time 30 "http://127.0.0.1:$LISTEN/metrics"; }
sleep "$WARMUP"   # first cycle and jitter
scrape > "$WORK/before.txt"
t0=$(ticks "$PGV_PID"); p0=$(pg_ticks); read -r b0 a0 < <(cpu_all); s0=$(date +%s.%N)
sleep "$RUN_SECS"
t1=$(ticks "$PGV_PID"); p1=$(pg_ticks); read -r b1 a1 < <(cpu_all); s1=$(date +%s.%N)
scrape > "$WORK/metrics.txt"
now=$(date +%s.%N)
echo "targets: $N on $SERVERS PostgreSQL server(s), run: ${RUN_SECS}s after a ${WARMUP}s warm-up, interval ${INTERVAL}s, $(nproc) cores"
# Poll lag over the window: per `within` bound, polls counted after minus before (both
# scopes together, then each), and the quantiles as histogram_quantile computes them
# (linear within the bucket), with the bucket's bound.
lag_report() {
  awk -v scope="$1" '
    function bound(s) { return s == "+Inf" ? 1e300 : s + 0 }
    FNR == 1 { file++ }
    /^pgvigil_poll_lag_polls_total\{/ {
      if (scope != "all" && $0 !~ "scope=\"" scope "\"") next
      match($0, /within="[^"]*"/); w = substr($0, RSTART + 8, RLENGTH - 9)
      if (file == 1) before[w] += $NF; else after[w] += $NF
      seen[w] = 1
    }
    /^pgvigil_poll_lag_seconds_total\{/ {
      if (scope != "all" && $0 !~ "scope=\"" scope "\"") next
      if (file == 1) sb += $NF; else sa += $NF
    }
    END {
      n = 0; for (w in seen) { ws[++n] = w }
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (bound(ws[j]) < bound(ws[i])) { t = ws[i]; ws[i] = ws[j]; ws[j] = t }
      total = after["+Inf"] - before["+Inf"]
      if (total <= 0) { printf "poll lag (%s): no polls in the window\n", scope; exit }
      split("0.5 0.99", qs, " ")
      out = ""
      for (k = 1; k <= 2; k++) {
        q = qs[k]; rank = q * total; lo = 0; prev = 0
        for (i = 1; i <= n; i++) {
          c = after[ws[i]] - before[ws[i]]
          if (c >= rank) {
            hi = bound(ws[i])
            v = (ws[i] == "+Inf") ? lo : lo + (hi - lo) * (rank - prev) / (c - prev)
            out = out sprintf("p%g %.4f s (bucket <= %s), ", q * 100, v, ws[i]); break
          }
          lo = bound(ws[i]); prev = c
        }
      }
      max = "0"; maxlo = "0"; lo = "0"; prev = 0
      for (i = 1; i <= n; i++) { c = after[ws[i]] - before[ws[i]]; if (c > prev) { max = ws[i]; maxlo = lo }; lo = ws[i]; prev = c }
      on = 0; for (i = 1; i <= n; i++) if (bound(ws[i]) == 1) on = after[ws[i]] - before[ws[i]]
      printf "poll lag (%s): %d polls, %sworst in (%s, %s] s, mean %.4f s, started within 1 s: %d (%.2f %%)\n", scope, total, out, maxlo, max, (sa - sb) / total, on, 100 * on / total
    }' "$WORK/before.txt" "$WORK/metrics.txt"
}
lag_report all; lag_report cluster; lag_report database; lag_report activity
awk -v now="$now" -v every="$INTERVAL" '
  /^pgvigil_collector_last_success_timestamp_seconds\{/ { n++; age = now - $NF; if (age > max) max = age; if (age <= every + 2) ok++ }
  /^pg_up\{/ { up += $NF; t++ }
  END {
    printf "pg_up: %d of %d targets\n", up, t;
    printf "collectors on time (last success <= interval + 2 s ago): %d of %d; oldest %.1f s\n", ok, n, max;
  }' "$WORK/metrics.txt"
awk '
  FNR == 1 { file++ }
  /^pgvigil_collector_errors_total\{/ { if (file == 1) b += $NF; else a += $NF }
  END { printf "collector errors: %d in the window, %d since start\n", a - b, a }' "$WORK/before.txt" "$WORK/metrics.txt"
grep '^pgvigil_collector_duration_seconds{' "$WORK/metrics.txt" | awk '{print $NF}' | sort -g |
  awk '{ d[++m] = $1 } END { printf "collector run duration (last run of each): p50 %.4f s, p99 %.4f s, max %.4f s\n", d[int(m*0.5)], d[int(m*0.99)], d[m] }'
awk -v t0="$t0" -v t1="$t1" -v p0="$p0" -v p1="$p1" -v b0="$b0" -v b1="$b1" -v a0="$a0" -v a1="$a1" -v s0="$s0" -v s1="$s1" -v hz="$hz" -v cores="$(nproc)" 'BEGIN {
  secs = s1 - s0
  printf "pgvigil CPU: %.1f %% of one core\n", 100 * (t1 - t0) / hz / secs
  printf "PostgreSQL servers CPU: %.1f %% of one core\n", 100 * (p1 - p0) / hz / secs
  printf "machine CPU: %.1f %% busy of %d cores (%.1f %% of one core)\n", 100 * (b1 - b0) / (a1 - a0), cores, cores * 100 * (b1 - b0) / (a1 - a0)
}'
grep -E "VmRSS|VmHWM" "/proc/$PGV_PID/status"
conns=0
for port in "${PGPORTS[@]}"; do
  conns=$(( conns + $(psql -X -At -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvigil'") ))
done
echo "DB connections: $conns"
echo "pgvigil log lines with WARN/ERROR: $(grep -cE "WARN|ERROR" "$WORK/pgvigil.log" || true)"
grep -E "WARN|ERROR" "$WORK/pgvigil.log" | sed -E 's/\x1b\[[0-9;]*m//g; s/^[^ ]+ +//; s/t[0-9]+/tN/g; s/[0-9]+(\.[0-9]+)?(ms|s)\b/…/g' | cut -c1-160 | sort | uniq -c | sort -rn | head -5 || true
