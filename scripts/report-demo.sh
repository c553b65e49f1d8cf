#!/usr/bin/env bash
# A sample monthly report end to end: a local broker, `tally run`, events over
# the last ~58 days for the sample dims (data/dims), then
# `tally report monthly` as HTML, CSV and Markdown in bench-out/report/.
# With Chromium on the machine, also a screenshot (REPORT_SCREENSHOT=path.png).
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
N=${REPORT_EVENTS:-300000}
MONTH=${REPORT_MONTH:-$(date -u +%Y-%m)}
TALLY=$PWD/target/release/tally
OUT=$(mktemp -d /tmp/tally-report.XXXXXX)
DEST=$PWD/bench-out/report
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$OUT"; }
trap cleanup EXIT

(cd "$OUT" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
pids+=($!)
for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done

export TALLY__KAFKA__TOPIC=report-demo
export TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS="127.0.0.1:$PORT"
export TALLY__KAFKA__PROPERTIES__GROUP_ID=report-demo
export TALLY__STORAGE__DATA_DIR="$OUT/data"
export TALLY__API__LISTEN="127.0.0.1:0"
# The demo's events reach ~58 days back; the default accepts 7 days.
export TALLY__DECODE__MAX_EVENT_AGE=70d
"$TALLY" topic create --partitions 2 >/dev/null
"$TALLY" --log warn produce --count "$N" --dims data/dims/videos.csv --zipf 1.05 --time-spread 58d 2>&1 | tail -1 >&2
"$TALLY" --log warn run 2>"$OUT/tally.log" &
pids+=($!)
python3 - "$OUT/data/serving.db" "$N" <<'PY'
import sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        done = c.execute("SELECT coalesce(sum(next_offset),0) FROM tally_offsets").fetchone()[0]
        c.close()
        if done >= n:
            sys.exit(0)
    except sqlite3.Error:
        pass
    time.sleep(0.2)
sys.exit("tally did not drain the demo events in time")
PY
mkdir -p "$DEST"
"$TALLY" --log warn report monthly --month "$MONTH" --format html --out "$DEST/report-$MONTH.html"
"$TALLY" --log warn report monthly --month "$MONTH" --format md --out "$DEST/report-$MONTH.md"
"$TALLY" --log warn report monthly --month "$MONTH" --format csv --out "$DEST/report-$MONTH"
if [ -n "${REPORT_SCREENSHOT:-}" ] && command -v chromium >/dev/null; then
  mkdir -p "$(dirname "$REPORT_SCREENSHOT")"
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$OUT/chromium" --hide-scrollbars \
    --window-size=1024,${REPORT_SCREENSHOT_HEIGHT:-2000} --screenshot="$REPORT_SCREENSHOT" "file://$DEST/report-$MONTH.html" 2>/dev/null
  echo "$REPORT_SCREENSHOT"
fi
