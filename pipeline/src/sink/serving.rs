//! The serving store: one table per rollup plus tally's bookkeeping tables,
//! in SQLite (WAL mode). Every batch commits in one transaction that
//! 1. fences: each partition's stored next offset must equal the offset the
//!    batch was built on, so a stale or zombie writer fails here;
//! 2. merges the rollup rows (count/sum add, min/max take the extreme);
//! 3. records the archive files the batch wrote;
//! 4. advances the offsets and the counters.
//!
//! SQL here is built only from identifiers validated by the SQL catalog
//! (`[a-z_][a-z0-9_]*`); every value is a bound parameter.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::archive::WrittenFile;
use super::{db, SinkError};
use crate::aggregate::{ColumnKind, MergeRule, RollupDef, RollupOutput};
use crate::batch::PartitionRange;

/// SQLite allows 32766 bound parameters per statement.
const MAX_PARAMS: usize = 32_000;
const MAX_ROWS_PER_STATEMENT: usize = 1_000;

const BOOKKEEPING: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tally_offsets (
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        max_event_ms INTEGER,
        caught_up_ms INTEGER,
        PRIMARY KEY (topic, partition)
    ) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS tally_files (
        path TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        first_offset INTEGER NOT NULL,
        last_offset INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        committed_at_ms INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tally_counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID",
];

#[derive(Debug, Clone)]
struct TableSpec {
    name: String,
    columns: Vec<(String, ColumnKind)>,
    /// Full-chunk upsert statement and its row count.
    rows_per_statement: usize,
    upsert_head: String,
    upsert_tail: String,
    row_placeholder: String,
}

/// The outcome of a commit attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Another writer advanced this partition; the batch was not applied.
    Fenced { partition: i32, expected: Option<i64>, stored: Option<i64> },
}

/// Everything one batch commits.
#[derive(Debug)]
pub struct CommitRequest<'a> {
    pub topic: &'a str,
    pub partitions: &'a BTreeMap<i32, PartitionRange>,
    pub outputs: &'a [RollupOutput],
    pub files: &'a [WrittenFile],
    /// Counter increments (name, delta).
    pub counters: &'a [(String, i64)],
    /// Newest accepted event time per partition in this batch.
    pub max_event_ms: &'a BTreeMap<i32, i64>,
    /// Partitions read to their end, with their next offset, as of `sealed_at_ms`.
    pub caught_up: &'a BTreeMap<i32, i64>,
    pub sealed_at_ms: i64,
    pub now_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ServingStore {
    pool: SqlitePool,
    url: String,
    tables: Vec<TableSpec>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn sql_type(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Text => "TEXT",
        ColumnKind::Int => "INTEGER",
        ColumnKind::Real => "REAL",
    }
}

fn merge_sql(table: &str, col: &str, rule: MergeRule) -> String {
    let (t, c) = (quote(table), quote(col));
    match rule {
        MergeRule::Sum => format!("{c} = coalesce({t}.{c} + excluded.{c}, {t}.{c}, excluded.{c})"),
        MergeRule::Min => format!("{c} = coalesce(min({t}.{c}, excluded.{c}), {t}.{c}, excluded.{c})"),
        MergeRule::Max => format!("{c} = coalesce(max({t}.{c}, excluded.{c}), {t}.{c}, excluded.{c})"),
    }
}

impl TableSpec {
    fn new(def: &RollupDef) -> TableSpec {
        let columns: Vec<(String, ColumnKind)> = def.columns.iter().map(|c| (c.name.clone(), c.kind)).collect();
        let names: Vec<String> = columns.iter().map(|(n, _)| quote(n)).collect();
        let keys: Vec<String> = def.keys().iter().map(|c| quote(&c.name)).collect();
        let sets: Vec<String> = def
            .measures()
            .iter()
            .filter_map(|c| c.merge.map(|m| merge_sql(&def.name, &c.name, m)))
            .collect();
        let row_placeholder = format!("({})", vec!["?"; columns.len()].join(","));
        TableSpec {
            name: def.name.clone(),
            rows_per_statement: (MAX_PARAMS / columns.len().max(1)).clamp(1, MAX_ROWS_PER_STATEMENT),
            upsert_head: format!("INSERT INTO {} ({}) VALUES ", quote(&def.name), names.join(", ")),
            upsert_tail: format!(" ON CONFLICT ({}) DO UPDATE SET {}", keys.join(", "), sets.join(", ")),
            row_placeholder,
            columns,
        }
    }

