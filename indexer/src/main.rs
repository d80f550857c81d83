//! simq-indexer: builds, evaluates, publishes and rolls out index generations. Parses
//! flags and wires the parts of the indexer (see lib.rs).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use simq_embedder::runtime::{cores, default_ort_library, Embedder, RuntimeOptions};
use simq_indexer::build::{build, find_existing, BuildOptions};
use simq_indexer::corpus::{self, Format};
use simq_indexer::eval::{recall, DgDir};

/// Builds index generations ("dg") of a query corpus and rolls them out.
///
/// A dg is a directory named by its content address: one LMDB file per shard (one arroy
/// index per fine cluster plus the id -> text table), centroids.f32 (the fine clusters'
/// centroids) and manifest.json (model id, dims, the shard of each cluster, the
/// centroids' sha256, and each shard's sha256, size and item count). Building the same corpus with the same
/// model and options gives byte-identical files and the same dg id.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a dg from a corpus file: validate and de-duplicate texts, embed them, split
    /// them into shards by k-means and each shard into fine clusters, index each cluster,
    /// write the centroids and the manifest.
    ///
    /// Corpus formats: one text per line (any extension), TSV with a header row (.tsv,
    /// text column named by --column), JSON lines (.jsonl, text field named by --column).
    /// Bad lines (invalid UTF-8, control characters, empty, over 1000 characters, bad
    /// JSON, short TSV rows) are listed as FILE:LINE: REASON and stop the build unless
    /// --skip-bad-lines is given. Prints the dg id and the output directory.
    Build(BuildArgs),
    /// Measure recall@k of the sharded path against exact search for several nprobe
    /// (fine clusters probed per query), with the share of the corpus scanned and the
    /// per-query latency.
    Eval(EvalArgs),
    /// Compare the light contour (BM25 over the texts) with the model on perturbed
    /// duplicates of stored questions (typo, dropped word, swapped words, lower case):
    /// top-1 and top-5, and the time (one thread: also the CPU) per query of each.
    Contours(ContoursArgs),
    /// Write a built dg's items in id order (vectors.f32 and texts.txt) for other tools,
    /// e.g. the benchmark's peer service and its exact search.
    Export(ExportArgs),
    /// Publish a built dg: shard files into the blob store (named by sha256), the manifest
    /// into Consul KV (<prefix>dg/<dg>/manifest). Idempotent: says "unchanged" the second time.
    Publish(PublishArgs),
    /// Roll a published dg out through Nomad: a full canary set beside the running dg,
    /// health-gated (artifact checksum, shard self-test), then one CAS flip of the active
    /// dg, then promotion (old shards stop). A failed canary makes Nomad revert; the active
    /// dg stays and this exits non-zero naming the shard and the cause. The new dg may have
    /// more or fewer shards than the running one: the old dg's extra shards keep serving
    /// until after the flip.
    Rollout(RolloutArgs),
    /// Flip the active dg back to the previous one (one CAS write), rolling its shards out
    /// again first if they no longer run.
    Rollback(RolloutArgs),
    /// Flip the active dg to a published dg whose shards already run (one CAS write).
    Flip(FlipArgs),
    /// Stop a candidate that runs beside the active dg without having been flipped (e.g.
    /// after `rollout --candidate-only`): clear the traffic split, fail its deployment so
    /// Nomad reverts the shards job, wait until its canaries are gone.
    Abort(ClusterArgs),
    /// The two arms of the traffic split side by side over a window, from Prometheus:
    /// answers, degraded, errors, latency p50/p99, mean top score, and on shadowed queries
    /// the overlap@k of the results and how often the top answers agree; then a verdict
    /// against the thresholds (exit 0 pass, 1 fail, naming each failed check).
    Compare(CompareArgs),
    /// Show the active and previous dg, the running shards job and shard health.
    Status(ClusterArgs),
    /// Serve the blob store over HTTP (GET /<sha256>) for Nomad's artifact fetch.
    ServeBlobs(ServeBlobsArgs),
    /// Put files into the blob store under their sha256 and print each sha256 (one per
    /// line): the binaries, ONNX Runtime and model files the jobs fetch as artifacts.
    PutBlob(PutBlobArgs),
    /// Print the model id of a model directory.
    ModelId(ModelArgs),
    /// API keys for balancers run with --api-keys required: create (prints the key once;
    /// Consul keeps only its SHA-256), list (ids, labels, rates; never keys), revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Traffic split: send a share of users to a candidate dg whose shards run beside the
    /// active one (e.g. the canaries of `rollout --candidate-only`), sticky per user (the
    /// X-User-Id header, else the API key, else the query text), and shadow a share of the
    /// active dg's queries to the candidate to compare them. Balancers give a candidate
    /// traffic only while all its shards are healthy. Every change is a check-and-set.
    #[command(subcommand)]
    Traffic(TrafficCommand),
}

#[derive(Subcommand, Debug)]
enum TrafficCommand {
    /// Set (or change) the split; prints it.
    Set(TrafficSetArgs),
    /// Show the split and what each balancer does with it.
    Show(KeysListArgs),
    /// Remove the split: every query goes to the active dg again.
    Clear(KeysListArgs),
}

