//! The PostgreSQL serving store (or Citus), through one sqlx pool. Writers
//! (many `tally run` processes) take a transaction-scoped advisory lock per
//! (topic, partition) before the fence read, and merge rows in key order so
//! that concurrent batches touching the same keys do not deadlock.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Row};

use super::reads::Arg;
use super::schema::*;
use super::{db, Cell, CommitOutcome, CommitRequest, PathRange, SinkError, Snapshot, TableRows};
use crate::aggregate::{ColumnKind, RollupDef, RollupOutput};

#[derive(Debug, Clone)]
pub(super) struct PgStore {
    pub(super) pool: PgPool,
    url: String,
    tables: Arc<Vec<TableSpec>>,
}

/// A window replacement in progress: its rollup tables and `tally_files` locked.
pub struct PgReplace(sqlx::Transaction<'static, sqlx::Postgres>);

fn sql(text: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(Dialect::Postgres.sql(text))
}

impl PgStore {
    /// Connect (the tables are made by [`PgStore::setup_schema`]).
    pub(super) async fn open(url: &str, rollups: &[RollupDef]) -> Result<PgStore, String> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| e.to_string())?;
        let store = PgStore {
            pool,
            url: url.to_string(),
            tables: Arc::new(
                rollups
                    .iter()
                    .map(|d| TableSpec::new(d, Dialect::Postgres))
                    .collect(),
            ),
        };
        Ok(store)
    }

    /// Create or check the tables, one process at a time.
    pub(super) async fn setup_schema(
        &self,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<(), SinkError> {
        // Several processes may create a new store at once: one at a time.
        let mut conn = self.pool.acquire().await.map_err(db("schema setup"))?;
        sqlx::query("SELECT pg_advisory_lock(7461626101)")
            .execute(&mut *conn)
            .await
            .map_err(db("schema lock"))?;
        let r = async {
            for stmt in BOOKKEEPING {
                sqlx::query(AssertSqlSafe(Dialect::Postgres.ddl(stmt)))
                    .execute(&mut *conn)
                    .await
                    .map_err(db("create bookkeeping tables"))?;
            }
            for def in rollups {
                let have = table_columns(&mut conn, &def.name).await?;
                for stmt in rollup_ddl(Dialect::Postgres, def, &have, &[], window_index)? {
                    sqlx::query(AssertSqlSafe(stmt))
                        .execute(&mut *conn)
                        .await
                        .map_err(db("create rollup table"))?;
                }
            }
            Ok::<(), SinkError>(())
        }
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock(7461626101)")
            .execute(&mut *conn)
            .await;
        r
    }

    pub(super) async fn load_offset_times(
        &self,
        topic: &str,
    ) -> Result<Vec<(i64, i64, i64)>, SinkError> {
        sqlx::query(sql(OFFSET_TIMES_SQL))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("load offsets"))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db("load offsets"))
    }

    /// Merge `outputs` in a transaction that is rolled back.
    pub(super) async fn probe_merge(&self, outputs: &[RollupOutput]) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        let merged = merge_rows(&mut tx, &self.tables, outputs).await;
        tx.rollback().await.map_err(db("rollback"))?;
        merged
    }

    /// A session advisory lock on a connection of its own (released if the
    /// process dies), or `None` if another session holds it.
    pub(super) async fn lock_source(&self, name: &str) -> Result<Option<PgConnection>, SinkError> {
        let opts = PgConnectOptions::from_str(&self.url).map_err(db("lock source"))?;
        let mut conn = PgConnection::connect_with(&opts)
            .await
            .map_err(db("lock source"))?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(format!("tally.source:{name}"))
            .fetch_one(&mut conn)
            .await
            .map_err(db("lock source"))?;
        Ok(got.then_some(conn))
    }

    /// Record `def`'s definition unless one is; the stored (fingerprint, definition).
    pub(super) async fn record_definition(
        &self,
        def: &RollupDef,
        now_ms: i64,
    ) -> Result<(String, String), SinkError> {
        sqlx::query(sql(RECORD_DEFINITION_SQL))
            .bind(&def.name)
            .bind(def.fingerprint())
            .bind(def.normalized_sql())
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(db("record rollup definitions"))?;
        sqlx::query_as(sql(READ_DEFINITION_SQL))
            .bind(&def.name)
            .fetch_one(&self.pool)
            .await
            .map_err(db("read rollup definitions"))
    }

    /// The recorded (fingerprint, SQL) of `def`, reading only: `None` when
    /// the store has no record of it (or no bookkeeping tables yet).
    pub(super) async fn stored_definition(
        &self,
        def: &RollupDef,
    ) -> Result<Option<(String, String)>, SinkError> {
        match sqlx::query_as(sql(READ_DEFINITION_SQL))
            .bind(&def.name)
            .fetch_optional(&self.pool)
            .await
        {
            Ok(row) => Ok(row),
            // 42P01: undefined_table, a store nobody has set up.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(None),
            Err(e) => Err(db("read rollup definitions")(e)),
        }
    }

    pub(super) async fn register_start(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<i64, SinkError> {
        sqlx::query(sql(REGISTER_START_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .bind(next)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(db("register partition start"))?;
        sqlx::query_scalar(sql(READ_OFFSET_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .fetch_one(&self.pool)
            .await
            .map_err(db("register partition start"))
    }

    pub(super) async fn reset_offset(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), $2)")
            .bind(topic)
            .bind(partition)
            .execute(&mut *tx)
            .await
            .map_err(db("lock partition"))?;
        let old: Option<i64> = sqlx::query_scalar(sql(READ_OFFSET_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("read offsets"))?;
        sqlx::query(sql(RESET_OFFSET_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .bind(next)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("reset offset"))?;
        // The archive reads from there too.
        sqlx::query(sql(ARCHIVE_ADVANCE_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .bind(next)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("reset offset"))?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(old)
    }

    /// One batch commit (see the module docs of `serving`). A connection
    /// whose transaction failed is closed, not returned to the pool.
    pub(super) async fn commit(&self, req: &CommitRequest<'_>) -> Result<CommitOutcome, SinkError> {
        let mut conn = self.pool.acquire().await.map_err(db("acquire"))?;
        let outcome = commit(&mut conn, &self.tables, req).await;
        if outcome.is_err() {
            let _ = conn.detach().close().await;
        }
        outcome
    }

    /// Lock the rollup tables and `tally_files` (in the order batch commits
    /// write them) until the replacement commits.
    pub(super) async fn begin_replace(&self) -> Result<PgReplace, SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        let mut tables: Vec<String> = self.tables.iter().map(|t| quote(&t.name)).collect();
        tables.push("tally_files".into());
        sqlx::query(AssertSqlSafe(format!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            tables.join(", ")
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("lock rollup tables"))?;
        Ok(PgReplace(tx))
    }

    pub(super) async fn raw_files(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        let mut conn = self.pool.acquire().await.map_err(db("list raw files"))?;
        raw_files(&mut conn, range).await
    }

    pub(super) async fn open_hours_in(tx: &mut PgReplace) -> Result<Vec<i64>, SinkError> {
        open_hours_on(&mut tx.0).await
    }

    pub(super) async fn raw_files_in(
        tx: &mut PgReplace,
        range: &PathRange,
    ) -> Result<Vec<String>, SinkError> {
        raw_files(&mut tx.0, range).await
    }

    pub(super) async fn replace_windows(
        &self,
        tx: PgReplace,
        ranges: &[(RollupDef, i64, i64)],
        outputs: &[RollupOutput],
    ) -> Result<u64, SinkError> {
        let mut tx = tx.0;
        let mut deleted = 0;
        for (def, lo, hi) in ranges {
            deleted += sqlx::query(sql(&delete_windows_sql(&def.name, def)))
                .bind(lo)
                .bind(hi)
                .execute(&mut *tx)
                .await
                .map_err(db("delete windows"))?
                .rows_affected();
        }
        super::pg_copy::insert_replaced(&mut tx, &self.tables, ranges, outputs).await?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(deleted)
    }

    pub(super) async fn read_rows(
        &self,
        def: &RollupDef,
        lo: i64,
        hi: i64,
        max: Option<i64>,
    ) -> Result<TableRows, SinkError> {
        let mut conn = self.pool.acquire().await.map_err(db("read rollup rows"))?;
        read_rows(&mut conn, def, lo, hi, max).await
    }

    /// In one repeatable-read snapshot.
    pub(super) async fn read_snapshot(
        &self,
        defs: &[&RollupDef],
        ranges: &[(i64, i64)],
        files: &PathRange,
    ) -> Result<Snapshot, SinkError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db("begin"))?;
        let mut tables = Vec::with_capacity(defs.len());
        for (def, (lo, hi)) in defs.iter().zip(ranges) {
            tables.push(read_rows(&mut tx, def, *lo, *hi, None).await?);
        }
        let files = raw_files(&mut tx, files).await?;
        let open = open_hours_on(&mut tx).await?;
        tx.rollback().await.map_err(db("rollback"))?;
        Ok((tables, files, open))
    }

    pub(super) async fn committed_among(
        &self,
        paths: &[String],
    ) -> Result<HashSet<String>, SinkError> {
        let mut found = HashSet::new();
        for chunk in paths.chunks(PATHS_PER_STATEMENT) {
            let mut q = sqlx::query(sql(&recorded_paths_sql(chunk.len())));
            for path in chunk {
                q = q.bind(path.as_str());
            }
            for r in q
                .fetch_all(&self.pool)
                .await
                .map_err(db("read recorded files"))?
            {
                found.insert(
                    r.try_get::<String, _>(0)
                        .map_err(db("read recorded files"))?,
                );
            }
        }
        Ok(found)
    }

    pub(super) async fn as_of_rows(&self, topic: &str) -> Result<PartitionTimes, SinkError> {
        sqlx::query(sql(AS_OF_SQL))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read as_of"))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db("read as_of"))
    }

    pub(super) async fn files_in_range(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(FILES_IN_RANGE_SQL)))
            .bind(&range.0)
            .bind(&range.1)
            .fetch_all(&self.pool)
            .await
            .map_err(db("list files"))?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("list files"))
    }

    pub(super) async fn forget_files(&self, paths: &[String]) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("forget files"))?;
        let sql = Dialect::Postgres.sql(FORGET_FILE_SQL);
        for p in paths {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(p)
                .execute(&mut *tx)
                .await
                .map_err(db("forget files"))?;
        }
        tx.commit().await.map_err(db("forget files"))
    }

    pub(super) async fn dlq_files(&self, topic: &str) -> Result<Vec<String>, SinkError> {
        sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(DLQ_FILES_SQL)))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("list dead-letter files"))?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("list dead-letter files"))
    }

    pub(super) async fn replayed(&self, topic: &str) -> Result<Vec<(i32, i64)>, SinkError> {
        sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(REPLAYED_SQL)))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read replayed dead letters"))?
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)? as i32, r.try_get::<i64, _>(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("read replayed dead letters"))
    }

    pub(super) async fn set_counters(&self, values: &[(&str, i64)]) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("set counters"))?;
        for (name, value) in values {
            sqlx::query(sql(SET_COUNTER_SQL))
                .bind(*name)
                .bind(*value)
                .execute(&mut *tx)
                .await
                .map_err(db("set counters"))?;
        }
        tx.commit().await.map_err(db("set counters"))
    }

    pub(super) async fn counters(&self) -> Result<BTreeMap<String, i64>, SinkError> {
        sqlx::query(COUNTERS_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read counters"))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("read counters"))
    }

    pub(super) async fn close(&self) {
        self.pool.close().await
    }
}

