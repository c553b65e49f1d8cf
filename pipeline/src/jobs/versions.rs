//! Rollup versions (`sql/rollups/<name>@<N>.sql` beside `<name>.sql`):
//! `tally rollup status|diff|promote|drop`, and `tally backfill --rollup
//! NAME` without a range, which fills a version's history chunk by chunk
//! (a day, or a window when windows are longer), recording each chunk so a
//! killed backfill resumes where it stopped.

use std::collections::BTreeMap;

use crate::aggregate::rollup::{MergeRule, Value};
use crate::aggregate::{RollupDef, SqlCatalog};
use crate::config::Settings;
use crate::error::usage;
use crate::pipeline::Stages;
use crate::sink::serving::{BackfillProgress, Cell};
use crate::sink::ServingStore;

const DAY: i64 = 86_400_000;

/// One version of a rollup, as `tally rollup status` shows it.
#[derive(Debug, Clone)]
pub struct VersionStatus {
    pub rollup: String,
    pub version: u32,
    pub table: String,
    /// The file that defines it now (none: removed, tables kept).
    pub file: Option<String>,
    pub fingerprint: Option<String>,
    pub deployed_at_ms: Option<i64>,
    pub live: bool,
    pub backfill: Option<BackfillProgress>,
}

/// The version `tally rollup …` works on for `name`: the table of that
/// name, or of rollup `name` the newest version that is not live (else the
/// live one).
fn target<'a>(
    catalog: &'a SqlCatalog,
    name: &str,
    live: &BTreeMap<String, u32>,
) -> Result<&'a RollupDef, crate::Error> {
    let versions = catalog.versions(name);
    if versions.is_empty() {
        if let Some(d) = catalog.get(name) {
            return Ok(d);
        }
    }
    let current = catalog.live(name, live);
    versions
        .iter()
        .rev()
        .find(|d| Some(d.name.as_str()) != current.map(|c| c.name.as_str()))
        .copied()
        .or(current)
        .ok_or_else(|| {
            usage(format!(
                "no rollup `{name}` in {}; the rollups are: {}",
                "sql.rollups_dir",
                catalog.bases().join(", ")
            ))
        })
}

async fn open(
    settings: &Settings,
) -> Result<(crate::decode::EventSchema, SqlCatalog, ServingStore), crate::Error> {
    let (schema, catalog) = Stages::definitions(settings).await?;
    let store = Stages::open_store(settings, &catalog).await?;
    Ok((schema, catalog, store))
}

fn table_of(base: &str, version: u32) -> String {
    if version == 1 {
        base.to_string()
    } else {
        format!("{base}@{version}")
    }
}

/// Every version of every rollup: defined by a file now or still in the
/// store.
pub async fn status(settings: &Settings) -> Result<Vec<VersionStatus>, crate::Error> {
    let (_, catalog, store) = open(settings).await?;
    let live = store.live_versions().await?;
    let deployed = store.deployed().await?;
    let mut out: Vec<VersionStatus> = Vec::new();
    let mut tables: Vec<(String, u32, String)> = catalog
        .rollups
        .iter()
        .map(|d| (d.base.clone(), d.version, d.name.clone()))
        .collect();
    for d in &deployed {
        if catalog.get(&d.table).is_none() {
            let (base, version) = match d.table.split_once('@') {
                Some((b, v)) => (b.to_string(), v.parse().unwrap_or(0)),
                None => (d.table.clone(), 1),
            };
            tables.push((base, version, d.table.clone()));
        }
    }
    tables.sort();
    for (base, version, table) in tables {
        let def = catalog.get(&table);
        let stored = deployed.iter().find(|d| d.table == table);
        out.push(VersionStatus {
            live: catalog.live(&base, &live).is_some_and(|l| l.name == table),
            file: def.map(|d| d.file.display().to_string()),
            fingerprint: def
                .map(RollupDef::fingerprint)
                .or(stored.map(|s| s.fingerprint.clone())),
            deployed_at_ms: stored.map(|s| s.deployed_at_ms),
            backfill: store.backfill_progress(&table).await?,
            rollup: base,
            version,
            table,
        });
    }
    store.close().await;
    Ok(out)
}

