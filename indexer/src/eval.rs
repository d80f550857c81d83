//! `indexer eval`: recall@k of the sharded ANN path (route to the `nprobe` nearest
//! centroids, arroy search in those shards, merge) against exact brute-force search over
//! every stored vector, on queries drawn from the indexed items themselves (each query's
//! own item is left out of both answers, so the measure is about its true neighbours).

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use simq_consul::Manifest;
use simq_shard::ShardFile;

use crate::build::shard_file_name;
use crate::publish::read_manifest;

/// A built dg directory: its manifest and open shard files.
pub struct DgDir {
    pub manifest: Manifest,
    pub shards: Vec<ShardFile>,
}

impl DgDir {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let (manifest, _) = read_manifest(dir)?;
        let shards = (0..manifest.shards.len())
            .map(|s| ShardFile::open(&dir.join(shard_file_name(s))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { manifest, shards })
    }
}

/// One row of the recall table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecallRow {
    pub nprobe: usize,
    /// arroy search_k; 0 means arroy's default (k * n_trees).
    pub search_k: usize,
    pub recall: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
}

/// Measure recall@k for every (nprobe, search_k) pair on `queries` items.
pub fn recall(
    dg: &DgDir,
    queries: usize,
    k: usize,
    nprobes: &[usize],
    search_ks: &[usize],
) -> anyhow::Result<Vec<RecallRow>> {
    let mut all: Vec<(u32, Vec<f32>)> = Vec::new();
    for shard in &dg.shards {
        all.extend(shard.vectors()?);
    }
    all.sort_by_key(|(id, _)| *id);
    let step = (all.len() / queries.max(1)).max(1);
    let sample: Vec<&(u32, Vec<f32>)> = all.iter().step_by(step).take(queries).collect();

    // Exact neighbours, self excluded.
    let truth: Vec<Vec<u32>> = sample
        .par_iter()
        .map(|(qid, q)| {
            let mut scored: Vec<(u32, f32)> = all
                .iter()
                .filter(|(id, _)| id != qid)
                .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum()))
                .collect();
            let kth = k.min(scored.len());
            scored.select_nth_unstable_by(kth.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
            scored.truncate(kth);
            scored.into_iter().map(|(id, _)| id).collect()
        })
        .collect();

    let mut rows = Vec::new();
    for &nprobe in nprobes {
        for &search_k in search_ks {
            let mut hits = 0usize;
            let mut times = Vec::with_capacity(sample.len());
            for ((qid, q), truth) in sample.iter().zip(&truth) {
                let t = Instant::now();
                let mut found = Vec::new();
                for s in dg.manifest.route(q, nprobe) {
                    let sk = (search_k > 0).then_some(search_k);
                    found.extend(dg.shards[s].search(q, k + 1, sk)?);
                }
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
            rows.push(RecallRow {
                nprobe,
                search_k,
                recall: hits as f64 / (sample.len() * k) as f64,
                mean_ms: times.iter().sum::<f64>() / times.len() as f64,
                p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)],
            });
        }
    }
    Ok(rows)
}
