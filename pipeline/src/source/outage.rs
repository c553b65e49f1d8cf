//! A broker outage in the log (see [`Outage`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::kafka::TallyContext;

/// A broker outage in the log: one line when it starts, a summary every
/// [`OUTAGE_SUMMARY`] while it lasts, one line when it ends (librdkafka
/// reports the same failure many times a second).
#[derive(Debug, Default)]
pub(super) struct Outage {
    since: Option<Instant>,
    errors: u64,
    summarised: Option<Instant>,
}

const OUTAGE_SUMMARY: Duration = Duration::from_secs(30);

impl Outage {
    pub(super) fn error(&mut self, error: &str) {
        let now = Instant::now();
        match self.since {
            None => {
                self.since = Some(now);
                self.errors = 1;
                self.summarised = Some(now);
                tracing::warn!(error, "kafka: the broker is failing; librdkafka's reason is logged above (target librdkafka); a summary follows every 30 s until it recovers");
            }
            Some(since) => {
                self.errors += 1;
                if self
                    .summarised
                    .is_none_or(|t| now.duration_since(t) >= OUTAGE_SUMMARY)
                {
                    self.summarised = Some(now);
                    tracing::warn!(
                        error,
                        errors = self.errors,
                        for_secs = since.elapsed().as_secs(),
                        "kafka: the broker is still failing"
                    );
                }
            }
        }
    }

    pub(super) fn ok(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                errors = self.errors,
                after_secs = since.elapsed().as_secs(),
                "kafka: the broker is reachable again"
            );
            self.errors = 0;
        }
    }
}

impl TallyContext {
    pub(super) fn broker_error(&self, error: &str) {
        self.in_outage.store(true, Ordering::Relaxed);
        if let Ok(mut o) = self.outage.lock() {
            o.error(error);
        }
    }

    /// Called on every message and statistics report: cheap unless an outage is open.
    pub(super) fn broker_ok(&self) {
        if self.in_outage.swap(false, Ordering::Relaxed) {
            if let Ok(mut o) = self.outage.lock() {
                o.ok();
            }
        }
    }
}
