//! The gRPC search service over one verified shard file. At most a bounded number of
//! searches run at once ([`SearchPool`]); a caller that goes away (or whose `grpc-timeout`
//! passes: tonic drops the handler) before its search starts costs nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use simq_runtime::service::StallClock;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::format::ShardFile;
use crate::proto;

/// The longest text a lexical search takes (the balancer's own query limit is below it).
pub const MAX_LEXICAL_TEXT_BYTES: usize = 4096;

/// Per-request bounds, so no request can make the service allocate without bound.
#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    pub max_k: usize,
    /// Clusters one request may name.
    pub max_clusters: usize,
}

impl Default for SearchLimits {
    fn default() -> Self {
        Self {
            max_k: 100,
            max_clusters: 1024,
        }
    }
}

/// Runs at most `workers` searches at once; at most `max_waiting` more wait for a turn,
/// further ones are refused at once (the balancer tries another replica).
///
/// A search runs on the runtime thread that handles its request, not on a thread it is
/// handed to: a search takes about half a millisecond, and handing it over and back woke
/// two more threads per call, which on an idle virtual machine costs more than the
/// search itself saves by moving (shard call 1.17-1.24 against 1.01-1.11 ms as the
/// balancer saw it, interleaved runs of unique queries one at a time). The shard's
/// runtime has one worker thread more than `workers` (see [`runtime_workers`]), so that
/// accepting, refusing and /health always have a thread while searches run.
pub struct SearchPool {
    workers: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    gauge: IntGauge,
    /// Marked when searches reach an idle pool and when one finishes.
    progress: Arc<StallClock>,
}

/// Counts one waiting search; the count drops when the guard does, also when the waiting
/// future is dropped (cancelled).
struct Waiting {
    count: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let now = self.count.fetch_sub(1, Ordering::AcqRel) - 1;
        self.gauge.set(now as i64);
    }
}

impl SearchPool {
    pub fn new(workers: usize, max_waiting: usize, gauge: IntGauge) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(workers.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            gauge,
            progress: Arc::new(StallClock::default()),
        }
    }

    /// False when searches wait but none has finished for `stall` (counted from when the
    /// pool last became busy): the shard cannot do its job and /health says so.
    pub fn progressing(&self, stall: std::time::Duration) -> bool {
        self.progress.progressing(self.waiting() > 0, stall)
    }

    /// Searches waiting for a worker now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Run `work` on this thread once a turn is free; `None` when the pool is full.
    pub async fn run<T>(&self, work: impl FnOnce() -> T) -> Option<T> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let waiting = Waiting {
            count: self.waiting.clone(),
            gauge: self.gauge.clone(),
        };
        if before >= self.max_waiting && self.workers.available_permits() == 0 {
            return None;
        }
        if before == 0 {
            // An idle pool gets work: the stall clock starts now.
            self.progress.mark();
        }
        self.gauge.set(before as i64 + 1);
        let permit = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        drop(waiting);
        // No await from here on: the search runs to its end with the permit held.
        let out = work();
        drop(permit);
        self.progress.mark();
        Some(out)
    }
}

/// Worker threads of the shard's runtime for `search_threads` searches at once: one more,
/// which no search can take (see [`SearchPool`]).
pub fn runtime_workers(search_threads: usize) -> usize {
    search_threads.max(1) + 1
}

/// The shard's Prometheus metrics.
#[derive(Clone)]
pub struct ShardMetrics {
    pub requests: IntCounterVec,
    pub search: Histogram,
    pub waiting: IntGauge,
}

impl ShardMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "simq_shard_requests_total",
                    "Search requests by outcome (ok, invalid, wrong_dg, overloaded, error).",
                ),
                &["outcome"],
            )?,
            search: Histogram::with_opts(
                HistogramOpts::new("simq_shard_search_seconds", "Time to answer one search.")
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
            waiting: IntGauge::new(
                "simq_shard_waiting_searches",
                "Searches waiting for a turn to run.",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.search.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        Ok(m)
    }
}

