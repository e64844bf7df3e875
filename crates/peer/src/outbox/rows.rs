//! The outbox's rows: staged messages (table `OUTBOX_V2`), the peers'
//! addresses (table `PEERS`), and the conversion of the first format.

use caroni_proto::v1::Envelope;
use caroni_store::{tables, Batch, Store, Table};
use serde::{Deserialize, Serialize};

use super::is_bulk;
use crate::{envelope, Error};

/// One staged message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) endpoint: String,
    pub(super) message_id: uuid::Uuid,
    pub(super) bulk: bool,
    pub(super) payload: Vec<u8>,
}

pub(super) const OUTBOX: Table<Entry> = Table::new(tables::OUTBOX_V2, "outbox");

/// Where a destination is, as it last said itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Address {
    pub(super) endpoint: String,
    /// When it said so (its clock, ms since the epoch).
    pub(super) said_at_ms: u64,
    /// It has acknowledged at least one message.
    pub(super) confirmed: bool,
}

pub(super) const ADDRESSES: Table<Address> = Table::new(tables::PEERS, "peer addresses");

/// When a message was staged: its id is a UUID v7.
pub(super) fn staged_at_ms(id: &uuid::Uuid) -> u64 {
    id.get_timestamp().map_or(0, |t| {
        let (secs, nanos) = t.to_unix();
        secs.saturating_mul(1000)
            .saturating_add(u64::from(nanos / 1_000_000))
    })
}

pub(super) fn entry_size(e: &Entry) -> u64 {
    (e.payload.len() + e.endpoint.len()) as u64
}

/// Rows of the first outbox format: the whole signed envelope, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LegacyEntry {
    endpoint: String,
    message_id: String,
    envelope: Vec<u8>,
}
const LEGACY_OUTBOX: Table<LegacyEntry> = Table::new(tables::OUTBOX, "outbox (format 1)");

/// Converts rows of the first outbox format (signed envelopes as JSON) to
/// the current one, keeping their ids and order.
pub(super) fn migrate_legacy(store: &Store) -> Result<(), Error> {
    let old = store.scan(LEGACY_OUTBOX, &[])?;
    if old.is_empty() {
        return Ok(());
    }
    let mut b = Batch::default();
    for (key, e) in &old {
        b.delete(LEGACY_OUTBOX, key);
        let converted = Envelope::decode_from(&e.envelope)
            .and_then(|env| crate::open(&env).ok())
            .map(|v| Entry {
                endpoint: e.endpoint.clone(),
                message_id: v.id,
                bulk: is_bulk(&v.payload),
                payload: envelope::encode_payload(v.payload, v.trace),
            });
        match converted {
            Some(entry) => b.put(OUTBOX, key, &entry),
            None => tracing::warn!(message_id = %e.message_id, "dropping an unreadable outbox row"),
        }
    }
    tracing::info!(
        rows = old.len(),
        "converted outbox rows to the current format"
    );
    store.write(b)?;
    Ok(())
}

trait DecodeFrom: Sized {
    fn decode_from(bytes: &[u8]) -> Option<Self>;
}
impl DecodeFrom for Envelope {
    fn decode_from(bytes: &[u8]) -> Option<Self> {
        <Envelope as prost::Message>::decode(bytes).ok()
    }
}
