//! FileService: files into and out of the node's blob store, streamed in
//! chunks of at most 1 MiB, resumable, checked by their SHA-256.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use caroni_blob::{BlobError, Blobs};
use caroni_proto::v1::{self as pb, file_service_server::FileService};
use caroni_types::file::FileRef;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Serves the file API.
#[derive(Clone, Debug)]
pub struct FileApi {
    blobs: Blobs,
    /// One upload at a time per file: a second upload of the same content
    /// (two runs of one workflow at once) waits for the first, then finds
    /// the file here.
    uploading: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl FileApi {
    /// Serves `blobs`.
    pub fn new(blobs: Blobs) -> Self {
        Self {
            blobs,
            uploading: Arc::default(),
        }
    }

    /// The lock of uploads of `sha256`.
    fn upload_lock(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(sha256.to_string()).or_default().clone()
    }

    /// Forgets the lock of `sha256` when no upload holds or awaits it.
    fn release(&self, sha256: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        // This reference and the map's: nobody else wants it.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(sha256);
        }
    }
}

fn blob_status(e: BlobError) -> Status {
    match e {
        BlobError::Budget { .. } => Status::resource_exhausted(e.to_string()),
        BlobError::HashMismatch { .. } | BlobError::TooLong { .. } => {
            Status::invalid_argument(e.to_string())
        }
        BlobError::Missing(_) => Status::not_found(e.to_string()),
        BlobError::Io { .. } | BlobError::Store(_) => Status::unavailable(e.to_string()),
    }
}

fn to_pb(f: &FileRef) -> pb::FileRef {
    pb::FileRef {
        sha256: f.sha256.clone(),
        size: f.size,
        basename: f.basename.clone(),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

#[tonic::async_trait]
impl FileService for FileApi {
    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::FileRef>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("an upload needs at least one message"))??;
        let f = first.file.ok_or_else(|| {
            Status::invalid_argument(
                "the first message of an upload names the file (sha256, size, basename)",
            )
        })?;
        let file = FileRef::new(f.sha256.to_ascii_lowercase(), f.size, f.basename)
            .map_err(|e| Status::invalid_argument(format!("invalid file: {e}")))?;
        if self.blobs.holds(&file) {
            // Already here: nothing to transfer.
            return Ok(Response::new(to_pb(&file)));
        }
        let lock = self.upload_lock(&file.sha256);
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.receive(file.clone(), first.offset, first.data, &mut stream)
                .await
        };
        self.release(&file.sha256, lock);
        result
    }

    async fn upload_status(
        &self,
        req: Request<pb::UploadStatusRequest>,
    ) -> Result<Response<pb::UploadStatusResponse>, Status> {
        let sha = req.into_inner().sha256.to_ascii_lowercase();
        if !caroni_types::file::is_sha256(&sha) {
            return Err(Status::invalid_argument("sha256 must be 64 hex digits"));
        }
        let blobs = self.blobs.clone();
        let (committed, complete) =
            tokio::task::spawn_blocking(move || (blobs.committed(&sha), blobs.has(&sha).is_some()))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::UploadStatusResponse {
            committed,
            complete,
        }))
    }
    type DownloadStream = ChunkStream;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let r = req.into_inner();
        let sha = r.sha256.to_ascii_lowercase();
        if !caroni_types::file::is_sha256(&sha) {
            return Err(Status::invalid_argument("sha256 must be 64 hex digits"));
        }
        let chunks = caroni_peer::blobs::serve(&self.blobs, &sha, r.offset)?;
        Ok(Response::new(Box::pin(chunks.map(|c| {
            c.map(|c| pb::FileChunk {
                offset: c.offset,
                data: c.data,
            })
        }))))
    }
}

impl FileApi {
    /// Receives the rest of an upload whose first message said `file`,
    /// `offset` and `data` (with the file's upload lock held).
    async fn receive(
        &self,
        file: FileRef,
        offset: u64,
        data: Vec<u8>,
        stream: &mut Streaming<pb::UploadChunk>,
    ) -> Result<Response<pb::FileRef>, Status> {
        if self.blobs.holds(&file) {
            // Another upload brought it while this one waited.
            return Ok(Response::new(to_pb(&file)));
        }

        let fr = file.clone();
        let mut partial = self
            .blobs
            .blocking(move |b| b.receive(&fr))
            .await
            .map_err(blob_status)?;
        if offset != partial.offset() {
            return Err(Status::failed_precondition(format!(
                "this node holds {} bytes of {}; send from there (UploadStatus says so)",
                partial.offset(),
                file.basename
            )));
        }
        let mut chunk = data;
        loop {
            if !chunk.is_empty() {
                partial =
                    tokio::task::spawn_blocking(move || partial.write(&chunk).map(|()| partial))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?
                        .map_err(blob_status)?;
            }
            match stream.next().await {
                None => break,
                Some(Ok(c)) => {
                    if c.file.is_some() && c.file.as_ref().map(|x| &x.sha256) != Some(&file.sha256)
                    {
                        return Err(Status::invalid_argument("one upload carries one file"));
                    }
                    chunk = c.data;
                }
                Some(Err(s)) => return Err(s),
            }
        }
        if !partial.is_complete() {
            return Err(Status::aborted(format!(
                "the upload of {} ended at byte {} of {}; resume from there",
                file.basename,
                partial.offset(),
                file.size
            )));
        }
        let stored = tokio::task::spawn_blocking(move || partial.finish())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(blob_status)?;
        tracing::info!(file = %stored.describe(), "file uploaded");
        Ok(Response::new(to_pb(&stored)))
    }
}
