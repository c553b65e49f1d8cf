//! PostgreSQL: the archive's record (see `serving/archive_record.rs`). The
//! commit takes the partition's advisory lock, like a batch commit.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row};

use super::archive_record::ArchiveCommit;
use super::postgres::PgStore;
use super::schema::*;
use super::CommitRequest;
use super::{db, CommitOutcome, SinkError};

fn sql(text: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(Dialect::Postgres.sql(text))
}

impl PgStore {
    pub(super) async fn archive_positions(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>, SinkError> {
        sqlx::query(sql(ADOPT_ARCHIVE_SQL))
            .bind(topic)
            .execute(&self.pool)
            .await
            .map_err(db("read archive positions"))?;
        let rows = sqlx::query(sql(ARCHIVE_POSITIONS_SQL))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read archive positions"))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let p: i64 = r.try_get(0).map_err(db("read archive positions"))?;
            out.insert(
                p as i32,
                r.try_get(1).map_err(db("read archive positions"))?,
            );
        }
        Ok(out)
    }

    pub(super) async fn commit_archive(
        &self,
        a: &ArchiveCommit<'_>,
    ) -> Result<CommitOutcome, SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), $2)")
            .bind(a.topic)
            .bind(a.partition)
            .execute(&mut *tx)
            .await
            .map_err(db("lock partition"))?;
        let stored: Option<i64> = sqlx::query_scalar(sql(ARCHIVE_FENCE_SQL))
            .bind(a.topic)
            .bind(i64::from(a.partition))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("read archive position"))?;
        if stored != a.expected {
            tx.rollback().await.map_err(db("rollback"))?;
            return Ok(CommitOutcome::Fenced {
                partition: a.partition,
                expected: a.expected,
                stored,
            });
        }
        for f in a.files {
            sqlx::query(sql(RECORD_FILE_SQL))
                .bind(&f.path)
                .bind(f.kind.as_str())
                .bind(a.topic)
                .bind(i64::from(f.partition))
                .bind(f.first_offset)
                .bind(f.last_offset)
                .bind(f.rows as i64)
                .bind(f.bytes as i64)
                .bind(a.now_ms)
                .execute(&mut *tx)
                .await
                .map_err(db("record archive files"))?;
            sqlx::query(sql(RECORD_PENDING_SQL))
                .bind(&f.path)
                .bind(a.topic)
                .bind(i64::from(a.partition))
                .execute(&mut *tx)
                .await
                .map_err(db("record archive files"))?;
        }
        sqlx::query(sql(ARCHIVE_ADVANCE_SQL))
            .bind(a.topic)
            .bind(i64::from(a.partition))
            .bind(a.next)
            .bind(a.now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("advance archive position"))?;
        crate::failpoint::failpoint("inside_archive_commit");
        tx.commit().await.map_err(db("commit"))?;
        Ok(CommitOutcome::Committed)
    }

    pub(super) async fn finish_archive(
        &self,
        topic: &str,
        partition: i32,
        paths: &[String],
    ) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        for p in paths {
            sqlx::query(sql(FORGET_PENDING_SQL))
                .bind(p)
                .execute(&mut *tx)
                .await
                .map_err(db("finish archive files"))?;
        }
        sqlx::query(sql(CLOSE_HOURS_SQL))
            .bind(topic)
            .bind(i64::from(partition))
            .execute(&mut *tx)
            .await
            .map_err(db("finish archive files"))?;
        tx.commit().await.map_err(db("commit"))
    }

    pub(super) async fn pending_archive(
        &self,
        topic: &str,
    ) -> Result<Vec<(i32, String)>, SinkError> {
        let rows = sqlx::query(sql(PENDING_SQL))
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read pending archive files"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let p: i64 = r.try_get(0).map_err(db("read pending archive files"))?;
            out.push((
                p as i32,
                r.try_get(1).map_err(db("read pending archive files"))?,
            ));
        }
        Ok(out)
    }

    pub(super) async fn open_hours(&self) -> Result<Vec<i64>, SinkError> {
        sqlx::query_scalar(sql(OPEN_HOURS_SQL))
            .fetch_all(&self.pool)
            .await
            .map_err(db("read open archive hours"))
    }
}

/// In a batch commit: the event hours it counted (open until archived) and
/// its partitions' archive positions (see `CommitRequest::archive_with_batch`).
pub(super) async fn note_archive(
    tx: &mut sqlx::PgConnection,
    req: &CommitRequest<'_>,
) -> Result<(), SinkError> {
    let d = Dialect::Postgres;
    let open = d.sql(&open_hour_sql(d));
    for (p, hour, through) in req.open_hours {
        sqlx::query(AssertSqlSafe(open.clone()))
            .bind(req.topic)
            .bind(i64::from(*p))
            .bind(*hour)
            .bind(*through)
            .execute(&mut *tx)
            .await
            .map_err(db("note open archive hours"))?;
    }
    let archive = d.sql(if req.archive_with_batch {
        ARCHIVE_ADVANCE_SQL
    } else {
        ARCHIVE_START_SQL
    });
    for (p, range) in req.partitions {
        let at = if req.archive_with_batch {
            range.next_offset()
        } else {
            range.expected_start.unwrap_or(range.first)
        };
        sqlx::query(AssertSqlSafe(archive.clone()))
            .bind(req.topic)
            .bind(i64::from(*p))
            .bind(at)
            .bind(req.now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db("archive positions"))?;
    }
    Ok(())
}