/// Whether a shard serving `served_dg` from a file with sha256 `served_sha256` may
/// answer a request routing with `dg` that pins `pinned_sha256` for it (empty: unknown).
pub fn serves(served_dg: &str, served_sha256: &str, dg: &str, pinned_sha256: &str) -> bool {
    dg == served_dg || (!pinned_sha256.is_empty() && pinned_sha256 == served_sha256)
}

/// Implements `simq.shard.v1.Shard` for one dg's shard.
pub struct ShardService {
    pub file: Arc<ShardFile>,
    pub dg: String,
    pub sha256: String,
    pub limits: SearchLimits,
    pub metrics: ShardMetrics,
    pub pool: Arc<SearchPool>,
}

impl ShardService {
    /// The dg a request routes with must be the served one, or one that pins this very
    /// file (its manifest's sha256 for this shard, sent with the request): generations
    /// never mix, and an incremental dg's unchanged shards are its base's files.
    fn check_dg(&self, dg: &str, shard_sha256: &str) -> Result<(), (&'static str, Status)> {
        if !serves(&self.dg, &self.sha256, dg, shard_sha256) {
            return Err((
                "wrong_dg",
                Status::failed_precondition(format!(
                    "this shard serves dg {} (file sha256 {}), the request routes with dg {dg:?} pinning {:?}",
                    self.dg, self.sha256, shard_sha256
                )),
            ));
        }
        Ok(())
    }

    fn check_lexical(&self, req: &proto::LexicalRequest) -> Result<(), (&'static str, Status)> {
        self.check_dg(&req.dg, &req.shard_sha256)?;
        if self.file.meta().lexical.is_none() {
            return Err((
                "no_lexical_index",
                Status::unimplemented(format!(
                    "shard {} of dg {} has no lexical index (built before simq had one)",
                    self.file.meta().shard,
                    self.dg
                )),
            ));
        }
        let invalid = |m: String| Err(("invalid", Status::invalid_argument(m)));
        if req.k == 0 || req.k as usize > self.limits.max_k {
            return invalid(format!("k is {}, must be 1..={}", req.k, self.limits.max_k));
        }
        if req.text.len() > MAX_LEXICAL_TEXT_BYTES {
            return invalid(format!(
                "text is {} bytes, at most {MAX_LEXICAL_TEXT_BYTES}",
                req.text.len()
            ));
        }
        Ok(())
    }

    /// The response to a search that ran in the pool (None: refused, the line was full).
    /// `dg`: the dg the request routes with (checked: this file is that dg's).
    fn answer(
        &self,
        dg: String,
        started: Instant,
        ran: Option<crate::Result<Vec<crate::Hit>>>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let Some(hits) = ran else {
            self.metrics
                .requests
                .with_label_values(&["overloaded"])
                .inc();
            return Err(Status::resource_exhausted(format!(
                "{} searches already wait for this shard",
                self.pool.waiting()
            )));
        };
        self.metrics.search.observe(started.elapsed().as_secs_f64());
        match hits {
            Ok(hits) => {
                self.metrics.requests.with_label_values(&["ok"]).inc();
                Ok(Response::new(proto::SearchResponse {
                    hits: hits
                        .into_iter()
                        .map(|h| proto::Hit {
                            id: h.id,
                            text: h.text,
                            score: h.score,
                        })
                        .collect(),
                    dg,
                    shard: self.file.meta().shard,
                }))
            }
            Err(e) => {
                self.metrics.requests.with_label_values(&["error"]).inc();
                Err(Status::internal(e.to_string()))
            }
        }
    }

