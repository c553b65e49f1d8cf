//! Stage 4: rollup SQL from `sql/rollups/`, planned once by DataFusion and
//! executed on every micro-batch.
//!
//! - [`catalog`] loads the files and derives keys, window and merge rules from
//!   each plan, refusing anything that cannot be merged.
//! - [`dimensions`] are the tables (CSV, Parquet) rollups may join.
//! - [`executor`] runs the planned SQL over a batch (registered as `events`).
//! - [`rollup`] is the merge algebra, with a reference implementation.
//! - [`sketch`]: `approx_distinct` and `approx_percentile_cont` as mergeable
//!   DataSketches (HLL, KLL).

pub(crate) mod catalog;
pub(crate) mod dimensions;
pub(crate) mod executor;
pub(crate) mod rollup;
pub(crate) mod sketch;

pub(crate) use catalog::{ColumnKind, RollupDef, SqlCatalog};
pub(crate) use dimensions::Dimensions;
pub(crate) use executor::{RollupAggregator, RollupOutput};
pub(crate) use rollup::MergeRule;

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("{dir}: {message}")]
    Catalog { dir: String, message: String },
    #[error("{file}: cannot plan the rollup SQL: {message}")]
    Plan { file: String, message: String },
    #[error("{file}: {}{message}", column.as_ref().map(|c| format!("column `{c}`: ")).unwrap_or_default())]
    NotMergeable {
        file: String,
        column: Option<String>,
        message: String,
    },
    #[error("sql.dimensions.{name} ({path}): {message}")]
    Dimension {
        name: String,
        path: String,
        message: String,
    },
    #[error("rollup `{rollup}`: executing the SQL on a batch failed: {source}")]
    Execute {
        rollup: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
}

impl AggregateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AggregateError::Catalog { .. }
            | AggregateError::Plan { .. }
            | AggregateError::NotMergeable { .. }
            | AggregateError::Dimension { .. } => ErrorKind::User,
            AggregateError::Execute { .. } => ErrorKind::Internal,
        }
    }
}
