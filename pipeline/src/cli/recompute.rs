//! The commands that recompute windows from the archive: `tally verify`,
//! `tally backfill` (with a range), `tally export`.

use std::process::ExitCode;

use anyhow::Context;

use super::VerifyArgs;
use crate::config::Settings;

pub(super) async fn backfill(settings: Settings, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    if a.from >= a.to {
        anyhow::bail!("--from must be before --to");
    }
    let r = crate::jobs::backfill::backfill(&settings, a.from, a.to, a.rollup.as_deref())
        .await
        .context("tally backfill failed")?;
    let fmt = crate::serve::http::fmt_time;
    for (name, lo, hi) in &r.windows {
        println!("{name}: replaced windows in [{}, {})", fmt(*lo), fmt(*hi));
    }
    println!(
        "{} raw files read (+{} committed during the backfill); {} rows deleted, {} rows written",
        r.files, r.files_committed_meanwhile, r.rows_deleted, r.rows_written
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn export(settings: Settings, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    if a.from >= a.to {
        anyhow::bail!("--from must be before --to");
    }
    let r = crate::jobs::export::export(&settings, a.from, a.to, a.rollup.as_deref())
        .await
        .context("tally export failed")?;
    for (path, rows) in &r.files {
        println!("{path}: {rows} rows");
    }
    println!("{} files written under {}", r.files.len(), r.root);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn verify(
    settings: Settings,
    a: VerifyArgs,
    tag: &str,
    left: &str,
    right: &str,
) -> anyhow::Result<ExitCode> {
    if a.from >= a.to {
        anyhow::bail!("--from must be before --to");
    }
    let r = crate::jobs::verify::verify(&settings, a.from, a.to, a.rollup.as_deref())
        .await
        .context("recomputing from the raw archive failed")?;
    let fmt = crate::serve::http::fmt_time;
    for (name, rows, lo, hi) in &r.checked {
        println!("{name}: {rows} rows in [{}, {})", fmt(*lo), fmt(*hi));
    }
    for d in r.drift.iter().take(100) {
        let show =
            |v: &Option<Vec<String>>| v.as_ref().map_or("(missing)".to_string(), |v| v.join(", "));
        println!(
            "{tag} {} [{}]: {left} ({}) != {right} ({})",
            d.rollup,
            d.key.join(", "),
            show(&d.serving),
            show(&d.recomputed)
        );
    }
    println!("{} raw files read; {} rows differ", r.files, r.drift.len());
    Ok(if r.drift.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
