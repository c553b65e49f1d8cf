//! Black-box test support: a real tansu broker process, the `tally` binary as
//! a child process, an independent producer and an independent expected-rollup
//! computation. Nothing here calls tally's library.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
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

/// A tansu broker on a free loopback port, with SQLite storage in `dir`.
pub struct Broker {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_on(dir, free_port())
    }

    /// SIGKILL the broker (its SQLite storage stays).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill9();
        *self = Broker::start_on(&self.dir.clone(), self.port);
    }

    fn start_on(dir: &Path, port: u16) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu resolves sqlite:// paths against its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        let b = Broker {
            port,
            child,
            dir: dir.to_path_buf(),
        };
        b.wait_ready();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let c: Result<BaseConsumer, _> = ClientConfig::new()
                    .set("bootstrap.servers", self.bootstrap())
                    .create();
                if let Ok(c) = c {
                    if c.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "tansu did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let r = admin
            .create_topics([&t], &AdminOptions::new())
            .await
            .unwrap();
        for x in r {
            x.unwrap();
        }
    }

    /// High watermarks per partition.
    pub fn end_offsets(&self, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
        end_offsets_at(&self.bootstrap(), topic, partitions)
    }
}

/// High watermarks per partition of `topic` on the cluster at `bootstrap`.
pub fn end_offsets_at(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            (
                p,
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1,
            )
        })
        .collect()
}

/// librdkafka's mock cluster in a helper process (`tests/bin/mock_broker.rs`),
/// driven by commands: `down`, `up`, `rtt <ms>`, `errors fetch|offsetcommit <n>`,
/// `leader <partition> none|<id>`.
pub struct MockBroker {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub bootstrap: String,
}

