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

pub use envelope::{open, open_all, Signer, Verified};
pub use outbox::{Outbox, PeerStatus};
pub use server::{Applying, Inbox, InboxError, PeerServer};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// When each peer was last heard from: a message it sent, or an ack it
/// returned. A manager judges a job's lease on this (an agent whose
/// messages wait in a long queue is still alive), not only on news of the
/// job itself. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Liveness(Arc<Mutex<HashMap<String, u64>>>);

impl Liveness {
    /// Records that `node` was heard from now.
    pub fn heard(&self, node: &str) {
        let now = caroni_types::now_ms();
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.get_mut(node) {
            Some(t) => *t = now,
            None => {
                m.insert(node.to_string(), now);
            }
        }
    }

    /// When `node` was last heard from (ms since the epoch).
    pub fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .copied()
    }
}

/// Logs refusals of what peers sent without letting a flood of them flood
/// the log: the 1st, 2nd, 4th, 8th, … of a kind at WARN with the count so
/// far, the rest at DEBUG.
#[derive(Debug, Default)]
pub struct Refusals(std::sync::atomic::AtomicU64);

impl Refusals {
    /// A counter for one kind of refusal.
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicU64::new(0))
    }

    /// Counts one refusal; true when it is to be logged at WARN.
    pub fn loud(&self) -> bool {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        n.is_power_of_two()
    }

    /// Refusals so far.
    pub fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Logs a refusal at WARN (rarely) or DEBUG, with the running count.
#[macro_export]
macro_rules! refusal {
    ($counter:expr, $($arg:tt)+) => {{
        let c: &$crate::Refusals = &$counter;
        if c.loud() {
            tracing::warn!(refused_so_far = c.count(), $($arg)+);
        } else {
            tracing::debug!($($arg)+);
        }
    }};
}

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
