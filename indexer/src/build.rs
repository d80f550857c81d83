//! `indexer build`: corpus -> embeddings -> k-means shards -> k-means fine clusters inside
//! each shard -> one LMDB file per shard (one arroy index per cluster) -> `centroids.f32`
//! and `manifest.json`, in `<out>/<dg>/`. Same inputs, same bytes, same dg id.
//!
//! Why two levels: a query should read a few per cent of the corpus. Shards place data
//! (one process each, replicated); fine clusters (about a hundred items each) are what a
//! query probes, so the balancer asks each shard only for the clusters nearest the query.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use simq_contract::kv::{
    sha256_file, BuildInfo, ClusterTable, Manifest, ShardEntry, MANIFEST_FORMAT, MAX_CLUSTERS,
};
use simq_contract::routing::{chunks, CentroidMap};
use simq_embedder::runtime::Embedder;
use simq_shard::lexical::CorpusStats;
use simq_shard::{build_shard, BuildParams, ClusterItems, Item};

use crate::corpus::Corpus;
use crate::kmeans::spherical_kmeans;
use crate::progress::Progress;

/// Knobs of a build; defaults chosen from the recall measurements in indexer/BENCH.md.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    pub shards: usize,
    /// Fine clusters over the whole corpus, spread over the shards by their size.
    pub clusters: usize,
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

/// Embed every text with the shared runtime: `texts.len() * dims` floats.
pub fn embed_all(embedder: &Embedder, texts: &[String], chunk: usize) -> anyhow::Result<Vec<f32>> {
    let bar = Progress::new("embedding", texts.len() as u64);
    let mut out = Vec::with_capacity(texts.len() * embedder.dims());
    for part in texts.chunks(chunk.max(1)) {
        let refs: Vec<&str> = part.iter().map(String::as_str).collect();
        out.extend(embedder.embed(&refs)?);
        bar.inc(part.len() as u64);
    }
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

    let built = build_embedded(
        &corpus.texts,
        &vectors,
        (embedder.model_id(), dims),
        &corpus.sha256(),
        out,
        opts,
    )?;
    Ok(BuildReport {
        dir: built.dir,
        manifest: built.manifest,
        embed,
        kmeans: built.kmeans,
        index: built.index,
        total: started.elapsed(),
        unchanged: built.unchanged,
        embeddings_cached,
    })
}

/// A dg written by [`build_embedded`].
pub struct Built {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub kmeans: Duration,
    pub index: Duration,
    pub unchanged: bool,
}

/// Build a dg from texts and their embeddings (`texts.len() * dims` floats, item id =
/// position): two-level k-means, every shard indexed, centroids and manifest written.
pub fn build_embedded(
    texts: &[String],
    vectors: &[f32],
    (model_id, dims): (&str, usize),
    corpus_sha256: &str,
    out: &Path,
    opts: BuildOptions,
) -> anyhow::Result<Built> {
    if texts.len() < opts.shards || vectors.len() != texts.len() * dims {
        bail!(
            "{} texts with {} floats for {} shards of {dims} dims; need a vector per text and a text per shard",
            texts.len(),
            vectors.len(),
            opts.shards
        );
    }
    let t = Instant::now();
    let plan = cluster(vectors, dims, &opts)?;
    let kmeans = t.elapsed();

    let t = Instant::now();
    let work = build_dir(out)?;
    let item = |id: u32| Item {
        id,
        text: &texts[id as usize],
        vector: &vectors[id as usize * dims..(id as usize + 1) * dims],
    };
    // BM25 statistics of the whole dg, so the light contour's scores of different shards
    // merge (simq_shard::lexical).
    let lexical = CorpusStats::from_texts(texts.iter().map(String::as_str));
    let all: Vec<usize> = (0..opts.shards).collect();
    let shards = index_shards(
        work.path(),
        &all,
        &ShardSettings {
            dims,
            model_id,
            seed: opts.seed,
            lexical: &lexical,
            parallel: opts.parallel_shards,
        },
        |s| {
            plan.members
                .iter()
                .enumerate()
                .filter(|(c, _)| plan.shard_of[*c] as usize == s)
                .map(|(c, ids)| ClusterItems {
                    id: c as u32,
                    items: ids.iter().map(|&id| item(id)).collect(),
                })
                .collect()
        },
    )?;
    let index = t.elapsed();

    let centroid_bytes = plan.map.to_bytes();
    std::fs::write(work.path().join(CENTROIDS_FILE), &centroid_bytes)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        dg: String::new(),
        model_id: model_id.to_string(),
        dims,
        distance: "cosine".into(),
        items: texts.len() as u64,
        build: BuildInfo {
            corpus_sha256: corpus_sha256.to_string(),
            seed: opts.seed,
            kmeans_iterations: plan.coarse_iterations,
            clusters_requested: opts.clusters,
            base: None,
        },
        clusters: ClusterTable {
            shard_of: plan.shard_of.clone(),
            centroids_sha256: plan.map.sha256(),
            centroid_chunks: chunks(&centroid_bytes).len() as u32,
        },
        shards,
    };
    let (dir, manifest, unchanged) = seal_into(work, manifest, out)?;
    Ok(Built {
        dir,
        manifest,
        kmeans,
        index,
        unchanged,
    })
}

