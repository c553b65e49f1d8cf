//! The archive's own record of what is committed: one small JSON object per
//! committed raw flush (or per `tally dlq replay` batch), under
//! `_tally/manifest/<topic>/p<partition>/<first>-<last>-w<writer>.json`.
//!
//! An entry is written in the archive commit's protocol: staged (hidden)
//! before the serving-store commit, recorded there as a committed file (and
//! as pending), and renamed to its final name *before* the data files it
//! names, so a visible entry may name data files still under their staging
//! names (a crash in between; the roll forward, or `tally rebuild`, renames
//! them), and a visible data file is always named by a visible entry. The
//! entries are what `tally rebuild` reads to recreate a serving store, and
//! what the sweeps check before deleting a raw file the store does not list.

use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::{file_name, parse_file_name, FileKind, ParquetArchiveSink, WrittenFile};
use crate::sink::SinkError;

pub(crate) const MANIFEST_PREFIX: &str = "_tally/manifest";
const VERSION: u32 = 1;

/// One committed set of raw files of a partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ManifestEntry {
    pub version: u32,
    pub topic: String,
    pub partition: i32,
    /// The offsets the files cover: every raw event of the partition in
    /// `[first_offset, last_offset]` is in them.
    pub first_offset: i64,
    pub last_offset: i64,
    /// RFC 3339 UTC.
    pub committed_at: String,
    pub files: Vec<ManifestFile>,
    /// `tally dlq replay`: the original topic and the (partition, offset)
    /// of each dead letter these files count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origins: Option<ManifestOrigins>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ManifestFile {
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ManifestOrigins {
    pub topic: String,
    pub rows: Vec<(i32, i64)>,
}

/// `_tally/manifest/<topic>/` (the topic as file names spell it).
pub(crate) fn topic_dir(topic: &str) -> String {
    let spelled = parse_file_name(&file_name(topic, 0, 0, 0, "0"))
        .map(|(t, ..)| t)
        .unwrap_or_default();
    format!("{MANIFEST_PREFIX}/{spelled}/")
}

/// `_tally/manifest/<topic>/p00003/`.
pub(crate) fn partition_dir(topic: &str, partition: i32) -> String {
    format!("{}p{partition:05}/", topic_dir(topic))
}

/// The entry's path for a set of files with this name's fields.
pub(crate) fn entry_path(
    topic: &str,
    partition: i32,
    first: i64,
    last: i64,
    writer: &str,
) -> String {
    format!(
        "{}{first:020}-{last:020}-w{writer}.json",
        partition_dir(topic, partition)
    )
}

/// The entry that would name the raw data file `path` (same topic,
/// partition, offsets and writer), if its name parses.
pub(crate) fn entry_path_of(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let (topic, partition, first, last, _) = parse_file_name(name)?;
    let writer = name
        .strip_suffix(".parquet")?
        .rsplit_once("-w")
        .map(|(_, w)| w)?;
    Some(format!(
        "{MANIFEST_PREFIX}/{topic}/p{partition:05}/{first:020}-{last:020}-w{writer}.json"
    ))
}

impl ManifestEntry {
    pub(crate) fn new(
        topic: &str,
        partition: i32,
        first: i64,
        last: i64,
        files: &[WrittenFile],
        origins: Option<ManifestOrigins>,
    ) -> Self {
        ManifestEntry {
            version: VERSION,
            topic: topic.to_string(),
            partition,
            first_offset: first,
            last_offset: last,
            committed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            files: files
                .iter()
                .filter(|f| f.kind == FileKind::Raw)
                .map(|f| ManifestFile {
                    path: f.path.clone(),
                    rows: f.rows,
                    bytes: f.bytes,
                })
                .collect(),
            origins,
        }
    }

    pub(crate) fn parse(path: &str, bytes: &[u8]) -> Result<Self, SinkError> {
        let e: ManifestEntry = serde_json::from_slice(bytes).map_err(|e| SinkError::Encode {
            path: path.to_string(),
            message: format!("not a tally manifest entry: {e}"),
        })?;
        if e.version != VERSION {
            return Err(SinkError::Encode {
                path: path.to_string(),
                message: format!(
                    "manifest entry version {} (this tally reads version {VERSION}): use the tally that wrote it",
                    e.version
                ),
            });
        }
        Ok(e)
    }
}

impl ParquetArchiveSink {
    /// Stage `entry` (hidden) for the commit that records it: the returned
    /// file goes first in the commit's file list, so it is renamed first.
    pub(crate) async fn stage_manifest(
        &self,
        entry: &ManifestEntry,
    ) -> Result<WrittenFile, SinkError> {
        self.stage_manifest_as(entry, &self.writer).await
    }

