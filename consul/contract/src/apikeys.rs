//! API keys: what `simq-indexer keys` writes to Consul KV and what the balancer checks.
//!
//! A key reads `simq_<id>_<secret>`: `id` is 8 lowercase hex digits (public: it names the
//! key in logs, metrics and `keys list`), `secret` 32 hex digits (128 random bits). KV
//! holds one record per key under `<prefix>keys/<id>` with the SHA-256 of the whole key,
//! never the key itself. A random 128-bit secret needs no slow password hash: nobody can
//! search that space, so a fast hash compared in constant time is enough.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Characters of a key id and of its secret (hex digits).
pub const ID_HEX: usize = 8;
pub const SECRET_HEX: usize = 32;

/// One key as stored in KV (`<prefix>keys/<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyRecord {
    pub id: String,
    /// Who or what the key is for (free text, shown by `keys list`).
    pub label: String,
    /// SHA-256 of the whole key, lowercase hex.
    pub sha256: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Sustained queries per second this key may send (token bucket refill rate).
    pub rate: f64,
    /// Queries the key may send at once above the rate (bucket size).
    pub burst: u32,
    /// May also read `/metrics` and `/v1/status` on the public port.
    #[serde(default)]
    pub admin: bool,
}

impl ApiKeyRecord {
    /// Everything the balancer relies on; a record failing this is skipped and reported.
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if !is_key_id(&self.id) {
            return Err(format!("id {:?} is not {ID_HEX} lowercase hex digits", self.id).into());
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(is_lower_hex) {
            return Err("sha256 is not 64 lowercase hex digits".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(format!("rate {} is not a positive number", self.rate).into());
        }
        if self.burst == 0 {
            return Err("burst is 0: the key could never send a query".into());
        }
        if self.label.chars().count() > 200 || self.label.chars().any(char::is_control) {
            return Err("label is over 200 characters or has control characters".into());
        }
        Ok(())
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Is `id` a key id (8 lowercase hex digits)? Ids become KV keys: nothing else is.
pub fn is_key_id(id: &str) -> bool {
    id.len() == ID_HEX && id.bytes().all(is_lower_hex)
}

/// The id of a well-formed key (`simq_<id>_<secret>`), `None` for anything else.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("simq_")?;
    let (id, secret) = rest.split_once('_')?;
    (is_key_id(id) && secret.len() == SECRET_HEX && secret.bytes().all(is_lower_hex)).then_some(id)
}

/// The key made from 4 + 16 random bytes.
pub fn key_from_bytes(id: [u8; 4], secret: [u8; 16]) -> String {
    format!("simq_{}_{}", hex(&id), hex(&secret))
}

/// SHA-256 of a key, lowercase hex: what its record stores.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Does `key` hash to `sha256`? Compares every byte, so the time taken says nothing about
/// how much of a guess was right.
pub fn matches(key: &str, sha256: &str) -> bool {
    let got = hash_key(key);
    got.len() == sha256.len()
        && got
            .bytes()
            .zip(sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: key_id(key).unwrap().to_string(),
            label: "ci".into(),
            sha256: hash_key(key),
            created_at: "2026-11-24T00:00:00Z".into(),
            rate: 5.0,
            burst: 10,
            admin: false,
        }
    }

    #[test]
    fn a_key_names_its_id_and_matches_only_its_own_hash() {
        let key = key_from_bytes([0xde, 0xad, 0xbe, 0xef], [7; 16]);
        assert_eq!(key, format!("simq_deadbeef_{}", "07".repeat(16)));
        assert_eq!(key_id(&key), Some("deadbeef"));
        let r = record(&key);
        assert!(r.validate().is_ok());
        assert!(matches(&key, &r.sha256));
        let other = key_from_bytes([0xde, 0xad, 0xbe, 0xef], [8; 16]);
        assert!(!matches(&other, &r.sha256));
        assert!(!matches(&key, "00"));
    }

    #[test]
    fn malformed_keys_have_no_id() {
        for bad in [
            "",
            "simq_",
            "simq_deadbeef",
            "simq_deadbeef_short",
            "simq_DEADBEEF_00000000000000000000000000000000",
            "simq_../../x_00000000000000000000000000000000",
            "Bearer simq_deadbeef_00000000000000000000000000000000",
        ] {
            assert_eq!(key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_that_cannot_be_used_say_why() {
        let key = key_from_bytes([1, 2, 3, 4], [5; 16]);
        let mut r = record(&key);
        r.id = "../x".into();
        assert!(r.validate().unwrap_err().0.contains("not 8 lowercase hex"));
        let mut r = record(&key);
        r.rate = f64::NAN;
        assert!(r.validate().unwrap_err().0.contains("rate"));
        let mut r = record(&key);
        r.burst = 0;
        assert!(r.validate().unwrap_err().0.contains("burst"));
        let mut r = record(&key);
        r.sha256 = "xyz".into();
        assert!(r.validate().unwrap_err().0.contains("sha256"));
        assert!(serde_json::from_str::<ApiKeyRecord>(
            r#"{"id":"01020304","label":"","sha256":"","created_at":"","rate":1,"burst":1,"key":"leaked"}"#
        )
        .unwrap_err()
        .to_string()
        .contains("unknown field `key`"));
    }
}