/// A fresh build directory inside `out` (removed unless [`seal_into`] keeps it).
pub fn build_dir(out: &Path) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".dg-build-")
        .tempdir_in(out)
        .with_context(|| format!("creating a build directory in {}", out.display()))
}

/// What every shard of a build shares.
pub struct ShardSettings<'a> {
    pub dims: usize,
    pub model_id: &'a str,
    pub seed: u64,
    /// The dg's BM25 statistics, written into every shard.
    pub lexical: &'a CorpusStats,
    /// Shards indexed at once.
    pub parallel: usize,
}

/// Index the shards `todo` into `dir` (`shard-<s>.lmdb`), `settings.parallel` at once,
/// shard `s` from the clusters `clusters_of(s)` gives; their manifest entries, by shard.
pub fn index_shards<'t>(
    dir: &Path,
    todo: &[usize],
    settings: &ShardSettings,
    clusters_of: impl Fn(usize) -> Vec<ClusterItems<'t>> + Sync,
) -> anyhow::Result<Vec<ShardEntry>> {
    let bar = Progress::new("indexing", todo.len() as u64);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<anyhow::Result<ShardEntry>>>> =
        todo.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..settings.parallel.clamp(1, todo.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&s) = todo.get(i) else {
                    break;
                };
                let clusters = clusters_of(s);
                let items: usize = clusters.iter().map(|c| c.items.len()).sum();
                let path = dir.join(shard_file_name(s));
                let entry = build_shard(
                    &path,
                    s as u32,
                    settings.dims,
                    settings.model_id,
                    &clusters,
                    BuildParams {
                        seed: settings.seed,
                    },
                    Some(settings.lexical),
                )
                .map_err(anyhow::Error::from)
                .and_then(|()| shard_entry(&path, s, items as u64));
                *results[i].lock().unwrap() = Some(entry);
                bar.inc(1);
                tracing::info!(shard = s, done = i + 1, of = todo.len(), "shard indexed");
            });
        }
    });
    drop(bar);
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every shard was built"))
        .collect()
}

/// The manifest entry of the shard file at `path`.
pub fn shard_entry(path: &Path, s: usize, items: u64) -> anyhow::Result<ShardEntry> {
    Ok(ShardEntry {
        shard: s as u32,
        sha256: sha256_file(path).with_context(|| format!("reading {}", path.display()))?,
        size: std::fs::metadata(path)?.len(),
        items,
    })
}

