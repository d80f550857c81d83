//! Embedder throughput benchmark: the gRPC service (single queries, concurrent single
//! queries, concurrent 16-text requests) against the bound measured in the same run: the
//! bare runtime (same ONNX sessions, no gRPC, no batcher) on the same texts and batch sizes.
//!
//! cargo run --release -p simq-embedder --example bench -- --texts FILE [--n 2000]
//! (scripts/bench.sh embedder runs it on the real corpus.)

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use simq_embedder::proto::{embedder_client::EmbedderClient, EmbedRequest};
use simq_embedder::runtime::{cores, default_ort_library, Embedder, RuntimeOptions};

#[derive(Parser)]
struct Args {
    /// Model directory.
    #[arg(long, env = "SIMQ_MODEL_DIR")]
    model_dir: PathBuf,
    /// File with one text per line (the real corpus).
    #[arg(long)]
    texts: PathBuf,
    /// Texts per measurement.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Concurrent clients for the load phases.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// ONNX sessions, for the bare runtime and the service [default: the service's].
    #[arg(long)]
    sessions: Option<usize>,
    /// Intra-op threads per session [default: the service's].
    #[arg(long)]
    intra_threads: Option<usize>,
    /// Intra-op threads of the lone-query session, 0 for none [default: the service's].
    #[arg(long)]
    lone_threads: Option<usize>,
    /// Only measure the bare-runtime bound of the whole query path and print it as JSON:
    /// single-query latency (one session, a thread per core) and the best throughput (one
    /// single-threaded session per core, all texts handed over at once).
    #[arg(long)]
    bound_only: bool,
    /// The simq-embedder binary [default: beside this example's target dir].
    #[arg(long)]
    service_bin: Option<PathBuf>,
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    // SAFETY: sysconf only reads its argument.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if f.len() < 13 || ticks <= 0.0 {
        return f64::NAN;
    }
    (f[11] + f[12]) / ticks
}

