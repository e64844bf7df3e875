//! The manager engine: workflow templates, workflows, steps, job requests
//! and the routing of data along dataflows.
//!
//! This crate owns the manager's rules and its tables: [`engine`] the rules
//! between workflows and peers, [`machine`] the rules of one workflow, both
//! IO-less; [`service`] drives them on the shared commit driver. It must
//! not depend on libp2p or tonic: the node wires it to the network.

pub mod engine;
pub mod machine;
pub mod market;
pub mod model;
pub mod records;
pub mod service;
pub mod templates;

pub use records::{children_of, runs_on, RunsOn};

/// Manager errors, phrased for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The template document is invalid.
    #[error("invalid template: {0}")]
    InvalidTemplate(#[from] caroni_cwl::Error),
    /// The template name is invalid.
    #[error("template name {0}")]
    BadName(#[from] caroni_types::NameError),
    /// Bad input from the user (inputs, state).
    #[error("{0}")]
    BadInput(String),
    /// The workflow has already ended.
    #[error("{0}")]
    Finished(String),
    /// The service cannot answer now.
    #[error("{0}")]
    Unavailable(String),
    /// Something does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] caroni_store::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
