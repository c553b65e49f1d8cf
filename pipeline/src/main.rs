//! The `tally` binary: parse, run, map the result to an exit code.
use clap::Parser;

fn main() -> std::process::ExitCode {
    tally::allocator::tune();
    tally::set_build_commit(
        option_env!("TALLY_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .unwrap_or("unknown"),
    );
    let cli = tally::cli::Cli::parse();
    match tally::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(tally::cli::exit_code(&err))
        }
    }
}
