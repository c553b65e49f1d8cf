#!/usr/bin/env bash
# End-to-end drain benchmark: pre-fill a topic, then time `tally run` draining it
# through archive and serving commit. Prints events/s and events per CPU-second.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
N=${BENCH_EVENTS:-1000000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# drain STORE_URL LABEL: time `tally run` (own consumer group) draining the topic into STORE_URL.
drain() {
  local url=$1 label=$2 api
  api=$(free_port)
  local start; start=$(date +%s.%N)
  TALLY__KAFKA__PROPERTIES__GROUP_ID="bench-$label" TALLY__SERVING__URL="$url" TALLY__STORAGE__DATA_DIR="$OUT/data-$label" \
    TALLY__API__LISTEN="127.0.0.1:$api" "$TALLY" --log warn run 2>"$OUT/tally-$label.log" &
  local tpid=$!
  pids+=($tpid)
  python3 - "$url" "$N" "$tpid" "$start" "$api" "$label" "$OUT/rate-$label" <<'PY'
import os, sqlite3, subprocess, sys, time, urllib.request
url, n, pid, start, api, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def hwm():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
def postgres_cpu():
    total = 0
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{p}/comm").read().strip() in ("postgres", "postmaster"):
                f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total / tick
def committed():
    q = "SELECT coalesce(sum(next_offset),0) FROM tally_offsets"
    if url.startswith("postgres"):
        r = subprocess.run(["psql", url, "-tAc", q], capture_output=True, text=True)
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0
    try:
        c = sqlite3.connect(f"file:{url[len('sqlite://'):]}?mode=ro", uri=True, timeout=5)
        v = c.execute(q).fetchone()[0]
        c.close()
        return v
    except sqlite3.Error:
        return 0
def metric(name):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{api}/metrics", timeout=5).read().decode()
    except OSError:
        return 0
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0
pg0 = postgres_cpu()
deadline = time.time() + 1800
done = 0
while time.time() < deadline:
    done = committed()
    if done >= n:
        break
    time.sleep(0.05)
wall = time.time() - start
c = cpu()
rows = metric("tally_rollup_rows_merged_total")
pg = 0.0
if url.startswith("postgres"):
    pg = postgres_cpu() - pg0
share = f"{100 * pg / (c + pg):.0f}% (PostgreSQL server {pg:.2f} CPU-s)" if pg else "in-process"
open(sys.argv[7], "w").write(f"{done} {wall}")
print(f"| {label} | {done} | {wall:.2f} | {done / wall:,.0f} | {c:.2f} | {done / c:,.0f} | {rows / wall:,.0f} | {share} | {hwm():.0f} |")
PY
  kill -TERM "$tpid" 2>/dev/null || true
  wait "$tpid" 2>/dev/null || true
}

# The limit: a bare librdkafka consumer reading the same topic (no decoding, no group).
bare() {
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/bare.time" "$TALLY" --log warn topic drain >"$OUT/bare.out" 2>&1 || { cat "$OUT/bare.out" >&2; return 1; }
  read -r w u s m < "$OUT/bare.time"
  msgs=$(cut -d' ' -f1 "$OUT/bare.out")
  python3 -c "
n,w,u,s,m=$msgs,$w,$u,$s,$m
print(f'| bare librdkafka consumer (tally topic drain) | {n} | {w:.2f} | {n/w:,.0f} | {u+s:.2f} | {n/max(u+s,0.01):,.0f} | - | - | {m/1024:.0f} |')"
  echo "$msgs $w" > "$OUT/bare.rate"
}

echo
echo "| serving store | events drained | wall s | events/s | tally CPU s | events per CPU-s | rollup rows upserted/s | server CPU share | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
bare
drain "sqlite://$OUT/data-sqlite/serving.db" sqlite
if [ -z "${BENCH_SKIP_POSTGRES:-}" ]; then
  scripts/postgres.sh 2>/dev/null
  PGDB="tally_bench_$$"
  psql postgres://tally:tally@127.0.0.1:5432/tally -qc "CREATE DATABASE $PGDB"
  drain "postgres://tally:tally@127.0.0.1:5432/$PGDB" postgres
  psql postgres://tally:tally@127.0.0.1:5432/tally -qc "DROP DATABASE $PGDB WITH (FORCE)"
fi
echo
if [ -f "$OUT/bare.rate" ]; then
  for r in "$OUT"/rate-*; do
    python3 -c "
bn, bw = map(float, open('$OUT/bare.rate').read().split()); n, w = map(float, open('$r').read().split())
print(f'tally with ${r##*rate-} drains at {100 * (n / w) / (bn / bw):.0f}% of the bare consumer\'s rate (goal: at least 80%)')"
  done
fi
du -sh "$OUT/data-sqlite/raw" | awk '{print "raw archive size: "$1}'

# Backfill speed over a 10M-event archive (loaded without the broker).
if [ -z "${BENCH_SKIP_BACKFILL:-}" ]; then scripts/bench-backfill.sh; fi
