#!/usr/bin/env bash
# The PostgreSQL serving store's share of ingest CPU, without a broker:
# `tally replay` of BENCH_EVENTS generated events (100,000 Zipf 1.1 videos,
# event times over SPREAD) into a fresh database, with rollup tables at
# fillfactor FILLFACTOR (tally creates them at 70). SPREAD=10s with
# TALLY__BATCH__MAX_ROWS=100000 is a 100k events/s stream in 1 s batches.
# Server CPU = all postgres processes, live and exited (the postmaster's
# children times), before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_EVENTS:-1000000}; SPREAD=${SPREAD:-10s}; FF=${FILLFACTOR:-70}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-share.XXXXXX)
ADMIN=postgres://tally:tally@127.0.0.1:5432/tally
DB=tally_share_$$
URL=postgres://tally:tally@127.0.0.1:5432/$DB
trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1; rm -rf "$OUT"' EXIT
scripts/postgres.sh >/dev/null 2>&1
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread "$SPREAD" --file "$OUT/events.jsonl" 2>/dev/null
head -1 "$OUT/events.jsonl" > "$OUT/first.jsonl"
psql "$ADMIN" -qc "CREATE DATABASE $DB"
export TALLY__SERVING__URL=$URL
# Create the tables (one event), set the fillfactor, empty them.
TALLY__STORAGE__DATA_DIR=$OUT/setup "$TALLY" --log warn replay --file "$OUT/first.jsonl" >/dev/null 2>&1
tables=$(psql "$URL" -tAc "SELECT string_agg(quote_ident(tablename), ',') FROM pg_tables WHERE schemaname = 'public'")
for t in ${tables//,/ }; do psql "$URL" -qc "ALTER TABLE $t SET (fillfactor = $FF)"; done
psql "$URL" -qc "TRUNCATE $tables"
pgcpu() { python3 -c '
import os
t = 0
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        if open(f"/proc/{p}/comm").read().strip() in ("postgres", "postmaster"):
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += sum(int(x) for x in f[11:15])
    except OSError:
        pass
print(t / os.sysconf("SC_CLK_TCK"))'; }
a=$(pgcpu)
TALLY__STORAGE__DATA_DIR=$OUT/data /usr/bin/time -f "%e %U %S" -o "$OUT/time" "$TALLY" --log warn replay --file "$OUT/events.jsonl" >/dev/null 2>&1
b=$(pgcpu)
read -r w u s < "$OUT/time"
rows=$(psql "$URL" -tAc "SELECT sum(n_tup_ins + n_tup_upd) || ' ' || sum(n_tup_hot_upd) || ' ' || sum(n_tup_upd) FROM pg_stat_user_tables WHERE relname NOT LIKE 'tally\_%'")
python3 - "$N" "$SPREAD" "$FF" "$w" "$u" "$s" "$a" "$b" $rows <<'PY'
import sys
n, spread, ff = int(sys.argv[1]), sys.argv[2], sys.argv[3]
w, u, s, a, b = map(float, sys.argv[4:9])
ops, hot, upd = map(int, sys.argv[9:12])
t, pg = u + s, b - a
print(f"| {n:,} events over {spread}, fillfactor {ff} | {w:.1f} | {t:.2f} | {n / t:,.0f} | {ops:,} | {pg:.2f} | {1e6 * pg / ops:.1f} | {100 * pg / (t + pg):.0f}% | {hot}/{upd} |")
PY
