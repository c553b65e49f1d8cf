//! Stage 1: the Kafka consumer group. A dedicated thread polls librdkafka,
//! decodes each message straight into the current micro-batch, and hands
//! sealed batches to the committer through a bounded channel. Offsets come
//! from the serving store on every assignment; Kafka's own group commit only
//! feeds lag monitoring.

pub mod fetch;
pub mod kafka;

pub use kafka::{ConsumerControl, KafkaSource};

use crate::error::{ErrorKind, RetryHint};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: cannot create the consumer: {0}")]
    Create(String),
    #[error("kafka: cannot subscribe to topic `{topic}`: {message}")]
    Subscribe { topic: String, message: String },
    #[error("kafka: consumer thread failed: {0}")]
    Thread(String),
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Create(_) | SourceError::Subscribe { .. } => ErrorKind::User,
            SourceError::Thread(_) => ErrorKind::Internal,
        }
    }
    pub fn retry(&self) -> RetryHint {
        match self {
            SourceError::Create(_) | SourceError::Subscribe { .. } | SourceError::Thread(_) => RetryHint::NoRetry,
        }
    }
}
