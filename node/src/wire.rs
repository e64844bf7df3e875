//! The node's transport as the engines see it ([`caroni_engine::Wire`]),
//! the inbox that routes verified peer messages to the engine of their
//! kind, and the gossip listener. Routing is all they decide: the checks
//! of what a message may say are the engines' machines' (a request's reply
//! endpoint, its fields, requests only over gossip), so that this node's
//! own requests, handed to its own agent, pass the same checks.

use std::sync::{Arc, OnceLock};

use caroni_engine::Staged;
use caroni_peer::{Applying, DeliverError, Inbox, Liveness, Outbox, Preparing, Verified};
use caroni_proto::v1::{message::Payload, Envelope};
use caroni_store::Batch;
use caroni_types::msg::{Inbound, JobRequest, Msg, Outbound};
use futures::future::BoxFuture;
use prost::Message as _;
use tokio::sync::mpsc;

/// Stages through the outbox; publishes on gossip and to the local agent.
pub struct NodeWire {
    pub outbox: Outbox,
    pub mesh: caroni_mesh::Client,
    pub local_agent: OnceLock<caroni_agent::service::Handle>,
    /// This node's manager, which hears its own agent's adverts directly.
    pub local_manager: OnceLock<caroni_manager::service::Handle>,
    /// This node's agent's last advert, handed to the manager when it
    /// starts (the agent starts first).
    pub last_advert: std::sync::Mutex<Option<caroni_types::market::Advert>>,
    /// The adverts heard on gossip, newest of each agent (for `caroni
    /// peers`; the manager keeps its own).
    pub adverts: std::sync::Mutex<std::collections::HashMap<String, caroni_types::market::Advert>>,
    pub liveness: Liveness,
    /// Job requests published on gossip.
    pub published: std::sync::atomic::AtomicU64,
    /// What this node refused of each peer.
    pub refusals: caroni_peer::PeerRefusals,
    /// The node's blob store.
    pub blobs: caroni_blob::Blobs,
}

/// Every File reference in the values of a data message.
fn file_refs<'a>(values: impl Iterator<Item = &'a String>) -> Vec<caroni_types::file::FileRef> {
    values
        .flat_map(|v| caroni_types::file::refs_in(v.as_str()))
        .collect()
}

static ALLOWLIST_REFUSALS: caroni_peer::Refusals = caroni_peer::Refusals::new();

impl caroni_engine::Wire for NodeWire {
    fn stage(
        &self,
        batch: &mut Batch,
        out: &Outbound,
        trace: Option<uuid::Uuid>,
    ) -> Result<Staged, caroni_engine::StageError> {
        if matches!(out.msg, Msg::Accept { .. }) {
            caroni_metrics::METRICS
                .offers
                .get_or_create(&caroni_metrics::label("outcome", "accepted"))
                .inc();
        }
        tracing::debug!(target: "caroni::message", workflow = %caroni_types::msg::Trace(trace), to = %out.to, kind = out.msg.name(), "sending");
        // Giving a peer a File reference gives it the right to read the
        // file from this node, in the same batch.
        if let Msg::Data { items, .. } = &out.msg {
            for f in file_refs(items.values()) {
                caroni_blob::Blobs::grant(batch, &f.sha256, &out.to);
            }
        }
        self.outbox
            .stage(
                batch,
                &out.to,
                &out.endpoint,
                Payload::from(out.msg.clone()),
                trace,
            )
            .map_err(Into::into)
    }

    fn notify(&self, staged: Vec<Staged>) {
        self.outbox.notify(staged);
    }

