//! simq-indexer: builds, evaluates, publishes and rolls out index generations. Parses
//! flags and wires the parts of the indexer (see lib.rs).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use simq_embedder::runtime::{default_ort_library, Embedder, RuntimeOptions};
use simq_indexer::build::{build, BuildOptions};
use simq_indexer::corpus::{self, Format};
use simq_indexer::eval::{recall, DgDir};

/// Builds index generations ("dg") of a query corpus and rolls them out.
///
/// A dg is a directory named by its content address: one LMDB file per shard (an arroy
/// index plus the id -> text table) and manifest.json (model id, dims, centroids, and
/// each shard's sha256, size and item count). Building the same corpus with the same
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
    /// them into shards by k-means, index each shard, write the manifest.
    ///
    /// Corpus formats: one text per line (any extension), TSV with a header row (.tsv,
    /// text column named by --column), JSON lines (.jsonl, text field named by --column).
    /// Bad lines (invalid UTF-8, control characters, empty, over 1000 characters, bad
    /// JSON, short TSV rows) are listed as FILE:LINE: REASON and stop the build unless
    /// --skip-bad-lines is given. Prints the dg id and the output directory.
    Build(BuildArgs),
    /// Measure recall@k of the sharded path against exact search, for several nprobe and
    /// search_k values, with per-query latency.
    Eval(EvalArgs),
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
    /// Number of shards (k of k-means).
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// arroy trees per shard: more trees, better recall, bigger files.
    #[arg(long, default_value_t = 16)]
    n_trees: usize,
    /// Seed of k-means++ and of the arroy build.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Lloyd iterations at most.
    #[arg(long, default_value_t = 25)]
    kmeans_iterations: usize,
    /// Shards indexed at once [default: one per core].
    #[arg(long)]
    parallel_shards: Option<usize>,
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
    /// nprobe values to try (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    nprobe: Vec<usize>,
    /// arroy search_k values to try (comma-separated; 0 = arroy's default k * n_trees).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 1000, 3000, 10000])]
    search_k: Vec<usize>,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    simq_consul::service::init_logging();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => run_build(args),
        Command::Eval(args) => run_eval(args),
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
    let embedder = Embedder::load(&library, &args.model.model_dir, RuntimeOptions::default())?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let opts = BuildOptions {
        shards: args.shards,
        n_trees: args.n_trees,
        seed: args.seed,
        kmeans_iterations: args.kmeans_iterations,
        embed_chunk: 256,
        parallel_shards: args.parallel_shards.unwrap_or(cores),
    };
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

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let dg = DgDir::open(&args.dg_dir)?;
    let rows = recall(&dg, args.queries, args.k, &args.nprobe, &args.search_k)?;
    println!(
        "dg {} ({} items, {} shards, {} trees), {} queries, recall@{}",
        dg.manifest.dg,
        dg.manifest.items,
        dg.manifest.shards.len(),
        dg.manifest.build.n_trees,
        args.queries,
        args.k
    );
    println!(
        "| nprobe | search_k | recall@{} | mean ms | p99 ms |",
        args.k
    );
    println!("|---:|---:|---:|---:|---:|");
    for r in &rows {
        let sk = if r.search_k == 0 {
            "default".to_string()
        } else {
            r.search_k.to_string()
        };
        println!(
            "| {} | {} | {:.4} | {:.2} | {:.2} |",
            r.nprobe, sk, r.recall, r.mean_ms, r.p99_ms
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}
