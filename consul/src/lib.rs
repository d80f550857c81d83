//! simq-consul: everything simq says to Consul, in one place.
//!
//! - [`client`]: a small async Consul HTTP client over reqwest: KV reads and writes,
//!   check-and-set, blocking queries (`?index=&wait=`) and service health.
//! - [`error`]: the crate's one error type.
//!
//! The agent configuration for local clusters sits beside this crate in `consul/dev-agent.hcl`,
//! and the pinned Go wrapper module that builds the agent in `consul/build/`.

pub mod client;
pub mod error;

pub use client::{BlockingQuery, ConsulClient, Indexed, KvPair, ServiceEntry};
pub use error::{Error, Result};
