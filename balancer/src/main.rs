//! simq-balancer: the public entry of simq. Parses flags and wires the parts of the
//! balancer library into a Pingora server.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use simq_balancer::app::BalancerApp;
use simq_balancer::auth::Auth;
use simq_balancer::metrics::Metrics;
use simq_balancer::query::{AnswerCache, EmbedderOrder, Executor, QueryOptions};
use simq_balancer::state::SharedState;
use simq_balancer::watch::Watcher;
use simq_consul::ConsulClient;
use simq_contract::KvLayout;

/// The public HTTP entry of simq.
///
/// POST /v1/query {"query": "...", "k": 5} (k optional; also POST /query) answers
/// {"query", "similar", "score", "results": [{"text", "score", "shard"}], "dg", "took_ms",
/// "degraded"}. GET /health, GET /metrics (Prometheus), GET /v1/status.
///
/// Follows the active index generation (Consul KV <prefix>active), its manifest
/// (<prefix>dg/<dg>/manifest) and the passing instances of simq-embedder (tag
/// model=<model id>) and simq-shard (tags dg=<dg>, shard=<n>) with blocking queries.
/// Each query embeds with an embedder of the dg's model, probes the nprobe fine clusters
/// whose centroids (<prefix>dg/<dg>/centroids/*) are nearest, asking each shard only for
/// the clusters it holds (another replica on failure, within a retry budget; the
/// next-nearest clusters when a shard has no healthy replica, marked "degraded"), and
/// merges the top k. Every upstream call carries the query's remaining deadline
/// (grpc-timeout). Beyond --max-inflight cache-miss queries at once, a query waits in line
/// while the wait it can expect (the line ahead at the measured time per query) fits its
/// deadline (--deadline-ms, or a shorter X-Request-Timeout header in milliseconds); one
/// that cannot be answered in time gets 503 with Retry-After at once. Cache hits are never
/// refused. A replica failing 3 calls in a row is skipped for 10 s. If
/// Consul becomes unreachable it keeps serving from the last state it read.
///
/// Stops on SIGTERM (graceful: the listeners close at once, in-flight requests get
/// --shutdown-grace-secs to finish, answers on kept-alive connections say
/// "Connection: close") or SIGINT (fast: in-flight requests are cut).
///
/// Several balancers can share one public port (--reuse-port, SO_REUSEPORT: the kernel
/// spreads new connections over them, and one that stops leaves the others serving);
/// each then answers its own /health, /metrics and /v1/status on --admin-listen too, so
/// Consul checks every instance, not whichever one the kernel picks.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Share --listen with other balancers (SO_REUSEPORT).
    #[arg(long)]
    reuse_port: bool,
    /// A second address of this instance alone (same routes), for health checks and
    /// scraping when --listen is shared.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Pingora's socket for handing listeners to a new process (graceful upgrade); keep it
    /// in the cluster's own directory [default: pingora-upgrade.sock in the working
    /// directory].
    #[arg(long, default_value = "pingora-upgrade.sock")]
    upgrade_sock: String,
    /// Consul HTTP address.
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    consul: String,
    /// Consul KV prefix of simq's keys.
    #[arg(long, default_value = "simq/")]
    kv_prefix: String,
    /// Fine clusters probed per query. With the default 4096 clusters over the 158k-query
    /// corpus, 576 read about 15 % of it for recall@10 0.982 against exact search (192: 5 %,
    /// 0.950; indexer/BENCH.md).
    #[arg(long, default_value_t = simq_contract::defaults::NPROBE)]
    nprobe: usize,
    /// Cache-miss queries answered at once at most; more wait in line while their expected
    /// wait fits their deadline, the rest get 503 + Retry-After at once.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// How embedders share the calls: spread (round robin), stable (the first healthy
    /// embedder by Consul id gets every call, the others stand by; for embedders that
    /// share one host's cores) or local (embedders on this balancer's own address, the
    /// host of --listen, first, round robin, then the others; for a cluster of nodes).
    #[arg(long, value_enum, default_value = "spread")]
    embedder_order: EmbedderOrder,
    /// Whole-request deadline in milliseconds.
    #[arg(long, default_value_t = 2000)]
    deadline_ms: u64,
    /// Timeout of one shard attempt in milliseconds (a retry goes to another replica).
    #[arg(long, default_value_t = 500)]
    attempt_timeout_ms: u64,
    /// Timeout of one embedder call in milliseconds: under load a call waits for its
    /// batch, so it gets more than a shard attempt.
    #[arg(long, default_value_t = 1500)]
    embed_timeout_ms: u64,
    /// Queries the admission refuses (the model's line is past their deadline) that the
    /// light contour (BM25 on the shards, no model) may answer at once, marked
    /// "contour": "lexical" and degraded. A refused query waits up to 20 ms for one of
    /// these places (one that waited in line: the rest of its deadline but 300 ms), then
    /// gets 503. 0 turns it off.
    /// Queries no embedder can answer always get the light contour.
    #[arg(long, default_value_t = 4)]
    lexical_slots: usize,
    /// Answers kept in the cache (0 turns it off).
    #[arg(long, default_value_t = 10_000)]
    cache_entries: usize,
    /// Seconds a Consul blocking query may wait.
    #[arg(long, default_value_t = 30)]
    consul_wait_secs: u64,
    /// Worker threads of the HTTP server.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// API keys: off (every endpoint open; the quick local set-up) or required (queries
    /// need a key made by `simq-indexer keys create`, read from Consul KV <prefix>keys/;
    /// /metrics and /v1/status on --listen need an admin key, on --admin-listen they stay
    /// open; /health is always open).
    #[arg(long, value_enum, env = "SIMQ_API_KEYS", default_value = "off")]
    api_keys: simq_balancer::auth::Mode,
    /// Seconds in-flight requests get to finish after SIGTERM (longer than
    /// --deadline-ms, so every query admitted before the signal is answered).
    #[arg(long, default_value_t = 5)]
    shutdown_grace_secs: u64,
}

