//! A TCP proxy in front of PostgreSQL that drops the reply to some COMMITs.

use std::time::Duration;

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
