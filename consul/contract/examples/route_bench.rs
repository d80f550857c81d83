//! What routing one query costs: `CentroidMap::nearest` (192 of 4096 centroids of 384
//! dims, the defaults), with the centroids in the CPU cache and pushed out of it between
//! queries (as the embedder's inference on the same cores does).
//!
//!     cargo run --release -p simq-contract --example route_bench
use std::time::Instant;

use simq_contract::CentroidMap;

fn main() {
    let (clusters, dims, nprobe) = (4096usize, 384usize, 576usize);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centroids: Vec<f32> = (0..clusters * dims).map(|_| random()).collect();
    let shard_of = (0..clusters as u32).map(|c| c % 2).collect();
    let map = CentroidMap::new(dims, centroids, shard_of).expect("a valid map");
    let queries: Vec<Vec<f32>> = (0..500)
        .map(|_| (0..dims).map(|_| random()).collect())
        .collect();
    let mut evict = vec![0u8; 64 << 20];
    for cold in [false, true] {
        let mut ms = Vec::new();
        for q in &queries {
            if cold {
                for i in (0..evict.len()).step_by(64) {
                    evict[i] = evict[i].wrapping_add(1);
                }
            }
            let started = Instant::now();
            std::hint::black_box(map.nearest(q, nprobe));
            ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let cache = if cold { "pushed out of" } else { "in" };
        println!(
            "nearest {nprobe} of {clusters} x {dims}, centroids {cache} the CPU cache: p50 {:.3} ms, p90 {:.3} ms",
            ms[ms.len() / 2],
            ms[ms.len() * 9 / 10]
        );
    }
}
