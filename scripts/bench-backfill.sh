#!/usr/bin/env bash
# Backfill speed over a large archive, without a broker: `tally produce --file`
# writes BACKFILL_EVENTS events (Zipf over 100k videos, 6 h of event time),
# `tally replay` loads them (decode, archive, rollups, serving commit), then
# `tally backfill` recomputes every window: all rollups, and each one alone.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BACKFILL_EVENTS:-10000000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-backfill.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export TALLY__STORAGE__DATA_DIR="$OUT/data"
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 6h --file "$OUT/events.jsonl" 2>/dev/null
timed() { /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$OUT/out" 2>&1 || { cat "$OUT/out" >&2; exit 1; }; cat "$OUT/time"; }
read -r w u s m < <(timed "$TALLY" --log warn replay --file "$OUT/events.jsonl")
python3 -c "
n,w,u,s,m=$N,$w,$u,$s,$m
print(f'| replay, no broker ({n:,} events: decode, archive, 3 rollups, serving commit) | {w:.1f} s, {n/w:,.0f} events/s, {n/(u+s):,.0f} events per CPU-second, peak RSS {m/1024:.0f} MiB |')"
du -sb "$OUT/data/raw" | awk -v n="$N" '{printf "| raw archive | %.1f bytes per event |\n", $1 / n}'
FROM=$(date -u -d '-2 days' +%Y-%m-%dT00:00:00Z)
TO=$(date -u -d '+1 day' +%Y-%m-%dT00:00:00Z)
for rollup in "" day_video_events hour_video_events minute_video_events; do
  read -r w u s m < <(timed "$TALLY" --log warn backfill --from "$FROM" --to "$TO" ${rollup:+--rollup "$rollup"})
  rows=$(grep -o '[0-9]* rows written' "$OUT/out" | cut -d' ' -f1)
  python3 -c "
n,w,u,s,m,rows='$N',$w,$u,$s,$m,$rows
label='${rollup:-all 3 rollups}'
print(f'| backfill {label} over {int(n):,} archived events | {w:.2f} s, {int(n)/w:,.0f} archived rows/s, {rows:,} serving rows rewritten, peak RSS {m/1024:.0f} MiB |')"
done
