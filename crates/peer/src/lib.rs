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

pub mod blobs;
pub mod envelope;
pub mod gate;
pub mod inbox;
pub mod outbox;
pub mod server;
pub mod tls;

pub use envelope::{open, open_all, Signer, Verified};
pub use gate::{GateLimits, Gated, GatedListener};
pub use inbox::{Applying, DeliverError, Inbox, Preparing};
pub use outbox::{Outbox, PeerStatus};
pub use server::{LogSource, PeerServer};
pub use tls::{Links, MeshKey, PeerTls};

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

/// Most peers whose refusals are counted one by one.
const MAX_REFUSED_PEERS: usize = 4096;
/// Longest refusal reason kept.
const MAX_REFUSAL_TEXT: usize = 512;

/// What this node refused of each peer since it started (a stream without
/// the mesh key, an envelope not of the link's node, a manager an agent
/// does not serve, an offer from an agent a manager does not use): how
/// many times and the last reason, for `caroni peers`. Bounded: beyond
/// [`MAX_REFUSED_PEERS`] peers, new ones are only logged. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct PeerRefusals(Arc<Mutex<HashMap<String, (u64, String)>>>);

impl PeerRefusals {
    /// Counts one refusal of `peer` for `reason`.
    pub fn note(&self, peer: &str, reason: &str) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= MAX_REFUSED_PEERS && !m.contains_key(peer) {
            return;
        }
        let mut end = reason.len().min(MAX_REFUSAL_TEXT);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let e = m.entry(peer.to_string()).or_default();
        e.0 += 1;
        e.1 = reason[..end].to_string();
    }

    /// Every peer refused: (node id, count, last reason), by node id.
    pub fn all(&self) -> Vec<(String, u64, String)> {
        let m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = m
            .iter()
            .map(|(k, (n, r))| (k.clone(), *n, r.clone()))
            .collect();
        v.sort();
        v
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

/// An error with its causes, `: `-separated: tonic's transport errors
/// say only "transport error" at the top.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
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
