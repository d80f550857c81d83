//! The one routing rule of simq: a query vector probes the `nprobe` clusters whose
//! centroids are nearest, and each shard is asked for the probed clusters it holds.
//! Used by the balancer on every query and by `indexer eval` to measure recall.
//!
//! The centroids of a dg are too big for one Consul value (1024 clusters x 384 dims x 4
//! bytes = 1.5 MiB), so they travel as raw little-endian f32 bytes cut into chunks
//! (`KvLayout::centroid_chunk`), pinned by their sha256 in the manifest.

use sha2::{Digest, Sha256};

use simq_vector::{dot, dot_i8, quantize};

use crate::kv::Manifest;

/// Bytes per centroid chunk in KV, well under Consul's 512 KB value cap.
pub const CENTROID_CHUNK_BYTES: usize = 256 * 1024;

/// Clusters [`CentroidMap::nearest`] re-scores exactly beyond the `m` it returns: half of
/// `m` plus this many. The int8 scores of two centroids differ from their exact order
/// only when they are within about 0.001 of each other; the cluster ranked `m` and the one
/// ranked `1.5 m + 16` are far further apart (0.01 for 192 of 4096 random unit vectors in
/// 384 dims; real centroids spread wider).
const SHORTLIST_SLACK: usize = 16;

/// The centroids of a dg and the shard of each cluster: everything needed to route.
#[derive(Debug, Clone, PartialEq)]
pub struct CentroidMap {
    dims: usize,
    /// `clusters x dims`, row-major.
    centroids: Vec<f32>,
    /// The centroids as int8 codes (stored as bytes, row-major) and one scale per row: a
    /// query reads these (1.5 MiB for 4096 x 384) to shortlist clusters, and the f32 rows
    /// (6 MiB) only of the shortlist. Reading all f32 rows took 0.13 ms per query with
    /// them in the CPU cache and 0.29 ms without (`cargo run --release -p simq-contract
    /// --example route_bench`).
    codes: Vec<u8>,
    scales: Vec<f32>,
    shard_of: Vec<u32>,
    /// Shards the clusters live in: 1 + the highest shard number.
    shards: u32,
}

/// Which clusters to ask each shard for, and what had to be routed around.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbePlan {
    /// (shard, its probed clusters nearest first), shards in order of their nearest cluster.
    pub shards: Vec<(u32, Vec<u32>)>,
    /// Shards that held one of the `nprobe` nearest clusters but could not be asked; their
    /// clusters were replaced by the next-nearest clusters of shards that can.
    pub skipped: Vec<u32>,
}

impl ProbePlan {
    /// True when the plan is not the one a fully healthy dg would give.
    pub fn degraded(&self) -> bool {
        !self.skipped.is_empty()
    }
}

impl CentroidMap {
    /// A map from rows of centroids; `centroids.len()` must be `shard_of.len() * dims`.
    pub fn new(
        dims: usize,
        centroids: Vec<f32>,
        shard_of: Vec<u32>,
    ) -> Result<Self, crate::Invalid> {
        if dims == 0 || centroids.len() != shard_of.len() * dims {
            return Err(format!(
                "{} centroid floats for {} clusters of {dims} dims",
                centroids.len(),
                shard_of.len()
            )
            .into());
        }
        if centroids.iter().any(|x| !x.is_finite()) {
            return Err("a centroid has a NaN or infinite component".into());
        }
        let shards = shard_of.iter().max().map_or(0, |&s| s + 1);
        let (mut codes, mut scales) = (Vec::with_capacity(centroids.len()), Vec::new());
        for row in centroids.chunks_exact(dims) {
            let q = quantize(row);
            codes.extend(q.codes.iter().map(|&c| c as u8));
            scales.push(q.scale);
        }
        Ok(Self {
            dims,
            centroids,
            codes,
            scales,
            shard_of,
            shards,
        })
    }

