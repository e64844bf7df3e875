//! Durable state of one node: typed tables over a single RocksDB database.
//!
//! Every table has a permanent one-byte key prefix (see [`tables`]); retired
//! prefixes are never reused. Keys are built from big-endian integers, raw
//! UUID bytes and NUL-separated strings so that RocksDB's byte order is the
//! logical order. Values are a format-version byte followed by the record
//! in postcard (a compact binary serde format); values of format 1 (JSON,
//! written by earlier versions) are still read.
//!
//! All changes go through a [`Batch`] written atomically with `sync`, so a
//! state change and the messages it causes (the outbox) commit together.
//! RocksDB groups concurrent synchronous writes into one log sync (group
//! commit); the engines go further and gather many commands into one batch
//! (the commit driver of `caroni-engine`). The store counts its synced
//! writes for `caroni bench`. This crate knows nothing of engines, gRPC or
//! libp2p.
//!
//! (Over 600 lines: the store's handle, its recovery from a failed disk
//! and its tests are one piece; the tables and keys have files of their
//! own.)

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};

pub mod applied;
pub mod keys;
pub mod ledger;
pub mod tables;

/// A message staged in a batch (a transactional outbox row), to announce
/// to its sender once the batch is written.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Destination node id.
    pub to: String,
    /// Destination endpoint.
    pub endpoint: String,
    /// The transport's own copy of the staged row, so that its sender need
    /// not read it back from the table.
    pub item: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

/// Current value format version (first byte of every value): postcard.
pub const VALUE_FORMAT: u8 = 2;
/// The format of earlier versions: JSON. Still read, never written.
const VALUE_FORMAT_JSON: u8 = 1;

/// Storage errors, phrased for the person running the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the database lock.
    #[error("the data directory {path} is in use by another process (its RocksDB LOCK is held); stop that caroni-node or choose another --data-dir")]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The directory cannot be created, read or written.
    #[error("cannot open the data directory {path}: {reason}; check that it exists and is readable and writable by this user")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's message.
        reason: String,
    },
    /// A read or write failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// Storage failed earlier and is not back yet.
    #[error(
        "storage is unavailable: {0}; free space or fix the disk, the node recovers by itself"
    )]
    Unavailable(String),
    /// A stored value could not be decoded.
    #[error("corrupt value in table {table}: {reason}")]
    Decode {
        /// Table name.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A typed table: a permanent prefix and the value type stored under it.
#[derive(Debug)]
pub struct Table<V> {
    /// Permanent key prefix.
    pub prefix: u8,
    /// Name, for error messages.
    pub name: &'static str,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Table<V> {}

impl<V> Table<V> {
    /// Declares a table.
    pub const fn new(prefix: u8, name: &'static str) -> Self {
        Self {
            prefix,
            name,
            _v: PhantomData,
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.prefix);
        k.extend_from_slice(key);
        k
    }
}

fn encode<V: Serialize>(v: &V) -> Vec<u8> {
    // Serialising plain data structs (no maps with non-string keys that
    // postcard could refuse) cannot fail; an empty value would be refused
    // on reading, never misread.
    postcard::to_extend(v, vec![VALUE_FORMAT]).unwrap_or_default()
}

fn decode<V: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<V> {
    let err = |reason: String| Error::Decode { table, reason };
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => postcard::from_bytes(body).map_err(|e| err(e.to_string())),
        Some((&VALUE_FORMAT_JSON, body)) => {
            serde_json::from_slice(body).map_err(|e| err(e.to_string()))
        }
        Some((v, _)) => Err(err(format!(
            "unknown value format {v}; this node is older than its data"
        ))),
        None => Err(err("empty value".into())),
    }
}

/// What the store has written since the node started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches written with fsync.
    pub synced_writes: u64,
    /// Batches written without waiting for the disk.
    pub relaxed_writes: u64,
    /// Operations (puts and deletes) in synced batches.
    pub synced_ops: u64,
}

#[derive(Default)]
struct Counters {
    synced_writes: AtomicU64,
    relaxed_writes: AtomicU64,
    synced_ops: AtomicU64,
}

