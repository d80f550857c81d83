//! Bounded HTTP load of unique queries against `POST /v1/query` (simq's balancer or any
//! service with the same API), for scripts/bench.sh.
//!
//! Every request takes the next line of `--queries` (`--start` picks where to begin,
//! `--end` where to wrap, the summary says where it ended); an answered line is never sent
//! again within a run, so no answer comes from the service's cache unless `--repeat`
//! asks for it. Closed loop:
//! `--connections` clients, each sending its next query when the last is answered. Open
//! loop: `--rate` queries per second on a fixed schedule, latency counted from the
//! scheduled time (no coordinated omission). Prints one JSON summary line: answers by
//! status, degraded and cached answers, latency percentiles, and achieved rate;
//! `--record FILE` also writes the result texts of each answered query (JSON lines) for
//! recall measurements, `--timeline FILE` one line per request (when it was due, in Unix
//! milliseconds, its latency and status) to line refusals up with a rollout's log.
//! SIGTERM or SIGINT ends the sending early (outstanding requests still finish and are
//! counted), so a load can span work of unknown length such as a rollout: start it with
//! a long `--seconds`, stop it with `kill -TERM`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about, long_about)]
struct Args {
    /// Query endpoint; give it more than once to spread the requests over several
    /// balancers (round robin, e.g. one per node).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080/v1/query")]
    urls: Vec<String>,
    /// With several --url: a request whose connection failed before any answer is sent
    /// once more, to the next URL (as a client with a list of entry points does); counted
    /// in "resent". Never a request that got an answer or timed out.
    #[arg(long)]
    resend_to_next_url: bool,
    /// One query per line.
    #[arg(long)]
    queries: PathBuf,
    /// Line of --queries to start at.
    #[arg(long, default_value_t = 0)]
    start: usize,
    /// Closed loop with this many connections (ignored with --rate).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Open loop at this many queries per second.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Use lines `--start` up to (not including) this one, wrapping within them (default:
    /// the whole file, wrapping to its first line).
    #[arg(long)]
    end: Option<usize>,
    /// Requests at most (bounds the run whatever the speed).
    #[arg(long, default_value_t = 100_000)]
    max: usize,
    /// Open loop: requests outstanding at most; beyond it a scheduled request is counted
    /// as "client_dropped" instead of sent.
    #[arg(long, default_value_t = 2000)]
    max_outstanding: usize,
    /// Request timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Neighbours asked per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Repeat the first N queries of the run instead of moving on (a cache-hit mix).
    #[arg(long)]
    repeat: Option<usize>,
    /// Write {"query", "results": [texts]} per answered query to this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Write {"at_unix_ms", "ms", "status", "degraded"} per request to this file, in the
    /// order the answers came (`at_unix_ms`: when the request was due).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Closed loop: send the next query at once after a refusal, ignoring its
    /// Retry-After (a client that hammers an overloaded service). By default a connection
    /// that gets 429/503 with Retry-After waits that long, as a well-behaved client does.
    #[arg(long)]
    ignore_retry_after: bool,
    /// Open loop: every other query comes from an impatient client, which sends it again
    /// at once after a 503 or a failed connection (no pause, Retry-After ignored, as `wrk`
    /// and most worker pools do), up to this many times; counted in "resent_at_once".
    /// Only its last outcome counts. The other queries are polite: their first refusal
    /// is a failure. 0: every query is polite.
    #[arg(long, default_value_t = 0)]
    impatient: u32,
    /// Send the API key in this file (`Authorization: Bearer`) with every query.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// A label copied into the summary.
    #[arg(long, default_value = "")]
    label: String,
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

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    by_status: std::collections::BTreeMap<String, usize>,
    degraded: usize,
    cached: usize,
    /// Requests sent again to the next URL after their connection failed.
    resent: usize,
    /// Requests an impatient client sent again at once after a 503 or a failed connection.
    resent_at_once: usize,
    /// Refusals and errors by the `error.kind` of their JSON body.
    by_error: std::collections::BTreeMap<String, usize>,
    /// The first message of each error kind, to say what happened.
    error_examples: std::collections::BTreeMap<String, String>,
    refused_ms: Vec<f64>,
    records: Vec<Value>,
    timeline: Vec<Value>,
}

struct Shared {
    args: Args,
    lines: Vec<String>,
    next: AtomicUsize,
    /// Lines in flight or answered (200) in this run.
    taken: Vec<AtomicBool>,
    tally: Mutex<Tally>,
    client: Client<HttpConnector, Full<Bytes>>,
    uris: Vec<Uri>,
    /// Round robin over `uris`.
    next_uri: AtomicUsize,
    authorization: Option<HeaderValue>,
    timeout: Duration,
    /// One moment as an `Instant` and in Unix milliseconds (every request is due after it).
    clock: (Instant, f64),
}

