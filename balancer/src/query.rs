//! Answering one query with one routing snapshot: admit it (or refuse fast), embed,
//! probe the nearest fine clusters on the shards that hold them (retrying other replicas
//! within the retry budget, routing around a shard without healthy replicas to the
//! next-nearest clusters), merge the top k. Every call carries what is left of the
//! query's deadline.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use simq_contract::Arm;
use simq_shard_proto::{LexicalRequest, SearchRequest, SearchResponse};

use crate::metrics::Metrics;
use crate::request::{ApiError, ApiErrorKind, QueryRequest};
use crate::state::{Routing, Upstream};
use crate::upstream::{
    Admission, Attempt, CallError, Grpc, Hedging, Outliers, Refusal, RetryBudget, Upstreams,
};

/// One result row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResultRow {
    pub text: String,
    pub score: f32,
    pub shard: u32,
}

/// The JSON answer of `POST /v1/query`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub query: String,
    /// The most similar stored query (None when the shards returned nothing).
    pub similar: Option<String>,
    pub score: Option<f32>,
    pub results: Vec<ResultRow>,
    /// The dg every part of this answer came from.
    pub dg: String,
    /// The arm of the traffic split that answered: `active`, or `candidate` for a user
    /// the split sends to the candidate dg.
    pub arm: Arm,
    pub took_ms: f64,
    /// Which path answered: `model` (embedding and nearest clusters) or `lexical` (the
    /// light contour: BM25 over the texts, when no embedder could answer in time).
    pub contour: Contour,
    /// True when the answer is not the model's best: a shard holding one of the nearest
    /// clusters could not answer and farther clusters answered instead, or the light
    /// contour answered.
    pub degraded: bool,
    /// What was degraded, for people reading the answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub cached: bool,
}

/// The path that answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Contour {
    Model,
    Lexical,
}

/// How long a query refused by the model's line waits for a place of the light contour
/// before it is refused at the door: short, so that a refusal stays fast (a polite client
/// waits its Retry-After anyway), and long enough that a client which resends at once is
/// paced by it instead of spinning refusals on the cores that answer.
pub const LEXICAL_DOOR_WAIT: Duration = Duration::from_millis(20);

/// How long a query that the model's line refused (`refusal`, with `left` of its deadline)
/// may wait for a place of the light contour: at the door [`LEXICAL_DOOR_WAIT`]; after a
/// wait in line whatever is left but the light contour's own [`LEXICAL_RESERVE`], since a
/// degraded answer after that wait serves the client better than a late 503.
pub fn lexical_wait(refusal: &Refusal, left: Duration) -> Duration {
    match refusal {
        Refusal::TooLate { .. } => LEXICAL_DOOR_WAIT.min(left),
        Refusal::WaitedTooLong { .. } => left.saturating_sub(LEXICAL_RESERVE),
    }
}

/// Time the model path leaves for the light contour: an embedder that has not answered
/// this long before the query's deadline leaves the rest of it to the lexical search.
pub const LEXICAL_RESERVE: Duration = Duration::from_millis(300);

/// Query settings.
#[derive(Debug, Clone, Copy)]
pub struct QueryOptions {
    /// Fine clusters probed per query.
    pub nprobe: usize,
    /// Whole-request deadline.
    pub deadline: Duration,
    /// Per-attempt timeout of one shard call (a retry goes to another replica).
    pub attempt_timeout: Duration,
    /// Timeout of one embedder call. Longer than a shard attempt: under load a call
    /// waits for its batch, and another embedder is as busy.
    pub embed_timeout: Duration,
    /// Cache-miss queries answered at once at most; more wait in line while the wait
    /// they can expect fits their deadline, the rest are refused at once with 503 and
    /// Retry-After ([`Admission`]).
    pub max_inflight: usize,
    /// How embedders share the calls.
    pub embedder_order: EmbedderOrder,
    /// This balancer's own address (of --listen), which [`EmbedderOrder::Local`] prefers.
    pub local_host: Option<std::net::IpAddr>,
    /// Queries the admission refused that the light contour may answer at once; more
    /// wait for a place up to [`lexical_wait`] (0: such queries are refused with 503).
    pub lexical_slots: usize,
}

/// How the balancer picks an embedder for each query (ejected ones always come last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbedderOrder {
    /// Round robin: every embedder gets a share (embedders on their own hosts).
    Spread,
    /// The same order for every query and every balancer (by Consul service id): the
    /// first healthy embedder gets every call, the others take over when it fails or is
    /// ejected. For embedders sharing one host's cores, where splitting the calls only
    /// makes smaller batches (BENCHMARKS.md: 147 against 163 queries/s on 2 cores).
    Stable,
    /// Embedders on this balancer's own node (same address as --listen) first, round
    /// robin among them, then the others round robin: one balancer per node, each using
    /// its node's embedder, and a lost node costs the others nothing but its own share.
    Local,
}

/// `list` with the upstreams whose address is `host` first, each part in its order.
pub fn local_first(list: Vec<&Upstream>, host: Option<std::net::IpAddr>) -> Vec<&Upstream> {
    let on_host = |u: &Upstream| {
        host.is_some_and(|h| {
            u.addr
                .rsplit_once(':')
                .and_then(|(a, _)| a.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
                == Some(h)
        })
    };
    let (mut near, far): (Vec<_>, Vec<_>) = list.into_iter().partition(|u| on_host(u));
    near.extend(far);
    near
}

/// Retries may be at most this share of the calls in flight (and at least
/// [`RETRY_BUDGET_MIN`] at a time), as in Envoy's default retry budget.
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// The floor of the retry budget. Envoy's is 3 per upstream cluster; this budget is one
/// per balancer, shared by the embedder and every shard. At half capacity a balancer has
/// a few calls in flight, so the floor is the whole budget, and 3 was too few when a
/// node was lost during a rollout: one query of 9,115 was answered without shard 1
/// ("timed out; no retry: the retry budget is spent") with 1.5 s of its deadline left
/// (node suite, 2026-12-07). Under overload too, retries stay at most 8 calls in flight
/// per balancer beside the calls it admitted (a fifth of them when that is more).
pub const RETRY_BUDGET_MIN: usize = 8;
/// A replica failing this many calls in a row is skipped for [`EJECTION`].
pub const EJECT_AFTER_FAILURES: u32 = 3;
pub const EJECTION: Duration = Duration::from_secs(10);

/// Shadow comparisons that may run at once; more are dropped (shadow work goes first
/// under load).
pub const SHADOW_SLOTS: usize = 4;

/// (dg, normalised query, k).
type CacheKey = (String, String, usize);

/// A bounded cache of recent answers keyed by dg, normalised query and k.
pub struct AnswerCache {
    inner: Option<Mutex<lru::LruCache<CacheKey, Answer>>>,
}

impl AnswerCache {
    /// `capacity` 0 turns the cache off.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: NonZeroUsize::new(capacity).map(|c| Mutex::new(lru::LruCache::new(c))),
        }
    }

    pub fn get(&self, key: &(String, String, usize)) -> Option<Answer> {
        self.inner
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    pub fn put(&self, key: (String, String, usize), answer: Answer) {
        if let Some(c) = &self.inner {
            c.lock().unwrap_or_else(|p| p.into_inner()).put(key, answer);
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.inner
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).cap().get())
            .unwrap_or(0)
    }
}

