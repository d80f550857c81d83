//! simq-contract: what every simq component agrees on, with no I/O of its own. The
//! balancer, the shards, the embedders, the indexer and the job specs all read these
//! types; the Consul client (`simq-consul`) only moves their bytes.
//!
//! - [`kv`]: the index generation [`Manifest`], the [`ActiveDg`] pointer, and the KV key
//!   layout ([`KvLayout`]) under which Consul keeps them.
//! - [`routing`]: the one routing rule (nearest fine clusters, grouped by shard) and the
//!   centroid map it reads.
//! - [`traffic`]: the traffic split between the active dg and a candidate, and the rule
//!   that puts each user on an arm.
//! - [`apikeys`]: API keys: their format, their KV records (hashes, never keys) and the
//!   constant-time check.
//! - [`services`]: the Consul service names and the tags that tie an instance to a dg, a
//!   shard or a model.
//! - [`defaults`]: the index layout and search defaults (shards, clusters, nprobe) that
//!   the indexer, the job specs and the scripts take from one place.

pub mod apikeys;
pub mod defaults;
pub mod kv;
pub mod routing;
pub mod services;
pub mod traffic;

/// Why a value read from Consul, a file or a flag breaks the contract: one sentence naming
/// the field and the problem (`centroids: 1000 bytes, not a whole number of 384-dim
/// rows`). Every validator and parser of this crate returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl From<String> for Invalid {
    fn from(reason: String) -> Self {
        Invalid(reason)
    }
}

impl From<&str> for Invalid {
    fn from(reason: &str) -> Self {
        Invalid(reason.to_string())
    }
}

/// A value simq keeps as JSON in Consul KV or a file (a manifest, the active pointer, the
/// traffic split, an API key record): parsed, then checked, with one error naming where
/// it came from. What comes from Consul or a file is input, never trusted.
pub trait Record: serde::de::DeserializeOwned {
    /// What it is, for messages ("a manifest").
    const WHAT: &'static str;

    /// The checks beyond the JSON shape.
    fn check(&self) -> Result<(), Invalid>;

    /// Parse and check `bytes` read from `source` (a KV key or a file path, named in the
    /// error).
    fn decode(source: &str, bytes: &[u8]) -> Result<Self, Invalid> {
        let value: Self = serde_json::from_slice(bytes)
            .map_err(|e| Invalid(format!("{source} is not {}: {e}", Self::WHAT)))?;
        value
            .check()
            .map_err(|e| Invalid(format!("{source}: {e}")))?;
        Ok(value)
    }
}

impl Record for Manifest {
    const WHAT: &'static str = "a manifest";
    fn check(&self) -> Result<(), Invalid> {
        self.validate()
    }
}

impl Record for ActiveDg {
    const WHAT: &'static str = "an active pointer";
    fn check(&self) -> Result<(), Invalid> {
        self.validate()
    }
}

impl Record for TrafficSplit {
    const WHAT: &'static str = "a traffic split";
    fn check(&self) -> Result<(), Invalid> {
        self.validate()
    }
}

impl Record for apikeys::ApiKeyRecord {
    const WHAT: &'static str = "an API key record";
    fn check(&self) -> Result<(), Invalid> {
        self.validate()
    }
}

pub use kv::{ActiveDg, ClusterTable, KvLayout, Manifest, ShardEntry};
pub use routing::{CentroidMap, ProbePlan};
pub use traffic::{Arm, TrafficSplit};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_names_the_source_of_bad_json_and_of_a_failed_check() {
        let e = ActiveDg::decode("simq/active", b"not json").unwrap_err();
        assert!(
            e.0.starts_with("simq/active is not an active pointer: "),
            "{e}"
        );
        let e = ActiveDg::decode(
            "simq/active",
            br#"{"dg": "../x", "previous": null, "flipped_at": ""}"#,
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("simq/active: ") && e.0.contains("not a dg id"),
            "{e}"
        );
        let good = br#"{"dg": "dg-0123456789abcdef", "previous": null, "flipped_at": ""}"#;
        assert_eq!(
            ActiveDg::decode("simq/active", good).unwrap().dg,
            "dg-0123456789abcdef"
        );
    }
}
