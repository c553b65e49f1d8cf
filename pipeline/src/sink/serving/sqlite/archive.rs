//! SQLite: the archive's record (see `serving/archive_record.rs`), on the
//! bookkeeping connection, in `BEGIN IMMEDIATE` transactions.

use std::collections::BTreeMap;

use super::super::archive_record::ArchiveCommit;
use super::super::schema::*;
use super::{CommitOutcome, SinkError, SqliteStore};

impl SqliteStore {
    pub(in crate::sink::serving) fn archive_positions(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>, SinkError> {
        self.with_conn("read archive positions", |c| {
            c.prepare_cached(ADOPT_ARCHIVE_SQL)?.execute([topic])?;
            let mut st = c.prepare_cached(ARCHIVE_POSITIONS_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get::<_, i64>(0)? as i32, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub(in crate::sink::serving) fn commit_archive(
        &self,
        a: &ArchiveCommit<'_>,
    ) -> Result<CommitOutcome, SinkError> {
        self.with_conn("commit archive files", |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let stored: Option<i64> = {
                let mut st = tx.prepare_cached(ARCHIVE_FENCE_SQL)?;
                let mut rows = st.query(rusqlite::params![a.topic, i64::from(a.partition)])?;
                match rows.next()? {
                    Some(r) => Some(r.get(0)?),
                    None => None,
                }
            };
            if stored != a.expected {
                return Ok(CommitOutcome::Fenced {
                    partition: a.partition,
                    expected: a.expected,
                    stored,
                });
            }
            {
                let mut record = tx.prepare_cached(RECORD_FILE_SQL)?;
                let mut pending = tx.prepare_cached(RECORD_PENDING_SQL)?;
                for f in a.files {
                    record.execute(rusqlite::params![
                        f.path,
                        f.kind.as_str(),
                        a.topic,
                        i64::from(f.partition),
                        f.first_offset,
                        f.last_offset,
                        f.rows as i64,
                        f.bytes as i64,
                        a.now_ms
                    ])?;
                    pending.execute(rusqlite::params![f.path, a.topic, i64::from(a.partition)])?;
                }
            }
            tx.prepare_cached(ARCHIVE_ADVANCE_SQL)?
                .execute(rusqlite::params![
                    a.topic,
                    i64::from(a.partition),
                    a.next,
                    a.now_ms
                ])?;
            crate::failpoint::failpoint("inside_archive_commit");
            tx.commit()?;
            Ok(CommitOutcome::Committed)
        })
    }

    pub(in crate::sink::serving) fn finish_archive(
        &self,
        topic: &str,
        partition: i32,
        paths: &[String],
    ) -> Result<(), SinkError> {
        self.with_conn("finish archive files", |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut forget = tx.prepare_cached(FORGET_PENDING_SQL)?;
                for p in paths {
                    forget.execute([p])?;
                }
            }
            tx.prepare_cached(CLOSE_HOURS_SQL)?
                .execute(rusqlite::params![topic, i64::from(partition)])?;
            tx.commit()
        })
    }

    pub(in crate::sink::serving) fn pending_archive(
        &self,
        topic: &str,
    ) -> Result<Vec<(i32, String)>, SinkError> {
        self.with_conn("read pending archive files", |c| {
            let mut st = c.prepare_cached(PENDING_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get::<_, i64>(0)? as i32, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub(in crate::sink::serving) fn open_hours(&self) -> Result<Vec<i64>, SinkError> {
        self.with_conn("read open archive hours", |c| {
            let mut st = c.prepare_cached(OPEN_HOURS_SQL)?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }
}