#[derive(Args, Debug)]
struct TrafficSetArgs {
    /// The candidate dg (published, not the active one).
    candidate: String,
    /// Share of users (0 to 1) answered by the candidate.
    #[arg(long, default_value_t = 0.0)]
    weight: f64,
    /// Share (0 to 1) of the active dg's queries also sent to the candidate to compare,
    /// without changing the answer.
    #[arg(long, default_value_t = 0.0)]
    shadow: f64,
    /// Experiment salt mixed into every user's hash; a new salt reassigns users
    /// independently [default: the current split's salt for the same candidate, else a
    /// new one].
    #[arg(long)]
    salt: Option<String>,
    #[command(flatten)]
    consul: ConsulArgs,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a new key and print it once on stdout (store it now: it cannot be shown again).
    Create(KeysCreateArgs),
    /// List the keys: id, label, rate, burst, admin, creation time.
    List(KeysListArgs),
    /// Revoke a key by id: balancers refuse it within a Consul round trip.
    Revoke(KeysRevokeArgs),
}

#[derive(Args, Debug)]
struct KeysCreateArgs {
    /// Who or what the key is for (shown by keys list).
    #[arg(long)]
    label: String,
    /// Sustained queries per second (per balancer instance).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Queries at once above the rate.
    #[arg(long, default_value_t = 40)]
    burst: u32,
    /// May also read /metrics and /v1/status on the balancer's public port.
    #[arg(long)]
    admin: bool,
    #[command(flatten)]
    consul: ConsulArgs,
}

#[derive(Args, Debug)]
struct KeysListArgs {
    #[command(flatten)]
    consul: ConsulArgs,
}

#[derive(Args, Debug)]
struct KeysRevokeArgs {
    /// The key's id (8 hex digits, as keys list shows it).
    id: String,
    #[command(flatten)]
    consul: ConsulArgs,
}

#[derive(Args, Debug)]
struct ConsulArgs {
    /// Consul HTTP address (its ACL token: CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE).
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    consul: String,
    /// Consul KV prefix of simq's keys.
    #[arg(long, default_value = "simq/")]
    kv_prefix: String,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    #[command(flatten)]
    consul: ConsulArgs,
    /// Nomad HTTP address (its ACL token: NOMAD_TOKEN or NOMAD_TOKEN_FILE; the namespace
    /// of simq's jobs: NOMAD_NAMESPACE, default Nomad's "default").
    #[arg(long, env = "NOMAD_ADDR", default_value = "http://127.0.0.1:4646")]
    nomad: String,
}

