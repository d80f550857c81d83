//! simq-nomad: the Nomad HTTP API client simq drives its jobs and rollouts with.
//!
//! - [`client`]: parse HCL2 job files with variables, register, stop, follow
//!   deployments and allocations.
//! - [`jobs`]: the job specs, compiled in.
//! - [`error`]: the crate's one error type.
//!
//! Beside this crate: the job specs (`nomad/*.nomad.hcl`), the dev agent configuration
//! (`nomad/dev-agent.hcl`) and the pinned Go wrapper module that builds the agent
//! (`nomad/build/`).

pub mod client;
pub mod error;
pub mod jobs;

pub use client::{
    hcl_variables, Allocation, Deployment, DeploymentGroup, DeploymentStatus, JobStub, NomadClient,
    Registration,
};
pub use error::{Error, Result};
