//! The one error type of simq-consul.

use thiserror::Error;

/// What can go wrong talking to Consul.
#[derive(Debug, Error)]
pub enum Error {
    /// The configured address is not a usable http(s) URL.
    #[error("invalid Consul address {addr:?}: {reason} (expected e.g. http://127.0.0.1:8500)")]
    InvalidAddress { addr: String, reason: String },

    /// The agent could not be reached at all (refused, timed out, reset).
    #[error("Consul at {addr} is unreachable: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },

    /// The agent answered with an error status.
    #[error("Consul {method} {path} answered {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },

    /// The agent answered 2xx with a body simq cannot read.
    #[error("Consul {path} answered a body simq cannot decode: {reason}")]
    Decode { path: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