/// The measurement tools' binary (`tools/`), built with the tests.
pub fn tally_bench_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("tally-bench");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace` first (make test does)",
        bin.display()
    );
    bin
}

impl MockBroker {
    pub fn start(topic: &str, partitions: i32) -> MockBroker {
        use std::io::BufRead;
        // Built with the tests (not next to TALLY_BIN, which may be a release tally).
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("mock_broker");
        let mut child = Command::new(&bin)
            .args([topic, &partitions.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (make test builds it)", bin.display()));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut bootstrap = String::new();
        stdout.read_line(&mut bootstrap).unwrap();
        MockBroker {
            child,
            stdin,
            stdout,
            bootstrap: bootstrap.trim().to_string(),
        }
    }

    pub fn cmd(&mut self, line: &str) {
        use std::io::{BufRead, Write};
        if let Err(e) = writeln!(self.stdin, "{line}") {
            panic!(
                "mock broker gone before `{line}` ({e}): {:?}",
                self.child.try_wait()
            );
        }
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        assert!(answer.starts_with("ok "), "mock broker: {line}: {answer}");
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produce keyed messages with a plain rdkafka producer and wait for acks.
pub async fn produce(bootstrap: &str, topic: &str, messages: &[Message]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Larger producer batches: tansu serves a fetch per record batch.
        .set("linger.ms", "50")
        .set("enable.idempotence", "true")
        // Room for the 10 MB poison pill of the fault tests.
        .set("message.max.bytes", "16000000")
        .create()
        .unwrap();
    // Enqueue a whole chunk, then wait for its acks (FutureProducer::send would
    // only enqueue when awaited, one message per round trip).
    for chunk in messages.chunks(2000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut record = FutureRecord::to(topic).key(&m.key).payload(&m.payload);
            loop {
                match producer.send_result(record) {
                    Ok(ack) => break acks.push(ack),
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for a in acks {
            a.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
}

/// One test message and what tally should make of it.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    Accepted {
        event_id: String,
        video: String,
        kind: String,
        time_ms: i64,
        value: Option<i64>,
        late: bool,
    },
    Rejected {
        reason: &'static str,
    },
}

/// A seeded dataset: valid events (some late, both time forms, unknown
/// fields) and malformed messages with the reason tally must give.
pub fn dataset(seed: u64, n: usize, now_ms: i64) -> Vec<Message> {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let kinds = ["view", "like", "share"];
    (0..n)
        .map(|i| {
            let video = format!("v{:03}", (rng.random_range(0..40u32) * rng.random_range(0..40u32)) / 40);
            let key = video.clone();
            let roll: f64 = rng.random();
            if roll < 0.04 {
                let (payload, reason): (String, &'static str) = match i % 6 {
                    0 => ("{\"video_id\": oops".into(), "not_json"),
                    1 => (format!(r#"{{"event_type":"view","event_time":{now_ms}}}"#), "missing_field"),
                    2 => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{now_ms},"value":"x"}}"#), "wrong_type"),
                    3 => (format!(r#"{{"video_id":"{video}","event_type":"VIEW","event_time":{now_ms}}}"#), "invalid_value"),
                    4 => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{}}}"#, now_ms + 3_600_000), "future_event_time"),
                    _ => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{}}}"#, now_ms - 30 * 86_400_000), "too_old"),
                };
                return Message { key, payload: payload.into_bytes(), expect: Expect::Rejected { reason } };
            }
            let kind = kinds[rng.random_range(0..3)].to_string();
            let late = roll < 0.10;
            let back = if late { rng.random_range(30 * 60_000..3 * 3_600_000) } else { rng.random_range(0..20_000) };
            let time_ms = now_ms - back;
            let value = if kind == "view" { Some(rng.random_range(1..500i64)) } else { None };
            let event_id = format!("e{seed}-{i}");
            let time = if i % 2 == 0 {
                time_ms.to_string()
            } else {
                format!("\"{}\"", chrono::DateTime::from_timestamp_millis(time_ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            };
            let value_s = value.map(|v| format!(r#","value":{v}"#)).unwrap_or_default();
            let payload = format!(
                r#"{{"event_id":"{event_id}","video_id":"{video}","event_type":"{kind}","event_time":{time}{value_s},"unknown":{{"nested":[1,2]}}}}"#
            );
            Message { key, payload: payload.into_bytes(), expect: Expect::Accepted { event_id, video, kind, time_ms, value, late } }
        })
        .collect()
}

/// Expected rollup row: (count, sum, min, max) per (video, type, window start).
pub type Expected = BTreeMap<(String, String, i64), (i64, Option<i64>, Option<i64>, Option<i64>)>;

pub fn expected_rollup(messages: &[Message], width_ms: i64) -> Expected {
    let mut out: Expected = BTreeMap::new();
    for m in messages {
        if let Expect::Accepted {
            video,
            kind,
            time_ms,
            value,
            ..
        } = &m.expect
        {
            let w = time_ms - time_ms.rem_euclid(width_ms);
            let e = out
                .entry((video.clone(), kind.clone(), w))
                .or_insert((0, None, None, None));
            e.0 += 1;
            if let Some(v) = value {
                e.1 = Some(e.1.unwrap_or(0) + v);
                e.2 = Some(e.2.map_or(*v, |m| m.min(*v)));
                e.3 = Some(e.3.map_or(*v, |m| m.max(*v)));
            }
        }
    }
    out
}

/// A serving store in these tests: the path of a SQLite file, or a
/// `postgres://` URL held in a path (see [`pg_store`]).
pub fn pg_url(db: &Path) -> Option<&str> {
    db.to_str().filter(|s| s.starts_with("postgres://"))
}

/// Does the serving store exist yet?
pub fn store_exists(db: &Path) -> bool {
    pg_url(db).is_some() || db.exists()
}

/// Read a rollup table from the serving store.
pub async fn serving_rollup(db: &Path, table: &str) -> Expected {
    use sqlx::Row;
    // SQLite: batch commits land in `{table}__delta`, folded into `{table}`
    // every so many rows; a key may be in both.
    let sql = match pg_url(db) {
        Some(_) => format!("SELECT video_id, event_type, window_start, events, value_sum, value_min, value_max FROM {table}"),
        None => format!(
            "SELECT video_id, event_type, window_start, sum(events), sum(value_sum), min(value_min), max(value_max) \
             FROM (SELECT * FROM {table} UNION ALL SELECT * FROM {table}__delta) GROUP BY video_id, event_type, window_start"
        ),
    };
    macro_rules! read {
        ($pool:expr) => {{
            let pool = $pool;
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap();
            let mut out = Expected::new();
            for r in rows {
                let f = |i: usize| {
                    r.get::<Option<f64>, _>(i).map(|x| {
                        assert_eq!(x.fract(), 0.0, "integer inputs give integer sums");
                        x as i64
                    })
                };
                out.insert((r.get(0), r.get(1), r.get(2)), (r.get(3), f(4), f(5), f(6)));
            }
            pool.close().await;
            out
        }};
    }
    match pg_url(db) {
        Some(url) => read!(sqlx::PgPool::connect(url).await.unwrap()),
        None => read!(
            sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
                .await
                .unwrap()
        ),
    }
}

