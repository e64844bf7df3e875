//! The durable outbox and its sender tasks.
//!
//! Table `OUTBOX_V2`: key = (destination node id, sequence), value = the
//! destination endpoint, the message id, its lane and the encoded payload.
//! Messages are signed when sent, not when staged, so a row holds the
//! domain message and a re-send after a restart carries a fresh timestamp
//! under the same id.
//!
//! Staging adds a row to the caller's batch; after the caller's write,
//! [`Outbox::notify`] hands the same rows to the destination's sender in
//! memory, so the happy path never reads the table. The sender re-reads
//! the table only after a restart, after a broken stream (its unacked
//! messages must go again) or when more than [`MEM_QUEUE`] messages wait
//! (then it "spills": new rows stay on disk until it has caught up).
//!
//! Two lanes per destination: messages that unblock work (accepts, job
//! news, data, kills) go before offers and declines, which a loaded
//! manager may receive by the thousand. No message of one lane ever
//! depends on a later message of the other (an accept always follows the
//! arrival of its offer), so the reordering is safe.
//!
//! A message for this node itself (a node in both roles) is handed to the
//! local inbox in process: no sockets, no signature, the same durability
//! (the row is deleted only when the engine has written its effects).
//!
//! Addresses follow the peers' own signed word: table `PEERS` holds, for
//! every destination, the endpoint it last gave in a signed message (see
//! [`Outbox::learn`]) and whether it has ever acknowledged a message
//! ("confirmed"). A sender always dials the latest address, so queued rows
//! follow a node that comes back elsewhere. What a destination may hold is
//! bounded ([`Limits`]): count and bytes per destination, fewer for one
//! that never confirmed, a cap on how many such destinations exist at all,
//! and a time to live for their messages. A sender with nothing to do for
//! a while stops; the next message starts a new one.
//!
//! Here: the [`Outbox`] handle (staging, notifying, addresses, limits,
//! status); in `rows`: the tables and the first format's conversion; in
//! `sender`: the task that drains one destination.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use caroni_proto::v1::message::Payload;
use caroni_store::{keys::Key, keys::Reader, Batch, Staged, Store};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::envelope::MAX_ENDPOINT;
use crate::inbox::{pipeline, Incoming, WINDOW};
use crate::{envelope, Error, Inbox, Liveness, Signer, Verified};

/// Bounds on what the outbox holds for its destinations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages queued for a confirmed destination.
    pub max_queued: u64,
    /// Most bytes queued for a confirmed destination.
    pub max_bytes: u64,
    /// Most messages queued for a destination that never acknowledged one.
    pub max_queued_unconfirmed: u64,
    /// Most bytes queued for such a destination.
    pub max_bytes_unconfirmed: u64,
    /// Most destinations that never acknowledged a message.
    pub max_unconfirmed_peers: usize,
    /// How long a message to a never-confirmed destination may wait.
    pub unconfirmed_ttl: Duration,
    /// A sender idle this long (nothing queued) stops.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued: 200_000,
            max_bytes: 256 << 20,
            max_queued_unconfirmed: 10_000,
            max_bytes_unconfirmed: 8 << 20,
            max_unconfirmed_peers: 256,
            unconfirmed_ttl: Duration::from_secs(600),
            idle: Duration::from_secs(300),
        }
    }
}

/// Messages a sender keeps in memory before it spills to reading the table.
pub const MEM_QUEUE: usize = 8192;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Acks gathered into one delete batch.
const ACK_BATCH: usize = 512;
/// Most messages sealed in one envelope.
const BATCH: usize = 128;
/// Most payload bytes sealed in one envelope (a larger message goes alone).
const BATCH_BYTES: usize = 1 << 20;
/// Largest message staged: a receiver takes envelopes of up to
/// [`MAX_ENVELOPE`] bytes, and the header and signature need room.
pub const MAX_MESSAGE: usize = MAX_ENVELOPE - 64 * 1024;
/// Largest envelope a node receives (and sends).
pub const MAX_ENVELOPE: usize = 16 << 20;

/// What `caroni peers` shows about one destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    /// Destination node id.
    pub node_id: String,
    /// Last endpoint used.
    pub endpoint: String,
    /// Messages waiting in the outbox.
    pub queued: u64,
    /// True while a stream is open.
    pub connected: bool,
    /// Last delivery error, if the peer is failing.
    pub last_error: String,
    /// Messages delivered since start.
    pub delivered: u64,
    /// Messages not queued since start because a limit was reached, or
    /// dropped when their time to live passed.
    pub dropped: u64,
    /// The destination has acknowledged a message.
    pub confirmed: bool,
}

