//! Black-box test support: a real tansu broker process, the `tally` binary as
//! a child process, an independent producer and an independent expected-rollup
//! computation. Nothing here calls tally's library.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use rand::Rng;

mod broker;
mod data;
mod process;
mod proxy;
mod s3;
mod sketches;
mod store;

pub use broker::*;
pub use data::*;
pub use process::*;
pub use proxy::*;
pub use s3::*;
pub use sketches::*;
pub use store::*;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tests' `videos` dimension table: v000..v034 in channels ch-0..ch-4
/// ([`channel_of`]), the dataset's other videos in none.
pub fn test_videos_csv() -> PathBuf {
    workspace_root().join("tests/testdata/videos.csv")
}

/// A command running the tally binary with the tests' dimension table
/// (`[sql.dimensions]` paths are otherwise relative to the working directory).
pub fn tally_command() -> std::process::Command {
    let mut c = std::process::Command::new(tally_bin());
    c.env("TALLY__SQL__DIMENSIONS__VIDEOS", test_videos_csv());
    c
}

/// The tally binary: `$TALLY_BIN`, else next to this test binary's target dir.
pub fn tally_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TALLY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/it-xxxx -> target/<profile>/tally
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("tally");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p tally` first (make test does)",
        bin.display()
    );
    bin
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/tansu");
    assert!(
        p.exists(),
        "tansu not installed at {}: run `make tansu`",
        p.display()
    );
    p
}

/// A temp dir for one test; kept (and its path printed) when `TEST_KEEP` is set.
pub struct TestDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn test_dir() -> TestDir {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("TEST_KEEP").is_some() {
        let path = tmp.keep();
        eprintln!("test dir kept: {}", path.display());
        return TestDir { path, _tmp: None };
    }
    TestDir {
        path: tmp.path().to_path_buf(),
        _tmp: Some(tmp),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        rand::rng().random_range(0..1_000_000u32)
    )
}

/// RFC 3339 UTC, as the API prints it.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Print what a fault test injected and survived, one `FAULTS name=n ...`
/// line; `make soak` sums these over its run.
pub fn report_faults(faults: &[(&str, usize)]) {
    let parts: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FAULTS {}", parts.join(" "));
}
