//! simq-shard: serves one shard of one index generation. Parses flags and wires the
//! parts of the simq-shard library together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use simq_runtime::service::{background_priority, init_logging, serve_ops, Shutdown};
use simq_shard::proto::shard_server::ShardServer;
use simq_shard::server::{runtime_workers, SearchLimits, SearchPool, ShardMetrics, ShardService};
use simq_shard::verify::{verify, Expected};

/// Serves nearest-neighbour search over one shard file of one index generation (dg).
///
/// The shard file is one LMDB file holding one arroy index per fine cluster and the id ->
/// text table, as written by `simq-indexer build`; a search covers only the clusters the
/// balancer asks for. Before serving, the instance checks that the file's
/// sha256 is the content address it was given, that the file is the expected shard,
/// built by the expected model with the expected dims, and that sampled stored items
/// find themselves. Verification runs at a lower CPU priority (nice 10) so that a rollout
/// does not starve the shards already serving on the same cores. Until then /health
/// answers 503; if a check fails the process exits with status 2 and the reason on stderr
/// (so a Nomad canary fails fast).
///
/// gRPC: simq.shard.v1.Shard/Search and /Info (shard/proto/shard.proto).
/// HTTP: GET /health and GET /metrics. Stops cleanly on SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The shard file. Its directory must be writable (LMDB's lock file goes beside it).
    #[arg(long)]
    file: PathBuf,
    /// Expected sha256 of the file (its content address in the manifest).
    #[arg(long)]
    sha256: String,
    /// The dg this shard belongs to; searches naming another dg are refused.
    #[arg(long)]
    dg: String,
    /// Expected shard number.
    #[arg(long)]
    shard: u32,
    /// Expected model id (from the manifest).
    #[arg(long)]
    model_id: String,
    /// Expected vector dims (from the manifest).
    #[arg(long)]
    dims: usize,
    /// Stored items the start-up self-test searches for.
    #[arg(long, default_value_t = 200)]
    self_test_samples: usize,
    /// Searches that run at once, each on a thread of the runtime (which has one thread
    /// more, for requests and /health while they run).
    #[arg(long, default_value_t = 2)]
    search_threads: usize,
    /// Searches that may wait for a thread; beyond them requests are refused at once
    /// (RESOURCE_EXHAUSTED) and the balancer asks another replica.
    #[arg(long, default_value_t = 64)]
    max_waiting_searches: usize,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7101")]
    grpc_listen: SocketAddr,
    /// HTTP listen address for /health and /metrics.
    #[arg(long, default_value = "127.0.0.1:7102")]
    http_listen: SocketAddr,
    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_secs: u64,
}

fn main() {
    init_logging();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers(args.search_threads))
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the runtime")),
    };
    if let Err(e) = result {
        tracing::error!(error = format!("{e:#}"), "shard stopped");
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = ShardMetrics::register(&registry)?;
    let shutdown = Shutdown::default();

    // /health answers from the start: 503 while verifying, 200 once serving, 503 again
    // when searches wait but none finishes (a stuck shard).
    let pool = Arc::new(SearchPool::new(
        args.search_threads,
        args.max_waiting_searches,
        metrics.waiting.clone(),
    ));
    let readiness = Arc::new(Mutex::new(
        serde_json::json!({"status": "verifying", "dg": args.dg, "shard": args.shard}),
    ));
    let (health_state, health_pool) = (readiness.clone(), pool.clone());
    let stall = Duration::from_secs(STALL_SECS);
    let health = Arc::new(move || {
        let mut report = health_state.lock().unwrap().clone();
        if report["status"] == "ok" && !health_pool.progressing(stall) {
            report["status"] = "stalled: searches wait but none finished recently".into();
        }
        report["waiting_searches"] = health_pool.waiting().into();
        (report["status"] == "ok", report)
    });
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding {}", args.http_listen))?;
    let ops = tokio::spawn(serve_ops(http, registry, health, shutdown.wait()));

    let expected = Expected {
        sha256: args.sha256.clone(),
        shard: args.shard,
        model_id: args.model_id.clone(),
        dims: args.dims,
        self_test_samples: args.self_test_samples,
    };
    let path = args.file.clone();
    let (done, verified) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || {
            // Checking a new file uses only CPU time that serving does not want: a rollout
            // starts every shard of the new dg at once, and eight files checked at nice 10
            // took the embedder's CPU under load (BENCHMARKS.md, rollout).
            background_priority();
            let _ = done.send(verify(&path, &expected));
        })?;
    let (file, test) = verified
        .await?
        .with_context(|| format!("shard {} of dg {} is not servable", args.shard, args.dg))?;
    let items = file.meta().items;
    tracing::info!(dg = %args.dg, shard = args.shard, items, self_test_found = test.found, self_test_tested = test.tested, "verified");

    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %args.http_listen, "listening");
    *readiness.lock().unwrap() = serde_json::json!({
        "status": "ok", "dg": args.dg, "shard": args.shard, "items": items,
        "sha256": args.sha256, "model_id": args.model_id,
        "self_test": {"tested": test.tested, "found": test.found},
    });
    let service = ShardService {
        file: Arc::new(file),
        dg: args.dg,
        sha256: args.sha256,
        limits: SearchLimits::default(),
        pool,
        metrics,
    };
    let grpc_server = tonic::transport::Server::builder()
        .add_service(ShardServer::new(service))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small gRPC replies wait on Nagle + delayed ACK (~40 ms).
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown.wait(),
        );
    let servers = async move {
        let grpc = grpc_server.await;
        let _ = ops.await;
        grpc
    };
    shutdown
        .run(servers, Duration::from_secs(args.shutdown_grace_secs))
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Seconds searches may wait without any finishing before /health answers 503.
const STALL_SECS: u64 = 10;
