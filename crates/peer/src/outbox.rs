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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use caroni_proto::v1::{message::Payload, peer_service_client::PeerServiceClient, Ack, Envelope};
use caroni_store::{keys::Key, keys::Reader, tables, wire::Staged, Batch, Store, Table};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::server::{pipeline, Incoming, WINDOW};
use crate::{envelope, Error, Inbox, Liveness, Signer, Verified};

/// One staged message.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    endpoint: String,
    message_id: uuid::Uuid,
    bulk: bool,
    payload: Vec<u8>,
}

const OUTBOX: Table<Entry> = Table::new(tables::OUTBOX_V2, "outbox");

/// Where a destination is, as it last said itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Address {
    endpoint: String,
    /// When it said so (its clock, ms since the epoch).
    said_at_ms: u64,
    /// It has acknowledged at least one message.
    confirmed: bool,
}

const ADDRESSES: Table<Address> = Table::new(tables::PEERS, "peer addresses");

/// Longest endpoint accepted from a peer.
pub const MAX_ENDPOINT: usize = 256;

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

/// When a message was staged: its id is a UUID v7.
fn staged_at_ms(id: &uuid::Uuid) -> u64 {
    id.get_timestamp().map_or(0, |t| {
        let (secs, nanos) = t.to_unix();
        secs.saturating_mul(1000)
            .saturating_add(u64::from(nanos / 1_000_000))
    })
}

