//! Raw events in few, large files. Each batch's events are appended to one
//! open file per (partition, event hour), a local spool file written a row
//! group at a time, invisible to readers. A partition's open files close
//! together, as one **flush**, when one of them reaches
//! `storage.archive_file_bytes`, when they have been open
//! `storage.archive_roll_interval`, when the writer holds more than
//! `storage.archive_max_open_files` (the partition of the least recently
//! written file closes) or at shutdown. A flush is the archive's commit:
//!
//! 1. **stage**: close each file (footer, fsync) and move it under its
//!    staging name `.<final name>.inprogress` in its final directory (a
//!    rename on a local archive; an upload on S3);
//! 2. **commit**: one serving-store transaction fences on the partition's
//!    archive position (`tally_archive_offsets`: it must still be where the
//!    flush started), records the files (`tally_files`, and as pending) and
//!    moves the position to the flush's end;
//! 3. **rename**: each staged file to its final name (S3: copy, then delete),
//!    then forget the pending records and the counted hours now archived.
//!
//! A crash before 2 leaves staging and spool files that nothing names: the
//! consumer restarts from the archive position, re-reads, and the sweep
//! removes them (a staged file whose flush starts below the position can
//! never commit). A crash after 2 leaves pending records: the next owner
//! renames them first (roll forward). So a final name appears only for a
//! committed file, and readers of the glob see each committed event once.
//!
//! Final names carry topic, partition, the flush's offset range and the
//! writer token: `<topic>-p00003-<first>-<last>-w<writer>.parquet`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::TimestampMillisecondType;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use super::{file_name, ymd_h, FileKind, ParquetArchiveSink, WrittenFile, RAW_PREFIX};
use crate::batch::Batch;
use crate::failpoint::failpoint;
use crate::sink::SinkError;

const HOUR_MS: i64 = 3_600_000;
/// Over all open files, from this much buffered (Arrow memory) the largest
/// buffers are written out as row groups: memory stays bounded whatever the
/// number of open files.
const BUFFER_BYTES: usize = 256 << 20;

/// When open files close (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rotation {
    pub file_bytes: u64,
    pub roll_interval: Duration,
    pub max_open_files: usize,
    /// An open file's buffered rows are written out as a row group from
    /// this size (Arrow memory).
    pub row_group_bytes: usize,
}

/// A partition's closed files, ready to be staged and committed.
#[derive(Debug)]
pub(crate) struct Flush {
    pub partition: i32,
    /// The archive position the files build on (the commit's fence).
    pub expected: Option<i64>,
    /// The position after them.
    pub next: i64,
    /// By final path.
    pub files: Vec<WrittenFile>,
    spooled: Vec<PathBuf>,
}

/// An open file. Its Parquet writer (and spool file) is made when its rows
/// are first written out as a row group: a file that stays small (a backlog
/// spanning thousands of hours opens thousands of them in one batch) holds
/// only its rows, not a writer's buffers, until it closes.
struct OpenFile {
    spool: PathBuf,
    writer: Option<ArrowWriter<File>>,
    /// Rows not yet given to the writer, and their Arrow memory.
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
    rows: u64,
    tick: u64,
}

impl OpenFile {
    /// Rows held in memory: pending, or encoded but not yet written.
    fn buffered(&self) -> usize {
        self.pending_bytes + self.writer.as_ref().map_or(0, |w| w.in_progress_size())
    }

    fn written(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.bytes_written())
    }

    /// The writer, with every pending row given to it.
    fn drain(&mut self, props: &WriterProperties) -> Result<&mut ArrowWriter<File>, SinkError> {
        if self.writer.is_none() {
            let Some(schema) = self.pending.first().map(|b| b.schema()) else {
                return Err(io_err(&self.spool, "an open file without rows"));
            };
            let f = File::create(&self.spool).map_err(|e| io_err(&self.spool, e))?;
            let w = ArrowWriter::try_new(f, schema, Some(props.clone()))
                .map_err(|e| io_err(&self.spool, e))?;
            self.writer = Some(w);
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(io_err(&self.spool, "no writer"));
        };
        for rows in self.pending.drain(..) {
            writer.write(&rows).map_err(|e| io_err(&self.spool, e))?;
        }
        self.pending_bytes = 0;
        Ok(writer)
    }

    /// Write the buffered rows out as a row group.
    fn write_group(&mut self, props: &WriterProperties) -> Result<(), SinkError> {
        let spool = self.spool.clone();
        self.drain(props)?.flush().map_err(|e| io_err(&spool, e))
    }
}

