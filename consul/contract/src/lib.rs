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

pub use kv::{ActiveDg, ClusterTable, KvLayout, Manifest, ShardEntry};
pub use routing::{CentroidMap, ProbePlan};
pub use traffic::{Arm, TrafficSplit};
