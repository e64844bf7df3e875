//! The data plane over the peer port: blobs move as pulls.
//!
//! - **Serving** (`PeerService.ReadBlob`): a peer may read a blob this node
//!   gave it a reference to (a grant written with the message that carried
//!   the reference); the read is signed by the reader and, on TLS links,
//!   must come from the node its certificate names. The blob streams from
//!   the asked offset in 1 MiB chunks.
//! - **Fetching** ([`Fetcher`]): before a message carrying File references
//!   is handed to its engine, the receiving node pulls every blob it does
//!   not hold from the message's sender, resuming a partial transfer from
//!   the bytes it already wrote, and checks the hash before keeping it. A
//!   blob already held is never transferred again. Only known peers (that
//!   acknowledged a message of this node) are fetched from, at the address
//!   this node already has for them: no message can make this node connect
//!   to an address a stranger named.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caroni_blob::{BlobError, Blobs, CHUNK};
use caroni_proto::v1::{peer_service_client::PeerServiceClient, BlobChunk};
use caroni_types::file::FileRef;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::outbox::{dial, LinkError};
use crate::{Outbox, Signer};

/// Longest a transfer may go without receiving a byte, by default
/// (`--transfer-stall-timeout`).
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// Most blob transfers a node runs at once (fetching).
pub const MAX_FETCHES: usize = 16;

/// A stream of chunks.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

/// Streams blob `sha256` from `offset`, read on the blocking pool.
pub fn serve(blobs: &Blobs, sha256: &str, offset: u64) -> Result<ChunkStream, Status> {
    let size = blobs
        .has(sha256)
        .ok_or_else(|| Status::not_found(format!("no blob {sha256} on this node")))?;
    if offset > size {
        return Err(Status::out_of_range(format!(
            "offset {offset} is past the blob's {size} bytes"
        )));
    }
    let file = blobs
        .open_read(sha256, offset)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    blobs.touch(sha256);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<BlobChunk, Status>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file;
        let mut at = offset;
        loop {
            let want = usize::try_from(size - at).unwrap_or(CHUNK).min(CHUNK);
            if want == 0 {
                return;
            }
            let mut buf = vec![0u8; want];
            let mut n = 0;
            // Fill the chunk (short reads happen).
            while n < want {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::unavailable(format!(
                            "cannot read the blob: {e}"
                        ))));
                        return;
                    }
                }
            }
            if n == 0 {
                return;
            }
            buf.truncate(n);
            if tx
                .blocking_send(Ok(BlobChunk {
                    offset: at,
                    data: buf,
                }))
                .is_err()
            {
                return;
            }
            at += n as u64;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The peer is a stranger or has no address here.
    #[error("files are fetched only from known peers; node {0} is not one (yet)")]
    Stranger(String),
    /// The peer cannot be reached now.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The peer refused or failed the read.
    #[error("node {node} refused to send {file}: {reason}")]
    Refused {
        /// The peer.
        node: String,
        /// The file, described.
        file: String,
        /// Its answer.
        reason: String,
        /// True when asking again cannot help (no such blob, no right).
        permanent: bool,
    },
    /// Nothing arrived for too long.
    #[error("the transfer of {0} from node {1} stalled for {2} s")]
    Stalled(String, String, u64),
    /// The stream ended, without an error, before the whole file: the
    /// holder's copy is shorter than announced. What arrived is discarded.
    #[error("the transfer of {file} from node {node} ended at byte {at} of {size}: its copy is shorter than announced; what arrived was discarded")]
    Short {
        /// The file.
        file: String,
        /// The peer.
        node: String,
        /// Bytes held.
        at: u64,
        /// Bytes wanted.
        size: u64,
    },
    /// Storing it failed (disk, budget, wrong hash).
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Signing the read failed.
    #[error(transparent)]
    Sign(#[from] crate::Error),
}

impl FetchError {
    /// True when fetching again later cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            FetchError::Refused { permanent, .. } => *permanent,
            FetchError::Blob(BlobError::HashMismatch { .. } | BlobError::TooLong { .. })
            | FetchError::Short { .. } => true,
            _ => false,
        }
    }
}

/// What a node's fetches share: one transfer per blob at a time, at most
/// [`MAX_FETCHES`] at once.
#[derive(Clone)]
pub struct Fetcher {
    signer: Signer,
    outbox: Outbox,
    blobs: Blobs,
    running: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    permits: Arc<tokio::sync::Semaphore>,
    /// One connection per peer and address, reused by every fetch (a TLS
    /// handshake per file was most of the cost of small files).
    channels: Arc<Mutex<HashMap<(String, String), tonic::transport::Channel>>>,
    /// (file, peer) pairs where the peer showed it holds the file.
    proven: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
    /// Longest a transfer may go without receiving a byte.
    stall: Duration,
}