#[derive(Args, Debug)]
struct PublishArgs {
    /// A built dg directory.
    dg_dir: PathBuf,
    #[command(flatten)]
    blobs: BlobArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Where blobs go.
#[derive(Args, Debug)]
struct BlobArgs {
    /// The blob store: a directory (served by `serve-blobs`), or s3://BUCKET of an
    /// S3-compatible store (at --s3-endpoint; signed with AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY when set, else unsigned).
    #[arg(long, env = "SIMQ_BLOBS")]
    blobs: String,
    /// S3 endpoints of the bucket, comma-separated (http://host:port), tried in order: the
    /// gateways of one replicated store.
    #[arg(long, env = "SIMQ_S3_ENDPOINTS", value_delimiter = ',')]
    s3_endpoint: Vec<String>,
}

impl BlobArgs {
    fn open(&self) -> anyhow::Result<simq_indexer::blobs::BlobStore> {
        simq_indexer::blobs::BlobStore::open(&self.blobs, &self.s3_endpoint)
    }
}

#[derive(Args, Debug)]
struct PutBlobArgs {
    /// Files to store.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    blobs: BlobArgs,
}

#[derive(Args, Debug)]
struct RolloutArgs {
    /// The dg to roll out (rollback: ignored, the previous dg is used).
    #[arg(default_value = "")]
    dg: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Replicas per shard [default: as many as the running shards job has, else 1].
    #[arg(long)]
    replicas: Option<usize>,
    /// Base URL of the blob store.
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    blob_url: String,
    /// Directory of the dg's model, when no embedder of that model runs or ran here (a
    /// model rollout): its embedders start beside the running ones before any shard
    /// moves, and the old model's stop after the flip.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Absolute path of the simq-shard binary the job runs [default: beside this binary].
    /// Used where --shard-bin-sha256 is not given: a host path, so a single node only.
    #[arg(long)]
    shard_bin: Option<PathBuf>,
    /// sha256 of the simq-shard binary in the blob store: every node fetches it from
    /// --blob-url and verifies it, instead of running --shard-bin (needed on several nodes).
    #[arg(long, value_name = "SHA256")]
    shard_bin_sha256: Option<String>,
    /// Nomad task driver of the shards: raw_exec, or exec (isolated; needs
    /// --shard-bin-sha256, since a host path is not inside its chroot).
    #[arg(long, default_value = "raw_exec", value_parser = ["raw_exec", "exec"])]
    driver: String,
    /// Keep each shard's replicas on distinct nodes; new dgs then roll out as new Nomad
    /// groups beside the old (no canaries) [default: as the running shards job does, else
    /// false].
    #[arg(long, value_name = "BOOL")]
    replicas_apart: Option<bool>,
    /// Seconds a new shard instance may take to pass its checks.
    #[arg(long, default_value_t = 30)]
    healthy_deadline_secs: u64,
    /// Seconds without progress before the deployment fails and Nomad reverts.
    #[arg(long, default_value_t = 35)]
    progress_deadline_secs: u64,
    /// Seconds to follow the deployment at most.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Stop before the flip, once the dg's canaries are all healthy beside the active dg:
    /// a candidate for `traffic set`. Run `rollout` again to flip, or `abort` to stop it.
    #[arg(long, conflicts_with = "progressive")]
    candidate_only: bool,
    /// Progressive rollout: start the canaries, shadow --shadow of the queries to them,
    /// then give them these shares of users one step at a time (comma-separated), judging
    /// each step with `compare` (needs --prometheus); flip when every step passes, stop
    /// the candidate (and say why) when one fails.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    progressive: Option<Vec<f64>>,
    /// Seconds each progressive step runs before it is judged.
    #[arg(long, default_value_t = 30)]
    step_secs: u64,
    /// Share of the active dg's queries shadowed to the candidate during a progressive
    /// rollout.
    #[arg(long, default_value_t = 0.5)]
    shadow: f64,
    #[command(flatten)]
    judge: JudgeArgs,
}

/// Where the comparison of the arms comes from and what it must meet.
#[derive(Args, Debug, Clone)]
struct JudgeArgs {
    /// Prometheus that scrapes the balancers (scripts/prometheus.sh runs one).
    #[arg(long, env = "SIMQ_PROMETHEUS", default_value = "http://127.0.0.1:9090")]
    prometheus: String,
    /// Candidate answers plus shadow pairs needed before anything is judged.
    #[arg(long, default_value_t = 20.0)]
    min_samples: f64,
    /// The candidate's p99 latency at most this times the active dg's.
    #[arg(long, default_value_t = 2.0)]
    max_p99_ratio: f64,
    /// Share of the candidate's queries that failed, at most.
    #[arg(long, default_value_t = 0.01)]
    max_error_share: f64,
    /// Share of the candidate's answers that were degraded, at most.
    #[arg(long, default_value_t = 0.05)]
    max_degraded_share: f64,
    /// Mean overlap@k of the two arms' results on shadowed queries, at least.
    #[arg(long, default_value_t = 0.6)]
    min_overlap: f64,
    /// Share of shadowed queries whose top answers agree, at least.
    #[arg(long, default_value_t = 0.7)]
    min_top1: f64,
    /// How much lower the candidate's mean top score may be.
    #[arg(long, default_value_t = 0.05)]
    max_score_drop: f64,
}

impl JudgeArgs {
    fn thresholds(&self) -> simq_indexer::compare::Thresholds {
        simq_indexer::compare::Thresholds {
            min_samples: self.min_samples,
            max_p99_ratio: self.max_p99_ratio,
            max_error_share: self.max_error_share,
            max_degraded_share: self.max_degraded_share,
            min_overlap: self.min_overlap,
            min_top1: self.min_top1,
            max_score_drop: self.max_score_drop,
        }
    }
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// The window to compare, in seconds, ending now.
    #[arg(long, default_value_t = 300)]
    window_secs: u64,
    #[command(flatten)]
    judge: JudgeArgs,
}

#[derive(Args, Debug)]
struct FlipArgs {
    /// The dg to make active.
    dg: String,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args, Debug)]
