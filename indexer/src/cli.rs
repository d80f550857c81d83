//! The flags of `simq-indexer`: every subcommand and its arguments, with the help text
//! `--help` prints. `main.rs` dispatches them; `files.rs` and `cluster.rs` run them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Builds index generations ("dg") of a query corpus and rolls them out.
///
/// A dg is a directory named by its content address: one LMDB file per shard (one arroy
/// index per fine cluster plus the id -> text table), centroids.f32 (the fine clusters'
/// centroids) and manifest.json (model id, dims, the shard of each cluster, the
/// centroids' sha256, and each shard's sha256, size and item count). Building the same corpus with the same
/// model and options gives byte-identical files and the same dg id.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// Stop every simq job (ids starting with simq-, in every namespace the token may see),
    /// wait until their tasks have ended, then purge them: what scripts/cluster.sh stop
    /// does before it stops the agents.
    StopJobs(StopJobsArgs),
    /// Register one of simq's job specs (compiled in from nomad/*.nomad.hcl: shards,
    /// embedder, balancer, blobs) with NAME=VALUE variables and wait until Nomad's
    /// deployment of it succeeds. Fails, naming the cause per task group, when the
    /// deployment fails or does not end in time. The one way scripts/deploy.sh and the
    /// tests register jobs.
    RunJob(RunJobArgs),
    /// Put files into the blob store under their sha256 and print each sha256 (one per
    /// line): the binaries, ONNX Runtime and model files the jobs fetch as artifacts.
    PutBlob(PutBlobArgs),
    /// Print the model id of a model directory.
    ModelId(ModelArgs),
    /// Print the index layout and search defaults (shards, clusters, nprobe) as name=value
    /// lines: the one place scripts and job specs take them from.
    Defaults,
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
    /// Deploy the whole stack serving a built dg on a running cluster, idempotently: the
    /// blob store (--serve-blobs), publish, the binaries, ONNX Runtime and the model into
    /// the blob store, the embedder job, the shards' rollout (as `rollout`), the balancer
    /// job; then wait until the balancers route with the dg, and print it.
    /// scripts/deploy.sh gathers the settings and runs this.
    Deploy(DeployArgs),
    /// Check where simq runs on a multi-node cluster, from Consul's health and Nomad's
    /// allocations: exit 0 when the check holds, else exit 1 printing what is off (one
    /// line each). What scripts/deploy.sh --nodes and the node suite check.
    #[command(subcommand)]
    Check(CheckCommand),
    /// Print the node of each passing instance of a service (sorted, space-separated,
    /// one entry per instance), e.g. `simq-indexer nodes-of simq-shard` -> `n1 n2 n2 n3`.
    NodesOf(NodesOfArgs),
}

#[derive(Args, Debug)]
pub(crate) struct DeployArgs {
    /// A built dg directory (simq-indexer build).
    pub(crate) dg_dir: PathBuf,
    /// ONNX Runtime's shared library, which the embedders fetch.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub(crate) ort_lib: PathBuf,
    /// Directory of simq-embedder, simq-shard and simq-balancer [default: beside this binary].
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// Run the `blobs` job, serving the --blobs directory at --blob-url (one host). Without
    /// it, the store must already serve (e.g. the nodes' SeaweedFS).
    #[arg(long)]
    pub(crate) serve_blobs: bool,
    /// Shards run simq-shard fetched from the blob store (and checked), not the host path
    /// of --shard-bin: needed on several nodes.
    #[arg(long)]
    pub(crate) shard_bin_from_blobs: bool,
    /// Embedder instances.
    #[arg(long, default_value_t = 2)]
    pub(crate) embedders: usize,
    /// Balancer instances (on one host they share --port).
    #[arg(long, default_value_t = 2)]
    pub(crate) balancers: usize,
    /// The balancers' public port.
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Which embedder a balancer calls first: stable (one host: one takes every call) or
    /// local (nodes: its own node's).
    #[arg(long, default_value = "stable", value_parser = ["stable", "local"])]
    pub(crate) embedder_order: String,
    /// Fine clusters probed per query [default: simq-indexer defaults' nprobe].
    #[arg(long)]
    pub(crate) nprobe: Option<usize>,
    /// Seconds a balancer's Consul blocking query may wait.
    #[arg(long, default_value_t = 30)]
    pub(crate) consul_wait_secs: u64,
    /// API keys on queries: off, or required (simq-indexer keys create).
    #[arg(long, default_value = "off", value_parser = ["off", "required"])]
    pub(crate) api_keys: String,
    /// The balancers' Consul token file (ACLs on).
    #[arg(long)]
    pub(crate) balancer_token_file: Option<PathBuf>,
    /// Seconds to wait at the end until the balancers route with the dg.
    #[arg(long, default_value_t = 60)]
    pub(crate) ready_secs: u64,
    #[command(flatten)]
    pub(crate) rollout: RolloutFlags,
}

