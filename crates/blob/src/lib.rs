//! The node's blob store: files named by their SHA-256 under
//! `<data-dir>/blobs`, each whole or absent.
//!
//! - `objects/<2 hex>/<sha256>`: whole blobs, read-only. A blob gets there
//!   only by a rename after its content was hashed, checked and synced.
//! - `partial/<sha256>`: a transfer in progress. Its length is the offset
//!   a resumed transfer continues from (a killed process loses nothing it
//!   wrote; the hash check at the end catches anything else, and a partial
//!   that fails it is deleted).
//! - `tmp/`: files being ingested from a path; emptied at start.
//!
//! RocksDB holds the index (`tables::BLOBS`: size, when stored, when last
//! used) and the read grants (`tables::BLOB_GRANTS`: which peer was given
//! a reference, so may read it). Never blob bytes.
//!
//! Every call here does blocking file I/O: async callers run them on the
//! blocking pool ([`Blobs::blocking`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use caroni_store::{keys::Key, tables, Batch, Store, Table};
use caroni_types::file::{hex, FileRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Size of the chunks blobs are read and sent in.
pub const CHUNK: usize = 1 << 20;

/// A blob's index row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRow {
    /// Size in bytes.
    pub size: u64,
    /// When it was stored (ms since the epoch).
    pub stored_at_ms: u64,
    /// When it was last read or referenced (ms since the epoch).
    pub last_used_ms: u64,
}

const BLOBS: Table<BlobRow> = Table::new(tables::BLOBS, "blobs");
/// Value: when the grant was made (ms).
const GRANTS: Table<u64> = Table::new(tables::BLOB_GRANTS, "blob_grants");

/// Why a blob operation failed, phrased for the person running the node.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The file system refused.
    #[error("blob store: cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The content does not hash to its name.
    #[error("the received content of {basename} hashes to {got}, not to the announced {want}; it was discarded")]
    HashMismatch {
        /// The file's name.
        basename: String,
        /// The announced SHA-256.
        want: String,
        /// What it hashed to.
        got: String,
    },
    /// More bytes than announced.
    #[error(
        "the transfer of {basename} sent more than its announced {size} bytes; it was discarded"
    )]
    TooLong {
        /// The file's name.
        basename: String,
        /// Announced size.
        size: u64,
    },
    /// Storing it would exceed the node's budget.
    #[error("storing {size} bytes would exceed this node's blob budget ({used} of {budget} bytes in use); free space, raise --blob-disk-bytes or wait for retention to delete old blobs")]
    Budget {
        /// Bytes asked for.
        size: u64,
        /// Bytes in use.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// The blob is not here.
    #[error("no blob {0} on this node")]
    Missing(String),
    /// The index could not be read or written.
    #[error(transparent)]
    Store(#[from] caroni_store::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BlobError {
    let what = what.into();
    move |source| BlobError::Io { what, source }
}

/// Result alias.
pub type Result<T, E = BlobError> = std::result::Result<T, E>;

/// The node's blob store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Blobs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    store: Store,
    /// Most bytes of whole and partial blobs (0: no limit).
    budget: u64,
    /// Bytes of whole and partial blobs now.
    used: AtomicU64,
}