#[derive(Default)]
struct Queue {
    urgent: VecDeque<(Vec<u8>, Entry)>,
    bulk: VecDeque<(Vec<u8>, Entry)>,
    /// Rows exist on disk that are not in the lanes.
    spilled: bool,
    /// Bytes of the queued rows.
    bytes: u64,
    /// The sender stopped (idle); a new message needs a new destination.
    closed: bool,
    status: PeerStatus,
}

impl Queue {
    fn len(&self) -> usize {
        self.urgent.len() + self.bulk.len()
    }
    fn push(&mut self, key: Vec<u8>, e: Entry) {
        if self.spilled || self.len() >= MEM_QUEUE {
            self.spilled = true;
        } else if e.bulk {
            self.bulk.push_back((key, e));
        } else {
            self.urgent.push_back((key, e));
        }
    }
    fn pop(&mut self) -> Option<(Vec<u8>, Entry)> {
        self.urgent.pop_front().or_else(|| self.bulk.pop_front())
    }
}

struct Dest {
    queue: Mutex<Queue>,
    notify: Notify,
    /// The destination gave a new address.
    moved: Notify,
}

impl Dest {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Inner {
    store: Store,
    signer: Signer,
    me: String,
    seq: AtomicU64,
    dests: Mutex<HashMap<String, Arc<Dest>>>,
    book: Mutex<HashMap<String, Address>>,
    limits: Limits,
    local: OnceLock<Arc<dyn Inbox>>,
    liveness: Liveness,
    cancel: CancellationToken,
}

/// The outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish()
    }
}

/// True for messages that may wait behind every other kind.
fn is_bulk(p: &Payload) -> bool {
    matches!(
        p,
        Payload::JobFulfillmentOffer(_) | Payload::JobFulfillmentDecline(_)
    )
}

impl Outbox {
    /// Opens the outbox with the default [`Limits`] and starts a sender for
    /// every destination that has messages left from before a restart.
    /// Rows of the first format are converted first.
    pub fn start(
        store: Store,
        signer: Signer,
        liveness: Liveness,
        cancel: CancellationToken,
    ) -> Result<Self, Error> {
        Self::start_with(store, signer, liveness, cancel, Limits::default())
    }

    /// [`Outbox::start`] with chosen limits.
    pub fn start_with(
        store: Store,
        signer: Signer,
        liveness: Liveness,
        cancel: CancellationToken,
        limits: Limits,
    ) -> Result<Self, Error> {
        migrate_legacy(&store)?;
        let mut max_seq = 0;
        let mut depth: HashMap<String, (u64, u64, String)> = HashMap::new();
        for (k, e) in store.scan(OUTBOX, &[])? {
            let mut r = Reader::new(&k);
            if let (Some(dest), Some(seq)) = (r.str(), r.u64()) {
                max_seq = max_seq.max(seq);
                let d = depth.entry(dest.to_string()).or_default();
                d.0 += 1;
                d.1 += entry_size(&e);
                d.2 = e.endpoint.clone();
            }
        }
        let mut book = HashMap::new();
        for (k, a) in store.scan(ADDRESSES, &[])? {
            if let Some(node) = Reader::new(&k).str() {
                book.insert(node.to_string(), a);
            }
        }
        let outbox = Self {
            inner: Arc::new(Inner {
                store,
                me: signer.node_id().to_base58(),
                signer,
                seq: AtomicU64::new(max_seq + 1),
                dests: Mutex::new(HashMap::new()),
                book: Mutex::new(book),
                limits,
                local: OnceLock::new(),
                liveness,
                cancel,
            }),
        };
        for (dest, (n, bytes, endpoint)) in depth {
            tracing::info!(peer = %dest, queued = n, "resuming delivery of queued messages");
            let endpoint = outbox.endpoint_of(&dest).unwrap_or(endpoint);
            let d = outbox.dest(&dest);
            let mut q = d.lock();
            q.spilled = true;
            q.bytes = bytes;
            q.status.queued = n;
            q.status.endpoint = endpoint;
            drop(q);
            d.notify.notify_one();
        }
        Ok(outbox)
    }

    /// Delivers messages addressed to this node itself to `inbox`, in
    /// process.
    pub fn set_local(&self, inbox: Arc<dyn Inbox>) {
        let _ = self.inner.local.set(inbox);
    }

    /// This node's signer.
    pub fn signer(&self) -> &Signer {
        &self.inner.signer
    }

