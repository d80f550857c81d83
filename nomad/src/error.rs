//! The one error type of simq-nomad.

use thiserror::Error;

/// What can go wrong talking to Nomad.
#[derive(Debug, Error)]
pub enum Error {
    /// The configured address is not a usable http(s) URL.
    #[error("invalid Nomad address {addr:?}: {reason} (expected e.g. http://127.0.0.1:4646)")]
    InvalidAddress { addr: String, reason: String },

    /// The agent could not be reached at all.
    #[error("Nomad at {addr} is unreachable: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },

    /// The agent answered with an error status (a job spec Nomad rejects lands here,
    /// with Nomad's own explanation in `body`).
    #[error("Nomad {method} {path} answered {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },

    /// The agent answered 2xx with a body simq cannot read.
    #[error("Nomad {path} answered a body simq cannot decode: {reason}")]
    Decode { path: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