/// The service under test; stopped (SIGTERM, then waited for) when dropped, also when a
/// phase fails with `?`.
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn percentile(sorted_ms: &[f64], p: usize) -> f64 {
    simq_testkit::quantile(sorted_ms, p as f64 / 100.0).unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = std::fs::read_to_string(&args.texts)?;
    let texts: Vec<String> = all
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.n)
        .map(String::from)
        .collect();
    anyhow::ensure!(
        texts.len() == args.n,
        "{} has fewer than {} texts",
        args.texts.display(),
        args.n
    );
    let n = texts.len();
    if args.bound_only {
        return bound_only(&args, &texts);
    }

    // Bound: the bare runtime, same session layout as the service.
    let defaults = RuntimeOptions::for_queries();
    let options = RuntimeOptions {
        sessions: args.sessions.unwrap_or(defaults.sessions),
        intra_threads: args.intra_threads.unwrap_or(defaults.intra_threads),
        lone_threads: args.lone_threads.unwrap_or(defaults.lone_threads),
        ..defaults
    };
    let mut bound = Vec::new();
    {
        let embedder = Embedder::load(&default_ort_library(), &args.model_dir, options)?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // Warm-up.
        embedder.embed(&refs[..64])?;
        // The last one hands every text over at once: sorted by length globally, batches
        // hold texts of (nearly) equal length: the machine's bound for this model.
        for batch in [1usize, 16, 64, n] {
            let t = Instant::now();
            for chunk in refs.chunks(batch) {
                embedder.embed(chunk)?;
            }
            bound.push((batch, rate(n, t.elapsed())));
        }
    }
    let bound_of = |b: usize| bound.iter().find(|(x, _)| *x == b).unwrap().1;

    // The service, as a separate process on loopback.
    let bin = args.service_bin.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("simq-embedder")
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&bin)
        .args(["--model-dir", args.model_dir.to_str().unwrap()])
        .args([
            "--grpc-listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--sessions", &options.sessions.to_string()])
        .args(["--intra-threads", &options.intra_threads.to_string()])
        .args(["--lone-threads", &options.lone_threads.to_string()])
        // A closed loop of 32 clients x 16 texts keeps 512 texts queued: a throughput
        // test, not an overload test, so nothing is refused for waiting.
        .args(["--max-queue-wait-ms", "60000", "--queue-limit", "4096"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start {}: {e} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let child = Service(child);
    let addr = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match EmbedderClient::connect(addr.clone()).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => anyhow::bail!("embedder did not come up: {e}"),
        }
    };
    let texts = Arc::new(texts);
    let mut c = client.clone();
    c.embed(EmbedRequest {
        texts: texts[..16].to_vec(),
    })
    .await?; // warm-up

    // 1. One client, one text per request, one request at a time.
    let single_n = n / 4;
    let mut lat = Vec::with_capacity(single_n);
    let t = Instant::now();
    for text in texts.iter().take(single_n) {
        let q = Instant::now();
        c.embed(EmbedRequest {
            texts: vec![text.clone()],
        })
        .await?;
        lat.push(q.elapsed().as_secs_f64() * 1000.0);
    }
    let single_rate = rate(single_n, t.elapsed());
    lat.sort_by(f64::total_cmp);

    // 2. and 3. Concurrent clients sending `per_request` texts per request.
    let load = |per_request: usize| {
        let client = client.clone();
        let texts = texts.clone();
        let concurrency = args.concurrency;
        async move {
            let next = Arc::new(AtomicUsize::new(0));
            let t = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (mut c, texts, next) = (client.clone(), texts.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(per_request, Ordering::Relaxed);
                        if i >= texts.len() {
                            return Ok::<_, tonic::Status>(());
                        }
                        let end = (i + per_request).min(texts.len());
                        c.embed(EmbedRequest {
                            texts: texts[i..end].to_vec(),
                        })
                        .await?;
                    }
                }));
            }
            for task in tasks {
                task.await.expect("load task")?;
            }
            Ok::<_, tonic::Status>(rate(texts.len(), t.elapsed()))
        }
    };
    let pid = child.0.id();
    let cpu = cpu_seconds(pid);
    let concurrent_single = load(1).await?;
    let cpu_single = (cpu_seconds(pid) - cpu) * 1000.0 / n as f64;
    let cpu = cpu_seconds(pid);
    let concurrent_16 = load(16).await?;
    let cpu_16 = (cpu_seconds(pid) - cpu) * 1000.0 / n as f64;

    drop(child);

    println!(
        "embedder throughput, {n} real corpus texts, {} session(s) x {} intra-op thread(s), lone-query session of {} thread(s), {} cores",
        options.sessions,
        options.intra_threads,
        options.lone_threads,
        cores()
    );
    println!();
    // Two bounds per service row: the bare runtime handed texts in the same shape (what
    // the service could at best do with what arrives together), and the bare runtime
    // handed all texts at once (global length buckets: the machine's bound).
    let all = bound_of(n);
    let chunked = bound_of(16).max(bound_of(64));
    println!("| path | texts/s | same-shape bound | ratio | all-at-once bound | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for b in [1, 16, 64] {
        println!(
            "| bare runtime, chunks of {b} | {:.0} | | | | |",
            bound_of(b)
        );
    }
    println!("| bare runtime, all {n} texts in one call | {all:.0} | | | | |");
    let row = |what: String, got: f64, same: f64| {
        println!(
            "| {what} | {got:.0} | {same:.0} | {:.2} | {all:.0} | {:.2} |",
            got / same,
            got / all
        )
    };
    row(
        format!(
            "service, 1 client, 1 text/request (p50 {:.1} ms, p99 {:.1} ms)",
            percentile(&lat, 50),
            percentile(&lat, 99)
        ),
        single_rate,
        bound_of(1),
    );
    row(
        format!(
            "service, {} clients, 1 text/request ({cpu_single:.1} ms CPU/text)",
            args.concurrency
        ),
        concurrent_single,
        chunked,
    );
    row(
        format!(
            "service, {} clients, 16 texts/request ({cpu_16:.1} ms CPU/text)",
            args.concurrency
        ),
        concurrent_16,
        chunked,
    );
    Ok(())
}

/// The bound for scripts/bench.sh, as one JSON line.
fn bound_only(args: &Args, texts: &[String]) -> anyhow::Result<()> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let single = Embedder::load(
        &default_ort_library(),
        &args.model_dir,
        RuntimeOptions::for_queries(),
    )?;
    single.embed(&refs[..16.min(refs.len())])?;
    let mut latencies: Vec<f64> = refs
        .iter()
        .map(|t| {
            let started = Instant::now();
            single
                .embed(&[t])
                .map(|_| started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<_, _>>()?;
    latencies.sort_by(f64::total_cmp);
    drop(single);
    let bulk = Embedder::load(
        &default_ort_library(),
        &args.model_dir,
        RuntimeOptions::for_bulk(),
    )?;
    bulk.embed(&refs[..64.min(refs.len())])?;
    let started = Instant::now();
    bulk.embed(&refs)?;
    let best = rate(refs.len(), started.elapsed());
    println!(
        "{}",
        serde_json::json!({
            "texts": refs.len(),
            "single_query_p50_ms": percentile(&latencies, 50),
            "single_query_p99_ms": percentile(&latencies, 99),
            "best_texts_per_s": best,
            "best_layout": format!("{} sessions x 1 thread, all texts at once", cores()),
        })
    );
    Ok(())
}
