//! Runs each rollup's SQL over a micro-batch. The SQL is parsed, analysed and
//! optimised once at startup; the physical plan is reused across batches
//! (rebuilt every [`REPLAN_EVERY`] executions so per-run metrics stay bounded).
//! The batch reaches the plan through [`BatchSlot`], the `events` table.

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::{SessionConfig, SessionContext};

use super::catalog::{ColumnKind, RollupDef, SqlCatalog};
use super::dimensions::Dimensions;
use super::AggregateError;

/// Physical plans are rebuilt after this many executions.
pub(crate) const REPLAN_EVERY: u32 = 1024;

/// The `events` table (or a dimension table): whatever batches are in the
/// slot when a plan executes.
#[derive(Debug, Clone)]
pub(crate) struct BatchSlot {
    schema: SchemaRef,
    batches: Arc<Mutex<Vec<RecordBatch>>>,
}

impl BatchSlot {
    pub(crate) fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        BatchSlot {
            schema,
            batches: Arc::new(Mutex::new(batches)),
        }
    }

    /// Rows in the slot.
    pub(crate) fn rows(&self) -> usize {
        self.batches
            .lock()
            .map(|b| b.iter().map(RecordBatch::num_rows).sum())
            .unwrap_or(0)
    }

    /// Replace the slot's contents.
    pub(crate) fn set(&self, batches: Vec<RecordBatch>) {
        if let Ok(mut slot) = self.batches.lock() {
            *slot = batches;
        }
    }

    /// Register the slot as table `name` of `ctx`.
    pub(crate) fn register(&self, ctx: &SessionContext, name: &str) -> Result<(), AggregateError> {
        let err = |e: DataFusionError| AggregateError::Catalog {
            dir: name.to_string(),
            message: e.to_string(),
        };
        let table = StreamingTable::try_new(self.schema.clone(), vec![Arc::new(self.clone())])
            .map_err(err)?;
        ctx.register_table(name, Arc::new(table)).map_err(err)?;
        Ok(())
    }
}

impl PartitionStream for BatchSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.batches.lock().map(|b| b.clone()).unwrap_or_default();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// A DataFusion session with `events` registered over a [`BatchSlot`], and
/// the dimension tables beside it.
pub(crate) fn events_context(
    events: SchemaRef,
    dimensions: &Dimensions,
) -> Result<(SessionContext, BatchSlot), AggregateError> {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(65_536)
        .with_information_schema(false);
    let ctx = SessionContext::new_with_config(config);
    // approx_distinct / approx_percentile_cont build mergeable sketches.
    super::sketch::register(&ctx);
    let slot = BatchSlot::new(events, Vec::new());
    slot.register(&ctx, "events")?;
    dimensions.register(&ctx)?;
    Ok((ctx, slot))
}

/// Context used only for planning (validation, `tally check`).
pub(crate) fn planning_context(
    events: SchemaRef,
    dimensions: &Dimensions,
) -> Result<SessionContext, AggregateError> {
    events_context(events, dimensions).map(|(ctx, _)| ctx)
}

/// Rows one rollup produced for one batch, in the rollup's canonical schema
/// (text, int64 with timestamps as epoch ms, float64).
#[derive(Debug, Clone)]
pub struct RollupOutput {
    pub rollup: String,
    pub batches: Vec<RecordBatch>,
}

impl RollupOutput {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

struct Planned {
    def: RollupDef,
    physical: Option<Arc<dyn ExecutionPlan>>,
    runs: u32,
    /// The physical plan holds state of its run (a join's hash table).
    per_batch: bool,
}

/// Whether any node of `plan` is a join.
fn has_join(plan: &dyn ExecutionPlan) -> bool {
    plan.name().contains("Join") || plan.children().iter().any(|c| has_join(c.as_ref()))
}

/// Executes every rollup of a catalog on one batch at a time.
pub(crate) struct RollupAggregator {
    ctx: SessionContext,
    slot: BatchSlot,
    dimensions: Dimensions,
    rollups: Vec<Planned>,
}

impl std::fmt::Debug for RollupAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollupAggregator")
            .field("rollups", &self.rollups.len())
            .finish()
    }
}