    /// Adds `payload` for node `to` to `batch`; `endpoint` is where the
    /// caller believes `to` is, used only until `to` has said where it is.
    /// `trace` is the workflow the message is about, if any (it travels in
    /// the envelope for the receiver's logs).
    /// Call [`Outbox::notify`] with the returned handle after the batch is
    /// written. A message past the destination's [`Limits`] is not staged
    /// (the handle is empty, the drop is counted and logged).
    pub fn stage(
        &self,
        batch: &mut Batch,
        to: &str,
        endpoint: &str,
        payload: Payload,
        trace: Option<uuid::Uuid>,
    ) -> Result<Staged, Error> {
        let bulk = is_bulk(&payload);
        let payload = envelope::encode_payload(payload, trace);
        let known = self.endpoint_of(to);
        let endpoint = known.clone().unwrap_or_else(|| endpoint.to_string());
        let size = (payload.len() + endpoint.len()) as u64;
        let too_large = (payload.len() > MAX_MESSAGE).then(|| {
            format!(
                "a message of {} bytes is larger than the {MAX_MESSAGE} bytes a peer accepts",
                payload.len()
            )
        });
        if let Some(why) = too_large.or_else(|| self.over_limit(to, size)) {
            self.dropped(to, 1, &why);
            return Ok(Staged {
                to: to.to_string(),
                endpoint,
                item: None,
            });
        }
        if known.is_none() {
            self.remember(batch, to, &endpoint);
        }
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let key = Key::new().str(to).u64(seq).finish();
        let entry = Entry {
            endpoint: endpoint.clone(),
            message_id: uuid::Uuid::now_v7(),
            bulk,
            payload,
        };
        batch.put(OUTBOX, &key, &entry);
        Ok(Staged {
            to: to.to_string(),
            endpoint,
            item: Some(Arc::new((key, entry))),
        })
    }

    /// Enters `to` at `endpoint` in the address book (in `batch`), where
    /// it stays until `to` says otherwise.
    fn remember(&self, batch: &mut Batch, to: &str, endpoint: &str) {
        if to == self.inner.me || endpoint.is_empty() {
            return;
        }
        let mut book = self.book();
        let a = Address {
            endpoint: endpoint.to_string(),
            said_at_ms: 0,
            confirmed: book.get(to).is_some_and(|a| a.confirmed),
        };
        batch.put(ADDRESSES, &Key::new().str(to).finish(), &a);
        book.insert(to.to_string(), a);
    }

    /// Why a message of `size` bytes for `to` is not to be queued, if so.
    fn over_limit(&self, to: &str, size: u64) -> Option<String> {
        if to == self.inner.me {
            return None;
        }
        let l = &self.inner.limits;
        let confirmed = self.confirmed(to);
        let (max_n, max_b) = if confirmed {
            (l.max_queued, l.max_bytes)
        } else {
            (l.max_queued_unconfirmed, l.max_bytes_unconfirmed)
        };
        let dests = self.lock();
        match dests.get(to) {
            Some(d) => {
                let q = d.lock();
                (q.status.queued >= max_n || q.bytes.saturating_add(size) > max_b).then(|| {
                    format!(
                        "its queue is full ({} messages, {} bytes; limit {max_n} messages, {max_b} bytes{})",
                        q.status.queued,
                        q.bytes,
                        if confirmed { "" } else { " while it has never acknowledged a message" }
                    )
                })
            }
            None if !confirmed => {
                let book = self.book();
                let strangers = dests
                    .keys()
                    .filter(|k| !book.get(*k).is_some_and(|a| a.confirmed))
                    .count();
                (strangers >= l.max_unconfirmed_peers).then(|| {
                    format!(
                        "{strangers} peers that never acknowledged a message already have queues (limit {})",
                        l.max_unconfirmed_peers
                    )
                })
            }
            None => None,
        }
    }

    fn dropped(&self, to: &str, n: u64, why: &str) {
        let first = match self.lock().get(to) {
            Some(d) => {
                let mut q = d.lock();
                q.status.dropped += n;
                q.status.dropped == n
            }
            None => true,
        };
        if first {
            tracing::warn!(peer = %to, messages = n, reason = %why, "dropping messages for a peer");
        } else {
            tracing::debug!(peer = %to, messages = n, reason = %why, "dropping messages for a peer");
        }
    }

    /// Takes back a message staged in `batch` before the batch is written.
    pub fn unstage(&self, batch: &mut Batch, staged: &Staged) {
        if let Some(item) = staged
            .item
            .as_ref()
            .and_then(|i| i.downcast_ref::<(Vec<u8>, Entry)>())
        {
            batch.delete(OUTBOX, &item.0);
        }
    }