/// The node's database. Cheap to clone.
///
/// A failed write (a full disk, an I/O error) puts RocksDB in a state where
/// every later write fails, even once the cause is gone. The store then
/// reports itself failing ([`Store::health`]) and, on the next write at
/// least [`REOPEN_EVERY`] later, closes and reopens the database (replaying
/// its log) so that it recovers once the disk does. Nothing written before
/// the failure is lost; the failed batch itself was not written, and the
/// engines answer "retry" for it.
#[derive(Clone)]
pub struct Store {
    db: Arc<std::sync::RwLock<Option<Arc<rocksdb::DB>>>>,
    path: PathBuf,
    counters: Arc<Counters>,
    health: Arc<tokio::sync::watch::Sender<Option<String>>>,
    last_reopen: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// Least time between two attempts to reopen a failing database.
pub const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn open_db(path: &Path) -> Result<rocksdb::DB> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_keep_log_file_num(3);
    opts.set_max_total_wal_size(64 << 20);
    // Most point reads are misses (a new message id, an unknown job):
    // a bloom filter answers them without reading a block.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    rocksdb::DB::open(&opts, path).map_err(|e| {
        let reason = e.to_string();
        if reason.contains("LOCK")
            && (reason.contains("lock") || reason.contains("Resource temporarily unavailable"))
        {
            Error::Locked { path: path.into() }
        } else {
            Error::Open {
                path: path.into(),
                reason,
            }
        }
    })
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = open_db(path)?;
        Ok(Self {
            db: Arc::new(std::sync::RwLock::new(Some(Arc::new(db)))),
            path: path.into(),
            counters: Arc::default(),
            health: Arc::new(tokio::sync::watch::channel(None).0),
            last_reopen: Arc::default(),
        })
    }

    fn db(&self) -> Result<Arc<rocksdb::DB>> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                Error::Unavailable(
                    self.health
                        .borrow()
                        .clone()
                        .unwrap_or_else(|| "the database is closed".into()),
                )
            })
    }

    /// `None` while storage works; the last write error while it fails.
    /// Subscribe to hear of changes.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.health.subscribe()
    }

    /// Records the outcome of a write.
    fn outcome<T>(&self, r: std::result::Result<T, rocksdb::Error>) -> Result<T> {
        match r {
            Ok(v) => {
                self.health.send_if_modified(|h| h.take().is_some());
                Ok(v)
            }
            Err(e) => {
                let text = e.to_string();
                let first = self.health.send_if_modified(|h| {
                    let first = h.is_none();
                    *h = Some(text.clone());
                    first
                });
                if first {
                    tracing::error!(error = %text, "storage write failed; the node reports NOT_SERVING until storage works again");
                }
                Err(Error::Db(e))
            }
        }
    }

    /// While failing, closes and reopens the database (at most once per
    /// [`REOPEN_EVERY`]). Waits at most 2 s for reads in flight to finish.
    fn recover_if_failing(&self) {
        if self.health.borrow().is_none() {
            return;
        }
        {
            let mut last = self
                .last_reopen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let mut slot = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(db) = slot.take() {
            let mut held = Some(db);
            for _ in 0..200 {
                match held.take().map(Arc::try_unwrap) {
                    Some(Ok(d)) => {
                        drop(d);
                        break;
                    }
                    Some(Err(still_used)) => {
                        held = Some(still_used);
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    None => break,
                }
            }
            if let Some(db) = held {
                tracing::warn!("cannot reopen the database yet: it is still in use");
                *slot = Some(db);
                return;
            }
        }
        match open_db(&self.path) {
            Ok(db) => {
                tracing::info!("database reopened after a storage failure");
                *slot = Some(Arc::new(db));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the database yet");
                self.health.send_replace(Some(e.to_string()));
            }
        }
    }

    /// Checks that storage can be written again (a small relaxed write),
    /// reopening the database if needed. For a health loop.
    pub fn probe(&self) -> Result<()> {
        let mut b = Batch::default();
        b.put(
            Table::<u64>::new(tables::META, "meta"),
            b"probe",
            &caroni_types::now_ms(),
        );
        self.write_relaxed(b)
    }

    /// Reads one value.
    pub fn get<V: DeserializeOwned>(&self, table: Table<V>, key: &[u8]) -> Result<Option<V>> {
        match self.db()?.get_pinned(table.key(key))? {
            Some(bytes) => Ok(Some(decode(table.name, &bytes)?)),
            None => Ok(None),
        }
    }

    /// True when the key exists.
    pub fn contains<V>(&self, table: Table<V>, key: &[u8]) -> Result<bool> {
        Ok(self.db()?.get_pinned(table.key(key))?.is_some())
    }

    /// Every entry of `table` whose key starts with `key_prefix`, in key
    /// order, with the key stripped of the table prefix.
    pub fn scan<V: DeserializeOwned>(
        &self,
        table: Table<V>,
        key_prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, V)>> {
        self.scan_limit(table, key_prefix, usize::MAX)
    }

    /// Like [`Store::scan`], at most `limit` entries.
    pub fn scan_limit<V: DeserializeOwned>(
        &self,
        table: Table<V>,
        key_prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        self.scan_after(table, key_prefix, None, limit)
    }

    /// Entries under `key_prefix` whose key (without table prefix) is
    /// greater than `after`, at most `limit`, in key order.
    pub fn scan_after<V: DeserializeOwned>(
        &self,
        table: Table<V>,
        key_prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        let prefix = table.key(key_prefix);
        let start = match after {
            Some(a) => {
                let mut k = table.key(a);
                k.push(0);
                k.max(prefix.clone())
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push((k[1..].to_vec(), decode(table.name, &v)?));
        }
        Ok(out)
    }

    /// The last `limit` entries of `table` in key order, last first. With
    /// time-ordered keys (UUID v7) this is "newest first" without reading
    /// the table's whole history.
    pub fn scan_last<V: DeserializeOwned>(&self, table: Table<V>, limit: usize) -> Result<Vec<V>> {
        let end = [table.prefix.saturating_add(1)];
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator(rocksdb::IteratorMode::From(
            &end,
            rocksdb::Direction::Reverse,
        ));
        for item in iter {
            let (k, v) = item?;
            if k.first() != Some(&table.prefix) {
                if k.first().is_some_and(|p| *p > table.prefix) {
                    continue; // the seek key itself, when a table uses prefix + 1
                }
                break;
            }
            if out.len() >= limit {
                break;
            }
            out.push(decode(table.name, &v)?);
        }
        Ok(out)
    }

    /// Entries of `table` whose key (without table prefix) is less than
    /// `before` (every entry when `None`), at most `limit`, in reverse key
    /// order, with their keys: pages of "newest first" with UUID v7 keys.
    pub fn scan_back<V: DeserializeOwned>(
        &self,
        table: Table<V>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        let start = match before {
            Some(b) => table.key(b),
            None => vec![table.prefix.saturating_add(1)],
        };
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator(rocksdb::IteratorMode::From(
            &start,
            rocksdb::Direction::Reverse,
        ));
        for item in iter {
            let (k, v) = item?;
            if k.first() != Some(&table.prefix) {
                if k.first().is_some_and(|p| *p > table.prefix) {
                    continue;
                }
                break;
            }
            if k[..] >= start[..] {
                continue; // the seek key itself: `before` is exclusive
            }
            if out.len() >= limit {
                break;
            }
            out.push((k[1..].to_vec(), decode(table.name, &v)?));
        }
        Ok(out)
    }

    /// Writes a batch atomically and durably (fsync of the write-ahead log).
    pub fn write(&self, batch: Batch) -> Result<()> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let ops = batch.inner.len() as u64;
        self.recover_if_failing();
        let started = std::time::Instant::now();
        let r = self.db()?.write_opt(batch.inner, &opts);
        self.outcome(r)?;
        caroni_metrics::METRICS
            .store_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        caroni_metrics::METRICS.store_batch_ops.observe(ops as f64);
        self.counters.synced_writes.fetch_add(1, Ordering::Relaxed);
        self.counters.synced_ops.fetch_add(ops, Ordering::Relaxed);
        Ok(())
    }

    /// [`Store::write`] on a blocking thread, so that the fsync never holds
    /// up an async runtime thread.
    pub async fn write_blocking(&self, batch: Batch) -> Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write(batch))
            .await
            .map_err(|e| Error::Open {
                path: self.path.clone(),
                reason: format!("the write task failed: {e}"),
            })?
    }

    /// Counts of what was written since the node started.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            synced_writes: self.counters.synced_writes.load(Ordering::Relaxed),
            relaxed_writes: self.counters.relaxed_writes.load(Ordering::Relaxed),
            synced_ops: self.counters.synced_ops.load(Ordering::Relaxed),
        }
    }

    /// Writes a batch atomically without waiting for the disk: for changes
    /// that may be lost in a crash without harm (e.g. deleting an outbox
    /// entry that was acknowledged: it would be re-sent and deduplicated).
    pub fn write_relaxed(&self, batch: Batch) -> Result<()> {
        self.recover_if_failing();
        let r = self.db()?.write(batch.inner);
        self.outcome(r)?;
        self.counters.relaxed_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Puts one value durably (a batch of one).
    pub fn put<V: Serialize>(&self, table: Table<V>, key: &[u8], value: &V) -> Result<()> {
        let mut b = Batch::default();
        b.put(table, key, value);
        self.write(b)
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A set of changes applied atomically by [`Store::write`].
#[derive(Default)]
pub struct Batch {
    inner: rocksdb::WriteBatch,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.inner.len())
            .finish()
    }
}