struct ServeBlobsArgs {
    /// Blob store directory.
    #[arg(long)]
    dir: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Model directory (as laid out by scripts/setup.sh).
    #[arg(long, env = "SIMQ_MODEL_DIR")]
    model_dir: PathBuf,
    /// ONNX Runtime shared library [default: $ORT_DYLIB_PATH, else the set-up cache].
    #[arg(long)]
    ort_library: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Corpus file.
    corpus: PathBuf,
    /// Directory that receives <dg>/ (created if missing).
    #[arg(long, short, default_value = "dgs")]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// TSV column or JSON-lines field holding the text.
    #[arg(long, default_value = "text")]
    column: String,
    /// Build from the good lines even when some lines are bad (they are still listed).
    #[arg(long)]
    skip_bad_lines: bool,
    /// Number of shards (k of k-means). Each query calls the shards holding its nearest
    /// clusters, so fewer shards mean fewer calls: on 2 cores, 2 shards answered unloaded
    /// queries in p50 6.9-7.1 ms against 7.0-7.9 (4 shards) and 9.1-9.5 ms (8), and 200
    /// against 160-192 and 129-169 queries/s (indexer/BENCH.md). Use more on more cores.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Fine clusters over the whole corpus (spread over the shards by size, at least 16
    /// items each). A query probes the nearest --nprobe of the balancer; 4096 clusters of
    /// about 36 questions gave the best recall per item scanned (indexer/BENCH.md).
    #[arg(long, default_value_t = 4096)]
    clusters: usize,
    /// Seed of k-means++ and of the arroy build.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Lloyd iterations at most.
    #[arg(long, default_value_t = 25)]
    kmeans_iterations: usize,
    /// Shards indexed at once [default: one per core].
    #[arg(long)]
    parallel_shards: Option<usize>,
    /// Build even when the output directory already holds a dg of the same corpus, model
    /// and options (by default that dg is reused: a rebuild gives the same bytes).
    #[arg(long)]
    force: bool,
    /// Only look: print the directory of a dg already built from the same corpus, model
    /// and options and exit 0, or exit 3 (building nothing) when there is none.
    /// `scripts/up.sh` asks this to decide whether to serve a small slice first.
    #[arg(long, conflicts_with = "force")]
    only_if_built: bool,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// A built dg directory.
    dg_dir: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ContoursArgs {
    /// A built dg directory (the one `build` printed).
    dg_dir: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Stored questions perturbed per kind of perturbation.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Fine clusters the model path probes (as the balancer's --nprobe).
    #[arg(long, default_value_t = 576)]
    nprobe: usize,
    /// Seed of the perturbations.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// A built dg directory (the one `build` printed).
    dg_dir: PathBuf,
    /// Queries drawn from the indexed items.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// nprobe values to try (fine clusters probed per query, comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 16, 24, 32, 48, 64])]
    nprobe: Vec<usize>,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    // Like other CLI tools, end quietly when the reader of stdout goes away (`| head`)
    // instead of panicking on a failed print.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    simq_consul::service::init_logging();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Build(args) => run_build(args),
        Command::Eval(args) => run_eval(args),
        Command::Contours(args) => run_contours(args),
        Command::Export(args) => {
            let n = simq_indexer::eval::export(&DgDir::open(&args.dg_dir)?, &args.out)?;
            eprintln!("{n} items written to {}", args.out.display());
            Ok(())
        }
        Command::ModelId(args) => {
            println!(
                "{}",
                simq_embedder::model::ModelDir::open(&args.model_dir)?.model_id
            );
            Ok(())
        }
        Command::Publish(args) => rt()?.block_on(cluster::publish(args)),
        Command::Rollout(args) => rt()?.block_on(cluster::rollout(args, false)),
        Command::Rollback(args) => rt()?.block_on(cluster::rollout(args, true)),
        Command::Flip(args) => rt()?.block_on(cluster::flip(args)),
        Command::Abort(args) => rt()?.block_on(cluster::abort(args)),
        Command::Compare(args) => rt()?.block_on(cluster::compare(args)),
        Command::Status(args) => rt()?.block_on(cluster::status(args)),
        Command::Keys(cmd) => rt()?.block_on(cluster::keys(cmd)),
        Command::Traffic(cmd) => rt()?.block_on(cluster::traffic(cmd)),
        Command::PutBlob(args) => rt()?.block_on(async {
            let store = args.blobs.open()?;
            for file in &args.files {
                let sha = simq_consul::contract::sha256_file(file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                store.put(file, &sha).await?;
                println!("{sha}");
            }
            Ok(())
        }),
        Command::ServeBlobs(args) => {
            // Handing out shard files is background work: serving queries comes first.
            simq_consul::service::lower_priority(10);
            rt()?.block_on(cluster::serve_blobs(args))
        }
    }
}

/// The subcommands that talk to the cluster.
mod cluster {
    use std::time::Duration;

    use anyhow::Context;
    use simq_consul::{ConsulClient, KvLayout};
    use simq_indexer::blobs::serve;
    use simq_indexer::flip::{self, Flipped};
    use simq_indexer::lock::{read_holder, RolloutLock};
    use simq_indexer::models;
    use simq_indexer::publish::publish as publish_dg;
    use simq_indexer::rollout::{
        rollout as roll, running_dg, RolloutOptions, RolloutOutcome, SHARDS_JOB_ID,
    };
    use simq_nomad::NomadClient;

    use super::{
        ClusterArgs, CompareArgs, ConsulArgs, FlipArgs, KeysCommand, PublishArgs, RolloutArgs,
        ServeBlobsArgs, TrafficCommand,
    };

    /// The Consul client (with the token from the environment) and the KV layout.
    fn consul_of(c: &ConsulArgs) -> anyhow::Result<(ConsulClient, KvLayout)> {
        Ok((
            ConsulClient::new(&c.consul)?
                .with_env_token()
                .map_err(anyhow::Error::msg)?,
            KvLayout::new(&c.kv_prefix),
        ))
    }

    fn clients(c: &ClusterArgs) -> anyhow::Result<(ConsulClient, NomadClient, KvLayout)> {
        let (consul, layout) = consul_of(&c.consul)?;
        let nomad = NomadClient::new(&c.nomad)?
            .with_env_token()
            .map_err(anyhow::Error::msg)?
            .with_env_namespace();
        Ok((consul, nomad, layout))
    }

    pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
        let (consul, _, layout) = clients(&args.cluster)?;
        let r = publish_dg(&args.dg_dir, &args.blobs.open()?, &consul, &layout).await?;
        if r.unchanged() {
            eprintln!(
                "dg {} already published: {} blobs present, manifest unchanged; nothing to do",
                r.dg, r.blobs_present
            );
        } else {
            eprintln!(
                "dg {} published: {} blobs added, {} repaired, {} already present; manifest {}",
                r.dg,
                r.blobs_added,
                r.blobs_repaired,
                r.blobs_present,
                if r.manifest_written {
                    "written"
                } else {
                    "unchanged"
                }
            );
        }
        println!("{}", r.dg);
        Ok(())
    }

    /// Run `work` holding the rollout lock (one rollout, rollback or flip at a time).
    /// SIGINT (Ctrl-C) or SIGTERM stops the work at its next await and releases the lock;
    /// running the command again (or `rollback`) converges from wherever it stopped.
    async fn locked<T>(
        consul: &ConsulClient,
        layout: &KvLayout,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let lock = RolloutLock::acquire(consul, layout, &command).await?;
        let outcome = tokio::select! {
            r = work => r,
            _ = simq_consul::service::shutdown_signal() => Err(anyhow::anyhow!(
                "interrupted: the rollout lock is released; run the command again (or rollback) to converge"
            )),
        };
        lock.release().await;
        outcome
    }

    pub async fn rollout(args: RolloutArgs, back: bool) -> anyhow::Result<()> {
        let (consul, nomad, layout) = clients(&args.cluster)?;
        locked(
            &consul,
            &layout,
            rollout_locked(&consul, &nomad, &layout, args, back),
        )
        .await
    }

    async fn rollout_locked(
        consul: &ConsulClient,
        nomad: &NomadClient,
        layout: &KvLayout,
        args: RolloutArgs,
        back: bool,
    ) -> anyhow::Result<()> {
        let (consul, nomad, layout) = (consul.clone(), nomad.clone(), layout.clone());
        let dg = if back {
            let observed = flip::observe(&consul, &layout).await?;
            let active = observed
                .active
                .clone()
                .context("no dg is active: nothing to roll back")?;
            let previous = active
                .previous
                .context("the active dg has no previous dg to roll back to")?;
            if running_dg(&nomad).await?.as_deref() != Some(previous.as_str()) {
                eprintln!(
                    "rolling back to {previous}: its shards no longer run, rolling them out again"
                );
            } else {
                let progress = |line: &str| eprintln!("{line}");
                let model_dir = args.model_dir.as_deref();
                models::ensure_for_dg(&nomad, &consul, &layout, &previous, model_dir, &progress)
                    .await?;
                match flip::flip_from(&consul, &layout, &observed, &previous).await? {
                    Flipped::Now(a) | Flipped::AlreadyActive(a) => {
                        eprintln!("active dg is {a}")
                    }
                }
                models::retire_unused(&nomad, &consul, &layout, None, &progress).await?;
                println!("{previous}");
                return Ok(());
            }
            previous
        } else {
            anyhow::ensure!(!args.dg.is_empty(), "name the dg to roll out");
            args.dg.clone()
        };
        let shard_bin = match args.shard_bin {
            Some(p) => p,
            None => std::env::current_exe()?.with_file_name("simq-shard"),
        };
        let replicas = match args.replicas {
            Some(r) => r,
            None => simq_indexer::rollout::running_replicas(&nomad)
                .await?
                .unwrap_or(1),
        };
        let shard_bin_sha256 = args.shard_bin_sha256.clone().unwrap_or_default();
        anyhow::ensure!(
            shard_bin_sha256.is_empty()
                || (shard_bin_sha256.len() == 64
                    && shard_bin_sha256.bytes().all(|b| b.is_ascii_hexdigit())),
            "--shard-bin-sha256 {shard_bin_sha256:?} is not a sha256 (64 hex digits)"
        );
        anyhow::ensure!(
            args.driver != "exec" || !shard_bin_sha256.is_empty(),
            "--driver exec needs --shard-bin-sha256: the host path of --shard-bin is not inside the exec driver's chroot"
        );
        let replicas_apart = match args.replicas_apart {
            Some(apart) => apart,
            None => simq_indexer::rollout::running_apart(&nomad)
                .await?
                .unwrap_or(false),
        };
        let opts = RolloutOptions {
            replicas,
            blob_url: args.blob_url.clone(),
            shard_bin: shard_bin.to_string_lossy().into_owned(),
            shard_bin_sha256,
            driver: args.driver.clone(),
            replicas_apart,
            healthy_deadline: Duration::from_secs(args.healthy_deadline_secs),
            progress_deadline: Duration::from_secs(args.progress_deadline_secs),
            timeout: Duration::from_secs(args.timeout_secs),
            candidate_only: args.candidate_only && !back,
        };
        let progress = |line: &str| eprintln!("{line}");
        // A candidate already beside the active dg (`--candidate-only`) keeps its model's
        // embedders if this rollout fails before replacing it.
        let candidate_before = simq_indexer::rollout::running_dg(&nomad).await?;
        let outcome: anyhow::Result<RolloutOutcome> = async {
            // Embedders of the dg's model first (a model rollout starts them beside the old).
            let model_dir = args.model_dir.as_deref();
            models::ensure_for_dg(&nomad, &consul, &layout, &dg, model_dir, &progress).await?;
            match &args.progressive {
                Some(weights) if !back => {
                    let plan = simq_indexer::progressive::Plan {
                        weights: weights.clone(),
                        shadow: args.shadow,
                        step: Duration::from_secs(args.step_secs),
                        prometheus: args.judge.prometheus.clone(),
                        thresholds: args.judge.thresholds(),
                    };
                    simq_indexer::progressive::run(
                        &nomad, &consul, &layout, &dg, &opts, &plan, progress,
                    )
                    .await
                }
                _ => roll(&nomad, &consul, &layout, &dg, &opts, progress).await,
            }
        }
        .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(failed) => {
                // The active dg is unchanged: embedders started above for the dg's model
                // (also ones that never came to pass) stop again; those of the active dg,
                // of a split's candidate and of a candidate still running stay.
                let running_now = simq_indexer::rollout::running_dg(&nomad)
                    .await
                    .ok()
                    .flatten();
                let survivor = models::surviving_candidate(
                    candidate_before.as_deref(),
                    running_now.as_deref(),
                );
                if let Err(e) =
                    models::retire_unused(&nomad, &consul, &layout, survivor, &progress).await
                {
                    eprintln!(
                        "after the failed rollout, stopping unused embedders failed too: {e:#}"
                    );
                }
                return Err(failed);
            }
        };
        let (flipped, seconds_to_flip) = match outcome {
            RolloutOutcome::Done {
                flipped,
                seconds_to_flip,
            } => (flipped, seconds_to_flip),
            RolloutOutcome::CandidateReady { seconds } => {
                eprintln!(
                        "candidate {dg} runs beside the active dg ({seconds:.1} s); next: `simq-indexer traffic set {dg} --weight W`, then `rollout {dg}` to flip or `abort` to stop it"
                    );
                println!("{dg}");
                return Ok(());
            }
        };
        models::retire_unused(&nomad, &consul, &layout, None, &progress).await?;
        match flipped {
            Flipped::Now(a) => {
                eprintln!("done: active dg is {a}, {seconds_to_flip:.1} s from rollout to flip")
            }
            Flipped::AlreadyActive(a) => eprintln!("done: {} was already active", a.dg),
        }
        println!("{dg}");
        Ok(())
    }