#[derive(Subcommand, Debug)]
pub(crate) enum CheckCommand {
    /// Every instance passes and instances run on all N nodes; one balancer and one
    /// embedder per node (when there are no more of them than nodes); the replicas of each
    /// shard of the dg on different nodes. Prints every instance first.
    Placement(PlacementArgs),
    /// Every shard of the active dg has --replicas passing replicas on different nodes,
    /// none on --without (the node that was lost). When not, also prints why Nomad could
    /// not place shard groups, if it says.
    ShardsFull(ShardsFullArgs),
    /// Every simq job runs exactly the allocations it asks for, Consul passes exactly the
    /// running ones on the same nodes, and the rollout lock is free.
    Settled(ClusterArgs),
}

#[derive(Args, Debug)]
pub(crate) struct PlacementArgs {
    /// Nodes the cluster has.
    #[arg(long)]
    pub(crate) nodes: usize,
    /// The dg whose shards count [default: the active dg].
    #[arg(long)]
    pub(crate) dg: Option<String>,
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ShardsFullArgs {
    /// The node that was lost: its instances do not count.
    #[arg(long)]
    pub(crate) without: Option<String>,
    /// Replicas each shard must have.
    #[arg(long, default_value_t = 2)]
    pub(crate) replicas: usize,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Args, Debug)]
