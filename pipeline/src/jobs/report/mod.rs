//! `tally report monthly --month YYYY-MM` (or `--from/--to`, any whole
//! days; `GET /v1/reports/monthly/…`): the marketing report.
//!
//! Every `*.sql` file in `report.sql_dir` is one table of the report, run in
//! file-name order by DataFusion over:
//! - the hourly rollup (`report.rollup`, default `hour_video_events`) for the
//!   period and the one compared with (see [`period`]: a period in progress
//!   is compared to date), read from the serving store;
//! - `videos` and `channels`, the dimension CSVs in `report.dims_dir`;
//! - `report_month`, one row: `month_start`, `month_end`, `prev_start`
//!   (timestamps, UTC; the period's, whether a month or not);
//! - `report_days`, a calendar: one row (`day`, timestamp; `partial`, the
//!   day `as_of` falls in) per UTC day of the period begun by the data's
//!   `as_of`.
//!
//! A file's header comments name its title and chart:
//! `-- title: Top 10 videos`, `-- note: ...`,
//! `-- chart: bar label=COLUMN value=COLUMN` or
//! `-- chart: line x=COLUMN series=COLUMN y=COLUMN`.
//! The renderers ([`render`]) turn the tables into one HTML file (SVG charts,
//! no scripts, no network), one CSV file per table, or Markdown.

pub mod period;
pub mod render;
#[cfg(test)]
mod tests;

pub use period::{Period, Span};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use datafusion::arrow::array::{ArrayRef, BooleanArray, TimestampMillisecondArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{CsvReadOptions, SessionContext};

use crate::aggregate::SqlCatalog;
use crate::config::Settings;

use super::export::{arrow_schema, load_windows};

/// A month, `[start, end)` in UTC milliseconds, and the month before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    /// Parse `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Month, String> {
        let bad = || format!("--month {s:?}: expected YYYY-MM, e.g. 2026-11");
        let (y, m) = s.trim().split_once('-').ok_or_else(bad)?;
        let (year, month): (i32, u32) =
            (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if y.len() != 4 || m.len() != 2 || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Month { year, month })
    }
    /// The last whole month before `now_ms`.
    pub fn previous_to(now_ms: i64) -> Month {
        let d = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
        Month {
            year: d.year(),
            month: d.month(),
        }
        .prev()
    }
    pub fn prev(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }
    pub fn start_ms(self) -> i64 {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(0, |t| Utc.from_utc_datetime(&t).timestamp_millis())
    }
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }
    /// `November 2026`.
    pub fn long_name(self) -> String {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .map_or_else(|| self.to_string(), |d| d.format("%B %Y").to_string())
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// How a table is drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// Horizontal bars: one per row.
    Bar { label: String, value: String },
    /// One line per distinct `series` value over the `x` values.
    Line {
        x: String,
        series: String,
        y: String,
    },
}

/// One report query: `sql/reports/NN_name.sql`.
#[derive(Debug, Clone)]
pub struct ReportQuery {
    /// File stem without the ordering prefix: `top_videos`.
    pub name: String,
    pub file: PathBuf,
    pub title: String,
    pub note: Option<String>,
    pub chart: Option<Chart>,
    pub sql: String,
}