/// `(name, upper-case type)` of each column of `table`, in order; empty when
/// the table does not exist.
async fn table_columns(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, SinkError> {
    sqlx::query(
        "SELECT column_name::text, upper(data_type)::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("inspect table"))?
    .iter()
    .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
    .collect::<Result<Vec<(String, String)>, sqlx::Error>>()
    .map_err(db("inspect table"))
}

/// Committed raw archive files in `range` (paths relative to the data directory).
async fn open_hours_on(conn: &mut PgConnection) -> Result<Vec<i64>, SinkError> {
    sqlx::query_scalar(AssertSqlSafe(Dialect::Postgres.sql(OPEN_HOURS_SQL)))
        .fetch_all(&mut *conn)
        .await
        .map_err(db("read open archive hours"))
}

async fn raw_files(conn: &mut PgConnection, range: &PathRange) -> Result<Vec<String>, SinkError> {
    sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(RAW_FILES_SQL)))
        .bind(&range.0)
        .bind(&range.1)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("list raw files"))?
        .iter()
        .map(|r| r.try_get::<String, _>(0).map_err(db("list raw files")))
        .collect()
}

/// The rows of `def` with `lo <= window < hi` (and `window <= max`), by window.
async fn read_rows(
    conn: &mut PgConnection,
    def: &RollupDef,
    lo: i64,
    hi: i64,
    max: Option<i64>,
) -> Result<TableRows, SinkError> {
    let text = read_rows_sql(Dialect::Postgres, def, max.is_some());
    let mut q = sqlx::query(sql(&text)).bind(lo).bind(hi);
    if let Some(m) = max {
        q = q.bind(m);
    }
    let rows = q
        .fetch_all(&mut *conn)
        .await
        .map_err(db("read rollup rows"))?;
    let mut out: TableRows = Vec::with_capacity(rows.len());
    for r in rows {
        let mut cells = Vec::with_capacity(def.columns.len());
        for (i, c) in def.columns.iter().enumerate() {
            let cell = match c.kind {
                ColumnKind::Text => r.try_get::<Option<String>, _>(i).map(|v| v.map(Cell::Text)),
                ColumnKind::Int => r.try_get::<Option<i64>, _>(i).map(|v| v.map(Cell::Int)),
                ColumnKind::Real => r.try_get::<Option<f64>, _>(i).map(|v| v.map(Cell::Real)),
                ColumnKind::Bytes => r
                    .try_get::<Option<Vec<u8>>, _>(i)
                    .map(|v| v.map(Cell::Bytes)),
            }
            .map_err(db("read rollup rows"))?;
            cells.push(cell.unwrap_or(Cell::Null));
        }
        out.push(cells);
    }
    Ok(out)
}

