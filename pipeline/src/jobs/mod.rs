//! CLI jobs built from the pipeline's stages.

pub mod backfill;
pub mod bench_api;
pub mod export;
pub mod produce;
pub mod topic;
pub mod verify;