pub(crate) struct NodesOfArgs {
    /// The service: simq-balancer, simq-embedder or simq-shard.
    pub(crate) service: String,
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

impl Command {
    /// The subcommands that only read and write files: they open no socket, so a closed
    /// stdout may end them by SIGPIPE (see main.rs).
    pub(crate) fn works_on_files_only(&self) -> bool {
        matches!(
            self,
            Command::Build(_)
                | Command::Eval(_)
                | Command::Contours(_)
                | Command::Export(_)
                | Command::ModelId(_)
                | Command::Defaults
        )
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum TrafficCommand {
    /// Set (or change) the split; prints it.
    Set(TrafficSetArgs),
    /// Show the split and what each balancer does with it.
    Show(KeysListArgs),
    /// Remove the split: every query goes to the active dg again.
    Clear(KeysListArgs),
}

#[derive(Args, Debug)]
pub(crate) struct TrafficSetArgs {
    /// The candidate dg (published, not the active one).
    pub(crate) candidate: String,
    /// Share of users (0 to 1) answered by the candidate.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) weight: f64,
    /// Share (0 to 1) of the active dg's queries also sent to the candidate to compare,
    /// without changing the answer.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) shadow: f64,
    /// Experiment salt mixed into every user's hash; a new salt reassigns users
    /// independently [default: the current split's salt for the same candidate, else a
    /// new one].
    #[arg(long)]
    pub(crate) salt: Option<String>,
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCommand {
    /// Make a new key and print it once on stdout (store it now: it cannot be shown again).
    Create(KeysCreateArgs),
    /// List the keys: id, label, rate, burst, admin, creation time.
    List(KeysListArgs),
    /// Revoke a key by id: balancers refuse it within a Consul round trip.
    Revoke(KeysRevokeArgs),
}

#[derive(Args, Debug)]
pub(crate) struct KeysCreateArgs {
    /// Who or what the key is for (shown by keys list).
    #[arg(long)]
    pub(crate) label: String,
    /// Sustained queries per second (per balancer instance).
    #[arg(long, default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Queries at once above the rate.
    #[arg(long, default_value_t = 40)]
    pub(crate) burst: u32,
    /// May also read /metrics and /v1/status on the balancer's public port.
    #[arg(long)]
    pub(crate) admin: bool,
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub(crate) struct KeysListArgs {
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub(crate) struct KeysRevokeArgs {
    /// The key's id (8 hex digits, as keys list shows it).
    pub(crate) id: String,
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ConsulArgs {
    /// Consul HTTP address (its ACL token: CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE).
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    pub(crate) consul: String,
    /// Consul KV prefix of simq's keys.
    #[arg(long, default_value = "simq/")]
    pub(crate) kv_prefix: String,
}

#[derive(Args, Debug)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    pub(crate) consul: ConsulArgs,
    /// Nomad HTTP address (its ACL token: NOMAD_TOKEN or NOMAD_TOKEN_FILE; the namespace
    /// of simq's jobs: NOMAD_NAMESPACE, default Nomad's "default").
    #[arg(long, env = "NOMAD_ADDR", default_value = "http://127.0.0.1:4646")]
    pub(crate) nomad: String,
}

#[derive(Args, Debug)]
pub(crate) struct RunJobArgs {
    /// The job spec: shards, embedder, balancer or blobs.
    pub(crate) spec: String,
    /// Variables of the spec, NAME=VALUE (a value opening with { or [ is an HCL map or
    /// list; any other is a string, converted by Nomad to the variable's type).
    pub(crate) vars: Vec<String>,
    /// Seconds to wait for the deployment to end.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Args, Debug)]
pub(crate) struct StopJobsArgs {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Seconds to wait for the tasks to end before purging anyway.
    #[arg(long, default_value_t = 60)]
    pub(crate) wait_secs: u64,
}

#[derive(Args, Debug)]
pub(crate) struct PublishArgs {
    /// A built dg directory.
    pub(crate) dg_dir: PathBuf,
    #[command(flatten)]
    pub(crate) blobs: BlobArgs,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

/// Where blobs go.
#[derive(Args, Debug)]
pub(crate) struct BlobArgs {
    /// The blob store: a directory (served by `serve-blobs`; scripts/up.sh's is
    /// ~/.cache/simq/blobs), or s3://BUCKET of an S3-compatible store (at --s3-endpoint;
    /// signed with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY when set, else unsigned).
    /// Needed by publish and put-blob, and by a rollout that starts a new model.
    #[arg(long, env = "SIMQ_BLOBS")]
    pub(crate) blobs: Option<String>,
    /// S3 endpoints of the bucket, comma-separated (http://host:port), tried in order: the
    /// gateways of one replicated store.
    #[arg(long, env = "SIMQ_S3_ENDPOINTS", value_delimiter = ',')]
    pub(crate) s3_endpoint: Vec<String>,
}

impl BlobArgs {
    /// The store, or an error naming the flag when it was not given.
    pub(crate) fn open(&self) -> anyhow::Result<simq_indexer::blobs::BlobStore> {
        self.open_if_given()?
            .ok_or_else(|| anyhow::anyhow!("give --blobs (or SIMQ_BLOBS): the blob store"))
    }

    pub(crate) fn open_if_given(&self) -> anyhow::Result<Option<simq_indexer::blobs::BlobStore>> {
        self.blobs
            .as_deref()
            .map(|spec| simq_indexer::blobs::BlobStore::open(spec, &self.s3_endpoint))
            .transpose()
    }
}

#[derive(Args, Debug)]
pub(crate) struct PutBlobArgs {
    /// Files to store.
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) blobs: BlobArgs,
}

#[derive(Args, Debug)]
pub(crate) struct RolloutArgs {
    /// The dg to roll out (rollback: ignored, the previous dg is used).
    #[arg(default_value = "")]
    pub(crate) dg: String,
    #[command(flatten)]
    pub(crate) flags: RolloutFlags,
}

/// How a dg's shards roll out: shared by rollout, rollback and deploy.
#[derive(Args, Debug)]
pub(crate) struct RolloutFlags {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Replicas per shard [default: as many as the running shards job has, else 1].
    #[arg(long)]
    pub(crate) replicas: Option<usize>,
    /// Base URL of the blob store.
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    pub(crate) blob_url: String,
    /// Directory of the dg's model, when no embedder of that model runs or ran here (a
    /// model rollout): its embedders start beside the running ones before any shard
    /// moves, and the old model's stop after the flip.
    #[arg(long)]
    pub(crate) model_dir: Option<PathBuf>,
    /// Where a model rollout puts the new model's files, which its embedders fetch.
    #[command(flatten)]
    pub(crate) blobs: BlobArgs,
    /// Absolute path of the simq-shard binary the job runs [default: beside this binary].
    /// Used where --shard-bin-sha256 is not given: a host path, so a single node only.
    #[arg(long)]
    pub(crate) shard_bin: Option<PathBuf>,
    /// sha256 of the simq-shard binary in the blob store: every node fetches it from
    /// --blob-url and verifies it, instead of running --shard-bin (needed on several nodes).
    #[arg(long, value_name = "SHA256")]
    pub(crate) shard_bin_sha256: Option<String>,
    /// Nomad task driver of the shards: raw_exec, or exec (isolated; needs
    /// --shard-bin-sha256, since a host path is not inside its chroot).
    #[arg(long, default_value = "raw_exec", value_parser = ["raw_exec", "exec"])]
    pub(crate) driver: String,
    /// Keep each shard's replicas on distinct nodes; new dgs then roll out as new Nomad
    /// groups beside the old (no canaries) [default: as the running shards job does, else
    /// false].
    #[arg(long, value_name = "BOOL")]
    pub(crate) replicas_apart: Option<bool>,
    /// Seconds a new shard instance may take to pass its checks.
    #[arg(long, default_value_t = 30)]
    pub(crate) healthy_deadline_secs: u64,
    /// Seconds without progress before the deployment fails and Nomad reverts.
    #[arg(long, default_value_t = 35)]
    pub(crate) progress_deadline_secs: u64,
    /// Seconds to follow the deployment at most.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// Stop before the flip, once the dg's canaries are all healthy beside the active dg:
    /// a candidate for `traffic set`. Run `rollout` again to flip, or `abort` to stop it.
    #[arg(long, conflicts_with = "progressive")]
    pub(crate) candidate_only: bool,
    /// Progressive rollout: start the canaries, shadow --shadow of the queries to them,
    /// then give them these shares of users one step at a time (comma-separated), judging
    /// each step with `compare` (needs --prometheus); flip when every step passes, stop
    /// the candidate (and say why) when one fails.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub(crate) progressive: Option<Vec<f64>>,
    /// Seconds each progressive step runs before it is judged.
    #[arg(long, default_value_t = 30)]
    pub(crate) step_secs: u64,
    /// Share of the active dg's queries shadowed to the candidate during a progressive
    /// rollout.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) shadow: f64,
    #[command(flatten)]
    pub(crate) judge: JudgeArgs,
}

/// Where the comparison of the arms comes from and what it must meet.
#[derive(Args, Debug, Clone)]
pub(crate) struct JudgeArgs {
    /// Prometheus that scrapes the balancers (scripts/prometheus.sh runs one).
    #[arg(long, env = "SIMQ_PROMETHEUS", default_value = "http://127.0.0.1:9090")]
    pub(crate) prometheus: String,
    /// Candidate answers plus shadow pairs needed before anything is judged.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) min_samples: f64,
    /// The candidate's p99 latency at most this times the active dg's.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) max_p99_ratio: f64,
    /// Share of the candidate's queries that failed, at most.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) max_error_share: f64,
    /// Share of the candidate's answers that were degraded, at most.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) max_degraded_share: f64,
    /// Mean overlap@k of the two arms' results on shadowed queries, at least.
    #[arg(long, default_value_t = 0.6)]
    pub(crate) min_overlap: f64,
    /// Share of shadowed queries whose top answers agree, at least.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) min_top1: f64,
    /// How much lower the candidate's mean top score may be.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) max_score_drop: f64,
}

impl JudgeArgs {
    pub(crate) fn thresholds(&self) -> simq_indexer::compare::Thresholds {
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
pub(crate) struct CompareArgs {
    /// The window to compare, in seconds, ending now.
    #[arg(long, default_value_t = 300)]
    pub(crate) window_secs: u64,
    #[command(flatten)]
    pub(crate) judge: JudgeArgs,
}

#[derive(Args, Debug)]
pub(crate) struct FlipArgs {
    /// The dg to make active.
    pub(crate) dg: String,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ServeBlobsArgs {
    /// Blob store directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub(crate) listen: std::net::SocketAddr,
}

#[derive(Args, Debug)]
pub(crate) struct ModelArgs {
    /// Model directory (as laid out by scripts/setup.sh).
    #[arg(long, env = "SIMQ_MODEL_DIR")]
    pub(crate) model_dir: PathBuf,
    /// ONNX Runtime shared library [default: $ORT_DYLIB_PATH, else the set-up cache].
    #[arg(long)]
    pub(crate) ort_library: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct BuildArgs {
    /// Corpus file. With --base: the new full corpus, diffed against the base's texts
    /// (its texts the base lacks are added, the base's texts it lacks are removed).
    #[arg(required_unless_present_any = ["add", "remove"])]
    pub(crate) corpus: Option<PathBuf>,
    /// Build incrementally from this built dg directory: keep its model, centroids and
    /// BM25 statistics, embed only the added texts, write only the shard files that gain
    /// or lose an item and reuse the others byte for byte (same sha256). The change is
    /// CORPUS (a new full corpus) or --add/--remove. Past the drift bounds (the added
    /// texts fit their clusters worse than the base's by 0.05 of cosine, the largest
    /// cluster grows 1.5 times relative to the mean, or a cluster is left empty) it
    /// rebuilds in full (k-means again; nothing embedded twice) unless --allow-drift.
    #[arg(long, value_name = "DG_DIR")]
    pub(crate) base: Option<PathBuf>,
    /// With --base: a corpus file of texts to add.
    #[arg(long, requires = "base", conflicts_with = "corpus")]
    pub(crate) add: Option<PathBuf>,
    /// With --base: a corpus file of texts to remove (matched to the base's texts with
    /// case folded; texts it does not hold are listed and skipped).
    #[arg(long, requires = "base", conflicts_with = "corpus")]
    pub(crate) remove: Option<PathBuf>,
    /// With --base: keep the base's centroids even past the drift bounds.
    #[arg(long, requires = "base")]
    pub(crate) allow_drift: bool,
    /// Directory that receives <dg>/ (created if missing).
    #[arg(long, short, default_value = "dgs")]
    pub(crate) out: PathBuf,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// TSV column or JSON-lines field holding the text.
    #[arg(long, default_value = "text")]
    pub(crate) column: String,
    /// Build from the good lines even when some lines are bad (they are still listed).
    #[arg(long)]
    pub(crate) skip_bad_lines: bool,
    /// Number of shards (k of k-means). Each query calls the shards holding its nearest
    /// clusters, so fewer shards mean fewer calls: on 2 cores, 2 shards answered unloaded
    /// queries in p50 6.9-7.1 ms against 7.0-7.9 (4 shards) and 9.1-9.5 ms (8), and 200
    /// against 160-192 and 129-169 queries/s (indexer/BENCH.md). Use more on more cores.
    #[arg(long, default_value_t = simq_contract::defaults::SHARDS)]
    pub(crate) shards: usize,
    /// Fine clusters over the whole corpus (spread over the shards by size, at least 16
    /// items each). A query probes the nearest --nprobe of the balancer; 4096 clusters of
    /// about 36 questions gave the best recall per item scanned (indexer/BENCH.md).
    #[arg(long, default_value_t = simq_contract::defaults::CLUSTERS)]
    pub(crate) clusters: usize,
    /// Seed of k-means++ and of the arroy build.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Lloyd iterations at most.
    #[arg(long, default_value_t = 25)]
    pub(crate) kmeans_iterations: usize,
    /// Shards indexed at once [default: one per core].
    #[arg(long)]
    pub(crate) parallel_shards: Option<usize>,
    /// Build even when the output directory already holds a dg of the same corpus, model
    /// and options (by default that dg is reused: a rebuild gives the same bytes).
    #[arg(long)]
    pub(crate) force: bool,
    /// Only look: print the directory of a dg already built from the same corpus, model
    /// and options and exit 0, or exit 3 (building nothing) when there is none.
    /// `scripts/up.sh` asks this to decide whether to serve a small slice first.
    #[arg(long, conflicts_with = "force")]
    pub(crate) only_if_built: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// A built dg directory.
    pub(crate) dg_dir: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct ContoursArgs {
    /// A built dg directory (the one `build` printed).
    pub(crate) dg_dir: PathBuf,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Stored questions perturbed per kind of perturbation.
    #[arg(long, default_value_t = 500)]
    pub(crate) samples: usize,
    /// Fine clusters the model path probes (as the balancer's --nprobe).
    #[arg(long, default_value_t = simq_contract::defaults::NPROBE)]
    pub(crate) nprobe: usize,
    /// Seed of the perturbations.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// A built dg directory (the one `build` printed).
    pub(crate) dg_dir: PathBuf,
    /// Queries drawn from the indexed items.
    #[arg(long, default_value_t = 500)]
    pub(crate) queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    pub(crate) k: usize,
    /// nprobe values to try (fine clusters probed per query, comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 16, 24, 32, 48, 64])]
    pub(crate) nprobe: Vec<usize>,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks of every subcommand (unique names, valid defaults),
    /// which otherwise fire only when that subcommand is first run.
    #[test]
    fn every_subcommand_s_flags_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
