//! Fixtures for the balancer's unit tests: a small index generation over 2 dims.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use simq_contract::kv::{BuildInfo, ClusterTable, ShardEntry, MANIFEST_FORMAT};
use simq_contract::{ActiveDg, CentroidMap, Manifest};

use crate::state::ActiveIndex;

/// Cluster centroids in 2 dims and their shards: 0 = +x (shard 0), 1 = +y (shard 1),
/// 2 = diagonal (shard 0), 3 = -x (shard 1).
pub const CLUSTERS: [([f32; 2], u32); 4] = [
    ([1.0, 0.0], 0),
    ([0.0, 1.0], 1),
    (
        [
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
        ],
        0,
    ),
    ([-1.0, 0.0], 1),
];

/// An active index of two shards and four clusters (see [`CLUSTERS`]) of `model`.
pub fn two_shard_index(model: &str) -> ActiveIndex {
    let centroids: Vec<f32> = CLUSTERS.iter().flat_map(|(c, _)| *c).collect();
    let shard_of: Vec<u32> = CLUSTERS.iter().map(|(_, s)| *s).collect();
    let map = CentroidMap::new(2, centroids, shard_of.clone()).unwrap();
    let shard = |n: u32| ShardEntry {
        shard: n,
        sha256: format!("sha-{n}"),
        size: 1,
        items: 2,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        dg: String::new(),
        model_id: model.into(),
        dims: 2,
        distance: "cosine".into(),
        items: 4,
        build: BuildInfo {
            corpus_sha256: hex::encode(Sha256::digest(model)),
            seed: 1,
            kmeans_iterations: 1,
            clusters_requested: 4,
            base: None,
        },
        clusters: ClusterTable {
            shard_of,
            centroids_sha256: map.sha256(),
            centroid_chunks: 1,
        },
        shards: vec![shard(0), shard(1)],
    }
    .seal();
    assert_eq!(manifest.validate(), Ok(()));
    ActiveIndex {
        active: ActiveDg {
            dg: manifest.dg.clone(),
            previous: None,
            flipped_at: "t".into(),
        },
        manifest: Arc::new(manifest),
        map: Arc::new(map),
    }
}
