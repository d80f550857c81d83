//! What every simq service shows to Consul and Prometheus, in one place: `GET /health`
//! (the target of the Consul check Nomad registers), `GET /metrics`, structured logging,
//! the shutdown signal, and CPU priority.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Answers whether the service is healthy, with a JSON report (shown at /health).
pub type HealthFn = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

/// Set up tracing: JSON lines when `SIMQ_LOG_FORMAT=json` (what Nomad jobs set), human
/// text otherwise; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SIMQ_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only for a person at a terminal, not in log files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves on SIGTERM (Nomad stopping a task) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}

/// The shutdown signal of a service, shared by all its servers: each server gets a
/// [`Shutdown::wait`] future, and [`Shutdown::run`] fires them on SIGTERM/SIGINT.
#[derive(Clone)]
pub struct Shutdown {
    rx: tokio::sync::watch::Receiver<bool>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        Self {
            rx,
            tx: Arc::new(tx),
        }
    }
}

impl Shutdown {
    /// Resolves once shutdown has begun.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Begin shutdown now (tests, fatal errors).
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Wait for SIGTERM/SIGINT, tell every server, then give `servers` (which run them)
    /// at most `grace` to drain; idle keep-alive connections are not waited for past it.
    pub async fn run<E>(
        &self,
        servers: impl Future<Output = Result<(), E>> + Send + 'static,
        grace: std::time::Duration,
    ) -> Result<(), E>
    where
        E: std::fmt::Display + Send + 'static,
    {
        let servers = tokio::spawn(servers);
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = self.wait() => {}
        }
        self.trigger();
        match tokio::time::timeout(grace, servers).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => panic!("server task failed: {join}"),
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs_f64(),
                    "grace period over, closing remaining connections"
                );
                Ok(())
            }
        }
    }
}

/// Serve `/health` and `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve_ops(
    listener: TcpListener,
    registry: prometheus::Registry,
    health: HealthFn,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "ops listener accept failed");
                continue;
            }
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let health = health.clone();
                async move { Ok::<_, Infallible>(ops_response(&req, &registry, &health)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn ops_response(
    req: &Request<Incoming>,
    registry: &prometheus::Registry,
    health: &HealthFn,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => {
            let (ok, report) = health();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &report)
        }
        (&Method::GET, "/metrics") => {
            let mut buf = Vec::new();
            let encoder = prometheus::TextEncoder::new();
            if let Err(e) = prometheus::Encoder::encode(&encoder, &registry.gather(), &mut buf) {
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                );
            }
            Response::builder()
                .header("content-type", prometheus::TEXT_FORMAT)
                .body(Full::new(Bytes::from(buf)))
                .expect("static response")
        }
        (_, "/health" | "/metrics") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": format!("method {} not allowed; use GET", req.method())}),
        ),
        (_, path) => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no such path {path}; try /health or /metrics")}),
        ),
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response")
}

/// Lower the calling thread's CPU priority to `nice` (Linux: nice values are per thread,
/// and threads created afterwards inherit it). Used so that background work (a shard
/// checking its file) or a CPU-bound service (the embedder) yields to latency-critical
/// work on the same cores. A failure is logged, not fatal.
#[allow(unsafe_code)] // one libc call, see SAFETY
pub fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: setpriority only reads its arguments; `0` names the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower the CPU priority");
    }
}

/// Make the calling thread background work: Linux SCHED_IDLE, which runs only on CPU
/// time nothing else wants (nice 19 where that is refused). Several threads at nice 10
/// together still outweigh one service at nice 5 (CFS adds their weights); SCHED_IDLE
/// threads do not, however many there are. Threads created afterwards inherit it.
#[allow(unsafe_code)] // one libc call, see SAFETY
pub fn background_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`; `0` names the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "SCHED_IDLE refused; using nice 19");
        lower_priority(19);
    }
}

/// When a service last made progress, for a `/health` that says "stalled" when work waits
/// but nothing moves. Mark it when work reaches an idle queue and whenever a unit of work
/// starts or finishes; lock-free, cheap to share.
#[derive(Debug)]
pub struct StallClock {
    started: std::time::Instant,
    /// Milliseconds since `started` of the last mark.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for StallClock {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl StallClock {
    /// Progress now.
    pub fn mark(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Release);
    }

    /// False when `busy` (work waits) and the last mark is older than `stall`.
    pub fn progressing(&self, busy: bool, stall: std::time::Duration) -> bool {
        let last = std::time::Duration::from_millis(
            self.last_ms.load(std::sync::atomic::Ordering::Acquire),
        );
        !busy || self.started.elapsed().saturating_sub(last) < stall
    }
}

#[cfg(test)]
mod stall_tests {
    use super::StallClock;
    use std::time::Duration;

    #[test]
    fn a_busy_service_without_marks_stalls_and_a_mark_clears_it() {
        let clock = StallClock::default();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            clock.progressing(false, Duration::from_millis(10)),
            "idle is fine"
        );
        assert!(!clock.progressing(true, Duration::from_millis(10)));
        clock.mark();
        assert!(clock.progressing(true, Duration::from_millis(10)));
    }
}
