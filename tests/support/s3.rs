//! moto's S3 server on a free loopback port, and DataFusion reading from it.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;

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
