//! Answering one query with one routing snapshot: embed, route to the nearest shards,
//! call a healthy replica of each (retrying other replicas, falling back to the
//! next-nearest shard when one has none), merge the top k.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use simq_embedder::proto::{embedder_client::EmbedderClient, EmbedRequest};
use simq_shard::proto::{shard_client::ShardClient, SearchRequest};

use crate::metrics::Metrics;
use crate::request::{ApiError, QueryRequest};
use crate::state::{Routing, Upstream};

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
    pub took_ms: f64,
    /// True when a routed shard had no healthy replica and a farther one answered instead.
    pub degraded: bool,
    /// What was degraded, for people reading the answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub cached: bool,
}

/// Query settings.
#[derive(Debug, Clone, Copy)]
pub struct QueryOptions {
    /// Shards asked per query.
    pub nprobe: usize,
    /// arroy search_k sent to shards (0: the shard's default).
    pub search_k: u32,
    /// Whole-request deadline.
    pub deadline: Duration,
    /// Per-attempt timeout of one upstream call.
    pub attempt_timeout: Duration,
}

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

/// Executes queries; shared by all requests.
pub struct Executor {
    pub options: QueryOptions,
    pub metrics: Metrics,
    pub cache: AnswerCache,
    round_robin: AtomicUsize,
}

impl Executor {
    pub fn new(options: QueryOptions, metrics: Metrics, cache: AnswerCache) -> Self {
        Self {
            options,
            metrics,
            cache,
            round_robin: AtomicUsize::new(0),
        }
    }

