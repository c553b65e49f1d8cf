#!/usr/bin/env bash
# Does bookkeeping cost grow with the archive's age? The same `tally verify`
# (one rollup, the hours of one day of events) over an archive of that day
# alone (1x) and over 30 such days (30x). Without a broker: `tally produce
# --file` writes one day (ARCHIVE_DAY_EVENTS events over the last 20 h), a
# copy shifted back by k days is day k, and `tally replay` loads each in
# batches of ARCHIVE_BATCH_ROWS (small batches: many files, as a live stream
# writes them).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${ARCHIVE_DAY_EVENTS:-100000}
DAYS=${ARCHIVE_DAYS:-30}
RUNS=${ARCHIVE_VERIFY_RUNS:-3}
export TALLY__BATCH__MAX_ROWS=${ARCHIVE_BATCH_ROWS:-1000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-archive.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export TALLY__DECODE__MAX_EVENT_AGE=$((DAYS + 2))d
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 20h --file "$OUT/day0.jsonl" 2>/dev/null
python3 - "$OUT" "$DAYS" <<'EOF'
import json, sys, datetime
out, days = sys.argv[1], int(sys.argv[2])
lines = open(f"{out}/day0.jsonl").read().splitlines()
for k in range(1, days):
    shift = k * 86_400_000
    with open(f"{out}/day{k}.jsonl", "w") as f:
        for line in lines:
            e = json.loads(line)
            t = e["event_time"]
            if isinstance(t, str):
                ms = int(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)
            else:
                ms = t
            e["event_time"] = ms - shift
            e["event_id"] = f"d{k}-{e['event_id']}"
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
EOF
load() { # data dir, days
  for k in $(seq 0 $(($2 - 1))); do
    TALLY__STORAGE__DATA_DIR="$1" "$TALLY" --log warn replay --file "$OUT/day$k.jsonl" >/dev/null
  done
}
load "$OUT/a" 1
load "$OUT/b" "$DAYS"
FROM=$(date -u -d '-21 hours' +%Y-%m-%dT%H:00:00Z)
TO=$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)
for dir in a b; do
  files=$(python3 -c "import sqlite3,sys; print(sqlite3.connect('$OUT/$dir/serving.db').execute(\"select count(*) from tally_files where kind='raw'\").fetchone()[0])")
  times=()
  for _ in $(seq "$RUNS"); do
    /usr/bin/time -f "%e" -o "$OUT/time" env TALLY__STORAGE__DATA_DIR="$OUT/$dir" \
      "$TALLY" --log warn verify --from "$FROM" --to "$TO" --rollup hour_video_events >"$OUT/verify" 2>&1 \
      || { cat "$OUT/verify" >&2; exit 1; }
    times+=("$(cat "$OUT/time")")
  done
  read_files=$(grep -o '[0-9]* raw files' "$OUT/verify" | head -1 | cut -d' ' -f1)
  label=$([ "$dir" = a ] && echo "1x (1 day)" || echo "${DAYS}x ($DAYS days)")
  python3 -c "
import statistics
t=[float(x) for x in '${times[*]}'.split()]
print(f'| verify of one day, archive {\"$label\":<14} | {int(\"$files\"):,} committed raw files in the archive | {int(\"${read_files:-0}\"):,} read | median {statistics.median(t):.2f} s of {len(t)} runs |')"
done