/// Seal `manifest`, write it into the build directory `work` (which holds the shard files
/// and centroids) and move that to `<out>/<dg>/`, unless the same dg is already there.
/// Returns the directory, the sealed manifest and whether it was already there.
pub fn seal_into(
    work: tempfile::TempDir,
    manifest: Manifest,
    out: &Path,
) -> anyhow::Result<(PathBuf, Manifest, bool)> {
    let manifest = manifest.seal();
    let json = serde_json::to_vec_pretty(&manifest)?;
    if json.len() > simq_contract::kv::KV_VALUE_LIMIT {
        bail!(
            "manifest is {} bytes, over Consul's 512 KB value limit: use fewer clusters",
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
    Ok((dir, manifest, unchanged))
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
        // Files of an older simq-indexer do not open (format version) or have no lexical
        // index (the light contour): build again. An incremental build (base) keeps
        // another dg's centroids: not what a full build would give.
        let complete = (0..m.shards.len()).all(|s| {
            simq_shard::ShardFile::open(&dir.join(shard_file_name(s)))
                .is_ok_and(|f| f.meta().lexical.is_some())
        }) && dir.join(CENTROIDS_FILE).is_file();
        if complete
            && m.validate().is_ok()
            && m.model_id == model_id
            && m.build.base.is_none()
            && m.build.corpus_sha256 == corpus_sha256
            && m.build.clusters_requested == opts.clusters
            && m.build.seed == opts.seed
            && m.shards.len() == opts.shards
        {
            return Some((dir, m));
        }
    }
    None
}

/// The centroid bytes inside a dg directory (published to KV in chunks).
pub const CENTROIDS_FILE: &str = "centroids.f32";

/// Fine clusters hold at least about this many items (small corpora get fewer clusters).
const MIN_CLUSTER_ITEMS: usize = 16;

/// Where every item goes: the fine clusters, their shards and centroids.
struct ClusterPlan {
    /// Item ids of each fine cluster, cluster numbers in shard order.
    members: Vec<Vec<u32>>,
    shard_of: Vec<u32>,
    map: CentroidMap,
    coarse_iterations: usize,
}

/// Two-level k-means: `opts.shards` groups, then each group into fine clusters in
/// proportion to its size (at least one). Empty fine clusters are dropped.
fn cluster(vectors: &[f32], dims: usize, opts: &BuildOptions) -> anyhow::Result<ClusterPlan> {
    let n = vectors.len() / dims;
    // One unit for the split into shards, one per shard's fine clusters.
    let bar = Progress::new("clustering", opts.shards as u64 + 1);
    let coarse = spherical_kmeans(
        vectors,
        dims,
        opts.shards,
        opts.seed,
        opts.kmeans_iterations,
    );
    tracing::info!(
        shards = opts.shards,
        iterations = coarse.iterations,
        "split into shards"
    );
    bar.inc(1);
    let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); opts.shards];
    for (id, &s) in coarse.assignment.iter().enumerate() {
        by_shard[s as usize].push(id as u32);
    }
    let mut members = Vec::new();
    let mut shard_of = Vec::new();
    let mut centroids = Vec::new();
    for (s, ids) in by_shard.iter().enumerate() {
        let share = (opts.clusters as f64 * ids.len() as f64 / n as f64).round() as usize;
        let k = share.clamp(1, (ids.len() / MIN_CLUSTER_ITEMS).max(1));
        let local: Vec<f32> = ids
            .iter()
            .flat_map(|&id| &vectors[id as usize * dims..(id as usize + 1) * dims])
            .copied()
            .collect();
        let fine = spherical_kmeans(
            &local,
            dims,
            k,
            opts.seed.wrapping_add(s as u64 + 1),
            opts.kmeans_iterations,
        );
        let mut groups: Vec<Vec<u32>> = vec![Vec::new(); k];
        for (i, &c) in fine.assignment.iter().enumerate() {
            groups[c as usize].push(ids[i]);
        }
        for (c, group) in groups.into_iter().enumerate() {
            if !group.is_empty() {
                members.push(group);
                shard_of.push(s as u32);
                centroids.extend_from_slice(&fine.centroids[c]);
            }
        }
        bar.inc(1);
        tracing::info!(
            shard = s,
            of = opts.shards,
            clusters = k,
            items = ids.len(),
            iterations = fine.iterations,
            "shard clustered"
        );
    }
    drop(bar);
    if members.len() > MAX_CLUSTERS {
        bail!("{} clusters; at most {MAX_CLUSTERS} (arroy index ids are u16): ask for fewer --clusters", members.len());
    }
    let map = CentroidMap::new(dims, centroids, shard_of.clone()).map_err(anyhow::Error::msg)?;
    Ok(ClusterPlan {
        members,
        shard_of,
        map,
        coarse_iterations: coarse.iterations,
    })
}

/// File name of shard `s` inside a dg directory.
pub fn shard_file_name(s: usize) -> String {
    format!("shard-{s}.lmdb")
}
