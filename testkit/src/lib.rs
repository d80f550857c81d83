//! What the integration tests of simq's crates share: free loopback ports, processes that
//! are stopped when a test ends (also when an assertion fails), services started on two
//! free ports, and plain HTTP reads. A dev-dependency only; nothing here ships.

use std::process::{Child, Command};

/// A loopback port that was free a moment ago. Another process may take it before the
/// caller binds it; callers that start a service and see it exit at once start it again
/// (as the embedder tests do).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("the loopback interface has a free port")
        .port()
}

/// A child process, killed and reaped when dropped; used as the `Child` it holds.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A simq service (embedder or shard) started with `--grpc-listen` and `--http-listen` on
/// two free loopback ports; killed and reaped when dropped.
pub struct Service {
    pub child: KillOnDrop,
    /// `http://127.0.0.1:PORT` of the gRPC listener.
    pub grpc: String,
    /// `http://127.0.0.1:PORT` of the health and metrics listener.
    pub http: String,
}

impl Service {
    /// Start `command` (the binary and its other arguments) on two free ports.
    pub fn spawn(mut command: Command) -> Service {
        let (grpc, http) = (free_port(), free_port());
        let child = command
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .spawn()
            .expect("the service binary starts");
        Service {
            child: KillOnDrop(child),
            grpc: format!("http://127.0.0.1:{grpc}"),
            http: format!("http://127.0.0.1:{http}"),
        }
    }

    /// The body of `GET {http}{path}` (e.g. "/metrics").
    pub async fn get_text(&self, path: &str) -> String {
        get_text(&format!("{}{path}", self.http)).await
    }
}

/// The body of `GET url`; panics naming the URL when it cannot be read.
pub async fn get_text(url: &str) -> String {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"))
}
