//! The one load generator: bounded HTTP load of unique queries against `POST /v1/query`
//! (simq's balancer or any service with the same API). `balancer/examples/loadgen.rs`
//! is its command line (scripts/bench.sh and the node suite run it); the whole-system
//! tests call [`run`] in process.
//!
//! Every request takes the next line of the query list (`start` picks where to begin,
//! `end` where to wrap); an answered line is never sent again within a run, so no answer
//! comes from the service's cache unless `repeat` asks for it.
//!
//! - **Closed loop**: `connections` clients, each sending its next query when the last is
//!   answered (after waiting out a refusal's Retry-After, unless `ignore_retry_after`).
//! - **Open loop**: `rate` queries per second on a fixed schedule, latency counted from
//!   the scheduled time (no coordinated omission). Every other query comes from an
//!   impatient client that sends it again at once after a 503 or a failed connection,
//!   up to `impatient` times, as `wrk` and most worker pools do.
//!
//! The run ends after `seconds`, after `max` requests, when the lines run out, or when
//! `stop` is set; outstanding requests still finish and are counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

/// How a run sends its queries.
#[derive(Debug, Clone)]
pub struct Config {
    /// Query endpoints; requests go round robin over them.
    pub urls: Vec<Uri>,
    /// With several URLs: a request whose connection failed before any answer is sent
    /// once more, to the next URL (as a client with a list of entry points does).
    pub resend_to_next_url: bool,
    /// Line of the query list to start at.
    pub start: usize,
    /// Use lines `start` up to (not including) this one, wrapping within them (None: the
    /// whole list, wrapping to its first line).
    pub end: Option<usize>,
    /// Closed loop with this many connections (ignored with `rate`).
    pub connections: usize,
    /// Open loop at this many queries per second.
    pub rate: Option<f64>,
    /// How long to send.
    pub seconds: f64,
    /// Requests at most.
    pub max: usize,
    /// Open loop: requests outstanding at most; beyond it a due request is counted as
    /// dropped by the client instead of sent.
    pub max_outstanding: usize,
    /// Closed loop: pause between a client's answer and its next query.
    pub pause: Duration,
    /// Request timeout.
    pub timeout: Duration,
    /// Neighbours asked per query.
    pub k: usize,
    /// Repeat the first N queries of the run instead of moving on (a cache-hit mix).
    pub repeat: Option<usize>,
    /// Keep the result texts of each answer ([`Outcome::records`]).
    pub record: bool,
    /// Keep one [`Answer`] per request ([`Outcome::answers`]).
    pub keep_answers: bool,
    /// Closed loop: send the next query at once after a refusal, ignoring Retry-After.
    pub ignore_retry_after: bool,
    /// Open loop: how often an impatient client sends a query again at once (0: every
    /// client is polite, its first refusal is a failure).
    pub impatient: u32,
    /// `Authorization` header sent with every query.
    pub authorization: Option<HeaderValue>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            urls: vec![Uri::from_static("http://127.0.0.1:8080/v1/query")],
            resend_to_next_url: false,
            start: 0,
            end: None,
            connections: 8,
            rate: None,
            seconds: 10.0,
            max: 100_000,
            max_outstanding: 2000,
            pause: Duration::ZERO,
            timeout: Duration::from_secs(10),
            k: 10,
            repeat: None,
            record: false,
            keep_answers: false,
            ignore_retry_after: false,
            impatient: 0,
            authorization: None,
        }
    }
}

/// What came back for one request (kept with [`Config::keep_answers`]).
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// When the request was due, in Unix milliseconds.
    pub due_unix_ms: f64,
    /// Milliseconds from when it was due to its last outcome.
    pub ms: f64,
    /// HTTP status, or "timeout" / "connect_error".
    pub status: String,
    /// The dg that answered (a 200).
    pub dg: Option<String>,
    /// Score of the first result (a 200 with results).
    pub top_score: Option<f64>,
    /// The answer was marked degraded.
    pub degraded: bool,
    /// A degraded answer's contour and notes, or a failure's body (shortened).
    pub note: Option<String>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.status == "200"
    }
}

/// What ended a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its `seconds` were up.
    #[default]
    Time,
    /// `stop` was set.
    Stopped,
    /// Its `max` requests were sent, or every line of its window was answered or in
    /// flight.
    RanOut,
}