    fn upsert_sql(&self, rows: usize) -> String {
        let mut s = String::with_capacity(self.upsert_head.len() + rows * (self.row_placeholder.len() + 1) + self.upsert_tail.len());
        s.push_str(&self.upsert_head);
        for i in 0..rows {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&self.row_placeholder);
        }
        s.push_str(&self.upsert_tail);
        s
    }
}

impl ServingStore {
    /// Open (creating if needed) the store and its tables.
    pub async fn open(url: &str, rollups: &[RollupDef]) -> Result<ServingStore, SinkError> {
        ServingStore::open_with(url, rollups, false).await
    }

    /// Open, creating (or, when `window_index` is false, dropping) an index on
    /// each rollup's window column.
    pub async fn open_with(url: &str, rollups: &[RollupDef], window_index: bool) -> Result<ServingStore, SinkError> {
        let open_err = |message: String| SinkError::Open { url: url.to_string(), message };
        if !url.starts_with("sqlite:") {
            return Err(open_err(
                "unsupported serving.url scheme; use sqlite://PATH (PostgreSQL support is planned)".into(),
            ));
        }
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| open_err(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            // 64 MiB of page cache per connection (default 2 MiB): large merge
            // transactions otherwise spill dirty pages to the WAL mid-transaction.
            .pragma("cache_size", "-65536");
        if let Some(parent) = opts.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
            }
        }
        // Another tally opening the same file may hold the lock for a moment
        // (switching to WAL, creating the schema): retry "database is locked".
        let mut attempt = 0;
        let pool = loop {
            match SqlitePoolOptions::new().max_connections(2).connect_with(opts.clone()).await {
                Ok(pool) => break pool,
                Err(e) if attempt < 40 && is_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(open_err(e.to_string())),
            }
        };
        // Schema setup without a long write transaction (readers such as
        // `tally verify` open the store while `tally run` commits), and safe
        // when several processes open a new store at once: every statement is
        // idempotent (IF NOT EXISTS; a concurrent ADD COLUMN is re-checked).
        let mut conn = pool.acquire().await.map_err(db("schema setup"))?;
        for stmt in BOOKKEEPING {
            sqlx::query(*stmt).execute(&mut *conn).await.map_err(db("create bookkeeping tables"))?;
        }
        // Stores created before `as_of` existed lack these columns.
        for col in ["max_event_ms", "caught_up_ms"] {
            let cols: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('tally_offsets')")
                .fetch_all(&mut *conn)
                .await
                .map_err(db("inspect tally_offsets"))?
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .collect();
            if !cols.iter().any(|c| c == col) {
                let added = sqlx::query(AssertSqlSafe(format!("ALTER TABLE tally_offsets ADD COLUMN {col} INTEGER")))
                    .execute(&mut *conn)
                    .await;
                if let Err(e) = added {
                    if !e.to_string().contains("duplicate column") {
                        return Err(db("upgrade tally_offsets")(e));
                    }
                }
            }
        }
        let mut tables = Vec::new();
        for def in rollups {
            ensure_table(&mut conn, def, window_index).await?;
            tables.push(TableSpec::new(def));
        }
        drop(conn);
        Ok(ServingStore { pool, url: url.to_string(), tables })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Committed next offsets of `topic`.
    pub async fn load_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        let rows = sqlx::query("SELECT partition, next_offset FROM tally_offsets WHERE topic = ?")
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("load offsets"))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let p: i64 = r.try_get(0).map_err(db("load offsets"))?;
            let n: i64 = r.try_get(1).map_err(db("load offsets"))?;
            out.insert(p as i32, n);
        }
        Ok(out)
    }

    /// Commit one batch atomically, or report that it was fenced.
    pub async fn commit(&self, req: &CommitRequest<'_>) -> Result<CommitOutcome, SinkError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db("begin"))?;

        // 1. Fence.
        let rows = sqlx::query("SELECT partition, next_offset FROM tally_offsets WHERE topic = ?")
            .bind(req.topic)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("read offsets"))?;
        let mut stored: BTreeMap<i32, i64> = BTreeMap::new();
        for r in rows {
            let p: i64 = r.try_get(0).map_err(db("read offsets"))?;
            let n: i64 = r.try_get(1).map_err(db("read offsets"))?;
            stored.insert(p as i32, n);
        }
        for (p, range) in req.partitions {
            let have = stored.get(p).copied();
            if have != range.expected_start {
                tx.rollback().await.map_err(db("rollback"))?;
                return Ok(CommitOutcome::Fenced { partition: *p, expected: range.expected_start, stored: have });
            }
        }

        // 2. Merge rollups.
        self.merge_outputs(&mut tx, req.outputs).await?;
        crate::failpoint::failpoint("inside_serving_transaction");

        // 3. Record files.
        for f in req.files {
            sqlx::query(
                "INSERT INTO tally_files (path, kind, topic, partition, first_offset, last_offset, rows, bytes, committed_at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (path) DO UPDATE SET rows = excluded.rows, bytes = excluded.bytes, committed_at_ms = excluded.committed_at_ms",
            )
            .bind(&f.path)
            .bind(f.kind.as_str())
            .bind(req.topic)
            .bind(f.partition)
            .bind(f.first_offset)
            .bind(f.last_offset)
            .bind(f.rows as i64)
            .bind(f.bytes as i64)
            .bind(req.now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("record files"))?;
        }

        // 4. Offsets (with the newest event time, for as_of) and counters.
        for (p, range) in req.partitions {
            sqlx::query(
                "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms, max_event_ms) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (topic, partition) DO UPDATE SET
                   next_offset = excluded.next_offset,
                   updated_at_ms = excluded.updated_at_ms,
                   max_event_ms = CASE
                     WHEN excluded.max_event_ms IS NULL THEN tally_offsets.max_event_ms
                     WHEN tally_offsets.max_event_ms IS NULL THEN excluded.max_event_ms
                     ELSE max(tally_offsets.max_event_ms, excluded.max_event_ms) END",
            )
            .bind(req.topic)
            .bind(*p)
            .bind(range.next_offset())
            .bind(req.now_ms)
            .bind(req.max_event_ms.get(p).copied())
            .execute(&mut *tx)
            .await
            .map_err(db("advance offsets"))?;
        }
        // A partition read to its end is complete up to the seal time, but only
        // if the stored offset is the one the consumer saw the end at.
        for (p, next) in req.caught_up {
            sqlx::query(
                "UPDATE tally_offsets SET caught_up_ms = max(coalesce(caught_up_ms, 0), ?)
                 WHERE topic = ? AND partition = ? AND next_offset = ?",
            )
            .bind(req.sealed_at_ms)
            .bind(req.topic)
            .bind(*p)
            .bind(*next)
            .execute(&mut *tx)
            .await
            .map_err(db("mark caught-up partitions"))?;
        }
        for (name, delta) in req.counters {
            if *delta == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO tally_counters (name, value) VALUES (?, ?)
                 ON CONFLICT (name) DO UPDATE SET value = tally_counters.value + excluded.value",
            )
            .bind(name)
            .bind(*delta)
            .execute(&mut *tx)
            .await
            .map_err(db("update counters"))?;
        }
        tx.commit().await.map_err(db("commit"))?;
        Ok(CommitOutcome::Committed)
    }

    /// Upsert-merge rollup rows (count/sum add, min/max take the extreme).
    async fn merge_outputs(&self, tx: &mut sqlx::SqliteConnection, outputs: &[RollupOutput]) -> Result<(), SinkError> {
        for out in outputs {
            let Some(spec) = self.tables.iter().find(|t| t.name == out.rollup) else {
                continue;
            };
            for b in &out.batches {
                let mut start = 0;
                while start < b.num_rows() {
                    let n = (b.num_rows() - start).min(spec.rows_per_statement);
                    let sql = spec.upsert_sql(n);
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for row in start..start + n {
                        for (c, (_, kind)) in spec.columns.iter().enumerate() {
                            let arr = b.column(c);
                            let null = arr.is_null(row);
                            q = match kind {
                                ColumnKind::Text => q.bind(if null {
                                    None
                                } else {
                                    Some(arr.as_string::<i32>().value(row).to_string())
                                }),
                                ColumnKind::Int => q.bind(if null {
                                    None
                                } else {
                                    Some(arr.as_primitive::<Int64Type>().value(row))
                                }),
                                ColumnKind::Real => q.bind(if null {
                                    None
                                } else {
                                    Some(arr.as_primitive::<Float64Type>().value(row))
                                }),
                            };
                        }
                    }
                    q.execute(&mut *tx).await.map_err(db("merge rollup rows"))?;
                    start += n;
                }
            }
        }
        Ok(())
    }

    /// Start the write transaction of a window replacement (excludes the live
    /// writer until [`ServingStore::replace_windows`] commits).
    pub async fn begin_replace(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, SinkError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db("begin"))
    }

    /// Committed raw archive files (paths relative to the data directory).
    pub async fn raw_files(conn: &mut sqlx::SqliteConnection) -> Result<Vec<String>, SinkError> {
        let rows = sqlx::query("SELECT path FROM tally_files WHERE kind = 'raw' ORDER BY path")
            .fetch_all(&mut *conn)
            .await
            .map_err(db("list raw files"))?;
        rows.iter().map(|r| r.try_get::<String, _>(0).map_err(db("list raw files"))).collect()
    }

    /// In `tx`: delete each rollup's windows in its `[lo, hi)`, then merge
    /// `outputs` (rows outside the ranges must already be filtered out), and commit.
    pub async fn replace_windows(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        ranges: &[(RollupDef, i64, i64)],
        outputs: &[RollupOutput],
    ) -> Result<u64, SinkError> {
        let mut deleted = 0;
        for (def, lo, hi) in ranges {
            let sql = format!(
                "DELETE FROM {} WHERE {} >= ? AND {} < ?",
                quote(&def.name),
                quote(def.window_name()),
                quote(def.window_name())
            );
            deleted += sqlx::query(AssertSqlSafe(sql))
                .bind(lo)
                .bind(hi)
                .execute(&mut *tx)
                .await
                .map_err(db("delete windows"))?
                .rows_affected();
        }
        self.merge_outputs(&mut tx, outputs).await?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(deleted)
    }

    /// Committed archive files of `topic`:`partition` starting below `below`.
    pub async fn recorded_files(
        &self,
        topic: &str,
        partition: i32,
        below: i64,
    ) -> Result<std::collections::HashSet<String>, SinkError> {
        let rows = sqlx::query("SELECT path FROM tally_files WHERE topic = ? AND partition = ? AND first_offset < ?")
            .bind(topic)
            .bind(partition)
            .bind(below)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read recorded files"))?;
        rows.iter().map(|r| r.try_get::<String, _>(0).map_err(db("read recorded files"))).collect()
    }

    /// The time up to which the store is complete for `topic` (epoch ms):
    /// the minimum over its partitions of the later of the newest committed
    /// event time and the time the partition was last read to its end.
    pub async fn as_of(&self, topic: &str) -> Result<Option<i64>, SinkError> {
        as_of(&self.pool, topic).await
    }

    /// All persistent counters.
    pub async fn counters(&self) -> Result<BTreeMap<String, i64>, SinkError> {
        let rows = sqlx::query("SELECT name, value FROM tally_counters ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read counters"))?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0).map_err(db("read counters"))?, r.try_get(1).map_err(db("read counters"))?)))
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// See [`ServingStore::as_of`].
pub async fn as_of(pool: &SqlitePool, topic: &str) -> Result<Option<i64>, SinkError> {
    let rows = sqlx::query("SELECT max_event_ms, caught_up_ms FROM tally_offsets WHERE topic = ?")
        .bind(topic)
        .fetch_all(pool)
        .await
        .map_err(db("read as_of"))?;
    let mut out: Option<i64> = None;
    for r in rows {
        let a: Option<i64> = r.try_get(0).map_err(db("read as_of"))?;
        let b: Option<i64> = r.try_get(1).map_err(db("read as_of"))?;
        if let Some(t) = a.max(b) {
            out = Some(out.map_or(t, |o| o.min(t)));
        }
    }
    Ok(out)
}

