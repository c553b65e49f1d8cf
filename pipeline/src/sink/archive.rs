//! Raw events and dead letters as zstd Parquet on object storage.
//!
//! Layout (Hive style, partition columns are strings to readers):
//! - `raw/events/dt=YYYY-MM-DD/hour=HH/<topic>-p<partition>-<first>-<last>.parquet`
//!   by event time (UTC);
//! - `dlq/dt=YYYY-MM-DD/<topic>-p<partition>-<first>-<last>.parquet` by rejection time.
//!
//! `<first>-<last>` is the batch's offset range in that partition. An object
//! appears only when complete:
//! - on a local directory a file is written under a hidden name
//!   (`.<name>.inprogress`, skipped by readers) and renamed when complete;
//! - on S3 a file is one PUT of the final key (atomic), or, from
//!   `storage.multipart_threshold` up, a multipart upload: the object appears
//!   at CompleteMultipartUpload. A crash leaves the upload in progress; the
//!   next owner of the partition lists the uploads under raw/ and dlq/
//!   (ListMultipartUploads) and aborts those of its partitions.
//!
//! Files of batches that never committed are orphans (a crash, a fenced
//! zombie): in-progress files and uploads are removed when a partition is
//! assigned, complete ones after the first commit there and then every
//! `storage.orphan_sweep_interval` (`pipeline/sweeper.rs`, `OrphanSweeper`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use datafusion::arrow::array::{
    Array, AsArray, Int32Array, Int64Array, StringArray, TimestampMillisecondArray, UInt32Array,
};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use datafusion::arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::location::{ArchiveLocation, S3Location};
use super::SinkError;
use crate::batch::{Batch, DeadLetter};

pub(crate) const RAW_PREFIX: &str = "raw/events";
pub(crate) const DLQ_PREFIX: &str = "dlq";
/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Raw,
    DeadLetter,
    /// The archive's own record of a commit (`archive/manifest.rs`).
    Manifest,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Raw => "raw",
            FileKind::DeadLetter => "dlq",
            FileKind::Manifest => "manifest",
        }
    }
}

/// A complete, visible file of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    pub path: String,
    pub kind: FileKind,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub rows: u64,
    pub bytes: u64,
}

/// Schema of the dead-letter dataset.
pub(crate) fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new(
            "rejected_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("payload", DataType::Utf8, false),
        Field::new("payload_bytes", DataType::Int64, false),
    ]))
}

#[derive(Debug, Clone)]
pub(crate) struct ParquetArchiveSink {
    store: Arc<dyn ObjectStore>,
    time_index: usize,
    props: WriterProperties,
    /// The data directory when the store is the local filesystem: its put
    /// stages data in `<name>#<n>` files that its listing hides, so a crash
    /// mid-put leaves files only a directory walk finds.
    local_root: Option<std::path::PathBuf>,
    /// This process's token in file names, so two writers of one offset range
    /// (a zombie and the new owner) never share a file name.
    writer: String,
    /// S3: direct PUTs of final keys, multipart uploads from `multipart_threshold`.
    s3: Option<S3Location>,
    multipart_threshold: u64,
}

/// File name for a partition's offset range written by `writer`:
/// `<topic>-p00003-<first>-<last>-w<writer>.parquet`.
pub(crate) fn file_name(
    topic: &str,
    partition: i32,
    first: i64,
    last: i64,
    writer: &str,
) -> String {
    let topic: String = topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{topic}-p{partition:05}-{first:020}-{last:020}-w{writer}.parquet")
}

/// Parse a (possibly hidden, in-progress) archive file name.
/// Returns (topic, partition, first, last, in_progress).
pub(crate) fn parse_file_name(name: &str) -> Option<(String, i32, i64, i64, bool)> {
    let (core, in_progress) = match name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".inprogress"))
    {
        Some(n) => (n, true),
        None => (name, false),
    };
    let core = core.strip_suffix(".parquet")?;
    // The writer token (absent in names from before it existed).
    let core = match core.rsplit_once('-') {
        Some((head, w))
            if w.len() > 1
                && w.starts_with('w')
                && w[1..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            head
        }
        _ => core,
    };
    let mut parts = core.rsplitn(4, '-');
    let last: i64 = parts.next()?.parse().ok()?;
    let first: i64 = parts.next()?.parse().ok()?;
    let partition: i32 = parts.next()?.strip_prefix('p')?.parse().ok()?;
    let topic = parts.next()?.to_string();
    Some((topic, partition, first, last, in_progress))
}

