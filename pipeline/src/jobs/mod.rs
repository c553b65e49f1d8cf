//! CLI jobs built from the pipeline's stages.

pub mod produce;
pub mod topic;