    /// The map of `manifest` from its centroid bytes (all chunks joined), checked against
    /// the manifest's sha256 and sizes.
    pub fn from_bytes(manifest: &Manifest, bytes: &[u8]) -> Result<Self, crate::Invalid> {
        let table = &manifest.clusters;
        let expected = table.shard_of.len() * manifest.dims * 4;
        if bytes.len() != expected {
            return Err(format!(
                "centroids of dg {} are {} bytes, the manifest needs {expected}",
                manifest.dg,
                bytes.len()
            )
            .into());
        }
        let sha = hex::encode(Sha256::digest(bytes));
        if sha != table.centroids_sha256 {
            return Err(format!(
                "centroids of dg {} have sha256 {sha}, the manifest pins {}",
                manifest.dg, table.centroids_sha256
            )
            .into());
        }
        let floats = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Self::new(manifest.dims, floats, table.shard_of.clone())
    }

    /// The centroid bytes as stored: little-endian f32, row-major.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.centroids
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    }

    /// sha256 of [`Self::to_bytes`], as the manifest pins it.
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.to_bytes()))
    }

    pub fn clusters(&self) -> usize {
        self.shard_of.len()
    }

    pub fn shard_of(&self, cluster: u32) -> u32 {
        self.shard_of[cluster as usize]
    }

    pub fn centroid(&self, cluster: usize) -> &[f32] {
        &self.centroids[cluster * self.dims..(cluster + 1) * self.dims]
    }

    /// Every cluster, nearest (highest dot product) first; ties go to the lower number.
    pub fn ranked(&self, vector: &[f32]) -> Vec<u32> {
        self.nearest(vector, self.clusters())
    }

    /// The `m` nearest clusters, nearest first (same order as [`Self::ranked`]).
    ///
    /// Two passes: every cluster scored by its int8 codes, then the best `1.5 m + 16` of
    /// those re-scored with their f32 centroids and the best `m` of them returned, ordered
    /// by the exact scores (see [`SHORTLIST_SLACK`] for why the shortlist holds the exact
    /// `m` nearest).
    pub fn nearest(&self, vector: &[f32], m: usize) -> Vec<u32> {
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let shortlist = m.saturating_add(m / 2).saturating_add(SHORTLIST_SLACK);
        let candidates: Vec<u32> = if shortlist < self.clusters() && vector.len() == self.dims {
            let query = quantize(vector);
            let mut approx: Vec<(u32, f32)> = self
                .codes
                .chunks_exact(self.dims)
                .zip(&self.scales)
                .enumerate()
                .map(|(i, (codes, scale))| (i as u32, dot_i8(codes, &query.codes) as f32 * scale))
                .collect();
            approx.select_nth_unstable_by(shortlist - 1, order);
            approx[..shortlist].iter().map(|&(i, _)| i).collect()
        } else {
            (0..self.clusters() as u32).collect()
        };
        let mut scored: Vec<(u32, f32)> = candidates
            .into_iter()
            .map(|i| (i, dot(self.centroid(i as usize), vector)))
            .collect();
        if m < scored.len() {
            scored.select_nth_unstable_by(m, order);
            scored.truncate(m);
        }
        scored.sort_unstable_by(order);
        scored.into_iter().map(|(i, _)| i).collect()
    }

    /// The probe plan for `vector`: the `nprobe` nearest clusters among shards that
    /// `can_ask`, grouped by shard. A shard that cannot be asked is skipped and its
    /// clusters are replaced by the next-nearest ones elsewhere.
    pub fn plan(&self, vector: &[f32], nprobe: usize, can_ask: impl Fn(u32) -> bool) -> ProbePlan {
        let nprobe = nprobe.clamp(1, self.clusters().max(1));
        let mut plan = ProbePlan::default();
        let mut taken = 0;
        // The nearest few suffice unless a shard has to be routed around.
        let all_askable = (0..self.shards).all(&can_ask);
        let candidates = if all_askable {
            self.nearest(vector, nprobe)
        } else {
            self.ranked(vector)
        };
        for (rank, cluster) in candidates.into_iter().enumerate() {
            if taken == nprobe {
                break;
            }
            let shard = self.shard_of(cluster);
            if !can_ask(shard) {
                if rank < nprobe && !plan.skipped.contains(&shard) {
                    plan.skipped.push(shard);
                }
                continue;
            }
            match plan.shards.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, clusters)) => clusters.push(cluster),
                None => plan.shards.push((shard, vec![cluster])),
            }
            taken += 1;
        }
        plan
    }
}