    fn unstage(&self, batch: &mut Batch, staged: &Staged) {
        self.outbox.unstage(batch, staged);
    }

    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.liveness.last_heard_ms(node)
    }

    fn knows(&self, node: &str) -> bool {
        self.outbox.confirmed(node)
    }

    fn holds_file(&self, file: &caroni_types::file::FileRef) -> bool {
        self.blobs.holds(file)
    }

    fn read_head(&self, file: &caroni_types::file::FileRef, limit: usize) -> Option<Vec<u8>> {
        use std::io::Read as _;
        if !self.blobs.holds(file) {
            return None;
        }
        let f = self.blobs.open_read(&file.sha256, 0).ok()?;
        let mut buf = Vec::new();
        f.take(limit as u64).read_to_end(&mut buf).ok()?;
        Some(buf)
    }

    fn refused(&self, peer: &str, reason: &str) {
        caroni_peer::refusal!(ALLOWLIST_REFUSALS, peer = %peer, "refused a peer: {reason}");
        self.refusals.note(peer, reason);
    }

    fn dropped(&self, peer: &str, reason: &str) {
        caroni_peer::refusal!(REFUSED_GOSSIP, peer = %peer, "refused gossip: {reason}");
    }

    fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        match self.outbox.signer().sign_bytes(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a receipt or verdict");
                Vec::new()
            }
        }
    }

    fn verify(&self, node: &str, bytes: &[u8], signature: &[u8]) -> bool {
        caroni_peer::envelope::verify_by_node(node, bytes, signature)
    }

    fn advertise(&self, advert: caroni_types::market::Advert) {
        let signer = self.outbox.signer().clone();
        *self
            .last_advert
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(advert.clone());
        if let Some(m) = self.local_manager.get() {
            // Gossip never comes back to its sender.
            m.advert(
                signer.node_name().to_string(),
                signer.endpoint().to_string(),
                advert.clone(),
            );
        }
        caroni_metrics::METRICS
            .gossip_published
            .get_or_create(&caroni_metrics::label("kind", "advert"))
            .inc();
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let p = caroni_peer::envelope::encode_payload(Payload::from(Msg::Advert(advert)), None);
            let data = match signer.seal_batch(&[(uuid::Uuid::now_v7(), p.as_slice())]) {
                Ok(env) => env.encode_to_vec(),
                Err(e) => return tracing::error!(error = %e, "cannot sign an advert"),
            };
            if let Err(e) = mesh.publish(data).await {
                // The next advert goes in a few seconds.
                tracing::debug!(error = %e, "advert not published");
            }
        });
    }

    fn publish(&self, reqs: Vec<JobRequest>) {
        let signer = self.outbox.signer().clone();
        if let Some(agent) = self.local_agent.get() {
            // Gossip never comes back to its sender: serve our own agent
            // directly (dropped when it is busy, like gossip), with the
            // endpoint this node signs, through the same checks.
            for req in &reqs {
                let endpoint = signer.endpoint().to_string();
                agent.gossip(signer.node_name().to_string(), endpoint, req.clone());
            }
        }
        self.published
            .fetch_add(reqs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for r in &reqs {
            let kind = if r.publish_count > 1 {
                "republished"
            } else {
                "first"
            };
            caroni_metrics::METRICS
                .gossip_published
                .get_or_create(&caroni_metrics::label("kind", kind))
                .inc();
        }
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            // Requests of one manager batch go out together, under one
            // signature, in gossip messages well below the 64 KiB limit.
            let encoded: Vec<(uuid::Uuid, Vec<u8>)> = reqs
                .into_iter()
                .map(|r| {
                    let trace = r.workflow_id;
                    let p = caroni_peer::envelope::encode_payload(
                        Payload::from(Msg::Request(r)),
                        trace,
                    );
                    (uuid::Uuid::now_v7(), p)
                })
                .collect();
            let mut chunk: Vec<(uuid::Uuid, &[u8])> = Vec::new();
            let mut bytes = 0;
            for (i, (id, p)) in encoded.iter().enumerate() {
                chunk.push((*id, p.as_slice()));
                bytes += p.len();
                let next = encoded.get(i + 1).map_or(0, |(_, n)| n.len());
                let last = i + 1 == encoded.len();
                if last || chunk.len() >= GOSSIP_BATCH || bytes + next > GOSSIP_BATCH_BYTES {
                    let data = match signer.seal_batch(&chunk) {
                        Ok(env) => env.encode_to_vec(),
                        Err(e) => return tracing::error!(error = %e, "cannot sign requests"),
                    };
                    if let Err(e) = mesh.publish(data).await {
                        // Retried by the manager's re-publication schedule.
                        tracing::debug!(requests = chunk.len(), error = %e, "publish failed; will re-publish");
                    }
                    chunk.clear();
                    bytes = 0;
                }
            }
        });
    }
}