    pub async fn flip(args: FlipArgs) -> anyhow::Result<()> {
        let (consul, _, layout) = clients(&args.cluster)?;
        let flipped = locked(&consul, &layout, async {
            Ok(flip::flip(&consul, &layout, &args.dg).await?)
        })
        .await?;
        match flipped {
            Flipped::Now(a) => eprintln!("active dg is now {a}"),
            Flipped::AlreadyActive(a) => eprintln!("{} is already active; nothing changed", a.dg),
        }
        Ok(())
    }

    pub async fn abort(args: ClusterArgs) -> anyhow::Result<()> {
        let (consul, nomad, layout) = clients(&args)?;
        locked(&consul, &layout, async {
            let progress = |l: &str| eprintln!("{l}");
            match simq_indexer::progressive::stop_candidate(&nomad, &consul, &layout, &progress)
                .await?
            {
                Some(dg) => eprintln!("done: candidate {dg} stopped"),
                None => eprintln!("no candidate runs beside the active dg; nothing to stop"),
            }
            // A candidate of another model had its embedders started for it.
            models::retire_unused(&nomad, &consul, &layout, None, &progress).await
        })
        .await
    }

    pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
        use simq_indexer::compare::{fetch, table, verdict};
        let window = Duration::from_secs(args.window_secs);
        let c = fetch(&args.judge.prometheus, window).await?;
        println!(
            "last {} s, from {}:",
            window.as_secs(),
            args.judge.prometheus
        );
        print!("{}", table(&c));
        let checks = verdict(&c, &args.judge.thresholds());
        for check in &checks {
            println!(
                "{} {:<9} {}",
                if check.passed { "pass" } else { "FAIL" },
                check.name,
                check.detail
            );
        }
        let failed = checks.iter().filter(|c| !c.passed).count();
        if failed > 0 {
            anyhow::bail!("the candidate fails {failed} of {} checks", checks.len());
        }
        println!("verdict: the candidate passes every check");
        Ok(())
    }

    pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
        use simq_indexer::keys;
        match cmd {
            KeysCommand::Create(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                let new = keys::NewKey {
                    label: a.label,
                    rate: a.rate,
                    burst: a.burst,
                    admin: a.admin,
                };
                let (key, r) = keys::create(&consul, &layout, &new).await?;
                eprintln!(
                    "key {} created ({}, {} queries/s, burst {}{}); it is printed once, below: store it now",
                    r.id,
                    r.label,
                    r.rate,
                    r.burst,
                    if r.admin { ", admin" } else { "" }
                );
                println!("{key}");
            }
            KeysCommand::List(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                let (records, bad) = keys::list(&consul, &layout).await?;
                if records.is_empty() {
                    eprintln!("no API keys under {}", layout.api_keys());
                }
                for r in records {
                    println!(
                        "{}  rate {}/s  burst {}  {}  created {}  {}",
                        r.id,
                        r.rate,
                        r.burst,
                        if r.admin { "admin" } else { "query" },
                        r.created_at,
                        r.label
                    );
                }
                for b in bad {
                    eprintln!("skipped (balancers ignore it too): {b}");
                }
            }
            KeysCommand::Revoke(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                keys::revoke(&consul, &layout, &a.id).await?;
                eprintln!("key {} revoked", a.id);
            }
        }
        Ok(())
    }

    pub async fn traffic(cmd: TrafficCommand) -> anyhow::Result<()> {
        use simq_indexer::traffic::{self, describe};
        match cmd {
            TrafficCommand::Set(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                let observed = traffic::observe(&consul, &layout).await?;
                let new = traffic::SetSplit {
                    candidate: a.candidate,
                    weight: a.weight,
                    shadow: a.shadow,
                    salt: a.salt,
                };
                let split = traffic::set(&consul, &layout, &observed, &new).await?;
                eprintln!("traffic split set: {}", describe(&split));
                println!("{}", serde_json::to_string(&split)?);
            }
            TrafficCommand::Show(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                match traffic::observe(&consul, &layout).await?.split {
                    None => println!("no traffic split: the active dg answers every query"),
                    Some(Ok(s)) => println!("{}", describe(&s)),
                    Some(Err(e)) => println!("{e} (balancers send no traffic to a candidate)"),
                }
                let http = simq_indexer::rollout::status_client();
                for b in consul
                    .health_service("simq-balancer", true, None)
                    .await?
                    .value
                {
                    let url = format!("http://{}:{}/v1/status", b.address, b.port);
                    let seen = match http.get(&url).send().await {
                        Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
                        Err(e) => {
                            println!("  balancer {}:{}: unreachable: {e}", b.address, b.port);
                            continue;
                        }
                    };
                    let t = &seen["traffic"];
                    let what = if t.is_null() {
                        "no split".to_string()
                    } else if t["serving"] == true {
                        format!("sends {} users to {}", t["weight"], t["candidate"])
                    } else {
                        format!(
                            "no candidate traffic: {}",
                            t["not_ready"].as_str().unwrap_or("not ready")
                        )
                    };
                    println!("  balancer {}:{}: {what}", b.address, b.port);
                }
            }
            TrafficCommand::Clear(a) => {
                let (consul, layout) = consul_of(&a.consul)?;
                let observed = traffic::observe(&consul, &layout).await?;
                match traffic::clear(&consul, &layout, &observed).await? {
                    None => eprintln!("no traffic split was set; nothing to clear"),
                    Some(Ok(s)) => eprintln!("traffic split cleared (was: {})", describe(&s)),
                    Some(Err(e)) => eprintln!("traffic split cleared (was unreadable: {e})"),
                }
            }
        }
        Ok(())
    }

    pub async fn status(args: ClusterArgs) -> anyhow::Result<()> {
        let (consul, nomad, layout) = clients(&args)?;
        let observed = flip::observe(&consul, &layout).await?;
        match &observed.active {
            Some(a) => println!(
                "active:   {} (since {})\nprevious: {}",
                a.dg,
                a.flipped_at,
                a.previous.as_deref().unwrap_or("-")
            ),
            None => println!("active:   - (no dg was ever activated)"),
        }
        let lock = read_holder(&consul, &layout).await?.map(|h| match h {
            Ok(h) => format!("held by {} since {} ({})", h.who, h.since, h.command),
            Err(_) => "held (unreadable holder)".into(),
        });
        println!("rollout lock: {}", lock.as_deref().unwrap_or("free"));
        match simq_indexer::traffic::observe(&consul, &layout)
            .await?
            .split
        {
            None => println!("traffic split: none"),
            Some(Ok(s)) => println!("traffic split: {}", simq_indexer::traffic::describe(&s)),
            Some(Err(e)) => println!("traffic split: {e}"),
        }
        println!(
            "shards job runs: {}",
            running_dg(&nomad).await?.as_deref().unwrap_or("-")
        );
        if let Some(d) = nomad.latest_deployment(SHARDS_JOB_ID).await? {
            println!(
                "latest deployment: {} version {} {} ({})",
                &d.id[..8],
                d.job_version,
                d.status,
                d.status_description
            );
        }
        // Every instance as Consul sees it; balancers also say which dg they route with.
        let http = simq_indexer::rollout::status_client();
        for service in ["simq-balancer", "simq-embedder", "simq-shard"] {
            let entries = consul.health_service(service, false, None).await?.value;
            println!("{service}: {} instance(s)", entries.len());
            for e in entries {
                let mut line = format!("  {}:{} {}", e.address, e.port, e.status);
                if !e.tags.is_empty() {
                    line.push_str(&format!(" [{}]", e.tags.join(", ")));
                }
                if service == "simq-balancer" {
                    let routes = match simq_indexer::rollout::balancer_dg(&http, &e).await {
                        Ok(dg) => dg.unwrap_or_else(|| "no dg".into()),
                        Err(e) => format!("unreachable: {e}"),
                    };
                    line.push_str(&format!(", routes with {routes}"));
                }
                println!("{line}");
            }
        }
        println!("consul: {}/ui  nomad: {}/ui", consul.addr(), nomad.addr());
        Ok(())
    }

    pub async fn serve_blobs(args: ServeBlobsArgs) -> anyhow::Result<()> {
        std::fs::create_dir_all(&args.dir)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(dir = %args.dir.display(), listen = %args.listen, "serving blobs");
        serve(
            args.dir.clone(),
            listener,
            simq_consul::service::shutdown_signal(),
        )
        .await;
        Ok(())
    }
}

