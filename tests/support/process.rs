//! `tally` as a child process: start, wait for commits, HTTP requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A `tally run` child process.
pub struct Tally {
    pub child: Child,
    pub log: PathBuf,
}

impl Tally {
    /// The last lines of this process's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        // Any panic message first (its backtrace may push it out of the tail).
        let panics: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .map(|(i, _)| lines[i..(i + 3).min(lines.len())].join("\n"))
            .collect();
        format!(
            "{}\n...\n{}",
            panics.join("\n"),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

#[derive(Clone)]
pub struct TallyEnv {
    pub vars: Vec<(String, String)>,
    pub log: PathBuf,
    /// Where the HTTP API listens (a free loopback port per test).
    pub api: std::net::SocketAddr,
}

impl TallyEnv {
    pub fn new(bootstrap: &str, topic: &str, group: &str, data_dir: &Path) -> TallyEnv {
        std::fs::create_dir_all(data_dir).unwrap();
        let vars = vec![
            ("TALLY__KAFKA__TOPIC".into(), topic.into()),
            (
                "TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS".into(),
                bootstrap.into(),
            ),
            ("TALLY__KAFKA__PROPERTIES__GROUP_ID".into(), group.into()),
            (
                "TALLY__STORAGE__DATA_DIR".into(),
                data_dir.display().to_string(),
            ),
            (
                "TALLY__SQL__ROLLUPS_DIR".into(),
                workspace_root().join("sql/rollups").display().to_string(),
            ),
            (
                "TALLY__SQL__DIMENSIONS__VIDEOS".into(),
                crate::test_videos_csv().display().to_string(),
            ),
            ("TALLY__BATCH__LINGER".into(), "300ms".into()),
            ("TALLY__BATCH__MAX_ROWS".into(), "3000".into()),
            // The archive commits its open files every second (10 minutes by
            // default): tests see it catch up quickly and cross its commit
            // steps often.
            ("TALLY__STORAGE__ARCHIVE_ROLL_INTERVAL".into(), "1s".into()),
            // Events up to 20 s old are "on time" however slow the test machine is;
            // late ones are 30 min to 3 h old.
            ("TALLY__DECODE__LATE_AFTER".into(), "20m".into()),
            // A killed member leaves the group quickly.
            (
                "TALLY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS".into(),
                "6000".into(),
            ),
            (
                "TALLY__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS".into(),
                "500".into(),
            ),
        ];
        let api: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut env = TallyEnv {
            vars,
            log: data_dir.join("tally.log"),
            api,
        };
        env.set("TALLY__API__LISTEN", &api.to_string());
        env
    }
    pub fn set(&mut self, k: &str, v: &str) {
        self.vars.retain(|(x, _)| x != k);
        self.vars.push((k.into(), v.into()));
    }
}

impl Tally {
    /// `tally run`.
    pub fn start(env: &TallyEnv) -> Tally {
        Tally::spawn(env, "run")
    }

    /// `tally serve` (the API alone, reading the same serving store).
    pub fn serve(env: &TallyEnv) -> Tally {
        Tally::spawn(env, "serve")
    }

    fn spawn(env: &TallyEnv, command: &str) -> Tally {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&env.log)
            .unwrap();
        let child = tally_command()
            .arg(command)
            .env(
                "TALLY_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.vars.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tally");
        Tally {
            child,
            log: env.log.clone(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "tally did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until the serving store's offsets reach `end` for every partition.
/// The archive's committed position per partition of `topic`.
pub async fn archive_positions(db: &Path, topic: &str) -> BTreeMap<i32, i64> {
    try_serving_query_i64(
        db,
        "SELECT topic || ':' || CAST(partition AS TEXT), next_offset FROM tally_archive_offsets",
    )
    .await
    .unwrap_or_default()
    .into_iter()
    .filter_map(|(k, v)| {
        k.strip_prefix(&format!("{topic}:"))
            .map(|p| (p.parse().unwrap(), v))
    })
    .collect()
}

/// Committed archive files not yet under their final names.
async fn pending_files(db: &Path) -> Option<i64> {
    try_serving_query_i64(db, "SELECT 'pending', count(*) FROM tally_archive_pending")
        .await
        .ok()
        .and_then(|rows| rows.first().map(|r| r.1))
}

pub async fn wait_committed(
    db: &Path,
    topic: &str,
    end: &BTreeMap<i32, i64>,
    timeout: Duration,
    tally: &mut Tally,
) {
    let deadline = Instant::now() + timeout;
    let mut got: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        if let Some(status) = tally.child.try_wait().unwrap() {
            panic!(
                "tally exited early with {status}; log tail:\n{}",
                tally.log_tail()
            );
        }
        if store_exists(db) {
            // Errors (schema not created yet by a process just started) count as "not yet".
            got = try_serving_query_i64(
                db,
                "SELECT topic || ':' || CAST(partition AS TEXT), next_offset FROM tally_offsets",
            )
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&format!("{topic}:"))
                    .map(|p| (p.parse().unwrap(), v))
            })
            .collect();
            // The archive commits later than the counts: everything is in
            // when its position is at the end too and no file awaits its rename.
            let archived = archive_positions(db, topic).await;
            if end
                .iter()
                .all(|(p, e)| *e == 0 || (got.get(p) == Some(e) && archived.get(p) == Some(e)))
                && pending_files(db).await == Some(0)
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "offsets did not reach {end:?} in time (at {got:?}); log tail:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A minimal HTTP/1.1 client (one request per connection): (status, body).
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ctype = if method == "POST" {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// GET and parse JSON, asserting 200.
pub fn get_json(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, token, b"");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Wait until `GET path` answers 200.
pub fn wait_http_ok(addr: std::net::SocketAddr, path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(addr).is_ok() && http(addr, "GET", path, None, b"").0 == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} on {addr} did not answer 200 in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