    /// [`Self::stage_manifest`] under the writer token `token`.
    pub(crate) async fn stage_manifest_as(
        &self,
        entry: &ManifestEntry,
        token: &str,
    ) -> Result<WrittenFile, SinkError> {
        let path = entry_path(
            &entry.topic,
            entry.partition,
            entry.first_offset,
            entry.last_offset,
            token,
        );
        let bytes = serde_json::to_vec_pretty(entry).map_err(|e| SinkError::Encode {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let file = WrittenFile {
            path: path.clone(),
            kind: FileKind::Manifest,
            partition: entry.partition,
            first_offset: entry.first_offset,
            last_offset: entry.last_offset,
            rows: 0,
            bytes: bytes.len() as u64,
        };
        self.put_staged(&path, bytes).await?;
        Ok(file)
    }

    /// This process's token in file names.
    pub(crate) fn writer_token(&self) -> &str {
        &self.writer
    }

    /// `batches` as one Parquet file under `path`'s staging name; its bytes.
    pub(crate) async fn stage_batches(
        &self,
        path: &str,
        schema: datafusion::arrow::datatypes::SchemaRef,
        batches: &[datafusion::arrow::record_batch::RecordBatch],
    ) -> Result<u64, SinkError> {
        let err = |e: parquet::errors::ParquetError| SinkError::Encode {
            path: path.to_string(),
            message: e.to_string(),
        };
        let mut buf = Vec::new();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(self.props.clone()))
                .map_err(err)?;
        for b in batches {
            w.write(b).map_err(err)?;
        }
        w.close().map_err(err)?;
        let n = buf.len() as u64;
        self.put_staged(path, buf).await?;
        Ok(n)
    }

    /// Whether a visible manifest entry names the raw file `path`.
    pub(crate) async fn manifest_names(&self, path: &str) -> Result<bool, SinkError> {
        let Some(entry) = entry_path_of(path) else {
            return Ok(false);
        };
        match self.store.head(&ObjectPath::from(entry.as_str())).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(SinkError::ObjectStore {
                path: entry,
                source: Box::new(e),
            }),
        }
    }

