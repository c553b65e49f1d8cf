//! `tally rollup status|diff|promote|drop`: rollup versions
//! (`sql/rollups/<name>@<N>.sql`), and the chunked `tally backfill --rollup`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::config::Settings;
use crate::serve::http::fmt_time;

#[derive(Debug, Subcommand)]
pub enum RollupCommand {
    /// Every version of every rollup: file, fingerprint, deployment time,
    /// which one the API answers (live), backfill progress.
    Status {
        /// One JSON object per version, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Compare the live version of NAME with its newest other version over
    /// their overlap, on the keys and measures both have.
    Diff {
        name: String,
        /// Range start (RFC 3339); default: where the new version's history starts.
        #[arg(long, value_parser = super::parse_rfc3339)]
        from: Option<i64>,
        /// Range end (RFC 3339, exclusive); default: now.
        #[arg(long, value_parser = super::parse_rfc3339)]
        to: Option<i64>,
    },
    /// Make the newest other version of NAME the one the API answers: every
    /// `tally run` and `tally serve` switches within a second, no restart.
    Promote {
        name: String,
        /// The version to promote (default: the newest that is not live).
        #[arg(long)]
        version: Option<u32>,
        /// Promote even though its history was not backfilled.
        #[arg(long)]
        force: bool,
    },
    /// Drop the tables of a retired version, NAME@N (after its file was
    /// removed from sql/rollups and the writers restarted).
    Drop { version: String },
}

pub(super) async fn run(settings: Settings, command: RollupCommand) -> anyhow::Result<ExitCode> {
    use crate::jobs::versions;
    match command {
        RollupCommand::Status { json } => {
            let all = versions::status(&settings)
                .await
                .context("tally rollup status failed")?;
            for v in &all {
                let backfill = v.backfill.map(|b| {
                    let pct = if b.to_ms > b.from_ms {
                        100.0 * (b.done_to_ms - b.from_ms) as f64 / (b.to_ms - b.from_ms) as f64
                    } else {
                        100.0
                    };
                    (b, pct.clamp(0.0, 100.0))
                });
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "rollup": v.rollup, "version": v.version, "table": v.table, "file": v.file,
                            "fingerprint": v.fingerprint, "live": v.live,
                            "deployed_at": v.deployed_at_ms.map(fmt_time),
                            "backfill": backfill.map(|(b, pct)| serde_json::json!({
                                "from": fmt_time(b.from_ms), "to": fmt_time(b.to_ms),
                                "done_to": fmt_time(b.done_to_ms), "percent": pct,
                            })),
                        })
                    );
                    continue;
                }
                println!(
                    "{:<28} v{:<3} {:<6} {} deployed {}  {}  backfill {}",
                    v.rollup,
                    v.version,
                    if v.live { "live" } else { "" },
                    v.fingerprint.as_deref().unwrap_or("-"),
                    v.deployed_at_ms.map_or("never".into(), fmt_time),
                    v.file.as_deref().unwrap_or("(no file: retired)"),
                    backfill.map_or("none".into(), |(b, pct)| format!(
                        "{pct:.0}% ({} .. {}, done to {})",
                        fmt_time(b.from_ms),
                        fmt_time(b.to_ms),
                        fmt_time(b.done_to_ms)
                    )),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RollupCommand::Diff { name, from, to } => {
            let range = match (from, to) {
                (Some(f), Some(t)) if f < t => Some((f, t)),
                (None, None) => None,
                _ => anyhow::bail!("give both --from and --to (from before to), or neither"),
            };
            let r = versions::diff(&settings, &name, range)
                .await
                .context("tally rollup diff failed")?;
            println!(
                "{} (live) vs {} over [{}, {}), keys ({}), measures ({}):",
                r.live,
                r.candidate,
                fmt_time(r.from_ms),
                fmt_time(r.to_ms),
                r.keys.join(", "),
                r.measures.join(", ")
            );
            println!(
                "{} rows equal, {} differ, {} only in {}, {} only in {}",
                r.same, r.differ, r.only_live, r.live, r.only_candidate, r.candidate
            );
            for e in &r.examples {
                println!("  {e}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RollupCommand::Promote {
            name,
            version,
            force,
        } => {
            let (old, new) = versions::promote(&settings, &name, version, force)
                .await
                .context("tally rollup promote failed")?;
            println!("promoted: the API answers `{name}` from {new} (was {old}); running processes switch within a second");
            Ok(ExitCode::SUCCESS)
        }
        RollupCommand::Drop { version } => {
            let table = versions::drop_version(&settings, &version)
                .await
                .context("tally rollup drop failed")?;
            println!("dropped the tables of {table}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tally backfill --rollup NAME` without a range.
pub(super) async fn backfill(settings: Settings, name: &str) -> anyhow::Result<ExitCode> {
    let r = crate::jobs::versions::backfill_version(&settings, name)
        .await
        .context("tally backfill failed")?;
    if r.started_at_ms > r.from_ms {
        println!(
            "resumed at {} (windows before were done by an earlier run)",
            fmt_time(r.started_at_ms)
        );
    }
    println!(
        "{}: backfilled [{}, {}) in {} chunks, {} rows written",
        r.table,
        fmt_time(r.started_at_ms),
        fmt_time(r.to_ms),
        r.chunks,
        r.rows_written
    );
    Ok(ExitCode::SUCCESS)
}
