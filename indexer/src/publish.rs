//! `indexer publish`: shard files into the blob store by sha256, the centroid chunks and
//! then the manifest into Consul KV. Idempotent: publishing the same dg again changes
//! nothing and says so. The manifest goes last, so a reader that finds it finds the rest.

use std::path::Path;

use anyhow::{bail, Context};
use simq_consul::ConsulClient;
use simq_contract::Record;
use simq_contract::{KvLayout, Manifest};

use crate::blobs::{BlobStore, Put};
use crate::build::shard_file_name;
use crate::eval::read_centroids;

/// What publishing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    pub dg: String,
    pub blobs_added: usize,
    pub blobs_present: usize,
    pub blobs_repaired: usize,
    /// False when Consul already held this exact manifest.
    pub manifest_written: bool,
    /// Centroid chunks written (0 when all were there).
    pub chunks_written: usize,
}

impl PublishReport {
    /// True when nothing had to change.
    pub fn unchanged(&self) -> bool {
        self.blobs_added == 0
            && self.blobs_repaired == 0
            && !self.manifest_written
            && self.chunks_written == 0
    }
}

/// Read and check a built dg's manifest.
pub fn read_manifest(dg_dir: &Path) -> anyhow::Result<(Manifest, Vec<u8>)> {
    let path = dg_dir.join("manifest.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest = Manifest::decode(&path.display().to_string(), &bytes)?;
    Ok((manifest, bytes))
}

pub async fn publish(
    dg_dir: &Path,
    store: &BlobStore,
    consul: &ConsulClient,
    layout: &KvLayout,
) -> anyhow::Result<PublishReport> {
    let (manifest, bytes) = read_manifest(dg_dir)?;
    let mut report = PublishReport {
        dg: manifest.dg.clone(),
        blobs_added: 0,
        blobs_present: 0,
        blobs_repaired: 0,
        manifest_written: false,
        chunks_written: 0,
    };
    for entry in &manifest.shards {
        let file = dg_dir.join(shard_file_name(entry.shard as usize));
        match store.put(&file, &entry.sha256).await? {
            Put::Added => report.blobs_added += 1,
            Put::Present => report.blobs_present += 1,
            Put::Repaired => report.blobs_repaired += 1,
        }
    }
    // The centroids are checked against the manifest before anything reaches Consul.
    let centroids = read_centroids(dg_dir, &manifest)?.to_bytes();
    for (i, chunk) in simq_contract::routing::chunks(&centroids).enumerate() {
        let key = layout.centroid_chunk(&manifest.dg, i);
        if put_once(consul, &key, chunk, |existing| existing == chunk).await? {
            report.chunks_written += 1;
        }
    }
    let key = layout.manifest(&manifest.dg);
    report.manifest_written = put_once(consul, &key, &bytes, |existing| {
        serde_json::from_slice::<Manifest>(existing).is_ok_and(|m| m == manifest)
    })
    .await?;
    Ok(report)
}

/// Create `key` with `bytes` unless it exists; an existing value must be `same`. True when
/// this call wrote it. Content-addressed keys never change, so a different value means a
/// hand edit.
async fn put_once(
    consul: &ConsulClient,
    key: &str,
    bytes: &[u8],
    same: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<bool> {
    for _ in 0..3 {
        match consul.kv_get(key, None).await?.value {
            Some(existing) => {
                if existing.value != bytes && !same(&existing.value) {
                    bail!("{key} holds a different value for the same dg id: the KV entry was edited by hand; delete it and publish again");
                }
                return Ok(false);
            }
            None => {
                // Create-only: a concurrent publisher of the same dg writes the same bytes.
                if consul.kv_cas(key, bytes, 0).await? {
                    return Ok(true);
                }
            }
        }
    }
    bail!("could not write {key}: it kept changing under concurrent writers")
}