pub async fn serving_query_i64(db: &Path, sql: &'static str) -> Vec<(String, i64)> {
    try_serving_query_i64(db, sql).await.unwrap()
}

/// As [`serving_query_i64`], but an error (e.g. the schema is not created
/// yet by a process that just started) is returned, not a panic.
pub async fn try_serving_query_i64(
    db: &Path,
    sql: &'static str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    use sqlx::Row;
    if let Some(url) = pg_url(db) {
        let pool = sqlx::PgPool::connect(url).await?;
        let rows = sqlx::query(sql).fetch_all(&pool).await;
        pool.close().await;
        return Ok(rows?
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect());
    }
    let url = format!("sqlite://{}?mode=ro", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    let rows = sqlx::query(sql).fetch_all(&pool).await;
    pool.close().await;
    Ok(rows?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect())
}

/// Run a query through DataFusion and return the first column of every row as strings.
pub async fn datafusion_rows(statements: &[String]) -> Vec<Vec<String>> {
    use datafusion::arrow::util::display::ArrayFormatter;
    let ctx = datafusion::prelude::SessionContext::new();
    let mut last = Vec::new();
    for s in statements {
        last = ctx
            .sql(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .collect()
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    for b in last {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
        }
    }
    out
}

/// All files under `dir`, relative.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A copy of the shipped `sql/rollups` under `dir/rollups`, for a test
/// that adds or edits a rollup.
pub fn copy_of_rollups(dir: &Path) -> PathBuf {
    let rollups = dir.join("rollups");
    std::fs::create_dir_all(&rollups).unwrap();
    for f in std::fs::read_dir(workspace_root().join("sql/rollups")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, rollups.join(f.file_name().unwrap())).unwrap();
    }
    rollups
}

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
            ("TALLY__BATCH__LINGER".into(), "300ms".into()),
            ("TALLY__BATCH__MAX_ROWS".into(), "3000".into()),
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
        let child = Command::new(tally_bin())
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
            if end.iter().all(|(p, e)| *e == 0 || got.get(p) == Some(e)) {
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

/// A new PostgreSQL database (on `TALLY_TEST_PG_URL`, default: the server
/// `scripts/postgres.sh` starts) for one test, dropped when this is dropped.
/// `path()` is its URL in the form the store helpers accept.
pub struct PgStore {
    pub url: String,
    base: String,
    name: String,
}

pub async fn pg_store() -> PgStore {
    use sqlx::Connection;
    let base = std::env::var("TALLY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://tally:tally@127.0.0.1:5432/tally".into());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} is needed (`make postgres` starts one): {e}")
        });
    let name = unique("tally_it").replace('-', "_").to_lowercase();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    PgStore {
        url: format!("{head}/{name}"),
        base,
        name,
    }
}

