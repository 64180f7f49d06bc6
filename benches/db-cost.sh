#!/usr/bin/env bash
# Database time per collector (DESIGN.md §9: "at default intervals, database time per second
# <= 1/4 of postgres_exporter's at a 15 s scrape interval"). Runs pgvigil as scripts/bench.sh
# does (release build, no config file: one target from DATA_SOURCE_NAME, default intervals)
# against the shared harness's cluster and workload (../shared/bench: pg-up.sh, load.sh start),
# and diffs the pg_stat_statements rows of pgvigil's role over a window. Each collector's query
# is its own statement, so each row is one collector; rows are matched to collectors by their
# text against queries/*.yaml. Prints per collector: calls, server ms per call (exec, and plan
# when pg_stat_statements.track_planning is on) and ms per second of wall time, and the total,
# which covers everything the role ran (the activity sampler, the database list, ...).
# It measures the server's execution time only: not parse/plan time unless tracked, not
# connects. postgres_exporter's figure for the target comes from the harness
# (`peers.sh start top100`, `measure.sh http://127.0.0.1:9187/metrics`: db_exec_ms_per_scrape).
#
# Usage: benches/db-cost.sh [SECONDS] [LABEL]   (default 180 s after a 20 s warm-up)
# Env: BIN (default target/release/pgvigil), PORT (pgvigil's listener, 9188), PGPORT (55432),
#      ROLE (bench_new). Wrap it in `flock /tmp/pgvigil-bench.lock` on a shared machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${1:-180}
LABEL=${2:-$(date -u +%Y%m%d-%H%M%S)}
BIN=${BIN:-$ROOT/target/release/pgvigil}
PORT=${PORT:-9188}
PGPORT=${PGPORT:-55432}
ROLE=${ROLE:-bench_new}
OUT=${TMPDIR:-/tmp}/pgvigil-db-cost/$LABEL
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no pgvigil at $BIN (cargo build --release)" >&2; exit 2; }

snap() {
  psql -X -qAt -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -F $'\t' -c "
    SELECT s.dbid, s.queryid, s.calls, s.total_exec_time, s.total_plan_time,
           replace(replace(left(s.query, 300), E'\n', ' '), E'\t', ' ')
    FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
    WHERE r.rolname = '$ROLE'" >"$1"
}

export DATA_SOURCE_NAME="postgresql://$ROLE@127.0.0.1:$PGPORT/postgres?sslmode=disable&application_name=$ROLE"
setsid "$BIN" --listen "127.0.0.1:$PORT" >"$OUT/pgvigil.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true' EXIT
sleep 20
snap "$OUT/before.tsv"
t0=$(date +%s.%N)
sleep "$SECS"
snap "$OUT/after.tsv"
t1=$(date +%s.%N)
kill "$PID"
wait "$PID" 2>/dev/null || true
trap - EXIT

python3 - "$OUT/before.tsv" "$OUT/after.tsv" "$(echo "$t1 - $t0" | bc)" "$ROOT/queries" <<'EOF' | tee "$OUT/table.txt"
import collections, difflib, glob, re, sys
import yaml

before, after, secs, packs = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

def load(path):
    rows = {}
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        if len(f) == 6:
            rows[(f[0], f[1])] = (int(f[2]), float(f[3]), float(f[4]), f[5])
    return rows

def norm(sql):
    # pg_stat_statements replaces constants with $n: make both sides look alike.
    sql = re.sub(r"--[^\n]*", " ", sql)
    sql = re.sub(r"'[^']*'", "$", sql)
    sql = re.sub(r"\$\d+", "$", sql)
    sql = re.sub(r"\b\d+(\.\d+)?\b", "$", sql)
    return re.sub(r"\s+", " ", sql).strip().lower()[:250]

candidates = []
for f in sorted(glob.glob(packs + "/*.yaml")):
    for c in yaml.safe_load(open(f)).get("collectors") or []:
        for q in c.get("queries", []):
            candidates.append((c["name"], norm(q["sql"])))
            if q.get("texts"):
                candidates.append((c["name"] + " (texts)", norm(q["texts"])))

def collector(text):
    n = norm(text)
    score = lambda c: difflib.SequenceMatcher(None, c[1], n).ratio()
    best = max(candidates, key=score)
    return best[0] if score(best) > 0.5 else "other: " + n[:50]

b, a = load(before), load(after)
per = collections.defaultdict(lambda: [0, 0.0, 0.0])
for key, (calls, exec_ms, plan_ms, text) in a.items():
    c0, e0, p0, _ = b.get(key, (0, 0.0, 0.0, ""))
    if calls > c0:
        g = per[collector(text)]
        g[0] += calls - c0
        g[1] += exec_ms - e0
        g[2] += plan_ms - p0
print(f"window {secs:.0f} s; server time from pg_stat_statements (exec + plan where tracked)")
print(f"{'collector':28} {'calls':>6} {'ms/call':>8} {'ms/s':>7}")
total = [0, 0.0]
for name, (calls, e, p) in sorted(per.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
    print(f"{name:28} {calls:6d} {(e + p) / calls:8.3f} {(e + p) / secs:7.3f}")
    total[0] += calls
    total[1] += e + p
print(f"{'total':28} {total[0]:6d} {total[1] / max(total[0], 1):8.3f} {total[1] / secs:7.3f}")
EOF
