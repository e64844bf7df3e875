//! The receiving side over the network: `PeerService.Deliver`. A
//! stream's envelopes are checked (stream rights, mesh key, size) and
//! verified here, then handed to the [`crate::inbox`] pipeline, which the
//! in-process delivery shares.

use std::pin::Pin;
use std::sync::Arc;

use caroni_proto::v1::{peer_service_server::PeerService, Ack, Envelope, LogPiece};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::inbox::{pipeline, Inbox, Incoming};
use crate::tls::{LinkInfo, MeshKey, MESH_HEADER, NODE_HEADER};
use crate::{open_all, Liveness, PeerRefusals};

/// Most delivery streams a node serves at once (each holds at most
/// [`crate::inbox::WINDOW`] acks of bounded size).
pub const MAX_STREAMS: usize = 1024;

static REFUSED_ENVELOPES: crate::Refusals = crate::Refusals::new();
static BROKEN_STREAMS: crate::Refusals = crate::Refusals::new();
static REFUSED_STREAMS: crate::Refusals = crate::Refusals::new();

/// Longest node id accepted in a header (a base58 PeerId is 52 bytes).
const MAX_NODE_ID: usize = 128;

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
    /// The blob store peers read from, if the node has one.
    blobs: Option<caroni_blob::Blobs>,
    /// Jobs' logs, on an agent.
    logs: Option<Arc<dyn LogSource>>,
}

/// A stream of log pieces.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogPiece, Status>> + Send>>;

/// Where an agent's jobs' logs are read (the node implements it over its
/// agent engine).
pub trait LogSource: Send + Sync + 'static {
    /// Log `stream` of job `job` from `offset`, for node `reader`, which
    /// must be the job's manager (`PERMISSION_DENIED` otherwise,
    /// `NOT_FOUND` without such a job).
    fn read(
        &self,
        reader: &str,
        job: uuid::Uuid,
        stream: &str,
        offset: u64,
        follow: bool,
    ) -> Result<LogStream, Status>;
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
            blobs: None,
            logs: None,
        }
    }

    /// Serves reads of jobs' logs to their managers.
    pub fn with_logs(mut self, logs: Option<Arc<dyn LogSource>>) -> Self {
        self.logs = logs;
        self
    }

    /// Serves reads of `blobs` to the peers granted them.
    pub fn with_blobs(mut self, blobs: Option<caroni_blob::Blobs>) -> Self {
        self.blobs = blobs;
        self
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
    type ReadBlobStream = crate::blobs::ChunkStream;
    type ReadLogStream = LogStream;

    async fn read_log(
        &self,
        req: Request<Envelope>,
    ) -> Result<Response<Self::ReadLogStream>, Status> {
        let peer = self.admit(&req)?;
        let logs = self
            .logs
            .as_ref()
            .ok_or_else(|| Status::not_found("this node runs no jobs (it is not an agent)"))?;
        let (reader, read) = crate::envelope::open_log_read(req.get_ref(), &self.me)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if peer.as_ref().is_some_and(|p| *p != reader) {
            return Err(Status::permission_denied(
                "the log read is not signed by the node this link comes from",
            ));
        }
        let job = read
            .job_id
            .parse::<uuid::Uuid>()
            .map_err(|_| Status::invalid_argument("the log read names no valid job id"))?;
        let stream = logs.read(&reader, job, &read.stream, read.offset, read.follow);
        if let Err(s) = &stream {
            if s.code() == tonic::Code::PermissionDenied {
                crate::refusal!(REFUSED_STREAMS, peer = %reader, "refused a log read: {}", s.message());
                self.refusals.note(&reader, s.message());
            }
        }
        Ok(Response::new(stream?))
    }

    async fn read_blob(
        &self,
        req: Request<Envelope>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let peer = self.admit(&req)?;
        let blobs = self
            .blobs
            .as_ref()
            .ok_or_else(|| Status::not_found("this node keeps no files"))?;
        let (reader, read) = crate::envelope::open_blob_read(req.get_ref(), &self.me)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if peer.as_ref().is_some_and(|p| *p != reader) {
            return Err(Status::permission_denied(
                "the blob read is not signed by the node this link comes from",
            ));
        }
        let granted = blobs
            .granted(&read.sha256, &reader)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !granted {
            let why = format!(
                "node {reader} was never given blob {} by this node",
                read.sha256.chars().take(64).collect::<String>()
            );
            crate::refusal!(REFUSED_STREAMS, peer = %reader, "refused a blob read: {why}");
            self.refusals.note(&reader, &why);
            return Err(Status::permission_denied(why));
        }
        Ok(Response::new(crate::blobs::serve(
            blobs,
            &read.sha256,
            read.offset,
        )?))
    }

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
