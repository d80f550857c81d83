//! The HTTP surface, a Pingora `ServeHttp` app: `POST /v1/query` (and `/query`; the
//! optional `X-User-Id` header keeps a user on one arm of a traffic split),
//! `GET /health`, `GET /metrics`, `GET /v1/status`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use simq_contract::traffic::shadowed;
use simq_contract::Arm;

use crate::auth::{presented_key, Access, Auth};
use crate::query::{Answer, Executor};
use crate::request::{
    parse, request_timeout, ApiError, ApiErrorKind, QueryRequest, MAX_BODY_BYTES, TIMEOUT_HEADER,
};
use crate::split;
use crate::state::{SharedState, Snapshot};

pub struct BalancerApp {
    pub state: Arc<SharedState>,
    pub executor: Arc<Executor>,
    pub auth: Arc<Auth>,
    /// Port of this instance's own `--admin-listen`, where /metrics and /v1/status stay
    /// open (Consul checks and Prometheus scrape there).
    pub admin_port: Option<u16>,
}

fn json_response(status: u16, body: &impl serde::Serialize) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec(body).expect("JSON serialises");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .body(bytes)
        .expect("static response")
}

fn error_response(e: &ApiError) -> Response<Vec<u8>> {
    let mut resp = json_response(e.status(), &e.body());
    if let Some(secs) = e.retry_after {
        resp.headers_mut().insert("retry-after", secs.into());
    }
    if e.status() == 401 {
        resp.headers_mut().insert(
            "www-authenticate",
            http::HeaderValue::from_static("Bearer realm=\"simq\""),
        );
    }
    resp
}

/// Read the body, refusing more than [`MAX_BODY_BYTES`] without buffering it all.
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, ApiError> {
    let too_large = |n: usize| {
        ApiError::new(
            ApiErrorKind::BodyTooLarge,
            format!("request body has at least {n} bytes, the limit is {MAX_BODY_BYTES}"),
        )
    };
    if let Some(len) = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > MAX_BODY_BYTES {
            return Err(too_large(len));
        }
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY_BYTES {
                    return Err(too_large(body.len()));
                }
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(ApiError::new(
                    ApiErrorKind::BadBody,
                    format!("cannot read the request body: {e}"),
                ))
            }
        }
    }
}

