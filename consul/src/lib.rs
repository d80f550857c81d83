//! simq-consul: everything simq says to Consul, in one place.
//!
//! - [`client`]: a small async Consul HTTP client over reqwest: KV reads and writes,
//!   check-and-set, blocking queries (`?index=&wait=`) and service health.
//! - [`contract`]: the KV contract: index generation [`Manifest`], [`ActiveDg`] pointer,
//!   and the key layout.
//! - [`routing`]: the one routing rule (nearest fine clusters, grouped by shard) and the
//!   centroid map it reads.
//! - [`service`]: what every simq service shows Consul and Prometheus (`/health`,
//!   `/metrics`), its logging set-up and shutdown signal.
//! - [`apikeys`]: API keys: their format, their KV records (hashes, never keys) and the
//!   constant-time check.
//! - [`redact`]: user:password removed from URLs in anything simq prints.
//! - [`traffic`]: the traffic split between the active dg and a candidate, and the rule
//!   that puts each user on an arm.
//! - [`error`]: the crate's one error type.
//!
//! The agent configuration for local clusters sits beside this crate in `consul/dev-agent.hcl`,
//! and the pinned Go wrapper module that builds the agent in `consul/build/`.

pub mod apikeys;
pub mod client;
pub mod contract;
pub mod defaults;
pub mod error;
pub mod redact;
pub mod routing;
pub mod service;
pub mod traffic;

pub use client::{BlockingQuery, ConsulClient, Indexed, KvPair, ServiceEntry};
pub use contract::{ActiveDg, ClusterTable, KvLayout, Manifest, ShardEntry};
pub use error::{Error, Result};
pub use routing::{CentroidMap, ProbePlan};
pub use traffic::{Arm, TrafficSplit};
