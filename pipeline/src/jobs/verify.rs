//! `tally verify --from T1 --to T2`: recompute every rollup window inside
//! `[T1, T2)` from the raw archive with the same `sql/rollups` files, and
//! compare with the serving store.
//!
//! Consistency with a live `tally run`: the list of committed raw files
//! (`tally_files`) and the serving rows are read in ONE read transaction, so
//! both are the same snapshot (SQLite WAL). Uncommitted (orphan) files are not
//! listed and are never read.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::aggregate::executor::canonical;
use crate::aggregate::{ColumnKind, RollupDef};
use crate::config::Settings;
use crate::decode::EventSchema;
use crate::sink::archive::RAW_PREFIX;
use crate::sink::serving::Cell;

/// A rollup row: key columns and measure columns, rendered for comparison.
pub type Rows = BTreeMap<Vec<String>, Vec<String>>;

#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub rollup: String,
    pub key: Vec<String>,
    pub serving: Option<Vec<String>>,
    pub recomputed: Option<Vec<String>>,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    /// (rollup, rows compared, windows [lo, hi)) per rollup checked.
    pub checked: Vec<(String, usize, i64, i64)>,
    pub files: usize,
    pub drift: Vec<Drift>,
}

use crate::error::internal as err;

/// Whole windows of width `w` inside `[from, to)`.
fn inner(from: i64, to: i64, w: i64) -> (i64, i64) {
    (from + (w - from.rem_euclid(w)) % w, to - to.rem_euclid(w))
}

/// `raw/events/dt=YYYY-MM-DD/hour=HH/...` -> the hour's start (epoch ms).
pub(crate) fn file_hour(path: &str) -> Option<i64> {
    let dt = path.split("dt=").nth(1)?.get(..10)?;
    let hh = path.split("hour=").nth(1)?.get(..2)?;
    let day = chrono::NaiveDate::parse_from_str(dt, "%Y-%m-%d").ok()?;
    let h: u32 = hh.parse().ok()?;
    Some(day.and_hms_opt(h, 0, 0)?.and_utc().timestamp_millis())
}

fn render(kind: ColumnKind, arr: &dyn Array, row: usize) -> String {
    if arr.is_null(row) {
        return "NULL".into();
    }
    match kind {
        ColumnKind::Text => arr.as_string::<i32>().value(row).to_string(),
        ColumnKind::Int => arr.as_primitive::<Int64Type>().value(row).to_string(),
        ColumnKind::Real => format!("{:?}", arr.as_primitive::<Float64Type>().value(row)),
        ColumnKind::Bytes => crate::aggregate::sketch::canonical(arr.as_binary::<i32>().value(row)),
    }
}

fn batch_rows(def: &RollupDef, b: &RecordBatch, lo: i64, hi: i64, out: &mut Rows) {
    let window = def.window_column;
    for r in 0..b.num_rows() {
        let w = b.column(window).as_primitive::<Int64Type>();
        if w.is_null(r) || w.value(r) < lo || w.value(r) >= hi {
            continue;
        }
        let cells: Vec<String> = def
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| render(c.kind, b.column(i).as_ref(), r))
            .collect();
        let (k, m) = cells.split_at(def.key_count);
        out.insert(k.to_vec(), m.to_vec());
    }
}

/// Run each rollup's SQL over exactly `files` (relative to the data
/// directory), keeping only windows inside its `[lo, hi)`. Canonical batches.
pub async fn recompute(
    settings: &Settings,
    schema: &EventSchema,
    dimensions: &crate::aggregate::Dimensions,
    defs: &[RollupDef],
    ranges: &[(i64, i64)],
    files: &[String],
    mut progress: Option<&mut super::Progress>,
) -> Result<Vec<Vec<RecordBatch>>, crate::Error> {
    let ev_lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let ev_hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let ctx = SessionContext::new();
    // Schema on read: files older than a field's declaration have it only
    // in `_extra` (decode/on_read.rs).
    let read_schema = crate::decode::read_schema(schema);
    if files.is_empty() {
        let empty = MemTable::try_new(read_schema, vec![vec![]]).map_err(err)?;
        ctx.register_table("raw", Arc::new(empty)).map_err(err)?;
    } else {
        let location = crate::sink::ArchiveLocation::open(&settings.storage)?;
        location.register(&ctx)?;
        let paths: Vec<String> = files.iter().map(|p| location.url(p)).collect();
        let df = ctx
            .read_parquet(paths, ParquetReadOptions::default().schema(&read_schema))
            .await
            .map_err(err)?;
        ctx.register_table("raw", df.into_view()).map_err(err)?;
    }
    dimensions.register(&ctx)?;
    crate::aggregate::sketch::register(&ctx);
    let select = crate::decode::events_select(schema, &ctx);
    let t = &settings.schema.time_field;
    ctx.sql(&format!(
        "CREATE VIEW events AS SELECT {select} FROM raw WHERE \"{t}\" >= to_timestamp_millis({ev_lo}) AND \"{t}\" < to_timestamp_millis({ev_hi})"
    ))
    .await
    .map_err(err)?;
    let mut out = Vec::with_capacity(defs.len());
    for (def, (lo, hi)) in defs.iter().zip(ranges) {
        let batches = ctx
            .sql(&def.sql)
            .await
            .map_err(err)?
            .collect()
            .await
            .map_err(err)?;
        let mut kept = Vec::with_capacity(batches.len());
        for b in &batches {
            let b = canonical(def, b).map_err(err)?;
            let w = b.column(def.window_column).as_primitive::<Int64Type>();
            let mask: BooleanArray = w
                .iter()
                .map(|v| Some(v.is_some_and(|v| v >= *lo && v < *hi)))
                .collect();
            kept.push(filter_record_batch(&b, &mask).map_err(err)?);
        }
        out.push(kept);
        if let Some(p) = progress.as_deref_mut() {
            p.step(&format!("recomputed {}", def.name));
        }
    }
    Ok(out)
}