/// The local filesystem store's staging files (`<name>#<digits>`) of
/// `topic`'s listed partitions under `root`'s raw/ and dlq/ trees: always
/// uncommitted (a complete put renames them away).
fn staging_files(
    root: &std::path::Path,
    topic: &str,
    partitions: &HashMap<i32, Option<i64>>,
) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs: Vec<std::path::PathBuf> = [RAW_PREFIX, DLQ_PREFIX]
        .iter()
        .map(|p| root.join(p))
        .collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let Some((base, n)) = name.rsplit_once('#') else {
                continue;
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((t, p, ..)) = parse_file_name(base) {
                if t == topic && partitions.contains_key(&p) {
                    out.push(path);
                }
            }
        }
    }
    out
}

/// The committed raw files whose event hour overlaps `[lo_ms, hi_ms)` are
/// exactly the paths in `[lo, hi)` of this pair: the layout puts the hour in
/// the path (`raw/events/dt=YYYY-MM-DD/hour=HH/`), fixed-width, so paths sort
/// by hour and the serving store's primary key on `tally_files.path` is the
/// archive's file index by hour.
pub(crate) fn raw_path_range(lo_ms: i64, hi_ms: i64) -> (String, String) {
    const HOUR: i64 = 3_600_000;
    let prefix = |ms: i64| {
        let (dt, hh) = ymd_h(ms);
        format!("{RAW_PREFIX}/dt={dt}/hour={hh}/")
    };
    let first = lo_ms.div_euclid(HOUR) * HOUR;
    let end = (hi_ms.max(lo_ms) - 1).div_euclid(HOUR) * HOUR + HOUR;
    (prefix(first), prefix(end))
}

/// The event hour (epoch ms) of a raw path `raw/events/dt=YYYY-MM-DD/hour=HH/…`.
pub(crate) fn raw_hour(path: &str) -> Option<i64> {
    let rest = path.strip_prefix(RAW_PREFIX)?.strip_prefix("/dt=")?;
    let (day, rest) = rest.split_once("/hour=")?;
    let hour: i64 = rest.get(..2)?.parse().ok()?;
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis();
    Some(midnight + hour * 3_600_000)
}

fn ymd_h(ms: i64) -> (String, String) {
    let t = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    (t.format("%Y-%m-%d").to_string(), t.format("%H").to_string())
}