/// Executes queries; shared by all requests. Generic over its upstream calls so its rules
/// are unit tests ([`Grpc`] in production).
pub struct Executor<U: Upstreams = Grpc> {
    pub options: QueryOptions,
    pub metrics: Metrics,
    pub cache: AnswerCache,
    upstreams: U,
    admission: Admission,
    budget: RetryBudget,
    outliers: Outliers,
    /// The typical answer times that set when embedder and shard calls are hedged.
    embed_hedging: Hedging,
    shard_hedging: Hedging,
    shard_lexical_hedging: Hedging,
    /// Refused queries answered by the light contour right now (at most
    /// [`QueryOptions::lexical_slots`]).
    lexical_slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// When the light contour last answered (ms since the Unix epoch; 0: never).
    lexical_last_ms: std::sync::atomic::AtomicU64,
    /// Shadow comparisons running (at most [`SHADOW_SLOTS`]).
    shadow_slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Round-robin positions: one for the embedders, one per shard number (mod
    /// [`ROUND_ROBINS`]), so each list is rotated evenly whatever else a query calls.
    round_robin: Vec<AtomicUsize>,
}

const ROUND_ROBINS: usize = 257;

impl Executor<Grpc> {
    pub fn new(options: QueryOptions, metrics: Metrics, cache: AnswerCache) -> Self {
        Self::with_upstreams(options, metrics, cache, Grpc)
    }
}

impl<U: Upstreams> Executor<U> {
    pub fn with_upstreams(
        options: QueryOptions,
        metrics: Metrics,
        cache: AnswerCache,
        upstreams: U,
    ) -> Self {
        Self {
            admission: Admission::new(options.max_inflight),
            budget: RetryBudget::new(RETRY_BUDGET_RATIO, RETRY_BUDGET_MIN),
            outliers: Outliers::new(EJECT_AFTER_FAILURES, EJECTION),
            embed_hedging: Hedging::default(),
            shard_hedging: Hedging::default(),
            shard_lexical_hedging: Hedging::default(),
            lexical_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(options.lexical_slots)),
            lexical_last_ms: std::sync::atomic::AtomicU64::new(0),
            shadow_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(SHADOW_SLOTS)),
            options,
            metrics,
            cache,
            upstreams,
            round_robin: (0..ROUND_ROBINS).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Cache-miss queries waiting for a place now (for /v1/status).
    pub fn admission_waiting(&self) -> usize {
        self.admission.waiting()
    }

    /// Mean time an admitted query holds its place, as measured (for /v1/status).
    pub fn admission_mean_hold(&self) -> Duration {
        self.admission.mean_hold()
    }

    /// Replicas ejected right now (for /v1/status).
    pub fn ejected_replicas(&self) -> usize {
        self.outliers.ejected(Instant::now())
    }

