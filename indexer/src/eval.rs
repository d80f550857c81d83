//! `indexer eval`: recall@k of the sharded ANN path (probe the `nprobe` nearest fine
//! clusters with the balancer's routing rule, search them in their shards, merge) against
//! exact brute-force search over
//! every stored vector, on queries drawn from the indexed items themselves (each query's
//! own item is left out of both answers, so the measure is about its true neighbours).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use rayon::prelude::*;
use simq_contract::{CentroidMap, Manifest};
use simq_shard::ShardFile;
use simq_vector::dot;

use crate::build::{shard_file_name, CENTROIDS_FILE};
use crate::publish::read_manifest;

/// A built dg directory: its manifest and open shard files.
pub struct DgDir {
    pub manifest: Manifest,
    pub map: CentroidMap,
    pub shards: Vec<ShardFile>,
}

impl DgDir {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let (manifest, _) = read_manifest(dir)?;
        let map = read_centroids(dir, &manifest)?;
        let shards = (0..manifest.shards.len())
            .map(|s| ShardFile::open(&dir.join(shard_file_name(s))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            manifest,
            map,
            shards,
        })
    }

    /// Every stored item, in id order.
    pub fn items(&self) -> anyhow::Result<Vec<Item>> {
        let mut items = Vec::new();
        for (shard, file) in self.shards.iter().enumerate() {
            items.extend(
                file.vectors()?
                    .into_iter()
                    .map(|(id, cluster, vector)| Item {
                        id,
                        shard,
                        cluster,
                        vector,
                    }),
            );
        }
        items.sort_by_key(|item| item.id);
        Ok(items)
    }
}

/// One stored item of a dg.
pub struct Item {
    pub id: u32,
    /// Index of the shard file that holds it.
    pub shard: usize,
    pub cluster: u32,
    pub vector: Vec<f32>,
}

/// `n` items spread evenly over `items` (every k-th): the queries of `eval` and of the
/// search benchmark.
pub fn sample(items: &[Item], n: usize) -> Vec<&Item> {
    let step = (items.len() / n.max(1)).max(1);
    items.iter().step_by(step).take(n).collect()
}

/// The centroid map of a built dg directory, checked against its manifest.
pub fn read_centroids(dir: &Path, manifest: &Manifest) -> anyhow::Result<CentroidMap> {
    let path = dir.join(CENTROIDS_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    CentroidMap::from_bytes(manifest, &bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// One row of the recall table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecallRow {
    /// Fine clusters probed per query.
    pub nprobe: usize,
    /// Mean share of the corpus a query searched.
    pub scanned: f64,
    /// Mean shards asked per query.
    pub shards: f64,
    pub recall: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
}

/// Measure recall@k for every nprobe on `queries` items.
pub fn recall(
    dg: &DgDir,
    queries: usize,
    k: usize,
    nprobes: &[usize],
) -> anyhow::Result<Vec<RecallRow>> {
    let all = dg.items()?;
    let mut cluster_items = vec![0u64; dg.map.clusters()];
    for item in &all {
        cluster_items[item.cluster as usize] += 1;
    }
    let sample = sample(&all, queries);

    // Exact neighbours, self excluded.
    let truth: Vec<Vec<u32>> = sample
        .par_iter()
        .map(|query| {
            let mut scored: Vec<(u32, f32)> = all
                .iter()
                .filter(|item| item.id != query.id)
                .map(|item| (item.id, dot(&item.vector, &query.vector)))
                .collect();
            let kth = k.min(scored.len());
            scored.select_nth_unstable_by(kth.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
            scored.truncate(kth);
            scored.into_iter().map(|(id, _)| id).collect()
        })
        .collect();

    let mut rows = Vec::new();
    for &nprobe in nprobes {
        let mut hits = 0usize;
        let mut scanned = 0u64;
        let mut shards_asked = 0usize;
        let mut times = Vec::with_capacity(sample.len());
        for (query, truth) in sample.iter().zip(&truth) {
            let (qid, q) = (&query.id, &query.vector);
            let t = Instant::now();
            let plan = dg.map.plan(q, nprobe, |_| true);
            let mut found = Vec::new();
            for (s, clusters) in &plan.shards {
                scanned += clusters
                    .iter()
                    .map(|&c| cluster_items[c as usize])
                    .sum::<u64>();
                found.extend(dg.shards[*s as usize].search(q, k + 1, clusters)?);
            }
            shards_asked += plan.shards.len();
            found.sort_by(|a, b| b.score.total_cmp(&a.score));
            let answer: Vec<u32> = found
                .iter()
                .map(|h| h.id)
                .filter(|id| id != qid)
                .take(k)
                .collect();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            hits += answer.iter().filter(|id| truth.contains(id)).count();
        }
        times.sort_by(f64::total_cmp);
        let queries = sample.len() as f64;
        rows.push(RecallRow {
            nprobe,
            scanned: scanned as f64 / queries / all.len() as f64,
            shards: shards_asked as f64 / queries,
            recall: hits as f64 / (sample.len() * k) as f64,
            mean_ms: times.iter().sum::<f64>() / times.len() as f64,
            p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)],
        });
    }
    Ok(rows)
}

/// Write every item of a built dg in id order: `vectors.f32` (little-endian f32 rows) and
/// `texts.txt` (one text per line), so that another system (the benchmark's peer, an exact
/// search) can index exactly the same items. Returns the item count.
pub fn export(dg: &DgDir, out: &Path) -> anyhow::Result<usize> {
    use std::io::Write;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let items = dg.items()?;
    let mut vectors = std::io::BufWriter::new(std::fs::File::create(out.join("vectors.f32"))?);
    let mut texts = std::io::BufWriter::new(std::fs::File::create(out.join("texts.txt"))?);
    for Item {
        id, shard, vector, ..
    } in &items
    {
        for x in vector {
            vectors.write_all(&x.to_le_bytes())?;
        }
        let text = dg.shards[*shard]
            .text(*id)?
            .with_context(|| format!("item {id} has no text"))?;
        writeln!(texts, "{}", text.replace('\n', " "))?;
    }
    vectors.flush()?;
    texts.flush()?;
    Ok(items.len())
}
