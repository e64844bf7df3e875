//! How engines send: outbound messages are staged into the same batch as
//! the state change that caused them (transactional outbox), and announced
//! after the batch is written. Gossip publication is best effort; the
//! manager re-publishes until a request is answered.
//!
//! Also the inbox side of exactly-once: ids of applied messages, marked in
//! the same batch as their effects.

use caroni_types::msg::{JobRequest, Outbound};

use crate::{keys::Key, tables, Batch, Store, Table};

/// A staged message, to announce once its batch is written.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Destination node id.
    pub to: String,
    /// Destination endpoint.
    pub endpoint: String,
}

/// The node's transport, as the engines see it.
pub trait Wire: Send + Sync + 'static {
    /// Seals `out` and adds it to `batch`.
    fn stage(&self, batch: &mut Batch, out: &Outbound) -> Result<Staged, String>;
    /// Wakes the senders once the batch holding `staged` is written.
    fn notify(&self, staged: Vec<Staged>);
    /// Publishes a request on gossip (and to a local agent, if any).
    fn publish(&self, req: JobRequest);
}

/// Marker stored for an applied inbound message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// When it was applied (ms since epoch).
    pub at_ms: u64,
}

const APPLIED: Table<Applied> = Table::new(tables::APPLIED, "applied");

/// True when the message id was applied before.
pub fn is_applied(store: &Store, id: &uuid::Uuid) -> crate::Result<bool> {
    store.contains(APPLIED, &Key::new().uuid(id).finish())
}

/// Marks a message id applied, in the batch of its effects.
pub fn mark_applied(batch: &mut Batch, id: &uuid::Uuid) {
    batch.put(
        APPLIED,
        &Key::new().uuid(id).finish(),
        &Applied {
            at_ms: caroni_types::now_ms(),
        },
    );
}
