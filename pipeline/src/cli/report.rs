//! `tally report monthly`: a month, or any range of whole days, to HTML,
//! CSV or Markdown files (see `jobs/report`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::MonthlyArgs;
use crate::config::Settings;

pub(super) async fn monthly(settings: Settings, a: MonthlyArgs) -> anyhow::Result<ExitCode> {
    use crate::jobs::report::{self, Format, Month, Span};
    let span = match (a.from, a.to) {
        (Some(from), Some(to)) => Span::range(from, to).map_err(crate::error::usage)?,
        _ => Span::Month(
            a.month
                .unwrap_or_else(|| Month::previous_to(chrono::Utc::now().timestamp_millis())),
        ),
    };
    let slug = span.slug();
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from(match a.format {
            Format::Html => format!("report-{slug}.html"),
            Format::Md => format!("report-{slug}.md"),
            Format::Csv => format!("report-{slug}"),
        })
    });
    let r = report::build(&settings, span)
        .await
        .context("tally report monthly failed")?;
    let files = report::write(&r, a.format, &out, a.bom).context("tally report monthly failed")?;
    for f in &files {
        println!("{}", f.display());
    }
    eprintln!(
        "report for {slug}: {} tables, {} files",
        r.tables.len(),
        files.len()
    );
    Ok(ExitCode::SUCCESS)
}
