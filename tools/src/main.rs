//! `tally-bench`: the measurement tools `make bench` runs next to `tally`:
//! API latency (`api`), produce-to-visible freshness (`freshness`) and the
//! bare-consumer drain of the topic (`drain`). They read tally's config (the
//! same files and `TALLY__*` variables) for the API address and the broker.
#![allow(clippy::print_stdout)]

mod api;
mod drain;
mod freshness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tally-bench",
    version,
    about = "Measurement tools for tally's benchmarks"
)]
struct Cli {
    /// tally's config file, layered over its embedded defaults.
    #[arg(long, short, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, env = "TALLY_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open-loop latency benchmark of /v1/count and /v1/stats against a
    /// running tally.
    Api(ApiArgs),
    /// Produce probe events at a fixed interval and time each one until
    /// `/v1/count` shows it (run it next to a loaded tally).
    Freshness(FreshnessArgs),
    /// Read the whole topic with a bare librdkafka consumer (no group, no
    /// decoding, no commits) and print messages/s: the broker-side limit that
    /// `make bench` compares `tally run` with.
    Drain {
        /// Give up after this long.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Args)]
struct FreshnessArgs {
    /// Address of the API (default: api.listen).
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Number of probe events.
    #[arg(long, default_value_t = 200)]
    probes: u64,
    /// Time between probes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// A probe not visible after this long counts as not visible.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Label printed with the results.
    #[arg(long, default_value = "freshness")]
    label: String,
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// Address of the API (default: api.listen).
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Requests per second (fixed schedule, open loop).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Videos to query (ids as `tally produce` makes them).
    #[arg(long, default_value_t = 10_000)]
    videos: u64,
    /// Range length in days (hour-aligned, ending now).
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Query the any-rollup endpoint instead: `GET /v1/rollups/hour_video_events`
    /// for N videos (the key repeated), grouped by video (by event type when N is 1);
    /// 0: views per channel from `hour_channel_events`.
    #[arg(long)]
    generic: Option<usize>,
    /// Query the seed's `/v1/series` (one video, hourly) or `/v1/top`
    /// (ten most viewed) instead.
    #[arg(long, value_parser = ["series", "top"], conflicts_with = "generic")]
    endpoint: Option<String>,
    /// Label printed with the results.
    #[arg(long, default_value = "api")]
    label: String,
    /// Bearer token for reads, if configured.
    #[arg(long, env = "TALLY_BENCH_TOKEN")]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tally::cli::init_tracing(&cli.log);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(tally::cli::exit_code(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = tally::cli::load_settings_from(cli.config.as_deref())?;
    let properties = tally::cli::properties(&settings);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Api(a) => rt.block_on(async {
            let spec = api::BenchApiSpec {
                addr: a.addr.unwrap_or(settings.api.listen),
                rate: a.rate,
                duration: a.duration,
                connections: a.connections,
                paths: if let Some(n) = a.generic {
                    api::generic_paths(
                        a.videos,
                        n,
                        a.days,
                        chrono::Utc::now().timestamp_millis(),
                        1,
                    )
                } else if let Some(endpoint) = &a.endpoint {
                    api::seed_paths(
                        endpoint,
                        a.videos,
                        a.days,
                        chrono::Utc::now().timestamp_millis(),
                        1,
                    )
                } else {
                    api::query_paths(a.videos, a.days, chrono::Utc::now().timestamp_millis(), 1)
                },
                token: a.token,
            };
            let r = api::run(spec)
                .await
                .map_err(anyhow::Error::msg)
                .context("api benchmark failed")?;
            let ms = |us: u64| us as f64 / 1000.0;
            let bound = |u: Option<u64>| {
                u.map_or("-".into(), |u| {
                    if u == u64::MAX {
                        "> 5000".into()
                    } else {
                        format!("≤ {}", ms(u))
                    }
                })
            };
            println!(
                "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} / {} |",
                a.label,
                a.rate,
                r.rate(),
                r.errors,
                ms(r.p50),
                ms(r.p99),
                ms(r.p999),
                ms(r.max),
                bound(r.server_p50),
                bound(r.server_p99),
            );
            Ok(ExitCode::SUCCESS)
        }),
        Command::Freshness(a) => rt.block_on(async {
            let spec = freshness::FreshnessSpec {
                addr: a.addr.unwrap_or(settings.api.listen),
                topic: settings.kafka.topic.clone(),
                probes: a.probes,
                interval: a.interval,
                timeout: a.timeout,
                poll: Duration::from_millis(20),
            };
            let r = freshness::run(spec, &properties)
                .await
                .map_err(anyhow::Error::msg)
                .context("freshness benchmark failed")?;
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                a.label, r.probes, r.visible, r.p50_ms, r.p99_ms, r.max_ms
            );
            Ok(if r.visible == r.probes {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Command::Drain { timeout } => {
            let r = drain::drain(&properties, &settings.kafka.topic, timeout)
                .map_err(anyhow::Error::msg)
                .context("drain failed")?;
            println!(
                "{} messages, {} bytes in {:.2} s: {:.0} messages/s",
                r.messages,
                r.bytes,
                r.seconds,
                r.messages as f64 / r.seconds.max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