/// Everything a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds from the first due request to the end of the last.
    pub seconds: f64,
    /// Latencies of the answered (200) requests, sorted, in ms.
    pub latencies_ms: Vec<f64>,
    /// Latencies of the refusals (429, 503), sorted, in ms.
    pub refused_ms: Vec<f64>,
    pub by_status: BTreeMap<String, usize>,
    pub degraded: usize,
    pub cached: usize,
    /// Requests sent again to the next URL after their connection failed.
    pub resent: usize,
    /// Requests an impatient client sent again at once after a 503 or a failed connection.
    pub resent_at_once: usize,
    /// Refusals and errors by the `error.kind` of their JSON body.
    pub by_error: BTreeMap<String, usize>,
    /// The first message of each error kind.
    pub error_examples: BTreeMap<String, String>,
    /// The contour and notes of the first few degraded answers (why they were degraded).
    pub degraded_examples: Vec<String>,
    /// Open loop: due requests not sent because `max_outstanding` were outstanding.
    pub client_dropped: usize,
    /// `{"query", "results": [texts]}` per answered query (with [`Config::record`]).
    pub records: Vec<Value>,
    /// One per request, in the order they ended (with [`Config::keep_answers`]).
    pub answers: Vec<Answer>,
    /// What ended the run.
    pub ended: Ended,
    /// The next line a following run should start at.
    pub next: usize,
}

impl Outcome {
    /// Requests sent (each counted once, whatever its resends).
    pub fn sent(&self) -> usize {
        self.by_status.values().sum()
    }

    /// Answered (200) requests.
    pub fn ok(&self) -> usize {
        self.by_status.get("200").copied().unwrap_or(0)
    }

    /// The JSON summary line `loadgen` prints (with `label` and the config's mode).
    pub fn summary(&self, config: &Config, label: &str) -> Value {
        let ok = self.ok();
        let sent = self.sent();
        json!({
            "label": label,
            "mode": if config.rate.is_some() { "open" } else { "closed" },
            "honours_retry_after": config.rate.is_none() && !config.ignore_retry_after,
            "connections": config.rate.map_or(Some(config.connections), |_| None),
            "offered_rate": config.rate,
            "seconds": self.seconds,
            "sent": sent,
            "ok": ok,
            "failed": sent - ok,
            "by_status": self.by_status,
            "client_dropped": self.client_dropped,
            "degraded": self.degraded,
            "cached": self.cached,
            "resent": self.resent,
            "impatient": config.impatient,
            "resent_at_once": self.resent_at_once,
            "by_error": self.by_error,
            "error_examples": self.error_examples,
            "degraded_examples": self.degraded_examples,
            "throughput": ok as f64 / self.seconds.max(1e-9),
            "p50_ms": ms_quantile(&self.latencies_ms, 0.50),
            "p90_ms": ms_quantile(&self.latencies_ms, 0.90),
            "p99_ms": ms_quantile(&self.latencies_ms, 0.99),
            "max_ms": self.latencies_ms.last(),
            "refused_p99_ms": ms_quantile(&self.refused_ms, 0.99),
            "next": self.next,
        })
    }
}

/// The `p` quantile of sorted milliseconds, rounded to 0.01 ms.
pub fn ms_quantile(sorted: &[f64], p: f64) -> Option<f64> {
    crate::quantile(sorted, p).map(|ms| (ms * 100.0).round() / 100.0)
}

/// One request counted as outstanding until dropped.
struct Outstanding(Arc<AtomicUsize>);

