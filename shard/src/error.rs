//! The one error type of simq-shard.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong building, opening or searching a shard file.
#[derive(Debug, Error)]
pub enum Error {
    /// LMDB or arroy failed on this file.
    #[error("shard file {path}: {reason}")]
    Lmdb {
        path: PathBuf,
        reason: String,
        /// LMDB ran out of map space (`MDB_MAP_FULL`): a larger map may succeed.
        map_full: bool,
    },

    /// The file opened but is not a simq shard this build can read.
    #[error("{path} is not a usable simq shard: {reason}")]
    NotAShard { path: PathBuf, reason: String },

    /// The caller passed something unusable (wrong dims, no items, ...).
    #[error("invalid input: {reason}")]
    InvalidInput { reason: String },
}

impl Error {
    /// LMDB ran out of map space.
    pub fn is_map_full(&self) -> bool {
        matches!(self, Error::Lmdb { map_full: true, .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
