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
    /// The transport's own copy of the staged row, so that its sender need
    /// not read it back from the table.
    pub item: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

/// The node's transport, as the engines see it.
pub trait Wire: Send + Sync + 'static {
    /// Seals `out` and adds it to `batch`. `trace` is the workflow it is
    /// about, if any: it travels with the message so that the receiver's
    /// log lines name the workflow.
    fn stage(
        &self,
        batch: &mut Batch,
        out: &Outbound,
        trace: Option<uuid::Uuid>,
    ) -> Result<Staged, String>;
    /// Wakes the senders once the batch holding `staged` is written.
    fn notify(&self, staged: Vec<Staged>);
    /// Takes back a message staged in `batch` (not yet written), because a
    /// later message of the same batch supersedes it.
    fn unstage(&self, batch: &mut Batch, staged: &Staged) {
        let _ = (batch, staged);
    }
    /// Publishes requests on gossip (and to a local agent, if any); the
    /// transport may pack several in one gossip message.
    fn publish(&self, reqs: Vec<JobRequest>);
    /// When node `node` was last heard from (a message or an ack), in ms
    /// since the epoch; `None` when never since this node started.
    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        let _ = node;
        None
    }
    /// True when `node` has acknowledged a message from this node. An
    /// engine answers a message about something it does not know with a
    /// message of its own only to such a peer; a stranger gets the answer
    /// in the acknowledgement, so that no key can make this node send to an
    /// address of its choosing.
    /// Records that this node refused what `peer` asked, and why (an
    /// allowlist): counted per peer for `caroni peers` and logged.
    fn refused(&self, peer: &str, reason: &str) {
        let _ = (peer, reason);
    }

    fn knows(&self, node: &str) -> bool {
        let _ = node;
        true
    }
}

/// Why an engine did not apply a direct message: never acceptable
/// (`Refused`, the sender drops it) or not now (`Retry`, it is sent again).
/// One type for both engines, mapped to the transport's in one place.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Never acceptable.
    #[error("{0}")]
    Refused(String),
    /// Try again later.
    #[error("{0}")]
    Retry(String),
}

/// How an engine waits after a failed write before it tries again: from
/// 100 ms, doubling, up to 10 s; back to nothing after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Records a write's outcome; how long to wait before the next try
    /// (zero after a success).
    pub fn delay(&mut self, ok: bool) -> std::time::Duration {
        if ok {
            self.failures = 0;
            return std::time::Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        std::time::Duration::from_millis(100)
            .saturating_mul(1u32 << self.failures.min(7))
            .min(std::time::Duration::from_secs(10))
    }

    /// Records a write's outcome and, after a failure, waits. Returns false
    /// when cancelled meanwhile.
    pub async fn after(&mut self, ok: bool, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let wait = self.delay(ok);
        if wait.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = cancel.cancelled() => false,
        }
    }
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

/// Forgets applied-message ids recorded before `before_ms`, so the table
/// grows with recent traffic, not with history. A message re-sent after its
/// id was forgotten would be applied again: keep the horizon far beyond the
/// longest outage a peer's outbox is expected to bridge.
pub fn prune_applied(store: &Store, before_ms: u64) -> crate::Result<usize> {
    let mut batch = Batch::default();
    let mut n = 0;
    for (key, applied) in store.scan(APPLIED, &[])? {
        if applied.at_ms < before_ms {
            batch.delete(APPLIED, &key);
            n += 1;
        }
    }
    if n > 0 {
        store.write_relaxed(batch)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_ids_are_remembered_then_pruned_by_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let id = uuid::Uuid::new_v4();
        let mut b = Batch::default();
        mark_applied(&mut b, &id);
        store.write(b).expect("write");
        assert!(is_applied(&store, &id).expect("read"));
        assert_eq!(
            prune_applied(&store, 0).expect("prune"),
            0,
            "nothing older than the epoch"
        );
        assert_eq!(
            prune_applied(&store, caroni_types::now_ms() + 1).expect("prune"),
            1
        );
        assert!(!is_applied(&store, &id).expect("read"));
    }
}
