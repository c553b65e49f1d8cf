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
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|f| !f.is_empty()))
        .unwrap_or_else(|| "info".into());
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
