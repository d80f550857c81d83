//! The balancer's Prometheus metrics (base units, `_total` counters, `_seconds` histograms).

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Answers by HTTP status.
    pub requests: IntCounterVec,
    pub request_seconds: Histogram,
    pub embed_seconds: Histogram,
    pub shard_seconds: Histogram,
    /// Failed calls to embedders and shards, by kind (timeout, error, wrong_model, wrong_dg).
    pub upstream_errors: IntCounterVec,
    /// Answers that used a fallback shard because a routed shard had no healthy replica.
    pub degraded: IntCounter,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub consul_errors: IntCounter,
    /// Catalog entries the balancer cannot use (bad address, port or shard tag).
    pub consul_rejected: IntGauge,
    /// Unix time of the last Consul answer (alert on its age: see consul/prometheus/).
    pub consul_last_ok: Gauge,
    /// Queries being answered right now.
    pub inflight: IntGauge,
    /// Work refused to protect the service, by reason (overloaded, retry_budget, shadow).
    pub shed: IntCounterVec,
    /// Replicas ejected after failing calls in a row.
    pub ejections: IntCounterVec,
    /// Answered queries (not from the cache) by contour (model, lexical) and reason (model:
    /// ok, shard_fallback; lexical: why the model could not answer: no_embedder,
    /// embedder_failed, overloaded).
    pub answers: IntCounterVec,
    /// Hedged attempts by service and outcome: `sent` (a second replica asked while the
    /// first was still unanswered), `won` (the hedge answered first).
    pub hedges: IntCounterVec,
    /// Passing instances per service, as Consul reports them.
    pub healthy_instances: IntGaugeVec,
    /// Requests refused by the API key check, by kind (missing_api_key, invalid_api_key,
    /// forbidden, rate_limited).
    pub auth_refusals: IntCounterVec,
    /// Queries let through per API key id (the id, never the key).
    pub key_queries: IntCounterVec,
    /// API key records in use (state="valid") and skipped (state="rejected").
    pub api_keys: IntGaugeVec,
    /// Query answers by arm of the traffic split (active, candidate) and outcome (ok,
    /// degraded, error).
    pub arm_answers: IntCounterVec,
    /// Time to answer a query that was not in the cache, by arm.
    pub arm_seconds: HistogramVec,
    /// Score of the top answer of queries not in the cache, by arm.
    pub top_score: HistogramVec,
    /// Shadow comparisons by outcome: the top answers agree, differ, or the candidate
    /// failed.
    pub shadow_pairs: IntCounterVec,
    /// Overlap@k of the two arms' results in each shadow comparison (0 to 1).
    pub shadow_overlap: Histogram,
    /// Time each arm took in the shadow comparisons.
    pub shadow_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let seconds = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap()),
            )
        };
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_requests_total",
                    "HTTP answers by status code.",
                ),
                &["status"],
            )?,
            request_seconds: seconds("simq_balancer_request_seconds", "Time to answer a query.")?,
            embed_seconds: seconds(
                "simq_balancer_embed_seconds",
                "Time of the embedder call of a query.",
            )?,
            shard_seconds: seconds("simq_balancer_shard_seconds", "Time of one shard call.")?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_upstream_errors_total",
                    "Failed upstream calls by kind.",
                ),
                &["service", "kind"],
            )?,
            degraded: IntCounter::new(
                "simq_balancer_degraded_total",
                "Answers served with a fallback shard.",
            )?,
            cache_hits: IntCounter::new(
                "simq_balancer_cache_hits_total",
                "Answers served from the cache.",
            )?,
            cache_misses: IntCounter::new(
                "simq_balancer_cache_misses_total",
                "Queries not found in the cache.",
            )?,
            consul_errors: IntCounter::new(
                "simq_balancer_consul_errors_total",
                "Failed Consul watch calls.",
            )?,
            consul_rejected: IntGauge::new(
                "simq_balancer_consul_rejected_entries",
                "Consul catalog entries left out because they cannot be used (see /v1/status).",
            )?,
            consul_last_ok: Gauge::new(
                "simq_balancer_consul_last_ok_timestamp_seconds",
                "Unix time of the last successful Consul watch answer.",
            )?,
            inflight: IntGauge::new(
                "simq_balancer_inflight_requests",
                "Queries being answered right now.",
            )?,
            shed: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_shed_total",
                    "Work refused to protect the service: queries over the in-flight limit (overloaded), retries over the budget (retry_budget), shadow comparisons without room (shadow).",
                ),
                &["reason"],
            )?,
            ejections: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_ejections_total",
                    "Replicas skipped for a while after failing calls in a row.",
                ),
                &["service"],
            )?,
            answers: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_answers_total",
                    "Answered queries not served from the cache, by contour (model, lexical) and reason (model: ok, shard_fallback; lexical: no_embedder, embedder_failed, overloaded).",
                ),
                &["contour", "reason"],
            )?,
            hedges: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_hedges_total",
                    "Hedged upstream attempts (another replica asked while one was unanswered past the hedge delay), by outcome: sent, won (answered first).",
                ),
                &["service", "outcome"],
            )?,
            healthy_instances: IntGaugeVec::new(
                Opts::new(
                    "simq_balancer_healthy_instances",
                    "Passing instances per service.",
                ),
                &["service"],
            )?,
            auth_refusals: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_auth_refusals_total",
                    "Requests refused by the API key check, by kind.",
                ),
                &["kind"],
            )?,
            key_queries: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_key_queries_total",
                    "Queries let through, by API key id.",
                ),
                &["key_id"],
            )?,
            api_keys: IntGaugeVec::new(
                Opts::new(
                    "simq_balancer_api_keys",
                    "API key records read from Consul: in use (valid) and skipped (rejected).",
                ),
                &["state"],
            )?,
            arm_answers: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_arm_answers_total",
                    "Query answers by arm of the traffic split and outcome (ok, degraded, error).",
                ),
                &["arm", "outcome"],
            )?,
            arm_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "simq_balancer_arm_seconds",
                    "Time to answer a query not in the cache, by arm.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap()),
                &["arm"],
            )?,
            top_score: HistogramVec::new(
                HistogramOpts::new(
                    "simq_balancer_top_score",
                    "Cosine score of the top answer of a query not in the cache, by arm.",
                )
                .buckets(prometheus::linear_buckets(0.05, 0.05, 20).unwrap()),
                &["arm"],
            )?,
            shadow_pairs: IntCounterVec::new(
                Opts::new(
                    "simq_balancer_shadow_pairs_total",
                    "Queries also answered by the candidate to compare, by outcome: top answers agree, differ, or the candidate failed.",
                ),
                &["outcome"],
            )?,
            shadow_overlap: Histogram::with_opts(
                HistogramOpts::new(
                    "simq_balancer_shadow_overlap_ratio",
                    "Share of the active arm's results also in the candidate's (overlap@k) per shadow comparison.",
                )
                .buckets(prometheus::linear_buckets(0.1, 0.1, 10).unwrap()),
            )?,
            shadow_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "simq_balancer_shadow_seconds",
                    "Time each arm took to answer the queries of the shadow comparisons.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap()),
                &["arm"],
            )?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.request_seconds.clone()))?;
        m.registry.register(Box::new(m.embed_seconds.clone()))?;
        m.registry.register(Box::new(m.shard_seconds.clone()))?;
        m.registry.register(Box::new(m.upstream_errors.clone()))?;
        m.registry.register(Box::new(m.degraded.clone()))?;
        m.registry.register(Box::new(m.cache_hits.clone()))?;
        m.registry.register(Box::new(m.cache_misses.clone()))?;
        m.registry.register(Box::new(m.consul_errors.clone()))?;
        m.registry.register(Box::new(m.consul_rejected.clone()))?;
        m.registry.register(Box::new(m.consul_last_ok.clone()))?;
        m.registry.register(Box::new(m.inflight.clone()))?;
        m.registry.register(Box::new(m.shed.clone()))?;
        m.registry.register(Box::new(m.ejections.clone()))?;
        m.registry.register(Box::new(m.hedges.clone()))?;
        m.registry.register(Box::new(m.answers.clone()))?;
        m.registry.register(Box::new(m.healthy_instances.clone()))?;
        m.registry.register(Box::new(m.auth_refusals.clone()))?;
        m.registry.register(Box::new(m.key_queries.clone()))?;
        m.registry.register(Box::new(m.api_keys.clone()))?;
        m.registry.register(Box::new(m.arm_answers.clone()))?;
        m.registry.register(Box::new(m.arm_seconds.clone()))?;
        m.registry.register(Box::new(m.top_score.clone()))?;
        m.registry.register(Box::new(m.shadow_pairs.clone()))?;
        m.registry.register(Box::new(m.shadow_overlap.clone()))?;
        m.registry.register(Box::new(m.shadow_seconds.clone()))?;
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut buf,
        );
        buf
    }
}
