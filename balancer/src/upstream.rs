//! The calls a query makes to embedders and shards, and what keeps them from piling up:
//! - [`Upstreams`]: the seam. [`Grpc`] sends each call with its deadline as
//!   `grpc-timeout`, so the server drops work whose caller has given up; unit tests plug
//!   in fakes.
//! - [`Admission`]: a bounded number of queries in flight, and a line in front of them
//!   that a query joins only when its expected wait fits its deadline (else a fast
//!   refusal).
//! - [`RetryBudget`]: retries on other replicas are allowed while they are a small share
//!   of the calls in flight (Envoy's retry budget), so retries cannot multiply an overload.
//! - [`Outliers`]: a replica that fails several calls in a row is skipped for a while
//!   (outlier ejection) instead of costing every query an attempt timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simq_embedder::proto::{embedder_client::EmbedderClient, EmbedRequest};
use simq_shard_proto::{shard_client::ShardClient, LexicalRequest, SearchRequest, SearchResponse};

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
    /// Still unanswered when a hedge to another replica answered (the attempt was dropped).
    SlowerThanHedge,
    /// The instance does not offer this call (an older build); not a fault of its own.
    Unsupported(String),
    /// No connection could be made (refused, no route, connect timeout): the request never
    /// reached the instance, so asking another costs nobody a second piece of work.
    Unreachable(String),
}

impl CallError {
    /// Label for `simq_balancer_upstream_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::WrongDg(_) => "wrong_dg",
            CallError::Overloaded(_) => "overloaded",
            CallError::Failed(_) => "error",
            CallError::SlowerThanHedge => "slower_than_hedge",
            CallError::Unsupported(_) => "unsupported",
            CallError::Unreachable(_) => "unreachable",
        }
    }

    /// Does this failure count against the replica's health (outlier ejection)?
    pub fn is_replica_fault(&self) -> bool {
        matches!(
            self,
            CallError::Timeout
                | CallError::Failed(_)
                | CallError::SlowerThanHedge
                | CallError::Unreachable(_)
        )
    }

    /// Did the request never reach the instance? Then asking another replica is not a
    /// retry of the work, and needs no retry budget.
    pub fn never_sent(&self) -> bool {
        matches!(self, CallError::Unreachable(_))
    }

    fn from_status(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::FailedPrecondition => CallError::WrongDg(status.message().to_string()),
            tonic::Code::ResourceExhausted => CallError::Overloaded(status.message().to_string()),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => CallError::Timeout,
            tonic::Code::Unimplemented => CallError::Unsupported(status.message().to_string()),
            // tonic's transport errors: "tcp connect error", "error trying to connect".
            tonic::Code::Unavailable if status.message().contains("connect") => {
                CallError::Unreachable(status.message().to_string())
            }
            _ => CallError::Failed(status.message().to_string()),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "timed out"),
            CallError::SlowerThanHedge => write!(f, "slower than a hedge to another replica"),
            CallError::Unsupported(m) => write!(f, "not offered: {m}"),
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
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

    /// The light contour's search of one shard (BM25 over its texts, no model).
    fn lexical(
        &self,
        up: &Upstream,
        req: LexicalRequest,
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

    async fn lexical(
        &self,
        up: &Upstream,
        req: LexicalRequest,
        timeout: Duration,
    ) -> Result<SearchResponse, CallError> {
        let mut client = ShardClient::new(up.channel.get());
        let mut req = tonic::Request::new(req);
        req.set_timeout(timeout);
        with_deadline(timeout, client.lexical_search(req)).await
    }
}

/// Admission by time. At most `limit` queries are answered at once; a query that finds
/// no free place may wait in line while the wait it can expect, plus the time a query
/// holds its place, fits the time it has left (its deadline). The expected wait is the
/// queue ahead of it served `limit` at a time at the hold time ([`expected_wait`]): a
/// query that cannot be answered in time is refused at once (503 with a `Retry-After` of
/// that wait), one that can is not refused. A waiter checks again every [`RECHECK`] with
/// what it knows then (the places freed since it joined, the hold time, and how long no
/// place has freed up: a line that stalls means holds longer than the mean says) and
/// leaves as soon as it can no longer be answered in time, not at its deadline; so a
/// standing queue drains by refusals and never grows past what the deadline allows. A
/// [`Ticket`] holds its place until dropped (also when the query's future is dropped
/// mid-way) and then feeds the hold time it measured into the running mean.
pub struct Admission {
    limit: usize,
    places: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
    line: Arc<LineClock>,
}

