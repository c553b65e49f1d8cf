//! `tally sql [QUERY]`: the SQL of `POST /v1/sql` from the command line,
//! with the same tables and limits; an interactive shell without a query
//! (statements end with `;`, `\q` or end of input leaves).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::Settings;
use crate::serve::sql::{self, Limits, SqlError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqlFormat {
    Table,
    Csv,
    Json,
}

pub(super) async fn run(
    settings: Settings,
    query: Option<String>,
    format: SqlFormat,
) -> anyhow::Result<ExitCode> {
    let (schema, catalog) = crate::pipeline::Stages::definitions(&settings)
        .await
        .context("rollup SQL is invalid")?;
    let store = crate::sink::ServingStore::open_existing(
        &settings.serving_url(),
        &catalog.rollups,
        settings.serving.window_index,
    )
    .await?;
    let live = crate::sink::serving::ReadPool::open(&settings.serving_url(), 1)?
        .live_versions()
        .await
        .unwrap_or_default();
    let limits = Limits::of(&settings);
    let one = |text: String| {
        let (settings, catalog, schema, store, live) =
            (&settings, &catalog, &schema, &store, &live);
        async move { sql::run(settings, catalog, schema, store, live, &text, limits).await }
    };
    let Some(query) = query else {
        // The shell: a query per `;`.
        let stdin = std::io::stdin();
        let tty = stdin.is_terminal();
        let mut text = String::new();
        if tty {
            eprint!("tally> ");
        }
        for line in stdin.lock().lines() {
            let line = line?;
            if line.trim() == "\\q" {
                break;
            }
            text.push_str(&line);
            text.push('\n');
            if line.trim_end().ends_with(';') {
                let q = std::mem::take(&mut text);
                let q = q.trim().trim_end_matches(';').to_string();
                match one(q).await {
                    Ok(a) => print!("{}", render(&a, format)?),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            if tty {
                eprint!(
                    "{}",
                    if text.is_empty() {
                        "tally> "
                    } else {
                        "  ...> "
                    }
                );
            }
        }
        store.close().await;
        return Ok(ExitCode::SUCCESS);
    };
    let answer = one(query).await;
    store.close().await;
    match answer {
        Ok(a) => {
            let mut out = std::io::stdout().lock();
            out.write_all(render(&a, format)?.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(SqlError::Internal(m)) => Err(anyhow::anyhow!(crate::error::internal(m))),
        Err(e) => Err(anyhow::anyhow!(crate::error::usage(e))),
    }
}

fn render(a: &sql::Answer, format: SqlFormat) -> anyhow::Result<String> {
    Ok(match format {
        SqlFormat::Table => format!(
            "{}\n({} rows)\n",
            datafusion::arrow::util::pretty::pretty_format_batches(&a.batches)?,
            a.rows
        ),
        SqlFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for b in &a.batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(out)?
        }
        SqlFormat::Json => {
            let mut out = Vec::new();
            {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
                for b in &a.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            String::from_utf8(out)?
        }
    })
}
