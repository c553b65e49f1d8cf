//! Stage 2: bytes -> validated typed values, appended straight into Arrow
//! column builders. A message that fails validation becomes a [`Reject`] with a
//! bounded reason code and a human detail; it never stops the partition.

mod json;
mod on_read;
mod schema;

pub(crate) use json::RecordDecoder;
pub(crate) use on_read::{events_select, read_schema};
pub(crate) use schema::{EventColumns, EventSchema};

/// Why a message was rejected. The code is a bounded label set (metrics, DLQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    Empty,
    TooLarge,
    NotUtf8,
    NotJson,
    NotObject,
    DuplicateKey,
    MissingField,
    WrongType,
    InvalidValue,
    FutureEventTime,
    TooOld,
    /// Decoded fine, but a rollup's SQL failed on it (DataFusion) or the
    /// serving store refused its rollup row (found by bisecting the batch).
    RollupFailed,
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
        RejectReason::Empty,
        RejectReason::TooLarge,
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::DuplicateKey,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::InvalidValue,
        RejectReason::FutureEventTime,
        RejectReason::TooOld,
        RejectReason::RollupFailed,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::TooLarge => "too_large",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::DuplicateKey => "duplicate_key",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::FutureEventTime => "future_event_time",
            RejectReason::TooOld => "too_old",
            RejectReason::RollupFailed => "rollup_failed",
        }
    }
}

/// A rejected message: reason code plus a detail naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

impl Reject {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Reject {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.detail)
    }
}
