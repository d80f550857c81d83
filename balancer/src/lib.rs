//! simq-balancer: the public entry of simq, a Pingora HTTP app.
//!
//! - [`request`]: read and validate a query body (4xx errors that name the problem).
//! - [`state`]: the routing snapshot (active dg, manifest, healthy instances), swapped
//!   atomically; one request uses one snapshot, so one query uses one dg.
//! - [`watch`]: Consul blocking-query watchers that keep the snapshot current and keep the
//!   last good state when Consul is unreachable.
//! - [`query`]: embed, probe the nearest fine clusters on their shards, retry/fallback,
//!   merge; answer cache. Written against [`upstream::Upstreams`], so its rules are unit
//!   tests.
//! - [`upstream`]: the calls to embedders and shards (gRPC, deadline sent as
//!   `grpc-timeout`), and what protects them: admission control, retry budget, ejection
//!   of replicas that keep failing.
//! - [`split`]: the traffic split between the active dg and a candidate (sticky per
//!   user) and shadow comparisons.
//! - [`auth`]: API keys (hashed records in Consul KV) and per-key rate limits.
//! - [`app`]: the HTTP routes; [`metrics`]: Prometheus metrics.

pub mod app;
pub mod auth;
pub mod metrics;
pub mod query;
pub mod request;
pub mod split;
pub mod state;
#[cfg(test)]
mod testing;
pub mod upstream;
pub mod watch;
