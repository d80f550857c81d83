//! simq-shard: the shard file format and the shard search service's parts.
//!
//! - [`format`]: one compact LMDB file per shard holding an arroy index and the id -> text
//!   table; written by `indexer build`, read by the shard service. Byte-reproducible.
//! - [`error`]: the crate's one error type.

pub mod error;
pub mod format;

pub use error::{Error, Result};
pub use format::{build_shard, BuildParams, Hit, Item, SelfTest, ShardFile, ShardMeta};