/// What tickets tell waiters: the mean hold time, how many places have been given back,
/// and when the last one was.
struct LineClock {
    /// Mean seconds a query holds its place (EWMA, f64 bits).
    hold: AtomicU64,
    /// Places given back so far.
    released: AtomicU64,
    /// When the last place was given back (ms since `epoch`).
    last_release_ms: AtomicU64,
    epoch: Instant,
}

impl LineClock {
    fn mean_hold(&self) -> Duration {
        Duration::from_secs_f64(f64::from_bits(self.hold.load(Ordering::Acquire)))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The hold time assumed before any query has been measured.
const INITIAL_HOLD: Duration = Duration::from_millis(10);
/// Weight of the newest sample in the mean hold time: the mean follows a change of load
/// within about ten queries (a burst from idle meets holds many times the idle one).
const HOLD_EWMA_WEIGHT: f64 = 0.1;
/// A query stays in line only while this multiple of its expected wait, plus its own hold
/// time, fits what is left of its deadline: at most half of a deadline is spent in line,
/// so the estimate may be short by half before anyone who joined runs out of time (a
/// refusal after a wait costs the client that wait; one at the door costs nothing).
/// Measured: with 1.25 and no re-check, 200 polite clients of 4-question queries had 169
/// of 1,474 refused after about 2 s.
const WAIT_MARGIN: f64 = 2.0;
/// How often a waiter checks again whether it can still be answered in time.
pub const RECHECK: Duration = Duration::from_millis(50);

/// The wait a query can expect with `ahead` queries before it, `limit` places and a hold
/// time `hold`, when every place is taken: the line moves `limit` queries per `hold`, and
/// this query leaves it with the `ahead + 1`-th place that frees up.
pub fn expected_wait(ahead: usize, limit: usize, hold: Duration) -> Duration {
    hold.mul_f64((ahead + 1) as f64 / limit.max(1) as f64)
}

/// How much longer a query that has waited `waited` may wait, with `ahead` queries before
/// it: Ok(time) while twice the expected wait plus a hold fits `budget`, else Err(the
/// expected wait).
pub fn wait_allowance(
    ahead: usize,
    limit: usize,
    hold: Duration,
    waited: Duration,
    budget: Duration,
) -> Result<Duration, Duration> {
    let expected = expected_wait(ahead, limit, hold);
    budget
        .checked_sub(waited + hold)
        .filter(|w| *w >= expected.mul_f64(WAIT_MARGIN))
        .ok_or(expected)
}

/// One admitted query.
pub struct Ticket {
    _place: tokio::sync::OwnedSemaphorePermit,
    since: Instant,
    line: Arc<LineClock>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let sample = self.since.elapsed().as_secs_f64();
        let _ = self
            .line
            .hold
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                let mean = f64::from_bits(bits);
                Some((mean + HOLD_EWMA_WEIGHT * (sample - mean)).to_bits())
            });
        self.line
            .last_release_ms
            .store(self.line.now_ms(), Ordering::Release);
        self.line.released.fetch_add(1, Ordering::AcqRel);
    }
}

/// Why a query was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The line ahead would keep it waiting `expected`, which leaves no time to answer it
    /// before its deadline.
    TooLate { expected: Duration },
    /// It waited `waited`, then the line ahead would have kept it waiting `expected`
    /// more, too long to answer it in time.
    WaitedTooLong {
        waited: Duration,
        expected: Duration,
    },
}

impl Refusal {
    /// Seconds a client should wait before trying again: the wait the line promises
    /// now, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u32 {
        let wait = match self {
            Refusal::TooLate { expected } | Refusal::WaitedTooLong { expected, .. } => *expected,
        };
        (wait.as_secs_f64().ceil() as u32).max(1)
    }
}

/// Counts one waiting query until dropped.
struct InLine(Arc<AtomicUsize>);