fn run_build(args: BuildArgs) -> anyhow::Result<()> {
    let format = Format::from_path(&args.corpus, &args.column);
    let corpus = corpus::read(&args.corpus, &format)?;
    if !corpus.bad.is_empty() {
        eprintln!("{}", corpus.bad_report(20));
        if !args.skip_bad_lines {
            bail!(
                "{}: {} bad lines (listed above); fix them or pass --skip-bad-lines",
                args.corpus.display(),
                corpus.bad.len()
            );
        }
    }
    eprintln!(
        "corpus {}: {} texts ({} duplicates dropped, {} bad lines skipped)",
        args.corpus.display(),
        corpus.texts.len(),
        corpus.duplicates,
        corpus.bad.len()
    );
    let library = args.model.ort_library.unwrap_or_else(default_ort_library);
    let embedder = Embedder::load(&library, &args.model.model_dir, RuntimeOptions::for_bulk())?;
    let opts = BuildOptions {
        shards: args.shards,
        clusters: args.clusters,
        seed: args.seed,
        kmeans_iterations: args.kmeans_iterations,
        embed_chunk: 256,
        parallel_shards: args.parallel_shards.unwrap_or_else(cores),
    };
    if !args.force {
        if let Some((dir, m)) =
            find_existing(&args.out, &corpus.sha256(), embedder.model_id(), &opts)
        {
            eprintln!("dg {} unchanged (already built) from the same corpus, model and options; --force rebuilds", m.dg);
            println!("{}", dir.display());
            return Ok(());
        }
    }
    if args.only_if_built {
        eprintln!(
            "no dg in {} was built from {} with this model and these options",
            args.out.display(),
            args.corpus.display()
        );
        std::process::exit(3);
    }
    let report = build(&corpus, &embedder, &args.out, opts)?;
    let m = &report.manifest;
    eprintln!(
        "dg {} {}: {} items in {} shards ({}), model {}",
        m.dg,
        if report.unchanged {
            "unchanged (already built)"
        } else {
            "built"
        },
        m.items,
        m.shards.len(),
        m.shards
            .iter()
            .map(|s| s.items.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        m.model_id
    );
    if report.embeddings_cached {
        eprintln!("embeddings reused from {}/.embeddings/", args.out.display());
    }
    eprintln!(
        "time: total {:.1} s = embed {:.1} s ({:.0} texts/s) + k-means {:.1} s + index {:.1} s; total / embed = {:.2}",
        report.total.as_secs_f64(),
        report.embed.as_secs_f64(),
        m.items as f64 / report.embed.as_secs_f64(),
        report.kmeans.as_secs_f64(),
        report.index.as_secs_f64(),
        report.total.as_secs_f64() / report.embed.as_secs_f64()
    );
    println!("{}", report.dir.display());
    Ok(())
}

fn run_contours(args: ContoursArgs) -> anyhow::Result<()> {
    let dg = DgDir::open(&args.dg_dir)?;
    let library = args.model.ort_library.unwrap_or_else(default_ort_library);
    let embedder = Embedder::load(
        &library,
        &args.model.model_dir,
        RuntimeOptions::for_queries(),
    )?;
    let rows =
        simq_indexer::contours::compare(&dg, &embedder, args.samples, args.nprobe, args.seed)?;
    println!(
        "dg {} ({} items, {} shards), {} perturbed stored questions per kind, model path nprobe {}",
        dg.manifest.dg,
        dg.manifest.items,
        dg.manifest.shards.len(),
        args.samples,
        args.nprobe
    );
    println!("| perturbation | queries | model top-1 | model top-5 | lexical top-1 | lexical top-5 | model ms/query | lexical ms/query |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
            serde_json::to_value(r.perturbation)?
                .as_str()
                .unwrap_or("?"),
            r.queries,
            r.model_top1,
            r.model_top5,
            r.lexical_top1,
            r.lexical_top5,
            r.model_ms,
            r.lexical_ms
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let dg = DgDir::open(&args.dg_dir)?;
    let rows = recall(&dg, args.queries, args.k, &args.nprobe)?;
    println!(
        "dg {} ({} items, {} shards, {} clusters), {} queries, recall@{}",
        dg.manifest.dg,
        dg.manifest.items,
        dg.manifest.shards.len(),
        dg.map.clusters(),
        args.queries,
        args.k
    );
    println!(
        "| nprobe | corpus scanned | shards asked | recall@{} | mean ms | p99 ms |",
        args.k
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} % | {:.2} | {:.4} | {:.2} | {:.2} |",
            r.nprobe,
            r.scanned * 100.0,
            r.shards,
            r.recall,
            r.mean_ms,
            r.p99_ms
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}
