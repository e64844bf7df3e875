//! The durable outbox and its sender tasks.
//!
//! Table `OUTBOX`: key = (destination node id, sequence), value = the
//! destination endpoint and the encoded envelope. Staging adds to the
//! caller's batch; after the caller's write, [`Outbox::notify`] wakes (or
//! starts) the destination's sender task.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caroni_proto::v1::{message::Payload, peer_service_client::PeerServiceClient, Envelope};
use caroni_store::{keys::Key, keys::Reader, tables, wire::Staged, Batch, Store, Table};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Error, Signer};

/// One staged message.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    endpoint: String,
    message_id: String,
    envelope: Vec<u8>,
}

const OUTBOX: Table<Entry> = Table::new(tables::OUTBOX, "outbox");

/// Largest number of unacknowledged messages on one stream.
const WINDOW: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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

struct Dest {
    notify: Arc<Notify>,
    status: PeerStatus,
}

struct Inner {
    store: Store,
    signer: Signer,
    seq: AtomicU64,
    dests: Mutex<HashMap<String, Dest>>,
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

impl Outbox {
    /// Opens the outbox and starts a sender for every destination that has
    /// messages left from before a restart.
    pub fn start(store: Store, signer: Signer, cancel: CancellationToken) -> Result<Self, Error> {
        let pending = store.scan(OUTBOX, &[])?;
        let mut max_seq = 0;
        let mut depth: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for (k, e) in &pending {
            let mut r = Reader::new(k);
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
                signer,
                seq: AtomicU64::new(max_seq + 1),
                dests: Mutex::new(HashMap::new()),
                cancel,
            }),
        };
        for (dest, (n, endpoint)) in depth {
            tracing::info!(peer = %dest, queued = n, "resuming delivery of queued messages");
            outbox.ensure_sender(&dest, &endpoint, n);
        }
        Ok(outbox)
    }

    /// This node's signer.
    pub fn signer(&self) -> &Signer {
        &self.inner.signer
    }

    /// Seals `payload` for node `to` (reachable at `endpoint`) and adds it
    /// to `batch`. Call [`Outbox::notify`] with the returned handle after
    /// the batch is written.
    pub fn stage(
        &self,
        batch: &mut Batch,
        to: &str,
        endpoint: &str,
        payload: Payload,
    ) -> Result<Staged, Error> {
        let (id, env) = self.inner.signer.seal(payload)?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        batch.put(
            OUTBOX,
            &Key::new().str(to).u64(seq).finish(),
            &Entry {
                endpoint: endpoint.to_string(),
                message_id: id.to_string(),
                envelope: env.encode_to_vec(),
            },
        );
        Ok(Staged {
            to: to.to_string(),
            endpoint: endpoint.to_string(),
        })
    }

    /// Wakes the senders of messages staged in a batch that is now written.
    pub fn notify(&self, staged: Vec<Staged>) {
        for s in &staged {
            self.ensure_sender(&s.to, &s.endpoint, 1);
        }
    }

    /// Delivery state of every destination.
    pub fn status(&self) -> Vec<PeerStatus> {
        let dests = self.lock();
        let mut all: Vec<_> = dests.values().map(|d| d.status.clone()).collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Dest>> {
        self.inner
            .dests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ensure_sender(&self, to: &str, endpoint: &str, added: u64) {
        let mut dests = self.lock();
        if let Some(d) = dests.get_mut(to) {
            d.status.queued += added;
            d.status.endpoint = endpoint.to_string();
            d.notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        dests.insert(
            to.to_string(),
            Dest {
                notify: notify.clone(),
                status: PeerStatus {
                    node_id: to.to_string(),
                    endpoint: endpoint.to_string(),
                    queued: added,
                    ..Default::default()
                },
            },
        );
        let sender = Sender {
            outbox: self.clone(),
            to: to.to_string(),
            notify,
        };
        let span = tracing::info_span!("outbox", node = %self.inner.signer.node_id(), peer = %to);
        tokio::spawn(sender.run().instrument(span));
    }

    fn update(&self, to: &str, f: impl FnOnce(&mut PeerStatus)) {
        if let Some(d) = self.lock().get_mut(to) {
            f(&mut d.status);
        }
    }
}

struct Sender {
    outbox: Outbox,
    to: String,
    notify: Arc<Notify>,
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
                    self.outbox.update(&self.to, |s| {
                        s.connected = false;
                        s.last_error = e.clone();
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Entries not yet in flight, in key order. The scan starts at the
    /// beginning of the destination's entries every time: two engines stage
    /// concurrently, so an entry with a lower sequence number can become
    /// visible after a higher one was sent, and must not be skipped. A
    /// batch's entries become visible together, so the order of the
    /// messages of one state change (data before status) is kept.
    fn pending(
        &self,
        in_flight: &HashMap<String, Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Entry)>, String> {
        let prefix = Key::new().str(&self.to).finish();
        let all = self
            .outbox
            .inner
            .store
            .scan_limit(OUTBOX, &prefix, in_flight.len() + WINDOW)
            .map_err(|e| e.to_string())?;
        Ok(all
            .into_iter()
            .filter(|(_, e)| !in_flight.contains_key(&e.message_id))
            .collect())
    }

    /// One stream: returns Ok when the outbox is drained and idle long
    /// enough to close, Err on any delivery failure.
    async fn session(&self) -> Result<(), String> {
        let cancel = self.outbox.inner.cancel.clone();
        // Wait for work before connecting.
        let mut in_flight: HashMap<String, Vec<u8>> = HashMap::new();
        let mut batch = self.pending(&in_flight)?;
        while batch.is_empty() {
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = cancel.cancelled() => return Ok(()),
            }
            batch = self.pending(&in_flight)?;
        }
        let endpoint = batch[0].1.endpoint.clone();
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
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
        let mut acks = client
            .deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("stream refused by {endpoint}: {}", e.message()))?
            .into_inner();
        self.outbox.update(&self.to, |s| {
            s.connected = true;
            s.last_error.clear();
        });
        let mut more = batch.len() >= WINDOW;
        loop {
            for (key, entry) in batch.drain(..) {
                if in_flight.len() >= WINDOW {
                    break;
                }
                let env = Envelope::decode(entry.envelope.as_slice())
                    .map_err(|e| format!("corrupt outbox entry: {e}"))?;
                in_flight.insert(entry.message_id.clone(), key);
                tx.send(env)
                    .await
                    .map_err(|_| "stream closed".to_string())?;
            }
            let mut rescan = false;
            tokio::select! {
                ack = acks.next() => {
                    let ack = match ack {
                        Some(Ok(a)) => a,
                        Some(Err(e)) => return Err(format!("stream to {endpoint} failed: {}", e.message())),
                        None => return Err(format!("stream to {endpoint} closed")),
                    };
                    if !ack.accepted {
                        tracing::warn!(message = %ack.message_id, error = %ack.error, "peer refused a message for good; dropping it");
                    }
                    if let Some(key) = in_flight.remove(&ack.message_id) {
                        let mut b = Batch::default();
                        b.delete(OUTBOX, &key[..]);
                        // Deleting an acknowledged entry need not be synced:
                        // if lost, it is sent again and deduplicated.
                        self.outbox.inner.store.write_relaxed(b).map_err(|e| e.to_string())?;
                        self.outbox.update(&self.to, |s| {
                            s.queued = s.queued.saturating_sub(1);
                            s.delivered += 1;
                        });
                    }
                }
                _ = self.notify.notified() => rescan = true,
                _ = cancel.cancelled() => return Ok(()),
            }
            // New entries appear only with a notification; a window that
            // was full may have left entries behind.
            if (rescan || more) && in_flight.len() < WINDOW / 2 {
                batch = self.pending(&in_flight)?;
                more = batch.len() > WINDOW - in_flight.len();
                batch.truncate(WINDOW - in_flight.len());
            }
        }
    }
}