/// Committed raw files whose event hour overlaps `[lo, hi)`.
pub fn files_in(all: Vec<String>, lo: i64, hi: i64) -> Vec<String> {
    all.into_iter()
        .filter(|p| {
            p.starts_with(RAW_PREFIX) && file_hour(p).is_some_and(|h| h + 3_600_000 > lo && h < hi)
        })
        .collect()
}

/// Whole windows of each rollup inside `[from, to)`.
pub fn window_ranges(defs: &[RollupDef], from: i64, to: i64) -> Vec<(i64, i64)> {
    defs.iter().map(|d| inner(from, to, d.window_ms)).collect()
}

/// `range` (whole windows of `def`) without the windows retention may have
/// pruned at `now_ms`: before the rollup's horizon, or before the raw
/// archive's (those windows have nothing left to recompute from). An empty
/// range when nothing is left.
pub fn retained(
    settings: &Settings,
    def: &RollupDef,
    (lo, hi): (i64, i64),
    now_ms: i64,
) -> (i64, i64) {
    use crate::pipeline::retention::{archive_horizon, rollup_horizon};
    let w = def.window_ms.max(1);
    let mut lo = lo;
    if let Some(h) = rollup_horizon(settings, &def.name, w, now_ms) {
        lo = lo.max(h);
    }
    if let Some(h) = archive_horizon(settings, now_ms) {
        // The first whole window from the archive's first kept day.
        lo = lo.max(h + (w - h.rem_euclid(w)) % w);
    }
    (lo.min(hi), hi)
}

/// `range` (whole windows of `def`) up to the window of the first hour in
/// it with counted events not yet in committed raw files (`open`, epoch ms
/// of hours): those windows are checked or rebuilt once their files commit.
pub fn before_open(def: &RollupDef, (lo, hi): (i64, i64), open: &[i64]) -> (i64, i64) {
    const HOUR: i64 = 3_600_000;
    let w = def.window_ms.max(1);
    match open.iter().filter(|h| **h + HOUR > lo && **h < hi).min() {
        Some(h) => (lo, hi.min((h - h.rem_euclid(w)).max(lo))),
        None => (lo, hi),
    }
}

/// The rows of `batches` (of `def`) whose window is in `[lo, hi)`.
pub fn within(
    def: &RollupDef,
    batches: &[RecordBatch],
    lo: i64,
    hi: i64,
) -> Result<Vec<RecordBatch>, crate::Error> {
    let mut kept = Vec::with_capacity(batches.len());
    for b in batches {
        let w = b.column(def.window_column).as_primitive::<Int64Type>();
        let mask: BooleanArray = w
            .iter()
            .map(|v| Some(v.is_some_and(|v| v >= lo && v < hi)))
            .collect();
        kept.push(filter_record_batch(b, &mask).map_err(err)?);
    }
    Ok(kept)
}