/// One batch commit on `conn` (see the module docs of `serving`).
async fn commit(
    conn: &mut PgConnection,
    tables: &[TableSpec],
    req: &CommitRequest<'_>,
) -> Result<CommitOutcome, SinkError> {
    let d = Dialect::Postgres;
    let mut tx = conn.begin().await.map_err(db("begin"))?;
    // Serialize the writers of each partition (in partition order).
    for p in req.partitions.keys() {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), $2)")
            .bind(req.topic)
            .bind(*p)
            .execute(&mut *tx)
            .await
            .map_err(db("lock partition"))?;
    }

    // 1. Fence.
    let rows = sqlx::query(AssertSqlSafe(d.sql(FENCE_SQL)))
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
            return Ok(CommitOutcome::Fenced {
                partition: *p,
                expected: range.expected_start,
                stored: have,
            });
        }
    }

    // 2. Merge rollups.
    merge_rows(&mut tx, tables, req.outputs).await?;
    crate::failpoint::failpoint("inside_serving_transaction");

    // 3. Record files.
    let record = d.sql(RECORD_FILE_SQL);
    for f in req.files {
        sqlx::query(AssertSqlSafe(record.clone()))
            .bind(&f.path)
            .bind(f.kind.as_str())
            .bind(req.topic)
            .bind(i64::from(f.partition))
            .bind(f.first_offset)
            .bind(f.last_offset)
            .bind(f.rows as i64)
            .bind(f.bytes as i64)
            .bind(req.now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("record files"))?;
        // Under its staging name until renamed after this commit.
        sqlx::query(AssertSqlSafe(d.sql(RECORD_PENDING_SQL)))
            .bind(&f.path)
            .bind(req.topic)
            .bind(i64::from(f.partition))
            .execute(&mut *tx)
            .await
            .map_err(db("record files"))?;
    }

    // Dead letters counted by a replay.
    if let Some((topic, letters)) = req.replayed {
        let sql = d.sql(RECORD_REPLAYED_SQL);
        for (p, o) in letters {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(topic)
                .bind(i64::from(*p))
                .bind(*o)
                .bind(req.now_ms)
                .execute(&mut *tx)
                .await
                .map_err(db("record replayed dead letters"))?;
        }
    }

    // 4. Offsets (with the newest event time, for as_of) and counters.
    let advance = d.sql(&advance_sql(d));
    for (p, range) in req.partitions {
        sqlx::query(AssertSqlSafe(advance.clone()))
            .bind(req.topic)
            .bind(i64::from(*p))
            .bind(range.next_offset())
            .bind(req.now_ms)
            .bind(req.max_event_ms.get(p).copied())
            .execute(&mut *tx)
            .await
            .map_err(db("advance offsets"))?;
    }
    super::pg_archive::note_archive(&mut tx, req).await?;
    let caught_up = d.sql(&caught_up_sql(d));
    for (p, next) in req.caught_up {
        sqlx::query(AssertSqlSafe(caught_up.clone()))
            .bind(req.sealed_at_ms)
            .bind(req.topic)
            .bind(i64::from(*p))
            .bind(*next)
            .execute(&mut *tx)
            .await
            .map_err(db("mark caught-up partitions"))?;
    }
    let count = d.sql(COUNTER_SQL);
    for (name, delta) in req.counters {
        if *delta == 0 {
            continue;
        }
        sqlx::query(AssertSqlSafe(count.clone()))
            .bind(name)
            .bind(*delta)
            .execute(&mut *tx)
            .await
            .map_err(db("update counters"))?;
    }
    tx.commit().await.map_err(db("commit"))?;
    Ok(CommitOutcome::Committed)
}

