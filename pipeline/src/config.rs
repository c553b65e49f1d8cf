//! Settings: defaults embedded from `configs/default.toml`, layered under an
//! optional `--config FILE` and `TALLY__SECTION__KEY` environment variables
//! (environment wins). Unknown keys are refused with the dotted key and the
//! layer that introduced it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The embedded defaults.
pub(crate) const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

/// Prefix of environment overrides: `TALLY__KAFKA__TOPIC=views`.
pub(crate) const ENV_PREFIX: &str = "TALLY__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: cannot read: {message}")]
    Read {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: invalid TOML: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: key `{key}`: {message}")]
    Key {
        source_name: String,
        key: String,
        message: String,
    },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A size in bytes, written as `65536`, `"64KiB"`, `"64MiB"` or `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?}; write a byte count or a string such as \"64KiB\" or \"64MiB\""
                ))
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub decode: DecodeConfig,
    pub schema: SchemaConfig,
    pub sql: SqlConfig,
    pub storage: StorageConfig,
    pub serving: ServingConfig,
    pub api: ApiConfig,
    pub verify: VerifyConfig,
    pub report: ReportConfig,
    pub retention: RetentionConfig,
}

/// `tally report monthly`: report SQL, dimension tables and the rollup they read.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Directory of report queries, one SELECT per file, run in file-name order.
    pub sql_dir: PathBuf,
    /// Directory holding videos.csv and channels.csv.
    pub dims_dir: PathBuf,
    /// The hourly rollup the report SQL reads (registered under its own name).
    pub rollup: String,
}

/// `tally run`'s periodic self-check against the raw archive.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// How often; 0 disables.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How far back from the current hour's start the checked windows reach.
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub topic: String,
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// librdkafka properties, verbatim.
    pub properties: BTreeMap<String, PropertyValue>,
    /// A partition whose messages wait while nobody commits it for this long
    /// is stalled: logged, counted, and `/readyz` fails.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// `group`: partitions come from the consumer group. `manual`: this one
    /// process reads every partition (offsets live in the serving store
    /// anyway); a second such process is refused.
    pub assignment: Assignment,
}

/// How a `tally run` gets its partitions (`kafka.assignment`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    Group,
    Manual,
}

/// A librdkafka property value; TOML strings, integers and booleans are accepted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PropertyValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Bool(b) => write!(f, "{b}"),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Str(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_rows: usize,
    pub max_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    pub max_event_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    #[serde(with = "humantime_serde")]
    pub max_event_age: Duration,
    #[serde(with = "humantime_serde")]
    pub late_after: Duration,
    pub dlq_payload_bytes: ByteSize,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Int64,
    Float64,
    Boolean,
    /// RFC 3339 string or integer epoch milliseconds; stored as UTC milliseconds.
    Timestamp,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    #[serde(default)]
    pub required: bool,
    /// Strings only: maximum length in bytes (and at least 1 byte when set).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Strings only: a regular expression the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    pub time_field: String,
    pub fields: Vec<FieldConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    pub rollups_dir: PathBuf,
    /// Tables rollups may join, by name: a CSV file (header row) or Parquet.
    #[serde(default)]
    pub dimensions: BTreeMap<String, PathBuf>,
    /// How often `tally run` looks for changed dimension files.
    #[serde(with = "humantime_serde")]
    pub dimension_reload: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServingConfig {
    pub url: String,
    /// Index rollup tables by window (faster /v1/top, slower ingest).
    pub window_index: bool,
    /// SQLite: batch commits upsert into small delta tables, which hold
    /// about this many rows; past it, each commit folds one key range into
    /// the rollup tables (0: everything, on every commit).
    pub sqlite_fold_rows: usize,
    /// SQLite: a rollup's rows of one batch go straight to its table, not
    /// the delta, from this many on (a catching-up batch).
    pub sqlite_direct_rows: usize,
}

impl Settings {
    /// Load defaults, then `file`, then the environment variables in `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut merged = parse_layer("configs/default.toml (embedded)", DEFAULT_TOML)?;
        check_layer("configs/default.toml (embedded)", &merged, &merged)?;
        if let Some(path) = file {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                source_name: name.clone(),
                message: e.to_string(),
            })?;
            let layer = parse_layer(&name, &text)?;
            check_layer(&name, &merged, &layer)?;
            merge(&mut merged, layer);
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (key, value) in env {
            let layer = env_layer(&key, &value)?;
            check_layer(&format!("environment variable {key}"), &merged, &layer)?;
            merge(&mut merged, layer);
        }
        let settings = deserialize("merged configuration", merged)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults alone.
    pub fn defaults() -> Result<Settings, ConfigError> {
        Settings::load(None, std::iter::empty())
    }

    /// Checks that serde cannot express; errors name the dotted key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_kafka()?;
        self.validate_batch()?;
        self.validate_storage()?;
        self.validate_schema()?;
        self.validate_api()?;
        for name in self.sql.dimensions.keys() {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok || name == "events" {
                return Err(invalid(
                    &format!("sql.dimensions.{name}"),
                    "a dimension's name is the table rollups join: use [a-z_][a-z0-9_]*, not `events`",
                ));
            }
        }
        if self.retention.interval.is_zero() {
            return Err(invalid(
                "retention.interval",
                "must be positive (it is how often tally run prunes)",
            ));
        }
        Ok(())
    }

    /// `[kafka]`: a topic, and offsets left to tally.
    fn validate_kafka(&self) -> Result<(), ConfigError> {
        if self.kafka.topic.is_empty() {
            return Err(invalid("kafka.topic", "must not be empty"));
        }
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            if let Some(v) = self.kafka.properties.get(key) {
                if v.to_string() != "false" {
                    return Err(invalid(
                        &format!("kafka.properties.\"{key}\""),
                        "tally owns offset commits (they live in the serving store); remove this property",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[batch]`: a batch is sealed at some point.
    fn validate_batch(&self) -> Result<(), ConfigError> {
        if self.batch.max_rows == 0 {
            return Err(invalid("batch.max_rows", "must be at least 1"));
        }
        if self.batch.linger.is_zero() {
            return Err(invalid("batch.linger", "must be positive, e.g. \"1s\""));
        }
        Ok(())
    }

    /// `[storage]`: the archive's URL, its options and limits.
    fn validate_storage(&self) -> Result<(), ConfigError> {
        if !(1..=22).contains(&self.storage.zstd_level) {
            return Err(invalid("storage.zstd_level", "must be between 1 and 22"));
        }
        let url = &self.storage.archive_url;
        if !url.is_empty() {
            match url.strip_prefix("s3://") {
                Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
                Some(_) => {
                    return Err(invalid(
                        "storage.archive_url",
                        "name a bucket: s3://BUCKET or s3://BUCKET/PREFIX",
                    ))
                }
                None => {
                    return Err(invalid(
                        "storage.archive_url",
                        format!(
                        "{url:?}: unsupported; use \"\" for storage.data_dir or s3://BUCKET/PREFIX"
                    ),
                    ))
                }
            }
        } else if !self.storage.options.is_empty() {
            return Err(invalid(
                "storage.options",
                "apply only to an s3:// storage.archive_url; set one or remove the options",
            ));
        }
        if self.storage.multipart_threshold.0 < 5 * 1024 * 1024
            && self.storage.multipart_threshold.0 != 0
        {
            return Err(invalid(
                "storage.multipart_threshold",
                "must be 0 (every file in parts) or at least 5MiB (S3's smallest part)",
            ));
        }
        if self.storage.archive_file_bytes.0 < 1024 * 1024 {
            return Err(invalid(
                "storage.archive_file_bytes",
                "must be at least 1MiB (the default is 128MiB)",
            ));
        }
        if self.storage.archive_roll_interval < Duration::from_secs(1) {
            return Err(invalid(
                "storage.archive_roll_interval",
                "must be at least 1s (the default is 10m)",
            ));
        }
        if self.storage.archive_row_group_bytes.0 == 0 {
            return Err(invalid(
                "storage.archive_row_group_bytes",
                "must be above 0 (the default is 64MiB)",
            ));
        }
        if self.storage.archive_max_open_files == 0 {
            return Err(invalid(
                "storage.archive_max_open_files",
                "must be at least 1 (the default is 64)",
            ));
        }
        if self.storage.orphan_sweep_interval < Duration::from_secs(1) {
            return Err(invalid(
                "storage.orphan_sweep_interval",
                "must be at least 1s (for example \"5m\")",
            ));
        }
        Ok(())
    }

    /// `[schema]`: field names, types and patterns, and the time field.
    fn validate_schema(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.schema.fields.iter().enumerate() {
            let key = format!("schema.fields[{i}].name");
            let ok = !f.name.is_empty()
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !f.name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(invalid(
                    &key,
                    format!("{:?} must match [a-z_][a-z0-9_]*", f.name),
                ));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(invalid(
                    &key,
                    format!("field {:?} is declared twice", f.name),
                ));
            }
            if f.name == "_extra" {
                return Err(invalid(
                    &key,
                    "\"_extra\" is the archive's column of undeclared fields; rename the field",
                ));
            }
            if f.field_type != FieldType::String && (f.max_bytes.is_some() || f.pattern.is_some()) {
                return Err(invalid(
                    &format!("schema.fields[{i}]"),
                    "max_bytes and pattern apply only to string fields",
                ));
            }
            if let Some(p) = &f.pattern {
                regex::Regex::new(p).map_err(|e| {
                    invalid(
                        &format!("schema.fields[{i}].pattern"),
                        format!("invalid regex: {e}"),
                    )
                })?;
            }
        }
        match self
            .schema
            .fields
            .iter()
            .find(|f| f.name == self.schema.time_field)
        {
            Some(f) if f.field_type == FieldType::Timestamp && f.required => {}
            Some(_) => {
                return Err(invalid(
                    "schema.time_field",
                    "must name a required field of type \"timestamp\"",
                ))
            }
            None => {
                return Err(invalid(
                    "schema.time_field",
                    format!(
                        "{:?} is not declared in schema.fields",
                        self.schema.time_field
                    ),
                ))
            }
        }
        Ok(())
    }

    /// `[api]`: rollups to answer from, limits, tokens.
    fn validate_api(&self) -> Result<(), ConfigError> {
        if self.api.rollups.is_empty() {
            return Err(invalid(
                "api.rollups",
                "name at least one rollup (a file in sql.rollups_dir without .sql)",
            ));
        }
        if self.api.sql_concurrency == 0 || self.api.sql_max_rows == 0 {
            return Err(invalid(
                "api.sql_concurrency / api.sql_max_rows",
                "must be at least 1",
            ));
        }
        if self.api.max_concurrency == 0 {
            return Err(invalid("api.max_concurrency", "must be at least 1"));
        }
        if self.api.max_connections == 0 {
            return Err(invalid("api.max_connections", "must be at least 1"));
        }
        if self.api.max_series_points == 0 {
            return Err(invalid("api.max_series_points", "must be at least 1"));
        }
        if self.api.request_timeout.is_zero() {
            return Err(invalid(
                "api.request_timeout",
                "must be positive, e.g. \"10s\"",
            ));
        }
        for (key, tokens) in [
            ("api.read_tokens", &self.api.read_tokens),
            ("api.write_tokens", &self.api.write_tokens),
        ] {
            if tokens
                .0
                .iter()
                .any(|t| t.len() < 16 || t.chars().any(|c| !c.is_ascii_graphic()))
            {
                return Err(invalid(
                    key,
                    "each token must be at least 16 printable ASCII characters without spaces",
                ));
            }
        }
        Ok(())
    }

    /// The serving store URL, defaulting to SQLite under the data directory.
    pub fn serving_url(&self) -> String {
        if self.serving.url.is_empty() {
            format!(
                "sqlite://{}",
                self.storage.data_dir.join("serving.db").display()
            )
        } else {
            self.serving.url.clone()
        }
    }

    /// The effective config as TOML, with secret-looking librdkafka values masked.
    pub fn to_masked_toml(&self) -> String {
        let mut props = toml::Table::new();
        for (k, v) in &self.kafka.properties {
            let secret = k.contains("password") || k.contains("secret") || k.contains("key");
            let shown = if secret {
                "****".to_string()
            } else {
                v.to_string()
            };
            props.insert(k.clone(), toml::Value::String(shown));
        }
        let mut out = String::new();
        out.push_str(&format!(
            "[kafka]\ntopic = {:?}\npoll_timeout = {:?}\nstall_after = {:?}\nassignment = {:?}\n\n[kafka.properties]\n",
            self.kafka.topic,
            humantime::format_duration(self.kafka.poll_timeout).to_string(),
            humantime::format_duration(self.kafka.stall_after).to_string(),
            format!("{:?}", self.kafka.assignment).to_ascii_lowercase()
        ));
        out.push_str(&toml::to_string(&props).unwrap_or_default());
        out.push_str(&format!(
            "\n[batch]\nmax_rows = {}\nmax_bytes = {}\nlinger = {:?}\n",
            self.batch.max_rows,
            self.batch.max_bytes.0,
            humantime::format_duration(self.batch.linger).to_string()
        ));
        let d = &self.decode;
        out.push_str(&format!(
            "\n[decode]\nmax_event_bytes = {}\nmax_future_skew = {:?}\nmax_event_age = {:?}\nlate_after = {:?}\ndlq_payload_bytes = {}\n",
            d.max_event_bytes.0,
            humantime::format_duration(d.max_future_skew).to_string(),
            humantime::format_duration(d.max_event_age).to_string(),
            humantime::format_duration(d.late_after).to_string(),
            d.dlq_payload_bytes.0
        ));
        out.push_str(&format!(
            "\n[schema]\ntime_field = {:?}\n",
            self.schema.time_field
        ));
        for f in &self.schema.fields {
            out.push_str(&format!(
                "\n[[schema.fields]]\nname = {:?}\ntype = {:?}\nrequired = {}\n",
                f.name,
                format!("{:?}", f.field_type).to_ascii_lowercase(),
                f.required
            ));
            if let Some(m) = f.max_bytes {
                out.push_str(&format!("max_bytes = {m}\n"));
            }
            if let Some(p) = &f.pattern {
                out.push_str(&format!("pattern = {p:?}\n"));
            }
        }
        out.push_str(&format!(
            "\n[sql]\nrollups_dir = {:?}\ndimension_reload = {:?}\n{}\n[storage]\ndata_dir = {:?}\nzstd_level = {}\narchive_url = {:?}\nmultipart_threshold = {}\norphan_sweep_interval = {:?}\narchive_file_bytes = {}\narchive_roll_interval = {:?}\narchive_max_open_files = {}\narchive_row_group_bytes = {}\n{}\n[serving]\nurl = {:?}\nwindow_index = {}\nsqlite_fold_rows = {}\nsqlite_direct_rows = {}\n\n[api]\nlisten = {:?}\nrollups = {:?}\nmax_range = {:?}\nmax_series_points = {}\nmax_body = {}\nrequest_timeout = {:?}\nmax_concurrency = {}\nmax_connections = {}\nread_tokens = \"{} configured (masked)\"\nwrite_tokens = \"{} configured (masked)\"\nallowed_hosts = {:?}\nsql_memory = {}\nsql_timeout = {:?}\nsql_max_rows = {}\nsql_concurrency = {}\n\n[verify]\ninterval = {:?}\nlookback = {:?}\n",
            self.sql.rollups_dir.display().to_string(),
            humantime::format_duration(self.sql.dimension_reload).to_string(),
            {
                let mut dims = toml::Table::new();
                for (k, v) in &self.sql.dimensions {
                    dims.insert(k.clone(), toml::Value::String(v.display().to_string()));
                }
                format!("\n[sql.dimensions]\n{}", toml::to_string(&dims).unwrap_or_default())
            },
            self.storage.data_dir.display().to_string(),
            self.storage.zstd_level,
            self.storage.archive_url,
            self.storage.multipart_threshold.0,
            humantime::format_duration(self.storage.orphan_sweep_interval).to_string(),
            self.storage.archive_file_bytes.0,
            humantime::format_duration(self.storage.archive_roll_interval).to_string(),
            self.storage.archive_max_open_files,
            self.storage.archive_row_group_bytes.0,
            {
                let mut opts = toml::Table::new();
                for (k, v) in &self.storage.options {
                    let secret = k.contains("secret") || k.contains("key") || k.contains("token") || k.contains("password");
                    opts.insert(k.clone(), toml::Value::String(if secret { "****".into() } else { v.to_string() }));
                }
                format!("\n[storage.options]\n{}", toml::to_string(&opts).unwrap_or_default())
            },
            mask_url(&self.serving_url()),
            self.serving.window_index,
            self.serving.sqlite_fold_rows,
            self.serving.sqlite_direct_rows,
            self.api.listen.to_string(),
            self.api.rollups,
            humantime::format_duration(self.api.max_range).to_string(),
            self.api.max_series_points,
            self.api.max_body.0,
            humantime::format_duration(self.api.request_timeout).to_string(),
            self.api.max_concurrency,
            self.api.max_connections,
            self.api.read_tokens.0.len(),
            self.api.write_tokens.0.len(),
            self.api.allowed_hosts,
            self.api.sql_memory.0,
            humantime::format_duration(self.api.sql_timeout).to_string(),
            self.api.sql_max_rows,
            self.api.sql_concurrency,
            humantime::format_duration(self.verify.interval).to_string(),
            humantime::format_duration(self.verify.lookback).to_string(),
        ));
        let r = &self.retention;
        out.push_str(&format!(
            "\n[retention]\ninterval = {:?}\ndead_letters = \"{}\"\narchive = \"{}\"\n\n[retention.rollups]\n",
            humantime::format_duration(r.interval).to_string(),
            r.dead_letters,
            r.archive
        ));
        for (name, keep) in &r.rollups {
            out.push_str(&format!("{name} = \"{keep}\"\n"));
        }
        out
    }
}

fn mask_url(url: &str) -> String {
    // postgres://user:password@host/db?password=… -> postgres://user:***@host/db?password=***
    crate::sink::serving::redact(url)
}

fn parse_layer(name: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        source_name: name.to_string(),
        message: e.to_string(),
    })
}

/// Deserialize `base` overlaid with `layer`, attributing any error to `name`.
fn check_layer(name: &str, base: &toml::Table, layer: &toml::Table) -> Result<(), ConfigError> {
    let mut t = base.clone();
    merge(&mut t, layer.clone());
    deserialize(name, t).map(|_| ())
}

fn deserialize(name: &str, table: toml::Table) -> Result<Settings, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.trim().to_string();
        let message = if inner.contains("unknown field") {
            format!("{inner}; remove or rename the key (see configs/default.toml for every key)")
        } else {
            inner
        };
        ConfigError::Key {
            source_name: name.to_string(),
            key,
            message,
        }
    })
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS=h:9092` becomes
/// `[kafka.properties] "bootstrap.servers" = "h:9092"` (librdkafka names use dots).
fn env_layer(key: &str, value: &str) -> Result<toml::Table, ConfigError> {
    let path: Vec<String> = key[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Key {
            source_name: format!("environment variable {key}"),
            key: path.join("."),
            message: "empty path segment; write TALLY__SECTION__KEY".into(),
        });
    }
    let mut path = path;
    if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
        path[2] = path[2].replace('_', ".");
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut leaf = parsed;
    for seg in path.iter().rev() {
        let mut t = toml::Table::new();
        t.insert(seg.clone(), leaf);
        leaf = toml::Value::Table(t);
    }
    match leaf {
        toml::Value::Table(t) => Ok(t),
        _ => Err(ConfigError::Key {
            source_name: format!("environment variable {key}"),
            key: String::new(),
            message: "no key given".into(),
        }),
    }
}

mod api;
mod retention;
mod storage;
pub(crate) use api::ApiConfig;
pub(crate) use retention::{Keep, RetentionConfig};
pub(crate) use storage::StorageConfig;

#[cfg(test)]
mod tests;
