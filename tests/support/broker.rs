//! The tansu broker as a child process, librdkafka's mock cluster in a helper
//! process, and an independent producer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::*;

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