impl Shared {
    fn unix_ms(&self, at: Instant) -> f64 {
        let (instant, unix_ms) = self.clock;
        unix_ms + at.duration_since(instant).as_secs_f64() * 1000.0
    }

    /// The next query to send, (line index, text); None once `--max` positions are
    /// taken or every line of the window is answered or in flight. Without `--repeat` a
    /// line in flight or answered (200) is skipped when the window wraps, so each answer
    /// is a cache miss however long the run (a refused line never reached a cache and may
    /// go again).
    fn take(&self) -> Option<(usize, String)> {
        let a = &self.args;
        let len = self.lines.len();
        // (first line of the window, its length, where in it to begin)
        let (base, span, offset) = match a.end {
            Some(end) => (a.start, end.clamp(a.start + 1, len) - a.start, 0),
            None => (0, len, a.start),
        };
        for _ in 0..=span {
            let n = self.next.fetch_add(1, Ordering::Relaxed) - a.start;
            if n >= a.max {
                return None;
            }
            let i = match a.repeat {
                Some(r) => (a.start + n % r.max(1)) % len,
                None => base + (offset + n) % span,
            };
            if a.repeat.is_none() && self.taken[i].swap(true, Ordering::AcqRel) {
                continue;
            }
            return Some((i, self.lines[i].clone()));
        }
        None
    }

