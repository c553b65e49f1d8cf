//! Crash-test failpoints (off unless `TALLY_FAILPOINT` is set).

/// Crash-test hook: `TALLY_FAILPOINT=<name>` aborts the process (like a
/// SIGKILL: no cleanup, no flush) the first time execution reaches `name`.
/// Names, in commit order: `after_archive_write` (files visible, serving
/// transaction not run), `after_aggregate` (rollup SQL ran),
/// `inside_serving_transaction` (fence checked and rollups merged, not
/// committed), `after_serving_commit` (committed, Kafka group commit not sent);
/// and `inside_multipart_upload` (S3: a part uploaded, the upload not complete);
/// `inside_backfill_transaction` (a backfill's rows written, not committed).
/// `after_backfill_chunk` (a chunked backfill's chunk committed and recorded).
pub(crate) fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("TALLY_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// Crash-test hook: `TALLY_PAUSEPOINT=<name>:<millis>` makes the first
/// batch that reaches `name` wait that long (the caller sleeps), e.g. so a
/// test can freeze the process with SIGSTOP while it holds a batch that is
/// about to commit (a zombie). Returns the pause, once.
pub(crate) fn pause(name: &str) -> Option<std::time::Duration> {
    static ARMED: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("TALLY_PAUSEPOINT").ok()?;
        let (n, ms) = v.rsplit_once(':')?;
        Some((n.to_string(), ms.parse().ok()?))
    });
    match armed {
        Some((n, ms)) if n == name && !FIRED.swap(true, std::sync::atomic::Ordering::AcqRel) => {
            tracing::warn!(
                pausepoint = name,
                millis = ms,
                "pausepoint reached: waiting"
            );
            Some(std::time::Duration::from_millis(*ms))
        }
        _ => None,
    }
}
