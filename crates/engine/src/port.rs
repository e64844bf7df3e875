//! The port the engines send through: outbound messages are staged into
//! the same batch as the state change that caused them (transactional
//! outbox) and announced after the batch is written; gossip publication is
//! best effort (the manager re-publishes until a request is answered).

use caroni_store::Batch;
pub use caroni_store::Staged;
use caroni_types::msg::{JobRequest, Outbound};

/// Why a message could not be staged: the transport's own error (storage,
/// signing), kept whole for the log.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

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
    ) -> Result<Staged, StageError>;
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
    /// Publishes this agent's advert on gossip (and hands it to a local
    /// manager, if any); best effort, adverts come again.
    fn advertise(&self, advert: caroni_types::market::Advert) {
        let _ = advert;
    }
    /// Signs `bytes` (a receipt or a verdict, which name their purpose)
    /// with this node's key; empty where the transport has no key (tests).
    fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        let _ = bytes;
        Vec::new()
    }
    /// True when `signature` is node `node`'s signature of `bytes`. A
    /// transport without keys (tests) takes only the empty signature its
    /// own `sign` makes.
    fn verify(&self, node: &str, bytes: &[u8], signature: &[u8]) -> bool {
        let _ = (node, bytes);
        signature.is_empty()
    }
    /// When node `node` was last heard from (a message or an ack), in ms
    /// since the epoch; `None` when never since this node started.
    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        let _ = node;
        None
    }
    /// Records that this node refused what `peer` asked, and why (an
    /// allowlist): counted per peer for `caroni peers` and logged.
    fn refused(&self, peer: &str, reason: &str) {
        let _ = (peer, reason);
    }

    /// Records that this node dropped what `peer` said on gossip unanswered,
    /// and why (a forged reply endpoint, absurd fields): logged, rate
    /// limited.
    fn dropped(&self, peer: &str, reason: &str) {
        let _ = (peer, reason);
    }

    /// True when `node` has acknowledged a message from this node. An
    /// engine answers a message about something it does not know with a
    /// message of its own only to such a peer; a stranger gets the answer
    /// in the acknowledgement, so that no key can make this node send to an
    /// address of its choosing.
    fn knows(&self, node: &str) -> bool {
        let _ = node;
        true
    }

    /// True when this node's blob store (the data plane beside the
    /// transport) holds `file` whole.
    fn holds_file(&self, file: &caroni_types::file::FileRef) -> bool {
        let _ = file;
        false
    }

    /// The first `limit` bytes of a file this node holds whole.
    fn read_head(&self, file: &caroni_types::file::FileRef, limit: usize) -> Option<Vec<u8>> {
        let _ = (file, limit);
        None
    }
}