impl NodeWire {
    /// Notes an advert heard on gossip; false when it is not valid.
    pub fn heard_advert(&self, from: &str, advert: &caroni_types::market::Advert) -> bool {
        let now = caroni_types::now_ms();
        if let Err(why) = advert.check(now) {
            caroni_peer::refusal!(REFUSED_GOSSIP, peer = %from, reason = %why, "refused an advert");
            return false;
        }
        let mut all = self
            .adverts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|_, a| a.expires_at_ms > now);
        if all.get(from).is_none_or(|a| a.seq < advert.seq) {
            all.insert(from.to_string(), advert.clone());
        }
        true
    }

    /// The valid adverts heard, by agent.
    pub fn adverts(&self) -> Vec<(String, caroni_types::market::Advert)> {
        let now = caroni_types::now_ms();
        self.adverts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, a)| a.expires_at_ms > now)
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    }

    /// Sets this node's manager and hands it the agent's last advert.
    pub fn set_local_manager(&self, m: caroni_manager::service::Handle) {
        let last = self
            .last_advert
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(a) = last {
            let signer = self.outbox.signer();
            m.advert(
                signer.node_name().to_string(),
                signer.endpoint().to_string(),
                a,
            );
        }
        let _ = self.local_manager.set(m);
    }
}

/// Most requests in one gossip message (each is a few hundred bytes).
const GOSSIP_BATCH: usize = 64;
/// Most request bytes in one gossip message: gossipsub drops messages over
/// 64 KiB, and the envelope adds its own.
const GOSSIP_BATCH_BYTES: usize = 32 * 1024;

/// Routes verified direct messages to the manager or the agent engine.
pub struct PeerInbox {
    pub manager: Option<caroni_manager::service::Handle>,
    pub agent: Option<caroni_agent::service::Handle>,
    /// Learns where senders are from what they sign.
    pub outbox: Outbox,
    /// Pulls the files a message refers to before it is submitted.
    pub fetcher: caroni_peer::blobs::Fetcher,
}

fn inbound(msg: Verified) -> Result<Inbound, DeliverError> {
    let m = Msg::try_from(msg.payload).map_err(|e| DeliverError::Refused(e.to_string()))?;
    Ok(Inbound {
        id: msg.id,
        from: msg.sender_name,
        endpoint: msg.sender_endpoint,
        trace: msg.trace,
        msg: m,
        unfetched: msg.unfetched,
    })
}

const GONE: &str = "the engine stopped before answering";

impl Inbox for PeerInbox {
    fn prepare(&self, msg: &Verified) -> Option<Preparing> {
        let Payload::JobDataAvailable(d) = &msg.payload else {
            return None;
        };
        let refs = file_refs(d.items.iter().map(|i| &i.value));
        if refs.is_empty() {
            return None;
        }
        // A data message is applied once every file it names is here:
        // an input is delivered when fetched and verified, and so is an
        // output.
        let fetcher = self.fetcher.clone();
        let from = msg.sender_name.clone();
        Some(Box::pin(async move {
            for f in refs {
                match fetcher.fetch(&from, &f).await {
                    Ok(moved) if moved.resumed_from > 0 => {
                        tracing::info!(peer = %from, file = %f.describe(), received = moved.received, resumed_from = moved.resumed_from, "fetched a file, resuming a broken transfer");
                    }
                    Ok(moved) if moved.received > 0 => {
                        tracing::debug!(peer = %from, file = %f.describe(), received = moved.received, "fetched a file");
                    }
                    Ok(_) => {}
                    Err(e) if e.is_permanent() => {
                        // Asking again cannot help: the job fails with the
                        // reason, where its owner sees it.
                        tracing::warn!(peer = %from, file = %f.describe(), error = %e, "cannot fetch a file; its job fails");
                        return Ok(Some(e.to_string()));
                    }
                    Err(e @ caroni_peer::blobs::FetchError::Stalled(..)) => {
                        tracing::warn!(peer = %from, file = %f.describe(), error = %e, "a file transfer stalled; the sender sends again and it resumes");
                        return Err(DeliverError::Retry(e.to_string()));
                    }
                    Err(e) => {
                        tracing::debug!(peer = %from, file = %f.describe(), error = %e, "cannot fetch a file now; the sender sends again");
                        return Err(DeliverError::Retry(e.to_string()));
                    }
                }
            }
            Ok(None)
        }))
    }

    fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, DeliverError>> {
        Box::pin(async move {
            self.outbox
                .learn(&msg.sender_name, &msg.sender_endpoint, msg.sent_at_ms);
            let msg = inbound(msg)?;
            if msg.msg.for_agent() {
                let Some(agent) = &self.agent else {
                    return Err(DeliverError::Refused(format!(
                        "this node is not an agent; it does not take {}",
                        msg.msg.name()
                    )));
                };
                let rx = agent.submit(msg).await?;
                let fut: Applying = Box::pin(async move {
                    use caroni_agent::service::Delivered;
                    match rx.await {
                        Ok(Ok(Delivered::Applied)) => Ok(()),
                        Ok(Ok(Delivered::NotMine)) => {
                            Err(DeliverError::Refused("not a message for an agent".into()))
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(DeliverError::Retry(GONE.into())),
                    }
                });
                return Ok(fut);
            }
            let Some(manager) = &self.manager else {
                return Err(DeliverError::Refused(format!(
                    "this node is not a manager; it does not take {}",
                    msg.msg.name()
                )));
            };
            let rx = manager.submit(msg).await?;
            let fut: Applying = Box::pin(async move {
                match rx.await {
                    Ok(r) => r,
                    Err(_) => Err(DeliverError::Retry(GONE.into())),
                }
            });
            Ok(fut)
        })
    }
}

static REFUSED_GOSSIP: caroni_peer::Refusals = caroni_peer::Refusals::new();

/// Hands verified gossip requests to the agent, and adverts to the
/// manager.
pub async fn gossip_loop(
    mut events: mpsc::Receiver<caroni_mesh::Event>,
    agent: Option<caroni_agent::service::Handle>,
    manager: Option<caroni_manager::service::Handle>,
    wire: SharedWire,
) {
    let outbox = wire.outbox.clone();
    while let Some(event) = events.recv().await {
        let (data, from) = match event {
            caroni_mesh::Event::Gossip { data, from } => (data, from),
            caroni_mesh::Event::Subscribed(_) => {
                // A new peer (a manager, perhaps) hears gossip from now
                // on: it should not wait for the next periodic advert.
                if let Some(a) = &agent {
                    a.job_types_changed();
                }
                continue;
            }
        };
        let env = match Envelope::decode(data.as_slice()) {
            Ok(e) => e,
            Err(e) => {
                caroni_peer::refusal!(REFUSED_GOSSIP, peer = %from, error = %e, "undecodable gossip");
                continue;
            }
        };
        let verified = match caroni_peer::open_all(&env) {
            Ok(v) => v,
            Err(e) => {
                caroni_peer::refusal!(REFUSED_GOSSIP, peer = %from, error = %e, "refused gossip");
                continue;
            }
        };
        for v in verified {
            outbox.learn(&v.sender_name, &v.sender_endpoint, v.sent_at_ms);
            match inbound(v) {
                Ok(Inbound {
                    from,
                    endpoint,
                    msg: Msg::Advert(advert),
                    ..
                }) => {
                    if !wire.heard_advert(&from, &advert) {
                        continue;
                    }
                    if let Some(m) = &manager {
                        if !m.advert(from, endpoint, advert) {
                            tracing::debug!("manager busy; dropped an advert (they come again)");
                        }
                    }
                }
                Ok(Inbound {
                    from,
                    endpoint,
                    msg: Msg::Request(req),
                    ..
                }) => {
                    let Some(agent) = &agent else { continue };
                    caroni_metrics::METRICS.gossip_received.inc();
                    if !agent.gossip(from, endpoint, req) {
                        tracing::debug!(
                            "agent busy; dropped a gossip request (it is re-published)"
                        );
                    }
                }
                Ok(other) => caroni_peer::refusal!(
                    REFUSED_GOSSIP,
                    kind = other.msg.name(),
                    "only job requests and adverts travel on gossip"
                ),
                Err(e) => caroni_peer::refusal!(REFUSED_GOSSIP, error = %e, "refused gossip"),
            }
        }
    }
}

/// Shared handles of a running node.
pub type SharedWire = Arc<NodeWire>;