/// One `INSERT … SELECT * FROM UNNEST($1::text[], …) ON CONFLICT DO UPDATE`
/// per rollup batch (one array per column, rows in key order, so concurrent
/// writers lock shared rows in one order): a single statement text per
/// table whatever the row count.
pub(super) async fn merge_rows(
    conn: &mut PgConnection,
    tables: &[TableSpec],
    outputs: &[RollupOutput],
) -> Result<(), SinkError> {
    for out in outputs {
        let Some(spec) = tables.iter().find(|t| t.name == out.rollup) else {
            continue;
        };
        for b in &out.batches {
            if b.num_rows() == 0 {
                continue;
            }
            let b = &super::pg_sketch::premerge(conn, spec, b).await?;
            let order: Vec<usize> = spec
                .row_order(b)?
                .unwrap_or_else(|| (0..b.num_rows()).collect());
            let mut q = sqlx::query(AssertSqlSafe(spec.unnest_sql.clone()));
            for (c, (_, kind)) in spec.columns.iter().enumerate() {
                let arr = b.column(c);
                q = match kind {
                    ColumnKind::Text => {
                        let a = arr.as_string::<i32>();
                        q.bind(
                            order
                                .iter()
                                .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                .collect::<Vec<Option<&str>>>(),
                        )
                    }
                    ColumnKind::Int => {
                        let a = arr.as_primitive::<Int64Type>();
                        q.bind(
                            order
                                .iter()
                                .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                .collect::<Vec<Option<i64>>>(),
                        )
                    }
                    ColumnKind::Real => {
                        let a = arr.as_primitive::<Float64Type>();
                        q.bind(
                            order
                                .iter()
                                .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                .collect::<Vec<Option<f64>>>(),
                        )
                    }
                    ColumnKind::Bytes => {
                        let a = arr.as_binary::<i32>();
                        q.bind(
                            order
                                .iter()
                                .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                .collect::<Vec<Option<&[u8]>>>(),
                        )
                    }
                };
            }
            q.execute(&mut *conn)
                .await
                .map_err(db("merge rollup rows"))?;
        }
    }
    Ok(())
}

