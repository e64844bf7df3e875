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
}

#[derive(Default)]
struct Queue {
    urgent: VecDeque<(Vec<u8>, Entry)>,
    bulk: VecDeque<(Vec<u8>, Entry)>,
    /// Rows exist on disk that are not in the lanes.
    spilled: bool,
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
    /// Opens the outbox and starts a sender for every destination that has
    /// messages left from before a restart. Rows of the first format are
    /// converted first.
    pub fn start(
        store: Store,
        signer: Signer,
        liveness: Liveness,
        cancel: CancellationToken,
    ) -> Result<Self, Error> {
        migrate_legacy(&store)?;
        let mut max_seq = 0;
        let mut depth: HashMap<String, (u64, String)> = HashMap::new();
        for (k, e) in store.scan(OUTBOX, &[])? {
            let mut r = Reader::new(&k);
            if let (Some(dest), Some(seq)) = (r.str(), r.u64()) {
                max_seq = max_seq.max(seq);
                let d = depth.entry(dest.to_string()).or_default();
                d.0 += 1;
                d.1 = e.endpoint.clone();
            }
        }
        let outbox = Self {
            inner: Arc::new(Inner {
                store,
                me: signer.node_id().to_base58(),
                signer,
                seq: AtomicU64::new(max_seq + 1),
                dests: Mutex::new(HashMap::new()),
                local: OnceLock::new(),
                liveness,
                cancel,
            }),
        };
        for (dest, (n, endpoint)) in depth {
            tracing::info!(peer = %dest, queued = n, "resuming delivery of queued messages");
            let d = outbox.dest(&dest);
            let mut q = d.lock();
            q.spilled = true;
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

    /// Adds `payload` for node `to` (reachable at `endpoint`) to `batch`.
    /// Call [`Outbox::notify`] with the returned handle after the batch is
    /// written.
    pub fn stage(
        &self,
        batch: &mut Batch,
        to: &str,
        endpoint: &str,
        payload: Payload,
    ) -> Result<Staged, Error> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let key = Key::new().str(to).u64(seq).finish();
        let entry = Entry {
            endpoint: endpoint.to_string(),
            message_id: uuid::Uuid::now_v7(),
            bulk: is_bulk(&payload),
            payload: envelope::encode_payload(payload),
        };
        batch.put(OUTBOX, &key, &entry);
        Ok(Staged {
            to: to.to_string(),
            endpoint: endpoint.to_string(),
            item: Some(Arc::new((key, entry))),
        })
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
            let d = self.dest(&s.to);
            let mut q = d.lock();
            q.status.queued += 1;
            q.status.endpoint = s.endpoint;
            match s.item.and_then(|i| i.downcast::<(Vec<u8>, Entry)>().ok()) {
                Some(item) => {
                    let (key, entry) = Arc::unwrap_or_clone(item);
                    q.push(key, entry);
                }
                None => q.spilled = true,
            }
            drop(q);
            d.notify.notify_one();
        }
    }

    /// Delivery state of every destination.
    pub fn status(&self) -> Vec<PeerStatus> {
        let dests: Vec<Arc<Dest>> = self.lock().values().cloned().collect();
        let mut all: Vec<_> = dests.iter().map(|d| d.lock().status.clone()).collect();
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
                payload: envelope::encode_payload(v.payload),
            });
        match converted {
            Some(entry) => b.put(OUTBOX, key, &entry),
            None => tracing::warn!(message = %e.message_id, "dropping an unreadable outbox row"),
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

impl Sender {
    async fn run(self) {
        let cancel = self.outbox.inner.cancel.clone();
        let mut backoff = BACKOFF_MIN;
        loop {
            if cancel.is_cancelled() {
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
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Reads rows not in flight back from the table into the lanes (after
    /// a restart, a broken stream or a spill).
    fn refill(&self, in_flight: &HashMap<uuid::Uuid, Vec<u8>>) -> Result<(), String> {
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
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        let mut client = PeerServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<Envelope>(WINDOW);
        let acks = client
            .deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("stream refused by {endpoint}: {}", e.message()))?
            .into_inner();
        Ok(Link {
            tx: Tx::Remote(tx),
            acks: Box::pin(acks),
            endpoint: endpoint.to_string(),
        })
    }

    /// One stream: returns Ok when cancelled, Err on any delivery failure.
    async fn session(&self) -> Result<(), String> {
        let cancel = self.outbox.inner.cancel.clone();
        let mut in_flight: HashMap<uuid::Uuid, Vec<u8>> = HashMap::new();
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
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    async fn stream(
        &self,
        link: &mut Link,
        in_flight: &mut HashMap<uuid::Uuid, Vec<u8>>,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let me = self.outbox.inner.signer.node_id();
        let my_endpoint = self.outbox.inner.signer.endpoint().to_string();
        loop {
            // Send what the window allows, urgent lane first; to a remote
            // peer, what is ready goes in batches under one signature.
            let mut batch: Vec<(uuid::Uuid, Vec<u8>)> = Vec::new();
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
                match &link.tx {
                    Tx::Remote(_) => {
                        in_flight.insert(entry.message_id, key);
                        batch.push((entry.message_id, entry.payload));
                        if batch.len() >= BATCH {
                            self.send_batch(&link.tx, &link.endpoint, &mut batch)
                                .await?;
                        }
                    }
                    Tx::Local(tx) => {
                        let payload = match envelope::decode_payload(&entry.payload) {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::warn!(message = %entry.message_id, error = %e, "dropping an unreadable outbox row");
                                self.delete(&[key]);
                                continue;
                            }
                        };
                        in_flight.insert(entry.message_id, key);
                        let msg = Verified {
                            id: entry.message_id,
                            sender: me,
                            sender_name: self.outbox.inner.me.clone(),
                            sender_endpoint: my_endpoint.clone(),
                            sent_at_ms: caroni_types::now_ms(),
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
                                self.delete(&done);
                                return Err(format!("stream to {} failed: {}", link.endpoint, e.message()));
                            }
                            None => {
                                self.delete(&done);
                                return Err(format!("stream to {} closed", link.endpoint));
                            }
                        };
                        if !ack.accepted {
                            tracing::warn!(message = %ack.message_id, error = %ack.error, "peer refused a message for good; dropping it");
                        }
                        let Ok(id) = ack.message_id.parse::<uuid::Uuid>() else { continue };
                        if let Some(key) = in_flight.remove(&id) {
                            done.push(key);
                        }
                    }
                    self.delete(&done);
                    self.outbox.inner.liveness.heard(&self.to);
                }
                _ = self.dest.notify.notified() => {}
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

    /// Deletes acknowledged rows. Not synced: a row whose deletion is lost
    /// in a crash is sent again and acknowledged without effect.
    fn delete(&self, keys: &[Vec<u8>]) {
        if keys.is_empty() {
            return;
        }
        let mut b = Batch::default();
        for k in keys {
            b.delete(OUTBOX, k);
        }
        if let Err(e) = self.outbox.inner.store.write_relaxed(b) {
            tracing::warn!(error = %e, "cannot delete delivered outbox rows; they will be sent again");
        }
        let mut q = self.dest.lock();
        q.status.queued = q.status.queued.saturating_sub(keys.len() as u64);
        q.status.delivered += keys.len() as u64;
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
                        .stage(&mut b, &peer, &endpoint, status_request(n))
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
                    .stage(&mut b, &peer, &format!("http://{addr}"), status_request(n))
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
}
