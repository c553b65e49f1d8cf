#!/usr/bin/env bash
# The ingest cost of the sketch rollups (issue #25): one JSON-lines file of
# SKETCH_EVENTS generated events (10,000 Zipf 1.1 videos, 100,000 users,
# 6 h of event time) through `tally replay` (decode -> Arrow -> rollup SQL ->
# zstd Parquet archive -> SQLite serving commit) twice: with the shipped
# rollups but the two sketch ones, and with all of them
# (+ day_video_uniques: HLL of user_id; + hour_video_watch: two KLL of value).
# Each replay runs SKETCH_RUNS times; the table quotes medians: CPU s,
# events per CPU-second, peak RSS, and the cost of the sketches.
# Appends its rows to $SUMMARY when set (scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${SKETCH_EVENTS:-2000000}
RUNS=${SKETCH_RUNS:-2}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-sketches.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
"$TALLY" --log warn produce --count "$N" --videos 10000 --zipf 1.1 --time-spread 6h --file "$OUT/events.jsonl" 2>/dev/null
mkdir -p "$OUT/without" "$OUT/with"
cp sql/rollups/*.sql "$OUT/with/"
cp sql/rollups/*.sql "$OUT/without/"
rm "$OUT/without/day_video_uniques.sql" "$OUT/without/hour_video_watch.sql"
export TALLY__SQL__DIMENSIONS__VIDEOS="$PWD/data/dims/videos.csv"
for set in without with; do
  for i in $(seq "$RUNS"); do
    rm -rf "$OUT/data"
    TALLY__STORAGE__DATA_DIR="$OUT/data" TALLY__SQL__ROLLUPS_DIR="$OUT/$set" \
      /usr/bin/time -f "%e %U %S %M" -o "$OUT/$set.$i.time" "$TALLY" --log warn replay --file "$OUT/events.jsonl" >/dev/null 2>"$OUT/err" \
      || { cat "$OUT/err" >&2; exit 1; }
  done
done
python3 - "$OUT" "$N" "$RUNS" "${SUMMARY:-}" <<'PY'
import statistics, sys
out, n, runs, summary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
res = {}
for s in ("without", "with"):
    rows = [list(map(float, open(f"{out}/{s}.{i}.time").read().split())) for i in range(1, runs + 1)]
    cpu = statistics.median(r[1] + r[2] for r in rows)
    res[s] = (statistics.median(r[0] for r in rows), cpu, statistics.median(r[3] for r in rows) / 1024)
print(f"\nsketch rollups, tally replay of {n:,} events (median of {runs}):")
print("| rollups | wall s | CPU s | events per CPU-s | peak RSS MiB |")
print("|---|---|---|---|---|")
for s, label in (("without", "shipped but the sketch rollups (4)"), ("with", "all shipped (6: + day_video_uniques, hour_video_watch)")):
    w, c, m = res[s]
    print(f"| {label} | {w:.2f} | {c:.2f} | {n / c:,.0f} | {m:.0f} |")
extra = res["with"][1] / res["without"][1] - 1
print(f"the two sketch rollups cost {100 * extra:+.1f}% CPU per event")
if summary:
    with open(summary, "a") as f:
        f.write(f"ingest with the two sketch rollups (replay, events per CPU-s)|{n / res['with'][1]:,.0f} ({100 * extra:+.1f}% CPU vs without)|measured (issue 25)\n")
PY
