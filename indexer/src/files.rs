//! The subcommands that work on files: build (full or incremental), eval, contours. Each
//! takes its parsed arguments from `main.rs` (flags in `cli.rs`) and drives the library
//! (`simq_indexer`); what it prints is its report. A module of the `simq-indexer` binary.

use std::path::{Path, PathBuf};

use anyhow::bail;
use simq_embedder::runtime::{cores, default_ort_library, Embedder, RuntimeOptions};
use simq_indexer::build::{build, find_existing, BuildOptions};
use simq_indexer::corpus::{self, Format};
use simq_indexer::eval::{recall, DgDir};

use crate::cli::{BuildArgs, ContoursArgs, EvalArgs, ModelArgs};

/// The model the flags name (ONNX Runtime from --ort-library or its default), loaded with
/// `options`.
fn load_model(model: &ModelArgs, options: RuntimeOptions) -> anyhow::Result<Embedder> {
    let library = model
        .ort_library
        .clone()
        .unwrap_or_else(default_ort_library);
    Ok(Embedder::load(&library, &model.model_dir, options)?)
}

/// Read a corpus file, listing its bad lines; they stop the build unless `skip_bad`.
fn read_corpus(path: &Path, column: &str, skip_bad: bool) -> anyhow::Result<corpus::Corpus> {
    let corpus = corpus::read(path, &Format::from_path(path, column))?;
    if !corpus.bad.is_empty() {
        eprintln!("{}", corpus.bad_report(20));
        if !skip_bad {
            bail!(
                "{}: {} bad lines (listed above); fix them or pass --skip-bad-lines",
                path.display(),
                corpus.bad.len()
            );
        }
    }
    eprintln!(
        "corpus {}: {} texts ({} duplicates dropped, {} bad lines skipped)",
        path.display(),
        corpus.texts.len(),
        corpus.duplicates,
        corpus.bad.len()
    );
    Ok(corpus)
}

pub fn run_build(args: BuildArgs) -> anyhow::Result<()> {
    if args.base.is_some() {
        return run_update(args);
    }
    let path = args
        .corpus
        .as_deref()
        .expect("clap requires a corpus without --base");
    let corpus = read_corpus(path, &args.column, args.skip_bad_lines)?;
    let embedder = load_model(&args.model, RuntimeOptions::for_bulk())?;
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
            path.display()
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

/// `build --base`: an incremental build (simq_indexer::update).
fn run_update(args: BuildArgs) -> anyhow::Result<()> {
    use simq_indexer::update::{update, Base, ChangeSet, DriftBounds, UpdateOptions};
    let base_dir = args.base.as_deref().expect("run_update needs --base");
    let t = std::time::Instant::now();
    let base = Base::open(base_dir)?;
    let read = t.elapsed();
    eprintln!(
        "base {}: {} items in {} shards, read in {:.1} s",
        base.manifest.dg,
        base.items.len(),
        base.manifest.shards.len(),
        read.as_secs_f64()
    );
    let texts = |path: &Option<PathBuf>| -> anyhow::Result<Vec<String>> {
        match path {
            Some(p) => Ok(read_corpus(p, &args.column, args.skip_bad_lines)?.texts),
            None => Ok(Vec::new()),
        }
    };
    let change = match &args.corpus {
        Some(path) => ChangeSet::diff(
            base.texts(),
            &read_corpus(path, &args.column, args.skip_bad_lines)?.texts,
        ),
        None => ChangeSet {
            add: texts(&args.add)?,
            remove: texts(&args.remove)?,
        },
    };
    let embedder = load_model(&args.model, RuntimeOptions::for_bulk())?;
    let opts = UpdateOptions {
        embed_chunk: 256,
        parallel_shards: args.parallel_shards.unwrap_or_else(cores),
        bounds: DriftBounds::default(),
        allow_drift: args.allow_drift,
        kmeans_iterations: args.kmeans_iterations,
    };
    let r = update(&base, &change, &embedder, &args.out, opts, read)?;
    let p = &r.plan;
    if !p.not_found.is_empty() {
        eprintln!(
            "{} texts to remove are not in the base (skipped), e.g. {:?}",
            p.not_found.len(),
            p.not_found[0]
        );
    }
    if p.already_present > 0 {
        eprintln!(
            "{} texts to add are already in the base or came twice (skipped)",
            p.already_present
        );
    }
    let d = &r.drift;
    eprintln!(
        "fit: added texts {:.3} vs base {:.3} mean cosine to their centroid; largest cluster {:.1} vs {:.1} times the mean",
        d.added_fit, d.base_fit, d.imbalance, d.base_imbalance
    );
    let m = &r.manifest;
    if p.added.is_empty() && p.removed.is_empty() {
        eprintln!("nothing to change: the base dg {} stays", m.dg);
    } else if let (Some(why), true) = (&r.past_bounds, r.rebuilt) {
        eprintln!("drift: {why}; rebuilt in full (--allow-drift keeps the base's centroids)");
    } else if let Some(why) = &r.past_bounds {
        eprintln!("drift: {why}; the base's centroids are kept (--allow-drift)");
    }
    eprintln!(
        "dg {} {}: {} items ({} added, {} removed) in {} shards, shard files written: {} of {} ({:.1} MB written)",
        m.dg,
        if r.unchanged { "unchanged (already built)" } else { "built" },
        m.items,
        p.added.len(),
        p.removed.len(),
        m.shards.len(),
        r.shards_rewritten.len(),
        m.shards.len(),
        r.bytes_written as f64 / 1e6
    );
    eprintln!(
        "time: total {:.1} s = read base {:.1} s + embed {:.1} s + index {:.1} s",
        r.total.as_secs_f64(),
        r.read.as_secs_f64(),
        r.embed.as_secs_f64(),
        r.index.as_secs_f64()
    );
    println!("{}", r.dir.display());
    Ok(())
}

pub fn run_contours(args: ContoursArgs) -> anyhow::Result<()> {
    let dg = DgDir::open(&args.dg_dir)?;
    let embedder = load_model(&args.model, RuntimeOptions::for_queries())?;
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

pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
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
