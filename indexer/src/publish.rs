//! `indexer publish`: shard files into the blob store by sha256, the manifest into Consul
//! KV. Idempotent: publishing the same dg again changes nothing and says so.

use std::path::Path;

use anyhow::{bail, Context};
use simq_consul::{ConsulClient, KvLayout, Manifest};

use crate::blobs::{BlobStore, Put};
use crate::build::shard_file_name;

/// What publishing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    pub dg: String,
    pub blobs_added: usize,
    pub blobs_present: usize,
    pub blobs_repaired: usize,
    /// False when Consul already held this exact manifest.
    pub manifest_written: bool,
}

impl PublishReport {
    /// True when nothing had to change.
    pub fn unchanged(&self) -> bool {
        self.blobs_added == 0 && self.blobs_repaired == 0 && !self.manifest_written
    }
}

/// Read and check a built dg's manifest.
pub fn read_manifest(dg_dir: &Path) -> anyhow::Result<(Manifest, Vec<u8>)> {
    let path = dg_dir.join("manifest.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a manifest", path.display()))?;
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
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
    };
    for entry in &manifest.shards {
        let file = dg_dir.join(shard_file_name(entry.shard as usize));
        match store.put(&file, &entry.sha256)? {
            Put::Added => report.blobs_added += 1,
            Put::Present => report.blobs_present += 1,
            Put::Repaired => report.blobs_repaired += 1,
        }
    }
    let key = layout.manifest(&manifest.dg);
    for _ in 0..3 {
        match consul.kv_get(&key, None).await?.value {
            Some(existing) => {
                let same = existing.value == bytes
                    || serde_json::from_slice::<Manifest>(&existing.value)
                        .map(|m| m == manifest)
                        .unwrap_or(false);
                if !same {
                    bail!("{key} holds a different manifest for the same dg id: the KV entry was edited by hand; delete it and publish again");
                }
                return Ok(report);
            }
            None => {
                // Create-only: a concurrent publisher of the same dg writes the same bytes.
                if consul.kv_cas(&key, &bytes, 0).await? {
                    report.manifest_written = true;
                    return Ok(report);
                }
            }
        }
    }
    bail!("could not write {key}: it kept changing under concurrent writers")
}