impl ReportQuery {
    /// Parse the header comments of a report SQL file.
    pub fn parse(file: &Path, sql: &str) -> Result<ReportQuery, String> {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("report")
            .to_string();
        let name = match stem.split_once('_') {
            Some((prefix, rest))
                if !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_digit()) =>
            {
                rest.to_string()
            }
            _ => stem.clone(),
        };
        let mut q = ReportQuery {
            title: name.replace('_', " "),
            name,
            file: file.to_path_buf(),
            note: None,
            chart: None,
            sql: sql.to_string(),
        };
        for line in sql.lines().map(str::trim).filter(|l| l.starts_with("--")) {
            let Some((key, value)) = line.trim_start_matches('-').trim().split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "title" => q.title = value.to_string(),
                "note" => q.note = Some(value.to_string()),
                "chart" => {
                    q.chart = Some(
                        parse_chart(value)
                            .map_err(|e| format!("{}: `-- chart: {value}`: {e}", file.display()))?,
                    )
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

fn parse_chart(spec: &str) -> Result<Chart, String> {
    let mut words = spec.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let args: std::collections::BTreeMap<&str, &str> =
        words.filter_map(|w| w.split_once('=')).collect();
    let get = |k: &str| {
        args.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| format!("missing {k}=COLUMN"))
    };
    match kind {
        "bar" => Ok(Chart::Bar { label: get("label")?, value: get("value")? }),
        "line" => Ok(Chart::Line { x: get("x")?, series: get("series")?, y: get("y")? }),
        other => Err(format!("unknown chart kind {other:?}; use `bar label=COL value=COL` or `line x=COL series=COL y=COL`")),
    }
}

/// A computed table of the report.
#[derive(Debug, Clone)]
pub struct ReportTable {
    pub query: ReportQuery,
    pub batch: RecordBatch,
}

/// A computed monthly report.
#[derive(Debug, Clone)]
pub struct MonthlyReport {
    pub period: Period,
    /// Up to when the serving store is complete (`as_of`), if known.
    pub as_of: Option<i64>,
    pub generated_at: i64,
    pub rollup: String,
    pub tables: Vec<ReportTable>,
}

use crate::error::internal as err;

/// Load the report queries of `dir`, in file-name order.
pub fn load_queries(dir: &Path) -> Result<Vec<ReportQuery>, crate::Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        crate::error::usage(format!(
            "{}: cannot read the report directory ({e}); set report.sql_dir",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(crate::error::usage(format!(
            "{}: no *.sql report queries; set report.sql_dir",
            dir.display()
        )));
    }
    files
        .iter()
        .map(|f| {
            let sql = std::fs::read_to_string(f)
                .map_err(|e| crate::error::usage(format!("{}: {e}", f.display())))?;
            ReportQuery::parse(f, &sql).map_err(crate::error::usage)
        })
        .collect()
}

fn ts_field(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )
}

/// Register `videos`, `channels`, `report_month` and `report_days` in `ctx`.
async fn register_inputs(
    ctx: &SessionContext,
    dims: &Path,
    period: &Period,
) -> Result<(), crate::Error> {
    let utf8 = |n: &str| Field::new(n, DataType::Utf8, true);
    let videos = Schema::new(vec![
        utf8("video_id"),
        utf8("title"),
        utf8("channel_id"),
        Field::new(
            "published_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]);
    let channels = Schema::new(vec![utf8("channel_id"), utf8("name")]);
    for (table, schema) in [("videos", &videos), ("channels", &channels)] {
        let path = dims.join(format!("{table}.csv"));
        if !path.is_file() {
            return Err(crate::error::usage(format!(
                "{}: dimension table missing; set report.dims_dir to a directory with videos.csv and channels.csv",
                path.display()
            )));
        }
        let path_str = path
            .to_str()
            .ok_or_else(|| err(format!("{}: path is not UTF-8", path.display())))?;
        ctx.register_csv(
            table,
            path_str,
            CsvReadOptions::new().has_header(true).schema(schema),
        )
        .await
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    }
    let schema = Arc::new(Schema::new(vec![
        ts_field("month_start"),
        ts_field("month_end"),
        ts_field("prev_start"),
    ]));
    let col = |ms: i64| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(vec![ms]).with_timezone("UTC"))
    };
    let row = RecordBatch::try_new(
        schema.clone(),
        vec![col(period.start), col(period.end), col(period.prev_start)],
    )
    .map_err(err)?;
    let table = MemTable::try_new(schema, vec![vec![row]]).map_err(err)?;
    ctx.register_table("report_month", Arc::new(table))
        .map_err(err)?;
    let schema = Arc::new(Schema::new(vec![
        ts_field("day"),
        Field::new("partial", DataType::Boolean, false),
    ]));
    // Days not begun by `as_of` are left out: a period in progress has no
    // future days, and the day `as_of` falls in is partial.
    let (days, partial): (Vec<i64>, Vec<bool>) = period.days().into_iter().unzip();
    let days = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(TimestampMillisecondArray::from(days).with_timezone("UTC")),
            Arc::new(BooleanArray::from(partial)),
        ],
    )
    .map_err(err)?;
    let table = MemTable::try_new(schema, vec![vec![days]]).map_err(err)?;
    ctx.register_table("report_days", Arc::new(table))
        .map_err(err)?;
    Ok(())
}

/// Build the monthly report for `month` from the serving store.
pub async fn monthly(settings: &Settings, month: Month) -> Result<MonthlyReport, crate::Error> {
    build(settings, Span::Month(month)).await
}

