//! simq's Nomad job specs (HCL2 with variables), compiled in so tools need no checkout.

/// The shards of one dg: one group per shard, canaries for blue/green rollouts.
pub const SHARDS: &str = include_str!("../shards.nomad.hcl");
/// The embedding service.
pub const EMBEDDER: &str = include_str!("../embedder.nomad.hcl");
/// The Pingora balancer.
pub const BALANCER: &str = include_str!("../balancer.nomad.hcl");
/// The content-addressed blob store.
pub const BLOBS: &str = include_str!("../blobs.nomad.hcl");
