//! The one error type of simq-embedder.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong loading a model or embedding texts.
#[derive(Debug, Error)]
pub enum Error {
    /// A file of the model directory is missing, unreadable or not what its manifest pins.
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    /// The ONNX Runtime library could not be loaded.
    #[error("{reason}")]
    Runtime { reason: String },

    /// Tokenising or running the model failed.
    #[error("inference failed: {reason}")]
    Inference { reason: String },

    /// The request is not acceptable (too many texts, a text too long, ...).
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },

    /// The queue of waiting texts is full; retry later or on another instance.
    #[error("embedder overloaded: {queued} texts already queued (limit {limit})")]
    Overloaded { queued: usize, limit: usize },

    /// The request waited in the queue longer than the queue's time bound and was not run.
    #[error(
        "embedder overloaded: the request waited {waited_ms} ms in the queue (limit {limit_ms} ms)"
    )]
    QueueTimeout { waited_ms: u64, limit_ms: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
