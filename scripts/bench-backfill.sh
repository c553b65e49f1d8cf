#!/usr/bin/env bash
# Backfill speed over a large archive, without a broker: `tally produce --file`
# writes BACKFILL_EVENTS events (Zipf over 100k videos, 6 h of event time),
# `tally replay` loads them (decode, archive, rollups, serving commit), then
# `tally backfill` recomputes every window: all rollups, and each one alone.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BACKFILL_EVENTS:-10000000}
R=$(ls sql/rollups/*.sql | wc -l)
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-backfill.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export TALLY__STORAGE__DATA_DIR="$OUT/data"
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 6h --file "$OUT/events.jsonl" 2>/dev/null
timed() { /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$OUT/out" 2>&1 || { cat "$OUT/out" >&2; exit 1; }; cat "$OUT/time"; }
read -r w u s m < <(timed "$TALLY" --log warn replay --file "$OUT/events.jsonl")
python3 -c "
n,w,u,s,m=$N,$w,$u,$s,$m
print(f'| replay, no broker ({n:,} events: decode, archive, $R rollups, serving commit) | {w:.1f} s, {n/w:,.0f} events/s, {n/(u+s):,.0f} events per CPU-second, peak RSS {m/1024:.0f} MiB |')"
du -sb "$OUT/data/raw" | awk -v n="$N" '{printf "| raw archive | %.1f bytes per event |\n", $1 / n}'
FROM=$(date -u -d '-2 days' +%Y-%m-%dT00:00:00Z)
TO=$(date -u -d '+1 day' +%Y-%m-%dT00:00:00Z)
for rollup in "" day_video_events hour_video_events minute_video_events; do
  read -r w u s m < <(timed "$TALLY" --log warn backfill --from "$FROM" --to "$TO" ${rollup:+--rollup "$rollup"})
  rows=$(grep -o '[0-9]* rows written' "$OUT/out" | cut -d' ' -f1)
  python3 -c "
n,w,u,s,m,rows='$N',$w,$u,$s,$m,$rows
label='${rollup:-all $R rollups}'
print(f'| backfill {label} over {int(n):,} archived events | {w:.2f} s, {int(n)/w:,.0f} archived rows/s, {rows:,} serving rows rewritten, peak RSS {m/1024:.0f} MiB |')"
done

# Issue #25, item 4: a NEW rollup's history from the archive (an empty
# table: nothing to delete), beside DuckDB computing the same GROUP BY over
# the same Parquet files into a table of its own, in the same run. On SQLite
# and on PostgreSQL (skipped with BENCH_SKIP_POSTGRES).
if [ -z "${BENCH_SKIP_NEW_ROLLUP:-}" ]; then
  python3 -c 'import duckdb' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check duckdb >&2
  mkdir -p "$OUT/rollups"
  cp sql/rollups/*.sql "$OUT/rollups/"
  sed 's/output: serving table hour_video_events/output: serving table new_hour_video_events/' \
    sql/rollups/hour_video_events.sql >"$OUT/rollups/new_hour_video_events.sql"
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" python3 - "$OUT" <<'PY' >"$OUT/duck"
import duckdb, glob, sys, time
out = sys.argv[1]
files = glob.glob(f"{out}/data/raw/events/*/*/*.parquet")
c = duckdb.connect(f"{out}/duck.db")
t = time.perf_counter()
c.execute("""CREATE TABLE new_hour_video_events AS
  SELECT video_id, event_type, time_bucket(INTERVAL '1 hour', event_time) AS window_start,
         count(*) AS events, sum(value) AS value_sum, count(value) AS value_count,
         min(value) AS value_min, max(value) AS value_max
  FROM read_parquet(?) GROUP BY ALL""", [files])
c.close()
print(time.perf_counter() - t, duckdb.__version__)
PY
  read -r dw dver <"$OUT/duck"
  read -r _ du ds dm <"$OUT/time"
  stores="sqlite"
  [ -z "${BENCH_SKIP_POSTGRES:-}" ] && stores="sqlite postgres"
  for store in $stores; do
    url="sqlite://$OUT/data/serving.db"
    if [ "$store" = postgres ]; then
      PGDB=tally_bench_new_$$
      psql postgres://tally:tally@127.0.0.1:5432/tally -qc "CREATE DATABASE $PGDB"
      url="postgres://tally:tally@127.0.0.1:5432/$PGDB"
      # The same archive's records in PostgreSQL: `tally rebuild` (the
      # shipped rollups), then the new one is backfilled as on SQLite.
      TALLY__SERVING__URL="$url" "$TALLY" --log warn rebuild >/dev/null
    fi
    read -r w u s m < <(TALLY__SERVING__URL="$url" TALLY__SQL__ROLLUPS_DIR="$OUT/rollups" \
      timed "$TALLY" --log warn backfill --from "$FROM" --to "$TO" --rollup new_hour_video_events)
    rows=$(grep -o '[0-9]* rows written' "$OUT/out" | cut -d' ' -f1)
    [ "$store" = postgres ] && psql postgres://tally:tally@127.0.0.1:5432/tally -qc "DROP DATABASE $PGDB WITH (FORCE)"
    python3 -c "
n,w,u,s,rows,dw,du,ds='$N',$w,$u,$s,$rows,$dw,$du,$ds
print(f'| a new rollup\'s history ({rows:,} rows) from {int(n):,} archived events, $store | tally backfill {w:.2f} s ({int(n)/w:,.0f} events/s, {int(n)/(u+s):,.0f} per CPU-s); DuckDB $dver CREATE TABLE AS GROUP BY {dw:.2f} s ({int(n)/dw:,.0f} events/s; its process {du+ds:.1f} CPU-s) | **{w/dw:.2f}x** DuckDB\'s time |')"
  done
fi