    fn check(&self, req: &proto::SearchRequest) -> Result<(), (&'static str, Status)> {
        self.check_dg(&req.dg, &req.shard_sha256)?;
        let dims = self.file.meta().dims;
        let invalid = |m: String| Err(("invalid", Status::invalid_argument(m)));
        if req.vector.len() != dims {
            return invalid(format!(
                "vector has {} dims, this shard has {dims}",
                req.vector.len()
            ));
        }
        if req.vector.iter().any(|x| !x.is_finite()) {
            return invalid("vector has a NaN or infinite component".into());
        }
        if req.k == 0 || req.k as usize > self.limits.max_k {
            return invalid(format!("k is {}, must be 1..={}", req.k, self.limits.max_k));
        }
        if req.clusters.len() > self.limits.max_clusters {
            return invalid(format!(
                "{} clusters asked, at most {}",
                req.clusters.len(),
                self.limits.max_clusters
            ));
        }
        if let Some(c) = req.clusters.iter().find(|c| !self.file.has_cluster(**c)) {
            return invalid(format!(
                "shard {} of dg {} holds no cluster {c}",
                self.file.meta().shard,
                self.dg
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::shard_server::Shard for ShardService {
    async fn search(
        &self,
        request: Request<proto::SearchRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let req = request.into_inner();
        if let Err((outcome, status)) = self.check(&req) {
            self.metrics.requests.with_label_values(&[outcome]).inc();
            return Err(status);
        }
        let started = Instant::now();
        let file = self.file.clone();
        let dg = req.dg.clone();
        let search = move || file.search(&req.vector, req.k as usize, &req.clusters);
        self.answer(dg, started, self.pool.run(search).await)
    }

    async fn lexical_search(
        &self,
        request: Request<proto::LexicalRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let req = request.into_inner();
        if let Err((outcome, status)) = self.check_lexical(&req) {
            self.metrics.requests.with_label_values(&[outcome]).inc();
            return Err(status);
        }
        let started = Instant::now();
        let file = self.file.clone();
        let dg = req.dg.clone();
        let search = move || file.lexical_search(&req.text, req.k as usize);
        self.answer(dg, started, self.pool.run(search).await)
    }

    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let m = self.file.meta();
        Ok(Response::new(proto::InfoResponse {
            dg: self.dg.clone(),
            shard: m.shard,
            model_id: m.model_id.clone(),
            dims: m.dims as u32,
            items: m.items,
            sha256: self.sha256.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_shard_answers_for_its_dg_and_for_any_dg_that_pins_its_file() {
        let (dg, sha) = ("dg-aaaa", "5ha");
        assert!(serves(dg, sha, "dg-aaaa", ""));
        assert!(serves(dg, sha, "dg-aaaa", "other"), "its own dg");
        assert!(
            serves(dg, sha, "dg-bbbb", "5ha"),
            "an incremental dg keeping the file"
        );
        assert!(!serves(dg, sha, "dg-bbbb", "other"));
        assert!(!serves(dg, sha, "dg-bbbb", ""), "no pin: by dg only");
    }

    // Searches block the worker they run on, as in the service, whose runtime has a worker
    // more than the pool's turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pool_refuses_at_once_and_a_cancelled_wait_gives_its_place_back() {
        let pool = Arc::new(SearchPool::new(1, 1, IntGauge::new("w", "w").unwrap()));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || hold.recv().ok()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // One waits for the busy worker...
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.waiting(), 1);
        // ...so the next is refused at once.
        assert_eq!(pool.run(|| 2).await, None);
        assert_eq!(pool.waiting(), 1, "a refusal leaves no count behind");
        assert!(
            !pool.progressing(Duration::from_millis(10)),
            "waiting, nothing finishes"
        );
        // The waiter's caller goes away: its place is free again.
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(pool.waiting(), 0);
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 3).await })
        };
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Some(Some(())));
        assert_eq!(queued.await.unwrap(), Some(3));
        assert_eq!(pool.waiting(), 0);
        assert!(pool.progressing(Duration::from_millis(10)));
    }
}
