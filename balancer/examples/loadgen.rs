//! Bounded HTTP load of unique queries against `POST /v1/query` (simq's balancer or any
//! service with the same API), for scripts/bench.sh and the node suite: the command line
//! of the one load generator, `simq_testkit::load` (which the whole-system tests call in
//! process).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{HeaderValue, Uri};
use serde_json::json;
use simq_testkit::load::{self, Config};

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
    let urls = args
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
    let config = Config {
        urls,
        resend_to_next_url: args.resend_to_next_url,
        start: args.start,
        end: args.end,
        connections: args.connections,
        rate: args.rate,
        seconds: args.seconds,
        max: args.max,
        max_outstanding: args.max_outstanding,
        pause: Duration::ZERO,
        timeout: Duration::from_secs_f64(args.timeout),
        k: args.k,
        repeat: args.repeat,
        record: args.record.is_some(),
        keep_answers: args.timeline.is_some(),
        ignore_retry_after: args.ignore_retry_after,
        impatient: args.impatient,
        authorization,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.store(true, Ordering::Release);
        });
    }
    let out = load::run(config.clone(), lines, stop).await;
    if let Some(path) = &args.record {
        write_lines(path, &out.records)?;
    }
    if let Some(path) = &args.timeline {
        let timeline = out.answers.iter().map(|a| {
            json!({
                "at_unix_ms": a.due_unix_ms.round(),
                "ms": (a.ms * 100.0).round() / 100.0,
                "status": a.status,
                "degraded": a.degraded,
            })
        });
        write_lines(path, timeline)?;
    }
    println!("{}", out.summary(&config, &args.label));
    Ok(())
}

/// Write each of `lines` as one line of `path`.
fn write_lines(
    path: &std::path::Path,
    lines: impl IntoIterator<Item = impl std::fmt::Display>,
) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for line in lines {
        writeln!(f, "{line}")?;
    }
    f.flush()
}
