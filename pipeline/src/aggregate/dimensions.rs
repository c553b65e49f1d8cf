//! Dimension tables: CSV (with a header row) or Parquet files registered by
//! name in `[sql.dimensions]`, which rollups may join with `events`
//! (`FROM events e LEFT JOIN videos v ON e.video_id = v.video_id`).
//!
//! Each file is read whole into memory at startup. `tally run` looks for a
//! changed file (modification time or size) every `sql.dimension_reload`;
//! once a change has held still for one interval (a writer that rewrites the
//! file in place is not read half-way), it reads the file again in the
//! background, and the aggregator swaps the new rows in between batches, so
//! every rollup of one batch sees one version. A file that cannot be read, or
//! whose columns changed, keeps the old rows and is reported
//! (`tally_dimension_reload_errors_total`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use super::executor::BatchSlot;
use super::AggregateError;

/// Rows read to infer a CSV file's column types.
const CSV_INFER_ROWS: usize = 1_000_000;

/// What identifies one version of a file.
type Stamp = (Option<SystemTime>, u64);

/// The dimension tables of a deployment (none by default). Cloning shares
/// the tables.
#[derive(Debug, Clone, Default)]
pub struct Dimensions {
    tables: Arc<Vec<Dimension>>,
    reloads: Arc<AtomicU64>,
    reload_errors: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Dimension {
    name: String,
    path: PathBuf,
    schema: SchemaRef,
    /// What plans read.
    slot: BatchSlot,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The version in use (or refused).
    loaded: Stamp,
    /// A different version seen at the last check, read once it is seen again.
    seen: Option<Stamp>,
    /// Rows read but not yet swapped in.
    fresh: Option<Vec<RecordBatch>>,
    /// The file could not be looked at (reported once until it can).
    missing: bool,
}

impl Dimensions {
    /// Read every configured file. A missing or unreadable file stops
    /// startup naming its key.
    pub async fn load(config: &BTreeMap<String, PathBuf>) -> Result<Dimensions, AggregateError> {
        let mut tables = Vec::with_capacity(config.len());
        for (name, path) in config {
            let stamp = stamp(name, path)?;
            let (schema, batches) = read(name, path).await?;
            tables.push(Dimension {
                name: name.clone(),
                path: path.clone(),
                schema: schema.clone(),
                slot: BatchSlot::new(schema, batches),
                state: Mutex::new(State {
                    loaded: stamp,
                    seen: None,
                    fresh: None,
                    missing: false,
                }),
            });
        }
        Ok(Dimensions {
            tables: Arc::new(tables),
            ..Dimensions::default()
        })
    }

