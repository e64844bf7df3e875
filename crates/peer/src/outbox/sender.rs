//! The sender task of one destination: reads its rows, signs and sends
//! them over one long-lived stream (or hands them to the local inbox),
//! deletes each once acknowledged, and backs off while the peer is away.

use std::collections::HashMap;
use std::sync::Arc;

use caroni_proto::v1::{peer_service_client::PeerServiceClient, Ack, Envelope};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::*;

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

/// Why a session with a destination ended: its rows are sent again after
/// a back-off. Shown as the destination's `last_error` in `caroni peers`.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The destination's address is not a URL.
    #[error("bad endpoint {endpoint}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    /// No TLS configuration for the destination.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The connection could not be made.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The peer refused the stream.
    #[error("stream refused by {endpoint}: {reason}")]
    Refused { endpoint: String, reason: String },
    /// The stream failed midway.
    #[error("stream to {endpoint} failed: {reason}")]
    Failed { endpoint: String, reason: String },
    /// The stream ended.
    #[error("stream to {0} closed")]
    Closed(String),
    /// The destination announced another address.
    #[error("the peer moved away from {0}")]
    Moved(String),
    /// Rows could not be read, or a batch not signed.
    #[error(transparent)]
    Local(#[from] Error),
}

impl From<caroni_store::Error> for LinkError {
    fn from(e: caroni_store::Error) -> Self {
        LinkError::Local(Error::Store(e))
    }
}

/// A channel to node `to` at `endpoint`: over TLS (checking that the
/// server is `to`) when the node has TLS.
pub(crate) async fn dial(
    links: &crate::tls::Links,
    to: &str,
    endpoint: &str,
) -> Result<tonic::transport::Channel, LinkError> {
    let dial = tonic::transport::Endpoint::from_shared(crate::tls::plain_uri(endpoint))
        .map_err(|e| LinkError::BadEndpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20));
    match &links.tls {
        Some(tls) => {
            let config = tls.client_config(to)?;
            dial.connect_with_connector(crate::tls::connector(config, Some("caroni-node".into())))
                .await
        }
        None => dial.connect().await,
    }
    .map_err(|e| LinkError::Connect {
        endpoint: endpoint.to_string(),
        reason: crate::error_chain(&e),
    })
}

pub(super) struct Sender {
    pub(super) outbox: Outbox,
    pub(super) to: String,
    pub(super) dest: Arc<Dest>,
}

/// What a sender remembers of a message it sent and that is not yet
/// acknowledged: its row key and size.
type InFlight = HashMap<uuid::Uuid, (Vec<u8>, u64)>;

impl Sender {
    pub(super) async fn run(self) {
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
                        q.status.last_error = e.to_string();
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
    fn refill(&self, in_flight: &InFlight) -> Result<(), LinkError> {
        self.dest.lock().spilled = false;
        let prefix = Key::new().str(&self.to).finish();
        let limit = in_flight.len() + MEM_QUEUE;
        let rows = self.outbox.inner.store.scan_limit(OUTBOX, &prefix, limit)?;
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

    async fn connect(&self, endpoint: &str) -> Result<Link, LinkError> {
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
        let channel = dial(&links, &self.to, endpoint).await?;
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
            .map_err(|e| LinkError::Refused {
                endpoint: endpoint.to_string(),
                reason: e.message().to_string(),
            })?
            .into_inner();
        Ok(Link {
            tx: Tx::Remote(tx),
            acks: Box::pin(acks),
            endpoint: endpoint.to_string(),
        })
    }

    /// One stream: returns Ok when cancelled or reaped, Err on any
    /// delivery failure.
    async fn session(&self) -> Result<(), LinkError> {
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
    ) -> Result<(), LinkError> {
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
                let closed = || LinkError::Closed(link.endpoint.clone());
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
                            unfetched: None,
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
                                return Err(LinkError::Failed {
                                    endpoint: link.endpoint.clone(),
                                    reason: e.message().to_string(),
                                });
                            }
                            None => {
                                self.remove(&done, true);
                                return Err(LinkError::Closed(link.endpoint.clone()));
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
                                caroni_metrics::METRICS
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
                    return Err(LinkError::Moved(link.endpoint.clone()));
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
    ) -> Result<(), LinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let Tx::Remote(tx) = to else {
            return Ok(());
        };
        let parts: Vec<(uuid::Uuid, &[u8])> =
            batch.iter().map(|(id, p)| (*id, p.as_slice())).collect();
        let env = self.outbox.inner.signer.seal_batch(&parts)?;
        batch.clear();
        tx.send(env)
            .await
            .map_err(|_| LinkError::Closed(endpoint.to_string()))
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