/// Recompute and compare. Errors only when something cannot be read.
pub async fn verify(
    settings: &Settings,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> Result<VerifyReport, crate::Error> {
    let (schema, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let store = crate::pipeline::Stages::open_store(settings, &catalog).await?;
    let defs: Vec<&RollupDef> = catalog
        .rollups
        .iter()
        .filter(|d| only.is_none_or(|n| n == d.name))
        .collect();
    if defs.is_empty() {
        return Err(crate::error::usage(format!(
            "--rollup {}: no such rollup in {}",
            only.unwrap_or(""),
            settings.sql.rollups_dir.display()
        )));
    }
    let now = chrono::Utc::now().timestamp_millis();
    let ranges: Vec<(i64, i64)> = defs
        .iter()
        .map(|d| retained(settings, d, inner(from, to, d.window_ms), now))
        .collect();
    let (ev_lo, ev_hi) = (
        ranges.iter().map(|r| r.0).min().unwrap_or(from),
        ranges.iter().map(|r| r.1).max().unwrap_or(to),
    );

    // One read transaction: committed files, serving rows and the hours not
    // yet archived from one snapshot.
    let (tables, all_files, open) = store
        .read_snapshot(&defs, &ranges, &crate::sink::raw_path_range(ev_lo, ev_hi))
        .await?;
    let ranges: Vec<(i64, i64)> = defs
        .iter()
        .zip(&ranges)
        .map(|(d, r)| before_open(d, *r, &open))
        .collect();
    let mut serving: Vec<Rows> = Vec::with_capacity(tables.len());
    for ((def, rows), (lo, hi)) in defs.iter().zip(tables).zip(&ranges) {
        let mut out = Rows::new();
        for row in rows {
            if let Some(Cell::Int(w)) = row.get(def.window_column) {
                if w < lo || w >= hi {
                    continue;
                }
            }
            let cells: Vec<String> = row
                .into_iter()
                .map(|c| match c {
                    Cell::Null => "NULL".to_string(),
                    Cell::Text(s) => s,
                    Cell::Int(v) => v.to_string(),
                    Cell::Real(v) => format!("{v:?}"),
                    Cell::Bytes(b) => crate::aggregate::sketch::canonical(&b),
                })
                .collect();
            let (k, m) = cells.split_at(def.key_count.min(cells.len()));
            out.insert(k.to_vec(), m.to_vec());
        }
        serving.push(out);
    }
    let files: Vec<String> = all_files
        .into_iter()
        .filter(|p| {
            p.starts_with(RAW_PREFIX)
                && file_hour(p).is_some_and(|h| h + 3_600_000 > ev_lo && h < ev_hi)
        })
        .collect();

    // Recompute with the same SQL, over exactly those files.
    let owned: Vec<RollupDef> = defs.iter().map(|d| (*d).clone()).collect();
    let recomputed = recompute(
        settings,
        &schema,
        &catalog.dimensions,
        &owned,
        &ranges,
        &files,
        None,
    )
    .await?;
    let mut report = VerifyReport {
        files: files.len(),
        ..Default::default()
    };
    for (((def, (lo, hi)), have), batches) in defs.iter().zip(&ranges).zip(serving).zip(recomputed)
    {
        let mut want = Rows::new();
        for b in &batches {
            batch_rows(def, b, *lo, *hi, &mut want);
        }

        report
            .checked
            .push((def.name.clone(), want.len().max(have.len()), *lo, *hi));
        let keys: std::collections::BTreeSet<&Vec<String>> =
            want.keys().chain(have.keys()).collect();
        for k in keys {
            let (s, r) = (have.get(k), want.get(k));
            if s != r {
                report.drift.push(Drift {
                    rollup: def.name.clone(),
                    key: k.clone(),
                    serving: s.cloned(),
                    recomputed: r.cloned(),
                });
            }
        }
    }
    // The last verify, for `tally status`. A store this process may not
    // write to (a read-only role) still gets its answer.
    let recorded = store
        .set_counters(&[
            ("verify_last_at_ms", chrono::Utc::now().timestamp_millis()),
            ("verify_last_from_ms", from),
            ("verify_last_to_ms", to),
            ("verify_last_drift_rows", report.drift.len() as i64),
        ])
        .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "cannot record the verify's result for tally status");
    }
    store.close().await;
    Ok(report)
}

/// `tally run`'s self-check: every `verify.interval`, verify the closed
/// windows in `[current hour - verify.lookback, current hour)` and export the
/// number of differing rows as `tally_verify_drift_rows`.
pub async fn run_periodically(
    settings: Settings,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use std::sync::atomic::Ordering;
    let interval = settings.verify.interval;
    if interval.is_zero() {
        return;
    }
    let lookback = i64::try_from(settings.verify.lookback.as_millis()).unwrap_or(i64::MAX);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut shutdown => return,
        }
        let now = chrono::Utc::now().timestamp_millis();
        let hi = now - now.rem_euclid(3_600_000);
        match verify(&settings, hi.saturating_sub(lookback), hi, None).await {
            Ok(r) => {
                metrics.verify_runs.fetch_add(1, Ordering::Relaxed);
                metrics
                    .verify_drift_rows
                    .store(r.drift.len() as i64, Ordering::Relaxed);
                if r.drift.is_empty() {
                    tracing::debug!(files = r.files, "periodic verify: no drift");
                } else {
                    tracing::error!(rows = r.drift.len(), first = ?r.drift.first(), "periodic verify: serving rollups differ from the raw archive; run tally backfill over the range");
                }
            }
            Err(e) => tracing::warn!(error = %e, "periodic verify failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_windows_and_file_hours() {
        assert_eq!(inner(90, 500, 100), (100, 500));
        assert_eq!(inner(0, 99, 100), (0, 0));
        assert_eq!(
            file_hour("raw/events/dt=2026-11-28/hour=09/t-p00000-1-2.parquet"),
            Some(1_795_856_400_000)
        );
        assert_eq!(file_hour("raw/events/nope.parquet"), None);
    }
}
