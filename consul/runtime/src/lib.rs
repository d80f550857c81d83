//! simq-runtime: what every simq service (balancer, embedder, shard, the indexer's blob
//! server) runs with, in one place.
//!
//! - [`service`]: the ops server (`GET /health`, the target of the Consul check Nomad
//!   registers, and `GET /metrics` for Prometheus), structured logging, the shutdown
//!   signal and graceful drain, CPU priority, and the stall clock.
//! - [`redact`]: user:password removed from URLs in anything simq prints.

pub mod redact;
pub mod service;