    /// Hands the messages staged in a batch that is now written to their
    /// senders.
    pub fn notify(&self, staged: Vec<Staged>) {
        for s in staged {
            let Some(item) = s.item.and_then(|i| i.downcast::<(Vec<u8>, Entry)>().ok()) else {
                continue;
            };
            let (key, entry) = Arc::unwrap_or_clone(item);
            let endpoint = self.endpoint_of(&s.to).unwrap_or(s.endpoint);
            let d = loop {
                let d = self.dest(&s.to);
                if !d.lock().closed {
                    break d;
                }
            };
            let mut q = d.lock();
            q.status.queued += 1;
            q.bytes += entry_size(&entry);
            q.status.endpoint = endpoint;
            q.push(key, entry);
            drop(q);
            d.notify.notify_one();
        }
    }

    /// Records where node `node` says it is, in a message it signed at
    /// `said_at_ms` (its clock). Only destinations are tracked; a newer
    /// word moves the destination's queue to the new endpoint at once.
    pub fn learn(&self, node: &str, endpoint: &str, said_at_ms: u64) {
        if node == self.inner.me
            || endpoint.is_empty()
            || endpoint.len() > MAX_ENDPOINT
            || !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return;
        }
        let moved = {
            let mut book = self.book();
            let Some(a) = book.get_mut(node) else { return };
            if a.endpoint == endpoint {
                a.said_at_ms = a.said_at_ms.max(said_at_ms);
                return;
            }
            if said_at_ms < a.said_at_ms {
                return;
            }
            a.endpoint = endpoint.to_string();
            a.said_at_ms = said_at_ms;
            a.clone()
        };
        tracing::info!(peer = %node, endpoint = %endpoint, "peer is at a new address");
        self.persist(node, &moved);
        if let Some(d) = self.lock().get(node).cloned() {
            d.lock().status.endpoint = endpoint.to_string();
            d.moved.notify_one();
        }
    }

    /// True when `node` has acknowledged a message from this node (or is
    /// this node).
    pub fn confirmed(&self, node: &str) -> bool {
        node == self.inner.me || self.book().get(node).is_some_and(|a| a.confirmed)
    }

    fn confirm(&self, node: &str) {
        let a = {
            let mut book = self.book();
            match book.get_mut(node) {
                Some(a) if !a.confirmed => {
                    a.confirmed = true;
                    a.clone()
                }
                _ => return,
            }
        };
        self.persist(node, &a);
    }

    fn persist(&self, node: &str, a: &Address) {
        // Not synced: a lost update is learned again from the next message.
        let mut b = Batch::default();
        b.put(ADDRESSES, &Key::new().str(node).finish(), a);
        if let Err(e) = self.inner.store.write_relaxed(b) {
            tracing::warn!(peer = %node, error = %e, "cannot record a peer's address");
        }
    }

    /// Marks node `node` alive (it is sending this node something).
    pub fn heard(&self, node: &str) {
        self.inner.liveness.heard(node);
    }

    /// The address node `node` is reached at, if known.
    pub fn endpoint_of(&self, node: &str) -> Option<String> {
        self.book()
            .get(node)
            .map(|a| a.endpoint.clone())
            .filter(|e| !e.is_empty())
    }

    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<String, Address>> {
        self.inner
            .book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivery state of every destination.
    pub fn status(&self) -> Vec<PeerStatus> {
        let dests: Vec<Arc<Dest>> = self.lock().values().cloned().collect();
        let mut all: Vec<_> = dests.iter().map(|d| d.lock().status.clone()).collect();
        for st in &mut all {
            st.confirmed = self.confirmed(&st.node_id);
        }
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Dest>>> {
        self.inner
            .dests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The destination's queue, starting its sender on first use.
    fn dest(&self, to: &str) -> Arc<Dest> {
        let mut dests = self.lock();
        if let Some(d) = dests.get(to) {
            return d.clone();
        }
        let d = Arc::new(Dest {
            queue: Mutex::new(Queue {
                status: PeerStatus {
                    node_id: to.to_string(),
                    ..Default::default()
                },
                ..Default::default()
            }),
            notify: Notify::new(),
            moved: Notify::new(),
        });
        dests.insert(to.to_string(), d.clone());
        let sender = Sender {
            outbox: self.clone(),
            to: to.to_string(),
            dest: d.clone(),
        };
        let span = tracing::info_span!("outbox", node = %self.inner.me, peer = %to);
        tokio::spawn(sender.run().instrument(span));
        d
    }
}

mod rows;
mod sender;
#[cfg(test)]
mod tests;

use rows::*;
pub(crate) use sender::dial;
pub use sender::LinkError;
use sender::Sender;
