#!/usr/bin/env bash
# The side-by-side benchmark (DESIGN.md §9): ../shared/bench/run-all.sh with pgvigil (release
# build, no config file: one target from DATA_SOURCE_NAME, default intervals) as the exporter
# under test, against postgres_exporter and sql_exporter, on the harness's 5,000-statement
# workload. The comparison table is saved as benches/results/<run id>.txt.
#
# Needs what the harness needs (see ../shared/bench/README.md): Debian's
# prometheus prometheus-postgres-exporter prometheus-sql-exporter wrk jq, PostgreSQL 15 in
# /usr/lib/postgresql/15/bin, python3. Takes several minutes; run it on a quiet machine.
# Env: BENCH (harness directory), PORT (pgvigil's, default 9188), and the harness's own
# (N, PEER_PROFILES, KEEP_UP, ...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/../shared/bench}
PORT=${PORT:-9188}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}
[ -x "$BENCH/run-all.sh" ] || { echo "no harness at $BENCH (set BENCH)" >&2; exit 2; }
cargo build --release --manifest-path "$ROOT/Cargo.toml"
mkdir -p "$ROOT/benches/results"
export RUN_ID NEW_NAME=pgvigil NEW_URL="http://127.0.0.1:$PORT/metrics"
export NEW_CMD="exec $ROOT/target/release/pgvigil --listen 127.0.0.1:$PORT"
export DASHBOARDS="${DASHBOARDS:-$ROOT/dashboards/*.json}"
LOG="${TMPDIR:-/tmp}/pgvigil-bench-$RUN_ID.log"
"$BENCH/run-all.sh" 2>&1 | tee "$LOG"
# The harness writes its results under its state directory.
table=$(ls -d "${BENCH_STATE:-/tmp/pgx-bench}/results/$RUN_ID/compare.txt" 2>/dev/null || true)
if [ -n "$table" ]; then
  { echo "# $(git -C "$ROOT" describe --always --dirty) $(date -u +%FT%TZ) $(nproc) cores"; cat "$table"; } \
    >"$ROOT/benches/results/$RUN_ID.txt"
  echo "saved benches/results/$RUN_ID.txt"
else
  echo "no compare.txt for run $RUN_ID (see $LOG)" >&2
  exit 1
fi
