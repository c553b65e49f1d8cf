#!/usr/bin/env bash
# End-to-end drain benchmark: pre-fill a topic, then time `tally run` draining it
# through archive and serving commit. Prints events/s and events per CPU-second.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
N=${BENCH_EVENTS:-1000000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
# The measurement tools (tools/ crate), built next to tally.
BENCH=${TALLY_BENCH_BIN:-$(dirname "$TALLY")/tally-bench}
OUT=$(mktemp -d /tmp/tally-bench.XXXXXX)
# One line per headline figure: "metric|measured|goal"; printed as the summary table at the end.
SUMMARY=${BENCH_SUMMARY:-$OUT/summary}
export BENCH_SUMMARY=$SUMMARY
: > "$SUMMARY"
FRESH_RATE=${FRESH_RATE:-10000}
FRESH_PROBES=${FRESH_PROBES:-200}
# Events of history (3 days) replayed into the freshness store first, so the steady phase
# runs against a store that has grown, as a running deployment's has.
FRESH_HISTORY=${FRESH_HISTORY:-3000000}
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
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 1h --late-fraction 0.03 2>&1 | tail -1 >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# GET a URL (no curl on a fresh machine); fails on a non-2xx answer.
http_get() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null; }

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
    return 0
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
def state():
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
pg0 = postgres_cpu()
deadline = time.time() + 1800
done = 0
peak = 0
while time.time() < deadline:
    done = committed()
    peak = max(peak, hwm() or 0)
    if done >= n:
        break
    time.sleep(0.05)
rows = metric("tally_rollup_rows_merged_total")
wall = time.time() - start
# The counts are in (wall time: until then); the raw archive's open files
# commit at shutdown (SIGTERM). Their CPU belongs to the drain: read it until
# the process is gone (the last 20 ms may be missed).
os.kill(pid, 15)
c = cpu()
while time.time() < deadline:
    try:
        if state() == "Z":
            c = cpu()
            break
        c = cpu()
        peak = max(peak, hwm() or 0)
    except OSError:
        break
    time.sleep(0.02)
pg = 0.0
if url.startswith("postgres"):
    pg = postgres_cpu() - pg0
share = f"{100 * pg / (c + pg):.0f}% (PostgreSQL server {pg:.2f} CPU-s)" if pg else "in-process"
open(sys.argv[7], "w").write(f"{done} {wall}")
open(os.environ["BENCH_SUMMARY"], "a").write(f"end to end, tally run ({label}): events per CPU-second of tally|{done / c:,.0f}|at least 500,000 (stretch 1,000,000)\n")
print(f"| {label} | {done} | {wall:.2f} | {done / wall:,.0f} | {c:.2f} | {done / c:,.0f} | {rows / wall:,.0f} | {share} | {peak:.0f} |")
PY
  kill -TERM "$tpid" 2>/dev/null || true
  wait "$tpid" 2>/dev/null || true
}

