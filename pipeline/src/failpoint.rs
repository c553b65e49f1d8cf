//! Crash-test failpoints (off unless `TALLY_FAILPOINT` is set).

/// Crash-test hook: `TALLY_FAILPOINT=<name>` aborts the process (like a
/// SIGKILL: no cleanup, no flush) the first time execution reaches `name`.
/// Names, in commit order: `after_archive_write` (files visible, serving
/// transaction not run), `after_aggregate` (rollup SQL ran),
/// `inside_serving_transaction` (fence checked and rollups merged, not
/// committed), `after_serving_commit` (committed, Kafka group commit not sent).
pub fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("TALLY_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