impl Batch {
    /// Stores a value.
    pub fn put<V: Serialize>(&mut self, table: Table<V>, key: &[u8], value: &V) {
        self.inner.put(table.key(key), encode(value));
    }

    /// Removes a key.
    pub fn delete<V>(&mut self, table: Table<V>, key: &[u8]) {
        self.inner.delete(table.key(key));
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table<String> = Table::new(0x7f, "test");

    #[test]
    fn values_survive_reopen_and_scan_in_key_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            let mut b = Batch::default();
            b.put(T, &keys::Key::new().str("b").finish(), &"2".to_string());
            b.put(T, &keys::Key::new().str("a").finish(), &"1".to_string());
            s.write(b).expect("write");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let all = s.scan(T, &[]).expect("scan");
        let vals: Vec<_> = all.into_iter().map(|(_, v)| v).collect();
        assert_eq!(vals, ["1", "2"]);
    }

    #[test]
    fn scan_last_reads_only_the_newest_entries_of_its_table() {
        const NEXT: Table<String> = Table::new(0x80, "next");
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let mut b = Batch::default();
        for n in 0..5u64 {
            b.put(T, &keys::Key::new().u64(n).finish(), &n.to_string());
        }
        b.put(NEXT, b"x", &"other table".to_string());
        s.write(b).expect("write");
        assert_eq!(s.scan_last(T, 2).expect("scan"), ["4", "3"]);
        assert_eq!(s.scan_last(T, 10).expect("scan").len(), 5);
    }

