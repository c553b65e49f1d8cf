#!/usr/bin/env bash
# End-to-end drain benchmark: pre-fill a topic, then time `tally run` draining it
# through archive and serving commit. Prints events/s and events per CPU-second.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
N=${BENCH_EVENTS:-1000000}
TALLY=$PWD/target/release/tally
OUT=$(mktemp -d /tmp/tally-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
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
"$TALLY" topic create --partitions 4 >/dev/null
echo "pre-filling $N events..." >&2
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 1h 2>&1 | tail -1 >&2

start=$(date +%s.%N)
"$TALLY" --log warn run 2>"$OUT/tally.log" &
TPID=$!
pids+=($TPID)
python3 - "$OUT/data/serving.db" "$N" "$TPID" "$start" <<'PY'
import os, sqlite3, sys, time
db, n, pid, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def hwm():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
deadline = time.time() + 1800
done = 0
while time.time() < deadline:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        done = c.execute("SELECT coalesce(sum(next_offset),0) FROM tally_offsets").fetchone()[0]
        c.close()
    except sqlite3.Error:
        pass
    if done >= n:
        break
    time.sleep(0.05)
wall = time.time() - start
c = cpu()
print()
print(f"| metric | value |")
print(f"|---|---|")
print(f"| events drained | {done} |")
print(f"| wall time (s) | {wall:.2f} |")
print(f"| events/s | {done / wall:,.0f} |")
print(f"| tally CPU (user+sys, s) | {c:.2f} |")
print(f"| events per CPU-second | {done / c:,.0f} |")
print(f"| peak RSS (MiB) | {hwm():.0f} |")
PY
du -sh "$OUT/data/raw" | awk '{print "| raw archive size | "$1" |"}'

kill -TERM "$TPID" 2>/dev/null || true
wait "$TPID" 2>/dev/null || true

# Backfill speed over a 10M-event archive (loaded without the broker).
scripts/bench-backfill.sh
