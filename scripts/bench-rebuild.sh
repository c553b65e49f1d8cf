#!/usr/bin/env bash
# The archive standing alone, timed without a broker (issue #24, items 3 and 7).
# 1. rebuild: `tally replay` loads REBUILD_EVENTS events (20 h of them, 3% late)
#    into a SQLite store; the store is moved away and `tally rebuild` recreates
#    it from the archive alone. Every rollup's merged rows must be equal.
# 2. compact: the same events replayed into an archive of small files (one
#    open file at a time and batches of COMPACT_BATCH_ROWS: about a file per
#    batch and event hour, as tallies before the manifest wrote them); its
#    manifest is removed, and `tally compact` rewrites it, then `tally verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${REBUILD_EVENTS:-2000000}
TALLY=${TALLY_BIN:-$PWD/target/release/tally}
OUT=$(mktemp -d /tmp/tally-bench-rebuild.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
"$TALLY" --log warn produce --count "$N" --videos 100000 --zipf 1.1 --time-spread 20h \
  --late-fraction 0.03 --file "$OUT/events.jsonl" 2>/dev/null
timed() { # label, command...: wall s, CPU s, max RSS MB
  local label=$1
  shift
  /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$OUT/out" 2>&1 || { cat "$OUT/out" >&2; exit 1; }
  read -r wall user sys rss <"$OUT/time"
  python3 -c "
wall, cpu, rss, n = $wall, $user + $sys, $rss / 1024, $N
print(f'| $label | {wall:.1f} s | {cpu:.1f} s | {n / wall:,.0f} | {n / cpu:,.0f} | {rss:,.0f} MB |')"
}
merged() { # serving.db -> digest of every rollup's merged rows
  python3 - "$1" <<'EOF'
import hashlib, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
views = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'view' AND name LIKE '%\\_\\_merged' ESCAPE '\\' ORDER BY name")]
h = hashlib.sha256()
for v in views:
    for row in db.execute(f"SELECT * FROM {v} ORDER BY 1, 2, 3"):
        h.update(repr(row).encode())
print(len(views), h.hexdigest()[:16])
EOF
}
echo "| step | wall | CPU | events/s | events per CPU-s | max RSS |"
echo "|---|---|---|---|---|---|"
export TALLY__STORAGE__DATA_DIR="$OUT/a"
timed "replay (ingest, for scale)" "$TALLY" --log warn replay --file "$OUT/events.jsonl"
before=$(merged "$OUT/a/serving.db")
mkdir "$OUT/lost" && mv "$OUT"/a/serving.db* "$OUT/lost/"
timed "rebuild from the archive" "$TALLY" --log warn rebuild
after=$(merged "$OUT/a/serving.db")
[ "$before" = "$after" ] || { echo "rebuilt rollups differ: $before vs $after" >&2; exit 1; }
echo
echo "rebuilt rollups equal to the replayed ones ($after)"

export TALLY__STORAGE__DATA_DIR="$OUT/b"
TALLY__STORAGE__ARCHIVE_MAX_OPEN_FILES=1 TALLY__BATCH__MAX_ROWS=${COMPACT_BATCH_ROWS:-2000} \
  "$TALLY" --log warn replay --file "$OUT/events.jsonl" >/dev/null
rm -rf "$OUT/b/_tally"
python3 -c "import sqlite3; c=sqlite3.connect('$OUT/b/serving.db'); c.execute(\"DELETE FROM tally_files WHERE kind='manifest'\"); c.commit()"
count() { find "$OUT/b/raw" -name '*.parquet' ! -name '.*' | wc -l; }
files_before=$(count)
echo
echo "| step | wall | CPU | events/s | events per CPU-s | max RSS |"
echo "|---|---|---|---|---|---|"
timed "compact $files_before small files" "$TALLY" --log warn compact --before "$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)"
files_after=$(count)
"$TALLY" --log warn verify --from "$(date -u -d '-22 hours' +%Y-%m-%dT%H:00:00Z)" --to "$(date -u -d '+1 hour' +%Y-%m-%dT%H:00:00Z)" >"$OUT/verify" 2>&1 \
  || { cat "$OUT/verify" >&2; exit 1; }
echo
echo "raw files: $files_before before, $files_after after compaction; tally verify: no drift"
