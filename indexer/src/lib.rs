//! simq-indexer: builds index generations (dg) and, later, publishes and rolls them out.
//!
//! - [`corpus`]: read, validate and de-duplicate a corpus file (bad lines with numbers).
//! - [`kmeans`]: spherical k-means with k-means++ seeding and a fixed seed.
//! - [`build`]: the build pipeline: embed (the embedder's own runtime), cluster, index
//!   each shard (`simq-shard`'s file format), write the manifest (`simq-contract`).
//! - [`update`]: an incremental build (`build --base`): a base dg plus a change set,
//!   only the changed shard files written, with a drift guard.
//! - [`eval`]: recall@k of the sharded path against exact search.
//! - [`blobs`]: the content-addressed blob store and its HTTP server.
//! - [`publish`]: blobs into the store, the manifest into Consul KV; idempotent.
//! - [`flip`]: the active pointer's single CAS write.
//! - [`rollout`]: the shards' Nomad deployment with canaries, flip, promote.
//! - [`keys`]: API keys: create (printed once), list, revoke.
//! - [`traffic`]: the traffic split between the active dg and a candidate (CAS writes).
//! - [`compare`]: the split's two arms side by side from Prometheus, and a verdict.
//! - [`progressive`]: a rollout that shadows, steps the split up, judges each step and
//!   flips or stops the candidate.
//! - [`placement`]: where simq runs on a multi-node cluster, and the checks it must pass.
//! - [`progress`]: progress of long steps: a bar on a terminal, log lines otherwise.

pub mod blobs;
pub mod build;
pub mod compare;
pub mod contours;
pub mod corpus;
pub mod eval;
pub mod flip;
pub mod jobs;
pub mod keys;
pub mod kmeans;
pub mod lock;
pub mod models;
pub mod placement;
pub mod progress;
pub mod progressive;
pub mod publish;
pub mod rollout;
pub mod traffic;
pub mod update;
