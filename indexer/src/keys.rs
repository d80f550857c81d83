//! `simq-indexer keys create|list|revoke`: API keys for balancers run with
//! `--api-keys required`. Consul KV gets the record (`simq_contract::apikeys`: the key's
//! SHA-256, never the key); the key itself is printed once, at creation, and nowhere else.

use std::io::Read;

use anyhow::{bail, Context};
use simq_consul::ConsulClient;
use simq_contract::apikeys::{self, ApiKeyRecord};
use simq_contract::KvLayout;
use simq_contract::Record;

/// What a new key may do.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub label: String,
    pub rate: f64,
    pub burst: u32,
    pub admin: bool,
}

/// Create a key: random id and secret from the OS, record written only if no key has
/// that id (CAS on a missing key). Returns the key (to print once) and its record.
pub async fn create(
    consul: &ConsulClient,
    layout: &KvLayout,
    new: &NewKey,
) -> anyhow::Result<(String, ApiKeyRecord)> {
    for _ in 0..4 {
        let mut bytes = [0u8; 20];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("reading random bytes from /dev/urandom")?;
        let key = apikeys::key_from_bytes(
            bytes[..4].try_into().expect("4 bytes"),
            bytes[4..].try_into().expect("16 bytes"),
        );
        let record = ApiKeyRecord {
            id: apikeys::key_id(&key)
                .expect("a made key has an id")
                .to_string(),
            label: new.label.clone(),
            sha256: apikeys::hash_key(&key),
            created_at: crate::flip::now_rfc3339(),
            rate: new.rate,
            burst: new.burst,
            admin: new.admin,
        };
        record.validate().map_err(anyhow::Error::msg)?;
        let value = serde_json::to_vec_pretty(&record)?;
        if consul
            .kv_cas(&layout.api_key(&record.id), &value, 0)
            .await?
        {
            return Ok((key, record));
        }
        // An id already taken (1 in 4 billion per existing key): draw again.
    }
    bail!(
        "could not find a free key id in 4 draws; is {} writable?",
        layout.api_keys()
    )
}

/// Every key record, in id order, and the entries under the prefix that are not records.
pub async fn list(
    consul: &ConsulClient,
    layout: &KvLayout,
) -> anyhow::Result<(Vec<ApiKeyRecord>, Vec<String>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for kv in consul.kv_list(&layout.api_keys(), None).await?.value {
        match ApiKeyRecord::decode(&kv.key, &kv.value) {
            Ok(r) => good.push(r),
            Err(e) => bad.push(e.to_string()),
        }
    }
    good.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((good, bad))
}

/// Delete key `id`; an error when there is no such key (a typo must not look like success).
pub async fn revoke(consul: &ConsulClient, layout: &KvLayout, id: &str) -> anyhow::Result<()> {
    if !apikeys::is_key_id(id) {
        bail!("{id:?} is not a key id (8 lowercase hex digits, as keys list shows them)");
    }
    let key = layout.api_key(id);
    if consul.kv_get(&key, None).await?.value.is_none() {
        bail!("no API key with id {id} (keys list shows the ids)");
    }
    consul.kv_delete(&key).await?;
    Ok(())
}
