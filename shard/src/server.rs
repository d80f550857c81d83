//! The gRPC search service over one verified shard file.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tonic::{Request, Response, Status};

use crate::format::ShardFile;
use crate::proto;

/// Per-request bounds, so no request can make the service allocate without bound.
#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    pub max_k: usize,
    pub max_search_k: usize,
    /// search_k used when a request sends 0.
    pub default_search_k: usize,
}

impl Default for SearchLimits {
    fn default() -> Self {
        Self {
            max_k: 100,
            max_search_k: 100_000,
            default_search_k: 0,
        }
    }
}

/// The shard's Prometheus metrics.
#[derive(Clone)]
pub struct ShardMetrics {
    pub requests: IntCounterVec,
    pub search: Histogram,
}

impl ShardMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "simq_shard_requests_total",
                    "Search requests by outcome (ok, invalid, wrong_dg, error).",
                ),
                &["outcome"],
            )?,
            search: Histogram::with_opts(
                HistogramOpts::new("simq_shard_search_seconds", "Time to answer one search.")
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.search.clone()))?;
        Ok(m)
    }
}

/// Implements `simq.shard.v1.Shard` for one dg's shard.
pub struct ShardService {
    pub file: Arc<ShardFile>,
    pub dg: String,
    pub sha256: String,
    pub limits: SearchLimits,
    pub metrics: ShardMetrics,
}

impl ShardService {
    fn check(&self, req: &proto::SearchRequest) -> Result<(), (&'static str, Status)> {
        if req.dg != self.dg {
            return Err((
                "wrong_dg",
                Status::failed_precondition(format!(
                    "this shard serves dg {}, the request routes with dg {:?}",
                    self.dg, req.dg
                )),
            ));
        }
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
        if req.search_k as usize > self.limits.max_search_k {
            return invalid(format!(
                "search_k is {}, at most {}",
                req.search_k, self.limits.max_search_k
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
        let search_k = match req.search_k {
            0 => self.limits.default_search_k,
            n => n as usize,
        };
        let hits = tokio::task::spawn_blocking(move || {
            file.search(
                &req.vector,
                req.k as usize,
                (search_k > 0).then_some(search_k),
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
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
                    dg: self.dg.clone(),
                    shard: self.file.meta().shard,
                }))
            }
            Err(e) => {
                self.metrics.requests.with_label_values(&["error"]).inc();
                Err(Status::internal(e.to_string()))
            }
        }
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
