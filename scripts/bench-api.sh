#!/usr/bin/env bash
# API latency benchmark: p50/p99/p99.9 of /v1/count and /v1/stats over 30-day
# (and 400-day) ranges, and of generic /v1/rollups queries (2 days: one video
# grouped by event type; ten videos grouped by video; views per channel), of
# /v1/series (1 day hourly) and /v1/top (1 day), at a fixed request rate (open loop), idle and while
# ingest runs at a high rate. Prints one markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
N=${BENCH_API_EVENTS:-1000000}
RATES=${BENCH_API_RATES:-"2000 5000 10000"}
# /v1/top aggregates a whole day of every video: a heavier query.
TOP_RATES=${BENCH_API_TOP_RATES:-"5 20"}
# Sections to run (all by default): count rollups series top ingest.
SECTIONS=${BENCH_API_SECTIONS:-"count rollups series top ingest"}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
DURATION=${BENCH_API_DURATION:-10s}
INGEST_RATE=${BENCH_API_INGEST_RATE:-50000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
BENCH=$PWD/target/release/tally-bench
OUT=$(mktemp -d /tmp/tally-bench-api.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
API_PORT=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$OUT"; }
trap cleanup EXIT

(cd "$OUT" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
pids+=($!)
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done

export TALLY__KAFKA__TOPIC=bench
export TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS="127.0.0.1:$PORT"
export TALLY__KAFKA__PROPERTIES__GROUP_ID=bench
export TALLY__STORAGE__DATA_DIR="$OUT/data"
export TALLY__API__LISTEN="127.0.0.1:$API_PORT"
# History over 400 days, so 400-day ranges read real day rows.
export TALLY__DECODE__MAX_EVENT_AGE=401days
"$TALLY" topic create --partitions 4 >/dev/null
echo "pre-filling $N events over 400 days (10,000 videos, Zipf 1.1)..." >&2
"$TALLY" --log warn produce --count "$N" --videos 10000 --zipf 1.1 --time-spread 400days 2>&1 | tail -1 >&2

"$TALLY" --log warn run 2>"$OUT/tally.log" &
pids+=($!)
python3 - "$OUT/data/serving.db" "$N" <<'PY'
import sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 900
while time.time() < deadline:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        if c.execute("SELECT coalesce(sum(next_offset),0) FROM tally_offsets").fetchone()[0] >= n:
            sys.exit(0)
    except sqlite3.Error:
        pass
    time.sleep(0.2)
sys.exit("pre-fill was not drained in 15 minutes")
PY
echo "drained; serving rows: $(python3 -c "import sqlite3,sys; c=sqlite3.connect('file:$OUT/data/serving.db?mode=ro',uri=True); print(', '.join(f'{t}={c.execute(f\"select count(*) from {t}__merged\").fetchone()[0]}' for t in ['minute_video_events','hour_video_events','day_video_events']))")" >&2

TPID=$(pgrep -f "$TALLY --log warn run" | head -1)
echo "tally run's peak RSS after the pre-fill: $(awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' /proc/"$TPID"/status)" >&2
bench() { "$BENCH" --log warn api --rate "$1" --duration "$DURATION" --days "$2" --videos 10000 --label "$3"; }
if [ -n "${BENCH_API_PERF:-}" ]; then
  perf record -F 999 -g -p "$TPID" -o "$BENCH_API_PERF" -- sleep 8 >/dev/null 2>&1 &
fi
echo
echo "| phase | target req/s | achieved req/s | errors | p50 ms | p99 ms | p99.9 ms | max ms | server p50 / p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|"
if on count; then
for r in $RATES; do bench "$r" 30 "idle, 30-day ranges"; done
for r in $RATES; do bench "$r" 400 "idle, 400-day ranges"; done
fi
if on rollups; then
for r in $RATES; do
  "$BENCH" --log warn api --rate "$r" --duration "$DURATION" --days 2 --videos 10000 --generic 1 \
    --label "idle, /v1/rollups: 2 days, 1 video grouped by event type"
done
for r in $RATES; do
  "$BENCH" --log warn api --rate "$r" --duration "$DURATION" --days 2 --videos 10000 --generic 10 \
    --label "idle, /v1/rollups: 2 days, 10 videos grouped by video"
done
for r in $RATES; do
  "$BENCH" --log warn api --rate "$r" --duration "$DURATION" --days 2 --videos 10000 --generic 0 \
    --label "idle, /v1/rollups: 2 days of hour_channel_events, views grouped by channel (21 values)"
done
fi
if on series; then
for r in $RATES; do
  "$BENCH" --log warn api --rate "$r" --duration "$DURATION" --days 1 --videos 10000 --endpoint series \
    --label "idle, /v1/series: 1 day hourly, 1 video, every event type"
done
fi
if on top; then
for r in $TOP_RATES; do
  "$BENCH" --log warn api --rate "$r" --duration "$DURATION" --days 1 --videos 10000 --endpoint top \
    --label "idle, /v1/top: 1 day, 10 most viewed"
done
fi
on ingest || exit 0
"$TALLY" --log warn produce --rate "$INGEST_RATE" --count $((INGEST_RATE * 600)) --videos 10000 --time-spread 2s 2>"$OUT/produce.log" &
PROD=$!
pids+=($PROD)
sleep 3
for r in $RATES; do bench "$r" 30 "ingest ${INGEST_RATE} ev/s, 30-day ranges"; done
kill "$PROD" 2>/dev/null || true
