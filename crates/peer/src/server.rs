//! The receiving side: `PeerService.Deliver`, and the pipeline shared with
//! in-process delivery.
//!
//! A stream's envelopes are verified and handed to the engines in arrival
//! order without waiting for each one to be written: the engines gather
//! whatever is queued into one synced batch (group commit), and the acks
//! follow in order as the batches land. At most [`WINDOW`] messages of one
//! stream are in the engines at once.

use std::pin::Pin;
use std::sync::Arc;

use caroni_proto::v1::{peer_service_server::PeerService, Ack, Envelope};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::tls::{LinkInfo, MeshKey, MESH_HEADER, NODE_HEADER};
use crate::{open_all, Liveness, PeerRefusals, Verified};

/// Largest number of messages of one stream handed to the engines and not
/// yet acknowledged.
pub const WINDOW: usize = 1024;

/// Most delivery streams a node serves at once (each holds at most
/// [`WINDOW`] acks of bounded size).
pub const MAX_STREAMS: usize = 1024;

static REFUSED_MESSAGES: crate::Refusals = crate::Refusals::new();
static REFUSED_ENVELOPES: crate::Refusals = crate::Refusals::new();
static BROKEN_STREAMS: crate::Refusals = crate::Refusals::new();
static REFUSED_STREAMS: crate::Refusals = crate::Refusals::new();

/// Longest node id accepted in a header (a base58 PeerId is 52 bytes).
const MAX_NODE_ID: usize = 128;

/// Longest error text in an ack.
const MAX_ACK_ERROR: usize = 512;

pub use caroni_types::delivery::DeliverError;

/// Resolves once a submitted message and its effects are durably written
/// (or it was a duplicate).
pub type Applying = BoxFuture<'static, Result<(), DeliverError>>;

/// Where verified messages go.
pub trait Inbox: Send + Sync + 'static {
    /// Queues one verified message for its engine, in order with the
    /// messages submitted before it, and returns what resolves once it is
    /// applied. Returns only after the message is queued.
    fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, DeliverError>>;
}

/// One message read from a stream: verified, or refused with the id the
/// sender knows it by.
pub(crate) enum Incoming {
    Verified(Box<Verified>),
    Refused {
        message_id: String,
        error: String,
    },
    /// The stream broke (an envelope over the size limit, a bad frame):
    /// what was read before is answered, then the stream ends with this.
    Broken(Status),
}