/// Cut centroid bytes into KV-sized chunks.
pub fn chunks(bytes: &[u8]) -> std::slice::Chunks<'_, u8> {
    bytes.chunks(CENTROID_CHUNK_BYTES)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Three unit clusters in 2 dims: x axis (shard 0), y axis (shard 1), diagonal (shard 0).
    pub(crate) fn centroid_bytes() -> Vec<u8> {
        let d = std::f32::consts::FRAC_1_SQRT_2;
        [1.0f32, 0.0, 0.0, 1.0, d, d]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    }

    fn map() -> CentroidMap {
        let m = crate::kv::tests::manifest();
        CentroidMap::from_bytes(&m, &centroid_bytes()).unwrap()
    }

    /// Random unit vectors: a deterministic stand-in for embeddings.
    fn unit_vectors(n: usize, dims: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n * dims);
        for _ in 0..n {
            let row: Vec<f32> = (0..dims)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            out.extend(row.iter().map(|v| v / norm));
        }
        out
    }

    #[test]
    fn the_int8_shortlist_gives_exactly_the_nearest_clusters() {
        let dims = 384;
        let map = CentroidMap::new(dims, unit_vectors(4096, dims, 7), vec![0; 4096]).unwrap();
        let queries = unit_vectors(100, dims, 11);
        for (i, q) in queries.chunks_exact(dims).enumerate() {
            let exact = map.ranked(q);
            for m in [1, 10, 192, 1000] {
                assert_eq!(map.nearest(q, m), exact[..m], "query {i}, m {m}");
            }
        }
        // More than the shortlist can skip: every cluster, exactly ranked.
        assert_eq!(
            map.nearest(&queries[..dims], 4096),
            map.ranked(&queries[..dims])
        );
    }

    #[test]
    fn clusters_rank_by_similarity_with_ties_to_the_lower_number() {
        let m = map();
        assert_eq!(m.ranked(&[1.0, 0.1]), vec![0, 2, 1]);
        assert_eq!(m.ranked(&[0.0, 1.0]), vec![1, 2, 0]);
        let tie = CentroidMap::new(1, vec![1.0, 1.0], vec![0, 0]).unwrap();
        assert_eq!(tie.ranked(&[1.0]), vec![0, 1]);
    }

    #[test]
    fn plan_groups_the_nearest_clusters_by_shard() {
        let m = map();
        let plan = m.plan(&[1.0, 0.1], 2, |_| true);
        assert_eq!(plan.shards, vec![(0, vec![0, 2])]);
        assert!(!plan.degraded());
        let plan = m.plan(&[1.0, 0.9], 3, |_| true);
        assert_eq!(plan.shards, vec![(0, vec![2, 0]), (1, vec![1])]);
        assert_eq!(m.plan(&[1.0, 0.0], 0, |_| true).shards, vec![(0, vec![0])]);
    }

    #[test]
    fn plan_routes_around_a_shard_that_cannot_be_asked() {
        let m = map();
        let plan = m.plan(&[1.0, 0.1], 2, |s| s != 0);
        assert_eq!(
            plan.shards,
            vec![(1, vec![1])],
            "next-nearest cluster elsewhere"
        );
        assert_eq!(plan.skipped, vec![0]);
        assert!(plan.degraded());
        // A shard that held none of the nearest clusters is not a degradation.
        let plan = m.plan(&[1.0, 0.1], 2, |s| s != 1);
        assert!(!plan.degraded());
        assert!(m.plan(&[1.0, 0.1], 2, |_| false).shards.is_empty());
    }

    #[test]
    fn centroid_bytes_are_checked_against_the_manifest() {
        let m = crate::kv::tests::manifest();
        let mut bytes = centroid_bytes();
        assert_eq!(map().to_bytes(), bytes);
        assert_eq!(map().sha256(), m.clusters.centroids_sha256);
        bytes[0] ^= 1;
        assert!(CentroidMap::from_bytes(&m, &bytes)
            .unwrap_err()
            .0
            .contains("the manifest pins"));
        assert!(CentroidMap::from_bytes(&m, &bytes[..8])
            .unwrap_err()
            .0
            .contains("8 bytes"));
    }
}