fn entry_size(e: &Entry) -> u64 {
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

    fn endpoint_of(&self, node: &str) -> Option<String> {
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

/// Converts rows of the first outbox format (signed envelopes as JSON) to
/// the current one, keeping their ids and order.
fn migrate_legacy(store: &Store) -> Result<(), Error> {
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

/// Where a session sends: a gRPC stream of signed envelopes, or the local
/// inbox.
enum Tx {
    Remote(mpsc::Sender<Envelope>),
    Local(mpsc::Sender<Incoming>),
}

type AckStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Ack, tonic::Status>> + Send>>;

struct Link {
    tx: Tx,
    acks: AckStream,
    endpoint: String,
}

struct Sender {
    outbox: Outbox,
    to: String,
    dest: Arc<Dest>,
}

/// What a sender remembers of a message it sent and that is not yet
/// acknowledged: its row key and size.
type InFlight = HashMap<uuid::Uuid, (Vec<u8>, u64)>;

impl Sender {
    async fn run(self) {
        let cancel = self.outbox.inner.cancel.clone();
        let mut backoff = BACKOFF_MIN;
        loop {
            if cancel.is_cancelled() || self.dest.lock().closed {
                return;
            }
            match self.session().await {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "delivery failed");
                    {
                        let mut q = self.dest.lock();
                        q.status.connected = false;
                        q.status.last_error = e.clone();
                        // Unacked messages must go again: read them back.
                        q.spilled = true;
                        q.urgent.clear();
                        q.bulk.clear();
                    }
                    if !self.outbox.confirmed(&self.to) {
                        self.expire();
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                        // A new address: try it now.
                        _ = self.dest.moved.notified() => backoff = BACKOFF_MIN,
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Deletes rows for a never-confirmed destination that waited longer
    /// than their time to live.
    fn expire(&self) {
        let ttl = self.outbox.inner.limits.unconfirmed_ttl.as_millis() as u64;
        let before = caroni_types::now_ms().saturating_sub(ttl);
        let prefix = Key::new().str(&self.to).finish();
        let rows = match self.outbox.inner.store.scan(OUTBOX, &prefix) {
            Ok(r) => r,
            Err(e) => {
                return tracing::warn!(error = %e, "cannot read the outbox to expire messages")
            }
        };
        let old: Vec<(Vec<u8>, u64)> = rows
            .into_iter()
            .filter(|(_, e)| staged_at_ms(&e.message_id) < before)
            .map(|(k, e)| (k, entry_size(&e)))
            .collect();
        if old.is_empty() {
            return;
        }
        let n = old.len() as u64;
        self.remove(&old, false);
        self.outbox.dropped(
            &self.to,
            n,
            "it never acknowledged a message and they waited past their time to live",
        );
    }

    /// Stops this sender when it has nothing left to send (true if so).
    fn reap(&self) -> bool {
        let mut dests = self.outbox.lock();
        let mut q = self.dest.lock();
        if q.len() > 0 || q.spilled || q.status.queued > 0 {
            return false;
        }
        q.closed = true;
        dests.remove(&self.to);
        drop(q);
        drop(dests);
        if !self.outbox.confirmed(&self.to) {
            // A stranger's address is not kept once nothing is queued for it.
            self.outbox.book().remove(&self.to);
            let mut b = Batch::default();
            b.delete(ADDRESSES, &Key::new().str(&self.to).finish());
            if let Err(e) = self.outbox.inner.store.write_relaxed(b) {
                tracing::debug!(error = %e, "cannot forget an address");
            }
        }
        tracing::debug!("sender idle; stopped");
        true
    }

    /// Reads rows not in flight back from the table into the lanes (after
    /// a restart, a broken stream or a spill).
    fn refill(&self, in_flight: &InFlight) -> Result<(), String> {
        self.dest.lock().spilled = false;
        let prefix = Key::new().str(&self.to).finish();
        let limit = in_flight.len() + MEM_QUEUE;
        let rows = self
            .outbox
            .inner
            .store
            .scan_limit(OUTBOX, &prefix, limit)
            .map_err(|e| e.to_string())?;
        let more = rows.len() >= limit;
        let mut q = self.dest.lock();
        // Rows notified while reading are in the lanes and maybe in
        // `rows`: a duplicate send is acknowledged without effect.
        let notified = std::mem::take(&mut q.urgent)
            .into_iter()
            .chain(std::mem::take(&mut q.bulk));
        let mut seen = std::collections::HashSet::new();
        for (k, e) in rows.into_iter().chain(notified) {
            if !in_flight.contains_key(&e.message_id) && seen.insert(e.message_id) {
                if e.bulk {
                    q.bulk.push_back((k, e));
                } else {
                    q.urgent.push_back((k, e));
                }
            }
        }
        q.spilled |= more;
        Ok(())
    }

    async fn connect(&self, endpoint: &str) -> Result<Link, String> {
        if self.to == self.outbox.inner.me {
            if let Some(local) = self.outbox.inner.local.get() {
                let (tx, rx) = mpsc::channel::<Incoming>(WINDOW);
                let acks = pipeline(
                    local.clone(),
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                );
                return Ok(Link {
                    tx: Tx::Local(tx),
                    acks: Box::pin(tokio_stream::wrappers::ReceiverStream::new(acks)),
                    endpoint: "in-process".into(),
                });
            }
        }
        let links = self.outbox.inner.signer.links().clone();
        let me = self.outbox.inner.me.clone();
        let dial = tonic::transport::Endpoint::from_shared(crate::tls::plain_uri(endpoint))
            .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &links.tls {
            Some(tls) => {
                let config = tls.client_config(&self.to).map_err(|e| e.to_string())?;
                dial.connect_with_connector(crate::tls::connector(
                    config,
                    Some("caroni-node".into()),
                ))
                .await
            }
            None => dial.connect().await,
        }
        .map_err(|e| format!("cannot connect to {endpoint}: {}", crate::error_chain(&e)))?;
        let mut client = PeerServiceClient::new(channel)
            .max_encoding_message_size(MAX_ENVELOPE)
            .max_decoding_message_size(MAX_ENVELOPE);
        let (tx, rx) = mpsc::channel::<Envelope>(WINDOW);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(v) = me.parse() {
            req.metadata_mut().insert(crate::tls::NODE_HEADER, v);
        }
        if let Some(key) = &links.mesh_key {
            if let Ok(v) = key.proof(&me, &self.to).parse() {
                req.metadata_mut().insert(crate::tls::MESH_HEADER, v);
            }
        }
        let acks = client
            .deliver(req)
            .await
            .map_err(|e| format!("stream refused by {endpoint}: {}", e.message()))?
            .into_inner();
        Ok(Link {
            tx: Tx::Remote(tx),
            acks: Box::pin(acks),
            endpoint: endpoint.to_string(),
        })
    }

    /// One stream: returns Ok when cancelled or reaped, Err on any
    /// delivery failure.
    async fn session(&self) -> Result<(), String> {
        let cancel = self.outbox.inner.cancel.clone();
        let mut in_flight = InFlight::new();
        // Wait for work before connecting.
        loop {
            let (spilled, empty, endpoint) = {
                let q = self.dest.lock();
                (q.spilled, q.len() == 0, q.status.endpoint.clone())
            };
            if spilled {
                self.refill(&in_flight)?;
                continue;
            }
            if !empty {
                let mut link = self.connect(&endpoint).await?;
                self.dest.lock().status.connected = true;
                self.dest.lock().status.last_error.clear();
                return self.stream(&mut link, &mut in_flight, &cancel).await;
            }
            tokio::select! {
                _ = self.dest.notify.notified() => {}
                _ = tokio::time::sleep(self.outbox.inner.limits.idle) => {
                    if self.reap() {
                        return Ok(());
                    }
                }
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    async fn stream(
        &self,
        link: &mut Link,
        in_flight: &mut InFlight,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let me = self.outbox.inner.signer.node_id();
        let my_endpoint = self.outbox.inner.signer.endpoint().to_string();
        loop {
            // Send what the window allows, urgent lane first; to a remote
            // peer, what is ready goes in batches under one signature.
            let mut batch: Vec<(uuid::Uuid, Vec<u8>)> = Vec::new();
            let mut batch_bytes = 0;
            while in_flight.len() < WINDOW {
                let next = {
                    let mut q = self.dest.lock();
                    if q.len() == 0 && q.spilled && in_flight.len() < WINDOW / 2 {
                        drop(q);
                        self.refill(in_flight)?;
                        q = self.dest.lock();
                    }
                    q.pop()
                };
                let Some((key, entry)) = next else { break };
                if in_flight.contains_key(&entry.message_id) {
                    continue;
                }
                let closed = || format!("stream to {} closed", link.endpoint);
                let size = entry_size(&entry);
                match &link.tx {
                    Tx::Remote(_) => {
                        if batch_bytes + entry.payload.len() > BATCH_BYTES {
                            self.send_batch(&link.tx, &link.endpoint, &mut batch)
                                .await?;
                            batch_bytes = 0;
                        }
                        in_flight.insert(entry.message_id, (key, size));
                        batch_bytes += entry.payload.len();
                        batch.push((entry.message_id, entry.payload));
                        if batch.len() >= BATCH {
                            batch_bytes = 0;
                            self.send_batch(&link.tx, &link.endpoint, &mut batch)
                                .await?;
                        }
                    }
                    Tx::Local(tx) => {
                        let (payload, trace) = match envelope::decode_payload(&entry.payload) {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::warn!(message_id = %entry.message_id, error = %e, "dropping an unreadable outbox row");
                                self.remove(&[(key, size)], false);
                                continue;
                            }
                        };
                        in_flight.insert(entry.message_id, (key, size));
                        let msg = Verified {
                            id: entry.message_id,
                            sender: me,
                            sender_name: self.outbox.inner.me.clone(),
                            sender_endpoint: my_endpoint.clone(),
                            sent_at_ms: caroni_types::now_ms(),
                            trace,
                            payload,
                        };
                        tx.send(Incoming::Verified(Box::new(msg)))
                            .await
                            .map_err(|_| closed())?;
                    }
                }
            }
            self.send_batch(&link.tx, &link.endpoint, &mut batch)
                .await?;
            tokio::select! {
                ack = link.acks.next() => {
                    let mut acks = vec![ack];
                    while acks.len() < ACK_BATCH {
                        match link.acks.next().now_or_never() {
                            Some(a) => acks.push(a),
                            None => break,
                        }
                    }
                    let mut done = Vec::with_capacity(acks.len());
                    for ack in acks {
                        let ack = match ack {
                            Some(Ok(a)) => a,
                            Some(Err(e)) => {
                                self.remove(&done, true);
                                return Err(format!("stream to {} failed: {}", link.endpoint, e.message()));
                            }
                            None => {
                                self.remove(&done, true);
                                return Err(format!("stream to {} closed", link.endpoint));
                            }
                        };
                        if !ack.accepted {
                            tracing::warn!(message_id = %ack.message_id, error = %ack.error, "peer refused a message for good; dropping it");
                        }
                        let Ok(id) = ack.message_id.parse::<uuid::Uuid>() else { continue };
                        if let Some(row) = in_flight.remove(&id) {
                            done.push(row);
                            if let Some(ts) = id.get_timestamp() {
                                let (s, n) = ts.to_unix();
                                let staged = s as f64 + f64::from(n) / 1e9;
                                let now = caroni_types::now_ms() as f64 / 1000.0;
                                caroni_store::metrics::METRICS
                                    .delivery_seconds
                                    .observe((now - staged).max(0.0));
                            }
                        }
                    }
                    self.remove(&done, true);
                    self.outbox.inner.liveness.heard(&self.to);
                    self.outbox.confirm(&self.to);
                }
                _ = self.dest.notify.notified() => {}
                _ = self.dest.moved.notified() => {
                    return Err(format!("the peer moved away from {}", link.endpoint));
                }
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// Seals the gathered messages in one envelope and sends it.
    async fn send_batch(
        &self,
        to: &Tx,
        endpoint: &str,
        batch: &mut Vec<(uuid::Uuid, Vec<u8>)>,
    ) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let Tx::Remote(tx) = to else {
            return Ok(());
        };
        let parts: Vec<(uuid::Uuid, &[u8])> =
            batch.iter().map(|(id, p)| (*id, p.as_slice())).collect();
        let env = self
            .outbox
            .inner
            .signer
            .seal_batch(&parts)
            .map_err(|e| e.to_string())?;
        batch.clear();
        tx.send(env)
            .await
            .map_err(|_| format!("stream to {endpoint} closed"))
    }

    /// Deletes rows: acknowledged (`delivered`) or dropped. Not synced: a
    /// row whose deletion is lost in a crash is sent again and acknowledged
    /// without effect.
    fn remove(&self, rows: &[(Vec<u8>, u64)], delivered: bool) {
        if rows.is_empty() {
            return;
        }
        let mut b = Batch::default();
        for (k, _) in rows {
            b.delete(OUTBOX, k);
        }
        if let Err(e) = self.outbox.inner.store.write_relaxed(b) {
            tracing::warn!(error = %e, "cannot delete outbox rows; they will be sent again");
        }
        let bytes: u64 = rows.iter().map(|(_, n)| n).sum();
        let mut q = self.dest.lock();
        q.status.queued = q.status.queued.saturating_sub(rows.len() as u64);
        q.bytes = q.bytes.saturating_sub(bytes);
        if delivered {
            q.status.delivered += rows.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caroni_proto::v1::{peer_service_server::PeerServiceServer, JobStatusRequest};
    use futures::future::BoxFuture;
    use libp2p::identity::Keypair;
    use std::collections::BTreeSet;
    use tokio::sync::watch;

    use crate::{Applying, InboxError, PeerServer};

    /// Records what it receives; holds every ack until the gate opens.
    struct Gated {
        got: Mutex<BTreeSet<uuid::Uuid>>,
        gate: watch::Receiver<bool>,
    }

    impl Inbox for Gated {
        fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, InboxError>> {
            self.got
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(msg.id);
            let mut gate = self.gate.clone();
            Box::pin(async move {
                let fut: Applying = Box::pin(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(())
                });
                Ok(fut)
            })
        }
    }

    /// A peer service on a free loopback port, until the token is cancelled.
    async fn serve(inbox: Arc<Gated>) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = PeerServer::new(inbox, Liveness::default());
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PeerServiceServer::new(server))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    c.cancelled_owned(),
                )
                .await
        });
        (addr, cancel)
    }

    /// A peer service of node `key` over TLS (with `mesh_key`, if any).
    async fn serve_tls(
        inbox: Arc<Gated>,
        key: &Keypair,
        mesh_key: Option<crate::MeshKey>,
    ) -> (std::net::SocketAddr, CancellationToken, crate::PeerRefusals) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let refusals = crate::PeerRefusals::default();
        let server = PeerServer::new(inbox, Liveness::default()).guarded(
            key.public().to_peer_id().to_base58(),
            mesh_key,
            refusals.clone(),
        );
        let tls = crate::PeerTls::new(key).expect("tls");
        let incoming = crate::tls::accept(listener, tls.server_config(), "test");
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PeerServiceServer::new(server))
                .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
                .await
        });
        (addr, cancel, refusals)
    }

    /// Sends one message from a new node with `links` to `peer` at `addr`;
    /// returns the destination's status once it was delivered or failed.
    async fn send_one(
        key: Keypair,
        links: crate::Links,
        peer: &str,
        addr: std::net::SocketAddr,
    ) -> PeerStatus {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let signer = Signer::new(key, "https://127.0.0.1:1".into()).with_links(links);
        let cancel = CancellationToken::new();
        let outbox =
            Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
        let mut b = Batch::default();
        let staged = outbox
            .stage(
                &mut b,
                peer,
                &format!("https://{addr}"),
                status_request(1),
                None,
            )
            .expect("stage");
        outbox.inner.store.write(b).expect("write");
        outbox.notify(vec![staged]);
        let st = || {
            outbox
                .status()
                .into_iter()
                .find(|s| s.node_id == peer)
                .expect("destination")
        };
        wait_until("delivered or failed", || {
            let s = st();
            s.delivered > 0 || !s.last_error.is_empty()
        })
        .await;
        cancel.cancel();
        st()
    }

    fn tls_links(key: &Keypair, mesh_key: Option<crate::MeshKey>) -> crate::Links {
        crate::Links {
            tls: Some(Arc::new(crate::PeerTls::new(key).expect("tls"))),
            mesh_key,
        }
    }

    /// Over TLS, a node reaches the node it means to reach, and no other
    /// node's certificate passes for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_links_reach_only_the_node_named() {
        let (_open, gate) = watch::channel(true);
        let inbox = Arc::new(Gated {
            got: Mutex::default(),
            gate,
        });
        let server_key = Keypair::generate_ed25519();
        let server_id = server_key.public().to_peer_id().to_base58();
        let (addr, cancel, _) = serve_tls(inbox.clone(), &server_key, None).await;

        let key = Keypair::generate_ed25519();
        let ok = send_one(key.clone(), tls_links(&key, None), &server_id, addr).await;
        assert_eq!(ok.delivered, 1, "{ok:?}");
        assert_eq!(inbox.got.lock().map(|g| g.len()).unwrap_or(0), 1);

        // The same address, taken for another node: refused in the handshake.
        let other = Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_base58();
        let key = Keypair::generate_ed25519();
        let wrong = send_one(key.clone(), tls_links(&key, None), &other, addr).await;
        assert_eq!(wrong.delivered, 0);
        assert!(
            wrong
                .last_error
                .contains(&format!("is {server_id}, not {other}")),
            "{wrong:?}"
        );
        // A plaintext sender does not get through.
        let plain = send_one(
            Keypair::generate_ed25519(),
            crate::Links::default(),
            &server_id,
            addr,
        )
        .await;
        assert_eq!(plain.delivered, 0, "{plain:?}");
        cancel.cancel();
    }

    /// A private mesh's listener takes streams only from nodes that prove
    /// its key, and counts the others' refusals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_private_mesh_refuses_streams_without_its_key() {
        let (_open, gate) = watch::channel(true);
        let inbox = Arc::new(Gated {
            got: Mutex::default(),
            gate,
        });
        let mesh = crate::MeshKey::generate().expect("key");
        let server_key = Keypair::generate_ed25519();
        let server_id = server_key.public().to_peer_id().to_base58();
        let (addr, cancel, refusals) =
            serve_tls(inbox.clone(), &server_key, Some(mesh.clone())).await;

        let stranger = Keypair::generate_ed25519();
        let st = send_one(
            stranger.clone(),
            tls_links(&stranger, None),
            &server_id,
            addr,
        )
        .await;
        assert_eq!(st.delivered, 0);
        assert!(st.last_error.contains("did not prove"), "{st:?}");
        let other = Keypair::generate_ed25519();
        let another = crate::MeshKey::generate().expect("key");
        let st = send_one(
            other.clone(),
            tls_links(&other, Some(another)),
            &server_id,
            addr,
        )
        .await;
        assert!(st.last_error.contains("is wrong"), "{st:?}");
        let member = Keypair::generate_ed25519();
        let st = send_one(
            member.clone(),
            tls_links(&member, Some(mesh)),
            &server_id,
            addr,
        )
        .await;
        assert_eq!(st.delivered, 1, "{st:?}");
        let refused: Vec<String> = refusals.all().into_iter().map(|(n, _, _)| n).collect();
        assert!(refused.contains(&stranger.public().to_peer_id().to_base58()));
        assert!(refused.contains(&other.public().to_peer_id().to_base58()));
        assert!(!refused.contains(&member.public().to_peer_id().to_base58()));
        cancel.cancel();
    }

    fn status_request(n: u64) -> Payload {
        Payload::JobStatusRequest(JobStatusRequest {
            job_id: n.to_string(),
        })
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A peer that withholds its acks fills the window; messages staged
    /// meanwhile (and one staged after the acks came) are all delivered:
    /// no wake-up is lost, and the outbox ends empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_withholds_acks_loses_no_message() {
        let (open, gate) = watch::channel(false);
        let inbox = Arc::new(Gated {
            got: Mutex::default(),
            gate,
        });
        let (addr, cancel) = serve(inbox.clone()).await;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let signer = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let outbox =
            Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
        let peer = Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_base58();
        let endpoint = format!("http://{addr}");
        let stage = |from: u64, to: u64| {
            let mut b = Batch::default();
            let staged: Vec<_> = (from..to)
                .map(|n| {
                    outbox
                        .stage(&mut b, &peer, &endpoint, status_request(n), None)
                        .expect("stage")
                })
                .collect();
            outbox.inner.store.write(b).expect("write");
            outbox.notify(staged);
        };
        let total = (WINDOW + WINDOW / 2) as u64;
        for chunk in 0..total / 64 {
            stage(chunk * 64, (chunk + 1) * 64);
        }
        let got = |n: usize| inbox.got.lock().map(|g| g.len() >= n).unwrap_or(false);
        wait_until("the window fills", || got(WINDOW)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            inbox.got.lock().map(|g| g.len()).unwrap_or(0),
            WINDOW,
            "no more than a window is sent before acks"
        );
        open.send_replace(true);
        wait_until("everything staged arrives", || got(total as usize)).await;
        stage(total, total + 1);
        wait_until("a message staged later arrives", || got(total as usize + 1)).await;
        wait_until("the outbox drains", || {
            outbox.status().iter().all(|s| s.queued == 0)
                && outbox
                    .inner
                    .store
                    .scan(OUTBOX, &[])
                    .map(|r| r.is_empty())
                    .unwrap_or(false)
        })
        .await;
        let st = outbox.status();
        assert_eq!(st[0].delivered, total + 1);
        cancel.cancel();
    }

    /// After a restart the sender reads its queue back from the table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_left_by_a_restart_are_delivered() {
        let (_open, gate) = watch::channel(true);
        let inbox = Arc::new(Gated {
            got: Mutex::default(),
            gate,
        });
        let (addr, cancel) = serve(inbox.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = Keypair::generate_ed25519();
        let peer = Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_base58();
        {
            // Staged and written, never announced: as if the node died.
            let store = Store::open(dir.path()).expect("store");
            let signer = Signer::new(key.clone(), "http://127.0.0.1:1".into());
            let quiet = CancellationToken::new();
            let outbox = Outbox::start(store.clone(), signer, Liveness::default(), quiet.clone())
                .expect("outbox");
            let mut b = Batch::default();
            for n in 0..10 {
                outbox
                    .stage(
                        &mut b,
                        &peer,
                        &format!("http://{addr}"),
                        status_request(n),
                        None,
                    )
                    .expect("stage");
            }
            store.write(b).expect("write");
            quiet.cancel();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let store = Store::open(dir.path()).expect("reopen");
        let signer = Signer::new(key, "http://127.0.0.1:1".into());
        let _outbox =
            Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
        wait_until("the queued rows arrive", || {
            inbox.got.lock().map(|g| g.len() == 10).unwrap_or(false)
        })
        .await;
        cancel.cancel();
    }

    /// An outbox on a fresh store, with a fresh key.
    fn test_outbox(limits: Limits) -> (tempfile::TempDir, Outbox, CancellationToken) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let signer = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let cancel = CancellationToken::new();
        let outbox = Outbox::start_with(store, signer, Liveness::default(), cancel.clone(), limits)
            .expect("outbox");
        (dir, outbox, cancel)
    }

    fn closed_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    }

    fn new_peer() -> String {
        Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_base58()
    }

    fn stage_one(outbox: &Outbox, to: &str, endpoint: &str, n: u64) {
        let mut b = Batch::default();
        let staged = outbox
            .stage(&mut b, to, endpoint, status_request(n), None)
            .expect("stage");
        outbox.inner.store.write(b).expect("write");
        outbox.notify(vec![staged]);
    }

    fn rows_for(outbox: &Outbox, to: &str) -> usize {
        outbox
            .inner
            .store
            .scan(OUTBOX, &Key::new().str(to).finish())
            .map(|r| r.len())
            .unwrap_or(usize::MAX)
    }

    /// Messages queued for a peer at an address where nothing answers go
    /// to the address the peer gives next, at once, without a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_messages_follow_a_peer_to_its_new_address() {
        let (_dir, outbox, cancel) = test_outbox(Limits::default());
        let peer = new_peer();
        for n in 0..5 {
            stage_one(&outbox, &peer, &closed_endpoint(), n);
        }
        wait_until("the old address fails", || {
            outbox.status().iter().any(|s| !s.last_error.is_empty())
        })
        .await;
        let (_open, gate) = watch::channel(true);
        let inbox = Arc::new(Gated {
            got: Mutex::default(),
            gate,
        });
        let (addr, server) = serve(inbox.clone()).await;
        let moved_to = format!("http://{addr}");
        // An older word does not move it; the newer one does.
        outbox.learn(&peer, "http://127.0.0.1:2", 10);
        outbox.learn(&peer, &moved_to, caroni_types::now_ms());
        outbox.learn(&peer, "http://127.0.0.1:3", 20);
        wait_until("the queue arrives at the new address", || {
            inbox.got.lock().map(|g| g.len() == 5).unwrap_or(false)
        })
        .await;
        wait_until("the outbox drains", || rows_for(&outbox, &peer) == 0).await;
        let st = outbox.status();
        assert_eq!(st[0].endpoint, moved_to);
        assert!(st[0].confirmed, "it acknowledged, so it is confirmed");
        // A message staged with the stale address goes to the new one too.
        stage_one(&outbox, &peer, "http://127.0.0.1:2", 99);
        wait_until("a message staged with a stale address arrives", || {
            inbox.got.lock().map(|g| g.len() == 6).unwrap_or(false)
        })
        .await;
        cancel.cancel();
        server.cancel();
    }

    /// A destination that never acknowledged anything gets a bounded
    /// queue; so does the number of such destinations; its messages expire
    /// and its sender stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_strangers_queue_is_bounded_expires_and_its_sender_stops() {
        let limits = Limits {
            max_queued_unconfirmed: 10,
            max_unconfirmed_peers: 2,
            unconfirmed_ttl: Duration::from_millis(1500),
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let (_dir, outbox, cancel) = test_outbox(limits);
        let (p1, p2, p3) = (new_peer(), new_peer(), new_peer());
        let nowhere = closed_endpoint();
        for n in 0..15 {
            stage_one(&outbox, &p1, &nowhere, n);
        }
        stage_one(&outbox, &p2, &nowhere, 0);
        stage_one(&outbox, &p3, &nowhere, 0);
        let st = outbox.status();
        let s1 = st.iter().find(|s| s.node_id == p1).expect("p1");
        assert_eq!((s1.queued, s1.dropped), (10, 5), "{s1:?}");
        assert_eq!(rows_for(&outbox, &p1), 10);
        assert!(
            st.iter().all(|s| s.node_id != p3),
            "a third stranger gets no queue"
        );
        assert_eq!(rows_for(&outbox, &p3), 0);
        assert!(
            outbox.endpoint_of(&p3).is_none(),
            "a dropped stranger is not remembered"
        );
        wait_until(
            "the strangers' messages expire and their senders stop",
            || {
                outbox.status().is_empty()
                    && rows_for(&outbox, &p1) == 0
                    && rows_for(&outbox, &p2) == 0
            },
        )
        .await;
        // Room again for a new stranger.
        stage_one(&outbox, &p3, &nowhere, 1);
        assert_eq!(rows_for(&outbox, &p3), 1);
        cancel.cancel();
    }

    /// A message larger than any peer accepts is refused when staged and
    /// counted; it never reaches a queue where it would block the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_message_is_refused_at_staging() {
        let (_dir, outbox, cancel) = test_outbox(Limits::default());
        let peer = new_peer();
        let nowhere = closed_endpoint();
        stage_one(&outbox, &peer, &nowhere, 1);
        let huge = Payload::JobKill(caroni_proto::v1::JobKill {
            job_id: "j".into(),
            reason: "x".repeat(MAX_MESSAGE + 1),
        });
        let mut b = Batch::default();
        let staged = outbox
            .stage(&mut b, &peer, &nowhere, huge, None)
            .expect("stage");
        assert!(staged.item.is_none(), "not staged");
        assert!(b.is_empty(), "nothing written for it");
        outbox.notify(vec![staged]);
        let st = outbox.status();
        assert_eq!((st[0].queued, st[0].dropped), (1, 1), "{st:?}");
        cancel.cancel();
    }
}