struct WatchService(Watcher);

#[async_trait]
impl BackgroundService for WatchService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.0
            .clone()
            .run(async move {
                let _ = shutdown.changed().await;
            })
            .await;
    }
}

fn main() -> anyhow::Result<()> {
    simq_runtime::service::init_logging();
    let args = Args::parse();
    let metrics = Metrics::new()?;
    let state = Arc::new(SharedState::default());
    let auth = Arc::new(Auth::new(args.api_keys));
    let admin_port = match &args.admin_listen {
        Some(a) => Some(
            a.parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--admin-listen {a:?} is not an address like 127.0.0.1:9101: {e}"
                    )
                })?
                .port(),
        ),
        None => None,
    };
    let watcher = Watcher {
        consul: ConsulClient::new(&args.consul)?.with_env_token()?,
        layout: KvLayout::new(&args.kv_prefix),
        state: state.clone(),
        metrics: metrics.clone(),
        wait: Duration::from_secs(args.consul_wait_secs),
        auth: auth.clone(),
    };
    let options = QueryOptions {
        nprobe: args.nprobe,
        max_inflight: args.max_inflight,
        embedder_order: args.embedder_order,
        local_host: args
            .listen
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip()),
        lexical_slots: args.lexical_slots,
        deadline: Duration::from_millis(args.deadline_ms),
        attempt_timeout: Duration::from_millis(args.attempt_timeout_ms),
        embed_timeout: Duration::from_millis(args.embed_timeout_ms),
    };
    let executor = Arc::new(Executor::new(
        options,
        metrics,
        AnswerCache::new(args.cache_entries),
    ));

    let conf = ServerConf {
        threads: args.threads,
        upgrade_sock: args.upgrade_sock.clone(),
        // On SIGTERM Pingora stops accepting at once, then keeps its runtimes (and the
        // queries they run) going for the grace period, then drops what is left.
        grace_period_seconds: Some(args.shutdown_grace_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut http = pingora::services::listening::Service::new(
        "simq balancer".to_string(),
        BalancerApp {
            state,
            executor,
            auth,
            admin_port,
        },
    );
    if args.reuse_port {
        let mut shared = pingora::listeners::TcpSocketOptions::default();
        shared.so_reuseport = Some(true);
        http.add_tcp_with_settings(&args.listen, shared);
    } else {
        http.add_tcp(&args.listen);
    }
    if let Some(admin) = &args.admin_listen {
        http.add_tcp(admin);
    }
    server.add_service(http);
    server.add_service(background_service("consul watch", WatchService(watcher)));
    tracing::info!(listen = %args.listen, reuse_port = args.reuse_port, admin = ?args.admin_listen, consul = %simq_runtime::redact::redact(&args.consul), api_keys = ?args.api_keys, "balancer starting");
    server.run_forever();
}
