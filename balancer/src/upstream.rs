//! The calls a query makes to embedders and shards, and what keeps them from piling up:
//! - [`Upstreams`]: the seam. [`Grpc`] sends each call with its deadline as
//!   `grpc-timeout`, so the server drops work whose caller has given up; unit tests plug
//!   in fakes.
//! - [`Admission`]: a bounded number of queries in flight; beyond it a fast refusal.
//! - [`RetryBudget`]: retries on other replicas are allowed while they are a small share
//!   of the calls in flight (Envoy's retry budget), so retries cannot multiply an overload.
//! - [`Outliers`]: a replica that fails several calls in a row is skipped for a while
//!   (outlier ejection) instead of costing every query an attempt timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simq_embedder::proto::{embedder_client::EmbedderClient, EmbedRequest};
use simq_shard::proto::{shard_client::ShardClient, SearchRequest, SearchResponse};

use crate::state::Upstream;

/// Why one upstream call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer within the attempt's timeout.
    Timeout,
    /// The instance serves another dg (shards) and refused.
    WrongDg(String),
    /// The instance refused because it is full; another replica may not be.
    Overloaded(String),
    /// Any other failure.
    Failed(String),
}

impl CallError {
    /// Label for `simq_balancer_upstream_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::WrongDg(_) => "wrong_dg",
            CallError::Overloaded(_) => "overloaded",
            CallError::Failed(_) => "error",
        }
    }

    /// Does this failure count against the replica's health (outlier ejection)?
    pub fn is_replica_fault(&self) -> bool {
        matches!(self, CallError::Timeout | CallError::Failed(_))
    }

    fn from_status(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::FailedPrecondition => CallError::WrongDg(status.message().to_string()),
            tonic::Code::ResourceExhausted => CallError::Overloaded(status.message().to_string()),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => CallError::Timeout,
            _ => CallError::Failed(status.message().to_string()),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "timed out"),
            CallError::WrongDg(m) | CallError::Overloaded(m) | CallError::Failed(m) => {
                write!(f, "{m}")
            }
        }
    }
}

/// What an embedder answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub model_id: String,
}

