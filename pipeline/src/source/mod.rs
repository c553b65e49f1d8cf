//! Stage 1: the Kafka consumer group. A dedicated thread polls librdkafka,
//! decodes each message straight into the current micro-batch, and hands
//! sealed batches to the committer through a bounded channel. Offsets come
//! from the serving store on every assignment; Kafka's own group commit only
//! feeds lag monitoring.

mod assign;
pub mod client;
pub mod fetch;
pub mod kafka;
pub mod offsets;
mod outage;
pub mod stall;

pub use kafka::{ConsumerControl, KafkaSource};
pub use offsets::{OffsetStore, UnfinishedFiles};

use crate::error::{ErrorKind, RetryHint};

/// librdkafka's own log lines (connection, SASL and SSL errors: often the
/// only clue to a misconfigured client) into tally's log, at their level.
/// Every client context forwards to this; clients log from warnings up
/// unless `kafka.properties."log_level"` says otherwise.
pub fn librdkafka_log(level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: cannot create the consumer: {0}")]
    Create(String),
    #[error("kafka: cannot subscribe to topic `{topic}`: {message}")]
    Subscribe { topic: String, message: String },
    #[error("kafka: consumer thread failed: {0}")]
    Thread(String),
    /// The broker did not answer a metadata, watermark, produce or admin
    /// request.
    #[error("kafka: {0}")]
    Broker(String),
    /// A topic or partition the command names does not exist.
    #[error("kafka: {0}")]
    NotFound(String),
    /// The serving store lost its offsets while the archive kept the files
    /// they describe (the store deleted, replaced or pointed elsewhere).
    #[error(
        "the serving store ({store}) holds no offsets for topic `{topic}`, but the archive ({archive}) already holds its files \
         (for example {example}): the serving store was deleted, replaced or is not the one this archive belongs to. \
         Starting would read the topic again from `auto.offset.reset` or Kafka's group offset, counting part of its history \
         twice or not at all. Nothing was changed. Fix: point serving.url at the store this archive belongs to; or recreate \
         the store from the archive with `tally rebuild` (docs/operations.md, \"Rebuild the serving store\"); to start over \
         on purpose, move the archive's `raw/`, `dlq/` and `_tally/` files of `{topic}` out of storage.archive_url first"
    )]
    StoreLost {
        topic: String,
        store: String,
        archive: String,
        example: String,
    },
    /// The archive's manifest holds commits the serving store does not
    /// (the store restored from an older backup, or another store).
    #[error(
        "topic `{topic}` partition {partition}: the archive ({archive}) holds files committed beyond the serving store's \
         ({store}) archive position {} (for example {entry}): the serving store is older than its archive (restored \
         from a backup?) or belongs to another archive. Starting would count those events again and write them twice. \
         Nothing was changed. Fix: recreate the store from the archive with `tally rebuild` into an empty store \
         (docs/operations.md, \"Rebuild the serving store\"), or point serving.url at the store this archive belongs to",
        position.map_or_else(|| "(none)".to_string(), |n| n.to_string())
    )]
    StoreBehind {
        topic: String,
        partition: i32,
        store: String,
        archive: String,
        position: Option<i64>,
        entry: String,
    },
    /// A stored next offset above the partition's end: the topic was
    /// deleted and created again, or its offsets were reset.
    #[error(
        "topic `{topic}` partition {partition}: the serving store's next offset {stored} is beyond the end of the log \
         (high watermark {high}, low watermark {low}): the topic was deleted and created again, or its offsets were reset. \
         Consuming would skip every new message as already counted, so this partition is stopped. Fix: \
         `tally offsets reset --topic {topic} --partition {partition} --to earliest` (or `--to latest`, or `--to N`), \
         then start tally again"
    )]
    OffsetBeyondEnd {
        topic: String,
        partition: i32,
        stored: i64,
        high: i64,
        low: i64,
    },
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Create(_) | SourceError::Subscribe { .. } => ErrorKind::User,
            SourceError::StoreLost { .. }
            | SourceError::StoreBehind { .. }
            | SourceError::OffsetBeyondEnd { .. } => ErrorKind::User,
            SourceError::Thread(_) => ErrorKind::Internal,
            SourceError::Broker(_) => ErrorKind::External,
            SourceError::NotFound(_) => ErrorKind::User,
        }
    }
    pub fn retry(&self) -> RetryHint {
        match self {
            SourceError::Create(_)
            | SourceError::Subscribe { .. }
            | SourceError::Thread(_)
            | SourceError::StoreLost { .. }
            | SourceError::StoreBehind { .. }
            | SourceError::OffsetBeyondEnd { .. }
            | SourceError::NotFound(_) => RetryHint::NoRetry,
            SourceError::Broker(_) => RetryHint::WithBackoff,
        }
    }
}
