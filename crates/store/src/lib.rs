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
//! (see `caroni-manager` and `caroni-agent`). The store counts its synced
//! writes for `caroni bench`. This crate knows nothing of engines, gRPC or
//! libp2p.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};

pub mod keys;
pub mod tables;
pub mod wire;

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
#[derive(Clone)]
pub struct Store {
    db: Arc<rocksdb::DB>,
    path: PathBuf,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
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
        let db = rocksdb::DB::open(&opts, path).map_err(|e| {
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
        })?;
        Ok(Self {
            db: Arc::new(db),
            path: path.into(),
            counters: Arc::default(),
        })
    }

    /// Reads one value.
    pub fn get<V: DeserializeOwned>(&self, table: Table<V>, key: &[u8]) -> Result<Option<V>> {
        match self.db.get_pinned(table.key(key))? {
            Some(bytes) => Ok(Some(decode(table.name, &bytes)?)),
            None => Ok(None),
        }
    }

    /// True when the key exists.
    pub fn contains<V>(&self, table: Table<V>, key: &[u8]) -> Result<bool> {
        Ok(self.db.get_pinned(table.key(key))?.is_some())
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
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
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
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
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

    /// Writes a batch atomically and durably (fsync of the write-ahead log).
    pub fn write(&self, batch: Batch) -> Result<()> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let ops = batch.inner.len() as u64;
        self.db.write_opt(batch.inner, &opts)?;
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
        self.db.write(batch.inner)?;
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