/// The two calls of the query path. Each must give up after `timeout` and tell the
/// server so (gRPC: the `grpc-timeout` header).
pub trait Upstreams: Send + Sync + 'static {
    fn embed(
        &self,
        up: &Upstream,
        text: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Embedded, CallError>> + Send;

    fn search(
        &self,
        up: &Upstream,
        req: SearchRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<SearchResponse, CallError>> + Send;
}

/// The real upstreams, over each instance's gRPC channel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grpc;

/// Run `call` with its deadline sent along and enforced here as well.
async fn with_deadline<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(status)) => Err(CallError::from_status(status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

impl Upstreams for Grpc {
    async fn embed(
        &self,
        up: &Upstream,
        text: &str,
        timeout: Duration,
    ) -> Result<Embedded, CallError> {
        let mut client = EmbedderClient::new(up.channel.get());
        let mut req = tonic::Request::new(EmbedRequest {
            texts: vec![text.to_string()],
        });
        req.set_timeout(timeout);
        let resp = with_deadline(timeout, client.embed(req)).await?;
        Ok(Embedded {
            vector: resp.vectors,
            model_id: resp.model_id,
        })
    }

    async fn search(
        &self,
        up: &Upstream,
        req: SearchRequest,
        timeout: Duration,
    ) -> Result<SearchResponse, CallError> {
        let mut client = ShardClient::new(up.channel.get());
        let mut req = tonic::Request::new(req);
        req.set_timeout(timeout);
        with_deadline(timeout, client.search(req)).await
    }
}

/// Bounded queries in flight, with a short bounded line in front: a query beyond `limit`
/// waits at most `max_wait` for a place, and when `max_waiting` already wait it is refused
/// at once. A [`Ticket`] holds its place until dropped, also when the query's future is
/// dropped mid-way.
///
/// The line absorbs bursts, not sustained overload: once a waiter has been refused for
/// waiting too long, queries that find no free place are refused at once for
/// `max_wait * CONGESTED_WAITS` (as CoDel stops queueing once the queue stays full), so
/// under sustained overload a refusal costs milliseconds, not `max_wait`.
pub struct Admission {
    limit: usize,
    places: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    max_wait: Duration,
    /// When the last waiter was refused for waiting too long (ms since `epoch`, 0 = never).
    last_timeout_ms: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

/// How long (in multiples of `max_wait`) the line stays closed after a waiter timed out.
const CONGESTED_WAITS: u32 = 25;

/// One admitted query.
pub struct Ticket {
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// Why a query was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_waiting` queries already wait.
    LineFull,
    /// No place freed up within `max_wait`.
    WaitedTooLong,
    /// No place free, and a waiter ran out of time a moment ago: no use waiting.
    Congested,
}

/// Counts one waiting query until dropped.
struct InLine(Arc<AtomicUsize>);

impl Drop for InLine {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(limit: usize, max_waiting: usize, max_wait: Duration) -> Self {
        Self {
            limit: limit.max(1),
            places: Arc::new(tokio::sync::Semaphore::new(limit.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            max_wait,
            last_timeout_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A place now, or after a short wait, or a refusal.
    pub async fn admit(&self) -> Result<Ticket, Refusal> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(Ticket { _place: place });
        }
        if self.congested() {
            return Err(Refusal::Congested);
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _in_line = InLine(self.waiting.clone());
        if before >= self.max_waiting {
            return Err(Refusal::LineFull);
        }
        match tokio::time::timeout(self.max_wait, self.places.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(Ticket { _place: place }),
            _ => {
                let now = self.epoch.elapsed().as_millis() as u64;
                self.last_timeout_ms.store(now.max(1), Ordering::Release);
                Err(Refusal::WaitedTooLong)
            }
        }
    }

    /// Did a waiter run out of time within the last `max_wait * CONGESTED_WAITS`?
    fn congested(&self) -> bool {
        let last = self.last_timeout_ms.load(Ordering::Acquire);
        let window = (self.max_wait * CONGESTED_WAITS).as_millis() as u64;
        last != 0 && (self.epoch.elapsed().as_millis() as u64) < last + window
    }

    /// Queries holding a place now.
    pub fn inflight(&self) -> usize {
        self.limit - self.places.available_permits()
    }

    /// Queries waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Envoy-style retry budget: a retry may start while retries in flight stay below
/// `ratio` of all calls in flight, or below `min_concurrent`.
pub struct RetryBudget {
    ratio: f64,
    min_concurrent: usize,
    calls: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
}

/// One call (first attempt or retry) counted in the budget until dropped.
pub struct Attempt {
    counter: Arc<AtomicUsize>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, min_concurrent: usize) -> Self {
        Self {
            ratio,
            min_concurrent,
            calls: Arc::new(AtomicUsize::new(0)),
            retries: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn count(counter: &Arc<AtomicUsize>) -> Attempt {
        counter.fetch_add(1, Ordering::AcqRel);
        Attempt {
            counter: counter.clone(),
        }
    }

    /// Count a first attempt (always allowed).
    pub fn call(&self) -> Attempt {
        Self::count(&self.calls)
    }

    /// Count a retry, or None when the budget is spent.
    pub fn retry(&self) -> Option<Attempt> {
        let calls = self.calls.load(Ordering::Acquire);
        let retries = self.retries.load(Ordering::Acquire);
        let allowed = ((calls as f64 * self.ratio) as usize).max(self.min_concurrent);
        (retries < allowed).then(|| Self::count(&self.retries))
    }
}

/// Replicas that failed `threshold` calls in a row are ejected for `ejection`.
pub struct Outliers {
    threshold: u32,
    ejection: Duration,
    replicas: Mutex<HashMap<String, ReplicaRecord>>,
}

#[derive(Default)]
struct ReplicaRecord {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
}

impl Outliers {
    pub fn new(threshold: u32, ejection: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            ejection,
            replicas: Mutex::new(HashMap::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplicaRecord>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the outcome of a call to `addr` at `now`; true when this ejects it.
    pub fn record(&self, addr: &str, ok: bool, now: Instant) -> bool {
        let mut records = self.records();
        let r = records.entry(addr.to_string()).or_default();
        if ok {
            *r = ReplicaRecord::default();
            return false;
        }
        r.consecutive_failures += 1;
        if r.consecutive_failures >= self.threshold && r.ejected_until.is_none_or(|t| t <= now) {
            r.ejected_until = Some(now + self.ejection);
            r.consecutive_failures = 0;
            return true;
        }
        false
    }

    /// Is `addr` ejected at `now`?
    pub fn is_ejected(&self, addr: &str, now: Instant) -> bool {
        self.records()
            .get(addr)
            .and_then(|r| r.ejected_until)
            .is_some_and(|t| t > now)
    }

    /// `list` with ejected replicas moved to the end (still tried when nothing else is
    /// left: ejection never makes a shard unreachable on its own).
    pub fn order<'a>(&self, list: Vec<&'a Upstream>, now: Instant) -> Vec<&'a Upstream> {
        let (mut ok, ejected): (Vec<_>, Vec<_>) = list
            .into_iter()
            .partition(|u| !self.is_ejected(&u.addr, now));
        ok.extend(ejected);
        ok
    }

    /// Replicas ejected right now.
    pub fn ejected(&self, now: Instant) -> usize {
        self.records()
            .values()
            .filter(|r| r.ejected_until.is_some_and(|t| t > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_queues_a_few_briefly_refuses_the_rest_and_tickets_give_places_back() {
        let a = Arc::new(Admission::new(2, 1, Duration::from_millis(200)));
        let t1 = a.admit().await.unwrap();
        let _t2 = a.admit().await.unwrap();
        // The third waits in line; the fourth finds the line full and is refused at once.
        let third = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.waiting(), 1);
        let started = Instant::now();
        assert_eq!(a.admit().await.err(), Some(Refusal::LineFull));
        assert!(started.elapsed() < Duration::from_millis(5));
        // A place frees up: the waiting one gets it.
        drop(t1);
        assert_eq!(third.await.unwrap(), Ok(()));
        assert_eq!(
            (a.inflight(), a.waiting()),
            (1, 0),
            "the third's ticket was dropped"
        );
        // A wait is bounded in time, and a cancelled wait leaves the line.
        let _t3 = a.admit().await.unwrap();
        assert_eq!(a.admit().await.err(), Some(Refusal::WaitedTooLong));
        let cancelled = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(a.waiting(), 0);
    }

    #[tokio::test]
    async fn after_a_wait_runs_out_the_line_closes_for_a_while_then_opens_again() {
        let a = Admission::new(1, 4, Duration::from_millis(10));
        let held = a.admit().await.unwrap();
        assert_eq!(a.admit().await.err(), Some(Refusal::WaitedTooLong));
        // Sustained overload: no more waiting, refusals are immediate.
        let started = Instant::now();
        assert_eq!(a.admit().await.err(), Some(Refusal::Congested));
        assert!(started.elapsed() < Duration::from_millis(5));
        // A free place is still taken at once while congested.
        drop(held);
        let held = a.admit().await.expect("a free place admits");
        // After the window the line opens again (and the wait runs out again).
        tokio::time::sleep(Duration::from_millis(10) * CONGESTED_WAITS).await;
        assert_eq!(a.admit().await.err(), Some(Refusal::WaitedTooLong));
        drop(held);
    }

    #[test]
    fn retries_stay_within_a_share_of_calls_in_flight() {
        let b = RetryBudget::new(0.2, 1);
        let calls: Vec<Attempt> = (0..10).map(|_| b.call()).collect();
        let r1 = b.retry().expect("2 retries allowed for 10 calls");
        let _r2 = b.retry().expect("2 retries allowed for 10 calls");
        assert!(b.retry().is_none(), "third retry is over budget");
        drop(r1);
        assert!(b.retry().is_some(), "a finished retry frees budget");
        drop(calls);
        let idle = RetryBudget::new(0.2, 1);
        assert!(
            idle.retry().is_some(),
            "min_concurrent allows a retry when idle"
        );
    }

    #[test]
    fn a_replica_failing_in_a_row_is_ejected_for_a_while_then_back() {
        let o = Outliers::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!o.record("a", false, t0));
        assert!(!o.record("a", true, t0), "a success resets the count");
        assert!(!o.record("a", false, t0));
        assert!(!o.record("a", false, t0));
        assert!(o.record("a", false, t0), "third failure in a row ejects");
        assert!(o.is_ejected("a", t0 + Duration::from_secs(9)));
        assert!(!o.is_ejected("a", t0 + Duration::from_secs(11)));
        assert!(!o.is_ejected("b", t0));
        assert_eq!(o.ejected(t0), 1);
    }

    #[tokio::test]
    async fn ejected_replicas_go_last_but_are_not_dropped() {
        let up = |addr: &str| Upstream {
            id: addr.into(),
            addr: addr.into(),
            channel: crate::state::LazyChannel::new("127.0.0.1:1").unwrap(),
        };
        let (a, b) = (up("a"), up("b"));
        let o = Outliers::new(1, Duration::from_secs(10));
        let now = Instant::now();
        o.record("a", false, now);
        let order: Vec<&str> = o
            .order(vec![&a, &b], now)
            .iter()
            .map(|u| u.addr.as_str())
            .collect();
        assert_eq!(order, vec!["b", "a"]);
    }

    #[test]
    fn overload_and_wrong_dg_are_not_replica_faults() {
        assert!(CallError::Timeout.is_replica_fault());
        assert!(!CallError::Overloaded("full".into()).is_replica_fault());
        assert!(!CallError::WrongDg("dg-x".into()).is_replica_fault());
        assert_eq!(
            CallError::from_status(tonic::Status::resource_exhausted("x")),
            CallError::Overloaded("x".into())
        );
    }
}