impl Drop for InLine {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            places: Arc::new(tokio::sync::Semaphore::new(limit.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            line: Arc::new(LineClock {
                hold: AtomicU64::new(INITIAL_HOLD.as_secs_f64().to_bits()),
                released: AtomicU64::new(0),
                last_release_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// A place now, or after a wait that leaves time to answer within `budget` (the time
    /// the query has left), or a refusal: at once when the expected wait does not fit,
    /// or as soon as, waiting, it no longer does.
    pub async fn admit(&self, budget: Duration) -> Result<Ticket, Refusal> {
        let ticket = |place| Ticket {
            _place: place,
            since: Instant::now(),
            line: self.line.clone(),
        };
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(ticket(place));
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _in_line = InLine(self.waiting.clone());
        let joined = Instant::now();
        let joined_ms = self.line.now_ms();
        let released_at_join = self.line.released.load(Ordering::Acquire);
        // One acquire for the whole wait: the semaphore is fair, and a new acquire would
        // go to the back of the line.
        let acquire = self.places.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut first = true;
        loop {
            let waited = joined.elapsed();
            let freed = self.line.released.load(Ordering::Acquire) - released_at_join;
            let still_ahead = ahead.saturating_sub(freed as usize);
            // A line where no place has freed up for longer than the mean hold says the
            // holds now are at least that long.
            let last = self
                .line
                .last_release_ms
                .load(Ordering::Acquire)
                .max(joined_ms);
            let stalled = Duration::from_millis(self.line.now_ms().saturating_sub(last));
            let hold = self.line.mean_hold().max(stalled);
            let may_wait = match wait_allowance(still_ahead, self.limit, hold, waited, budget) {
                Ok(w) => w,
                Err(expected) if first => return Err(Refusal::TooLate { expected }),
                Err(expected) => return Err(Refusal::WaitedTooLong { waited, expected }),
            };
            first = false;
            tokio::select! {
                place = &mut acquire => {
                    return place.map(ticket).map_err(|_| Refusal::TooLate { expected: Duration::ZERO });
                }
                _ = tokio::time::sleep(may_wait.min(RECHECK)) => {}
            }
        }
    }

    /// Mean time a query holds its place, as measured.
    pub fn mean_hold(&self) -> Duration {
        self.line.mean_hold()
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

/// A hedge is sent when an attempt is still unanswered after this many times the
/// service's typical answer time ([`Hedging`]).
pub const HEDGE_FACTOR: u32 = 3;
/// Never hedge sooner: below it a hedge would mostly double healthy calls.
pub const HEDGE_MIN: Duration = Duration::from_millis(50);
/// Never wait longer for a hedge: a replica this late is as good as gone (a node that lost
/// power answers nothing, and no RST tells the caller so).
pub const HEDGE_MAX: Duration = Duration::from_millis(400);
const LATENCY_EWMA_WEIGHT: f64 = 0.05;

/// When to hedge, given the typical answer time of a service: [`HEDGE_FACTOR`] times it,
/// within [`HEDGE_MIN`]..=[`HEDGE_MAX`].
pub fn hedge_delay(typical: Duration) -> Duration {
    (typical * HEDGE_FACTOR).clamp(HEDGE_MIN, HEDGE_MAX)
}

/// The typical answer time of one service (an EWMA of answered calls), which sets how
/// long a call waits before a second replica is asked the same thing ("hedged request",
/// Dean and Barroso, The Tail at Scale). A replica on a node that lost power, froze or
/// was cut off answers nothing and no error comes back; the hedge answers instead, well
/// within the query's deadline.
#[derive(Default)]
pub struct Hedging {
    /// The EWMA in microseconds (0 until the first answer).
    typical_us: AtomicU64,
}

impl Hedging {
    /// Note the time an answered call took.
    pub fn observe(&self, took: Duration) {
        let sample = took.as_micros() as f64;
        let _ = self
            .typical_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let next = if old == 0 {
                    sample
                } else {
                    old as f64 + LATENCY_EWMA_WEIGHT * (sample - old as f64)
                };
                Some(next.max(1.0) as u64)
            });
    }

    /// How long an attempt may go unanswered before a hedge is sent.
    pub fn delay(&self) -> Duration {
        hedge_delay(Duration::from_micros(
            self.typical_us.load(Ordering::Acquire),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hedge_waits_three_typical_answer_times_within_its_bounds() {
        assert_eq!(hedge_delay(Duration::ZERO), HEDGE_MIN);
        assert_eq!(hedge_delay(Duration::from_millis(10)), HEDGE_MIN);
        assert_eq!(
            hedge_delay(Duration::from_millis(40)),
            Duration::from_millis(120)
        );
        assert_eq!(hedge_delay(Duration::from_secs(1)), HEDGE_MAX);
    }

    #[test]
    fn the_typical_answer_time_follows_answers_slowly() {
        let h = Hedging::default();
        assert_eq!(h.delay(), HEDGE_MIN, "no answer yet: the shortest delay");
        h.observe(Duration::from_millis(40));
        assert_eq!(
            h.delay(),
            Duration::from_millis(120),
            "the first answer sets it"
        );
        h.observe(Duration::from_millis(1040));
        let after_outlier = h.delay();
        assert!(
            after_outlier > Duration::from_millis(120)
                && after_outlier < Duration::from_millis(300),
            "one slow answer moves it by a twentieth: {after_outlier:?}"
        );
    }

    #[test]
    fn expected_wait_is_the_line_ahead_served_limit_at_a_time() {
        let hold = Duration::from_millis(100);
        assert_eq!(expected_wait(0, 4, hold), Duration::from_millis(25));
        assert_eq!(expected_wait(7, 4, hold), Duration::from_millis(200));
        assert_eq!(expected_wait(0, 1, hold), hold);
        // 32 clients resending at once on 16 places at 100 ms a query: the 16 waiting
        // expect at most 100 ms, well inside a 1 s deadline.
        assert_eq!(expected_wait(15, 16, hold), hold);
    }

    #[test]
    fn retry_after_is_the_promised_wait_rounded_up_and_at_least_a_second() {
        let late = |ms| Refusal::TooLate {
            expected: Duration::from_millis(ms),
        };
        assert_eq!(late(0).retry_after_secs(), 1);
        assert_eq!(late(900).retry_after_secs(), 1);
        assert_eq!(late(2100).retry_after_secs(), 3);
    }

    #[tokio::test]
    async fn a_query_waits_when_its_expected_wait_fits_its_budget_and_is_refused_at_once_when_not()
    {
        let a = Arc::new(Admission::new(1));
        let held = a.admit(Duration::from_secs(1)).await.unwrap();
        // Mean hold 10 ms (nothing measured yet): one waiter expects 10 ms, fits 1 s.
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(Duration::from_secs(1)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.waiting(), 1);
        // With a 45 ms budget, the second in line (20 ms expected, with the margin 40 ms,
        // + 10 ms hold) does not fit: refused at once, saying what it would have waited.
        let started = Instant::now();
        assert_eq!(
            a.admit(Duration::from_millis(45)).await.err(),
            Some(Refusal::TooLate {
                expected: Duration::from_millis(20)
            })
        );
        assert!(started.elapsed() < Duration::from_millis(5));
        // A place frees up: the waiter gets it; its ticket gives it back when dropped.
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!((a.inflight(), a.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_leaves_when_its_time_runs_out_and_a_cancelled_one_leaves_the_line() {
        let a = Arc::new(Admission::new(1));
        let _held = a.admit(Duration::from_secs(1)).await.unwrap();
        // Budget 60 ms, hold 10 ms: it may wait 50 ms, then it is refused.
        let started = Instant::now();
        let refused = a.admit(Duration::from_millis(60)).await.err().unwrap();
        let waited = started.elapsed();
        assert!(
            matches!(refused, Refusal::WaitedTooLong { .. }),
            "{refused:?}"
        );
        assert!(
            waited >= Duration::from_millis(45) && waited < Duration::from_millis(150),
            "{waited:?}"
        );
        let cancelled = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(Duration::from_secs(5)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.waiting(), 1);
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(a.waiting(), 0);
    }

    #[test]
    fn a_waiter_may_wait_while_twice_its_expected_wait_and_a_hold_fit_its_budget() {
        let ms = Duration::from_millis;
        // 15 ahead on 16 places at 100 ms: 100 ms expected, 2 x 100 + 100 fits 1 s.
        assert_eq!(
            wait_allowance(15, 16, ms(100), ms(0), ms(1000)),
            Ok(ms(900))
        );
        // After 750 ms in line, 250 ms are left: 2 x 100 + 100 no longer fits.
        assert_eq!(
            wait_allowance(15, 16, ms(100), ms(750), ms(1000)),
            Err(ms(100))
        );
        // A deadline already spent.
        assert_eq!(
            wait_allowance(0, 16, ms(100), ms(1200), ms(1000)),
            Err(ms(6) + Duration::from_micros(250))
        );
    }

    #[tokio::test]
    async fn a_stalled_line_sends_its_waiters_away_long_before_their_deadline() {
        let a = Admission::new(1);
        let _stuck = a.admit(Duration::from_secs(1)).await.unwrap();
        // No place frees up: the hold time must be at least as long as the stall, so the
        // waiter gives up once twice that and a hold no longer fit, not at its deadline.
        let started = Instant::now();
        let refused = a.admit(Duration::from_millis(600)).await.err().unwrap();
        let waited = started.elapsed();
        assert!(
            matches!(refused, Refusal::WaitedTooLong { .. }),
            "{refused:?}"
        );
        assert!(
            waited >= Duration::from_millis(140) && waited < Duration::from_millis(350),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn the_mean_hold_time_follows_what_tickets_measure() {
        let a = Admission::new(4);
        for _ in 0..200 {
            let t = a.admit(Duration::from_secs(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(t);
        }
        let hold = a.mean_hold();
        assert!(
            hold >= Duration::from_millis(25) && hold < Duration::from_millis(60),
            "{hold:?}"
        );
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