impl ParquetArchiveSink {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        time_index: usize,
        zstd_level: i32,
    ) -> Result<Self, SinkError> {
        let level = ZstdLevel::try_new(zstd_level).map_err(|e| SinkError::Encode {
            path: "storage.zstd_level".into(),
            message: e.to_string(),
        })?;
        // No dictionary pages: on event streams (unique ids, many videos)
        // plain pages under zstd were 18% smaller and cheaper to write
        // (2 M generated events: 24.3 MB against 29.8 MB).
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(1 << 20))
            .build();
        let writer = format!("{:08x}", rand::random::<u32>());
        Ok(ParquetArchiveSink {
            store,
            time_index,
            props,
            local_root: None,
            writer,
            s3: None,
            multipart_threshold: u64::MAX,
        })
    }

    /// The archive at `location` (a local directory or S3).
    pub(crate) fn open(
        location: &ArchiveLocation,
        time_index: usize,
        zstd_level: i32,
        multipart_threshold: u64,
    ) -> Result<Self, SinkError> {
        let mut sink = ParquetArchiveSink::new(location.store.clone(), time_index, zstd_level)?;
        sink.local_root = location.local_root.clone();
        sink.s3 = location.s3.clone();
        sink.multipart_threshold = multipart_threshold;
        Ok(sink)
    }

    /// An archive rooted at a local directory.
    #[cfg(test)]
    pub(crate) fn local(
        data_dir: &std::path::Path,
        time_index: usize,
        zstd_level: i32,
    ) -> Result<Self, SinkError> {
        ParquetArchiveSink::open(
            &ArchiveLocation::local(data_dir)?,
            time_index,
            zstd_level,
            u64::MAX,
        )
    }

    /// The archive root, for logs.
    pub(crate) fn describe(&self) -> String {
        match (&self.s3, &self.local_root) {
            (Some(s3), _) => format!("s3://{}/{}", s3.bucket, s3.prefix),
            (None, Some(root)) => root.display().to_string(),
            (None, None) => "(object store)".into(),
        }
    }

    /// Column index of the event time.
    pub(crate) fn time_index(&self) -> usize {
        self.time_index
    }

    /// Write a batch's dead-letter files (its raw events go to the open
    /// files, [`RawWriter`]).
    pub(crate) async fn write_dead_letters(
        &self,
        batch: &Batch,
    ) -> Result<Vec<WrittenFile>, SinkError> {
        if batch.dead_letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut only = batch.clone();
        only.events = only.events.slice(0, 0);
        only.row_partitions.clear();
        only.row_offsets.clear();
        self.write_files(&only, false).await
    }

    /// Encode and write every file of a batch under its staging name: it
    /// appears under its final name only after the batch's commit records it
    /// ([`Self::publish`]). Nothing is visible until its
    /// rename; on error, already written files of this batch are returned to
    /// the caller through [`Self::delete`] on retry (names are deterministic).
    pub(crate) async fn write_batch(&self, batch: &Batch) -> Result<Vec<WrittenFile>, SinkError> {
        self.write_files(batch, true).await
    }

    async fn write_files(&self, batch: &Batch, raw: bool) -> Result<Vec<WrittenFile>, SinkError> {
        let encoded = {
            let this = self.clone();
            let batch = batch.clone();
            tokio::task::spawn_blocking(move || this.encode_batch(&batch))
                .await
                .map_err(|e| SinkError::Encode {
                    path: "batch".into(),
                    message: e.to_string(),
                })??
        };
        let mut written = Vec::with_capacity(encoded.len() + batch.partitions.len());
        // Each partition's raw files are named by a manifest entry (renamed
        // first), also when all its messages were dead letters: the entries'
        // offset ranges follow each other.
        let manifested = if raw {
            &batch.partitions
        } else {
            &BTreeMap::new()
        };
        for (p, range) in manifested {
            let raw: Vec<WrittenFile> = encoded
                .iter()
                .filter(|(f, _)| f.partition == *p && f.kind == FileKind::Raw)
                .map(|(f, _)| f.clone())
                .collect();
            let origins = batch.origins.as_ref().map(|o| manifest::ManifestOrigins {
                topic: o.topic.clone(),
                rows: o
                    .rows
                    .iter()
                    .zip(&batch.row_partitions)
                    .filter(|(_, rp)| *rp == p)
                    .map(|(r, _)| *r)
                    .collect(),
            });
            let entry = manifest::ManifestEntry::new(
                &batch.topic,
                *p,
                range.first,
                range.last,
                &raw,
                origins,
            );
            written.push(self.stage_manifest(&entry).await?);
        }
        for (file, bytes) in encoded {
            self.put_staged(&file.path, bytes).await?;
            written.push(file);
        }
        Ok(written)
    }

    fn encode_batch(&self, batch: &Batch) -> Result<Vec<(WrittenFile, Vec<u8>)>, SinkError> {
        let mut out = Vec::new();
        // Raw events grouped by (partition, event hour).
        let events = &batch.events;
        if events.num_rows() > 0 {
            let times = events
                .column(self.time_index)
                .as_primitive::<TimestampMillisecondType>();
            let mut groups: BTreeMap<(i32, i64), Vec<u32>> = BTreeMap::new();
            for (i, p) in batch.row_partitions.iter().enumerate() {
                let hour = times.value(i).div_euclid(3_600_000);
                groups.entry((*p, hour)).or_default().push(i as u32);
            }
            for ((partition, hour), idx) in groups {
                let Some(range) = batch.partitions.get(&partition) else {
                    continue;
                };
                let (dt, hh) = ymd_h(hour * 3_600_000);
                let path = format!(
                    "{RAW_PREFIX}/dt={dt}/hour={hh}/{}",
                    file_name(
                        &batch.topic,
                        partition,
                        range.first,
                        range.last,
                        &self.writer
                    )
                );
                let rows = idx.len() as u64;
                let bytes = self.encode_rows(&path, events, &idx)?;
                out.push((
                    WrittenFile {
                        path,
                        kind: FileKind::Raw,
                        partition,
                        first_offset: range.first,
                        last_offset: range.last,
                        rows,
                        bytes: bytes.len() as u64,
                    },
                    bytes,
                ));
            }
        }
        // Dead letters grouped by partition, dated by the batch's seal time.
        let mut by_partition: BTreeMap<i32, Vec<&DeadLetter>> = BTreeMap::new();
        for d in &batch.dead_letters {
            by_partition.entry(d.partition).or_default().push(d);
        }
        let (dt, _) = ymd_h(batch.sealed_at_ms);
        for (partition, dls) in by_partition {
            let Some(range) = batch.partitions.get(&partition) else {
                continue;
            };
            let path = format!(
                "{DLQ_PREFIX}/dt={dt}/{}",
                file_name(
                    &batch.topic,
                    partition,
                    range.first,
                    range.last,
                    &self.writer
                )
            );
            let rb = dead_letter_batch(&batch.topic, &dls).map_err(|e| SinkError::Encode {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let bytes = self.encode(&path, &rb)?;
            out.push((
                WrittenFile {
                    path,
                    kind: FileKind::DeadLetter,
                    partition,
                    first_offset: range.first,
                    last_offset: range.last,
                    rows: dls.len() as u64,
                    bytes: bytes.len() as u64,
                },
                bytes,
            ));
        }
        Ok(out)
    }

    /// Encode rows `idx` of `events` into one file. The rows are copied out
    /// a chunk at a time (all of them at once is another copy of the batch
    /// in memory); a batch that is one file whole is not copied at all.
    fn encode_rows(
        &self,
        path: &str,
        events: &RecordBatch,
        idx: &[u32],
    ) -> Result<Vec<u8>, SinkError> {
        const CHUNK: usize = 65_536;
        if idx.len() == events.num_rows() && idx.iter().enumerate().all(|(i, r)| *r as usize == i) {
            return self.encode(path, events);
        }
        let err = |e: parquet::errors::ParquetError| SinkError::Encode {
            path: path.to_string(),
            message: e.to_string(),
        };
        let share = events.get_array_memory_size() / events.num_rows().max(1) * idx.len();
        let mut buf = Vec::with_capacity(share / 4 + 1024);
        let mut w = ArrowWriter::try_new(&mut buf, events.schema(), Some(self.props.clone()))
            .map_err(err)?;
        for chunk in idx.chunks(CHUNK) {
            let part =
                take_record_batch(events, &UInt32Array::from(chunk.to_vec())).map_err(|e| {
                    SinkError::Encode {
                        path: path.to_string(),
                        message: e.to_string(),
                    }
                })?;
            w.write(&part).map_err(err)?;
        }
        w.close().map_err(err)?;
        Ok(buf)
    }

    fn encode(&self, path: &str, batch: &RecordBatch) -> Result<Vec<u8>, SinkError> {
        let err = |e: parquet::errors::ParquetError| SinkError::Encode {
            path: path.to_string(),
            message: e.to_string(),
        };
        let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 4 + 1024);
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(self.props.clone()))
            .map_err(err)?;
        w.write(batch).map_err(err)?;
        w.close().map_err(err)?;
        Ok(buf)
    }

    /// `path`'s bytes under its staging name (`.<name>.inprogress`), whole:
    /// renamed by [`Self::publish`] once the commit that records it is in.
    async fn put_staged(&self, path: &str, bytes: Vec<u8>) -> Result<(), SinkError> {
        let staged = open::staging_path(path);
        if self.s3.is_some() {
            return self.put_atomic(&staged, bytes).await;
        }
        // The local store's put writes a temporary file and renames it.
        self.store
            .put(&ObjectPath::from(staged.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| SinkError::ObjectStore {
                path: staged.clone(),
                source: Box::new(e),
            })?;
        Ok(())
    }

    async fn put_atomic(&self, path: &str, bytes: Vec<u8>) -> Result<(), SinkError> {
        if let Some(s3) = &self.s3 {
            // S3: a PUT, or a CompleteMultipartUpload, makes the whole object
            // visible at once; no hidden name and no (copying) rename.
            if bytes.len() as u64 >= self.multipart_threshold {
                return self.put_multipart(s3, path, bytes).await;
            }
            let err = |e: object_store::Error| SinkError::ObjectStore {
                path: path.to_string(),
                source: Box::new(e),
            };
            self.store
                .put(&ObjectPath::from(path), PutPayload::from(bytes))
                .await
                .map_err(err)?;
            return Ok(());
        }
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let tmp = ObjectPath::from(format!("{dir}/.{name}.inprogress"));
        let dst = ObjectPath::from(path);
        let err = |e: object_store::Error| SinkError::ObjectStore {
            path: path.to_string(),
            source: Box::new(e),
        };
        self.store
            .put(&tmp, PutPayload::from(bytes))
            .await
            .map_err(err)?;
        self.store.rename(&tmp, &dst).await.map_err(err)?;
        Ok(())
    }

    /// A multipart upload of `path`, aborted on error. A crash leaves it in
    /// progress, for [`Self::sweep`] of the partition's next owner.
    async fn put_multipart(
        &self,
        s3: &S3Location,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<(), SinkError> {
        let err = |e: object_store::Error| SinkError::ObjectStore {
            path: path.to_string(),
            source: Box::new(e),
        };
        let key = s3.key(path);
        let mp = s3.multipart();
        let id = mp.create_multipart(&key).await.map_err(err)?;
        let upload = async {
            let mut parts = Vec::with_capacity(bytes.len().div_ceil(PART_BYTES).max(1));
            for (i, chunk) in bytes.chunks(PART_BYTES).enumerate() {
                parts.push(
                    mp.put_part(&key, &id, i, PutPayload::from(chunk.to_vec()))
                        .await?,
                );
                crate::failpoint::failpoint("inside_multipart_upload");
            }
            if parts.is_empty() {
                parts.push(mp.put_part(&key, &id, 0, PutPayload::default()).await?);
            }
            mp.complete_multipart(&key, &id, parts).await
        };
        match upload.await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Err(abort) = mp.abort_multipart(&key, &id).await {
                    tracing::warn!(path, error = %abort, "cannot abort a failed multipart upload; the next assignment retries");
                }
                Err(err(e))
            }
        }
    }
}

fn dead_letter_batch(
    topic: &str,
    dls: &[&DeadLetter],
) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let n = dls.len();
    RecordBatch::try_new(
        dead_letter_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                dls.iter().map(|d| d.reason.code()),
            )),
            Arc::new(StringArray::from_iter_values(
                dls.iter().map(|d| d.detail.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(topic, n))),
            Arc::new(Int32Array::from_iter_values(
                dls.iter().map(|d| d.partition),
            )),
            Arc::new(Int64Array::from_iter_values(dls.iter().map(|d| d.offset))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(dls.iter().map(|d| d.rejected_at_ms))
                    .with_timezone("UTC"),
            ) as Arc<dyn Array>,
            Arc::new(StringArray::from_iter_values(
                dls.iter().map(|d| d.payload.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                dls.iter().map(|d| d.payload_bytes as i64),
            )),
        ],
    )
}

mod cleanup;
pub(crate) mod manifest;
mod open;
#[cfg(test)]
mod tests;

#[cfg(test)]
use cleanup::DAY_MS;
pub(crate) use open::{staging_path, Flush, RawWriter, Rotation};

pub(crate) use cleanup::{CommittedFiles, SweepScope};