    /// Upstreams in round-robin order starting at a moving offset, ejected ones last.
    /// `position` 0 is the embedders' rotation, `1 + shard` a shard's.
    fn candidates<'a>(&self, list: &'a [Upstream], position: usize) -> Vec<&'a Upstream> {
        if position == 0 && self.options.embedder_order == EmbedderOrder::Stable {
            let mut stable: Vec<&Upstream> = list.iter().collect();
            stable.sort_by(|a, b| a.id.cmp(&b.id));
            return self.outliers.order(stable, Instant::now());
        }
        let start = if list.is_empty() {
            0
        } else {
            self.round_robin[position % ROUND_ROBINS].fetch_add(1, Ordering::Relaxed) % list.len()
        };
        let mut rotated = list.iter().cycle().skip(start).take(list.len()).collect();
        if position == 0 && self.options.embedder_order == EmbedderOrder::Local {
            rotated = local_first(rotated, self.options.local_host);
        }
        self.outliers.order(rotated, Instant::now())
    }

    /// Count attempt `n` of a call in the retry budget; None when a retry is over budget.
    fn attempt(&self, n: usize) -> Option<Attempt> {
        if n == 0 {
            return Some(self.budget.call());
        }
        let retry = self.budget.retry();
        if retry.is_none() {
            self.metrics.shed.with_label_values(&["retry_budget"]).inc();
        }
        retry
    }

    /// Note a call's outcome: errors metric, outlier ejection.
    fn record(&self, service: &str, up: &Upstream, outcome: Result<(), &CallError>) {
        let fault = match outcome {
            Ok(()) => false,
            Err(e) => {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[service, e.kind()])
                    .inc();
                e.is_replica_fault()
            }
        };
        if self.outliers.record(&up.addr, !fault, Instant::now()) {
            tracing::warn!(service, replica = %up.addr, seconds = EJECTION.as_secs(), "replica ejected after failing calls in a row");
            self.metrics.ejections.with_label_values(&[service]).inc();
        }
    }

    /// Answer `req` using only `routing` (one dg).
    pub async fn answer(&self, routing: &Routing, req: &QueryRequest) -> Result<Answer, ApiError> {
        let started = Instant::now();
        let deadline = started
            + req
                .timeout
                .map_or(self.options.deadline, |t| t.min(self.options.deadline));
        let key = (routing.manifest.dg.clone(), req.normalized(), req.k);
        if let Some(mut hit) = self.cache.get(&key) {
            self.metrics.cache_hits.inc();
            hit.query = req.query.clone();
            hit.cached = true;
            hit.took_ms = started.elapsed().as_secs_f64() * 1000.0;
            return Ok(hit);
        }
        self.metrics.cache_misses.inc();
        let _ticket = match self
            .admission
            .admit(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(ticket) => ticket,
            Err(refusal) => {
                // The model's line is past the deadline: the light contour answers if one
                // of its places frees up in time (lexical_wait).
                let slot = match self.options.lexical_slots {
                    0 => None,
                    _ => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let slot = self.lexical_slots.clone().acquire_owned();
                        tokio::time::timeout(lexical_wait(&refusal, left), slot)
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                };
                if let Some(_slot) = slot {
                    let why = "the model's line is longer than the query's deadline";
                    return self
                        .lexical(routing, req, started, deadline, "overloaded", why.into())
                        .await;
                }
                self.metrics.shed.with_label_values(&["overloaded"]).inc();
                let why = match refusal {
                    Refusal::TooLate { expected } => format!(
                        "the line ahead would take about {} ms, too long to answer within the deadline",
                        expected.as_millis()
                    ),
                    Refusal::WaitedTooLong { waited, expected } => format!(
                        "it waited {} ms in line and the rest of the line would take about {} ms more, too long to answer within the deadline",
                        waited.as_millis(),
                        expected.as_millis()
                    ),
                };
                return Err(ApiError::new(
                    ApiErrorKind::Overloaded,
                    format!(
                        "{} queries are being answered and {} wait: {why}; try again in {} s",
                        self.admission.limit(),
                        self.admission.waiting(),
                        refusal.retry_after_secs()
                    ),
                )
                .with_retry_after(refusal.retry_after_secs()));
            }
        };

        let answer = self.compute(routing, req, started, deadline).await?;
        if answer.degraded {
            self.metrics.degraded.inc();
        } else {
            self.cache.put(key, answer.clone());
        }
        Ok(answer)
    }

    /// Embed, search and merge: the answer of `req` from `routing`, not cached.
    async fn compute(
        &self,
        routing: &Routing,
        req: &QueryRequest,
        started: Instant,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        // The model gets the deadline but the light contour's reserve (all of it when
        // less than the reserve is left).
        let model_deadline = deadline
            .checked_sub(LEXICAL_RESERVE)
            .filter(|d| *d > Instant::now())
            .unwrap_or(deadline);
        let vector = match self.embed(routing, &req.query, model_deadline).await {
            Ok(vector) => vector,
            Err(e)
                if matches!(
                    e.kind,
                    ApiErrorKind::NoEmbedder | ApiErrorKind::EmbedderFailed
                ) =>
            {
                return self
                    .lexical(routing, req, started, deadline, e.kind.as_str(), e.message)
                    .await;
            }
            Err(e) => return Err(e),
        };
        let (hits, notes) = self.search(routing, &vector, req.k, deadline).await?;
        self.metrics
            .answers
            .with_label_values(&[
                "model",
                if notes.is_empty() {
                    "ok"
                } else {
                    "shard_fallback"
                },
            ])
            .inc();
        Ok(answer_of(
            req,
            routing,
            hits,
            Contour::Model,
            notes,
            started,
        ))
    }

    /// The light contour: every shard's best BM25 matches of the query text, merged; the
    /// answer is marked degraded with `reason` (metric label) and `why` in its notes.
    async fn lexical(
        &self,
        routing: &Routing,
        req: &QueryRequest,
        started: Instant,
        deadline: Instant,
        reason: &'static str,
        why: String,
    ) -> Result<Answer, ApiError> {
        let dg = &routing.manifest.dg;
        let shards: Vec<usize> = (0..routing.shards.len())
            .filter(|&s| !routing.shards[s].is_empty())
            .collect();
        if shards.is_empty() {
            return Err(ApiError::new(
                ApiErrorKind::NoShard,
                format!(
                    "{why}; and no shard of dg {dg} has a healthy replica for the lexical contour"
                ),
            )
            .with_retry_after(1));
        }
        let calls = shards.iter().map(|&s| {
            let pinned = &routing.manifest.shards[s].sha256;
            self.first_answer(
                "shard",
                &self.shard_lexical_hedging,
                &routing.shards[s],
                1 + s,
                self.options.attempt_timeout,
                deadline,
                move |up, timeout| async move {
                    let req = LexicalRequest {
                        text: req.query.clone(),
                        k: req.k as u32,
                        dg: dg.clone(),
                        shard_sha256: pinned.clone(),
                    };
                    rows_of(self.upstreams.lexical(up, req, timeout).await?, dg)
                },
            )
        });
        let results = futures::future::join_all(calls).await;
        let mut notes = vec![format!(
            "answered by the lexical contour (BM25 scores, not cosine): {why}"
        )];
        let rows = merge(
            shards.iter().map(|&s| s as u32).zip(results),
            req.k,
            &mut notes,
            ApiErrorKind::LexicalFailed,
        )?;
        self.metrics
            .answers
            .with_label_values(&["lexical", reason])
            .inc();
        self.lexical_last_ms.store(
            std::time::UNIX_EPOCH
                .elapsed()
                .unwrap_or_default()
                .as_millis() as u64,
            Ordering::Relaxed,
        );
        Ok(answer_of(
            req,
            routing,
            rows,
            Contour::Lexical,
            notes,
            started,
        ))
    }

    /// When the light contour last answered, in ms since the Unix epoch (None: never).
    pub fn lexical_last_ms(&self) -> Option<u64> {
        Some(self.lexical_last_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Answer `req` from `routing` for a shadow comparison, only when there is room: never
    /// from the cache, outside the admission limit but dropped (None, counted as shed
    /// `shadow`) when the balancer is half full or [`SHADOW_SLOTS`] comparisons run.
    pub async fn shadow(
        &self,
        routing: &Routing,
        req: &QueryRequest,
    ) -> Option<Result<Answer, ApiError>> {
        let _slot = match self.shadow_slots.clone().try_acquire_owned() {
            Ok(slot) if self.admission.inflight() * 2 < self.admission.limit() => slot,
            _ => {
                self.metrics.shed.with_label_values(&["shadow"]).inc();
                return None;
            }
        };
        let started = Instant::now();
        let answer = self
            .compute(routing, req, started, started + self.options.deadline)
            .await;
        Some(answer.map(|mut a| {
            a.arm = Arm::Candidate;
            a
        }))
    }

    async fn embed(
        &self,
        routing: &Routing,
        text: &str,
        deadline: Instant,
    ) -> Result<Vec<f32>, ApiError> {
        let model = &routing.manifest.model_id;
        if routing.embedders.is_empty() {
            return Err(ApiError::new(
                ApiErrorKind::NoEmbedder,
                format!("no healthy embedder with model {model}"),
            ));
        }
        let started = Instant::now();
        let dims = routing.manifest.dims;
        let vector = self
            .first_answer(
                "embedder",
                &self.embed_hedging,
                &routing.embedders,
                0,
                self.options.embed_timeout,
                deadline,
                |up, timeout| async move {
                    match self.upstreams.embed(up, text, timeout).await? {
                        e if &e.model_id != model => Err(CallError::Failed(format!(
                            "runs model {}, dg needs {model}",
                            e.model_id
                        ))),
                        e if e.vector.len() != dims => Err(CallError::Failed(format!(
                            "returned {} floats",
                            e.vector.len()
                        ))),
                        e => Ok(e.vector),
                    }
                },
            )
            .await
            .map_err(|last| {
                ApiError::new(
                    ApiErrorKind::EmbedderFailed,
                    format!("no embedder answered: {last}"),
                )
                .with_retry_after(1)
            })?;
        self.metrics
            .embed_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(vector)
    }

    /// Call the replicas of one list in turn (round robin from rotation `position`,
    /// ejected ones last) until one answers: each attempt gets what is left of `deadline`,
    /// at most `limit`; the next replica is asked at once when an attempt fails, and also
    /// when it is still unanswered after the service's hedge delay ([`Hedging`]), and the
    /// first answer wins (the others are dropped, each counted as a failure of its
    /// replica: a replica that keeps losing to hedges is ejected like one that fails).
    /// Every attempt after the first needs the retry budget; a hedge over budget is tried
    /// again one hedge delay later. Every outcome is recorded for `service` (errors metric,
    /// outlier ejection). The error is what the last attempt said. The embedder call and
    /// the shard calls both go through here.
    ///
    /// Cancellation: the attempts are futures owned by this one, each holding its budget
    /// place ([`Attempt`]); dropping this future drops them all.
    #[allow(clippy::too_many_arguments)]
    async fn first_answer<'u, T, Fut>(
        &self,
        service: &'static str,
        hedging: &Hedging,
        replicas: &'u [Upstream],
        position: usize,
        limit: Duration,
        deadline: Instant,
        mut call: impl FnMut(&'u Upstream, Duration) -> Fut,
    ) -> Result<T, String>
    where
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut last = String::from("no attempt fit in the deadline");
        let mut next = self
            .candidates(replicas, position)
            .into_iter()
            .enumerate()
            .peekable();
        let mut running = FuturesUnordered::new();
        // The replicas of the attempts in `running`.
        let mut asked: Vec<&'u Upstream> = Vec::new();
        // When the next hedge is due (None: no hedge while nothing runs or nothing is left).
        let mut hedge_at: Option<Instant> = None;
        // The last attempt never reached its replica: the next one is no retry of work.
        let mut unsent = false;
        loop {
            let hedge_due = hedge_at.is_some_and(|t| Instant::now() >= t);
            if running.is_empty() || hedge_due {
                let hedge = !running.is_empty();
                hedge_at = None;
                if let Some(&(n, up)) = next.peek() {
                    let attempt = if unsent && !hedge {
                        Some(self.budget.call())
                    } else {
                        self.attempt(n)
                    };
                    match (self.attempt_timeout(deadline, limit), attempt) {
                        (Some(timeout), Some(attempt)) => {
                            next.next();
                            if hedge {
                                self.metrics
                                    .hedges
                                    .with_label_values(&[service, "sent"])
                                    .inc();
                            }
                            let started = Instant::now();
                            asked.push(up);
                            let answer = call(up, timeout);
                            running.push(async move {
                                let _attempt = attempt;
                                (up, started, hedge, answer.await)
                            });
                        }
                        (None, _) => {}
                        (Some(_), None) if hedge => {
                            // Over budget: the first attempt may still answer; try later.
                        }
                        (Some(_), None) => {
                            last = format!("{last}; no retry: the retry budget is spent");
                        }
                    }
                    if !running.is_empty() && next.peek().is_some() {
                        hedge_at = Some(Instant::now() + hedging.delay());
                    }
                }
                if running.is_empty() {
                    break;
                }
            }
            let finished = match hedge_at {
                Some(at) => tokio::select! {
                    finished = running.next() => finished,
                    () = tokio::time::sleep_until(at.into()) => continue,
                },
                None => running.next().await,
            };
            let Some((up, started, hedge, outcome)) = finished else {
                continue;
            };
            self.record(service, up, outcome.as_ref().map(|_| ()));
            if let Some(i) = asked.iter().position(|a| std::ptr::eq(*a, up)) {
                asked.swap_remove(i);
            }
            match outcome {
                Ok(answer) => {
                    hedging.observe(started.elapsed());
                    if hedge {
                        self.metrics
                            .hedges
                            .with_label_values(&[service, "won"])
                            .inc();
                    }
                    // The attempts still running lost to this one and are dropped on return.
                    for slow in asked {
                        self.record(service, slow, Err(&CallError::SlowerThanHedge));
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    unsent = e.never_sent();
                    tracing::warn!(service, position, replica = %up.addr, error = %e, "upstream attempt failed");
                    last = format!("{service} {}: {e}", up.addr);
                    if hedge_at.is_none() && !running.is_empty() && next.peek().is_some() {
                        // A hedge runs: ask the next replica at once too.
                        hedge_at = Some(Instant::now());
                    }
                }
            }
        }
        Err(last)
    }

    /// What is left of the deadline, at most `limit`; None when nothing is left.
    fn attempt_timeout(&self, deadline: Instant, limit: Duration) -> Option<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.min(limit))
    }

    /// Probe the nearest clusters on their shards and merge; notes say what was degraded.
    async fn search(
        &self,
        routing: &Routing,
        vector: &[f32],
        k: usize,
        deadline: Instant,
    ) -> Result<(Vec<ResultRow>, Vec<String>), ApiError> {
        let manifest = &routing.manifest;
        let plan = routing.map.plan(vector, self.options.nprobe, |s| {
            routing
                .shards
                .get(s as usize)
                .is_some_and(|r| !r.is_empty())
        });
        let mut notes: Vec<String> = plan
            .skipped
            .iter()
            .map(|s| format!("shard {s} has no healthy replica; its clusters were replaced by the next-nearest ones"))
            .collect();
        if plan.shards.is_empty() {
            return Err(ApiError::new(
                ApiErrorKind::NoShard,
                format!("no shard of dg {} has a healthy replica", manifest.dg),
            )
            .with_retry_after(1));
        }
        let calls = plan
            .shards
            .iter()
            .map(|(s, clusters)| self.call_shard(routing, *s, clusters, vector, k, deadline));
        // The shards of a query are asked concurrently.
        let results = futures::future::join_all(calls).await;
        let shards = plan.shards.iter().map(|(s, _)| *s);
        let rows = merge(
            shards.zip(results),
            k,
            &mut notes,
            ApiErrorKind::ShardsFailed,
        )?;
        Ok((rows, notes))
    }

    async fn call_shard(
        &self,
        routing: &Routing,
        shard: u32,
        clusters: &[u32],
        vector: &[f32],
        k: usize,
        deadline: Instant,
    ) -> Result<Vec<ResultRow>, String> {
        let dg = &routing.manifest.dg;
        self.first_answer(
            "shard",
            &self.shard_hedging,
            &routing.shards[shard as usize],
            1 + shard as usize,
            self.options.attempt_timeout,
            deadline,
            |up, timeout| async move {
                let started = Instant::now();
                let req = SearchRequest {
                    vector: vector.to_vec(),
                    k: k as u32,
                    dg: dg.clone(),
                    clusters: clusters.to_vec(),
                    shard_sha256: routing.manifest.shards[shard as usize].sha256.clone(),
                };
                let rows = rows_of(self.upstreams.search(up, req, timeout).await?, dg)?;
                self.metrics
                    .shard_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(rows)
            },
        )
        .await
    }
}

