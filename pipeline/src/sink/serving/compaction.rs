//! `tally compact`'s record in `tally_files`: the kinds a file passes
//! through while old small raw files are rewritten (see `jobs/compact.rs`).
//!
//! - `compacting`: a new file being written (its final name recorded first,
//!   so no sweep removes its staged copy); not read as raw.
//! - `compacted`: an old file replaced by a committed new one, deleted
//!   next; still recorded, so no sweep races the job for it.
//!
//! The swap (`commit_compaction`) is one transaction: the old files go from
//! `raw` to `compacted` (all of them, or nothing: retention or another
//! compaction got there first), the new ones from `compacting` to their kind
//! and into `tally_archive_pending`, renamed next.

use sqlx::AssertSqlSafe;

use super::schema::*;
use super::{db, Backend, ServingStore, SinkError, WrittenFile};
use crate::serve::blocking;

pub(crate) const COMPACTING: &str = "compacting";
pub(crate) const COMPACTED: &str = "compacted";

const FIRST_RAW_SQL: &str = "SELECT min(path) FROM tally_files WHERE kind = 'raw'";
const OF_KIND_SQL: &str = "SELECT path FROM tally_files WHERE kind = ? ORDER BY path";
const SET_KIND_SQL: &str = "UPDATE tally_files SET kind = ? WHERE path = ? AND kind = ?";
const FORGET_SQL: &str = "DELETE FROM tally_files WHERE path = ? AND kind = ?";
const ALL_PENDING_SQL: &str =
    "SELECT topic, partition, path FROM tally_archive_pending ORDER BY topic, partition, path";

fn records_sql(n: usize) -> String {
    format!(
        "SELECT path, topic, partition, first_offset, last_offset, rows, bytes FROM tally_files \
         WHERE kind = 'raw' AND path IN ({})",
        vec!["?"; n].join(", ")
    )
}

/// A recorded raw file: (topic, file).
pub(crate) type Record = (String, WrittenFile);

