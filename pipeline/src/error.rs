//! The crate error: one enum per stage, wrapped here, each answering who is at
//! fault ([`ErrorKind`]) and whether retrying can help ([`RetryHint`]).

use crate::aggregate::AggregateError;
use crate::config::ConfigError;
use crate::serve::ServeError;
use crate::sink::SinkError;
use crate::source::SourceError;

/// Who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration, SQL or input: fix it and retry.
    User,
    /// A dependency failed (broker, disk, serving store).
    External,
    /// A broken invariant inside tally.
    Internal,
}

/// Whether the failed operation may succeed if retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    NoRetry,
    WithBackoff,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::User,
            Error::Aggregate(e) => e.kind(),
            Error::Sink(e) => e.kind(),
            Error::Source(e) => e.kind(),
            Error::Serve(e) => e.kind(),
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn retry(&self) -> RetryHint {
        match self {
            Error::Config(_) => RetryHint::NoRetry,
            Error::Aggregate(_) => RetryHint::NoRetry,
            Error::Sink(e) => e.retry(),
            Error::Source(e) => e.retry(),
            Error::Serve(e) => e.retry(),
            Error::Internal(_) => RetryHint::NoRetry,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
