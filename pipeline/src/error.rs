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
    /// The user's mistake in a command's input (a flag, a file, a query, a
    /// name): the message says what to fix.
    #[error("{0}")]
    Usage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A user's mistake (see [`Error::Usage`]).
pub(crate) fn usage(m: impl std::fmt::Display) -> Error {
    Error::Usage(m.to_string())
}

/// A broken invariant or an engine failure that is not the user's input.
pub(crate) fn internal(m: impl std::fmt::Display) -> Error {
    Error::Internal(m.to_string())
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::User,
            Error::Aggregate(e) => e.kind(),
            Error::Sink(e) => e.kind(),
            Error::Source(e) => e.kind(),
            Error::Serve(e) => e.kind(),
            Error::Usage(_) => ErrorKind::User,
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
            Error::Usage(_) | Error::Internal(_) => RetryHint::NoRetry,
        }
    }
}

/// The process exit code for a failed command: 2 for the user's mistake
/// (usage, configuration, SQL, input; also a state only an operator can
/// resolve, such as a lost serving store), 3 for an outage (a broker, store
/// or disk that failed; retrying later may work), 4 for a bug in tally.
/// 1 is not an error: a command whose answer is "no" (`tally verify` found
/// drift, `tally offsets show` found a partition beyond the log's end).
pub fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::User => 2,
        ErrorKind::External => 3,
        ErrorKind::Internal => 4,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