impl ServingStore {
    /// The first recorded raw path (the archive's oldest hour), if any.
    pub async fn first_raw_path(&self) -> Result<Option<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("read the oldest raw file", |c| {
                    c.query_row(FIRST_RAW_SQL, [], |r| r.get(0))
                })
            }),
            Backend::Postgres(s) => sqlx::query_scalar(FIRST_RAW_SQL)
                .fetch_one(&s.pool)
                .await
                .map_err(db("read the oldest raw file")),
        }
    }

    /// The records of those of `paths` recorded as raw.
    pub async fn raw_records(&self, paths: &[String]) -> Result<Vec<Record>, SinkError> {
        let mut out = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(PATHS_PER_STATEMENT) {
            let sql = records_sql(chunk.len());
            let rows: Vec<(String, String, i64, i64, i64, i64, i64)> = match &self.backend {
                Backend::Sqlite(s) => blocking(|| {
                    s.with_conn("read file records", |c| {
                        let mut st = c.prepare(&sql)?;
                        let rows = st.query_map(rusqlite::params_from_iter(chunk), |r| {
                            Ok((
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                            ))
                        })?;
                        rows.collect()
                    })
                })?,
                Backend::Postgres(s) => {
                    let text = Dialect::Postgres.sql(&sql);
                    let mut q = sqlx::query_as(AssertSqlSafe(text));
                    for p in chunk {
                        q = q.bind(p);
                    }
                    q.fetch_all(&s.pool)
                        .await
                        .map_err(db("read file records"))?
                }
            };
            out.extend(rows.into_iter().map(
                |(path, topic, partition, first, last, rows, bytes)| {
                    (
                        topic,
                        WrittenFile {
                            path,
                            kind: crate::sink::archive::FileKind::Raw,
                            partition: partition as i32,
                            first_offset: first,
                            last_offset: last,
                            rows: rows.max(0) as u64,
                            bytes: bytes.max(0) as u64,
                        },
                    )
                },
            ));
        }
        Ok(out)
    }

    /// Paths recorded with `kind` (`COMPACTING`, `COMPACTED`).
    pub async fn files_of_kind(&self, kind: &str) -> Result<Vec<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("read file records", |c| {
                    let mut st = c.prepare_cached(OF_KIND_SQL)?;
                    let rows = st.query_map([kind], |r| r.get(0))?;
                    rows.collect()
                })
            }),
            Backend::Postgres(s) => {
                sqlx::query_scalar(AssertSqlSafe(Dialect::Postgres.sql(OF_KIND_SQL)))
                    .bind(kind)
                    .fetch_all(&s.pool)
                    .await
                    .map_err(db("read file records"))
            }
        }
    }

    /// Forget records of `paths` that have `kind`.
    pub async fn forget_files_of_kind(
        &self,
        paths: &[String],
        kind: &str,
    ) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("forget file records", |c| {
                    let tx = c.transaction()?;
                    {
                        let mut st = tx.prepare_cached(FORGET_SQL)?;
                        for p in paths {
                            st.execute(rusqlite::params![p, kind])?;
                        }
                    }
                    tx.commit()
                })
            }),
            Backend::Postgres(s) => {
                let mut tx = s.pool.begin().await.map_err(db("begin"))?;
                for p in paths {
                    sqlx::query(AssertSqlSafe(Dialect::Postgres.sql(FORGET_SQL)))
                        .bind(p)
                        .bind(kind)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("forget file records"))?;
                }
                tx.commit().await.map_err(db("commit"))
            }
        }
    }

    /// Record `files` of `topic` as `COMPACTING` (before they are written).
    pub async fn begin_compaction(
        &self,
        topic: &str,
        files: &[WrittenFile],
        now_ms: i64,
    ) -> Result<(), SinkError> {
        self.compaction_tx(topic, &[], files, now_ms)
            .await
            .map(|_| ())
    }

    /// The swap: `old` from raw to `COMPACTED` (all, or `false` and nothing),
    /// `new` from `COMPACTING` to their kind, and pending.
    pub async fn commit_compaction(
        &self,
        topic: &str,
        old: &[String],
        new: &[WrittenFile],
        now_ms: i64,
    ) -> Result<bool, SinkError> {
        self.compaction_tx(topic, old, new, now_ms).await
    }

    /// `old` empty: record `new` as compacting. Otherwise the swap.
    async fn compaction_tx(
        &self,
        topic: &str,
        old: &[String],
        new: &[WrittenFile],
        now_ms: i64,
    ) -> Result<bool, SinkError> {
        let begin = old.is_empty();
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("compaction", |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    {
                        let mut set = tx.prepare_cached(SET_KIND_SQL)?;
                        for p in old {
                            if set.execute(rusqlite::params![COMPACTED, p, "raw"])? != 1 {
                                return Ok(false);
                            }
                        }
                        let mut record = tx.prepare_cached(RECORD_FILE_SQL)?;
                        let mut pending = tx.prepare_cached(RECORD_PENDING_SQL)?;
                        for f in new {
                            record.execute(rusqlite::params![
                                f.path,
                                COMPACTING,
                                topic,
                                i64::from(f.partition),
                                f.first_offset,
                                f.last_offset,
                                f.rows as i64,
                                f.bytes as i64,
                                now_ms
                            ])?;
                            if !begin {
                                set.execute(rusqlite::params![
                                    f.kind.as_str(),
                                    f.path,
                                    COMPACTING
                                ])?;
                                pending.execute(rusqlite::params![
                                    f.path,
                                    topic,
                                    i64::from(f.partition)
                                ])?;
                            }
                        }
                    }
                    tx.commit()?;
                    Ok(true)
                })
            }),
            Backend::Postgres(s) => {
                let sql = |t: &str| AssertSqlSafe(Dialect::Postgres.sql(t));
                let mut tx = s.pool.begin().await.map_err(db("begin"))?;
                for p in old {
                    let n = sqlx::query(sql(SET_KIND_SQL))
                        .bind(COMPACTED)
                        .bind(p)
                        .bind("raw")
                        .execute(&mut *tx)
                        .await
                        .map_err(db("compaction"))?
                        .rows_affected();
                    if n != 1 {
                        return Ok(false);
                    }
                }
                for f in new {
                    sqlx::query(sql(RECORD_FILE_SQL))
                        .bind(&f.path)
                        .bind(COMPACTING)
                        .bind(topic)
                        .bind(i64::from(f.partition))
                        .bind(f.first_offset)
                        .bind(f.last_offset)
                        .bind(f.rows as i64)
                        .bind(f.bytes as i64)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("compaction"))?;
                    if !begin {
                        sqlx::query(sql(SET_KIND_SQL))
                            .bind(f.kind.as_str())
                            .bind(&f.path)
                            .bind(COMPACTING)
                            .execute(&mut *tx)
                            .await
                            .map_err(db("compaction"))?;
                        sqlx::query(sql(RECORD_PENDING_SQL))
                            .bind(&f.path)
                            .bind(topic)
                            .bind(i64::from(f.partition))
                            .execute(&mut *tx)
                            .await
                            .map_err(db("compaction"))?;
                    }
                }
                tx.commit().await.map_err(db("commit"))?;
                Ok(true)
            }
        }
    }

    /// Every committed file still under its staging name: (topic,
    /// partition, path).
    pub async fn all_pending(&self) -> Result<Vec<(String, i32, String)>, SinkError> {
        let rows: Vec<(String, i64, String)> = match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("read pending archive files", |c| {
                    let mut st = c.prepare_cached(ALL_PENDING_SQL)?;
                    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect()
                })
            })?,
            Backend::Postgres(s) => sqlx::query_as(ALL_PENDING_SQL)
                .fetch_all(&s.pool)
                .await
                .map_err(db("read pending archive files"))?,
        };
        Ok(rows
            .into_iter()
            .map(|(t, p, path)| (t, p as i32, path))
            .collect())
    }
}
