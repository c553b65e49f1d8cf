#!/usr/bin/env bash
# Quick start: broker + topic + `tally run` + a demo producer. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
PORT=${BROKER_PORT:-9092}
TALLY=${TALLY_BIN:-target/debug/tally}
export TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS="127.0.0.1:$PORT"
mkdir -p data/tansu
pids=()
cleanup() { echo; echo "stopping..."; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# tansu resolves sqlite:// paths against its working directory.
(cd data/tansu && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
pids+=($!)
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done

"$TALLY" topic create --partitions 4
"$TALLY" run 2>data/tally.log &
pids+=($!)
"$TALLY" produce --rate 2000 --count 100000000 --dims data/dims/videos.csv --late-fraction 0.01 --malformed-fraction 0.001 2>data/produce.log &
pids+=($!)

cat <<MSG
tally is running (logs: data/tally.log, data/produce.log, data/tansu/tansu.log).
  raw archive:   data/raw/events/dt=YYYY-MM-DD/hour=HH/*.parquet
  dead letters:  data/dlq/dt=YYYY-MM-DD/*.parquet
  serving store: data/serving.db (views minute_video_events__merged, hour_video_events__merged, day_video_events__merged)
  Web console:   http://127.0.0.1:8080/
  HTTP API:      http://127.0.0.1:8080 (see /openapi.json)
Look at it:
  curl -s "http://127.0.0.1:8080/v1/top?event_type=view&start=\$(date -u +%Y-%m-%dT00:00:00Z)&end=\$(date -u -d tomorrow +%Y-%m-%dT00:00:00Z)&limit=5"
  curl -s "http://127.0.0.1:8080/v1/count?video_id=vid-00001&start=\$(date -u +%Y-%m-%dT00:00:00Z)&end=\$(date -u -d tomorrow +%Y-%m-%dT00:00:00Z)"
  curl -s http://127.0.0.1:8080/metrics | grep ^tally_events
  sqlite3 data/serving.db "SELECT video_id, event_type, datetime(window_start/1000,'unixepoch'), events FROM hour_video_events__merged ORDER BY events DESC LIMIT 10"
  datafusion-cli -c "CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION 'data/raw/events/'; SELECT event_type, count(*) FROM events GROUP BY 1"
Press Ctrl-C to stop.
MSG
wait
