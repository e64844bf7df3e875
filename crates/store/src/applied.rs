//! The inbox side of exactly-once: ids of applied messages, marked in the
//! same batch as their effects.

use crate::{keys::Key, tables, Batch, Store, Table};

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