/// Feeds `incoming` to `inbox` and yields an ack per message, in order.
/// The stream of acks ends with an `unavailable` status when the inbox asks
/// for a retry (the sender reconnects and re-sends).
pub(crate) fn pipeline<S>(inbox: Arc<dyn Inbox>, incoming: S) -> mpsc::Receiver<Result<Ack, Status>>
where
    S: Stream<Item = Incoming> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Ack, Status>>(WINDOW);
    tokio::spawn(async move {
        let mut incoming = incoming;
        let mut applying =
            FuturesOrdered::<BoxFuture<'static, (String, Result<(), DeliverError>)>>::new();
        let mut open = true;
        let mut broken: Option<Status> = None;
        loop {
            tokio::select! {
                biased;
                Some((id, result)) = applying.next(), if !applying.is_empty() => {
                    let ack = match result {
                        Ok(()) => Ack { message_id: id, accepted: true, error: String::new() },
                        Err(DeliverError::Refused(mut e)) => {
                            crate::refusal!(REFUSED_MESSAGES, message_id = %id, error = %e, "refused a message");
                            if e.len() > MAX_ACK_ERROR {
                                let mut end = MAX_ACK_ERROR;
                                while !e.is_char_boundary(end) {
                                    end -= 1;
                                }
                                e.truncate(end);
                            }
                            Ack { message_id: id, accepted: false, error: e }
                        }
                        Err(DeliverError::Retry(e)) => {
                            let _ = tx.send(Err(Status::unavailable(e))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                item = incoming.next(), if open && applying.len() < WINDOW => match item {
                    None => open = false,
                    Some(Incoming::Broken(status)) => {
                        open = false;
                        broken = Some(status);
                    }
                    Some(Incoming::Refused { message_id, error }) => {
                        applying.push_back(Box::pin(async move {
                            (message_id, Err(DeliverError::Refused(error)))
                        }));
                    }
                    Some(Incoming::Verified(msg)) => {
                        let id = msg.id.to_string();
                        match inbox.submit(*msg).await {
                            Ok(fut) => applying.push_back(Box::pin(async move { (id, fut.await) })),
                            Err(e) => applying.push_back(Box::pin(async move { (id, Err(e)) })),
                        }
                    }
                },
                else => {
                    if let Some(status) = broken {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
            }
        }
    });
    rx
}

/// The peer gRPC service.
pub struct PeerServer {
    inbox: Arc<dyn Inbox>,
    liveness: Liveness,
    streams: Arc<tokio::sync::Semaphore>,
    /// This node's id.
    me: String,
    /// The private mesh's key: streams must prove it.
    mesh_key: Option<MeshKey>,
    refusals: PeerRefusals,
}

impl PeerServer {
    /// Serves `inbox`; every message received marks its sender alive.
    pub fn new(inbox: Arc<dyn Inbox>, liveness: Liveness) -> Self {
        Self {
            inbox,
            liveness,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            me: String::new(),
            mesh_key: None,
            refusals: PeerRefusals::default(),
        }
    }

    /// Serves node `me`: with `mesh_key`, a stream that does not prove the
    /// key is refused; refusals are counted in `refusals`.
    pub fn guarded(
        mut self,
        me: String,
        mesh_key: Option<MeshKey>,
        refusals: PeerRefusals,
    ) -> Self {
        self.me = me;
        self.mesh_key = mesh_key;
        self.refusals = refusals;
        self
    }

    /// The node a stream comes from: the one its TLS certificate names
    /// (which the claim in its header, if any, must match), else the claim
    /// of a plaintext link. Checks the mesh key's proof.
    fn admit<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let claimed = header(NODE_HEADER).filter(|c| c.len() <= MAX_NODE_ID);
        let certified = req
            .extensions()
            .get::<LinkInfo>()
            .and_then(|l| l.node.clone());
        let peer = match (certified, claimed) {
            (Some(n), Some(c)) if n != c => {
                let why = format!(
                    "the stream says it comes from node {c}, but its TLS certificate is node {n}'s"
                );
                crate::refusal!(REFUSED_STREAMS, peer = %n, "refused a delivery stream: {why}");
                self.refusals.note(&n, &why);
                return Err(Status::permission_denied(why));
            }
            (Some(n), _) => Some(n),
            (None, c) => c,
        };
        if let Some(key) = &self.mesh_key {
            let proof = header(MESH_HEADER).unwrap_or_default();
            let proven = peer
                .as_deref()
                .is_some_and(|p| key.check(p, &self.me, &proof));
            if !proven {
                let who = peer.clone().unwrap_or_else(|| "an unnamed node".into());
                let why = if proof.is_empty() {
                    "this mesh is private and the stream did not prove its pre-shared key (the sender runs without --mesh-key)".to_string()
                } else {
                    "this mesh is private and the stream's proof of its pre-shared key is wrong (the sender's --mesh-key is another key)".to_string()
                };
                crate::refusal!(REFUSED_STREAMS, peer = %who, fingerprint = %key.fingerprint(), "refused a delivery stream from node {who}: {why}");
                if let Some(p) = &peer {
                    self.refusals.note(p, &why);
                }
                return Err(Status::permission_denied(why));
            }
        }
        Ok(peer)
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl PeerService for PeerServer {
    type DeliverStream = AckStream;

    async fn deliver(
        &self,
        req: Request<Streaming<Envelope>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let peer = self.admit(&req)?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this node already serves {MAX_STREAMS} delivery streams; retry later"
            ))
        })?;
        let liveness = self.liveness.clone();
        let refusals = self.refusals.clone();
        let incoming = req.into_inner().map(move |item| -> Vec<Incoming> {
            // The permit lives as long as the stream is read.
            let _held = &permit;
            let env = match item {
                Ok(env) => env,
                Err(status) => {
                    crate::refusal!(BROKEN_STREAMS, error = %status.message(), "a delivery stream broke");
                    return vec![Incoming::Broken(Status::invalid_argument(format!(
                        "the stream was closed: {}",
                        status.message()
                    )))];
                }
            };
            match open_all(&env) {
                Ok(msgs) if peer.as_ref().is_some_and(|p| msgs.iter().any(|m| &m.sender_name != p)) => {
                    let p = peer.as_deref().unwrap_or_default();
                    let e = format!("the envelope is not signed by node {p}, the node this link comes from");
                    crate::refusal!(REFUSED_ENVELOPES, peer = %p, "refused an envelope: {e}");
                    refusals.note(p, &e);
                    msgs.into_iter()
                        .map(|m| Incoming::Refused {
                            message_id: m.id.to_string(),
                            error: e.clone(),
                        })
                        .collect()
                }
                Ok(msgs) => {
                    if let Some(m) = msgs.first() {
                        liveness.heard(&m.sender_name);
                    }
                    msgs.into_iter()
                        .map(|m| Incoming::Verified(Box::new(m)))
                        .collect()
                }
                Err(e) => {
                    crate::refusal!(REFUSED_ENVELOPES, error = %e, "refused an envelope");
                    // The ids are read unverified, only so that the
                    // sender can drop the messages from its outbox.
                    crate::envelope::claimed_ids(&env)
                        .into_iter()
                        .map(|message_id| Incoming::Refused {
                            message_id,
                            error: e.to_string(),
                        })
                        .collect()
                }
            }
        });
        let incoming = futures::StreamExt::flat_map(incoming, futures::stream::iter);
        let rx = pipeline(self.inbox.clone(), Box::pin(incoming));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
