//! Each job's stdout and stderr, kept whole up to a bound on the agent
//! that ran it, for its manager (and the agent's operator) to read on
//! demand, while it runs or after.
//!
//! - **Where**: a log of at most 64 KiB stays in memory while its job
//!   runs and is written to the agent's database when it ends; a longer
//!   one goes to a file under `<data-dir>/logs`, `<job id>.stdout` or
//!   `<job id>.stderr` (a job that writes nothing to a stream keeps
//!   nothing).
//! - **Bound**: each stream keeps its first `--job-log-bytes` (16 MiB by
//!   default); what comes after is counted, not kept, and the file ends
//!   with a line saying how much was left out. The 2 KiB tail in status
//!   messages is kept apart and is always the real end.
//! - **Live**: the bash and Docker executors write as the job writes, so a
//!   reader that follows sees lines as they come; Slurm jobs' files are
//!   copied when the job ends (they live on the cluster's shared disk
//!   until then) and CWL tools' stderr is written where the tool writes it.
//! - **Lifetime**: the files of a job go when its record goes (`--retention`);
//!   a sweep removes files whose job is gone.
//!
//! Writing a log never fails a job: a write that fails (a full disk) stops
//! that log and says so once, in the agent's log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

/// Bytes kept of each stream of each job, by default.
pub const DEFAULT_LOG_BYTES: u64 = 16 << 20;
/// Largest piece a reader is handed at once.
pub const PIECE: usize = 256 * 1024;
/// How often a follower looks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// A job's output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Its standard output.
    Stdout,
    /// Its standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Logs up to this many bytes stay in memory while the job runs and are
/// written to the database when it ends; longer ones go to a file.
pub const INLINE_BYTES: usize = 64 * 1024;

/// A log being written: readers see its bytes here until it ends or
/// moves to its file.
#[derive(Debug, Default)]
struct Live {
    buf: Vec<u8>,
    /// Its bytes are in its file now (all of them, from the start).
    spilled: bool,
}

type Registry = Arc<Mutex<HashMap<(Uuid, Stream), Arc<Mutex<Live>>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where an agent keeps its jobs' logs.
#[derive(Clone)]
pub struct JobLogs {
    root: PathBuf,
    max_bytes: u64,
    store: Option<caroni_store::Store>,
    live: Registry,
}

impl std::fmt::Debug for JobLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLogs").field("root", &self.root).finish()
    }
}

/// The database row of a short log.
pub(crate) fn row(job: Uuid, stream: Stream) -> Vec<u8> {
    caroni_store::keys::Key::new()
        .uuid(&job)
        .u64(match stream {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        })
        .finish()
}

