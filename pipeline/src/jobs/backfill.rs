//! `tally backfill --from T1 --to T2`: recompute the rollup windows inside
//! `[T1, T2)` from the raw archive and replace them in the serving store.
//!
//! Safe while `tally run` is live (see ARCHITECTURE.md, "Backfill"):
//! 1. snapshot S = the committed raw files for the range, and recompute R(S)
//!    without holding any lock;
//! 2. `BEGIN IMMEDIATE` (the live writer now waits), list the committed files
//!    again, F ⊇ S; recompute R(F \ S), the batches committed meanwhile;
//! 3. in that transaction delete the windows, write R(S) and merge R(F \ S),
//!    then commit. Readers see the old windows or the new ones.
//!
//! The result equals one pass over every committed event in the windows,
//! because rollups merge. A second run changes nothing.

use crate::aggregate::{RollupDef, RollupOutput};
use crate::config::Settings;
use crate::sink::ServingStore;

use super::verify::{files_in, recompute, window_ranges};

#[derive(Debug, Default)]
pub struct BackfillReport {
    pub files: usize,
    pub files_committed_meanwhile: usize,
    pub rows_deleted: u64,
    pub rows_written: u64,
    /// (rollup, lo, hi)
    pub windows: Vec<(String, i64, i64)>,
}

