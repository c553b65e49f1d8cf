//! Command line: `tally run | serve | check | produce | verify | backfill | export | replay | report | offsets | rebuild | compact | topic | dlq`.
//! The measurement tools (`tally-bench`) live in the `tools/` crate.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::jobs::produce::ProduceSpec;

mod archive;
mod completions;
mod logging;
mod recompute;
mod report;
mod rollup;
mod sql;

pub use logging::{init_logging, init_tracing, LogFormat};
use recompute::{backfill, export, verify};

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Exact windowed counts from Kafka, with SQL rollups, a Parquet archive and a serving store"
)]
pub struct Cli {
    /// Config file layered over the embedded defaults (configs/default.toml);
    /// TALLY__SECTION__KEY environment variables override both.
    #[arg(long, short, global = true, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. `info`, `tally=debug` (RUST_LOG syntax; without it
    /// RUST_LOG is used, then `info`).
    #[arg(long, global = true, env = "TALLY_LOG")]
    pub log: Option<String>,
    /// `text` (colours only on a terminal) or `json`: one object a line,
    /// with every field (topic, partition, offsets…) as a key.
    #[arg(
        long,
        global = true,
        env = "TALLY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the topic, maintain the archive and the serving rollups, and
    /// serve the HTTP API on api.listen.
    Run,
    /// Serve the HTTP API alone from the serving store (a read replica; also
    /// accepts POST /v1/events).
    Serve,
    /// Validate the config and the rollup SQL, and print what tally derived.
    Check,
    /// Print a shell completion script: `tally completions bash >
    /// /etc/bash_completion.d/tally` (zsh: a `_tally` file on `$fpath`; fish:
    /// `~/.config/fish/completions/tally.fish`).
    Completions {
        #[arg(value_enum)]
        shell: completions::Shell,
    },
    /// Print the man page (roff): `tally man > tally.1; man ./tally.1`.
    Man,
    /// One read-only SQL query over the archive (`events`), the dead letters
    /// (`dead_letters`) and every rollup by name, as POST /v1/sql answers it;
    /// an interactive shell without QUERY.
    Sql {
        query: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: sql::SqlFormat,
    },
    /// Is the pipeline healthy? Per partition the committed offset, high
    /// watermark and lag; as_of; the last commit and verify; archive and
    /// dead-letter sizes. Exits 1 when something is wrong (a probe).
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Messages waiting with no commit for this long is a problem.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        max_commit_age: std::time::Duration,
    },
    /// Generate synthetic events (Zipf video popularity) to Kafka or a file.
    Produce(ProduceArgs),
    /// Recompute the rollup windows inside [--from, --to) from the raw archive
    /// and compare them with the serving store; exits 1 on drift.
    Verify(VerifyArgs),
    /// Recompute the rollup windows inside [--from, --to) from the raw archive
    /// and replace them in the serving store (safe while `tally run` is live).
    /// With --rollup NAME and no range: NAME's new version (or NAME) from the
    /// archive's first hour to now, a day at a time, resumable.
    Backfill(BackfillArgs),
    /// Rollup versions (sql/rollups/<name>@<N>.sql): status, diff, promote, drop.
    Rollup {
        #[command(subcommand)]
        command: rollup::RollupCommand,
    },
    /// Write the closed rollup windows of the whole UTC days in [--from, --to)
    /// to Parquet under <data_dir>/rollups/<rollup>/dt=YYYY-MM-DD/ for analysts.
    Export(VerifyArgs),
    /// The pipeline without a broker: each line of --file is one message
    /// (topic replay.<file stem>, offset = line number), exactly once and
    /// resumable; archive and serving store as with `tally run`.
    Replay {
        /// A JSON-lines file, e.g. from `tally produce --file`.
        #[arg(long)]
        file: PathBuf,
        /// Names the source explicitly (pseudo-topic `replay.<ID>`); by
        /// default a replay is `replay.<file stem>.<hash of the first line>`.
        #[arg(long)]
        source_id: Option<String>,
    },
    /// Reports for marketing, computed from the hourly rollup and the
    /// dimension tables with the SQL in sql/reports/.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// The serving store's committed offsets: show them beside the broker's
    /// watermarks, or move them (after a topic was deleted and created again).
    Offsets {
        #[command(subcommand)]
        command: OffsetsCommand,
    },
    /// Topic administration.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Recreate the serving store (rollups, offsets, file records, counters)
    /// from the archive alone, into an empty store: after losing the store,
    /// or to move from SQLite to PostgreSQL.
    Rebuild,
    /// Rewrite the small raw files an older tally wrote (a file per batch)
    /// into files of the current layout, named by the archive's manifest
    /// (safe while `tally run` is live; one compaction at a time).
    Compact {
        /// Only files of whole event hours before this time (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        before: i64,
    },
    /// The dead-letter dataset: send dead letters back through the pipeline.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// After a schema or config fix: decode the committed dead letters of
    /// kafka.topic again and count those now accepted, exactly once (a second
    /// run counts nothing twice); report what is still rejected.
    Replay {
        /// Only letters rejected at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        from: Option<i64>,
        /// Only letters rejected before this time (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        to: Option<i64>,
        /// Only letters with this rejection reason (repeatable), e.g.
        /// invalid_value.
        #[arg(long)]
        reason: Vec<String>,
        /// Decode the letters with the current config and report what a
        /// replay would accept and what it would still reject; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// One month (UTC) against the month before: totals by event type, daily
    /// trend, top videos and channels, month-over-month change.
    Monthly(MonthlyArgs),
}