impl BalancerApp {
    /// `key_id`: the API key the query came with (when keys are checked).
    async fn query(&self, session: &mut ServerSession, key_id: Option<&str>) -> Response<Vec<u8>> {
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(e) => return error_response(&e),
        };
        let headers = &session.req_header().headers;
        let timeout = request_timeout(headers.get(TIMEOUT_HEADER).map(|v| v.as_bytes()));
        let req = match (parse(&body), timeout) {
            (Ok(r), Ok(timeout)) => QueryRequest { timeout, ..r },
            (Err(e), _) | (_, Err(e)) => return error_response(&e),
        };
        // One snapshot for the whole query: one dg, its shards, its model's embedders.
        let snapshot = self.state.load();
        let Some(active) = snapshot.routing.as_ref() else {
            return error_response(&ApiError::new(
                ApiErrorKind::NoActiveDg,
                "no index generation is active yet",
            ));
        };
        let headers = &session.req_header().headers;
        let user = match split::user_of(headers.get(split::USER_HEADER), key_id, &req) {
            Ok(u) => u,
            Err(e) => return error_response(&e),
        };
        let (arm, routing) = split::choose(active, snapshot.candidate.as_ref(), &user);
        let result = self.executor.answer(routing, &req).await.map(|mut a| {
            a.arm = arm;
            a
        });
        split::record_answer(&self.executor.metrics, arm, &result);
        match result {
            Ok(answer) => {
                self.shadow(&snapshot, &req, &answer);
                json_response(200, &answer)
            }
            Err(e) => error_response(&e),
        }
    }

    /// Ask the candidate too, in the background, when the split shadows this query: only
    /// for a full answer of the active arm that was not in the cache (so both arms' times
    /// compare), and only while the candidate is ready.
    fn shadow(&self, snapshot: &Arc<Snapshot>, req: &QueryRequest, answer: &Answer) {
        let (Some(active), Some(c)) = (snapshot.routing.as_ref(), snapshot.candidate.as_ref())
        else {
            return;
        };
        if answer.arm != Arm::Active
            || answer.cached
            || answer.degraded
            || c.not_ready(active).is_some()
            || !shadowed(&c.split.salt, &req.normalized(), c.split.shadow)
        {
            return;
        }
        let (executor, snapshot, req, answer) = (
            self.executor.clone(),
            snapshot.clone(),
            req.clone(),
            answer.clone(),
        );
        tokio::spawn(async move {
            let Some(c) = snapshot.candidate.as_ref() else {
                return;
            };
            if let Some(result) = executor.shadow(&c.routing, &req).await {
                split::record_shadow(&executor.metrics, &answer, &result);
            }
        });
    }

    fn on_admin_port(&self, session: &ServerSession) -> bool {
        let port = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.port());
        self.admin_port.is_some() && port == self.admin_port
    }

    fn status(&self) -> Value {
        let s = self.state.load();
        let (keys, rejected_keys) = self.auth.counts();
        let instances = |entries: &[simq_consul::ServiceEntry]| {
            entries
                .iter()
                .map(|e| json!({"id": e.id, "address": format!("{}:{}", e.address, e.port), "tags": e.tags, "status": e.status}))
                .collect::<Vec<_>>()
        };
        let routing = s.routing.as_ref().map(|r| {
            json!({
                "dg": r.active.dg,
                "previous": r.active.previous,
                "flipped_at": r.active.flipped_at,
                "model_id": r.manifest.model_id,
                "items": r.manifest.items,
                "clusters": r.map.clusters(),
                "shards": r.shards.iter().enumerate().map(|(i, reps)| json!({
                    "shard": i,
                    "items": r.manifest.shards[i].items,
                    "healthy_replicas": reps.iter().map(|u| u.addr.clone()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "healthy_embedders": r.embedders.iter().map(|u| u.addr.clone()).collect::<Vec<_>>(),
                "rejected_entries": r.rejected,
            })
        });
        let traffic = s.candidate.as_ref().map(|c| {
            json!({
                "candidate": c.split.candidate,
                "weight": c.split.weight,
                "shadow": c.split.shadow,
                "salt": c.split.salt,
                "set_at": c.split.set_at,
                "serving": s.routing.as_ref().is_some_and(|a| c.not_ready(a).is_none()),
                "not_ready": s.routing.as_ref().and_then(|a| c.not_ready(a)),
                "healthy_shard_replicas": c.routing.shards.iter().map(Vec::len).collect::<Vec<_>>(),
            })
        });
        json!({
            "active": routing,
            "traffic": traffic,
            "instances": {"simq-shard": instances(&s.parts.shards), "simq-embedder": instances(&s.parts.embedders)},
            "consul": {
                "last_ok": s.consul_ok_at.map(|t| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)),
                "errors": s.consul_errors,
            },
            "inflight_queries": self.executor.metrics.inflight.get(),
            "cache": {"entries": self.executor.cache.len(), "capacity": self.executor.cache.capacity()},
            "query": {
                "nprobe": self.executor.options.nprobe,
                "deadline_ms": self.executor.options.deadline.as_millis() as u64,
                "max_inflight": self.executor.options.max_inflight,
                "waiting": self.executor.admission_waiting(),
                "mean_hold_ms": self.executor.admission_mean_hold().as_secs_f64() * 1000.0,
            },
            "ejected_replicas": self.executor.ejected_replicas(),
            // The light contour: serving means it answered within the last 10 s.
            "lexical_contour": {
                "serving": self.executor.lexical_last_ms().is_some_and(|t| {
                    let now = std::time::UNIX_EPOCH.elapsed().unwrap_or_default().as_millis() as u64;
                    now.saturating_sub(t) < 10_000
                }),
                "last_answer_unix_ms": self.executor.lexical_last_ms(),
            },
            "api_keys": {
                "mode": format!("{:?}", self.auth.mode).to_lowercase(),
                "keys": keys,
                "rejected_entries": rejected_keys,
            },
        })
    }
}

/// Counts a query in `simq_balancer_inflight_requests` for as long as it lives.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl ServeHttp for BalancerApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let started = Instant::now();
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let m = &self.executor.metrics;
        let access = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/query" | "/query") => Some(Access::Query),
            ("GET", "/metrics" | "/v1/status") if !self.on_admin_port(session) => {
                Some(Access::Admin)
            }
            _ => None,
        };
        let mut query_key = None;
        if let Some(access) = access {
            let headers = &session.req_header().headers;
            match self.auth.check(presented_key(headers), access, started) {
                Ok(Some(key_id)) if access == Access::Query => {
                    m.key_queries.with_label_values(&[&key_id]).inc();
                    query_key = Some(key_id);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(kind = e.kind.as_str(), key_id = presented_key(headers).and_then(simq_contract::apikeys::key_id), %path, "request refused");
                    m.auth_refusals.with_label_values(&[e.kind.as_str()]).inc();
                    m.requests
                        .with_label_values(&[&e.status().to_string()])
                        .inc();
                    return error_response(&e);
                }
            }
        }
        let resp = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/query" | "/query") => {
                let _inflight = InFlight::enter(&self.executor.metrics.inflight);
                self.query(session, query_key.as_deref()).await
            }
            ("GET", "/health") => {
                let ready = self.state.load().routing.is_some();
                json_response(
                    if ready { 200 } else { 503 },
                    &json!({"status": if ready { "ok" } else { "no active dg" }}),
                )
            }
            ("GET", "/metrics") => Response::builder()
                .status(200)
                .header("content-type", "text/plain; version=0.0.4")
                .body(self.executor.metrics.render())
                .expect("static response"),
            ("GET", "/v1/status") => json_response(200, &self.status()),
            (_, "/v1/query" | "/query") => error_response(&ApiError::new(
                ApiErrorKind::MethodNotAllowed,
                format!("{method} {path}: use POST with a JSON body"),
            )),
            (_, "/health" | "/metrics" | "/v1/status") => error_response(&ApiError::new(
                ApiErrorKind::MethodNotAllowed,
                format!("{method} {path}: use GET"),
            )),
            _ => error_response(&ApiError::new(
                ApiErrorKind::NotFound,
                format!("no route {path}; try POST /v1/query"),
            )),
        };
        m.requests
            .with_label_values(&[resp.status().as_str()])
            .inc();
        if path.ends_with("query") {
            m.request_seconds.observe(started.elapsed().as_secs_f64());
        }
        resp
    }
}