impl Blobs {
    /// Opens (creating) the store under `data_dir/blobs`; removes what an
    /// ingest left in `tmp/` at a crash; counts the bytes in use.
    pub fn open(data_dir: &Path, store: Store, budget: u64) -> Result<Self> {
        let root = data_dir.join("blobs");
        for d in ["objects", "partial", "tmp"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(io(format!("create {}", root.join(d).display())))?;
        }
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        std::fs::create_dir_all(root.join("tmp")).map_err(io("create tmp"))?;
        let mut used = 0;
        for (_, row) in store.scan(BLOBS, &[])? {
            used += row.size;
        }
        if let Ok(dir) = std::fs::read_dir(root.join("partial")) {
            for e in dir.flatten() {
                used += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                store,
                budget,
                used: AtomicU64::new(used),
            }),
        })
    }

    /// Runs `f` on the blocking pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Blobs) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| BlobError::Io {
                what: "run a blob task".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// A fresh path in the store's `tmp/` (emptied at start), for a file
    /// being received before it is stored with [`Blobs::ingest`].
    pub fn scratch_path(&self) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}-{}-in", std::process::id(), unique()))
    }

    /// Where a whole blob lives.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.inner
            .root
            .join("objects")
            .join(sha256.get(..2).unwrap_or("xx"))
            .join(sha256)
    }

    fn partial_path(&self, sha256: &str) -> PathBuf {
        self.inner.root.join("partial").join(sha256)
    }

    /// The size of a whole blob held here, if it is.
    pub fn has(&self, sha256: &str) -> Option<u64> {
        if !caroni_types::file::is_sha256(sha256) {
            return None;
        }
        std::fs::metadata(self.path(sha256)).ok().map(|m| m.len())
    }

    /// True when the blob of `f` is here whole.
    pub fn holds(&self, f: &FileRef) -> bool {
        self.has(&f.sha256) == Some(f.size)
    }

    /// Bytes of whole and partial blobs now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The budget (0: none).
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    fn reserve(&self, size: u64) -> Result<()> {
        let used = self.used();
        if self.inner.budget > 0 && used.saturating_add(size) > self.inner.budget {
            return Err(BlobError::Budget {
                size,
                used,
                budget: self.inner.budget,
            });
        }
        Ok(())
    }

    /// Opens a whole blob for reading at `offset`.
    pub fn open_read(&self, sha256: &str, offset: u64) -> Result<File> {
        if self.has(sha256).is_none() {
            return Err(BlobError::Missing(sha256.to_string()));
        }
        let mut f = File::open(self.path(sha256)).map_err(io(format!("open blob {sha256}")))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io(format!("seek in blob {sha256}")))?;
        Ok(f)
    }

    /// How many bytes of `sha256` a transfer has written here so far (the
    /// offset a resumed transfer continues from); the whole size once the
    /// blob is here.
    pub fn committed(&self, sha256: &str) -> u64 {
        if let Some(n) = self.has(sha256) {
            return n;
        }
        std::fs::metadata(self.partial_path(sha256))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Starts or resumes receiving the blob of `f`: the writer continues
    /// after what an earlier transfer wrote (its `offset()`), having
    /// hashed that part again.
    pub fn receive(&self, f: &FileRef) -> Result<Partial> {
        let path = self.partial_path(&f.sha256);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        let existing = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = vec![0; (existing as usize).clamp(1, CHUNK)];
        file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        each_block(&mut file, &mut buf, &path, |b| {
            hasher.update(b);
            have += b.len() as u64;
            Ok(())
        })?;
        if have > f.size {
            drop(file);
            self.discard(&path, have);
            return Err(BlobError::TooLong {
                basename: f.basename.clone(),
                size: f.size,
            });
        }
        self.reserve(f.size - have)?;
        Ok(Partial {
            blobs: self.clone(),
            file,
            path,
            hasher,
            written: have,
            resumed_at: have,
            file_ref: f.clone(),
            flushed: have,
            flushing: None,
        })
    }

    fn discard(&self, path: &Path, len: u64) {
        if std::fs::remove_file(path).is_ok() {
            self.inner.used.fetch_sub(
                len.min(self.inner.used.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
    }

    /// Moves a synced, checked file to its place and indexes it.
    fn install(&self, from: &Path, sha256: &str, size: u64) -> Result<()> {
        let to = self.path(sha256);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io("create an objects directory"))?;
        }
        let _ = std::fs::set_permissions(from, read_only());
        std::fs::rename(from, &to).map_err(io(format!("install blob {sha256}")))?;
        if let Some(parent) = to.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        // The index row is not synced: the file (synced, renamed, its
        // directory synced) is the truth of what is held; the row serves
        // the sweep and the budget, and a row lost with the machine's power
        // only delays a deletion.
        let now = caroni_types::now_ms();
        let mut b = Batch::default();
        b.put(
            BLOBS,
            &Key::new().str(sha256).finish(),
            &BlobRow {
                size,
                stored_at_ms: now,
                last_used_ms: now,
            },
        );
        self.inner.store.write_relaxed(b)?;
        Ok(())
    }

    /// Stores the file at `path` as a blob named `basename`: hashed while
    /// copied (or, when `take` and on the same file system, hashed and
    /// then moved), synced, renamed into place. A blob already here is not
    /// written again.
    pub fn ingest(&self, path: &Path, basename: &str, take: bool) -> Result<FileRef> {
        caroni_types::file::check_basename(basename)
            .map_err(|e| io(format!("store {}", path.display()))(std::io::Error::other(e.0)))?;
        let mut src = File::open(path).map_err(io(format!("open {}", path.display())))?;
        let meta = src
            .metadata()
            .map_err(io(format!("stat {}", path.display())))?;
        if !meta.is_file() {
            return Err(BlobError::Io {
                what: format!("store {}", path.display()),
                source: std::io::Error::other("it is not a regular file"),
            });
        }
        let tmp = self
            .inner
            .root
            .join("tmp")
            .join(format!("{}-{}", std::process::id(), unique()));
        // A file this process takes (a job's output) starts going to the
        // disk while it is hashed.
        let behind = if take { sync_behind(&src) } else { None };
        // Hashed first: content already here is neither copied nor moved.
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0; (meta.len() as usize).clamp(1, CHUNK)];
        each_block(&mut src, &mut buf, path, |b| {
            hasher.update(b);
            size += b.len() as u64;
            Ok(())
        })?;
        let sha = hex(&hasher.finalize());
        let file_ref = FileRef {
            sha256: sha.clone(),
            size,
            basename: basename.to_string(),
        };
        if let Some(h) = behind {
            let _ = h.join();
        }
        if self.holds(&file_ref) {
            self.touch(&sha);
            return Ok(file_ref);
        }
        // Moving is only for files this process may take (a job's output
        // in its own working directory).
        self.reserve(size)?;
        let moved = take && std::fs::rename(path, &tmp).is_ok();
        if moved {
            if let Ok(f) = File::open(&tmp) {
                let _ = f.sync_all();
            }
        } else {
            src.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
            let mut out = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
            let mut check = Sha256::new();
            each_block(&mut src, &mut buf, path, |b| {
                check.update(b);
                out.write_all(b).map_err(io("write a blob"))
            })?;
            out.sync_all().map_err(io("sync a blob"))?;
            if hex(&check.finalize()) != sha {
                let _ = std::fs::remove_file(&tmp);
                return Err(BlobError::Io {
                    what: format!("store {}", path.display()),
                    source: std::io::Error::other("the file changed while it was being stored"),
                });
            }
        }
        self.inner.used.fetch_add(size, Ordering::Relaxed);
        if let Err(e) = self.install(&tmp, &sha, size) {
            let _ = std::fs::remove_file(&tmp);
            self.inner.used.fetch_sub(size, Ordering::Relaxed);
            return Err(e);
        }
        Ok(file_ref)
    }

    /// Records a use of a blob (for the cache's eviction order).
    pub fn touch(&self, sha256: &str) {
        let key = Key::new().str(sha256).finish();
        if let Ok(Some(mut row)) = self.inner.store.get(BLOBS, &key) {
            row.last_used_ms = caroni_types::now_ms();
            let mut b = Batch::default();
            b.put(BLOBS, &key, &row);
            let _ = self.inner.store.write_relaxed(b);
        }
    }

    /// Adds to `batch` the right of `node` to read `sha256` from here.
    pub fn grant(batch: &mut Batch, sha256: &str, node: &str) {
        batch.put(
            GRANTS,
            &Key::new().str(sha256).str(node).finish(),
            &caroni_types::now_ms(),
        );
    }

    /// True when `node` was given a reference to `sha256` by this node.
    pub fn granted(&self, sha256: &str, node: &str) -> Result<bool> {
        Ok(self
            .inner
            .store
            .contains(GRANTS, &Key::new().str(sha256).str(node).finish())?)
    }
}