    /// Of `doomed` (files a sweep would delete), those no manifest entry
    /// names. A named one is committed in the archive's own record though
    /// the serving store does not list it (a store behind its archive): it
    /// is kept and reported.
    pub(crate) async fn without_manifested(
        &self,
        doomed: Vec<String>,
    ) -> Result<Vec<String>, SinkError> {
        let mut out = Vec::with_capacity(doomed.len());
        for path in doomed {
            let hidden = path
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with('.') || n.contains('#'));
            if !hidden && path.starts_with(super::RAW_PREFIX) && self.manifest_names(&path).await? {
                tracing::error!(
                    path = %path,
                    "the archive's manifest names this file but the serving store does not list it; keeping it \
                     (the store is behind its archive: `tally rebuild` recreates it)"
                );
                continue;
            }
            out.push(path);
        }
        Ok(out)
    }

    /// Every visible manifest entry under `_tally/manifest/`, every topic.
    pub(crate) async fn manifest_entries(&self) -> Result<Vec<(String, ManifestEntry)>, SinkError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut list = self.store.list(Some(&ObjectPath::from(MANIFEST_PREFIX)));
        let mut paths = Vec::new();
        while let Some(meta) = list.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => {
                    return Err(SinkError::ObjectStore {
                        path: MANIFEST_PREFIX.to_string(),
                        source: Box::new(e),
                    })
                }
            };
            let visible = meta
                .location
                .filename()
                .is_some_and(|n| n.ends_with(".json") && !n.starts_with('.'));
            if visible {
                paths.push(meta.location);
            }
        }
        for p in paths {
            let err = |e: object_store::Error| SinkError::ObjectStore {
                path: p.to_string(),
                source: Box::new(e),
            };
            let bytes = self
                .store
                .get(&p)
                .await
                .map_err(err)?
                .bytes()
                .await
                .map_err(err)?;
            let entry = ManifestEntry::parse(p.as_ref(), &bytes)?;
            out.push((p.to_string(), entry));
        }
        Ok(out)
    }

    /// The visible manifest entries of `topic`'s `partition` starting at or
    /// after `from` (the store's archive position; `None`: all of them).
    pub(crate) async fn manifest_beyond(
        &self,
        topic: &str,
        partition: i32,
        from: Option<i64>,
    ) -> Result<Vec<String>, SinkError> {
        use futures::StreamExt;
        let dir = partition_dir(topic, partition);
        let prefix = ObjectPath::from(dir.as_str());
        let mut list = match from {
            // Names sort by their zero-padded first offset; hidden ones
            // (`.…`) sort before every digit.
            Some(n) => self
                .store
                .list_with_offset(Some(&prefix), &ObjectPath::from(format!("{dir}{:020}", n))),
            None => self.store.list(Some(&prefix)),
        };
        let mut out = Vec::new();
        while let Some(meta) = list.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => {
                    return Err(SinkError::ObjectStore {
                        path: dir,
                        source: Box::new(e),
                    })
                }
            };
            let Some(name) = meta.location.filename() else {
                continue;
            };
            let first = name.split('-').next().and_then(|f| f.parse::<i64>().ok());
            if name.ends_with(".json") && first.is_some_and(|f| from.is_none_or(|n| f >= n)) {
                out.push(meta.location.to_string());
            }
        }
        Ok(out)
    }

    /// Every object under `prefix`: (path, size), hidden ones included.
    pub(crate) async fn list_all(&self, prefix: &str) -> Result<Vec<(String, u64)>, SinkError> {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut list = self.store.list(Some(&ObjectPath::from(prefix)));
        while let Some(meta) = list.next().await {
            match meta {
                Ok(m) => out.push((m.location.to_string(), m.size)),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => {
                    return Err(SinkError::ObjectStore {
                        path: prefix.to_string(),
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(out)
    }

    /// The rows of the Parquet file `path` (`size` bytes), from its footer
    /// (two ranged reads).
    pub(crate) async fn parquet_rows(&self, path: &str, size: u64) -> Result<u64, SinkError> {
        use parquet::file::metadata::ParquetMetaDataReader;
        let location = ObjectPath::from(path);
        let bad = |m: String| SinkError::Encode {
            path: path.to_string(),
            message: m,
        };
        let err = |e: object_store::Error| SinkError::ObjectStore {
            path: path.to_string(),
            source: Box::new(e),
        };
        if size < 12 {
            return Err(bad(format!("{size} bytes: not a Parquet file")));
        }
        let tail = self
            .store
            .get_range(&location, size - 8..size)
            .await
            .map_err(err)?;
        if &tail[4..] != b"PAR1" {
            return Err(bad("no Parquet footer".into()));
        }
        let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        if footer + 8 > size {
            return Err(bad("a footer longer than the file".into()));
        }
        let meta = self
            .store
            .get_range(&location, size - 8 - footer..size - 8)
            .await
            .map_err(err)?;
        let meta = ParquetMetaDataReader::decode_metadata(&meta)
            .map_err(|e| bad(format!("cannot read the Parquet footer: {e}")))?;
        Ok(meta.file_metadata().num_rows().max(0) as u64)
    }

    /// The partitions of `topic` with a manifest directory.
    pub(crate) async fn manifest_partitions(&self, topic: &str) -> Result<Vec<i32>, SinkError> {
        let dir = topic_dir(topic);
        let listed = self
            .store
            .list_with_delimiter(Some(&ObjectPath::from(dir.as_str())))
            .await;
        let listed = match listed {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => {
                return Err(SinkError::ObjectStore {
                    path: dir,
                    source: Box::new(e),
                })
            }
        };
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.strip_prefix('p')?.parse().ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_file_maps_to_its_entry() {
        let name = file_name("views", 3, 10, 99, "ab12");
        let path = format!("raw/events/dt=2026-01-01/hour=05/{name}");
        assert_eq!(
            entry_path_of(&path).as_deref(),
            Some(entry_path("views", 3, 10, 99, "ab12").as_str())
        );
        assert_eq!(
            entry_path("views", 3, 10, 99, "ab12"),
            "_tally/manifest/views/p00003/00000000000000000010-00000000000000000099-wab12.json"
        );
        assert_eq!(entry_path_of("raw/events/x.parquet"), None);
    }

    #[test]
    fn entries_round_trip_and_refuse_other_versions() {
        let e = ManifestEntry::new("t", 0, 1, 2, &[], None);
        let bytes = serde_json::to_vec(&e).unwrap();
        assert_eq!(ManifestEntry::parse("x", &bytes).unwrap(), e);
        let mut v = e.clone();
        v.version = 9;
        let err = ManifestEntry::parse("x", &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(ManifestEntry::parse("x", b"{").is_err());
    }
}