impl PgStore {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(&self.base)
            .arg("-qc")
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Produce `messages` in the background, `chunk` at a time with `pause`
/// between chunks (a steady stream while a test injects faults).
pub fn produce_in_background(
    bootstrap: &str,
    topic: &str,
    messages: &[Message],
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let (bootstrap, topic, messages) =
        (bootstrap.to_string(), topic.to_string(), messages.to_vec());
    tokio::spawn(async move {
        for slice in messages.chunks(chunk.max(1)) {
            produce(&bootstrap, &topic, slice).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// A local S3-compatible server: moto's (PyPI `moto[server]`, installed by
/// `make moto`) on a free loopback port, with its state in memory. The
/// interpreter is `$TALLY_TEST_PYTHON`, else `python3`.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let port = free_port();
        let python = std::env::var("TALLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let log = std::fs::File::create(dir.join(format!("moto-{port}.log"))).unwrap();
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{python} -m moto.server: {e} (run `make moto`)"));
        let mut server = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.request("GET", "/", b"").0 != 200 {
            if let Some(s) = server.child.try_wait().unwrap() {
                panic!(
                    "moto server exited with {s}; see {}/moto-{port}.log (run `make moto`)",
                    dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One unsigned path-style request (moto does not check signatures): (status, body).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        );
        if s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(body))
            .is_err()
        {
            return (0, String::new());
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
        (
            status,
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// Multipart uploads in progress in `bucket` (ListMultipartUploads).
    pub fn multipart_uploads(&self, bucket: &str) -> usize {
        let (status, body) = self.request("GET", &format!("/{bucket}?uploads"), b"");
        assert_eq!(status, 200, "list uploads: {body}");
        body.matches("<UploadId>").count()
    }

    /// Point a tally at `s3://bucket/prefix` on this server.
    pub fn configure(&self, env: &mut TallyEnv, bucket: &str, prefix: &str) {
        env.set(
            "TALLY__STORAGE__ARCHIVE_URL",
            &format!("s3://{bucket}/{prefix}"),
        );
        env.set("TALLY__STORAGE__OPTIONS__AWS_ENDPOINT", &self.endpoint());
        env.set("TALLY__STORAGE__OPTIONS__AWS_ALLOW_HTTP", "true");
        env.set("TALLY__STORAGE__OPTIONS__AWS_REGION", "us-east-1");
        env.set("TALLY__STORAGE__OPTIONS__AWS_ACCESS_KEY_ID", "test");
        env.set("TALLY__STORAGE__OPTIONS__AWS_SECRET_ACCESS_KEY", "test");
    }

    /// An object_store client of `bucket`, independent of tally's.
    pub fn store(&self, bucket: &str) -> std::sync::Arc<object_store::aws::AmazonS3> {
        std::sync::Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .build()
                .unwrap(),
        )
    }

    /// Download every object under `prefix` into `to` (same relative layout);
    /// returns the relative keys.
    pub async fn mirror(&self, bucket: &str, prefix: &str, to: &Path) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let store = self.store(bucket);
        let root = object_store::path::Path::from(prefix);
        let metas: Vec<_> = store.list(Some(&root)).try_collect().await.unwrap();
        let _ = std::fs::remove_dir_all(to);
        let mut keys = Vec::new();
        for m in metas {
            let rel = m
                .location
                .as_ref()
                .strip_prefix(root.as_ref())
                .unwrap()
                .trim_start_matches('/')
                .to_string();
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            let path = to.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &bytes).unwrap();
            keys.push(rel);
        }
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`datafusion_rows`] in a context that can read `s3://bucket/…` from `store`.
pub async fn datafusion_rows_s3(
    bucket: &str,
    store: std::sync::Arc<object_store::aws::AmazonS3>,
    statements: &[String],
) -> Vec<Vec<String>> {
    use datafusion::arrow::util::display::ArrayFormatter;
    let ctx = datafusion::prelude::SessionContext::new();
    let url = datafusion::execution::object_store::ObjectStoreUrl::parse(format!("s3://{bucket}"))
        .unwrap();
    ctx.register_object_store(url.as_ref(), store);
    let mut last = Vec::new();
    for s in statements {
        last = ctx
            .sql(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .collect()
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    for b in last {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
        }
    }
    out
}

/// A TCP proxy in front of PostgreSQL that loses the reply to chosen
/// `COMMIT`s: it forwards the client's `COMMIT` (a simple-query message, as
/// sqlx sends it), drops whatever the server answers, and closes both ends
/// once the server has had time to apply it. The client sees a dropped
/// connection after a commit that in fact happened: the ambiguous commit.
pub struct CommitDropProxy {
    pub port: u16,
    /// COMMITs seen, and replies dropped, so far.
    pub commits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitDropProxy {
    /// Proxy to `target`, dropping the reply of every COMMIT whose number
    /// (1-based, over all connections) `drop_if` accepts.
    pub fn start(target: std::net::SocketAddr, drop_if: fn(usize) -> bool) -> CommitDropProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let commits = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (c, d) = (commits.clone(), dropped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                let (c, d, cut2) = (c.clone(), d.clone(), cut.clone());
                let (mut from_client, mut to_server) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut from_server, mut to_client) = (server, client);
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        let is_commit = chunk.windows(COMMIT.len()).any(|w| w == COMMIT);
                        if is_commit && drop_if(c.fetch_add(1, Ordering::SeqCst) + 1) {
                            cut2.store(true, Ordering::SeqCst);
                            let _ = to_server.write_all(chunk);
                            // Let the server apply it, then hang up on both.
                            std::thread::sleep(Duration::from_millis(300));
                            d.fetch_add(1, Ordering::SeqCst);
                            let _ = to_server.shutdown(std::net::Shutdown::Both);
                            let _ = from_client.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        if to_server.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) || to_client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to_client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CommitDropProxy {
            port,
            commits,
            dropped,
        }
    }

    /// `url` (a `postgres://…@HOST:PORT/DB` URL) through this proxy.
    pub fn url(&self, url: &str) -> String {
        let (head, rest) = url.split_once('@').unwrap();
        let (_, db) = rest.split_once('/').unwrap();
        // Plain text, so the proxy can read the protocol.
        format!("{head}@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }
}