struct OpenPartition {
    /// The consumer epoch the partition's files were last continued in.
    epoch: u64,
    /// The stored archive position the open files build on.
    expected: Option<i64>,
    /// Where this flush starts (for names).
    start: i64,
    /// The first offset not yet appended: rows below it are archived.
    next: i64,
    /// The first append since the last flush.
    since: Option<Instant>,
    files: BTreeMap<i64, OpenFile>,
}

/// The open raw files of one topic, for one consumer epoch.
pub(crate) struct RawWriter {
    sink: ParquetArchiveSink,
    spool: PathBuf,
    rotation: Rotation,
    topic: String,
    parts: BTreeMap<i32, OpenPartition>,
    tick: u64,
}

/// A spool or local archive file failed (a full disk, permissions): the
/// environment's fault, retried like an object store's.
fn io_err(path: &Path, e: impl std::fmt::Display) -> SinkError {
    SinkError::ObjectStore {
        path: path.display().to_string(),
        source: Box::new(object_store::Error::Generic {
            store: "local",
            source: e.to_string().into(),
        }),
    }
}

impl RawWriter {
    /// Open files of `topic` spooled under `spool_root/.spool/<writer>/`.
    /// Spool directories of other writers untouched for a day are removed
    /// (a crash's; their files were never committed).
    pub(crate) fn new(
        sink: ParquetArchiveSink,
        spool_root: &Path,
        topic: &str,
        rotation: Rotation,
    ) -> Result<RawWriter, SinkError> {
        let base = spool_root.join(".spool");
        remove_stale_spools(&base, Duration::from_secs(86_400));
        let spool = base.join(&sink.writer);
        std::fs::create_dir_all(&spool).map_err(|e| io_err(&spool, e))?;
        Ok(RawWriter {
            sink,
            spool,
            rotation,
            topic: topic.to_string(),
            parts: BTreeMap::new(),
            tick: 0,
        })
    }

    /// Files open now.
    pub(crate) fn open_files(&self) -> usize {
        self.parts.values().map(|p| p.files.len()).sum()
    }

    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// Append a committed batch's raw events (rows whose (partition, offset)
    /// is in `skip` excepted: poison rows now dead letters). Rows below a
    /// partition's `next` are already archived or open, and skipped.
    ///
    /// A partition's open files continue while its messages do: in the same
    /// consumer epoch, or in a new one (a rebalance, a re-seek) that found
    /// the stored archive position where these files build on. Otherwise
    /// (another writer flushed the partition meanwhile) they are dropped and
    /// the partition starts again from the stored position, which the
    /// consumer re-read from.
    pub(crate) fn append(
        &mut self,
        batch: &Batch,
        skip: &HashSet<(i32, i64)>,
    ) -> Result<(), SinkError> {
        for (p, r) in &batch.archive {
            let keep = self.parts.get(p).is_some_and(|st| {
                (st.epoch == batch.epoch || r.from.is_some_and(|f| Some(f) == st.expected))
                    && r.expected.is_none_or(|e| e <= st.next)
            });
            if !keep {
                self.drop_partition(*p);
                // No stored position yet: the batch's serving commit recorded
                // its start as the archive's.
                let start = r.from.unwrap_or(r.first);
                self.parts.insert(
                    *p,
                    OpenPartition {
                        epoch: batch.epoch,
                        expected: Some(start),
                        start,
                        next: start,
                        since: None,
                        files: BTreeMap::new(),
                    },
                );
            } else if let Some(st) = self.parts.get_mut(p) {
                st.epoch = batch.epoch;
            }
        }
        let events = &batch.events;
        let mut groups: BTreeMap<(i32, i64), Vec<u32>> = BTreeMap::new();
        if events.num_rows() > 0 {
            let times = events
                .column(self.sink.time_index)
                .as_primitive::<TimestampMillisecondType>();
            for (i, (p, o)) in batch
                .row_partitions
                .iter()
                .zip(&batch.row_offsets)
                .enumerate()
            {
                let Some(st) = self.parts.get(p) else {
                    continue;
                };
                if *o < st.next || skip.contains(&(*p, *o)) {
                    continue;
                }
                let hour = times.value(i).div_euclid(HOUR_MS);
                groups.entry((*p, hour)).or_default().push(i as u32);
            }
        }
        self.tick += 1;
        let mut wrote_group = false;
        for ((p, hour), idx) in groups {
            let rows = if idx.len() == events.num_rows() {
                events.clone()
            } else {
                take_record_batch(events, &UInt32Array::from(idx)).map_err(|e| {
                    SinkError::Encode {
                        path: "raw rows".into(),
                        message: e.to_string(),
                    }
                })?
            };
            let Some(st) = self.parts.get_mut(&p) else {
                continue;
            };
            let file = st.files.entry(hour).or_insert_with(|| OpenFile {
                spool: self
                    .spool
                    .join(format!("p{p:05}-{}-h{hour}.parquet", st.start)),
                writer: None,
                pending: Vec::new(),
                pending_bytes: 0,
                rows: 0,
                tick: 0,
            });
            file.rows += rows.num_rows() as u64;
            file.pending_bytes += rows.get_array_memory_size();
            file.pending.push(rows);
            file.tick = self.tick;
            if file.buffered() >= self.rotation.row_group_bytes {
                file.write_group(&self.sink.props)?;
                wrote_group = true;
            }
        }
        wrote_group |= self.bound_buffers()?;
        let now = Instant::now();
        for (p, r) in &batch.archive {
            if let Some(st) = self.parts.get_mut(p) {
                if r.last + 1 > st.next {
                    st.next = r.last + 1;
                    st.since.get_or_insert(now);
                }
            }
        }
        if wrote_group {
            failpoint("after_row_group");
        }
        Ok(())
    }