/// SQLITE_BUSY (5) or SQLITE_LOCKED (6).
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "5" || c == "6")
}

async fn ensure_table(
    conn: &mut sqlx::SqliteConnection,
    def: &RollupDef,
    window_index: bool,
) -> Result<(), SinkError> {
    // Optional: makes range scans by window (API top-K) index ranges, at
    // roughly a third more ingest CPU (one more B-tree write per upsert).
    let index_name = quote(&format!("{}__by_window", def.name));
    let index = if window_index {
        format!("CREATE INDEX IF NOT EXISTS {index_name} ON {} ({})", quote(&def.name), quote(def.window_name()))
    } else {
        format!("DROP INDEX IF EXISTS {index_name}")
    };
    let info = sqlx::query(AssertSqlSafe(format!("PRAGMA table_info({})", quote(&def.name))))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("inspect rollup table"))?;
    let wanted: Vec<(String, String)> = def
        .columns
        .iter()
        .map(|c| (c.name.clone(), sql_type(c.kind).to_string()))
        .collect();
    if info.is_empty() {
        let mut cols: Vec<String> = def
            .columns
            .iter()
            .map(|c| {
                let null = if c.merge.is_none() { " NOT NULL" } else { "" };
                format!("{} {}{null}", quote(&c.name), sql_type(c.kind))
            })
            .collect();
        let keys: Vec<String> = def.keys().iter().map(|c| quote(&c.name)).collect();
        cols.push(format!("PRIMARY KEY ({})", keys.join(", ")));
        let ddl = format!("CREATE TABLE IF NOT EXISTS {} (\n  {}\n) WITHOUT ROWID", quote(&def.name), cols.join(",\n  "));
        sqlx::query(AssertSqlSafe(ddl)).execute(&mut *conn).await.map_err(db("create rollup table"))?;
        sqlx::query(AssertSqlSafe(index)).execute(&mut *conn).await.map_err(db("create or drop the rollup window index"))?;
        return Ok(());
    }
    let have: Vec<(String, String)> = info
        .iter()
        .map(|r| {
            let name: String = r.try_get("name").unwrap_or_default();
            let ty: String = r.try_get("type").unwrap_or_default();
            (name, ty.to_ascii_uppercase())
        })
        .collect();
    if have != wanted {
        let show = |v: &[(String, String)]| v.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
        return Err(SinkError::Schema {
            table: def.name.clone(),
            message: format!(
                "the existing table has columns ({}) but {} now produces ({}); \
                 give the changed rollup a new file name (a new table) and backfill it, or drop the old table",
                show(&have),
                def.file.display(),
                show(&wanted)
            ),
        });
    }
    sqlx::query(AssertSqlSafe(index)).execute(&mut *conn).await.map_err(db("create or drop the rollup window index"))?;
    Ok(())
}
