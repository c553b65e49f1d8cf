//! CLI jobs built from the pipeline's stages.

pub mod backfill;
pub mod compact;
pub mod dlq;
pub mod export;
pub mod offsets;
pub mod produce;
pub mod rebuild;
pub mod replay;
pub mod report;
pub mod status;
pub mod topic;
pub mod verify;
pub mod versions;

/// Progress of a long job: a bar on a terminal, a log line per step elsewhere.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    job: &'static str,
    done: u64,
    total: u64,
}

impl Progress {
    pub fn new(job: &'static str, total: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            ) {
                b.set_style(style);
            }
            b.set_prefix(job);
            b
        });
        Progress {
            bar,
            job,
            done: 0,
            total,
        }
    }

    /// One step finished; `what` says which.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.set_message(what.to_string());
                b.inc(1);
            }
            None => tracing::info!(job = self.job, step = self.done, of = self.total, "{what}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
