//! `indexer build`: corpus -> embeddings -> k-means shards -> one LMDB file per shard ->
//! `manifest.json`, in `<out>/<dg>/`. Same inputs, same bytes, same dg id.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use simq_consul::contract::{sha256_file, BuildInfo, Manifest, ShardEntry, MANIFEST_FORMAT};
use simq_embedder::runtime::Embedder;
use simq_shard::{build_shard, BuildParams, Item};

use crate::corpus::Corpus;
use crate::kmeans::spherical_kmeans;

/// Knobs of a build; defaults chosen from the recall measurements in indexer/BENCH.md.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    pub shards: usize,
    pub n_trees: usize,
    pub seed: u64,
    pub kmeans_iterations: usize,
    /// Texts handed to the runtime per call (it buckets them by length inside).
    pub embed_chunk: usize,
    /// Shards built at once (each build is single-threaded for reproducibility).
    pub parallel_shards: usize,
}

/// What a build produced and how long each phase took.
#[derive(Debug)]
pub struct BuildReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub embed: Duration,
    pub kmeans: Duration,
    pub index: Duration,
    pub total: Duration,
    /// The same dg was already in the output directory.
    pub unchanged: bool,
    /// The embeddings came from the cache beside the output (`<out>/.embeddings/`).
    pub embeddings_cached: bool,
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Embed every text with the shared runtime: `texts.len() * dims` floats.
pub fn embed_all(embedder: &Embedder, texts: &[String], chunk: usize) -> anyhow::Result<Vec<f32>> {
    let bar = progress(texts.len() as u64, "embedding");
    let mut out = Vec::with_capacity(texts.len() * embedder.dims());
    for part in texts.chunks(chunk.max(1)) {
        let refs: Vec<&str> = part.iter().map(String::as_str).collect();
        out.extend(embedder.embed(&refs)?);
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Build a dg from a validated corpus into `<out>/<dg>/`.
pub fn build(
    corpus: &Corpus,
    embedder: &Embedder,
    out: &Path,
    opts: BuildOptions,
) -> anyhow::Result<BuildReport> {
    let started = Instant::now();
    let n = corpus.texts.len();
    if n < opts.shards {
        bail!(
            "{}: {n} usable texts for {} shards; need at least one text per shard",
            corpus.path.display(),
            opts.shards
        );
    }
    if n > u32::MAX as usize {
        bail!("{}: {n} texts; item ids are u32", corpus.path.display());
    }
    let dims = embedder.dims();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let t = Instant::now();
    // Embeddings are the slow part; keep them so a rebuild with other shard or tree
    // settings reuses them. The file name pins model and corpus.
    let cache =
        out.join(".embeddings")
            .join(format!("{}-{}.f32", embedder.model_id(), corpus.sha256()));
    let (vectors, embeddings_cached) = match read_embeddings(&cache, n * dims) {
        Some(v) => (v, true),
        None => {
            let v = embed_all(embedder, &corpus.texts, opts.embed_chunk)?;
            write_embeddings(&cache, &v)?;
            (v, false)
        }
    };
    let embed = t.elapsed();
    tracing::info!(
        texts = n,
        seconds = embed.as_secs_f64(),
        cached = embeddings_cached,
        "embedded"
    );

    let t = Instant::now();
    let clustering = spherical_kmeans(
        &vectors,
        dims,
        opts.shards,
        opts.seed,
        opts.kmeans_iterations,
    );
    let kmeans = t.elapsed();
    tracing::info!(
        shards = opts.shards,
        iterations = clustering.iterations,
        seconds = kmeans.as_secs_f64(),
        "clustered"
    );

    let t = Instant::now();
    let work = tempfile::Builder::new()
        .prefix(".dg-build-")
        .tempdir_in(out)
        .with_context(|| format!("creating a build directory in {}", out.display()))?;
    let mut members: Vec<Vec<Item>> = vec![Vec::new(); opts.shards];
    for (id, &cluster) in clustering.assignment.iter().enumerate() {
        members[cluster as usize].push(Item {
            id: id as u32,
            text: &corpus.texts[id],
            vector: &vectors[id * dims..(id + 1) * dims],
        });
    }
    let params = BuildParams {
        n_trees: opts.n_trees,
        seed: opts.seed,
    };
    let bar = progress(opts.shards as u64, "indexing");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<anyhow::Result<ShardEntry>>>> = (0..opts.shards)
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..opts.parallel_shards.clamp(1, opts.shards) {
            scope.spawn(|| loop {
                let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if s >= opts.shards {
                    break;
                }
                let path = work.path().join(shard_file_name(s));
                let entry = build_shard(
                    &path,
                    s as u32,
                    dims,
                    embedder.model_id(),
                    &members[s],
                    params,
                )
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    Ok(ShardEntry {
                        shard: s as u32,
                        sha256: sha256_file(&path)?,
                        size: std::fs::metadata(&path)?.len(),
                        items: members[s].len() as u64,
                    })
                });
                *results[s].lock().unwrap() = Some(entry);
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    let shards = results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every shard was built"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let index = t.elapsed();

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        dg: String::new(),
        model_id: embedder.model_id().to_string(),
        dims,
        distance: "cosine".into(),
        items: n as u64,
        build: BuildInfo {
            corpus_sha256: corpus.sha256(),
            n_trees: opts.n_trees,
            seed: opts.seed,
            kmeans_iterations: clustering.iterations,
        },
        centroids: clustering.centroids,
        shards,
    }
    .seal();
    let json = serde_json::to_vec_pretty(&manifest)?;
    if json.len() > simq_consul::contract::KV_VALUE_LIMIT {
        bail!(
            "manifest is {} bytes, over Consul's 512 KB value limit: use fewer shards",
            json.len()
        );
    }
    std::fs::write(work.path().join("manifest.json"), &json)?;

    let dir = out.join(&manifest.dg);
    let unchanged =
        dir.join("manifest.json").is_file() && std::fs::read(dir.join("manifest.json"))? == json;
    if !unchanged {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(work.keep(), &dir)
            .with_context(|| format!("moving the build to {}", dir.display()))?;
    }
    Ok(BuildReport {
        dir,
        manifest,
        embed,
        kmeans,
        index,
        total: started.elapsed(),
        unchanged,
        embeddings_cached,
    })
}

fn read_embeddings(path: &Path, floats: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != floats * 4 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn write_embeddings(path: &Path, vectors: &[f32]) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().expect("cache path has a parent"))?;
    let bytes: Vec<u8> = vectors.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A dg in `out` built from the same corpus, model and options, if any: building it again
/// would give the same bytes, so the (long) embedding can be skipped.
pub fn find_existing(
    out: &Path,
    corpus_sha256: &str,
    model_id: &str,
    opts: &BuildOptions,
) -> Option<(PathBuf, Manifest)> {
    for entry in std::fs::read_dir(out).ok()?.flatten() {
        let dir = entry.path();
        if !dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("dg-"))
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        let complete = (0..m.shards.len()).all(|s| dir.join(shard_file_name(s)).is_file());
        if complete
            && m.validate().is_ok()
            && m.model_id == model_id
            && m.build.corpus_sha256 == corpus_sha256
            && m.build.n_trees == opts.n_trees
            && m.build.seed == opts.seed
            && m.shards.len() == opts.shards
        {
            return Some((dir, m));
        }
    }
    None
}

/// File name of shard `s` inside a dg directory.
pub fn shard_file_name(s: usize) -> String {
    format!("shard-{s}.lmdb")
}
