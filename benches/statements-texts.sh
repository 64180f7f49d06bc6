#!/usr/bin/env bash
# What one statements poll costs with and without query texts: a throwaway PostgreSQL with
# 5,000 statements whose texts are ~1.5 KB each; the poll query of queries/statements.yaml
# as it was (pg_stat_statements(true), left(query, 4096)) and as it is (pg_stat_statements
# (false)), and the texts follow-up query for 100 queryids (run only when queries enter the
# top N). Prints bytes of the result as psql receives it and the server's execution time
# per call (pg_stat_statements of the measuring role; the COPY that counts the bytes shares the entry). Binds 127.0.0.1; stops its server by
# pid file. Usage: benches/statements-texts.sh [PG_BINDIR] [RUNS]
set -euo pipefail
BIN=${1:-/usr/lib/postgresql/15/bin}
RUNS=${2:-20}
PORT=${PORT:-55499}
DIR=$(mktemp -d /tmp/pgvigil-texts.XXXXXX)
chmod 777 "$DIR"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u pgtest -- "$@"; else "$@"; fi; }
cleanup() { as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.max = 10000
pg_stat_statements.track_utility = off
CONF
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
PSQL=(psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -c "CREATE EXTENSION pg_stat_statements"
# 5,000 distinct queryids (the +1/*1 pattern), each text padded to ~1.5 KB by a comment.
PAD=$(printf 'x%.0s' $(seq 1 1450))
python3 - "$PAD" >"$DIR/fill.sql" <<'PY'
import sys
pad = sys.argv[1]
for i in range(5000):
    expr = "1" + "".join("*1" if i >> b & 1 else "+1" for b in range(13))
    print(f"SELECT /* {pad} */ {expr};")
PY
"${PSQL[@]}" -f "$DIR/fill.sql" >/dev/null
# The 14-16 variant whole, with an empty list of unchanged fingerprints ($1): the poll that
# returns every row (the first one, and every 20th), the most a poll ships.
OLD=$(sed -n '/min_version: 14/,/WHERE s.fp NOT IN/p' "$(dirname "$0")/../queries/statements.yaml" \
  | sed -n '/sql: |/,$p' | sed '1d' \
  | sed "s/\$1::int8\[\]/'{}'::int8[]/" \
  | sed 's/NULL::text AS query,/left(s.query, 4096) AS query,/; s/pg_stat_statements(false)/pg_stat_statements(true)/')
NEW=$(echo "$OLD" | sed 's/left(s.query, 4096) AS query,/NULL::text AS query,/; s/pg_stat_statements(true)/pg_stat_statements(false)/')
IDS=$("${PSQL[@]}" -At -c "SELECT string_agg(queryid::text, ',') FROM (SELECT queryid FROM pg_stat_statements WHERE query LIKE 'SELECT /*%' ORDER BY queryid LIMIT 100) q")
TEXTS="SELECT d.datname::text AS datname, coalesce(r.rolname::text, s.userid::text) AS \"user\", s.queryid::text AS queryid, s.toplevel::text AS toplevel, left(s.query, 4096) AS query FROM pg_stat_statements(true) s JOIN pg_database d ON d.oid = s.dbid LEFT JOIN pg_roles r ON r.oid = s.userid WHERE s.queryid = ANY('{$IDS}'::text[]::bigint[])"
"${PSQL[@]}" -c "CREATE ROLE bench LOGIN; GRANT pg_monitor TO bench"
OLD=$(echo "$OLD" | tr '\n' ' ')
NEW=$(echo "$NEW" | tr '\n' ' ')
# label, SQL, a LIKE pattern that finds the SQL's own entry (of role bench)
measure() {
  local bytes ms stat before after
  bytes=$(psql -X -q -h 127.0.0.1 -p "$PORT" -U bench -d postgres -At -c "COPY ($2) TO STDOUT" | wc -c)
  stat="SELECT coalesce(sum(total_exec_time), 0) || ' ' || coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'bench' AND query LIKE \$p\$$3\$p\$"
  before=$("${PSQL[@]}" -At -c "$stat")
  for _ in $(seq 1 "$RUNS"); do
    psql -X -q -h 127.0.0.1 -p "$PORT" -U bench -d postgres -At -c "$2" >/dev/null
  done
  after=$("${PSQL[@]}" -At -c "$stat")
  ms=$(echo "$before $after" | awk '{ printf "%.2f", ($3 - $1) / ($4 - $2) }')
  printf '%-28s %12s %16s\n' "$1" "$bytes" "$ms"
}
echo "entries: $("${PSQL[@]}" -At -c "SELECT count(*) FROM pg_stat_statements") (avg text $("${PSQL[@]}" -At -c "SELECT round(avg(length(query))) FROM pg_stat_statements WHERE query LIKE 'SELECT /*%'") chars), $RUNS runs each, PostgreSQL $("${PSQL[@]}" -At -c "SHOW server_version")"
printf '%-28s %12s %16s\n' query "bytes/poll" "server ms/call"
measure "poll, with texts (before)" "$OLD" '%left(s.query%IS NOT NULL%'
measure "poll, no texts (after)" "$NEW" '%::text AS query,%'
measure "texts query, 100 queryids" "$TEXTS" '%ANY(%'
# A steady poll: $1 holds every entry's fingerprint, as after a poll where nothing ran
# since; no row is shipped, the server still reads every entry. It shares the poll's
# entry (the list is a constant), so measure() takes the difference of that entry.
FPS=$("${PSQL[@]}" -At -c "SELECT string_agg(fp::text, ',') FROM ($NEW) q")
STEADY=${NEW/"'{}'::int8[]"/"'{$FPS}'::int8[]"}
measure "poll, nothing changed" "$STEADY" '%::text AS query,%'