/// What a sweep deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Blobs deleted.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Partial files of abandoned transfers deleted.
    pub partials: usize,
}

/// What a sweep keeps and deletes.
#[derive(Debug, Clone, Copy)]
pub struct SweepRules {
    /// Blobs nothing refers to are deleted once unused this long.
    pub retention_ms: u64,
    /// While more bytes than this are held (0: no bound), the least
    /// recently used blobs nothing refers to are deleted, if unused for at
    /// least `min_age_ms`.
    pub cache_bytes: u64,
    /// See `cache_bytes`.
    pub min_age_ms: u64,
}

impl Blobs {
    /// Deletes what is no longer needed: blobs not in `keep` (the files
    /// live work refers to) by the rules, and partial files untouched for
    /// the retention. Blobs in `keep` count as used now. Deleting is an
    /// unlink: a transfer reading the blob or a job using its staged link
    /// keeps its open file or its link.
    pub fn sweep(
        &self,
        keep: &std::collections::HashSet<String>,
        now_ms: u64,
        rules: SweepRules,
    ) -> Result<Swept> {
        let mut swept = Swept::default();
        let mut candidates = Vec::new();
        let mut touched = Batch::default();
        for (key, mut row) in self.inner.store.scan(BLOBS, &[])? {
            let Ok(sha) = String::from_utf8(key.get(..64).unwrap_or_default().to_vec()) else {
                continue;
            };
            if keep.contains(&sha) {
                row.last_used_ms = now_ms;
                touched.put(BLOBS, &Key::new().str(&sha).finish(), &row);
            } else {
                candidates.push((row.last_used_ms, sha, row.size));
            }
        }
        if !touched.is_empty() {
            self.inner.store.write_relaxed(touched)?;
        }
        candidates.sort();
        let mut used = self.used();
        for (last_used, sha, size) in candidates {
            let idle = now_ms.saturating_sub(last_used);
            let expired = idle > rules.retention_ms;
            let over =
                rules.cache_bytes > 0 && used > rules.cache_bytes && idle >= rules.min_age_ms;
            if !(expired || over) {
                continue;
            }
            self.delete(&sha, size)?;
            used = used.saturating_sub(size);
            swept.blobs += 1;
            swept.bytes += size;
        }
        if let Ok(dir) = std::fs::read_dir(self.inner.root.join("partial")) {
            for e in dir.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                let idle_ms = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .map_or(0, |d| d.as_millis() as u64);
                if idle_ms > rules.retention_ms {
                    self.discard(&e.path(), meta.len());
                    swept.partials += 1;
                }
            }
        }
        Ok(swept)
    }

    /// Removes a blob, its index row and its grants.
    fn delete(&self, sha256: &str, size: u64) -> Result<()> {
        match std::fs::remove_file(self.path(sha256)) {
            Ok(()) => {
                self.inner.used.fetch_sub(
                    size.min(self.inner.used.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("delete blob {sha256}"))(e)),
        }
        let mut b = Batch::default();
        b.delete(BLOBS, &Key::new().str(sha256).finish());
        for (k, _) in self
            .inner
            .store
            .scan(GRANTS, &Key::new().str(sha256).finish())?
        {
            b.delete(GRANTS, &k);
        }
        self.inner.store.write_relaxed(b)?;
        Ok(())
    }
}

