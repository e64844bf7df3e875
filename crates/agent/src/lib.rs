//! The agent engine: job types, offers, jobs, the run queue and the bash
//! executor.
//!
//! This crate owns the agent's rules and its tables: [`engine`] the rules
//! between jobs and peers (and the scheduling decision), [`machine`] the
//! rules of one offer and one job, both IO-less; [`service`] drives them on
//! the shared commit driver and runs what they start. It must not depend
//! on libp2p or tonic: the node wires it to the network.

pub mod cwl;
pub mod engine;
pub mod executor;
pub mod job_types;
pub mod logs;
pub mod machine;
pub mod records;
pub mod service;

/// Agent errors, phrased for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job type definition is invalid.
    #[error("invalid job type: {0}")]
    InvalidJobType(#[from] caroni_types::JobTypeError),
    /// The executor settings are invalid.
    #[error("invalid job type: {0}")]
    BadInput(String),
    /// Something does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] caroni_store::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
