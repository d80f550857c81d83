//! simq-consul: a small async Consul HTTP client over reqwest: KV reads and writes,
//! check-and-set, blocking queries (`?index=&wait=`) and service health. What simq keeps
//! in Consul (the manifest, the active pointer, the key layout) is `simq-contract`; this
//! crate only moves the bytes.
//!
//! - [`client`]: the client.
//! - [`error`]: the crate's one error type.
//!
//! Beside this crate: `contract/` (simq-contract) and `runtime/` (simq-runtime, what every
//! service shows Consul and Prometheus), the agent configuration for local clusters
//! (`dev-agent.hcl`, `node-agent.hcl`), the pinned Go wrapper module that builds the agent
//! (`build/`), and the Prometheus build and Grafana dashboard.

pub mod client;
pub mod error;

pub use client::{BlockingQuery, ConsulClient, Indexed, KvPair, ServiceEntry};
pub use error::{Error, Result};