    /// Write the largest buffers out as row groups while all of them hold
    /// more than `BUFFER_BYTES`. Whether any was written.
    fn bound_buffers(&mut self) -> Result<bool, SinkError> {
        let mut wrote = false;
        loop {
            let total: usize = self
                .parts
                .values()
                .flat_map(|p| p.files.values())
                .map(OpenFile::buffered)
                .sum();
            if total < BUFFER_BYTES {
                return Ok(wrote);
            }
            let Some(f) = self
                .parts
                .values_mut()
                .flat_map(|p| p.files.values_mut())
                .max_by_key(|f| f.buffered())
            else {
                return Ok(wrote);
            };
            f.write_group(&self.sink.props)?;
            wrote = true;
        }
    }

    /// The partitions whose files should close now (see the module docs).
    pub(crate) fn due(&self, now: Instant) -> Vec<i32> {
        let r = &self.rotation;
        let mut due: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, st)| {
                st.since
                    .is_some_and(|t| now.duration_since(t) >= r.roll_interval)
                    || st
                        .files
                        .values()
                        .any(|f| (f.written() + f.buffered() / 4) as u64 >= r.file_bytes)
            })
            .map(|(p, _)| *p)
            .collect();
        let mut open: usize = self
            .parts
            .iter()
            .filter(|(p, _)| !due.contains(p))
            .map(|(_, st)| st.files.len())
            .sum();
        while open > r.max_open_files {
            let lru = self
                .parts
                .iter()
                .filter(|(p, _)| !due.contains(p))
                .flat_map(|(p, st)| st.files.values().map(move |f| (f.tick, *p)))
                .min();
            let Some((_, p)) = lru else { break };
            open -= self.parts.get(&p).map_or(0, |st| st.files.len());
            due.push(p);
        }
        due
    }

    /// Every partition with files to commit (shutdown, end of a replay).
    pub(crate) fn all(&self) -> Vec<i32> {
        self.parts
            .iter()
            .filter(|(_, st)| !st.files.is_empty())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Close partition `p`'s files (footer, fsync): its flush, or `None`
    /// when it has no file (messages that were all dead letters stay with
    /// the next flush, so the committed files' offset ranges of a partition
    /// follow each other without a gap). The partition continues from the
    /// flush's end.
    pub(crate) fn close(&mut self, p: i32) -> Result<Option<Flush>, SinkError> {
        let Some(st) = self.parts.get_mut(&p) else {
            return Ok(None);
        };
        if st.files.is_empty() {
            st.since = None;
            return Ok(None);
        }
        let files = std::mem::take(&mut st.files);
        let (expected, start, next) = (st.expected, st.start, st.next);
        st.expected = Some(next);
        st.start = next;
        st.since = None;
        let mut out = Flush {
            partition: p,
            expected,
            next,
            files: Vec::with_capacity(files.len()),
            spooled: Vec::with_capacity(files.len()),
        };
        for (hour, mut f) in files {
            let spool = f.spool.clone();
            let writer = f.drain(&self.sink.props)?;
            writer.finish().map_err(|e| io_err(&spool, e))?;
            let file = writer.inner();
            file.sync_all().map_err(|e| io_err(&spool, e))?;
            let bytes = file.metadata().map_err(|e| io_err(&spool, e))?.len();
            let (dt, hh) = ymd_h(hour * HOUR_MS);
            let name = file_name(&self.topic, p, start, next - 1, &self.sink.writer);
            out.files.push(WrittenFile {
                path: format!("{RAW_PREFIX}/dt={dt}/hour={hh}/{name}"),
                kind: FileKind::Raw,
                partition: p,
                first_offset: start,
                last_offset: next - 1,
                rows: f.rows,
                bytes,
            });
            out.spooled.push(f.spool);
        }
        Ok(Some(out))
    }

    /// Drop every open file.
    pub(crate) fn discard(&mut self) {
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.drop_partition(p);
        }
    }

    /// Drop a partition's open files (its flush was fenced, or another
    /// writer flushed it): the consumer re-reads from the stored position.
    pub(crate) fn drop_partition(&mut self, p: i32) {
        if let Some(st) = self.parts.remove(&p) {
            for f in st.files.into_values() {
                drop(f.writer);
                let _ = std::fs::remove_file(&f.spool);
            }
        }
    }

    /// Discard a flush that will not commit (fenced): its spool and staged files.
    pub(crate) async fn abandon(&self, flush: &Flush) {
        for s in &flush.spooled {
            let _ = std::fs::remove_file(s);
        }
        let staged: Vec<String> = flush.files.iter().map(|f| staging_path(&f.path)).collect();
        if let Err(e) = self.sink.delete(&staged).await {
            tracing::warn!(error = %e, "cannot delete a fenced flush's staged files; the sweep removes them");
        }
    }

    /// Step 1: each closed file under its staging name, durable.
    pub(crate) async fn stage(&self, flush: &Flush) -> Result<(), SinkError> {
        for (f, spool) in flush.files.iter().zip(&flush.spooled) {
            let staged = staging_path(&f.path);
            if !spool.exists() {
                // Staged by an earlier attempt.
                self.sink
                    .store
                    .head(&ObjectPath::from(staged.as_str()))
                    .await
                    .map_err(|e| SinkError::ObjectStore {
                        path: staged.clone(),
                        source: Box::new(e),
                    })?;
                continue;
            }
            if let Some(root) = &self.sink.local_root {
                let dst = root.join(&staged);
                let dir = dst.parent().unwrap_or(root);
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                std::fs::rename(spool, &dst).map_err(|e| io_err(&dst, e))?;
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_err(dir, e))?;
            } else {
                let bytes = std::fs::read(spool).map_err(|e| io_err(spool, e))?;
                self.sink.put_atomic(&staged, bytes).await?;
                let _ = std::fs::remove_file(spool);
            }
        }
        failpoint("after_file_closed");
        Ok(())
    }

    /// Remove this writer's spool directory (a clean end).
    pub(crate) fn close_spool(&mut self) {
        self.discard();
        let _ = std::fs::remove_dir_all(&self.spool);
    }
}

