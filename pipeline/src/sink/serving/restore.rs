//! `tally rebuild`'s writes: the bookkeeping of an empty store recreated
//! from the archive's manifest (files, positions, counters, replayed dead
//! letters), in one transaction. The rollup rows follow by backfill.

use sqlx::AssertSqlSafe;

use super::schema::*;
use super::{db, Backend, ServingStore, SinkError, WrittenFile};
use crate::serve::blocking;

/// What a rebuild records.
#[derive(Debug, Default)]
pub struct Restore {
    /// (topic, file).
    pub files: Vec<(String, WrittenFile)>,
    /// (topic, partition, next offset): the serving offset and the
    /// archive's position alike.
    pub offsets: Vec<(String, i32, i64)>,
    /// (name, value).
    pub counters: Vec<(String, i64)>,
    /// Dead letters counted by `tally dlq replay`: (original topic,
    /// partition, offset).
    pub replayed: Vec<(String, i32, i64)>,
    pub now_ms: i64,
}

const EMPTY_SQL: &str =
    "SELECT (SELECT count(*) FROM tally_offsets) + (SELECT count(*) FROM tally_files)
     + (SELECT count(*) FROM tally_counters) + (SELECT count(*) FROM tally_archive_offsets)";

impl ServingStore {
    /// Whether the store holds no offsets, files or counters (new).
    pub async fn is_empty(&self) -> Result<bool, SinkError> {
        let n: i64 = match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("check the store is empty", |c| {
                    c.query_row(EMPTY_SQL, [], |r| r.get(0))
                })
            })?,
            Backend::Postgres(s) => sqlx::query_scalar(EMPTY_SQL)
                .fetch_one(&s.pool)
                .await
                .map_err(db("check the store is empty"))?,
        };
        Ok(n == 0)
    }

    /// Record `r` in one transaction.
    pub async fn restore(&self, r: &Restore) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| {
                s.with_conn("restore bookkeeping", |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    {
                        let mut file = tx.prepare_cached(RECORD_FILE_SQL)?;
                        for (topic, f) in &r.files {
                            file.execute(rusqlite::params![
                                f.path,
                                f.kind.as_str(),
                                topic,
                                i64::from(f.partition),
                                f.first_offset,
                                f.last_offset,
                                f.rows as i64,
                                f.bytes as i64,
                                r.now_ms
                            ])?;
                        }
                        let mut offset = tx.prepare_cached(RESET_OFFSET_SQL)?;
                        let mut archive = tx.prepare_cached(ARCHIVE_ADVANCE_SQL)?;
                        for (topic, p, next) in &r.offsets {
                            let args = rusqlite::params![topic, i64::from(*p), next, r.now_ms];
                            offset.execute(args)?;
                            archive.execute(args)?;
                        }
                        let mut counter = tx.prepare_cached(COUNTER_SQL)?;
                        for (name, value) in &r.counters {
                            counter.execute(rusqlite::params![name, value])?;
                        }
                        let mut replayed = tx.prepare_cached(RECORD_REPLAYED_SQL)?;
                        for (topic, p, offset) in &r.replayed {
                            replayed.execute(rusqlite::params![
                                topic,
                                i64::from(*p),
                                offset,
                                r.now_ms
                            ])?;
                        }
                    }
                    tx.commit()
                })
            }),
            Backend::Postgres(s) => {
                let sql = |t: &str| AssertSqlSafe(Dialect::Postgres.sql(t));
                let mut tx = s.pool.begin().await.map_err(db("begin"))?;
                for (topic, f) in &r.files {
                    sqlx::query(sql(RECORD_FILE_SQL))
                        .bind(&f.path)
                        .bind(f.kind.as_str())
                        .bind(topic)
                        .bind(i64::from(f.partition))
                        .bind(f.first_offset)
                        .bind(f.last_offset)
                        .bind(f.rows as i64)
                        .bind(f.bytes as i64)
                        .bind(r.now_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("record files"))?;
                }
                for (topic, p, next) in &r.offsets {
                    for statement in [RESET_OFFSET_SQL, ARCHIVE_ADVANCE_SQL] {
                        sqlx::query(sql(statement))
                            .bind(topic)
                            .bind(i64::from(*p))
                            .bind(next)
                            .bind(r.now_ms)
                            .execute(&mut *tx)
                            .await
                            .map_err(db("record offsets"))?;
                    }
                }
                for (name, value) in &r.counters {
                    sqlx::query(sql(COUNTER_SQL))
                        .bind(name)
                        .bind(value)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("record counters"))?;
                }
                for (topic, p, offset) in &r.replayed {
                    sqlx::query(sql(RECORD_REPLAYED_SQL))
                        .bind(topic)
                        .bind(i64::from(*p))
                        .bind(offset)
                        .bind(r.now_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("record replayed dead letters"))?;
                }
                tx.commit().await.map_err(db("commit"))
            }
        }
    }
}