#[derive(Debug, Args)]
pub struct MonthlyArgs {
    /// The month, YYYY-MM (default: the last whole month). A month in
    /// progress is compared to date with the month before.
    #[arg(long, value_parser = crate::jobs::report::Month::parse, conflicts_with_all = ["from", "to"])]
    pub month: Option<crate::jobs::report::Month>,
    /// Any range of whole UTC days instead, from this day (YYYY-MM-DD)…
    #[arg(long, value_parser = crate::jobs::report::period::parse_day, requires = "to")]
    pub from: Option<i64>,
    /// …to this one (excluded), compared with as many days before.
    #[arg(long, value_parser = crate::jobs::report::period::parse_day, requires = "from")]
    pub to: Option<i64>,
    /// CSV: start each file with a UTF-8 byte-order mark (for Excel).
    #[arg(long)]
    pub bom: bool,
    /// html: one self-contained file with SVG charts; csv: one file per table
    /// in the --out directory; md: one Markdown file.
    #[arg(long, value_enum, default_value = "html")]
    pub format: crate::jobs::report::Format,
    /// Output file (html, md) or directory (csv); default report-YYYY-MM.html,
    /// report-YYYY-MM.md or report-YYYY-MM/ (report-FROM_LAST.html… for a range).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// Per partition: the stored next offset, the broker's low and high
    /// watermarks, the lag, and what is wrong with the stored offset if
    /// anything. Exits 1 when a stored offset is beyond the end of the log.
    Show {
        /// The topic (default: kafka.topic).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Set the stored next offset. Stop `tally run` first, or let its next
    /// commit be fenced (it then re-reads from the new offset).
    Reset {
        /// The topic (default: kafka.topic).
        #[arg(long)]
        topic: Option<String>,
        /// One partition (default: every partition of the topic).
        #[arg(long)]
        partition: Option<i32>,
        /// `earliest` (the oldest message the broker holds), `latest` (only
        /// new messages) or an offset.
        #[arg(long, value_parser = crate::jobs::offsets::ResetTo::parse)]
        to: crate::jobs::offsets::ResetTo,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create the configured topic (no error if it exists).
    Create {
        /// Number of partitions; the most consumers a group can spread over.
        #[arg(long, default_value_t = 4, env = "TALLY_TOPIC_PARTITIONS")]
        partitions: i32,
    },
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Number of events.
    #[arg(long, default_value_t = 100_000, env = "TALLY_PRODUCE_COUNT")]
    pub count: u64,
    /// Events per second; 0 produces as fast as possible.
    #[arg(long, default_value_t = 0, env = "TALLY_PRODUCE_RATE")]
    pub rate: u64,
    /// Seed; the same seed gives the same events (ids, videos, types, values).
    #[arg(long, default_value_t = 1, env = "TALLY_PRODUCE_SEED")]
    pub seed: u64,
    /// Number of distinct videos.
    #[arg(long, default_value_t = 10_000)]
    pub videos: u64,
    /// Zipf exponent of video popularity (higher: more skewed).
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Comma-separated event types.
    #[arg(long, default_value = "view,like,share", value_delimiter = ',')]
    pub event_types: Vec<String>,
    /// Event times spread uniformly over this much of the recent past.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub time_spread: Duration,
    /// Fraction of late events (2 min to 1 h old).
    #[arg(long, default_value_t = 0.0)]
    pub late_fraction: f64,
    /// Fraction of malformed messages.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_fraction: f64,
    /// Draw video ids from this dimension CSV (first column video_id), e.g.
    /// data/dims/videos.csv, instead of vid-00000..; --videos is then ignored.
    #[arg(long)]
    pub dims: Option<PathBuf>,
    /// Write JSON lines to this file instead of producing to Kafka.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Range start (RFC 3339, inclusive); only whole windows inside the range are checked.
    #[arg(long, value_parser = parse_rfc3339)]
    pub from: i64,
    /// Range end (RFC 3339, exclusive).
    #[arg(long, value_parser = parse_rfc3339)]
    pub to: i64,
    /// Check only this rollup.
    #[arg(long)]
    pub rollup: Option<String>,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// Range start (RFC 3339, inclusive); only whole windows inside the range are replaced.
    #[arg(long, value_parser = parse_rfc3339, requires = "to")]
    pub from: Option<i64>,
    /// Range end (RFC 3339, exclusive).
    #[arg(long, value_parser = parse_rfc3339, requires = "from")]
    pub to: Option<i64>,
    /// Only this rollup (or version, NAME@N). Without --from/--to: NAME's
    /// newest version that is not live, over the whole archive, a day at a
    /// time, resuming where a killed run stopped.
    #[arg(long, required_unless_present = "from")]
    pub rollup: Option<String>,
    /// Print, per window, what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_rfc3339(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{e}; write an RFC 3339 time such as 2026-11-28T00:00:00Z"))
}

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    load_settings_from(cli.config.as_deref())
}

/// The effective settings: the embedded defaults, `config`, the environment.
pub fn load_settings_from(config: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Settings::load(config, std::env::vars()).context("invalid configuration")
}

/// `[kafka.properties]` as strings.
pub fn properties(s: &Settings) -> Vec<(String, String)> {
    s.kafka
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

/// Async worker threads: `TOKIO_WORKER_THREADS` if set, else one per CPU,
/// at least 2 (the committer and the HTTP API must never wait on each other).
fn worker_threads() -> usize {
    worker_threads_from(
        std::env::var("TOKIO_WORKER_THREADS").ok().as_deref(),
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    )
}

fn worker_threads_from(var: Option<&str>, cpus: usize) -> usize {
    var.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(cpus.max(2))
}

/// The exit code of a failed command (see [`crate::error::exit_code`]): the
/// first tally error in the chain says whose fault it was; anything else
/// (a bad flag value, caught before any work) is a usage error.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use crate::error::{exit_code, ErrorKind};
    let kind = err.chain().find_map(|e| {
        if let Some(e) = e.downcast_ref::<crate::Error>() {
            Some(e.kind())
        } else if let Some(e) = e.downcast_ref::<crate::sink::SinkError>() {
            Some(e.kind())
        } else if let Some(e) = e.downcast_ref::<crate::source::SourceError>() {
            Some(e.kind())
        } else if let Some(e) = e.downcast_ref::<crate::aggregate::AggregateError>() {
            Some(e.kind())
        } else if let Some(e) = e.downcast_ref::<crate::serve::ServeError>() {
            Some(e.kind())
        } else if e.downcast_ref::<crate::config::ConfigError>().is_some() {
            Some(ErrorKind::User)
        } else {
            None
        }
    });
    exit_code(kind.unwrap_or(ErrorKind::User))
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(cli.log.as_deref(), cli.log_format);
    // Made from the CLI alone: no config needed.
    match &cli.command {
        Command::Completions { shell } => return completions::print(*shell),
        Command::Man => return completions::man(),
        _ => {}
    }
    let settings = load_settings(&cli)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run => rt.block_on(run_pipeline(settings)),
        Command::Serve => rt.block_on(async {
            let stop = Stop::on_signals()?;
            crate::serve::serve_standalone(settings, stop.wait())
                .await
                .context("tally serve failed")?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check => rt.block_on(check(settings)),
        Command::Completions { .. } | Command::Man => Ok(ExitCode::SUCCESS),
        Command::Sql { query, format } => rt.block_on(sql::run(settings, query, format)),
        Command::Status {
            json,
            max_commit_age,
        } => rt.block_on(async {
            let s = crate::jobs::status::status(&settings, max_commit_age)
                .await
                .context("tally status failed")?;
            if json {
                println!("{}", s.to_json());
            } else {
                print!("{}", s.to_text());
            }
            Ok(ExitCode::from(if s.healthy() { 0 } else { 1 }))
        }),
        Command::Produce(args) => produce(&settings, args),
        Command::Verify(a) => rt.block_on(verify(settings, a, "DRIFT", "serving", "raw archive")),
        Command::Backfill(BackfillArgs {
            from: Some(from),
            to: Some(to),
            rollup,
            dry_run,
        }) => {
            let range = VerifyArgs { from, to, rollup };
            if dry_run {
                rt.block_on(async {
                    verify(settings, range, "WOULD REWRITE", "now", "after backfill").await?;
                    println!("dry run: nothing was written");
                    Ok(ExitCode::SUCCESS)
                })
            } else {
                rt.block_on(backfill(settings, range))
            }
        }
        Command::Backfill(BackfillArgs { dry_run: true, .. }) => {
            anyhow::bail!("--dry-run needs --from and --to")
        }
        Command::Backfill(a) => {
            let name = a.rollup.unwrap_or_default();
            rt.block_on(rollup::backfill(settings, &name))
        }
        Command::Rollup { command } => rt.block_on(rollup::run(settings, command)),
        Command::Export(a) => rt.block_on(export(settings, a)),
        Command::Replay { file, source_id } => rt.block_on(replay(settings, file, source_id)),
        Command::Report {
            command: ReportCommand::Monthly(a),
        } => rt.block_on(report::monthly(settings, a)),
        Command::Offsets { command } => rt.block_on(offsets(settings, command)),
        Command::Rebuild => rt.block_on(archive::rebuild(settings)),
        Command::Compact { before } => rt.block_on(archive::compact(settings, before)),
        Command::Topic {
            command: TopicCommand::Create { partitions },
        } => rt.block_on(topic_create(settings, partitions)),
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    from,
                    to,
                    reason,
                    dry_run,
                },
        } => rt.block_on(dlq_replay(
            settings,
            crate::jobs::dlq::Selection {
                from,
                to,
                reasons: reason,
                dry_run,
            },
        )),
    }
}