#[cfg(test)]
mod tests;

/// `dir/.<name>.inprogress` for `dir/<name>`.
pub(crate) fn staging_path(path: &str) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    format!("{dir}/.{name}.inprogress")
}

impl ParquetArchiveSink {
    /// Rename committed files from their staging names to their final ones
    /// (roll forward). A file already under its final name is done; one
    /// under neither is an error (it was committed: it must exist).
    pub(crate) async fn publish(&self, paths: &[String]) -> Result<(), SinkError> {
        for path in paths {
            let staged = ObjectPath::from(staging_path(path));
            let dst = ObjectPath::from(path.as_str());
            let err = |e: object_store::Error| SinkError::ObjectStore {
                path: path.clone(),
                source: Box::new(e),
            };
            match self.store.rename(&staged, &dst).await {
                Ok(()) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    self.store.head(&dst).await.map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            }
        }
        failpoint("after_archive_rename");
        Ok(())
    }
}

/// Remove spool directories under `base` whose newest file is older than `age`.
fn remove_stale_spools(base: &Path, age: Duration) {
    let Ok(dirs) = std::fs::read_dir(base) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for d in dirs.flatten() {
        let newest = std::fs::read_dir(d.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.metadata().ok()?.modified().ok())
            .max()
            .or_else(|| d.metadata().ok()?.modified().ok());
        if newest.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= age) {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}
