//! Spherical k-means with k-means++ seeding and a fixed seed: splits L2-normalised vectors
//! into shards by direction, and each shard into fine clusters. Deterministic: the same vectors and seed give the same
//! centroids and assignment (assignment runs in parallel, sums run in a fixed order).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
/// The outcome of a k-means run.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// `k` unit vectors.
    pub centroids: Vec<Vec<f32>>,
    /// Cluster of each input vector.
    pub assignment: Vec<u32>,
    /// Lloyd iterations run (stops early when no assignment changes).
    pub iterations: usize,
}

use simq_vector::dot;

fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Index of the centroid with the highest dot product (ties: the lowest index).
pub fn nearest(centroids: &[Vec<f32>], v: &[f32]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, c) in centroids.iter().enumerate() {
        let s = dot(c, v);
        if s > best.1 {
            best = (i, s);
        }
    }
    best.0
}

/// Cluster `vectors` (`n * dims` floats, unit rows) into `k` groups.
pub fn spherical_kmeans(
    vectors: &[f32],
    dims: usize,
    k: usize,
    seed: u64,
    max_iterations: usize,
) -> Clustering {
    let n = vectors.len() / dims;
    assert!(
        k >= 1 && n >= k,
        "k-means needs at least k={k} vectors, got {n}"
    );
    let row = |i: usize| &vectors[i * dims..(i + 1) * dims];
    let mut rng = StdRng::seed_from_u64(seed);

    // k-means++: each next seed is drawn with probability proportional to its squared
    // distance to the nearest seed so far (|a-b|^2 = 2 - 2 a.b for unit vectors).
    let mut centroids: Vec<Vec<f32>> = vec![row(rng.random_range(0..n)).to_vec()];
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| (2.0 - 2.0 * dot(row(i), &centroids[0])).max(0.0))
        .collect();
    while centroids.len() < k {
        let total: f64 = d2.iter().map(|&d| d as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut chosen = n - 1;
            for (i, &d) in d2.iter().enumerate() {
                target -= d as f64;
                if target <= 0.0 && d > 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.random_range(0..n)
        };
        let c = row(pick).to_vec();
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = d.min((2.0 - 2.0 * dot(row(i), &c)).max(0.0)));
        centroids.push(c);
    }

    let mut assignment = vec![u32::MAX; n];
    let mut iterations = 0;
    while iterations < max_iterations {
        iterations += 1;
        let next: Vec<u32> = (0..n)
            .into_par_iter()
            .map(|i| nearest(&centroids, row(i)) as u32)
            .collect();
        let changed = next != assignment;
        assignment = next;
        if !changed {
            break;
        }
        let mut sums = vec![vec![0f32; dims]; k];
        let mut counts = vec![0usize; k];
        for (i, &a) in assignment.iter().enumerate() {
            counts[a as usize] += 1;
            sums[a as usize]
                .iter_mut()
                .zip(row(i))
                .for_each(|(s, x)| *s += x);
        }
        for c in 0..k {
            if counts[c] == 0 {
                // An empty cluster takes the point farthest from its own centroid.
                let far = (0..n)
                    .max_by(|&a, &b| {
                        let da = 1.0 - dot(row(a), &centroids[assignment[a] as usize]);
                        let db = 1.0 - dot(row(b), &centroids[assignment[b] as usize]);
                        da.total_cmp(&db).then(b.cmp(&a))
                    })
                    .expect("n >= k >= 1");
                sums[c] = row(far).to_vec();
            }
            normalize(&mut sums[c]);
        }
        centroids = sums;
    }
    Clustering {
        centroids,
        assignment,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around three well-separated directions in 8 dims.
    fn blobs(per: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(9);
        let mut out = Vec::new();
        for axis in 0..3 {
            for _ in 0..per {
                let mut v: Vec<f32> = (0..8).map(|_| (rng.random::<f32>() - 0.5) * 0.2).collect();
                v[axis] += 1.0;
                normalize(&mut v);
                out.extend(v);
            }
        }
        out
    }

    #[test]
    fn separates_clear_clusters() {
        let v = blobs(50);
        let c = spherical_kmeans(&v, 8, 3, 1, 25);
        for blob in 0..3 {
            let a = c.assignment[blob * 50];
            assert!(
                c.assignment[blob * 50..(blob + 1) * 50]
                    .iter()
                    .all(|&x| x == a),
                "blob {blob} split"
            );
        }
        let mut distinct = c.assignment.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        assert!(c.iterations < 25);
        for cen in &c.centroids {
            assert!((dot(cen, cen) - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn same_seed_same_result() {
        let v = blobs(40);
        assert_eq!(
            spherical_kmeans(&v, 8, 4, 5, 25),
            spherical_kmeans(&v, 8, 4, 5, 25)
        );
    }
}