/// Reads `src` to its end in blocks of `buf`'s size, handing each to `f`.
fn each_block(
    src: &mut File,
    buf: &mut [u8],
    path: &Path,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    loop {
        let n = src
            .read(buf)
            .map_err(io(format!("read {}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        f(&buf[..n])?;
    }
}

fn read_only() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o444)
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A blob being received. Dropped unfinished, its partial file stays for a
/// resumed transfer.
#[derive(Debug)]
pub struct Partial {
    blobs: Blobs,
    file: File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    resumed_at: u64,
    file_ref: FileRef,
    /// Bytes handed to a background sync so far, and that sync: the disk
    /// writes while the transfer goes on, so that the sync at the end has
    /// little left to do.
    flushed: u64,
    flushing: Option<std::thread::JoinHandle<()>>,
}

/// Bytes written between two background syncs of a partial blob.
const FLUSH_EVERY: u64 = 32 << 20;

/// Syncs `file` (a clone of a handle) on a thread of its own.
fn sync_behind(file: &File) -> Option<std::thread::JoinHandle<()>> {
    let f = file.try_clone().ok()?;
    std::thread::Builder::new()
        .name("blob-sync".into())
        .spawn(move || {
            let _ = f.sync_data();
        })
        .ok()
}

impl Partial {
    /// Where the transfer continues from.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Where this writer started (what an earlier transfer had written).
    pub fn resumed_at(&self) -> u64 {
        self.resumed_at
    }

    /// Appends a chunk. More bytes than announced discard the partial.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if self.written + chunk.len() as u64 > self.file_ref.size {
            self.blobs.discard(&self.path, self.written);
            return Err(BlobError::TooLong {
                basename: self.file_ref.basename.clone(),
                size: self.file_ref.size,
            });
        }
        self.file
            .write_all(chunk)
            .map_err(io(format!("write {}", self.path.display())))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        if self.written - self.flushed >= FLUSH_EVERY
            && self.flushing.as_ref().is_none_or(|h| h.is_finished())
        {
            self.flushed = self.written;
            self.flushing = sync_behind(&self.file);
        }
        self.blobs
            .inner
            .used
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes what was received: the holder's copy is not the file
    /// announced, so the next transfer starts from zero.
    pub fn abandon(mut self) {
        if let Some(h) = self.flushing.take() {
            let _ = h.join();
        }
        self.blobs.discard(&self.path, self.written);
    }

    /// True once every announced byte was written.
    pub fn is_complete(&self) -> bool {
        self.written == self.file_ref.size
    }

    /// Checks the hash, syncs and installs the blob. A mismatch discards
    /// the partial (the next transfer starts from zero).
    pub fn finish(mut self) -> Result<FileRef> {
        if let Some(h) = self.flushing.take() {
            let _ = h.join();
        }
        let got = hex(&self.hasher.finalize());
        if got != self.file_ref.sha256 {
            self.blobs.discard(&self.path, self.written);
            return Err(BlobError::HashMismatch {
                basename: self.file_ref.basename,
                want: self.file_ref.sha256,
                got,
            });
        }
        self.file
            .sync_all()
            .map_err(io(format!("sync {}", self.path.display())))?;
        drop(self.file);
        if self.blobs.holds(&self.file_ref) {
            self.blobs.discard(&self.path, self.written);
            return Ok(self.file_ref);
        }
        self.blobs
            .install(&self.path, &self.file_ref.sha256, self.file_ref.size)?;
        Ok(self.file_ref)
    }
}

#[cfg(test)]
mod tests;
