//! simq-embedder: the sentence-embedding service. Parses flags and wires the parts of
//! the simq-embedder library together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use simq_embedder::batcher::{BatchMetrics, BatchOptions, Batcher};
use simq_embedder::proto::embedder_server::EmbedderServer;
use simq_embedder::runtime::{default_ort_library, Embedder, RuntimeOptions};
use simq_embedder::server::{EmbedService, RequestLimits};
use simq_runtime::service::{init_logging, lower_priority, serve_ops, Shutdown};

/// Turns texts into L2-normalised sentence embeddings over gRPC.
///
/// Loads a model directory (model.onnx, tokenizer.json, simq-model.json, as laid out by
/// scripts/setup.sh) into ONNX Runtime, micro-batches concurrent requests, and reports the
/// model id (a content hash of the model files), so balancers pair it only with index
/// generations built by the same model.
///
/// gRPC: simq.embedder.v1.Embedder/Embed and /Info (embedder/proto/embedder.proto).
/// HTTP: GET /health (JSON with the model id) and GET /metrics (Prometheus).
/// Stops cleanly on SIGTERM or SIGINT: in-flight requests finish first.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Model directory.
    #[arg(long, env = "SIMQ_MODEL_DIR")]
    model_dir: PathBuf,

    /// ONNX Runtime shared library [default: $ORT_DYLIB_PATH, else the set-up cache].
    #[arg(long)]
    ort_library: Option<PathBuf>,

    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7001")]
    grpc_listen: SocketAddr,

    /// HTTP listen address for /health and /metrics.
    #[arg(long, default_value = "127.0.0.1:7002")]
    http_listen: SocketAddr,

    /// ONNX sessions a batch is split over [default: one per core]. Single-threaded
    /// sessions, one per core, embed batches with the least CPU per text
    /// (embedder/BENCH.md).
    #[arg(long)]
    sessions: Option<usize>,

    /// Intra-op threads per session [default: 1].
    #[arg(long)]
    intra_threads: Option<usize>,

    /// Intra-op threads of one more session that runs requests too small to split over
    /// the sessions (a lone query), so that it still uses every core; 0 for none
    /// [default: one per core when there are several sessions].
    #[arg(long)]
    lone_threads: Option<usize>,

    /// Texts per inference call at most (texts of similar length are batched together).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,

    /// Texts the collector gathers into one batch at most.
    #[arg(long, default_value_t = 64)]
    max_batch_texts: usize,

    /// Milliseconds a batch waits for more requests although a session is free (while
    /// every session is busy, batches grow anyway).
    #[arg(long, default_value_t = 0)]
    max_wait_ms: u64,

    /// Texts queued or in flight at most; beyond it requests fail with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 512)]
    queue_limit: usize,

    /// Milliseconds a request may wait for its batch; later it fails with
    /// RESOURCE_EXHAUSTED without being computed.
    #[arg(long, default_value_t = 1000)]
    max_queue_wait_ms: u64,

    /// Seconds queued work may go without a finished batch before /health answers 503.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,

    /// Texts per request at most.
    #[arg(long, default_value_t = 256)]
    max_texts: usize,

    /// CPU priority (nice, 0-19) of the whole service. On machines shared with the
    /// balancer and shards, a positive value keeps their short work (answers, fast
    /// refusals) ahead of long inference batches under overload.
    #[arg(long, default_value_t = 0)]
    nice: i32,

    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_secs: u64,
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    // Before any thread starts, so that every runtime and ONNX thread inherits it.
    lower_priority(args.nice);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let defaults = RuntimeOptions::for_queries();
    let options = RuntimeOptions {
        sessions: args.sessions.unwrap_or(defaults.sessions),
        intra_threads: args.intra_threads.unwrap_or(defaults.intra_threads),
        max_batch: args.max_batch,
        lone_threads: args.lone_threads.unwrap_or(defaults.lone_threads),
    };
    let library = args.ort_library.unwrap_or_else(default_ort_library);
    let embedder =
        tokio::task::spawn_blocking(move || Embedder::load(&library, &args.model_dir, options))
            .await?
            .context("loading the model")?;
    let embedder = Arc::new(embedder);
    tracing::info!(
        model_id = embedder.model_id(),
        dims = embedder.dims(),
        ?options,
        "model loaded"
    );
    // The first inference of a session is slow (kernel set-up); pay it before serving.
    let warm = embedder.clone();
    tokio::task::spawn_blocking(move || warm.embed(&["warm up the model"]))
        .await?
        .context("a first inference")?;

    let registry = prometheus::Registry::new();
    let metrics = BatchMetrics::register(&registry)?;
    let batch = BatchOptions {
        max_batch_texts: args.max_batch_texts,
        max_wait: Duration::from_millis(args.max_wait_ms),
        queue_limit: args.queue_limit,
        max_queue_wait: Duration::from_millis(args.max_queue_wait_ms),
    };
    let batcher = Batcher::start(embedder.clone(), batch, metrics);
    let limits = RequestLimits {
        max_texts: args.max_texts,
        ..RequestLimits::default()
    };

    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding {}", args.http_listen))?;
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("binding {}", args.grpc_listen))?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "listening");

    let shutdown = Shutdown::default();
    let health_embedder = embedder.clone();
    let health_batcher = batcher.clone();
    let stall = Duration::from_secs(args.stall_secs);
    let health = Arc::new(move || {
        // Busy is healthy; queued work that does not move is not.
        let ok = health_batcher.progressing(stall);
        let report = serde_json::json!({
            "status": if ok { "ok" } else { "stalled: queued texts but no batch finished recently" },
            "model_id": health_embedder.model_id(),
            "dims": health_embedder.dims(),
            "queued_texts": health_batcher.queued(),
        });
        (ok, report)
    });
    let ops = serve_ops(http, registry, health, shutdown.wait());
    let grpc_server = tonic::transport::Server::builder()
        .add_service(EmbedderServer::new(EmbedService::new(batcher, limits)))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small gRPC replies wait on Nagle + delayed ACK (~40 ms).
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown.wait(),
        );
    let servers = async move {
        let (grpc, ()) = tokio::join!(grpc_server, ops);
        grpc
    };
    shutdown
        .run(servers, Duration::from_secs(args.shutdown_grace_secs))
        .await?;
    tracing::info!("stopped");
    Ok(())
}