/// What `tally rollup diff` found.
#[derive(Debug, Clone)]
pub struct DiffReport {
    pub live: String,
    pub candidate: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub keys: Vec<String>,
    pub measures: Vec<String>,
    pub same: usize,
    pub differ: usize,
    pub only_live: usize,
    pub only_candidate: usize,
    /// Up to 10 keys that differ, with both sides.
    pub examples: Vec<String>,
}

fn value(c: &Cell) -> Value {
    match c {
        Cell::Null => Value::Null,
        Cell::Text(s) => Value::Text(s.clone()),
        Cell::Int(i) => Value::Int(*i),
        Cell::Real(f) => Value::Real(*f),
        Cell::Bytes(b) => Value::Bytes(b.clone()),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Text(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Real(f) => format!("{f:?}"),
        Value::Bytes(b) => crate::aggregate::sketch::canonical(b),
    }
}

/// A version's rows over `[lo, hi)` on the common keys (the window cut to
/// `width`), measures merged by their rules.
async fn keyed(
    store: &ServingStore,
    def: &RollupDef,
    (lo, hi): (i64, i64),
    keys: &[String],
    measures: &[(String, MergeRule)],
    width: i64,
) -> Result<BTreeMap<Vec<String>, Vec<Value>>, crate::Error> {
    let rows = store.read_rows(def, lo, hi, None).await?;
    let key_at: Vec<usize> = keys
        .iter()
        .filter_map(|k| def.columns.iter().position(|c| &c.name == k))
        .collect();
    let m_at: Vec<usize> = measures
        .iter()
        .filter_map(|(m, _)| def.columns.iter().position(|c| &c.name == m))
        .collect();
    let mut out: BTreeMap<Vec<String>, Vec<Value>> = BTreeMap::new();
    for row in rows {
        let key: Vec<String> = key_at
            .iter()
            .map(|i| match (row.get(*i), *i == def.window_column) {
                (Some(Cell::Int(w)), true) => (w - w.rem_euclid(width)).to_string(),
                (Some(c), _) => show(&value(c)),
                (None, _) => String::new(),
            })
            .collect();
        let vals: Vec<Value> = m_at
            .iter()
            .map(|i| row.get(*i).map_or(Value::Null, value))
            .collect();
        match out.get_mut(&key) {
            Some(have) => {
                for ((h, v), (_, rule)) in have.iter_mut().zip(vals).zip(measures) {
                    *h = rule.merge(h, &v);
                }
            }
            None => {
                out.insert(key, vals);
            }
        }
    }
    Ok(out)
}

/// Compare the live version of `name` with its newest other version over
/// their overlap (by default: from where the candidate's history starts,
/// its backfill or its deployment, to now), on the keys and measures both
/// have.
pub async fn diff(
    settings: &Settings,
    name: &str,
    range: Option<(i64, i64)>,
) -> Result<DiffReport, crate::Error> {
    let (_, catalog, store) = open(settings).await?;
    let live = store.live_versions().await?;
    let base = catalog
        .get(name)
        .map_or(name.to_string(), |d| d.base.clone());
    let current = catalog.live(&base, &live).ok_or_else(|| {
        usage(format!(
            "no rollup `{name}`; the rollups are: {}",
            catalog.bases().join(", ")
        ))
    })?;
    let candidate = target(&catalog, name, &live)?;
    if candidate.name == current.name {
        return Err(usage(format!(
            "`{base}` has one version ({}); add sql/rollups/{base}@2.sql to make another",
            current.file.display()
        )));
    }
    let width = current.window_ms.max(candidate.window_ms);
    let now = chrono::Utc::now().timestamp_millis();
    let (from, to) = match range {
        Some(r) => r,
        None => {
            let deployed = store
                .deployed()
                .await?
                .into_iter()
                .find(|d| d.table == candidate.name)
                .map_or(now, |d| d.deployed_at_ms);
            let from = match store.backfill_progress(&candidate.name).await? {
                Some(p) if p.done_to_ms >= deployed => p.from_ms,
                // Its first whole window after deployment.
                _ => deployed - deployed.rem_euclid(width) + width,
            };
            (from, now - now.rem_euclid(width))
        }
    };
    let (lo, hi) = (
        from - from.rem_euclid(width)
            + if from.rem_euclid(width) == 0 {
                0
            } else {
                width
            },
        to - to.rem_euclid(width),
    );
    let keys: Vec<String> = current
        .keys()
        .iter()
        .map(|c| c.name.clone())
        .filter(|k| candidate.keys().iter().any(|c| &c.name == k))
        .collect();
    let measures: Vec<(String, MergeRule)> = current
        .measures()
        .iter()
        .filter_map(|c| {
            let rule = c.merge?;
            candidate
                .measures()
                .iter()
                .any(|o| o.name == c.name && o.merge == c.merge && o.kind == c.kind)
                .then(|| (c.name.clone(), rule))
        })
        .collect();
    if measures.is_empty() {
        return Err(usage(format!(
            "`{}` and `{}` have no measure in common (same name, type and merge) to compare",
            current.name, candidate.name
        )));
    }
    let a = keyed(&store, current, (lo, hi), &keys, &measures, width).await?;
    let b = keyed(&store, candidate, (lo, hi), &keys, &measures, width).await?;
    store.close().await;
    let mut report = DiffReport {
        live: current.name.clone(),
        candidate: candidate.name.clone(),
        from_ms: lo,
        to_ms: hi.max(lo),
        keys: keys.clone(),
        measures: measures.iter().map(|(m, _)| m.clone()).collect(),
        same: 0,
        differ: 0,
        only_live: 0,
        only_candidate: 0,
        examples: Vec::new(),
    };
    let shown = |v: &[Value]| v.iter().map(show).collect::<Vec<_>>().join(", ");
    for (k, va) in &a {
        match b.get(k) {
            None => report.only_live += 1,
            Some(vb) => {
                let same = va.iter().zip(vb).all(|(x, y)| show(x) == show(y));
                if same {
                    report.same += 1;
                } else {
                    report.differ += 1;
                    if report.examples.len() < 10 {
                        report.examples.push(format!(
                            "{}: live ({}) vs new ({})",
                            k.join(" | "),
                            shown(va),
                            shown(vb)
                        ));
                    }
                }
            }
        }
    }
    report.only_candidate = b.keys().filter(|k| !a.contains_key(*k)).count();
    Ok(report)
}

/// Make the newest other version of `name` (or `version`) the one the API
/// answers. Refused when its history was not backfilled, unless `force`.
/// Returns (the version before, the version now).
pub async fn promote(
    settings: &Settings,
    name: &str,
    version: Option<u32>,
    force: bool,
) -> Result<(String, String), crate::Error> {
    let (_, catalog, store) = open(settings).await?;
    let live = store.live_versions().await?;
    let base = catalog
        .get(name)
        .map_or(name.to_string(), |d| d.base.clone());
    let current = catalog.live(&base, &live).ok_or_else(|| {
        usage(format!(
            "no rollup `{name}`; the rollups are: {}",
            catalog.bases().join(", ")
        ))
    })?;
    let candidate = match version {
        Some(n) => catalog.get(&table_of(&base, n)).ok_or_else(|| {
            usage(format!(
                "`{base}` has no version {n} in sql/rollups (its versions: {})",
                catalog
                    .versions(&base)
                    .iter()
                    .map(|d| d.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?,
        None => target(&catalog, &base, &live)?,
    };
    if candidate.name == current.name {
        return Err(usage(format!(
            "version {} of `{base}` already answers the API",
            current.version
        )));
    }
    let deployed = store
        .deployed()
        .await?
        .into_iter()
        .find(|d| d.table == candidate.name)
        .map(|d| d.deployed_at_ms)
        .unwrap_or(i64::MAX);
    let backfilled = store
        .backfill_progress(&candidate.name)
        .await?
        .is_some_and(|p| p.done_to_ms >= deployed);
    if !backfilled && !force {
        return Err(usage(format!(
            "`{}` holds no history before it was deployed ({}): run `tally backfill --rollup {base}` first (or pass --force to promote it as it is)",
            candidate.name,
            crate::serve::http::fmt_time(deployed.min(chrono::Utc::now().timestamp_millis()))
        )));
    }
    store
        .set_live(
            &base,
            candidate.version,
            chrono::Utc::now().timestamp_millis(),
        )
        .await?;
    store.close().await;
    Ok((current.name.clone(), candidate.name.clone()))
}

/// Drop the tables of `spec` (`name@N`, or a table name): refused for the
/// version the API answers and for one a file still defines.
pub async fn drop_version(settings: &Settings, spec: &str) -> Result<String, crate::Error> {
    let (_, catalog, store) = open(settings).await?;
    let live = store.live_versions().await?;
    let (base, table) = match spec.split_once('@') {
        Some((b, v)) => {
            let n: u32 = v
                .parse()
                .map_err(|_| usage(format!("`{spec}`: name a version as ROLLUP@N, e.g. {b}@1")))?;
            (b.to_string(), table_of(b, n))
        }
        None => (spec.to_string(), spec.to_string()),
    };
    if let Some(d) = catalog.get(&table) {
        return Err(usage(format!(
            "{} still defines `{table}`: delete the file and restart every `tally run` first (they would create it again)",
            d.file.display()
        )));
    }
    if live.get(&base).map(|n| table_of(&base, *n)).as_deref() == Some(table.as_str()) {
        return Err(usage(format!(
            "`{table}` is the version `{base}` answers from; promote another first"
        )));
    }
    if !store.deployed().await?.iter().any(|d| d.table == table) {
        return Err(usage(format!(
            "the serving store has no rollup table `{table}`"
        )));
    }
    store.drop_rollup(&table).await?;
    store.close().await;
    Ok(table)
}

/// What a chunked backfill did.
#[derive(Debug, Clone)]
pub struct VersionBackfill {
    pub table: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Where this run started (later than `from_ms` when it resumed).
    pub started_at_ms: i64,
    pub chunks: usize,
    pub rows_written: u64,
}

/// `tally backfill --rollup NAME` without a range: the target version's
/// windows from the archive's first hour to now, a chunk at a time, each
/// chunk its own atomic replacement (safe while live), its progress
/// recorded so that a killed run resumes.
pub async fn backfill_version(
    settings: &Settings,
    name: &str,
) -> Result<VersionBackfill, crate::Error> {
    let (schema, catalog, store) = open(settings).await?;
    let live = store.live_versions().await?;
    let def = target(&catalog, name, &live)?.clone();
    let chunk = if def.window_ms >= DAY {
        def.window_ms
    } else {
        (DAY + def.window_ms - 1) / def.window_ms * def.window_ms
    };
    let now = chrono::Utc::now().timestamp_millis();
    let files = store
        .raw_files(&crate::sink::raw_path_range(0, now + DAY))
        .await?;
    let first = files
        .iter()
        .filter_map(|p| super::verify::file_hour(p))
        .min()
        .unwrap_or(now);
    let from = first - first.rem_euclid(chunk);
    let to = now - now.rem_euclid(chunk) + chunk;
    let start = match store.backfill_progress(&def.name).await? {
        Some(p) if p.from_ms <= from && p.done_to_ms > from => p.done_to_ms.min(to),
        _ => from,
    };
    let chunks = ((to - start) / chunk).max(0) as u64;
    let mut progress = super::Progress::new("backfill", chunks);
    let mut rows_written = 0;
    let mut at = start;
    while at < to {
        let next = at + chunk;
        let r = super::backfill::backfill_in(
            settings,
            &schema,
            &catalog,
            &store,
            std::slice::from_ref(&def),
            (at, next),
            None,
        )
        .await?;
        rows_written += r.rows_written;
        store
            .record_backfill(
                &def.name,
                BackfillProgress {
                    from_ms: from.min(start),
                    to_ms: to,
                    done_to_ms: next,
                },
                chrono::Utc::now().timestamp_millis(),
            )
            .await?;
        crate::failpoint::failpoint("after_backfill_chunk");
        progress.step(&format!(
            "{} done ({} rows)",
            crate::serve::http::fmt_time(at),
            r.rows_written
        ));
        at = next;
    }
    progress.finish();
    store.close().await;
    Ok(VersionBackfill {
        table: def.name.clone(),
        from_ms: from,
        to_ms: to,
        started_at_ms: start,
        chunks: chunks as usize,
        rows_written,
    })
}