/// The API's read pool (see `serving/reads.rs`).
#[derive(Debug)]
pub(super) struct PgReads {
    pool: PgPool,
}

impl PgReads {
    /// A pool of `connections`, connected on first use.
    pub(super) fn open(url: &str, connections: usize) -> Result<PgReads, String> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
        Ok(PgReads {
            pool: PgPoolOptions::new()
                .max_connections(u32::try_from(connections.max(1)).unwrap_or(4))
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy_with(opts),
        })
    }

    /// Run `text` (with `?N` placeholders) with `args`, mapping each row.
    async fn rows<T>(
        &self,
        text: &str,
        args: Vec<Arg>,
        operation: &'static str,
        row: impl Fn(&sqlx::postgres::PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, SinkError> {
        let mut q = sqlx::query(sql(text));
        for a in args {
            q = match a {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
            };
        }
        q.fetch_all(&self.pool)
            .await
            .map_err(db(operation))?
            .iter()
            .map(|r| row(r).map_err(db(operation)))
            .collect()
    }

    pub(super) async fn cells(
        &self,
        text: &str,
        args: Vec<Arg>,
        kinds: &[crate::aggregate::ColumnKind],
    ) -> Result<Vec<Vec<super::Cell>>, SinkError> {
        use super::Cell;
        use crate::aggregate::ColumnKind;
        self.rows(text, args, "read rollup rows", |r| {
            let mut out = Vec::with_capacity(kinds.len());
            for (i, k) in kinds.iter().enumerate() {
                out.push(
                    match k {
                        ColumnKind::Text => r.try_get::<Option<String>, _>(i)?.map(Cell::Text),
                        ColumnKind::Int => r.try_get::<Option<i64>, _>(i)?.map(Cell::Int),
                        ColumnKind::Real => r.try_get::<Option<f64>, _>(i)?.map(Cell::Real),
                        // `array_agg` of the sketches (see `serve::generic`),
                        // merged here: PostgreSQL has no sketch functions.
                        ColumnKind::Bytes => r
                            .try_get::<Option<Vec<Vec<u8>>>, _>(i)?
                            .and_then(|parts| super::pg_sketch::union_cells(parts).transpose())
                            .transpose()
                            .map_err(|e| sqlx::Error::Decode(e.into()))?
                            .map(Cell::Bytes),
                    }
                    .unwrap_or(Cell::Null),
                );
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn as_of_rows(&self, topic: &str) -> Result<PartitionTimes, SinkError> {
        self.rows(
            AS_OF_SQL,
            vec![Arg::Text(topic.to_string())],
            "read as_of",
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )
        .await
    }

    pub(super) async fn ping(&self) -> Result<(), SinkError> {
        self.rows("SELECT count(*) FROM tally_offsets", vec![], "ping", |_| {
            Ok(())
        })
        .await
        .map(|_| ())
    }
}