pub async fn backfill(
    settings: &Settings,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> Result<BackfillReport, crate::Error> {
    let (schema, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let defs: Vec<RollupDef> = catalog
        .rollups
        .iter()
        .filter(|d| only.is_none_or(|n| n == d.name))
        .cloned()
        .collect();
    if defs.is_empty() {
        return Err(crate::error::usage(format!(
            "--rollup {}: no such rollup in {}",
            only.unwrap_or(""),
            settings.sql.rollups_dir.display()
        )));
    }
    let store = crate::pipeline::Stages::open_store(settings, &catalog).await?;
    let mut progress = super::Progress::new("backfill", defs.len() as u64 + 2);
    let report = backfill_in(
        settings,
        &schema,
        &catalog,
        &store,
        &defs,
        (from, to),
        Some(&mut progress),
    )
    .await;
    progress.finish();
    store.close().await;
    report
}

/// Backfill `defs` over `[from, to)` in an open store (see the module docs);
/// `progress` gets a step per rollup recomputed, and two more.
pub(crate) async fn backfill_in(
    settings: &Settings,
    schema: &crate::decode::EventSchema,
    catalog: &crate::aggregate::SqlCatalog,
    store: &ServingStore,
    defs: &[RollupDef],
    (from, to): (i64, i64),
    mut progress: Option<&mut super::Progress>,
) -> Result<BackfillReport, crate::Error> {
    // Windows retention has pruned (or may prune now) are left alone: their
    // rows are gone from the store, or their events from the archive.
    let now = chrono::Utc::now().timestamp_millis();
    let ranges: Vec<(i64, i64)> = window_ranges(defs, from, to)
        .into_iter()
        .zip(defs)
        .map(|(r, d)| super::verify::retained(settings, d, r, now))
        .collect();
    let (lo, hi) = (
        ranges.iter().map(|r| r.0).min().unwrap_or(from),
        ranges.iter().map(|r| r.1).max().unwrap_or(to),
    );
    if store.dialect() == crate::sink::serving::Dialect::Sqlite && chunkable(defs).is_some() {
        return pipelined(settings, schema, catalog, store, defs, &ranges, progress).await;
    }
    // Windows with counted events not yet in committed raw files wait for
    // those files (a backfill now would lose the events).
    let open = store.open_hours().await?;
    let ranges: Vec<(i64, i64)> = defs
        .iter()
        .zip(&ranges)
        .map(|(d, r)| super::verify::before_open(d, *r, &open))
        .collect();

    // 1. Snapshot and recompute, no lock held.
    // Only the files of the window's hours: a range of the file index.
    let files = crate::sink::raw_path_range(lo, hi);
    let snapshot = files_in(store.raw_files(&files).await?, lo, hi);
    if let Some(p) = progress.as_deref_mut() {
        p.step(&format!("{} committed raw files to read", snapshot.len()));
    }
    let base = recompute(
        settings,
        schema,
        &catalog.dimensions,
        defs,
        &ranges,
        &snapshot,
        progress.as_deref_mut(),
    )
    .await?;

    // 2. Lock, catch up with batches committed meanwhile.
    let mut tx = store.begin_replace().await?;
    let now = files_in(ServingStore::raw_files_in(&mut tx, &files).await?, lo, hi);
    // An hour may have opened meanwhile (a late event): its windows are left alone.
    let open = ServingStore::open_hours_in(&mut tx).await?;
    let ranges: Vec<(i64, i64)> = defs
        .iter()
        .zip(&ranges)
        .map(|(d, r)| super::verify::before_open(d, *r, &open))
        .collect();
    let known: std::collections::HashSet<&String> = snapshot.iter().collect();
    let delta_files: Vec<String> = now.iter().filter(|f| !known.contains(f)).cloned().collect();
    let delta = if delta_files.is_empty() {
        Vec::new()
    } else {
        recompute(
            settings,
            schema,
            &catalog.dimensions,
            defs,
            &ranges,
            &delta_files,
            None,
        )
        .await?
    };

    // 3. Replace, in the same transaction.
    let mut outputs: Vec<RollupOutput> = Vec::new();
    let mut rows_written = 0;
    for (i, def) in defs.iter().enumerate() {
        let (lo, hi) = ranges[i];
        for part in [base.get(i), delta.get(i)].into_iter().flatten() {
            let part = super::verify::within(def, part, lo, hi)?;
            rows_written += part.iter().map(|b| b.num_rows() as u64).sum::<u64>();
            outputs.push(RollupOutput {
                rollup: def.name.clone(),
                batches: part,
            });
        }
    }
    let replace: Vec<(RollupDef, i64, i64)> = defs
        .iter()
        .zip(&ranges)
        .filter(|(_, r)| r.0 < r.1)
        .map(|(d, r)| (d.clone(), r.0, r.1))
        .collect();
    let rows_deleted = store.replace_windows(tx, &replace, &outputs).await?;
    if let Some(p) = progress {
        p.step("windows replaced");
    }
    Ok(BackfillReport {
        files: snapshot.len(),
        files_committed_meanwhile: delta_files.len(),
        rows_deleted,
        rows_written,
        windows: replace
            .iter()
            .map(|(d, a, b)| (d.name.clone(), *a, *b))
            .collect(),
    })
}

const HOUR: i64 = 3_600_000;

/// The width of the chunks a pipelined backfill recomputes one at a time:
/// the widest window (at least an hour, the archive's file granularity), if
/// every window divides it (a window never spans two chunks).
fn chunkable(defs: &[RollupDef]) -> Option<i64> {
    let chunk = defs.iter().map(|d| d.window_ms).max()?.max(HOUR);
    defs.iter()
        .all(|d| d.window_ms > 0 && chunk % d.window_ms == 0)
        .then_some(chunk)
}

/// SQLite: the window replacement under one `BEGIN IMMEDIATE` from the
/// start, fed chunk by chunk: DataFusion recomputes the next chunk of hours
/// while the store's thread inserts the previous one (on 2 cores the two
/// overlap). The lock is held about as long as the one-shot path holds it
/// (its insert alone takes most of the time); no catch-up is needed, since
/// the committed files are listed under the lock.
async fn pipelined(
    settings: &Settings,
    schema: &crate::decode::EventSchema,
    catalog: &crate::aggregate::SqlCatalog,
    store: &ServingStore,
    defs: &[RollupDef],
    ranges: &[(i64, i64)],
    mut progress: Option<&mut super::Progress>,
) -> Result<BackfillReport, crate::Error> {
    let chunk = chunkable(defs).unwrap_or(HOUR);
    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let mut tx = store.begin_replace().await?;
    let range = crate::sink::raw_path_range(lo, hi);
    let files = files_in(ServingStore::raw_files_in(&mut tx, &range).await?, lo, hi);
    let open = ServingStore::open_hours_in(&mut tx).await?;
    let ranges: Vec<(i64, i64)> = defs
        .iter()
        .zip(ranges)
        .map(|(d, r)| super::verify::before_open(d, *r, &open))
        .collect();
    if let Some(p) = progress.as_deref_mut() {
        p.step(&format!("{} committed raw files to read", files.len()));
    }
    let replace: Vec<(RollupDef, i64, i64)> = defs
        .iter()
        .zip(&ranges)
        .filter(|(_, r)| r.0 < r.1)
        .map(|(d, r)| (d.clone(), r.0, r.1))
        .collect();
    let Some(stream) = store.replace_windows_streamed(tx, replace.clone()) else {
        return Err(crate::error::internal(
            "a streamed replacement needs SQLite",
        ));
    };
    let mut rows_written = 0;
    let mut fed = Ok(());
    let mut at = lo - lo.rem_euclid(chunk);
    while at < hi && fed.is_ok() {
        let end = at + chunk;
        let part: Vec<(i64, i64)> = ranges
            .iter()
            .map(|(a, b)| ((*a).max(at), (*b).min(end)))
            .map(|(a, b)| if a < b { (a, b) } else { (a, a) })
            .collect();
        let chunk_files = files_in(files.clone(), at, end);
        if part.iter().any(|(a, b)| a < b) && !chunk_files.is_empty() {
            fed = match recompute(
                settings,
                schema,
                &catalog.dimensions,
                defs,
                &part,
                &chunk_files,
                None,
            )
            .await
            {
                Ok(parts) => {
                    let outputs: Vec<RollupOutput> = defs
                        .iter()
                        .zip(parts)
                        .map(|(d, batches)| RollupOutput {
                            rollup: d.name.clone(),
                            batches,
                        })
                        .collect();
                    rows_written += outputs.iter().map(|o| o.num_rows() as u64).sum::<u64>();
                    // A closed channel: the writer failed; its error follows.
                    let _ = stream.send.send(Some(outputs)).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        at = end;
    }
    if fed.is_ok() {
        let _ = stream.send.send(None).await;
    }
    drop(stream.send);
    let writer = stream.writer;
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(crate::error::internal)?
        .map_err(|_| crate::error::internal("the backfill's store thread panicked"))?;
    fed?;
    let rows_deleted = written?;
    if let Some(p) = progress.as_deref_mut() {
        for d in defs {
            p.step(&format!("recomputed {}", d.name));
        }
    }
    if let Some(p) = progress {
        p.step("windows replaced");
    }
    Ok(BackfillReport {
        files: files.len(),
        files_committed_meanwhile: 0,
        rows_deleted,
        rows_written,
        windows: replace
            .iter()
            .map(|(d, a, b)| (d.name.clone(), *a, *b))
            .collect(),
    })
}
