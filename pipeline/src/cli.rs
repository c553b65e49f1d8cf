//! Command line: `tally run | check | produce | topic create`.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::jobs::produce::ProduceSpec;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Exact windowed counts from Kafka, with SQL rollups, a Parquet archive and a serving store")]
pub struct Cli {
    /// Config file layered over the embedded defaults (configs/default.toml);
    /// TALLY__SECTION__KEY environment variables override both.
    #[arg(long, short, global = true, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. `info`, `tally=debug` (RUST_LOG syntax).
    #[arg(long, global = true, env = "TALLY_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the topic and maintain the archive and the serving rollups.
    Run,
    /// Validate the config and the rollup SQL, and print what tally derived.
    Check,
    /// Generate synthetic events (Zipf video popularity) to Kafka or a file.
    Produce(ProduceArgs),
    /// Topic administration.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
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
    /// Write JSON lines to this file instead of producing to Kafka.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    Settings::load(cli.config.as_deref(), std::env::vars()).context("invalid configuration")
}

fn properties(s: &Settings) -> Vec<(String, String)> {
    s.kafka.properties.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_tracing(&cli.log);
    let settings = load_settings(&cli)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run => rt.block_on(async {
            // Register SIGTERM/SIGINT handlers before anything slow, so a signal
            // during startup still means a clean shutdown.
            let shutdown = shutdown_signal().context("cannot install signal handlers")?;
            crate::pipeline::run(settings, shutdown).await.context("tally run failed")?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check => rt.block_on(check(settings)),
        Command::Produce(args) => produce(&settings, args),
        Command::Topic { command: TopicCommand::Create { partitions } } => rt.block_on(async {
            let created = crate::jobs::topic::create(&properties(&settings), &settings.kafka.topic, partitions)
                .await
                .map_err(anyhow::Error::msg)
                .context("topic create failed")?;
            println!(
                "topic {} {}",
                settings.kafka.topic,
                if created { format!("created with {partitions} partitions") } else { "already exists".into() }
            );
            Ok(ExitCode::SUCCESS)
        }),
    }
}

async fn check(settings: Settings) -> anyhow::Result<ExitCode> {
    use crate::aggregate::SqlCatalog;
    use crate::decode::EventSchema;
    let schema = EventSchema::from_config(&settings.schema)?;
    let catalog = SqlCatalog::load(&settings.sql.rollups_dir, schema.arrow.clone(), &settings.schema.time_field)
        .await
        .context("rollup SQL is invalid")?;
    println!("# effective configuration (secrets masked)\n{}", settings.to_masked_toml());
    println!("# event schema\n{}\n", schema.arrow);
    for r in &catalog.rollups {
        println!("{}\n", r.describe());
    }
    println!("ok: config and {} rollup(s) are valid", catalog.rollups.len());
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
    };
    let start = std::time::Instant::now();
    let n = match &a.file {
        Some(path) => crate::jobs::produce::to_file(spec, path)
            .with_context(|| format!("writing {}", path.display()))?,
        None => crate::jobs::produce::to_kafka(spec, &properties(settings), &settings.kafka.topic, |n| {
            tracing::info!(produced = n, "progress");
        })
        .map_err(anyhow::Error::msg)
        .context("producing to Kafka failed")?,
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!("produced {n} events in {secs:.1}s ({:.0}/s)", n as f64 / secs.max(1e-9));
    Ok(ExitCode::SUCCESS)
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