impl RollupAggregator {
    /// Re-plans the catalog's SQL in this aggregator's own session.
    pub(crate) async fn new(
        catalog: &SqlCatalog,
        events: SchemaRef,
    ) -> Result<Self, AggregateError> {
        let (ctx, slot) = events_context(events, &catalog.dimensions)?;
        let mut rollups = Vec::new();
        for def in &catalog.rollups {
            let plan = ctx
                .state()
                .create_logical_plan(&def.sql)
                .await
                .map_err(|e| AggregateError::Plan {
                    file: def.file.display().to_string(),
                    message: e.to_string(),
                })?;
            let mut def = def.clone();
            def.plan = ctx
                .state()
                .optimize(&plan)
                .map_err(|e| AggregateError::Plan {
                    file: def.file.display().to_string(),
                    message: e.to_string(),
                })?;
            rollups.push(Planned {
                def,
                physical: None,
                runs: 0,
                per_batch: false,
            });
        }
        Ok(RollupAggregator {
            ctx,
            slot,
            dimensions: catalog.dimensions.clone(),
            rollups,
        })
    }

    #[cfg(test)]
    pub(crate) fn defs(&self) -> impl Iterator<Item = &RollupDef> {
        self.rollups.iter().map(|p| &p.def)
    }

    /// Run every rollup over `batches` (the `events` table for this call).
    pub(crate) async fn aggregate(
        &mut self,
        batches: &[RecordBatch],
    ) -> Result<Vec<RollupOutput>, AggregateError> {
        // Every rollup of this batch sees one version of each dimension.
        self.dimensions.apply_reloaded();
        self.slot.set(
            batches
                .iter()
                .filter(|b| b.num_rows() > 0)
                .cloned()
                .collect(),
        );
        let mut outputs = Vec::with_capacity(self.rollups.len());
        for planned in &mut self.rollups {
            let name = planned.def.name.clone();
            let err = |e: DataFusionError| AggregateError::Execute {
                rollup: name.clone(),
                source: Box::new(e),
            };
            if planned.physical.is_none() || planned.runs >= REPLAN_EVERY || planned.per_batch {
                let state = self.ctx.state();
                let physical = state
                    .query_planner()
                    .create_physical_plan(&planned.def.plan, &state)
                    .await
                    .map_err(err)?;
                // A join keeps its build side in the plan: plan it afresh
                // for every batch.
                planned.per_batch = has_join(physical.as_ref());
                planned.physical = Some(physical);
                planned.runs = 0;
            }
            planned.runs += 1;
            let Some(physical) = planned.physical.clone() else {
                continue;
            };
            let raw = datafusion::physical_plan::collect(physical, self.ctx.task_ctx())
                .await
                .map_err(err)?;
            let mut canon = Vec::with_capacity(raw.len());
            for b in raw {
                if b.num_rows() > 0 {
                    canon.push(canonical(&planned.def, &b).map_err(|e| err(e.into()))?);
                }
            }
            outputs.push(RollupOutput {
                rollup: planned.def.name.clone(),
                batches: canon,
            });
        }
        self.slot.set(Vec::new());
        Ok(outputs)
    }
}

/// Cast a raw SQL output batch to the rollup's canonical column types.
pub(crate) fn canonical(
    def: &RollupDef,
    batch: &RecordBatch,
) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(def.columns.len());
    for (col, arr) in def.columns.iter().zip(batch.columns()) {
        let out = match (col.kind, arr.data_type()) {
            (ColumnKind::Int, DataType::Timestamp(unit, tz)) => {
                let ms = if *unit == TimeUnit::Millisecond {
                    arr.clone()
                } else {
                    cast(arr, &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()))?
                };
                cast(&ms, &DataType::Int64)?
            }
            (kind, _) => cast(arr, &kind.arrow())?,
        };
        arrays.push(out);
    }
    RecordBatch::try_new(def.schema.clone(), arrays)
}
