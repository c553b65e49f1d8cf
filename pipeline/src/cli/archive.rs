//! The archive's maintenance commands: `tally rebuild`, `tally compact`.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Settings;

pub(super) async fn rebuild(settings: Settings) -> anyhow::Result<ExitCode> {
    let r = crate::jobs::rebuild::rebuild(&settings)
        .await
        .context("tally rebuild failed")?;
    for gap in &r.gaps {
        println!("note: no committed file covers the offsets between {gap} (an `offsets reset`, or retention)");
    }
    if r.renamed > 0 {
        println!(
            "{} committed files a crash left under their staging names were renamed",
            r.renamed
        );
    }
    if r.pruned > 0 {
        println!(
            "{} files past storage retention (retention.archive) are gone; their windows are left out",
            r.pruned
        );
    }
    for (topic, partition, next) in &r.offsets {
        println!("{topic} partition {partition}: next offset {next}");
    }
    println!(
        "rebuilt from {} manifest entries: {} raw files ({} events), {} dead-letter files ({} dead letters), \
         {} rollup rows, in {:.1} s. `tally run` continues from the offsets above (late_total starts at 0: \
         arrival times are not archived)",
        r.entries,
        r.raw_files,
        r.events,
        r.dead_letter_files,
        r.dead_letters,
        r.rollup_rows,
        r.seconds
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn compact(settings: Settings, before: i64) -> anyhow::Result<ExitCode> {
    let r = crate::jobs::compact::compact(&settings, before)
        .await
        .context("tally compact failed")?;
    if r.recovered > 0 {
        println!(
            "{} files an interrupted compaction left were finished",
            r.recovered
        );
    }
    if r.skipped > 0 {
        println!(
            "{} runs of files were left as they were: one of their files changed meanwhile (retention?); run again",
            r.skipped
        );
    }
    println!(
        "{} old files ({} bytes) rewritten as {} files ({} bytes) holding {} events, in {:.1} s",
        r.old_files, r.bytes_before, r.new_files, r.bytes_after, r.events, r.seconds
    );
    Ok(ExitCode::SUCCESS)
}