    /// A query request to `uri` with `body`.
    fn request(&self, uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::post(uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("valid request");
        if let Some(auth) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        req
    }

    /// One request of `body` (once more to the next URL when its connection failed and
    /// `--resend-to-next-url` is set): (status or "timeout"/"connect_error", body,
    /// Retry-After, whether it went to the next URL).
    async fn exchange(&self, body: &Bytes) -> (String, Option<Bytes>, Option<Duration>, bool) {
        let first = self.next_uri.fetch_add(1, Ordering::Relaxed);
        let mut resent = false;
        let exchange = async {
            let mut n = first;
            loop {
                let uri = &self.uris[n % self.uris.len()];
                match self.client.request(self.request(uri, body.clone())).await {
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        let bytes = body.collect().await?.to_bytes();
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, bytes));
                    }
                    // No answer at all (the connection failed): once to the next URL.
                    Err(_) if self.args.resend_to_next_url && self.uris.len() > 1 && !resent => {
                        resent = true;
                        n += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
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
        started: Instant,
        resends: u32,
    ) -> Option<Duration> {
        let request = Bytes::from(
            serde_json::to_vec(&json!({"query": query, "k": self.args.k}))
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
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        // Only the flags are read from an answer (results too when recording): parsing
        // whole answers cost this generator more CPU than the balancer spent on them.
        let flags = body
            .as_ref()
            .filter(|_| status == "200")
            .and_then(|b| serde_json::from_slice::<Flags>(b).ok());
        let record = match (&self.args.record, &body, &flags) {
            (Some(_), Some(b), Some(_)) => serde_json::from_slice::<Value>(b).ok().map(|a| {
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
        let moment = self.args.timeline.as_ref().map(|_| {
            json!({
                "at_unix_ms": self.unix_ms(started).round(),
                "ms": (ms * 100.0).round() / 100.0,
                "status": status,
                "degraded": flags.as_ref().is_some_and(|f| f.degraded),
            })
        });
        let mut t = self.tally.lock().unwrap();
        t.resent += to_next;
        t.resent_at_once += at_once;
        t.timeline.extend(moment);
        *t.by_status.entry(status.clone()).or_default() += 1;
        match (status.as_str(), flags) {
            ("200", Some(f)) => {
                t.latencies_ms.push(ms);
                t.degraded += usize::from(f.degraded);
                t.cached += usize::from(f.cached);
                t.records.extend(record);
            }
            ("429" | "503", _) => t.refused_ms.push(ms),
            _ => {}
        }
        if status != "200" {
            let error = body
                .as_ref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .map(|v| v["error"].clone());
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

/// The fields of an answer the tally needs.
#[derive(Deserialize)]
struct Flags {
    #[serde(default)]
    degraded: bool,
    #[serde(default)]
    cached: bool,
}

/// The `p` quantile of sorted milliseconds, rounded to 0.01 ms.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    simq_testkit::quantile(sorted, p).map(|ms| (ms * 100.0).round() / 100.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lines: Vec<String> = std::fs::read_to_string(&args.queries)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(
        !lines.is_empty(),
        "{} has no queries",
        args.queries.display()
    );
    if let Some(end) = args.end {
        anyhow::ensure!(
            args.start < end && end <= lines.len(),
            "--start {} --end {end}: {} has lines 0 to {}",
            args.start,
            args.queries.display(),
            lines.len()
        );
    }
    let uris = args
        .urls
        .iter()
        .map(|url| {
            let uri: Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
            anyhow::ensure!(
                uri.scheme_str() == Some("http"),
                "--url {url}: only http:// is supported"
            );
            Ok(uri)
        })
        .collect::<anyhow::Result<Vec<Uri>>>()?;
    let authorization = match &args.api_key_file {
        None => None,
        Some(file) => {
            let key = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("reading the API key from {}: {e}", file.display()))?;
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| anyhow::anyhow!("{} does not hold an API key", file.display()))?;
            value.set_sensitive(true);
            Some(value)
        }
    };
    // hyper's pooled HTTP/1 client: the URL is parsed once and nothing else is added per
    // request, so the generator takes little of the cores it shares with the service.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections.max(64))
        .build(connector);
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(args.start),
        taken: lines.iter().map(|_| AtomicBool::new(false)).collect(),
        lines,
        tally: Mutex::new(Tally::default()),
        client,
        uris,
        next_uri: AtomicUsize::new(0),
        authorization,
        timeout: Duration::from_secs_f64(args.timeout),
        clock: (
            Instant::now(),
            std::time::UNIX_EPOCH
                .elapsed()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0,
        ),
        args,
    });
    let run = Duration::from_secs_f64(shared.args.seconds);
    let began = Instant::now();
    let stopped = Arc::new(AtomicBool::new(false));
    {
        let stopped = stopped.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stopped.store(true, Ordering::Release);
        });
    }
    let sending = move || began.elapsed() < run && !stopped.load(Ordering::Acquire);
    let mut client_dropped = 0usize;
    match shared.args.rate {
        None => {
            let workers = (0..shared.args.connections.max(1)).map(|_| {
                let s = shared.clone();
                let sending = sending.clone();
                tokio::spawn(async move {
                    while sending() {
                        let Some(q) = s.take() else { break };
                        let retry_after = s.send(q, Instant::now(), 0).await;
                        if let Some(wait) = retry_after.filter(|_| !s.args.ignore_retry_after) {
                            let left = run.saturating_sub(began.elapsed());
                            tokio::time::sleep(wait.min(left)).await;
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
                if outstanding.load(Ordering::Acquire) >= shared.args.max_outstanding {
                    client_dropped += 1;
                    continue;
                }
                let Some(q) = shared.take() else { break };
                let s = shared.clone();
                let counted = Outstanding::enter(&outstanding);
                let resends = if n.is_multiple_of(2) {
                    s.args.impatient
                } else {
                    0
                };
                tasks.push(tokio::spawn(async move {
                    let _counted = counted;
                    s.send(q, at, resends).await;
                }));
            }
            futures::future::join_all(tasks).await;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    let mut t = std::mem::take(&mut *shared.tally.lock().unwrap());
    t.latencies_ms.sort_by(f64::total_cmp);
    t.refused_ms.sort_by(f64::total_cmp);
    let sent: usize = t.by_status.values().sum();
    let ok = t.by_status.get("200").copied().unwrap_or(0);
    for (path, lines) in [
        (&shared.args.record, &t.records),
        (&shared.args.timeline, &t.timeline),
    ] {
        if let Some(path) = path {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
            for line in lines {
                writeln!(f, "{line}")?;
            }
        }
    }
    let a = &shared.args;
    println!(
        "{}",
        json!({
            "label": a.label,
            "mode": if a.rate.is_some() { "open" } else { "closed" },
            "honours_retry_after": a.rate.is_none() && !a.ignore_retry_after,
            "connections": a.rate.map_or(Some(a.connections), |_| None),
            "offered_rate": a.rate,
            "seconds": elapsed,
            "sent": sent,
            "ok": ok,
            "failed": sent - ok,
            "by_status": t.by_status,
            "client_dropped": client_dropped,
            "degraded": t.degraded,
            "cached": t.cached,
            "resent": t.resent,
            "impatient": a.impatient,
            "resent_at_once": t.resent_at_once,
            "by_error": t.by_error,
            "error_examples": t.error_examples,
            "throughput": ok as f64 / elapsed,
            "p50_ms": percentile(&t.latencies_ms, 0.50),
            "p90_ms": percentile(&t.latencies_ms, 0.90),
            "p99_ms": percentile(&t.latencies_ms, 0.99),
            "max_ms": t.latencies_ms.last(),
            "refused_p99_ms": percentile(&t.refused_ms, 0.99),
            "next": shared.next.load(Ordering::Relaxed).min(a.start + a.max),
        })
    );
    Ok(())
}
