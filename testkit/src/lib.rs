//! What the integration tests and benchmarks of simq's crates share: free loopback ports,
//! processes that are stopped when a test ends (also when an assertion fails), services
//! started on two free ports, plain HTTP reads, the one quantile function every latency
//! figure uses, and the one load generator ([`load`]). A dev-dependency only; nothing
//! here ships.

pub mod load;

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

/// The `p` quantile (0..=1) of `sorted` (ascending): the value at rank `round((n - 1) p)`,
/// so p = 0 is the least, p = 1 the greatest and p = 0.5 the median of an odd count; None
/// when empty. Every latency percentile of simq's tests and benchmarks comes from here.
pub fn quantile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64 * p.clamp(0.0, 1.0)).round() as usize).min(last)])
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_ranks_of_the_sorted_values() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 0.5), Some(51.0));
        assert_eq!(quantile(&v, 0.99), Some(100.0));
        assert_eq!(quantile(&v, 1.0), Some(101.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
