//! Each job's stdout and stderr, kept whole up to a bound on the agent
//! that ran it, for its manager (and the agent's operator) to read on
//! demand, while it runs or after.
//!
//! - **Where**: one file per job and stream under `<data-dir>/logs`,
//!   named `<job id>.stdout` and `<job id>.stderr`, created at the first
//!   byte (a job that writes nothing to a stream leaves no file).
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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

/// Where an agent keeps its jobs' logs.
#[derive(Clone, Debug)]
pub struct JobLogs {
    root: PathBuf,
    max_bytes: u64,
}

impl JobLogs {
    /// Logs under `root` (created), each stream bounded to `max_bytes`.
    pub fn open(root: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root, max_bytes })
    }

    /// The bound of each stream.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The file of one stream of one job.
    pub fn path(&self, job: Uuid, stream: Stream) -> PathBuf {
        self.root.join(format!("{job}.{}", stream.as_str()))
    }

    /// Where a run writes its logs.
    pub fn files(&self, job: Uuid) -> LogFiles {
        LogFiles {
            stdout: self.path(job, Stream::Stdout),
            stderr: self.path(job, Stream::Stderr),
            max_bytes: self.max_bytes,
        }
    }

    /// Bytes held of a stream (0 when it wrote none).
    pub fn size(&self, job: Uuid, stream: Stream) -> u64 {
        std::fs::metadata(self.path(job, stream)).map_or(0, |m| m.len())
    }

    /// Removes the files of jobs `keep` does not keep; returns how many
    /// jobs' files went. Files that are not a job's log are left alone.
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
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path(job, stream);
        let mut file: Option<tokio::fs::File> = None;
        loop {
            // Read before checking the end: what was written before the
            // job ended is all there once it has.
            let done = !follow || ended();
            if file.is_none() {
                match tokio::fs::File::open(&path).await {
                    Ok(mut f) => {
                        if let Err(e) = f.seek(std::io::SeekFrom::Start(offset)).await {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        file = Some(f);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            if let Some(f) = file.as_mut() {
                let mut buf = vec![0u8; PIECE];
                loop {
                    match f.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            let piece = Piece {
                                offset,
                                data: buf[..n].to_vec(),
                            };
                            offset += n as u64;
                            if tx.send(Ok(piece)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFiles {
    /// Its stdout's file.
    pub stdout: PathBuf,
    /// Its stderr's file.
    pub stderr: PathBuf,
    /// Bytes kept of each.
    pub max_bytes: u64,
}

impl LogFiles {
    /// A writer of one stream (the file is made at the first byte; an
    /// earlier run's file is replaced).
    pub fn writer(&self, stream: Stream) -> LogWriter {
        let path = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let _ = std::fs::remove_file(path);
        LogWriter {
            path: path.clone(),
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

/// Writes one stream of a running job, bounded.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    kept: u64,
    seen: u64,
    max: u64,
    broken: bool,
}

impl LogWriter {
    /// Appends what the job wrote (what passes the bound is only
    /// counted).
    pub async fn write(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = usize::try_from(self.max.saturating_sub(self.kept)).unwrap_or(usize::MAX);
        let take = &bytes[..bytes.len().min(room)];
        if take.is_empty() || self.broken {
            return;
        }
        if self.file.is_none() {
            match tokio::fs::File::create(&self.path).await {
                Ok(f) => self.file = Some(f),
                Err(e) => return self.broke(e),
            }
        }
        if let Some(f) = self.file.as_mut() {
            match f.write_all(take).await {
                Ok(()) => self.kept += take.len() as u64,
                Err(e) => self.broke(e),
            }
        }
    }

    fn broke(&mut self, e: std::io::Error) {
        self.broken = true;
        self.file = None;
        tracing::warn!(log = %self.path.display(), error = %e, "cannot write a job's log; the rest of it is not kept");
    }

    /// Ends the log: notes what passed the bound and flushes.
    pub async fn finish(mut self) {
        if let Some(f) = self.file.as_mut() {
            if self.seen > self.kept && !self.broken {
                let _ = f.write_all(left_out(self.kept, self.seen).as_bytes()).await;
            }
            let _ = f.flush().await;
        }
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
            l.write(&chunk[..n]).await;
        }
        kept.extend(&chunk[..n]);
        let extra = kept.len().saturating_sub(tail);
        kept.drain(..extra);
    }
    if let Some(l) = log {
        l.finish().await;
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
        let logs = JobLogs::open(dir.path().join("logs"), 1000).expect("open");
        let job = Uuid::new_v4();
        let files = logs.files(job);
        let mut w = files.writer(Stream::Stderr);
        for _ in 0..30 {
            w.write(&[b'x'; 50]).await;
        }
        w.finish().await;
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
        let logs = JobLogs::open(dir.path().to_path_buf(), DEFAULT_LOG_BYTES).expect("open");
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
        w.write(b"one\n").await;
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the first line in time")
            .expect("a piece")
            .expect("ok");
        assert_eq!(first.data, b"one\n");
        w.write(b"two\n").await;
        w.finish().await;
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
        let logs = JobLogs::open(dir.path().to_path_buf(), 100).expect("open");
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
        let logs = JobLogs::open(dir.path().join("logs"), 10).expect("open");
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
}
