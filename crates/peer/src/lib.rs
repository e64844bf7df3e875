//! Node-to-node transport: signed envelopes, the durable outbox with one
//! sender task per destination, and the peer gRPC service that receives.
//!
//! Delivery contract: a message staged in the outbox (in the same RocksDB
//! batch as the state change that caused it) is sent over one long-lived
//! `Deliver` stream per destination and deleted only when the receiver has
//! acknowledged it, which the receiver does only after its own durable
//! write. Unreachable peers get exponential backoff. Receivers apply each
//! message id at most once (that check lives with the engines, in the same
//! batch as the effects).
//!
//! This crate knows nothing of workflows or jobs.

pub mod envelope;
pub mod outbox;
pub mod server;

pub use envelope::{open, Signer, Verified};
pub use outbox::{Outbox, PeerStatus};
pub use server::{Inbox, InboxError, PeerServer};

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The envelope is refused for good.
    #[error("refused: {0}")]
    Refused(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] caroni_store::Error),
}
