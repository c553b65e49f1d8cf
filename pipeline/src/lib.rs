//! tally: exact windowed counting over Kafka.
//!
//! ```text
//!  Kafka ──► source (consumer thread) ──► decode ──► batch ───────┐ bounded channel
//!                                                                 ▼
//!            sink::archive (Parquet raw + DLQ) ◄── committer ──► aggregate (DataFusion SQL)
//!                                                     │
//!                                                     ▼
//!            sink::serving: ONE transaction = fence offsets + merge rollups
//!                                             + record files + advance offsets
//! ```
//!
//! # Layout
//! - [`config`]: layered settings (embedded defaults, file, `TALLY__*` env).
//! - [`source`]: the Kafka consumer group member and rebalance handling.
//! - [`decode`]: JSON -> validated typed values -> Arrow builders; rejects.
//! - [`batch`]: micro-batch policy (rows, bytes, linger) and sealed batches.
//! - [`aggregate`]: the SQL catalog (`sql/rollups`), execution, merge algebra.
//! - [`sink`]: Parquet archive on object storage and the serving store.
//! - [`pipeline`]: `tally run`, wiring the stages and the commit protocol.
//! - [`quarantine`]: poison rows bisected out of a batch the store or the SQL refuses.
//! - [`serve`]: the HTTP API (queries, processEvents, metrics, health).
//! - [`metrics`]: Prometheus metrics shared by every stage.
//! - [`jobs`]: CLI jobs (load generator, API benchmark, topic admin).
//! - [`cli`]: the command line (the only place besides `main` using anyhow).
#![deny(clippy::todo, clippy::dbg_macro, clippy::print_stdout)]
// Library code never unwraps; tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub(crate) mod aggregate;
pub mod allocator;
pub(crate) mod batch;
pub mod cli;
pub(crate) mod config;
pub(crate) mod decode;
pub mod error;
pub(crate) mod failpoint;
pub mod jobs;
pub(crate) mod metrics;
pub use metrics::set_build_commit;
pub(crate) mod pipeline;
pub(crate) mod quarantine;
pub(crate) mod serve;
pub(crate) mod sink;
pub mod source;
#[cfg(test)]
pub(crate) mod testing;

pub use error::{Error, ErrorKind, Result, RetryHint};