/// The best `k` rows of the shards' answers (shard number, its rows or why it failed); a
/// failed shard is noted in `notes`, and when none answered the error is a 503 of `kind`
/// saying why each failed. Both contours merge here.
fn merge(
    answers: impl Iterator<Item = (u32, Result<Vec<ResultRow>, String>)>,
    k: usize,
    notes: &mut Vec<String>,
    kind: ApiErrorKind,
) -> Result<Vec<ResultRow>, ApiError> {
    let mut rows = Vec::new();
    let mut answered = 0;
    for (s, result) in answers {
        match result {
            Ok(hits) => {
                answered += 1;
                rows.extend(hits);
            }
            Err(msg) => notes.push(format!("shard {s} failed on every replica: {msg}")),
        }
    }
    if answered == 0 {
        return Err(ApiError::new(kind, notes.join("; ")).with_retry_after(1));
    }
    rows.sort_by(|a, b| b.score.total_cmp(&a.score));
    rows.truncate(k);
    Ok(rows)
}

/// The rows of a shard's answer, which must be for `dg`: shards refuse other dgs, and this
/// check makes mixing impossible by construction.
fn rows_of(resp: SearchResponse, dg: &str) -> Result<Vec<ResultRow>, CallError> {
    if resp.dg != dg {
        return Err(CallError::WrongDg(format!("answered for dg {}", resp.dg)));
    }
    Ok(resp
        .hits
        .into_iter()
        .map(|h| ResultRow {
            text: h.text,
            score: h.score,
            shard: resp.shard,
        })
        .collect())
}

