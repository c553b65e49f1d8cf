//! `[storage]`: where the archive lives and how its files are written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, PropertyValue};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub zstd_level: i32,
    /// Where raw/ and dlq/ live: empty means `data_dir`; `s3://BUCKET/PREFIX`
    /// means S3 or any S3-compatible store.
    pub archive_url: String,
    /// object_store options for `archive_url`, passed verbatim (`aws_endpoint`,
    /// `aws_region`, `aws_access_key_id`, `aws_allow_http`, …). They override
    /// the standard `AWS_*` environment variables.
    pub options: BTreeMap<String, PropertyValue>,
    /// Archive files at least this large are uploaded in parts (S3 multipart);
    /// smaller ones with one PUT. Either way an object appears only when complete.
    pub multipart_threshold: ByteSize,
    /// How often each owned partition's archive is swept for files of batches
    /// that can never commit (after the first sweep, which follows the first
    /// commit on a newly assigned partition).
    #[serde(with = "humantime_serde")]
    pub orphan_sweep_interval: Duration,
    /// A raw file (per partition and event hour) is closed and committed at
    /// this size, after `archive_roll_interval`, when it is the least
    /// recently written of more than `archive_max_open_files`, or at shutdown.
    pub archive_file_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub archive_roll_interval: Duration,
    pub archive_max_open_files: usize,
    /// An open raw file's buffered rows become a Parquet row group at this size.
    pub archive_row_group_bytes: ByteSize,
}
