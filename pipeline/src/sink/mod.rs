//! Stage 5: durable outputs. [`archive`] writes raw events and dead letters to
//! Parquet on object storage; [`serving`] merges rollups and advances offsets
//! in one transaction (the exactly-once fence).

pub(crate) mod archive;
pub(crate) mod location;
pub(crate) mod serving;

pub(crate) use archive::{dead_letter_schema, raw_path_range, ParquetArchiveSink, WrittenFile};
pub(crate) use location::ArchiveLocation;
pub(crate) use serving::{CommitOutcome, CommitRequest, ServingStore};

use crate::error::{ErrorKind, RetryHint};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("archive {path}: {source}")]
    ObjectStore {
        path: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("encoding Parquet for {path}: {message}")]
    Encode { path: String, message: String },
    #[error("serving store {url}: cannot open: {message}")]
    Open { url: String, message: String },
    #[error("serving table `{table}`: {message}")]
    Schema { table: String, message: String },
    #[error("serving store: {operation}: {source}")]
    Database {
        operation: &'static str,
        #[source]
        source: Box<sqlx::Error>,
    },
    /// The SQLite batch-commit connection (rusqlite).
    #[error("serving store: {operation}: {source}")]
    Sqlite {
        operation: &'static str,
        #[source]
        source: Box<rusqlite::Error>,
    },
}

impl SinkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SinkError::ObjectStore { .. }
            | SinkError::Database { .. }
            | SinkError::Sqlite { .. }
            | SinkError::Open { .. } => ErrorKind::External,
            SinkError::Encode { .. } => ErrorKind::Internal,
            SinkError::Schema { .. } => ErrorKind::User,
        }
    }
    pub fn retry(&self) -> RetryHint {
        match self {
            SinkError::ObjectStore { .. }
            | SinkError::Database { .. }
            | SinkError::Sqlite { .. } => RetryHint::WithBackoff,
            SinkError::Open { .. } | SinkError::Encode { .. } | SinkError::Schema { .. } => {
                RetryHint::NoRetry
            }
        }
    }
}

pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> SinkError {
    move |e| SinkError::Database {
        operation,
        source: Box::new(e),
    }
}

pub(crate) fn sq(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> SinkError {
    move |e| SinkError::Sqlite {
        operation,
        source: Box::new(e),
    }
}