impl Outstanding {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The fields of an answer the tally needs (parsing whole answers cost the generator
/// more CPU than the balancer spent on them).
#[derive(Deserialize)]
struct Flags {
    #[serde(default)]
    degraded: bool,
    #[serde(default)]
    cached: bool,
}

/// What an [`Answer`] keeps of a 200, read only with [`Config::keep_answers`].
#[derive(Deserialize)]
struct Detail {
    #[serde(default)]
    dg: Option<String>,
    #[serde(default)]
    results: Vec<Scored>,
}

#[derive(Deserialize)]
struct Scored {
    #[serde(default)]
    score: Option<f64>,
}

struct Generator {
    config: Config,
    lines: Vec<String>,
    next: AtomicUsize,
    /// Lines in flight or answered (200) in this run.
    taken: Vec<AtomicBool>,
    /// [`Generator::take`] had nothing left to give.
    ran_out: AtomicBool,
    tally: Mutex<Outcome>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Round robin over the URLs.
    next_uri: AtomicUsize,
    /// One moment as an `Instant` and in Unix milliseconds.
    clock: (Instant, f64),
}

impl Generator {
    fn unix_ms(&self, at: Instant) -> f64 {
        let (instant, unix_ms) = self.clock;
        unix_ms + at.duration_since(instant).as_secs_f64() * 1000.0
    }

    /// The next query to send, (line index, text); None once `max` positions are taken
    /// or every line of the window is answered or in flight. Without `repeat` a line in
    /// flight or answered (200) is skipped when the window wraps, so each answer is a
    /// cache miss however long the run (a refused line never reached a cache and may go
    /// again).
    fn take(&self) -> Option<(usize, String)> {
        let taken = self.take_next();
        if taken.is_none() {
            self.ran_out.store(true, Ordering::Release);
        }
        taken
    }

    fn take_next(&self) -> Option<(usize, String)> {
        let c = &self.config;
        let len = self.lines.len();
        // (first line of the window, its length, where in it to begin)
        let (base, span, offset) = match c.end {
            Some(end) => (c.start, end.clamp(c.start + 1, len) - c.start, 0),
            None => (0, len, c.start),
        };
        for _ in 0..=span {
            let n = self.next.fetch_add(1, Ordering::Relaxed) - c.start;
            if n >= c.max {
                return None;
            }
            let i = match c.repeat {
                Some(r) => (c.start + n % r.max(1)) % len,
                None => base + (offset + n) % span,
            };
            if c.repeat.is_none() && self.taken[i].swap(true, Ordering::AcqRel) {
                continue;
            }
            return Some((i, self.lines[i].clone()));
        }
        None
    }

    fn request(&self, uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::post(uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("valid request");
        if let Some(auth) = &self.config.authorization {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        req
    }

    /// One request of `body` (once more to the next URL when its connection failed and
    /// `resend_to_next_url` is set): (status or "timeout"/"connect_error", body,
    /// Retry-After, whether it went to the next URL).
    async fn exchange(&self, body: &Bytes) -> (String, Option<Bytes>, Option<Duration>, bool) {
        let urls = &self.config.urls;
        let first = self.next_uri.fetch_add(1, Ordering::Relaxed);
        let mut resent = false;
        let exchange = async {
            let mut n = first;
            loop {
                let uri = &urls[n % urls.len()];
                match self.client.request(self.request(uri, body.clone())).await {
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        let bytes = body.collect().await?.to_bytes();
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, bytes));
                    }
                    // No answer at all (the connection failed): once to the next URL.
                    Err(_) if self.config.resend_to_next_url && urls.len() > 1 && !resent => {
                        resent = true;
                        n += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(Ok((parts, bytes))) => {
                let retry_after = parts
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                (
                    parts.status.as_str().to_string(),
                    Some(bytes),
                    retry_after,
                    resent,
                )
            }
            Err(_) => ("timeout".to_string(), None, None, resent),
            Ok(Err(_)) => ("connect_error".to_string(), None, None, resent),
        }
    }

    /// Send one query and tally the outcome (after up to `resends` sends again at once
    /// following a 503 or a failed connection); returns the Retry-After of a refusal.
    async fn send(
        &self,
        (line, query): (usize, String),
        due: Instant,
        resends: u32,
    ) -> Option<Duration> {
        let request = Bytes::from(
            serde_json::to_vec(&json!({"query": query, "k": self.config.k}))
                .expect("JSON serialises"),
        );
        let (mut left, mut at_once, mut to_next) = (resends, 0, 0);
        let (status, body, retry_after) = loop {
            let (status, body, retry_after, resent) = self.exchange(&request).await;
            to_next += usize::from(resent);
            if left > 0 && (status == "503" || status == "connect_error") {
                left -= 1;
                at_once += 1;
                continue;
            }
            break (status, body, retry_after);
        };
        let ms = due.elapsed().as_secs_f64() * 1000.0;
        let flags = body
            .as_ref()
            .filter(|_| status == "200")
            .and_then(|b| serde_json::from_slice::<Flags>(b).ok());
        let whole = |b: &Bytes| serde_json::from_slice::<Value>(b).ok();
        let record = match (self.config.record, &body, &flags) {
            (true, Some(b), Some(_)) => whole(b).map(|a| {
                let texts: Vec<Value> = a["results"]
                    .as_array()
                    .map(|r| r.iter().map(|x| x["text"].clone()).collect())
                    .unwrap_or_default();
                json!({"query": query, "results": texts})
            }),
            _ => None,
        };
        if status != "200" {
            self.taken[line].store(false, Ordering::Release);
        }
        let answer = self.config.keep_answers.then(|| {
            let degraded = flags.as_ref().is_some_and(|f| f.degraded);
            let note = match (&body, degraded) {
                (Some(b), true) => {
                    whole(b).map(|v| format!("contour {} {}", v["contour"], v["notes"]))
                }
                (Some(b), false) if status != "200" => {
                    Some(String::from_utf8_lossy(b).chars().take(300).collect())
                }
                _ => None,
            };
            let detail = body
                .as_ref()
                .filter(|_| flags.is_some())
                .and_then(|b| serde_json::from_slice::<Detail>(b).ok());
            Answer {
                due_unix_ms: self.unix_ms(due),
                ms,
                status: status.clone(),
                dg: detail.as_ref().and_then(|d| d.dg.clone()),
                top_score: detail
                    .as_ref()
                    .map(|d| d.results.first().and_then(|r| r.score).unwrap_or(0.0)),
                degraded,
                note,
            }
        });
        let mut t = self.tally.lock().expect("tally lock");
        t.resent += to_next;
        t.resent_at_once += at_once;
        t.answers.extend(answer);
        *t.by_status.entry(status.clone()).or_default() += 1;
        match (status.as_str(), flags) {
            ("200", Some(f)) => {
                t.latencies_ms.push(ms);
                t.degraded += usize::from(f.degraded);
                t.cached += usize::from(f.cached);
                if f.degraded && t.degraded_examples.len() < 3 {
                    let why = body.as_ref().and_then(whole).map(|v| {
                        format!("contour {} {}", v["contour"], v["notes"])
                            .chars()
                            .take(300)
                            .collect::<String>()
                    });
                    t.degraded_examples.extend(why);
                }
                t.records.extend(record);
            }
            ("429" | "503", _) => t.refused_ms.push(ms),
            _ => {}
        }
        if status != "200" {
            let error = body.as_ref().and_then(whole).map(|v| v["error"].clone());
            let kind = error
                .as_ref()
                .and_then(|e| e["kind"].as_str())
                .unwrap_or(status.as_str())
                .to_string();
            *t.by_error.entry(kind.clone()).or_default() += 1;
            if let Some(message) = error.as_ref().and_then(|e| e["message"].as_str()) {
                t.error_examples
                    .entry(kind)
                    .or_insert_with(|| message.chars().take(300).collect());
            }
        }
        retry_after
    }
}

/// Run the load of `config` over `lines` (one query each) until its time, its `max`
/// or its lines are used up, or `stop` is set.
pub async fn run(config: Config, lines: Vec<String>, stop: Arc<AtomicBool>) -> Outcome {
    assert!(!lines.is_empty(), "a load needs at least one query");
    assert!(!config.urls.is_empty(), "a load needs a URL");
    // hyper's pooled HTTP/1 client: the URL is parsed once and nothing else is added per
    // request, so the generator takes little of the cores it shares with the service.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(config.connections.max(64))
        .build(connector);
    let unix_ms = std::time::UNIX_EPOCH
        .elapsed()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0;
    let g = Arc::new(Generator {
        next: AtomicUsize::new(config.start),
        taken: lines.iter().map(|_| AtomicBool::new(false)).collect(),
        ran_out: AtomicBool::new(false),
        lines,
        tally: Mutex::new(Outcome::default()),
        client,
        next_uri: AtomicUsize::new(0),
        clock: (Instant::now(), unix_ms),
        config,
    });
    let run = Duration::from_secs_f64(g.config.seconds);
    let began = Instant::now();
    let sending = {
        let stop = stop.clone();
        move || began.elapsed() < run && !stop.load(Ordering::Acquire)
    };
    let mut client_dropped = 0usize;
    match g.config.rate {
        None => {
            let workers = (0..g.config.connections.max(1)).map(|_| {
                let (g, sending) = (g.clone(), sending.clone());
                tokio::spawn(async move {
                    while sending() {
                        let Some(q) = g.take() else { break };
                        let retry_after = g.send(q, Instant::now(), 0).await;
                        let wait = retry_after.filter(|_| !g.config.ignore_retry_after);
                        let pause = wait.unwrap_or_default().max(g.config.pause);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause.min(run.saturating_sub(began.elapsed())))
                                .await;
                        }
                    }
                })
            });
            futures::future::join_all(workers).await;
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let outstanding = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            let mut n = 0u32;
            loop {
                let at = began + interval * n;
                if at.duration_since(began) >= run {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                if !sending() {
                    break;
                }
                n += 1;
                if outstanding.load(Ordering::Acquire) >= g.config.max_outstanding {
                    client_dropped += 1;
                    continue;
                }
                let Some(q) = g.take() else { break };
                let counted = Outstanding::enter(&outstanding);
                let resends = if n % 2 == 0 { g.config.impatient } else { 0 };
                let g = g.clone();
                tasks.push(tokio::spawn(async move {
                    let _counted = counted;
                    g.send(q, at, resends).await;
                }));
            }
            futures::future::join_all(tasks).await;
        }
    }
    let mut t = std::mem::take(&mut *g.tally.lock().expect("tally lock"));
    t.seconds = began.elapsed().as_secs_f64();
    t.latencies_ms.sort_by(f64::total_cmp);
    t.refused_ms.sort_by(f64::total_cmp);
    t.client_dropped = client_dropped;
    t.ended = if stop.load(Ordering::Acquire) {
        Ended::Stopped
    } else if g.ran_out.load(Ordering::Acquire) {
        Ended::RanOut
    } else {
        Ended::Time
    };
    t.next = g
        .next
        .load(Ordering::Relaxed)
        .min(g.config.start + g.config.max);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query service on loopback that answers the first `refuse` requests 503 and every
    /// later one 200 with `dg-x`, counting what it got.
    async fn service(refuse: usize) -> (Uri, Arc<AtomicUsize>) {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let (status, body) = if n < refuse {
                                (
                                    503,
                                    r#"{"error": {"kind": "overloaded", "message": "busy"}}"#,
                                )
                            } else {
                                (
                                    200,
                                    r#"{"dg": "dg-x", "results": [{"text": "t", "score": 0.5}]}"#,
                                )
                            };
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}/v1/query").parse().unwrap(), seen)
    }

    fn lines(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("question {i}")).collect()
    }

    #[tokio::test]
    async fn a_closed_loop_sends_each_line_once_and_keeps_each_answer() {
        let (url, seen) = service(0).await;
        let config = Config {
            urls: vec![url],
            connections: 3,
            keep_answers: true,
            ..Config::default()
        };
        let out = run(config, lines(20), Arc::new(AtomicBool::new(false))).await;
        assert_eq!(out.ok(), 20, "every line once, then the lines are used up");
        assert_eq!(seen.load(Ordering::SeqCst), 20);
        assert_eq!(out.ended, Ended::RanOut);
        assert_eq!(out.answers.len(), 20);
        assert!(out
            .answers
            .iter()
            .all(|a| a.dg.as_deref() == Some("dg-x") && a.top_score == Some(0.5)));
    }

    #[tokio::test]
    async fn an_impatient_client_resends_a_refused_query_at_once() {
        // Open loop, 2 queries: the second (n = 2, even) is impatient and gets through
        // after its refusals; the first is polite and its 503 is a failure.
        let (url, _) = service(3).await;
        let config = Config {
            urls: vec![url],
            rate: Some(50.0),
            seconds: 1.0,
            max: 2,
            impatient: 5,
            keep_answers: true,
            ..Config::default()
        };
        let out = run(config, lines(2), Arc::new(AtomicBool::new(false))).await;
        assert_eq!(out.by_status.get("503"), Some(&1), "{:?}", out.by_status);
        assert_eq!(out.ok(), 1);
        assert_eq!(out.resent_at_once, 2);
        assert_eq!(out.by_error.get("overloaded"), Some(&1));
        let failed: Vec<_> = out.answers.iter().filter(|a| !a.ok()).collect();
        assert!(failed[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("busy")));
    }

    #[tokio::test]
    async fn stop_ends_the_run_and_says_so() {
        let (url, _) = service(0).await;
        let stop = Arc::new(AtomicBool::new(false));
        let config = Config {
            urls: vec![url],
            connections: 1,
            pause: Duration::from_millis(20),
            repeat: Some(3),
            seconds: 30.0,
            ..Config::default()
        };
        let task = tokio::spawn(run(config, lines(3), stop.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Release);
        let out = task.await.unwrap();
        assert_eq!(out.ended, Ended::Stopped);
        assert!(
            out.ok() >= 3 && out.seconds < 5.0,
            "{} in {} s",
            out.ok(),
            out.seconds
        );
    }
}
