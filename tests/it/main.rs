//! One integration binary for every black-box test.
mod api;
mod backfill;
mod cli;
pub(crate) mod crash;
mod dimensions;
mod dlq;
mod docs;
mod e2e;
mod faults;
mod limits;
mod postgres;
mod rebuild;
mod replay;
mod retention;
mod s3;
mod safety;
mod sketches;
mod versions;