/// `tally run`: the pipeline, the HTTP API, the periodic verify, the stall
/// watch and retention, until SIGTERM or Ctrl-C.
async fn run_pipeline(settings: Settings) -> anyhow::Result<ExitCode> {
    // Register SIGTERM/SIGINT handlers before anything slow, so a signal
    // during startup still means a clean shutdown.
    let stop = Stop::on_signals()?;
    let stages = crate::pipeline::Stages::build(settings)
        .await
        .context("tally run cannot start")?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let api = crate::serve::ApiState::build(
        &stages.settings,
        &stages.catalog,
        &stages.schema,
        metrics.clone(),
        true,
    )
    .await
    .context("tally run cannot start the HTTP API")?;
    let server = tokio::spawn(
        crate::serve::bind(api, stop.wait())
            .await
            .context("tally run cannot start the HTTP API")?,
    );
    let checker = tokio::spawn(crate::jobs::verify::run_periodically(
        stages.settings.clone(),
        metrics.clone(),
        stop.wait(),
    ));
    let stalls = tokio::spawn(crate::source::stall::watch(
        stages.settings.clone(),
        std::sync::Arc::new(stages.store.clone()),
        metrics.clone(),
        stop.wait(),
    ));
    let pruner = tokio::spawn(crate::pipeline::retention::run_periodically(
        stages.settings.clone(),
        std::sync::Arc::new(stages.catalog.clone()),
        stages.store.clone(),
        stages.archive.clone(),
        metrics.clone(),
        stop.wait(),
    ));
    let result = crate::pipeline::run(stages, metrics, stop.wait()).await;
    stop.trigger();
    let _ = checker.await;
    let _ = pruner.await;
    let _ = stalls.await;
    let served = server.await;
    result.context("tally run failed")?;
    served
        .context("the HTTP API task failed")?
        .context("the HTTP API failed")?;
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    settings: Settings,
    file: PathBuf,
    source_id: Option<String>,
) -> anyhow::Result<ExitCode> {
    let r = crate::jobs::replay::replay(settings, file, source_id)
        .await
        .context("tally replay failed")?;
    println!(
        "{}: {} messages in {} batches ({} accepted, {} rejected; {} lines committed before were skipped) in {:.2} s, {:.0} messages/s",
        r.topic,
        r.messages,
        r.batches,
        r.accepted,
        r.rejected,
        r.skipped,
        r.seconds,
        r.messages as f64 / r.seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

async fn dlq_replay(
    settings: Settings,
    selection: crate::jobs::dlq::Selection,
) -> anyhow::Result<ExitCode> {
    let dry_run = selection.dry_run;
    let r = crate::jobs::dlq::replay(settings, selection)
        .await
        .context("tally dlq replay failed")?;
    let still: Vec<String> = r
        .still_rejected
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "dead letters of {}: {} matched, {} counted by an earlier replay, {} not resendable (payload cut at decode.dlq_payload_bytes or not UTF-8); \
         {} accepted now, {} still rejected{} ({} batches, {:.2} s)",
        r.topic,
        r.matched,
        r.already,
        r.truncated,
        r.accepted,
        r.still_rejected.values().sum::<u64>(),
        if still.is_empty() {
            String::new()
        } else {
            format!(": {}", still.join(", "))
        },
        r.batches,
        r.seconds
    );
    if dry_run {
        println!("dry run: nothing was written (\"accepted now\" is what a replay would count)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn topic_create(settings: Settings, partitions: i32) -> anyhow::Result<ExitCode> {
    let created =
        crate::jobs::topic::create(&properties(&settings), &settings.kafka.topic, partitions)
            .await
            .context("topic create failed")?;
    let what = if created {
        format!("created with {partitions} partitions")
    } else {
        "already exists".into()
    };
    println!("topic {} {what}", settings.kafka.topic);
    Ok(ExitCode::SUCCESS)
}

async fn offsets(mut settings: Settings, command: OffsetsCommand) -> anyhow::Result<ExitCode> {
    use crate::jobs::offsets;
    let (OffsetsCommand::Show { topic } | OffsetsCommand::Reset { topic, .. }) = &command;
    if let Some(t) = topic {
        settings.kafka.topic = t.clone();
    }
    let (_, catalog) = crate::pipeline::Stages::definitions(&settings)
        .await
        .context("rollup SQL is invalid")?;
    let store = crate::pipeline::Stages::open_store(&settings, &catalog).await?;
    match command {
        OffsetsCommand::Show { .. } => {
            let rows = offsets::show(&settings, &store)
                .await
                .context("offsets show failed")?;
            let (table, bad) = offsets::render(&settings.kafka.topic, &rows);
            print!("{table}");
            Ok(if bad {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        OffsetsCommand::Reset { partition, to, .. } => {
            let moved = offsets::reset(&settings, &store, partition, to)
                .await
                .context("offsets reset failed")?;
            for (p, old, new) in moved {
                let old = old.map_or_else(|| "none".to_string(), |o| o.to_string());
                println!(
                    "topic {} partition {p}: next offset {old} -> {new}",
                    settings.kafka.topic
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn check(settings: Settings) -> anyhow::Result<ExitCode> {
    let (schema, catalog) = crate::pipeline::Stages::definitions(&settings)
        .await
        .context("rollup SQL is invalid")?;
    println!(
        "# effective configuration (secrets masked)\n{}",
        settings.to_masked_toml()
    );
    println!("# event schema\n{}\n", schema.arrow);
    for (name, path, rows) in catalog.dimensions.describe() {
        println!("dimension {name} ({}): {rows} rows", path.display());
    }
    for r in &catalog.rollups {
        println!("{}\n", r.describe());
    }
    let tiers = crate::serve::Tiers::from_catalog(
        &settings.api.rollups,
        &catalog,
        &settings.retention,
        &Default::default(),
    )
    .context("the API rollups are invalid")?;
    let names: Vec<String> = tiers
        .tiers
        .iter()
        .map(|t| {
            format!(
                "{} ({})",
                t.rollup,
                crate::serve::tiers::width_name(t.width_ms)
            )
        })
        .collect();
    println!("# API\nqueries are answered from: {}\n", names.join(", "));
    match crate::jobs::report::check(&settings, &catalog)
        .await
        .context("report SQL is invalid")?
    {
        Some(queries) => {
            let names: Vec<String> = queries
                .iter()
                .map(|q| q.file.display().to_string())
                .collect();
            println!(
                "# reports
{} report queries plan: {}
",
                queries.len(),
                names.join(", ")
            );
        }
        None => println!(
            "# reports
skipped: no videos.csv and channels.csv in report.dims_dir ({})
",
            settings.report.dims_dir.display()
        ),
    }
    println!(
        "ok: config and {} rollup(s) are valid",
        catalog.rollups.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn produce(settings: &Settings, a: ProduceArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.late_fraction) || !(0.0..=1.0).contains(&a.malformed_fraction) {
        anyhow::bail!("--late-fraction and --malformed-fraction must be between 0 and 1");
    }
    if a.event_types.is_empty() {
        anyhow::bail!("--event-types must name at least one type");
    }
    let spec = ProduceSpec {
        count: a.count,
        rate: a.rate,
        seed: a.seed,
        videos: a.videos,
        zipf_exponent: a.zipf,
        event_types: a.event_types,
        time_spread: a.time_spread,
        late_fraction: a.late_fraction,
        malformed_fraction: a.malformed_fraction,
        video_ids: match &a.dims {
            Some(path) => Some(crate::jobs::produce::video_ids_from_csv(path).context("--dims")?),
            None => None,
        },
    };
    let start = std::time::Instant::now();
    let n = match &a.file {
        Some(path) => crate::jobs::produce::to_file(spec, path)
            .with_context(|| format!("writing {}", path.display()))?,
        None => crate::jobs::produce::to_kafka(
            spec,
            &properties(settings),
            &settings.kafka.topic,
            |n| {
                tracing::info!(produced = n, "progress");
            },
        )
        .context("producing to Kafka failed")?,
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "produced {n} events in {secs:.1}s ({:.0}/s)",
        n as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// One shutdown for every task: set by SIGTERM/SIGINT or by the pipeline stopping.
struct Stop {
    tx: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Stop {
    fn on_signals() -> anyhow::Result<Stop> {
        let signal = shutdown_signal().context("cannot install signal handlers")?;
        let (tx, _) = tokio::sync::watch::channel(false);
        let tx = std::sync::Arc::new(tx);
        let t = tx.clone();
        tokio::spawn(async move {
            signal.await;
            t.send_replace(true);
        });
        Ok(Stop { tx })
    }

    fn trigger(&self) {
        self.tx.send_replace(true);
    }

    fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(test)]
mod tests {
    use super::worker_threads_from;

    #[test]
    fn worker_threads_follow_the_machine_or_the_variable() {
        assert_eq!(worker_threads_from(None, 8), 8);
        assert_eq!(worker_threads_from(None, 1), 2, "never fewer than 2");
        assert_eq!(worker_threads_from(Some("6"), 2), 6);
        assert_eq!(worker_threads_from(Some("zero"), 4), 4);
        assert_eq!(worker_threads_from(Some("0"), 4), 4);
    }
}