    /// The names and row counts, for logs and `tally check`.
    pub fn describe(&self) -> Vec<(String, PathBuf, usize)> {
        self.tables
            .iter()
            .map(|d| (d.name.clone(), d.path.clone(), d.slot.rows()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Reloads swapped in, and reloads that failed (kept the old rows).
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads.load(Ordering::Relaxed),
            self.reload_errors.load(Ordering::Relaxed),
        )
    }

    /// Register every table in `ctx` under its name.
    pub(crate) fn register(&self, ctx: &SessionContext) -> Result<(), AggregateError> {
        for d in self.tables.iter() {
            d.slot.register(ctx, &d.name)?;
        }
        Ok(())
    }

    /// Swap in the rows of files reloaded since the last call.
    pub(crate) fn apply_reloaded(&self) {
        for d in self.tables.iter() {
            let fresh = d.state.lock().ok().and_then(|mut s| s.fresh.take());
            if let Some(batches) = fresh {
                d.slot.set(batches);
                self.reloads.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Read again each file whose modification time or size changed and
    /// then held still since the previous call; the rows wait for
    /// [`Self::apply_reloaded`]. Returns the names reloaded.
    pub async fn reload_changed(&self) -> Vec<String> {
        let mut reloaded = Vec::new();
        for d in self.tables.iter() {
            let Ok((loaded, seen)) = d.state.lock().map(|s| (s.loaded, s.seen)) else {
                continue;
            };
            let looked = stamp(&d.name, &d.path);
            let was_missing = d
                .state
                .lock()
                .map(|mut s| std::mem::replace(&mut s.missing, looked.is_err()))
                .unwrap_or(false);
            let now = match looked {
                Ok(now) => now,
                Err(e) => {
                    if !was_missing {
                        self.reload_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "dimension table not reloaded; rollups keep its previous rows");
                    }
                    continue;
                }
            };
            if now == loaded || seen != Some(now) {
                // Unchanged, or changed since the last look: look again.
                if let Ok(mut s) = d.state.lock() {
                    s.seen = (now != loaded).then_some(now);
                }
                continue;
            }
            let read = read(&d.name, &d.path).await;
            if stamp(&d.name, &d.path).ok() != Some(now) {
                // Written to while read: wait until it holds still.
                continue;
            }
            match read {
                Ok((schema, _)) if schema.fields() != d.schema.fields() => {
                    self.reload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(dimension = %d.name, path = %d.path.display(), was = ?field_list(&d.schema), now = ?field_list(&schema),
                        "dimension table not reloaded: its columns changed, which the planned rollups cannot follow; restore the columns, or restart tally to plan with the new ones");
                    if let Ok(mut s) = d.state.lock() {
                        s.loaded = now;
                        s.seen = None;
                    }
                }
                Ok((_, batches)) => {
                    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                    tracing::info!(dimension = %d.name, path = %d.path.display(), rows, "dimension table reloaded; rollups use it from the next batch");
                    if let Ok(mut s) = d.state.lock() {
                        s.loaded = now;
                        s.seen = None;
                        s.fresh = Some(batches);
                    }
                    reloaded.push(d.name.clone());
                }
                Err(e) => {
                    // The file held still, so this version is bad: not
                    // read again until it changes.
                    self.reload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "dimension table not reloaded; rollups keep its previous rows");
                    if let Ok(mut s) = d.state.lock() {
                        s.loaded = now;
                        s.seen = None;
                    }
                }
            }
        }
        reloaded
    }

    /// `tally run`'s reloading task, stopped when the guard drops.
    pub(crate) fn watch(&self, every: Duration) -> Watch {
        let dims = self.clone();
        let every = every.max(Duration::from_millis(100));
        Watch(tokio::spawn(async move {
            if dims.is_empty() {
                return;
            }
            loop {
                tokio::time::sleep(every).await;
                dims.reload_changed().await;
            }
        }))
    }
}

/// Aborts the reloading task when dropped.
#[derive(Debug)]
pub(crate) struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn field_list(schema: &SchemaRef) -> Vec<String> {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect()
}

fn failed(name: &str, path: &Path, message: String) -> AggregateError {
    AggregateError::Dimension {
        name: name.to_string(),
        path: path.display().to_string(),
        message,
    }
}

fn stamp(name: &str, path: &Path) -> Result<Stamp, AggregateError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        failed(
            name,
            path,
            format!(
                "cannot read the file ({e}); point the key at a CSV or Parquet file, or remove it"
            ),
        )
    })?;
    Ok((meta.modified().ok(), meta.len()))
}

/// The file's rows, with the column types of its Parquet schema or, for a
/// CSV, inferred from its rows.
async fn read(name: &str, path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>), AggregateError> {
    let text = path
        .to_str()
        .ok_or_else(|| failed(name, path, "the path is not UTF-8".into()))?;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ctx = SessionContext::new();
    let df = match ext.as_str() {
        "csv" => {
            ctx.read_csv(
                text,
                CsvReadOptions::new()
                    .has_header(true)
                    .schema_infer_max_records(CSV_INFER_ROWS),
            )
            .await
        }
        "parquet" => ctx.read_parquet(text, ParquetReadOptions::default()).await,
        _ => {
            return Err(failed(
                name,
                path,
                "the file must end in .csv (with a header row) or .parquet".into(),
            ))
        }
    }
    .map_err(|e| failed(name, path, e.to_string()))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df
        .collect()
        .await
        .map_err(|e| failed(name, path, e.to_string()))?;
    Ok((schema, batches))
}

#[cfg(test)]
mod tests;
