//! simq-embedder: the model runtime and the embedding service's gRPC contract.
//!
//! - [`model`]: model directories (`simq-model.json` manifest, sha256-pinned files) and
//!   the content-addressed model id.
//! - [`runtime`] (feature `runtime`): tokenise, ONNX Runtime via `ort`, pool, normalise.
//!   `indexer build` and the embedder service share it.
//! - [`batcher`] (feature `runtime`): dynamic micro-batching of concurrent requests.
//! - [`proto`]: the gRPC contract (`proto/embedder.proto`); clients such as the balancer
//!   depend on this crate with `default-features = false` and get only this and [`model`].
//! - [`error`]: the crate's one error type.

#[cfg(feature = "runtime")]
pub mod batcher;
pub mod error;
pub mod model;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod server;

/// Generated from `proto/embedder.proto`.
pub mod proto {
    tonic::include_proto!("simq.embedder.v1");
}

pub use error::{Error, Result};