/// Bytes a peer must send to show it holds a file this node holds too.
const PROOF_BYTES: u64 = 4096;
/// Most (file, peer) proofs remembered.
const MAX_PROVEN: usize = 100_000;

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").finish()
    }
}

/// What a finished fetch moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes received in this fetch.
    pub received: u64,
    /// Bytes an earlier, broken transfer had written (not sent again).
    pub resumed_from: u64,
}

impl Fetcher {
    /// Fetches into `blobs` through the links of `signer`, from peers known
    /// to `outbox`.
    pub fn new(signer: Signer, outbox: Outbox, blobs: Blobs) -> Self {
        Self {
            signer,
            outbox,
            blobs,
            running: Arc::new(Mutex::new(HashMap::new())),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES)),
            channels: Arc::new(Mutex::new(HashMap::new())),
            proven: Arc::new(Mutex::new(std::collections::HashSet::new())),
            stall: DEFAULT_STALL,
        }
    }

    /// A transfer that receives nothing for `stall` fails (and is tried
    /// again later, from where it stopped).
    pub fn with_stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall.max(Duration::from_secs(1));
        self
    }

    /// Makes sure `file` is held here, pulling it from node `from` if not.
    pub async fn fetch(&self, from: &str, file: &FileRef) -> Result<Moved, FetchError> {
        if self.blobs.holds(file) {
            // Naming a file is no right to it: a peer that names a file
            // this node holds shows it holds it too, so that no peer gets
            // (or makes this node pass on) a file it only knows the hash of.
            self.prove(from, file).await?;
            return Ok(Moved::default());
        }
        let lock = {
            let mut map = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.entry(file.sha256.clone()).or_default().clone()
        };
        let r = {
            let _one = lock.lock().await;
            if self.blobs.holds(file) {
                Ok(Moved::default())
            } else {
                let _permit = self.permits.acquire().await.ok();
                self.pull(from, file).await
            }
        };
        let mut map = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map
            .get(&file.sha256)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            map.remove(&file.sha256);
        }
        r
    }

    /// Checks that node `from` holds `file` (which this node holds): it
    /// reads 4 KiB at an offset the peer cannot guess and compares them
    /// with its own bytes. Remembered per file and peer.
    async fn prove(&self, from: &str, file: &FileRef) -> Result<(), FetchError> {
        let key = (file.sha256.clone(), from.to_string());
        if from == self.signer.node_name()
            || file.size == 0
            || self
                .proven
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&key)
        {
            return Ok(());
        }
        let offset = (uuid::Uuid::new_v4().as_u128() % u128::from(file.size)) as u64;
        let want = PROOF_BYTES.min(file.size - offset) as usize;
        let (blobs, sha) = (self.blobs.clone(), file.sha256.clone());
        let local = blobs
            .blocking(move |b| {
                use std::io::Read;
                let mut buf = vec![0; want];
                b.open_read(&sha, offset)?
                    .read_exact(&mut buf)
                    .map_err(|source| BlobError::Io {
                        what: "read a file to check a peer".into(),
                        source,
                    })?;
                Ok(buf)
            })
            .await?;
        let mut client = self.client(from).await?;
        let read = self.signer.sign_blob_read(&file.sha256, offset, from)?;
        let refused = |reason: String| FetchError::Refused {
            node: from.to_string(),
            file: file.describe(),
            reason,
            permanent: true,
        };
        let mut stream = client
            .read_blob(read)
            .await
            .map_err(|s| {
                refused(format!(
                    "it could not show it holds the file: {}",
                    s.message()
                ))
            })?
            .into_inner();
        let mut got = Vec::with_capacity(want);
        while got.len() < want {
            match tokio::time::timeout(self.stall, stream.next()).await {
                Ok(Some(Ok(c))) => got.extend_from_slice(&c.data),
                Ok(Some(Err(s))) => {
                    return Err(refused(format!(
                        "it could not show it holds the file: {}",
                        s.message()
                    )))
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(FetchError::Stalled(
                        file.describe(),
                        from.to_string(),
                        self.stall.as_secs(),
                    ))
                }
            }
        }
        got.truncate(want);
        if got != local {
            return Err(refused(
                "it names the file but does not hold it (its bytes differ)".into(),
            ));
        }
        self.remember(key);
        Ok(())
    }

    fn remember(&self, key: (String, String)) {
        let mut p = self
            .proven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.len() >= MAX_PROVEN {
            p.clear();
        }
        p.insert(key);
    }

    /// Reads log `stream` of job `job` from agent `from` (this node must
    /// be the job's manager), from `offset`; with `follow`, until the job
    /// ends.
    pub async fn read_log(
        &self,
        from: &str,
        job: uuid::Uuid,
        stream: &str,
        offset: u64,
        follow: bool,
    ) -> Result<tonic::Streaming<caroni_proto::v1::LogPiece>, FetchError> {
        let mut client = self.client(from).await?;
        let read = self
            .signer
            .sign_log_read(job, stream, offset, follow, from)?;
        let refused = |s: Status| FetchError::Refused {
            node: from.to_string(),
            file: format!("the {stream} of job {job}"),
            reason: s.message().to_string(),
            permanent: matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::PermissionDenied
            ),
        };
        Ok(client.read_log(read).await.map_err(refused)?.into_inner())
    }

    /// A client of node `from`'s peer port over the connection kept for it.
    async fn client(
        &self,
        from: &str,
    ) -> Result<PeerServiceClient<tonic::transport::Channel>, FetchError> {
        if !self.outbox.confirmed(from) {
            return Err(FetchError::Stranger(from.to_string()));
        }
        let endpoint = self
            .outbox
            .endpoint_of(from)
            .ok_or_else(|| FetchError::Stranger(from.to_string()))?;
        let key = (from.to_string(), endpoint.clone());
        let cached = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = dial(self.signer.links(), from, &endpoint).await?;
                let mut map = self
                    .channels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Bounded: the peers this node fetches from.
                if map.len() >= 1024 {
                    map.clear();
                }
                map.insert(key, c.clone());
                c
            }
        };
        Ok(PeerServiceClient::new(channel).max_decoding_message_size(CHUNK + 1024))
    }

    async fn pull(&self, from: &str, file: &FileRef) -> Result<Moved, FetchError> {
        let started = std::time::Instant::now();
        let moved = self.transfer(from, file).await?;
        self.remember((file.sha256.clone(), from.to_string()));
        let m = &caroni_metrics::METRICS;
        m.blob_fetched_bytes.inc_by(moved.received);
        m.blob_fetch_seconds.inc_by(started.elapsed().as_secs_f64());
        Ok(moved)
    }

    async fn transfer(&self, from: &str, file: &FileRef) -> Result<Moved, FetchError> {
        let mut client = self.client(from).await?;
        let f = file.clone();
        let mut partial = self.blobs.blocking(move |b| b.receive(&f)).await?;
        let resumed_from = partial.offset();
        let read = self
            .signer
            .sign_blob_read(&file.sha256, partial.offset(), from)?;
        let refused = |s: Status| FetchError::Refused {
            node: from.to_string(),
            file: file.describe(),
            reason: s.message().to_string(),
            permanent: matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::PermissionDenied | tonic::Code::OutOfRange
            ),
        };
        // A broken connection is re-established by the channel itself.
        let mut stream = client.read_blob(read).await.map_err(refused)?.into_inner();
        loop {
            let next = tokio::time::timeout(self.stall, stream.next())
                .await
                .map_err(|_| {
                    FetchError::Stalled(file.describe(), from.to_string(), self.stall.as_secs())
                })?;
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(s)) => return Err(refused(s)),
            };
            if chunk.offset != partial.offset() {
                return Err(FetchError::Refused {
                    node: from.to_string(),
                    file: file.describe(),
                    reason: format!(
                        "it sent bytes from {} where {} was expected",
                        chunk.offset,
                        partial.offset()
                    ),
                    permanent: false,
                });
            }
            partial =
                tokio::task::spawn_blocking(move || partial.write(&chunk.data).map(|()| partial))
                    .await
                    .map_err(|e| BlobError::Io {
                        what: "write a chunk".into(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
            self.outbox.heard(from);
        }
        if !partial.is_complete() {
            // The stream ended without an error: the holder has no more.
            let at = partial.offset();
            tokio::task::spawn_blocking(move || partial.abandon())
                .await
                .ok();
            return Err(FetchError::Short {
                file: file.describe(),
                node: from.to_string(),
                at,
                size: file.size,
            });
        }
        let received = partial.offset() - resumed_from;
        tokio::task::spawn_blocking(move || partial.finish())
            .await
            .map_err(|e| BlobError::Io {
                what: "finish a blob".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        Ok(Moved {
            received,
            resumed_from,
        })
    }
}
