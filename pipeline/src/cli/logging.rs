//! Log lines: a filter (`--log`, else `RUST_LOG`, else `info`) and a
//! format (`--log-format text|json`), always to stderr.

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log to stderr with `filter` (RUST_LOG syntax), as text.
pub fn init_tracing(filter: &str) {
    init_logging(Some(filter), LogFormat::Text);
}

/// Log to stderr with `filter` (else `RUST_LOG`, else `info`) in `format`;
/// ANSI colours only when stderr is a terminal.
pub fn init_logging(filter: Option<&str>, format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = resolve(filter, std::env::var("RUST_LOG").ok());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// The filter in force: the flag (`--log`, `TALLY_LOG`), else `RUST_LOG`,
/// else `info`.
fn resolve(flag: Option<&str>, rust_log: Option<String>) -> String {
    flag.map(str::to_string)
        .or_else(|| rust_log.filter(|f| !f.trim().is_empty()))
        .unwrap_or_else(|| "info".into())
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn the_flag_wins_then_rust_log_then_info() {
        assert_eq!(resolve(Some("warn"), Some("debug".into())), "warn");
        assert_eq!(resolve(None, Some("tally=debug".into())), "tally=debug");
        assert_eq!(resolve(None, Some(" ".into())), "info");
        assert_eq!(resolve(None, None), "info");
    }
}
