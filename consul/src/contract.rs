//! simq's KV contract: the index generation manifest, the active pointer, and where both
//! live in Consul (prefix configurable, default `simq/`).
//!
//! - `<prefix>dg/<dg>/manifest`: a [`Manifest`] as JSON (kept under Consul's 512 KB cap).
//! - `<prefix>active`: an [`ActiveDg`] as JSON, only ever written by check-and-set.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The content address of a file: its hex sha256, streamed. Blob names, shard checksums
/// and model file pins are all this.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// Consul caps KV values at 512 KB; a manifest must fit.
pub const KV_VALUE_LIMIT: usize = 512 * 1024;

/// One shard of an index generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Shard number, 0-based, also the row of its centroid.
    pub shard: u32,
    /// sha256 of the shard file: its content address and blob name.
    pub sha256: String,
    /// Bytes of the shard file.
    pub size: u64,
    /// Items (queries) in the shard.
    pub items: u64,
}

/// How the generation was built (recorded so a build can be reproduced and compared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// sha256 of the de-duplicated corpus texts, in order.
    pub corpus_sha256: String,
    pub n_trees: usize,
    pub seed: u64,
    pub kmeans_iterations: usize,
}

/// An index generation ("dg"): everything a balancer needs to route, and everything a
/// shard needs to verify its file. Its id is a content address of the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `dg-<first 16 hex of the sha256 of this manifest with dg = "">`.
    pub dg: String,
    /// Model id of the embedder that made the vectors; queries must use the same.
    pub model_id: String,
    pub dims: usize,
    /// Always "cosine".
    pub distance: String,
    pub items: u64,
    pub build: BuildInfo,
    /// One L2-normalised centroid per shard, row i for shard i.
    pub centroids: Vec<Vec<f32>>,
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// The content address of a manifest: a hash of its JSON with `dg` empty.
    pub fn content_id(&self) -> String {
        let mut anonymous = self.clone();
        anonymous.dg = String::new();
        let bytes = serde_json::to_vec(&anonymous).expect("manifest serialises");
        format!("dg-{}", &hex::encode(Sha256::digest(&bytes))[..16])
    }

    /// Set `dg` to the content address.
    pub fn seal(mut self) -> Self {
        self.dg = self.content_id();
        self
    }

    /// The `nprobe` shards whose centroids are nearest to `vector` (highest dot product
    /// first; ties go to the lower shard number). The one routing rule of simq.
    pub fn route(&self, vector: &[f32], nprobe: usize) -> Vec<usize> {
        let mut scored: Vec<(usize, f32)> = self
            .centroids
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.iter().zip(vector).map(|(a, b)| a * b).sum()))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored
            .into_iter()
            .take(nprobe.max(1))
            .map(|(i, _)| i)
            .collect()
    }

    /// Check the invariants a reader relies on; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} (this build reads {MANIFEST_FORMAT})",
                self.format
            ));
        }
        if self.dg != self.content_id() {
            return Err(format!(
                "dg {} does not match the manifest's content ({})",
                self.dg,
                self.content_id()
            ));
        }
        if self.shards.is_empty() || self.centroids.len() != self.shards.len() {
            return Err(format!(
                "{} centroids for {} shards",
                self.centroids.len(),
                self.shards.len()
            ));
        }
        if let Some(c) = self.centroids.iter().position(|c| c.len() != self.dims) {
            return Err(format!(
                "centroid {c} has {} dims, expected {}",
                self.centroids[c].len(),
                self.dims
            ));
        }
        if let Some(s) = self
            .shards
            .iter()
            .enumerate()
            .find(|(i, s)| s.shard as usize != *i)
        {
            return Err(format!("shard entry {} is numbered {}", s.0, s.1.shard));
        }
        Ok(())
    }
}

/// The active pointer: which dg answers queries, and which one it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDg {
    pub dg: String,
    pub previous: Option<String>,
    /// RFC 3339 time of the flip.
    pub flipped_at: String,
}

/// "dg-b (previous dg-a)", or "dg-b (no previous dg)": how the CLI reports a pointer.
impl std::fmt::Display for ActiveDg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.previous {
            Some(p) => write!(f, "{} (previous {p})", self.dg),
            None => write!(f, "{} (no previous dg)", self.dg),
        }
    }
}

/// Where simq's keys live in Consul KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    prefix: String,
}

impl Default for KvLayout {
    fn default() -> Self {
        Self::new("simq/")
    }
}

impl KvLayout {
    /// Keys under `prefix` (a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn active(&self) -> String {
        format!("{}active", self.prefix)
    }

    pub fn manifest(&self, dg: &str) -> String {
        format!("{}dg/{dg}/manifest", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            dg: String::new(),
            model_id: "m-1".into(),
            dims: 2,
            distance: "cosine".into(),
            items: 3,
            build: BuildInfo {
                corpus_sha256: "c".into(),
                n_trees: 4,
                seed: 1,
                kmeans_iterations: 3,
            },
            centroids: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            shards: vec![
                ShardEntry {
                    shard: 0,
                    sha256: "a".into(),
                    size: 1,
                    items: 2,
                },
                ShardEntry {
                    shard: 1,
                    sha256: "b".into(),
                    size: 1,
                    items: 1,
                },
            ],
        }
        .seal()
    }

    #[test]
    fn dg_id_is_a_content_address() {
        let m = manifest();
        assert!(m.dg.starts_with("dg-") && m.dg.len() == 19);
        assert_eq!(m.validate(), Ok(()));
        let mut other = m.clone();
        other.shards[1].sha256 = "changed".into();
        assert_ne!(other.content_id(), m.dg);
        assert!(other.validate().unwrap_err().contains("does not match"));
    }

    #[test]
    fn centroid_count_must_match_shards() {
        let mut m = manifest();
        m.centroids.pop();
        let m = m.seal();
        assert_eq!(m.validate().unwrap_err(), "1 centroids for 2 shards");
    }

    #[test]
    fn route_picks_nearest_centroids_first() {
        let m = manifest();
        assert_eq!(m.route(&[0.1, 0.9], 1), vec![1]);
        assert_eq!(m.route(&[0.9, 0.1], 2), vec![0, 1]);
        assert_eq!(
            m.route(&[0.5, 0.5], 1),
            vec![0],
            "ties go to the lower shard"
        );
        assert_eq!(m.route(&[0.5, 0.5], 0), vec![0], "at least one shard");
    }

    #[test]
    fn layout_keys_use_the_prefix() {
        assert_eq!(KvLayout::default().active(), "simq/active");
        assert_eq!(KvLayout::new("x").manifest("dg-1"), "x/dg/dg-1/manifest");
    }
}