# The limit: a bare librdkafka consumer reading the same topic (no decoding, no group).
bare() {
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/bare.time" "$BENCH" --log warn drain >"$OUT/bare.out" 2>&1 || { cat "$OUT/bare.out" >&2; return 1; }
  read -r w u s m < "$OUT/bare.time"
  msgs=$(cut -d' ' -f1 "$OUT/bare.out")
  python3 -c "
n,w,u,s,m=$msgs,$w,$u,$s,$m
print(f'| bare librdkafka consumer (tally-bench drain) | {n} | {w:.2f} | {n/w:,.0f} | {u+s:.2f} | {n/max(u+s,0.01):,.0f} | - | - | {m/1024:.0f} |')"
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
pct = 100 * (n / w) / (bn / bw)
print(f'tally with ${r##*rate-} drains at {pct:.0f}% of the bare consumer\'s rate (goal: at least 80%)')
open('$SUMMARY', 'a').write(f'end to end, tally run (${r##*rate-}): share of the bare consumer\'s drain rate|{pct:.0f}%|at least 80%\n')"
  done
fi
raw_bytes=$(du -sb "$OUT/data-sqlite/raw" | cut -f1)
python3 -c "
b, n = $raw_bytes, $N
print(f'raw archive: {b / 2**20:.1f} MiB, {b / n:.1f} bytes per event')
open('$SUMMARY', 'a').write(f'raw Parquet archive (zstd), bytes per event|{b / n:.1f}|at most 30\n')"

# The archive's shape after the SQLite drain: files per (partition, event hour),
# their median size, and a DataFusion (Python) scan over all of them (the issue
# of few, large files: listing and opening many small files is what readers pay).
python3 -c 'import datafusion' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check datafusion >&2
python3 - "$OUT/data-sqlite/raw/events" "$SUMMARY" <<'PY'
import os, re, statistics, sys, time, collections
root, summary = sys.argv[1], sys.argv[2]
groups, sizes = collections.Counter(), []
for d, _, names in os.walk(root):
    for n in names:
        m = re.match(r'.*-p(\d+)-\d+-\d+-w\w+\.parquet$', n)
        if m and not n.startswith('.'):
            groups[(d, m.group(1))] += 1
            sizes.append(os.path.getsize(os.path.join(d, n)))
per = sorted(groups.values())
import datafusion
ctx = datafusion.SessionContext()
ctx.register_parquet('events', root)
t = time.perf_counter()
rows = ctx.sql('SELECT count(*) AS n, sum(value) AS s FROM events').to_arrow_table().column('n')[0].as_py()
w = time.perf_counter() - t
print(f'raw archive shape: {len(sizes):,} files, {statistics.median(per):.0f} per partition and event hour (max {per[-1]}), '
      f'median file {statistics.median(sizes) / 2**20:.2f} MiB; DataFusion scan of all {rows:,} rows in {w:.2f} s, {rows / w:,.0f} events/s')
open(summary, 'a').write(f'raw archive: files per partition and event hour (median)|{statistics.median(per):.0f}|at most 3\n')
open(summary, 'a').write(f'raw archive: median file size|{statistics.median(sizes) / 2**20:.2f} MiB|at least 64 MiB at scale\n')
open(summary, 'a').write(f'DataFusion scan of the raw archive|{rows / w:,.0f} events/s|\n')
PY

# Freshness and API latency at a steady rate: a second, empty broker (tansu's
# SQLite storage slows down with the pre-filled topic in it), `tally run`
# (SQLite), `tally produce --rate FRESH_RATE`; then probe events timed from
# produce to visible in /v1/count, then /v1/count + /v1/stats at 2,000 req/s.
fresh() {
  local api bport; api=$(free_port); bport=$(free_port)
  mkdir -p "$OUT/broker-fresh"
  (cd "$OUT/broker-fresh" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$bport" --advertised-listener-url "tcp://127.0.0.1:$bport" \
    --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
  local bpid=$!
  pids+=($bpid)
  for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$bport") 2>/dev/null && break; sleep 0.1; done
  export TALLY__KAFKA__TOPIC=fresh TALLY__KAFKA__PROPERTIES__GROUP_ID=bench-fresh TALLY__STORAGE__DATA_DIR="$OUT/data-fresh" \
    TALLY__API__LISTEN="127.0.0.1:$api" TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS="127.0.0.1:$bport"
  "$TALLY" topic create --partitions 4 >/dev/null
  if [ "$FRESH_HISTORY" -gt 0 ]; then
    echo "replaying $FRESH_HISTORY events of history (3 days) into the freshness store..." >&2
    "$TALLY" --log warn produce --file "$OUT/history.jsonl" --count "$FRESH_HISTORY" --videos 100000 --zipf 1.1 \
      --time-spread 72h --seed 9 >/dev/null 2>&1
    "$TALLY" --log warn replay --file "$OUT/history.jsonl" >/dev/null 2>"$OUT/replay-history.log"
    rm -f "$OUT/history.jsonl"
  fi
  "$TALLY" --log warn run 2>"$OUT/tally-fresh.log" &
  local tpid=$!
  pids+=($tpid)
  for _ in $(seq 1 300); do http_get "http://127.0.0.1:$api/readyz" >/dev/null && break; sleep 0.1; done
  local secs=$(( 8 + 10 + FRESH_PROBES / 10 + 15 ))
  "$TALLY" --log warn produce --rate "$FRESH_RATE" --count $(( FRESH_RATE * secs )) --videos 100000 --zipf 1.1 --time-spread 2s \
    2>"$OUT/produce-fresh.log" &
  local ppid=$!
  pids+=($ppid)
  sleep 5
  # CPU seconds (user + sys) of a process so far.
  cpu_s() { python3 -c "import os,sys; f=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$1"; }
  # Steady state: tally's CPU over 10 s of ingest alone (no probes, no API load).
  local cs ms ts; cs=$(http_get "http://127.0.0.1:$api/metrics" | awk '/^tally_messages_consumed_total /{print $2}'); ms=$(date +%s.%N); ts=$(cpu_s "$tpid")
  sleep 10
  local c0 m0 t0 b0; c0=$(http_get "http://127.0.0.1:$api/metrics" | awk '/^tally_messages_consumed_total /{print $2}'); m0=$(date +%s.%N)
  t0=$(cpu_s "$tpid"); b0=$(cpu_s "$bpid")
  python3 - "$cs" "$c0" "$ms" "$m0" "$ts" "$t0" "$SUMMARY" "$FRESH_RATE" "$FRESH_HISTORY" <<'PY'
import sys
c0, c1, m0, m1, t0, t1 = map(float, sys.argv[1:7])
ev, cpu = c1 - c0, max(t1 - t0, 1e-9)
print(f"steady state, 10 s of ingest alone: tally consumed {ev / (m1 - m0):,.0f} events/s using {100 * cpu / (m1 - m0):.0f}% of a core: {ev / cpu:,.0f} events per CPU-s")
with open(sys.argv[7], "a") as out:
    out.write(f"steady {float(sys.argv[8]):,.0f} ev/s into SQLite holding {float(sys.argv[9]):,.0f} events of history: events per CPU-s of tally (10 s, ingest alone)|{ev / cpu:,.0f}|≥ 500,000, as end to end\n")
PY
  echo
  echo "steady ingest at $FRESH_RATE events/s (tally run, SQLite, $FRESH_HISTORY events of history in the store), after 5 s of warm-up:"
  echo "| freshness | probes | visible | p50 ms | p99 ms | max ms |"
  echo "|---|---|---|---|---|---|"
  http_get "http://127.0.0.1:$api/metrics" > "$OUT/metrics-before"
  "$BENCH" --log warn freshness --probes "$FRESH_PROBES" --interval 100ms --label "produce -> visible in /v1/count" \
    | tee "$OUT/fresh.row"
  http_get "http://127.0.0.1:$api/metrics" > "$OUT/metrics-after"
  # Where the time went, per batch committed during the probes (tally's own histograms,
  # tally_batch_stage_seconds and tally_visible_delay_seconds; quantiles interpolated
  # within buckets, as Prometheus' histogram_quantile does).
  echo
  echo "| per batch, during the probes | batches | p50 ms | p99 ms | over 1 s | over 2 s |"
  echo "|---|---|---|---|---|---|"
  python3 - "$OUT/metrics-before" "$OUT/metrics-after" <<'PY'
import re, sys
def buckets(path):
    h = {}
    for line in open(path):
        m = re.match(r'(tally_batch_stage_seconds|tally_visible_delay_seconds)_bucket\{(?:stage="(\w+)",)?le="([^"]+)"\} (\d+)', line)
        if m:
            name = m.group(2) or "visible"
            h.setdefault(name, []).append((float(m.group(3)), int(m.group(4))))
    return h
a, b = buckets(sys.argv[1]), buckets(sys.argv[2])
def q(bs, phi):
    total = bs[-1][1]
    rank, prev_le, prev_c = phi * total, 0.0, 0
    for le, c in bs:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1))
        prev_le, prev_c = le, c
    return prev_le
def over(bs, t):
    below = max((c for le, c in bs if le <= t), default=0)
    return bs[-1][1] - below
for name in ["fetch", "linger", "queue", "commit", "visible"]:
    if name not in b:
        continue
    before = dict(a.get(name, []))
    bs = [(le, c - before.get(le, 0)) for le, c in b[name]]
    n = bs[-1][1]
    if n == 0:
        continue
    label = "visible (oldest event: produce -> committed)" if name == "visible" else name
    print(f"| {label} | {n} | {q(bs, 0.5) * 1000:,.0f} | {q(bs, 0.99) * 1000:,.0f} | {over(bs, 1.0)} | {over(bs, 2.0)} |")
PY
  echo
  echo "| API phase | target req/s | achieved req/s | errors | p50 ms | p99 ms | p99.9 ms | max ms | server p50 / p99 ms |"
  echo "|---|---|---|---|---|---|---|---|---|"
  "$BENCH" --log warn api --rate 2000 --duration 10s --days 1 --videos 100000 --label "ingest $FRESH_RATE ev/s, 1-day ranges" \
    | tee "$OUT/api.row"
  local c1 m1 t1 b1; c1=$(http_get "http://127.0.0.1:$api/metrics" | awk '/^tally_messages_consumed_total /{print $2}'); m1=$(date +%s.%N)
  t1=$(cpu_s "$tpid"); b1=$(cpu_s "$bpid")
  python3 -c "w = $m1 - $m0; print(f'tally consumed {($c1 - $c0) / w:,.0f} events/s during the probes and the API phase (produced at $FRESH_RATE/s), using {100 * ($t1 - $t0) / w:.0f}% of a core (the API load included); the broker used {100 * ($b1 - $b0) / w:.0f}%')"
  kill "$ppid" 2>/dev/null || true
  kill -TERM "$tpid" 2>/dev/null || true
  wait "$tpid" 2>/dev/null || true
  python3 - "$OUT/fresh.row" "$OUT/api.row" "$SUMMARY" "$FRESH_RATE" <<'PY'
import sys
f = [c.strip() for c in open(sys.argv[1]).read().split("|")[1:-1]] or ["", "0", "0", "-", "-", "-"]
a = [c.strip() for c in open(sys.argv[2]).read().split("|")[1:-1]]
with open(sys.argv[3], "a") as out:
    out.write(f"freshness at {sys.argv[4]} ev/s: produce to visible in /v1/count, p50 / p99 ms ({f[2]} of {f[1]} probes seen)|{f[3]} / {f[4]}|p99 at most 2,000\n")
    out.write(f"API under {sys.argv[4]} ev/s of ingest, 2,000 req/s: p50 / p99 ms|{a[4]} / {a[5]}|p99 at most 5 (issue 3)\n")
PY
}
fresh

# Backfill speed over a 10M-event archive (loaded without the broker).
if [ -z "${BENCH_SKIP_BACKFILL:-}" ]; then scripts/bench-backfill.sh; fi

# The ingest cost of the sketch rollups (HLL, KLL), with and without them.
if [ -z "${BENCH_SKIP_SKETCHES:-}" ]; then TALLY_BIN=$TALLY SUMMARY=$SUMMARY scripts/bench-sketches.sh; fi

# Core path without a broker, against DuckDB and DataFusion; peak RSS per buffered event.
if [ -z "${BENCH_SKIP_CORE:-}" ]; then TALLY_BIN=$TALLY scripts/bench-core.sh; fi

echo
echo "summary ($(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ), tally $("$TALLY" --version | cut -d' ' -f2), $N events end to end):"
echo "| figure | measured | goal |"
echo "|---|---|---|"
python3 -c "
for line in open('$SUMMARY'):
    if line.strip():
        print('| ' + ' | '.join(line.rstrip('\n').split('|')) + ' |')"