    #[test]
    fn a_second_open_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path()).expect("open");
        let err = Store::open(dir.path()).expect_err("locked");
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
    }

    #[test]
    fn unknown_value_format_is_an_error_not_a_panic() {
        assert!(decode::<String>("t", &[9, b'"', b'"']).is_err());
        assert!(decode::<String>("t", &[]).is_err());
        assert!(decode::<Vec<String>>("t", &[VALUE_FORMAT, 200]).is_err());
    }

    #[test]
    fn values_are_binary_and_json_values_of_earlier_versions_still_read() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct R {
            id: uuid::Uuid,
            n: u64,
            name: String,
            opt: Option<i32>,
        }
        let r = R {
            id: uuid::Uuid::now_v7(),
            n: 7,
            name: "x".into(),
            opt: Some(-1),
        };
        let bin = encode(&r);
        assert_eq!(bin[0], VALUE_FORMAT);
        let mut json = vec![VALUE_FORMAT_JSON];
        json.extend(serde_json::to_vec(&r).expect("json"));
        assert!(
            bin.len() < json.len() / 2,
            "{} vs {}",
            bin.len(),
            json.len()
        );
        assert_eq!(decode::<R>("t", &bin).expect("binary"), r);
        assert_eq!(decode::<R>("t", &json).expect("json"), r);
    }

    #[test]
    fn synced_writes_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let mut b = Batch::default();
        b.put(T, b"a", &"1".to_string());
        b.put(T, b"b", &"2".to_string());
        s.write(b).expect("write");
        let st = s.stats();
        assert_eq!((st.synced_writes, st.synced_ops), (1, 2));
    }
}

#[cfg(test)]
mod full_disk {
    use super::*;

    const T: Table<String> = Table::new(0x7f, "test");

    /// A small tmpfs of our own (root only); `None` where it cannot be had.
    struct Tmpfs(tempfile::TempDir);
    impl Tmpfs {
        fn mount(mb: u32) -> Option<Self> {
            let dir = tempfile::tempdir().ok()?;
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok.then_some(Self(dir))
        }
    }
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    fn put(s: &Store, key: &str, bytes: usize) -> Result<()> {
        let mut b = Batch::default();
        b.put(T, key.as_bytes(), &"x".repeat(bytes));
        s.write(b)
    }

    /// A full disk fails writes and marks the store failing; once space is
    /// back the store reopens itself, writes work, health clears, and
    /// nothing written before the failure is lost.
    #[test]
    fn a_full_disk_fails_writes_then_the_store_recovers_by_itself() {
        let Some(fs) = Tmpfs::mount(16) else {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return;
        };
        let s = Store::open(&fs.0.path().join("db")).expect("open");
        put(&s, "before", 10).expect("a write before the disk fills");
        let filler = fs.0.path().join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).expect("filler");
            let chunk = vec![7u8; 1 << 16];
            while f.write_all(&chunk).is_ok() {}
        }
        let mut failed = false;
        for n in 0..200 {
            if put(&s, &format!("k{n}"), 100_000).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writes to a full disk must fail");
        assert!(s.health().borrow().is_some(), "the store says it fails");
        std::fs::remove_file(&filler).expect("free space");
        let mut recovered = false;
        for _ in 0..50 {
            if put(&s, "after", 10).is_ok() {
                recovered = true;
                break;
            }
            std::thread::sleep(REOPEN_EVERY / 4);
        }
        assert!(recovered, "writes work again once space is back");
        assert!(s.health().borrow().is_none(), "health clears");
        assert_eq!(
            s.get(T, b"before").expect("read").as_deref(),
            Some("x".repeat(10).as_str())
        );
    }
}