    /// Upstreams in round-robin order starting at a moving offset.
    fn rotated<'a>(&self, list: &'a [Upstream]) -> impl Iterator<Item = &'a Upstream> {
        let start = if list.is_empty() {
            0
        } else {
            self.round_robin.fetch_add(1, Ordering::Relaxed) % list.len()
        };
        list.iter().cycle().skip(start).take(list.len())
    }

    /// Answer `req` using only `routing` (one dg).
    pub async fn answer(&self, routing: &Routing, req: &QueryRequest) -> Result<Answer, ApiError> {
        let started = Instant::now();
        let deadline = started + self.options.deadline;
        let dg = routing.manifest.dg.clone();
        let key = (dg.clone(), req.normalized(), req.k);
        if let Some(mut hit) = self.cache.get(&key) {
            self.metrics.cache_hits.inc();
            hit.query = req.query.clone();
            hit.cached = true;
            hit.took_ms = started.elapsed().as_secs_f64() * 1000.0;
            return Ok(hit);
        }
        self.metrics.cache_misses.inc();

        let vector = self.embed(routing, &req.query, deadline).await?;
        let (hits, notes) = self.search(routing, &vector, req.k, deadline).await?;
        let answer = Answer {
            query: req.query.clone(),
            similar: hits.first().map(|h| h.text.clone()),
            score: hits.first().map(|h| h.score),
            results: hits,
            dg,
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
            degraded: !notes.is_empty(),
            notes,
            cached: false,
        };
        if answer.degraded {
            self.metrics.degraded.inc();
        } else {
            self.cache.put(key, answer.clone());
        }
        Ok(answer)
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
                503,
                "no_embedder",
                format!("no healthy embedder with model {model}"),
            ));
        }
        let started = Instant::now();
        let mut last = String::new();
        for up in self.rotated(&routing.embedders) {
            let Some(timeout) = self.attempt_timeout(deadline) else {
                break;
            };
            let mut client = EmbedderClient::new(up.channel.clone());
            let call = client.embed(EmbedRequest {
                texts: vec![text.to_string()],
            });
            let outcome = match tokio::time::timeout(timeout, call).await {
                Err(_) => Err(("timeout", format!("embedder {} timed out", up.addr))),
                Ok(Err(status)) => Err((
                    "error",
                    format!("embedder {}: {}", up.addr, status.message()),
                )),
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    if &resp.model_id != model {
                        Err((
                            "wrong_model",
                            format!(
                                "embedder {} runs model {}, dg needs {model}",
                                up.addr, resp.model_id
                            ),
                        ))
                    } else if resp.vectors.len() != routing.manifest.dims {
                        Err((
                            "error",
                            format!(
                                "embedder {} returned {} floats",
                                up.addr,
                                resp.vectors.len()
                            ),
                        ))
                    } else {
                        Ok(resp.vectors)
                    }
                }
            };
            match outcome {
                Ok(v) => {
                    self.metrics
                        .embed_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(v);
                }
                Err((kind, msg)) => {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&["embedder", kind])
                        .inc();
                    tracing::warn!(error = %msg, "embedder attempt failed");
                    last = msg;
                }
            }
        }
        Err(ApiError::new(
            503,
            "embedder_failed",
            format!("no embedder answered: {last}"),
        ))
    }

    fn attempt_timeout(&self, deadline: Instant) -> Option<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.min(self.options.attempt_timeout))
    }

    /// Ask the routed shards (with fallbacks) and merge; notes say what was degraded.
    async fn search(
        &self,
        routing: &Routing,
        vector: &[f32],
        k: usize,
        deadline: Instant,
    ) -> Result<(Vec<ResultRow>, Vec<String>), ApiError> {
        let manifest = &routing.manifest;
        let order = manifest.route(vector, manifest.shards.len());
        let nprobe = self.options.nprobe.clamp(1, order.len());
        let mut notes = Vec::new();
        let mut chosen = Vec::new();
        let mut spare = order
            .iter()
            .copied()
            .skip(nprobe)
            .filter(|&s| !routing.shards[s].is_empty());
        for &s in &order[..nprobe] {
            if !routing.shards[s].is_empty() {
                chosen.push(s);
            } else if let Some(alt) = spare.next() {
                notes.push(format!(
                    "shard {s} has no healthy replica; asked shard {alt} instead"
                ));
                chosen.push(alt);
            } else {
                notes.push(format!(
                    "shard {s} has no healthy replica and no other shard is left"
                ));
            }
        }
        if chosen.is_empty() {
            return Err(ApiError::new(
                503,
                "no_shard",
                format!("no shard of dg {} has a healthy replica", manifest.dg),
            ));
        }
        let calls = chosen
            .iter()
            .map(|&s| self.call_shard(routing, s, vector, k, deadline));
        // Routed shards are asked concurrently.
        let results = futures::future::join_all(calls).await;
        let mut rows = Vec::new();
        let mut answered = 0;
        for (s, result) in chosen.iter().zip(results) {
            match result {
                Ok(hits) => {
                    answered += 1;
                    rows.extend(hits);
                }
                Err(msg) => notes.push(format!("shard {s} failed on every replica: {msg}")),
            }
        }
        if answered == 0 {
            return Err(ApiError::new(503, "shards_failed", notes.join("; ")));
        }
        rows.sort_by(|a, b| b.score.total_cmp(&a.score));
        rows.truncate(k);
        Ok((rows, notes))
    }

    async fn call_shard(
        &self,
        routing: &Routing,
        shard: usize,
        vector: &[f32],
        k: usize,
        deadline: Instant,
    ) -> Result<Vec<ResultRow>, String> {
        let mut last = String::from("no attempt fit in the deadline");
        for up in self.rotated(&routing.shards[shard]) {
            let Some(timeout) = self.attempt_timeout(deadline) else {
                break;
            };
            let started = Instant::now();
            let mut client = ShardClient::new(up.channel.clone());
            let req = SearchRequest {
                vector: vector.to_vec(),
                k: k as u32,
                search_k: self.options.search_k,
                dg: routing.manifest.dg.clone(),
            };
            let (kind, msg) = match tokio::time::timeout(timeout, client.search(req)).await {
                Ok(Ok(resp)) => {
                    self.metrics
                        .shard_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let resp = resp.into_inner();
                    // Shards refuse other dgs; this check makes mixing impossible by construction.
                    if resp.dg == routing.manifest.dg {
                        return Ok(resp
                            .hits
                            .into_iter()
                            .map(|h| ResultRow {
                                text: h.text,
                                score: h.score,
                                shard: resp.shard,
                            })
                            .collect());
                    }
                    (
                        "wrong_dg",
                        format!("replica {} answered for dg {}", up.addr, resp.dg),
                    )
                }
                Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => (
                    "wrong_dg",
                    format!("replica {}: {}", up.addr, status.message()),
                ),
                Ok(Err(status)) => (
                    "error",
                    format!("replica {}: {}", up.addr, status.message()),
                ),
                Err(_) => ("timeout", format!("replica {} timed out", up.addr)),
            };
            self.metrics
                .upstream_errors
                .with_label_values(&["shard", kind])
                .inc();
            tracing::warn!(shard, error = %msg, "shard attempt failed");
            last = msg;
        }
        Err(last)
    }
}