impl JobLogs {
    /// Logs under `root` (created), each stream bounded to `max_bytes`;
    /// short ones in `store` (without a store, every log is a file).
    pub fn open(
        root: PathBuf,
        max_bytes: u64,
        store: Option<caroni_store::Store>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            root,
            max_bytes,
            store,
            live: Registry::default(),
        })
    }

    /// The file of one stream of one job.
    pub fn path(&self, job: Uuid, stream: Stream) -> PathBuf {
        self.root.join(format!("{job}.{}", stream.as_str()))
    }

    /// Where a run writes its logs.
    pub fn files(&self, job: Uuid) -> LogFiles {
        LogFiles {
            job,
            stdout: self.path(job, Stream::Stdout),
            stderr: self.path(job, Stream::Stderr),
            max_bytes: self.max_bytes,
            logs: self.clone(),
        }
    }

    /// Removes the files of jobs `keep` does not keep; returns how many
    /// jobs' files went. Files that are not a job's log are left alone.
    /// (Short logs in the database go with their job's record.)
    pub fn sweep(&self, keep: &dyn Fn(Uuid) -> bool) -> std::io::Result<usize> {
        let mut gone = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.root)?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(id) = name
                .strip_suffix(".stdout")
                .or_else(|| name.strip_suffix(".stderr"))
                .and_then(|id| id.parse::<Uuid>().ok())
            else {
                continue;
            };
            if !keep(id) && std::fs::remove_file(entry.path()).is_ok() {
                gone.insert(id);
            }
        }
        Ok(gone.len())
    }

    /// At most [`PIECE`] bytes of a log from `offset`, wherever the log is
    /// now: in memory (running), in the database (short, ended) or in its
    /// file. Reads are small and local (page cache, RocksDB's cache).
    fn piece(&self, job: Uuid, stream: Stream, offset: u64) -> std::io::Result<Vec<u8>> {
        let from = |bytes: &[u8]| {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes[at..bytes.len().min(at + PIECE)].to_vec()
        };
        let live = lock(&self.live).get(&(job, stream)).cloned();
        if let Some(live) = live {
            let l = lock(&live);
            if !l.spilled {
                return Ok(from(&l.buf));
            }
        }
        if let Some(store) = &self.store {
            let held = store
                .get(crate::records::LOGS, &row(job, stream))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if let Some(bytes) = held {
                return Ok(from(&bytes));
            }
        }
        use std::io::{Read, Seek};
        let mut f = match std::fs::File::open(self.path(job, stream)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        f.seek(std::io::SeekFrom::Start(offset))?;
        let mut out = Vec::new();
        f.take(PIECE as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Streams one log from `offset` into `tx`, in pieces of at most
    /// [`PIECE`] bytes. With `follow`, it keeps looking for more until
    /// `ended` says the job has ended and everything written was sent, or
    /// the receiver goes away. Ends early with the error that stopped it.
    pub async fn read(
        &self,
        job: Uuid,
        stream: Stream,
        mut offset: u64,
        follow: bool,
        ended: impl Fn() -> bool + Send,
        tx: tokio::sync::mpsc::Sender<std::io::Result<Piece>>,
    ) {
        loop {
            // Read after checking the end: what was written before the
            // job ended is all there once it has.
            let done = !follow || ended();
            loop {
                match self.piece(job, stream, offset) {
                    Ok(data) if data.is_empty() => break,
                    Ok(data) => {
                        let n = data.len() as u64;
                        if tx.send(Ok(Piece { offset, data })).await.is_err() {
                            return;
                        }
                        offset += n;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            if done {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// A piece of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Where `data` starts in the log.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Where one run writes its stdout and stderr.
#[derive(Clone, Debug)]
pub struct LogFiles {
    job: Uuid,
    /// Its stdout's file (when it outgrows memory, or is copied there).
    pub stdout: PathBuf,
    /// Its stderr's file.
    pub stderr: PathBuf,
    /// Bytes kept of each.
    pub max_bytes: u64,
    logs: JobLogs,
}

impl LogFiles {
    /// A writer of one stream (an earlier run's file is replaced).
    pub fn writer(&self, stream: Stream) -> LogWriter {
        let path = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let _ = std::fs::remove_file(path);
        let live = Arc::new(Mutex::new(Live::default()));
        lock(&self.logs.live).insert((self.job, stream), live.clone());
        LogWriter {
            key: (self.job, stream),
            path: path.clone(),
            live,
            logs: self.logs.clone(),
            file: None,
            kept: 0,
            seen: 0,
            max: self.max_bytes,
            broken: false,
        }
    }

    /// Copies a file a job wrote (`from`) as its `stream`, bounded (for
    /// executors whose jobs write files, not pipes). Blocking.
    pub fn copy_from(&self, stream: Stream, from: &Path) {
        use std::io::{Read, Write};
        let to = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let _ = std::fs::remove_file(to);
        let Ok(src) = std::fs::File::open(from) else {
            return;
        };
        let total = src.metadata().map_or(0, |m| m.len());
        if total == 0 {
            return;
        }
        let copied = std::fs::File::create(to).and_then(|mut dst| {
            std::io::copy(&mut src.take(self.max_bytes), &mut dst)?;
            if total > self.max_bytes {
                dst.write_all(left_out(self.max_bytes, total).as_bytes())?;
            }
            Ok(())
        });
        if let Err(e) = copied {
            tracing::warn!(log = %to.display(), error = %e, "cannot keep a job's log");
        }
    }

    /// Bounds a file a job wrote directly (`stream`'s own file) to the
    /// first bytes kept, noting what was left out. Blocking.
    pub fn bound(&self, stream: Stream) {
        use std::io::Write;
        let path = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.len() == 0 {
            let _ = std::fs::remove_file(path);
            return;
        }
        if meta.len() <= self.max_bytes {
            return;
        }
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| {
                f.set_len(self.max_bytes)?;
                use std::io::Seek;
                f.seek(std::io::SeekFrom::End(0))?;
                f.write_all(left_out(self.max_bytes, meta.len()).as_bytes())
            });
        if let Err(e) = r {
            tracing::warn!(log = %path.display(), error = %e, "cannot bound a job's log");
        }
    }
}

/// The line that ends a log cut at its bound.
fn left_out(kept: u64, total: u64) -> String {
    format!(
        "\n[caroni: this log keeps the first {kept} bytes (--job-log-bytes); {} more were written and not kept]\n",
        total - kept
    )
}

/// Writes one stream of a running job, bounded. Its first
/// [`INLINE_BYTES`] stay in memory, where readers see them, and go to the
/// database in one unsynced write when the job ends. Creating a file
/// costs about 0.5 ms here: with a file per job, bursts of 1,000
/// three-step workflows ran at a median 228 steps/s against 297 without
/// logs; this way, 431 against 420. A longer log moves to its file,
/// written from the task that reads the job's pipe (a write of at most
/// 8 KiB into the page cache, never synced, takes microseconds).
#[derive(Debug)]
pub struct LogWriter {
    key: (Uuid, Stream),
    path: PathBuf,
    live: Arc<Mutex<Live>>,
    logs: JobLogs,
    file: Option<std::fs::File>,
    kept: u64,
    seen: u64,
    max: u64,
    broken: bool,
}

impl LogWriter {
    /// Appends what the job wrote (what passes the bound is only
    /// counted).
    pub fn write(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = usize::try_from(self.max.saturating_sub(self.kept)).unwrap_or(usize::MAX);
        let take = &bytes[..bytes.len().min(room)];
        if take.is_empty() || self.broken {
            return;
        }
        self.append(take);
        self.kept += take.len() as u64;
    }

    fn append(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let live = self.live.clone();
        let mut l = lock(&live);
        if self.file.is_none() {
            if l.buf.len() + bytes.len() <= INLINE_BYTES {
                l.buf.extend_from_slice(bytes);
                return;
            }
            // Too long for memory: to its file, from its first byte.
            let made = std::fs::File::create(&self.path).and_then(|mut f| {
                f.write_all(&l.buf)?;
                Ok(f)
            });
            match made {
                Ok(f) => {
                    self.file = Some(f);
                    l.spilled = true;
                    l.buf = Vec::new();
                }
                Err(e) => return self.broke(e),
            }
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(bytes) {
                self.broke(e);
            }
        }
    }

    fn broke(&mut self, e: std::io::Error) {
        self.broken = true;
        self.file = None;
        tracing::warn!(log = %self.path.display(), error = %e, "cannot write a job's log; the rest of it is not kept");
    }

    /// Ends the log: notes what passed the bound and keeps it (a short
    /// one in the database, in one write).
    pub fn finish(mut self) {
        if self.seen > self.kept && !self.broken {
            let note = left_out(self.kept, self.seen);
            self.append(note.as_bytes());
        }
        if self.file.is_none() && !self.broken {
            let bytes = std::mem::take(&mut lock(&self.live).buf);
            if !bytes.is_empty() {
                // Not synced: the job's result, committed after this with
                // a synced write, makes it durable with it (one log).
                let stored = match &self.logs.store {
                    Some(store) => {
                        let mut b = caroni_store::Batch::default();
                        b.put(crate::records::LOGS, &row(self.key.0, self.key.1), &bytes);
                        store
                            .write_relaxed(b)
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    }
                    None => std::fs::write(&self.path, &bytes),
                };
                if let Err(e) = stored {
                    tracing::warn!(log = %self.path.display(), error = %e, "cannot keep a job's log");
                }
            }
        }
        // Kept before it leaves memory: a reader finds it in one place or
        // the other.
        lock(&self.logs.live).remove(&self.key);
    }
}

/// Reads a pipe to its end into `log` (when kept), returning its last
/// `tail` bytes.
pub async fn tee_tail(
    mut r: impl tokio::io::AsyncRead + Unpin,
    mut log: Option<LogWriter>,
    tail: usize,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        if let Some(l) = log.as_mut() {
            l.write(&chunk[..n]);
        }
        kept.extend(&chunk[..n]);
        let extra = kept.len().saturating_sub(tail);
        kept.drain(..extra);
    }
    if let Some(l) = log {
        l.finish();
    }
    kept.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(logs: &JobLogs, job: Uuid, stream: Stream, offset: u64) -> Vec<u8> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        logs.read(job, stream, offset, false, || true, tx).await;
        let mut out = Vec::new();
        while let Some(p) = rx.recv().await {
            out.extend(p.expect("piece").data);
        }
        out
    }

    #[tokio::test]
    async fn a_stream_is_kept_whole_up_to_its_bound_and_says_what_it_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = JobLogs::open(dir.path().join("logs"), 1000, None).expect("open");
        let job = Uuid::new_v4();
        let files = logs.files(job);
        let mut w = files.writer(Stream::Stderr);
        for _ in 0..30 {
            w.write(&[b'x'; 50]);
        }
        w.finish();
        let got = read_all(&logs, job, Stream::Stderr, 0).await;
        let text = String::from_utf8(got).expect("utf8");
        assert!(text.starts_with(&"x".repeat(1000)), "{text}");
        assert!(text.contains("keeps the first 1000 bytes"), "{text}");
        assert!(text.contains("500 more were written"), "{text}");
        // From an offset, and nothing where nothing was written.
        assert_eq!(
            read_all(&logs, job, Stream::Stderr, 990).await[..10],
            [b'x'; 10]
        );
        assert!(read_all(&logs, job, Stream::Stdout, 0).await.is_empty());
        assert!(
            !files.stdout.exists(),
            "no file for a stream that wrote nothing"
        );
    }

    #[tokio::test]
    async fn a_follower_sees_what_is_written_until_the_job_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = JobLogs::open(dir.path().to_path_buf(), DEFAULT_LOG_BYTES, None).expect("open");
        let job = Uuid::new_v4();
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let reader = {
            let (logs, ended) = (logs.clone(), ended.clone());
            tokio::spawn(async move {
                logs.read(
                    job,
                    Stream::Stdout,
                    0,
                    true,
                    move || ended.load(std::sync::atomic::Ordering::SeqCst),
                    tx,
                )
                .await
            })
        };
        let mut w = logs.files(job).writer(Stream::Stdout);
        w.write(b"one\n");
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the first line in time")
            .expect("a piece")
            .expect("ok");
        assert_eq!(first.data, b"one\n");
        w.write(b"two\n");
        w.finish();
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut rest = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            rest.extend(p.expect("ok").data);
        }
        assert_eq!(rest, b"two\n");
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the follower ends with the job")
            .expect("join");
    }

    #[test]
    fn the_sweep_removes_only_the_logs_of_jobs_that_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = JobLogs::open(dir.path().to_path_buf(), 100, None).expect("open");
        let (kept, gone) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [kept, gone] {
            std::fs::write(logs.path(id, Stream::Stdout), "o").expect("write");
            std::fs::write(logs.path(id, Stream::Stderr), "e").expect("write");
        }
        std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
        assert_eq!(logs.sweep(&|id| id == kept).expect("sweep"), 1);
        assert!(logs.path(kept, Stream::Stdout).exists());
        assert!(!logs.path(gone, Stream::Stderr).exists());
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn copied_and_bounded_files_keep_the_first_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = JobLogs::open(dir.path().join("logs"), 10, None).expect("open");
        let job = Uuid::new_v4();
        let files = logs.files(job);
        let src = dir.path().join("slurm-stdout");
        std::fs::write(&src, "0123456789abcdef").expect("write");
        files.copy_from(Stream::Stdout, &src);
        let got = std::fs::read_to_string(&files.stdout).expect("read");
        assert!(got.starts_with("0123456789\n[caroni:"), "{got}");
        assert!(got.contains("6 more were written"), "{got}");
        std::fs::write(&files.stderr, "short").expect("write");
        files.bound(Stream::Stderr);
        assert_eq!(
            std::fs::read_to_string(&files.stderr).expect("read"),
            "short"
        );
        std::fs::write(&files.stderr, "a much longer text").expect("write");
        files.bound(Stream::Stderr);
        let got = std::fs::read_to_string(&files.stderr).expect("read");
        assert!(got.starts_with("a much lon\n[caroni:"), "{got}");
    }

    #[tokio::test]
    async fn a_short_log_goes_to_the_database_and_a_long_one_to_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = caroni_store::Store::open(&dir.path().join("db")).expect("store");
        let logs =
            JobLogs::open(dir.path().join("logs"), DEFAULT_LOG_BYTES, Some(store)).expect("open");
        let (short, long) = (Uuid::new_v4(), Uuid::new_v4());
        let mut w = logs.files(short).writer(Stream::Stdout);
        w.write(b"{\"out\": 1}\n");
        // Readable while it runs, from memory.
        assert_eq!(
            read_all(&logs, short, Stream::Stdout, 0).await,
            b"{\"out\": 1}\n"
        );
        w.finish();
        assert_eq!(
            read_all(&logs, short, Stream::Stdout, 2).await,
            b"out\": 1}\n"
        );
        assert!(
            !logs.path(short, Stream::Stdout).exists(),
            "no file for a short log"
        );
        let mut w = logs.files(long).writer(Stream::Stderr);
        let line = [b'y'; 1000];
        for _ in 0..100 {
            w.write(&line);
        }
        assert_eq!(
            read_all(&logs, long, Stream::Stderr, 0).await.len(),
            100_000
        );
        w.finish();
        assert_eq!(
            read_all(&logs, long, Stream::Stderr, 99_990).await,
            [b'y'; 10]
        );
        assert!(
            logs.path(long, Stream::Stderr).exists(),
            "a long log is a file"
        );
    }
}