/// Build the report for `span` from the serving store.
pub async fn build(settings: &Settings, span: Span) -> Result<MonthlyReport, crate::Error> {
    let queries = load_queries(&settings.report.sql_dir)?;
    let (_, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let def = catalog
        .rollups
        .iter()
        .find(|d| d.name == settings.report.rollup)
        .ok_or_else(|| {
            crate::error::usage(format!(
                "report.rollup = {:?}: no such rollup in {}; name one of: {}",
                settings.report.rollup,
                settings.sql.rollups_dir.display(),
                catalog
                    .rollups
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    // Reads only (a read replica's role may not write).
    let store = crate::sink::ServingStore::open_existing(
        &settings.serving_url(),
        &catalog.rollups,
        settings.serving.window_index,
    )
    .await?;
    let as_of = store.as_of(&settings.kafka.topic).await?;
    let period = Period::new(span, as_of);
    // The period compared with, up to `prev_end` only (to date), then the period.
    let mut rows = Vec::new();
    for (lo, hi) in [
        (period.prev_start, period.prev_end),
        (period.start, period.end),
    ] {
        if lo < hi {
            rows.extend(load_windows(&store, def, lo, hi, None).await?);
        }
    }
    store.close().await;

    let ctx = SessionContext::new();
    let rollup_schema = arrow_schema(def);
    let rollup =
        MemTable::try_new(rollup_schema.clone(), vec![rows.into_iter().collect()]).map_err(err)?;
    ctx.register_table(def.name.as_str(), Arc::new(rollup))
        .map_err(err)?;
    register_inputs(&ctx, &settings.report.dims_dir, &period).await?;
    let tables = run_queries(&ctx, queries).await?;
    Ok(MonthlyReport {
        period,
        as_of,
        generated_at: Utc::now().timestamp_millis(),
        rollup: def.name.clone(),
        tables,
    })
}

/// Plan `query` and check that its chart names returned columns.
async fn plan(
    ctx: &SessionContext,
    query: &ReportQuery,
) -> Result<datafusion::dataframe::DataFrame, crate::Error> {
    let named =
        |e: &dyn std::fmt::Display| crate::error::usage(format!("{}: {e}", query.file.display()));
    let df = ctx.sql(&query.sql).await.map_err(|e| named(&e))?;
    if let Some(chart) = &query.chart {
        let cols: Vec<&String> = match chart {
            Chart::Bar { label, value } => vec![label, value],
            Chart::Line { x, series, y } => vec![x, series, y],
        };
        for c in cols {
            if df.schema().as_arrow().index_of(c).is_err() {
                return Err(named(&format!(
                    "`-- chart:` names column {c:?}, which the query does not return"
                )));
            }
        }
    }
    Ok(df)
}

async fn run_queries(
    ctx: &SessionContext,
    queries: Vec<ReportQuery>,
) -> Result<Vec<ReportTable>, crate::Error> {
    let mut tables = Vec::with_capacity(queries.len());
    for query in queries {
        let df = plan(ctx, &query).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df
            .collect()
            .await
            .map_err(|e| err(format!("{}: {e}", query.file.display())))?;
        let batch = concat_batches(&schema, &batches)
            .map_err(|e| err(format!("{}: {e}", query.file.display())))?;
        tables.push(ReportTable { query, batch });
    }
    Ok(tables)
}

/// For `tally check`: load and plan every report query against empty
/// tables (no serving store needed). `Ok(None)` when the dimension tables
/// are not there (reports not set up here).
pub async fn check(
    settings: &Settings,
    catalog: &SqlCatalog,
) -> Result<Option<Vec<ReportQuery>>, crate::Error> {
    let dims = &settings.report.dims_dir;
    if !dims.join("videos.csv").is_file() || !dims.join("channels.csv").is_file() {
        return Ok(None);
    }
    let queries = load_queries(&settings.report.sql_dir)?;
    let def = catalog
        .rollups
        .iter()
        .find(|d| d.name == settings.report.rollup)
        .ok_or_else(|| {
            crate::error::usage(format!(
                "report.rollup = {:?}: no such rollup in {}",
                settings.report.rollup,
                settings.sql.rollups_dir.display()
            ))
        })?;
    let ctx = SessionContext::new();
    let empty = MemTable::try_new(arrow_schema(def), vec![vec![]]).map_err(err)?;
    ctx.register_table(def.name.as_str(), Arc::new(empty))
        .map_err(err)?;
    let last = Span::Month(Month::previous_to(Utc::now().timestamp_millis()));
    register_inputs(&ctx, dims, &Period::new(last, None)).await?;
    for q in &queries {
        plan(&ctx, q).await?;
    }
    Ok(Some(queries))
}

/// Output format of `tally report monthly`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One self-contained HTML file with SVG charts.
    Html,
    /// One CSV file per table, in the --out directory.
    Csv,
    /// One Markdown file.
    Md,
}

/// Write `report` to `out`; returns the files written.
/// (`bom`: CSV files start with a UTF-8 byte-order mark).
pub fn write(
    report: &MonthlyReport,
    format: Format,
    out: &Path,
    bom: bool,
) -> Result<Vec<PathBuf>, crate::Error> {
    let io = |p: &Path, e: std::io::Error| err(format!("{}: {e}", p.display()));
    let write_file = |path: &Path, text: String| -> Result<(), crate::Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        // Written whole, then renamed: a reader never sees half a report.
        let tmp = path.with_extension("inprogress");
        std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    };
    match format {
        Format::Html => {
            write_file(out, render::html(report))?;
            Ok(vec![out.to_path_buf()])
        }
        Format::Md => {
            write_file(out, render::markdown(report))?;
            Ok(vec![out.to_path_buf()])
        }
        Format::Csv => {
            let mut files = Vec::new();
            for t in &report.tables {
                let path = out.join(format!("{}.csv", t.query.name));
                write_file(&path, render::csv(&t.batch, bom))?;
                files.push(path);
            }
            Ok(files)
        }
    }
}
