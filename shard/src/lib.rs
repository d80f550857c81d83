//! simq-shard: the shard file format and the shard search service's parts.
//!
//! - [`format`]: one compact LMDB file per shard holding one arroy index per fine cluster and the id -> text
//!   table; written by `indexer build`, read by the shard service. Byte-reproducible.
//! - [`scan`]: a cluster's vectors as int8 codes in one value, for fast probing.
//! - [`lexical`]: the light contour, a BM25 index of the shard's texts (no model needed).
//! - [`verify`]: what a shard instance checks before it reports healthy.
//! - [`server`]: the gRPC search service; [`proto`]: its contract (`shard/proto/shard.proto`).
//! - [`error`]: the crate's one error type.

pub mod error;
pub mod format;
pub mod lexical;
pub mod scan;
pub mod server;
pub mod verify;

/// The service's contract (`shard/proto/`, crate `simq-shard-proto`).
pub use simq_shard_proto as proto;

pub use error::{Error, Result};
pub use format::{
    build_shard, BuildParams, ClusterItems, ClusterMeta, Hit, Item, SelfTest, ShardFile, ShardMeta,
};