/// The answer to `req` from `rows` (best first), by `contour`; degraded when notes say why.
fn answer_of(
    req: &QueryRequest,
    routing: &Routing,
    rows: Vec<ResultRow>,
    contour: Contour,
    notes: Vec<String>,
    started: Instant,
) -> Answer {
    Answer {
        query: req.query.clone(),
        similar: rows.first().map(|h| h.text.clone()),
        score: rows.first().map(|h| h.score),
        results: rows,
        dg: routing.manifest.dg.clone(),
        arm: Arm::Active,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
        contour,
        degraded: contour == Contour::Lexical || !notes.is_empty(),
        notes,
        cached: false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use simq_consul::ServiceEntry;
    use simq_shard_proto::{Hit, SearchResponse};

    use super::*;
    use crate::state::{build_routing, Parts};
    use crate::testing::two_shard_index;
    use crate::upstream::Embedded;

    /// How a fake replica behaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Behaviour {
        Answer,
        Fail,
        Hang,
        OtherDg,
        Unreachable,
    }

    /// Upstreams that answer from a table keyed by port, and log every call.
    #[derive(Default)]
    struct Fake {
        behaviour: Mutex<HashMap<u16, Behaviour>>,
        /// (port, clusters asked (empty for embed), timeout given).
        calls: Mutex<Vec<(u16, Vec<u32>, Duration)>>,
        vector: Vec<f32>,
    }

    fn port(up: &Upstream) -> u16 {
        up.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    impl Fake {
        fn new(vector: [f32; 2]) -> Self {
            Self {
                vector: vector.to_vec(),
                ..Self::default()
            }
        }

        fn set(&self, port: u16, b: Behaviour) {
            self.behaviour.lock().unwrap().insert(port, b);
        }

        async fn act(&self, up: &Upstream, clusters: Vec<u32>, timeout: Duration) -> Behaviour {
            let port = port(up);
            self.calls.lock().unwrap().push((port, clusters, timeout));
            let b = *self
                .behaviour
                .lock()
                .unwrap()
                .get(&port)
                .unwrap_or(&Behaviour::Answer);
            if b == Behaviour::Hang {
                tokio::time::sleep(timeout).await;
            }
            b
        }

        fn calls_to(&self, port: u16) -> Vec<Vec<u32>> {
            let calls = self.calls.lock().unwrap();
            calls
                .iter()
                .filter(|c| c.0 == port)
                .map(|c| c.1.clone())
                .collect()
        }
    }

    impl Upstreams for Arc<Fake> {
        async fn embed(
            &self,
            up: &Upstream,
            _: &str,
            timeout: Duration,
        ) -> Result<Embedded, CallError> {
            match self.act(up, Vec::new(), timeout).await {
                Behaviour::Answer | Behaviour::OtherDg => Ok(Embedded {
                    vector: self.vector.clone(),
                    model_id: "model-a".into(),
                }),
                Behaviour::Fail => Err(CallError::Failed("boom".into())),
                Behaviour::Unreachable => Err(CallError::Unreachable("tcp connect error".into())),
                Behaviour::Hang => Err(CallError::Timeout),
            }
        }

        async fn search(
            &self,
            up: &Upstream,
            req: SearchRequest,
            timeout: Duration,
        ) -> Result<SearchResponse, CallError> {
            let shard = if port(up) >= 200 { 1 } else { 0 };
            match self.act(up, req.clusters.clone(), timeout).await {
                b @ (Behaviour::Answer | Behaviour::OtherDg) => Ok(SearchResponse {
                    hits: req
                        .clusters
                        .iter()
                        .map(|c| Hit {
                            id: *c,
                            text: format!("from cluster {c}"),
                            score: 1.0 - *c as f32 * 0.1,
                        })
                        .collect(),
                    dg: if b == Behaviour::OtherDg {
                        "dg-other".into()
                    } else {
                        req.dg
                    },
                    shard,
                }),
                Behaviour::Fail => Err(CallError::Failed("boom".into())),
                Behaviour::Unreachable => Err(CallError::Unreachable("tcp connect error".into())),
                Behaviour::Hang => Err(CallError::Timeout),
            }
        }

        async fn lexical(
            &self,
            up: &Upstream,
            req: LexicalRequest,
            timeout: Duration,
        ) -> Result<SearchResponse, CallError> {
            let shard = if port(up) >= 200 { 1 } else { 0 };
            match self.act(up, Vec::new(), timeout).await {
                Behaviour::Answer | Behaviour::OtherDg => Ok(SearchResponse {
                    hits: vec![Hit {
                        id: shard,
                        text: format!("lexical match of {} from shard {shard}", req.text),
                        score: 5.0 + shard as f32,
                    }],
                    dg: req.dg,
                    shard,
                }),
                Behaviour::Fail => Err(CallError::Failed("boom".into())),
                Behaviour::Unreachable => Err(CallError::Unreachable("tcp connect error".into())),
                Behaviour::Hang => Err(CallError::Timeout),
            }
        }
    }

    /// Embedder on port 1; shard 0 replicas on ports 100.., shard 1 on 200...
    fn routing(shard0: &[u16], shard1: &[u16]) -> Routing {
        let index = two_shard_index("model-a");
        let dg = index.manifest.dg.clone();
        let entry = |port: u16, tags: Vec<String>| ServiceEntry {
            id: format!("i{port}"),
            name: "x".into(),
            node: "n1".into(),
            address: "127.0.0.1".into(),
            port,
            tags,
            meta: Default::default(),
            status: "passing".into(),
        };
        let shard = |s: u32, p: u16| entry(p, vec![format!("dg={dg}"), format!("shard={s}")]);
        let parts = Parts {
            active: Some(index.clone()),
            candidate: None,
            embedders: vec![entry(1, vec!["model=model-a".into()])],
            shards: shard0
                .iter()
                .map(|&p| shard(0, p))
                .chain(shard1.iter().map(|&p| shard(1, p)))
                .collect(),
        };
        build_routing(&parts, &mut HashMap::new()).unwrap()
    }

    fn executor(fake: &Arc<Fake>, nprobe: usize, max_inflight: usize) -> Executor<Arc<Fake>> {
        executor_with_cache(fake, nprobe, max_inflight, 0)
    }

    fn executor_with_cache(
        fake: &Arc<Fake>,
        nprobe: usize,
        max_inflight: usize,
        cache_entries: usize,
    ) -> Executor<Arc<Fake>> {
        Executor::with_upstreams(
            QueryOptions {
                embedder_order: EmbedderOrder::Spread,
                local_host: None,
                lexical_slots: 4,
                nprobe,
                deadline: Duration::from_millis(300),
                attempt_timeout: Duration::from_millis(100),
                embed_timeout: Duration::from_millis(100),
                max_inflight,
            },
            Metrics::new().unwrap(),
            AnswerCache::new(cache_entries),
            fake.clone(),
        )
    }

    /// A query that takes a place and hangs (its replica set to hang first), started and
    /// given 20 ms to take the place; abort it to give the place back.
    async fn occupy(
        ex: &Arc<Executor<Arc<Fake>>>,
        r: &Arc<Routing>,
    ) -> tokio::task::JoinHandle<Result<Answer, ApiError>> {
        let (ex, r) = (ex.clone(), r.clone());
        let slow = tokio::spawn(async move { ex.answer(&r, &query("slow")).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        slow
    }

    fn query(text: &str) -> QueryRequest {
        QueryRequest {
            query: text.into(),
            k: 3,
            timeout: None,
        }
    }

    #[tokio::test]
    async fn a_query_probes_only_the_nearest_clusters_on_the_shards_holding_them() {
        // Near +x: clusters 0 and 2, both in shard 0; shard 1 is not asked at all.
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = executor(&fake, 2, 8);
        let a = ex
            .answer(&routing(&[100], &[200]), &query("q"))
            .await
            .unwrap();
        assert_eq!(fake.calls_to(100), vec![vec![0, 2]]);
        assert!(fake.calls_to(200).is_empty());
        assert!(!a.degraded);
        assert_eq!(a.similar.as_deref(), Some("from cluster 0"));
        // Three clusters reach shard 1's nearest one too, in one call per shard.
        let ex = executor(&fake, 3, 8);
        ex.answer(&routing(&[100], &[200]), &query("q2"))
            .await
            .unwrap();
        assert_eq!(fake.calls_to(200), vec![vec![1]]);
    }

    #[tokio::test]
    async fn a_failed_replica_is_retried_on_another_and_ejected_after_failing_in_a_row() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::Fail);
        let ex = executor(&fake, 2, 8);
        let r = routing(&[100, 101], &[200]);
        for i in 0..6 {
            let a = ex.answer(&r, &query(&format!("q{i}"))).await.unwrap();
            assert!(!a.degraded, "the other replica answers");
        }
        // Round robin starts at 100 every other query; after 3 failures it goes last.
        assert_eq!(
            fake.calls_to(100).len(),
            3,
            "ejected after 3 failures in a row"
        );
        assert_eq!(ex.ejected_replicas(), 1);
    }

    #[tokio::test]
    async fn a_replica_that_never_answers_is_hedged_and_ejected_after_losing_in_a_row() {
        // A replica on a node that lost power: no answer, no error, until the timeout.
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::Hang);
        let mut ex = executor(&fake, 2, 8);
        ex.options.deadline = Duration::from_secs(30);
        ex.options.attempt_timeout = Duration::from_secs(30);
        let r = routing(&[100, 101], &[200]);
        for i in 0..6 {
            let a = tokio::time::timeout(
                Duration::from_secs(10),
                ex.answer(&r, &query(&format!("h{i}"))),
            )
            .await
            .expect("the hedge answers long before the 30 s attempt timeout")
            .unwrap();
            assert!(!a.degraded, "the other replica answered in time");
        }
        // Round robin asks 100 first every other query; after losing 3 times in a row to
        // the hedge it is ejected and asked last, so never again while 101 answers.
        assert_eq!(fake.calls_to(100).len(), 3);
        assert_eq!(fake.calls_to(101).len(), 6);
        assert_eq!(ex.ejected_replicas(), 1);
        let hedges = |outcome| {
            ex.metrics
                .hedges
                .with_label_values(&["shard", outcome])
                .get()
        };
        assert_eq!((hedges("sent"), hedges("won")), (3, 3));
    }

    #[tokio::test]
    async fn a_replica_that_cannot_be_reached_is_passed_over_even_without_retry_budget() {
        // A node that lost power: connecting fails at once. The request never reached it,
        // so asking the other replica is no retry and needs no budget.
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = executor(&fake, 2, 8);
        let _held: Vec<_> = (0..RETRY_BUDGET_MIN)
            .map_while(|_| ex.budget.retry())
            .collect();
        assert!(ex.budget.retry().is_none(), "the budget is spent");
        fake.set(100, Behaviour::Unreachable);
        let a = ex
            .answer(&routing(&[100, 101], &[200]), &query("q"))
            .await
            .unwrap();
        assert!(!a.degraded);
        assert_eq!((fake.calls_to(100).len(), fake.calls_to(101).len()), (1, 1));
    }

    #[tokio::test]
    async fn a_hedge_over_the_retry_budget_waits_and_the_first_attempt_may_still_answer() {
        // Every replica answers; a slow one is not hedged when the budget has no room.
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = executor(&fake, 2, 8);
        let r = routing(&[100, 101], &[200]);
        let _held: Vec<_> = (0..RETRY_BUDGET_MIN)
            .map_while(|_| ex.budget.retry())
            .collect();
        assert!(ex.budget.retry().is_none(), "the budget is spent");
        fake.set(100, Behaviour::Hang);
        let mut hurried = query("over budget");
        hurried.timeout = Some(Duration::from_millis(200));
        // A new executor's round robin asks 100 first; without budget 101 is never asked.
        let a = ex.answer(&r, &hurried).await;
        assert!(
            a.is_err(),
            "shard 0 timed out and shard 1 holds no probed cluster"
        );
        assert_eq!(fake.calls_to(100).len(), 1);
        assert!(fake.calls_to(101).is_empty(), "no hedge without budget");
        assert_eq!(
            ex.metrics
                .hedges
                .with_label_values(&["shard", "sent"])
                .get(),
            0
        );
    }

    #[test]
    fn local_embedder_order_puts_the_embedders_of_the_balancers_own_address_first() {
        let r = routing(&[100], &[200]);
        let at = |addr: &str| Upstream {
            addr: addr.into(),
            ..r.embedders[0].clone()
        };
        let list = [
            at("10.0.0.12:7001"),
            at("10.0.0.11:7002"),
            at("10.0.0.13:7003"),
            at("10.0.0.11:7004"),
        ];
        let addrs = |host: Option<&str>| -> Vec<String> {
            local_first(list.iter().collect(), host.map(|h| h.parse().unwrap()))
                .into_iter()
                .map(|u| u.addr.clone())
                .collect()
        };
        assert_eq!(
            addrs(Some("10.0.0.11")),
            [
                "10.0.0.11:7002",
                "10.0.0.11:7004",
                "10.0.0.12:7001",
                "10.0.0.13:7003"
            ]
        );
        assert_eq!(
            addrs(None)[0],
            "10.0.0.12:7001",
            "no own address: order unchanged"
        );
        assert_eq!(addrs(Some("10.0.0.99"))[0], "10.0.0.12:7001");
    }

    #[tokio::test]
    async fn stable_embedder_order_sends_every_call_to_one_embedder_and_fails_over() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let mut r = routing(&[100], &[200]);
        let mut second = r.embedders[0].clone();
        (second.id, second.addr) = ("i0".into(), "127.0.0.1:2".into());
        r.embedders.insert(0, r.embedders[0].clone()); // i1 listed first ...
        r.embedders[1] = second; // ... i0 sorts first
        let spread = executor(&fake, 2, 8);
        for i in 0..4 {
            spread.answer(&r, &query(&format!("s{i}"))).await.unwrap();
        }
        assert_eq!(
            (fake.calls_to(1).len(), fake.calls_to(2).len()),
            (2, 2),
            "round robin"
        );

        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let mut ex = executor(&fake, 2, 8);
        ex.options.embedder_order = EmbedderOrder::Stable;
        for i in 0..4 {
            ex.answer(&r, &query(&format!("a{i}"))).await.unwrap();
        }
        assert_eq!(
            (fake.calls_to(1).len(), fake.calls_to(2).len()),
            (0, 4),
            "all to i0"
        );
        // The first fails: every query is still answered (by the other), and after 3
        // failures in a row it is ejected and no longer tried first.
        fake.set(2, Behaviour::Fail);
        for i in 0..6 {
            ex.answer(&r, &query(&format!("b{i}"))).await.unwrap();
        }
        assert_eq!(fake.calls_to(2).len(), 4 + 3);
        assert_eq!(fake.calls_to(1).len(), 6);
    }

    #[tokio::test]
    async fn a_shard_without_replicas_is_routed_around_and_the_answer_says_degraded() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = executor(&fake, 2, 8);
        let a = ex.answer(&routing(&[], &[200]), &query("q")).await.unwrap();
        assert!(a.degraded);
        assert!(
            a.notes[0].contains("shard 0 has no healthy replica"),
            "{:?}",
            a.notes
        );
        assert_eq!(
            fake.calls_to(200),
            vec![vec![1, 3]],
            "next-nearest clusters instead"
        );
    }

    #[tokio::test]
    async fn an_answer_for_another_dg_is_never_used() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::OtherDg);
        let ex = executor(&fake, 2, 8);
        let r = routing(&[100, 101], &[200]);
        for i in 0..4 {
            let a = ex.answer(&r, &query(&format!("q{i}"))).await.unwrap();
            assert_eq!(a.dg, r.manifest.dg);
            assert!(!a.degraded);
        }
        let only_other = routing(&[100], &[]);
        let e = ex.answer(&only_other, &query("x")).await.unwrap_err();
        assert_eq!((e.status(), e.kind), (503, ApiErrorKind::ShardsFailed));
    }

    #[tokio::test]
    async fn every_attempt_fits_in_the_deadline_and_a_hang_costs_at_most_the_deadline() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        for p in [100, 101, 102, 103, 104] {
            fake.set(p, Behaviour::Hang);
        }
        let ex = executor(&fake, 2, 8);
        let started = Instant::now();
        let e = ex
            .answer(&routing(&[100, 101, 102, 103, 104], &[200]), &query("q"))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!((e.status(), e.kind), (503, ApiErrorKind::ShardsFailed));
        assert!(
            took < Duration::from_millis(450),
            "took {took:?} for a 300 ms deadline"
        );
        let calls = fake.calls.lock().unwrap();
        assert!(calls.iter().all(|c| c.2 <= Duration::from_millis(100)));
        // The embed call, then 100 ms attempts, a hedge every 50 ms while one hangs
        // (within the retry budget): each gets at most what is left of the deadline.
        let shard_calls: Vec<Duration> = calls.iter().filter(|c| c.0 >= 100).map(|c| c.2).collect();
        assert!(
            shard_calls.len() <= 1 + RETRY_BUDGET_MIN + 1,
            "{shard_calls:?}"
        );
    }

    #[tokio::test]
    async fn a_query_that_cannot_be_answered_in_time_is_refused_at_once_with_retry_after() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::Hang);
        let mut options = executor(&fake, 2, 1).options;
        options.lexical_slots = 0; // no light contour: refused is refused
        let ex = Arc::new(Executor::with_upstreams(
            options,
            Metrics::new().unwrap(),
            AnswerCache::new(0),
            fake.clone(),
        ));
        let r = Arc::new(routing(&[100], &[200]));
        let slow = occupy(&ex, &r).await;
        // The one place is taken: a query whose deadline leaves no room for the expected
        // wait (10 ms hold assumed) and its own hold is refused at once.
        let mut hurried = query("hurried");
        hurried.timeout = Some(Duration::from_millis(15));
        let started = Instant::now();
        let e = ex.answer(&r, &hurried).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(5));
        assert_eq!(
            (e.status(), e.kind, e.retry_after),
            (503, ApiErrorKind::Overloaded, Some(1))
        );
        // One with time to spare waits in line instead.
        let patient = {
            let (ex, r) = (ex.clone(), r.clone());
            tokio::spawn(async move { ex.answer(&r, &query("patient")).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !patient.is_finished(),
            "a query that can wait is not refused"
        );
        // A cancelled query gives its place back: the waiting one is answered.
        fake.set(100, Behaviour::Answer);
        slow.abort();
        let _ = slow.await;
        assert!(patient.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_query_the_model_cannot_answer_in_time_gets_the_lexical_contour_while_it_has_room() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::Hang);
        let ex = Arc::new(executor(&fake, 2, 1));
        let r = Arc::new(routing(&[100, 101], &[200]));
        // Round robin: the first model call of shard 0 goes to 100, which hangs.
        let slow = occupy(&ex, &r).await;
        let mut hurried = query("hurried");
        hurried.timeout = Some(Duration::from_millis(15));
        let a = ex.answer(&r, &hurried).await.unwrap();
        assert_eq!((a.contour, a.degraded), (Contour::Lexical, true));
        assert!(a.notes[0].contains("the model's line"), "{:?}", a.notes);
        let lexical = |reason| {
            ex.metrics
                .answers
                .with_label_values(&["lexical", reason])
                .get()
        };
        assert_eq!(lexical("overloaded"), 1);
        assert!(ex.lexical_last_ms().is_some());
        slow.abort();
    }

    #[test]
    fn a_refused_query_waits_a_moment_at_the_door_and_the_rest_of_its_time_after_a_wait_in_line() {
        let door = Refusal::TooLate {
            expected: Duration::from_secs(2),
        };
        let late = Refusal::WaitedTooLong {
            waited: Duration::from_millis(400),
            expected: Duration::from_secs(1),
        };
        let ms = Duration::from_millis;
        assert_eq!(lexical_wait(&door, ms(1000)), LEXICAL_DOOR_WAIT);
        assert_eq!(lexical_wait(&door, ms(10)), ms(10));
        assert_eq!(lexical_wait(&late, ms(700)), ms(700) - LEXICAL_RESERVE);
        assert_eq!(lexical_wait(&late, ms(200)), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_refused_query_gets_the_lexical_contour_if_a_place_frees_up_within_the_door_wait() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(100, Behaviour::Hang);
        let mut options = executor(&fake, 2, 1).options;
        options.lexical_slots = 1;
        let ex = Arc::new(Executor::with_upstreams(
            options,
            Metrics::new().unwrap(),
            AnswerCache::new(0),
            fake.clone(),
        ));
        let r = Arc::new(routing(&[100, 101], &[200]));
        let slow = occupy(&ex, &r).await;
        // 28 ms: too short to wait for the model's place (10 ms hold assumed, twice the
        // wait plus a hold), long enough for the whole door wait.
        let mut hurried = query("hurried");
        hurried.timeout = Some(Duration::from_millis(28));
        // The light contour's one place is taken throughout: refused after the door wait.
        let taken = ex.lexical_slots.clone().try_acquire_owned().unwrap();
        let started = Instant::now();
        let e = ex.answer(&r, &hurried).await.unwrap_err();
        let waited = started.elapsed();
        assert_eq!((e.status(), e.kind), (503, ApiErrorKind::Overloaded));
        assert!(
            waited >= LEXICAL_DOOR_WAIT - Duration::from_millis(2)
                && waited < Duration::from_millis(200),
            "refused after {waited:?}"
        );
        // The place frees up 5 ms into the wait: answered by the light contour.
        let waiting = {
            let (ex, r, q) = (ex.clone(), r.clone(), hurried.clone());
            tokio::spawn(async move { ex.answer(&r, &q).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(taken);
        let a = waiting.await.unwrap().unwrap();
        assert_eq!((a.contour, a.degraded), (Contour::Lexical, true));
        slow.abort();
    }

    #[tokio::test]
    async fn when_no_embedder_answers_every_shard_answers_by_the_lexical_contour() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        fake.set(1, Behaviour::Fail);
        let ex = executor(&fake, 2, 8);
        let a = ex
            .answer(&routing(&[100], &[200]), &query("how to cook rice"))
            .await
            .unwrap();
        assert_eq!((a.contour, a.degraded), (Contour::Lexical, true));
        // Both shards were asked (no vector, no routing) and merged by score.
        let shards: Vec<u32> = a.results.iter().map(|r| r.shard).collect();
        assert_eq!(shards, [1, 0]);
        assert!(a.notes[0].contains("no embedder answered"), "{:?}", a.notes);
        let lexical = |reason| {
            ex.metrics
                .answers
                .with_label_values(&["lexical", reason])
                .get()
        };
        assert_eq!(lexical("embedder_failed"), 1);
        // The answer is not cached: once the model is back it answers.
        fake.set(1, Behaviour::Answer);
        let a = ex
            .answer(&routing(&[100], &[200]), &query("how to cook rice"))
            .await
            .unwrap();
        assert_eq!((a.contour, a.cached), (Contour::Model, false));
        // No shard left: a clear 503.
        fake.set(1, Behaviour::Fail);
        let e = ex
            .answer(&routing(&[], &[]), &query("x"))
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.kind), (503, ApiErrorKind::NoShard));
    }

    #[tokio::test]
    async fn an_answer_cached_under_one_dg_is_not_served_after_the_flip_to_another() {
        // A text removed by an incremental build must not come back from the cache.
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = executor_with_cache(&fake, 2, 4, 16);
        let old = routing(&[100], &[200]);
        assert!(
            !ex.answer(&old, &query("asked before"))
                .await
                .unwrap()
                .cached
        );
        assert!(
            ex.answer(&old, &query("asked before"))
                .await
                .unwrap()
                .cached
        );
        let mut new = routing(&[100], &[200]);
        new.manifest = Arc::new(simq_contract::Manifest {
            dg: "dg-00000000000000ff".into(),
            ..(*new.manifest).clone()
        });
        let answer = ex.answer(&new, &query("asked before")).await.unwrap();
        assert!(!answer.cached, "the new dg's shards answer");
        assert_eq!(answer.dg, "dg-00000000000000ff");
    }

    #[tokio::test]
    async fn cache_hits_are_answered_even_when_no_place_is_free() {
        let fake = Arc::new(Fake::new([1.0, 0.1]));
        let ex = Arc::new(executor_with_cache(&fake, 2, 1, 16));
        let r = Arc::new(routing(&[100], &[200]));
        assert!(ex.answer(&r, &query("known")).await.is_ok());
        fake.set(100, Behaviour::Hang);
        let slow = occupy(&ex, &r).await;
        let mut hurried = query("known");
        hurried.timeout = Some(Duration::from_millis(10));
        let hit = ex.answer(&r, &hurried).await.unwrap();
        assert!(hit.cached);
        slow.abort();
    }
}
