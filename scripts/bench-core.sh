#!/usr/bin/env bash
# Core path without Kafka (issue #7): one JSON-lines file of CORE_EVENTS
# generated events (100,000 Zipf 1.1 videos, 1 h of event time) to the hourly
# rollup plus a zstd Parquet copy of every event, by
#   - tally replay (decode -> Arrow -> rollup SQL -> zstd Parquet archive ->
#     SQLite serving commit), with only the hourly rollup configured;
#   - DuckDB and DataFusion (Python packages from PyPI, installed if missing):
#     read the file, write the zstd(1) Parquet copy and the hourly rollup.
# Prints one table row per system: wall s, CPU s (user + sys), events/s,
# events per CPU-second, and tally's speed relative to each.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${CORE_EVENTS:-5000000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-core.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
python3 -c 'import duckdb, datafusion' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check duckdb datafusion >&2
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 1h --file "$OUT/raw.jsonl" 2>/dev/null
# One event-time format for every reader (the generator mixes RFC 3339 and epoch ms).
python3 - "$OUT/raw.jsonl" "$OUT/events.jsonl" <<'PY'
import json, sys, datetime
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    for line in src:
        e = json.loads(line)
        t = e["event_time"]
        if isinstance(t, int):
            e["event_time"] = datetime.datetime.fromtimestamp(t / 1000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        dst.write(json.dumps(e, separators=(",", ":")) + "\n")
PY
rm "$OUT/raw.jsonl"
mkdir -p "$OUT/rollups"
cp sql/rollups/hour_video_events.sql "$OUT/rollups/"
bytes=$(stat -c %s "$OUT/events.jsonl")

# tally
export TALLY__STORAGE__DATA_DIR="$OUT/tally" TALLY__SQL__ROLLUPS_DIR="$OUT/rollups" TALLY__API__ROLLUPS='["hour_video_events"]'
/usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$TALLY" --log warn replay --file "$OUT/events.jsonl" >/dev/null 2>"$OUT/tally.err" || { cat "$OUT/tally.err" >&2; exit 1; }
read -r tw tu ts tm < "$OUT/time"
traw=$(du -sb "$OUT/tally/raw" | cut -f1)

# Peak RSS against the micro-batch size: the same replay with batch.max_rows
# at R1 and R2 (no byte or time limit); the slope is the memory each buffered
# event costs, across the batch being decoded, the one queued and the one
# being committed.
R2=$(( N < 1000000 ? N : 1000000 )); R1=$(( R2 / 10 ))
rss() {
  rm -rf "$OUT/rss"
  TALLY__STORAGE__DATA_DIR="$OUT/rss" TALLY__BATCH__MAX_ROWS=$1 TALLY__BATCH__MAX_BYTES=4GiB TALLY__BATCH__LINGER=1h \
    /usr/bin/time -f "%M" -o "$OUT/rss.time" "$TALLY" --log warn replay --file "$OUT/events.jsonl" >/dev/null 2>"$OUT/rss.err" \
    || { cat "$OUT/rss.err" >&2; exit 1; }
  cat "$OUT/rss.time"
}
m1=$(rss "$R1"); m2=$(rss "$R2")
rm -rf "$OUT/rss"

python3 - "$OUT" "$N" "$bytes" "$tw" "$tu" "$ts" "$tm" "$traw" "$R1" "$m1" "$R2" "$m2" <<'PY'
import os, resource, sys, time
out, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tw, tu, ts, tm, traw = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
src = f"{out}/events.jsonl"

def timed(f):
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    f()
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    return w1 - w0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

def duck():
    import duckdb
    c = duckdb.connect()
    c.sql(f"""CREATE TABLE ev AS SELECT * FROM read_json('{src}', format='newline_delimited',
        columns={{event_id:'VARCHAR', video_id:'VARCHAR', event_type:'VARCHAR', event_time:'TIMESTAMPTZ',
                  user_id:'VARCHAR', value:'DOUBLE'}})""")
    c.sql(f"COPY ev TO '{out}/duck-raw.parquet' (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)")
    c.sql(f"""COPY (SELECT video_id, event_type, time_bucket(INTERVAL 1 hour, event_time) AS window_start,
        count(*) AS events, sum(value) AS value_sum, count(value) AS value_count, min(value) AS value_min,
        max(value) AS value_max FROM ev GROUP BY ALL) TO '{out}/duck-hour.parquet' (FORMAT parquet, COMPRESSION zstd)""")

def fusion():
    import datafusion, pyarrow as pa
    ctx = datafusion.SessionContext()
    schema = pa.schema([("event_id", pa.string()), ("video_id", pa.string()), ("event_type", pa.string()),
                        ("event_time", pa.timestamp("ms", tz="UTC")), ("user_id", pa.string()), ("value", pa.float64())])
    ctx.register_json("raw", src, schema=schema, file_extension=".jsonl")
    ctx.sql("CREATE TABLE ev AS SELECT * FROM raw").collect()
    ctx.sql("SELECT * FROM ev").write_parquet(f"{out}/df-raw.parquet", compression="zstd", compression_level=1)
    ctx.sql("""SELECT video_id, event_type, date_bin(INTERVAL '1 hour', event_time) AS window_start, count(*) AS events,
        sum(value) AS value_sum, count(value) AS value_count, min(value) AS value_min, max(value) AS value_max
        FROM ev GROUP BY video_id, event_type, window_start""").write_parquet(f"{out}/df-hour.parquet", compression="zstd")

rows = [("tally replay (archive + hourly rollup + SQLite commit)", tw, tu + ts, traw)]
for name, f, raw in (("DuckDB " + __import__("duckdb").__version__, duck, "duck-raw.parquet"),
                     ("DataFusion (Python) " + __import__("datafusion").__version__, fusion, "df-raw.parquet")):
    w, c = timed(f)
    p = f"{out}/{raw}"
    size_raw = sum(os.path.getsize(os.path.join(p, x)) for x in os.listdir(p)) if os.path.isdir(p) else os.path.getsize(p)
    rows.append((name, w, c, size_raw))
print(f"\ncore path, no broker: {n:,} events ({size / n:.0f} bytes of JSON each), to the hourly rollup + a zstd Parquet copy")
print("| system | wall s | CPU s | events/s | events per CPU-s | Parquet bytes/event | tally's speed (events per CPU-s) relative |")
print("|---|---|---|---|---|---|---|")
t_eff = n / rows[0][2]
for name, w, c, raw in rows:
    print(f"| {name} | {w:.2f} | {c:.2f} | {n / w:,.0f} | {n / c:,.0f} | {raw / n:.1f} | {t_eff / (n / c):.2f}x |")
print(f"tally peak RSS {tm / 1024:.0f} MiB")
r1, m1, r2, m2 = int(sys.argv[9]), int(sys.argv[10]), int(sys.argv[11]), int(sys.argv[12])
per_m = (m2 - m1) * 1024 / (r2 - r1) * 1e6 / 1e6  # bytes per event -> MB per million events
print(f"peak RSS with batch.max_rows = {r1:,}: {m1 / 1024:.0f} MiB; = {r2:,}: {m2 / 1024:.0f} MiB; "
      f"{per_m:.0f} MB per million buffered events ({(m2 - m1) * 1024 / (r2 - r1):.0f} bytes each)")
summary = os.environ.get("BENCH_SUMMARY")
if summary:
    duck = rows[1]
    with open(summary, "a") as out:
        out.write(f"core path (no broker), events per CPU-second: tally / {duck[0]}|{t_eff:,.0f} / {n / duck[2]:,.0f} = {t_eff / (n / duck[2]):.2f}x|above 1x\n")
        out.write(f"core path Parquet bytes per event: tally / {duck[0]}|{rows[0][3] / n:.1f} / {duck[3] / n:.1f}|at most 30\n")
        out.write(f"peak RSS per million buffered events (slope from batch.max_rows {r1:,} to {r2:,})|{per_m:.0f} MB|at most 250 MB\n")
PY
