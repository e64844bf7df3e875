//! The bash executor: a job's body as `bash -c BODY` in a fresh working
//! directory, with each input as `CARONI_ENV_<name>` and a minimal, explicit environment.
//! The process runs in its own process group so that a kill or a timeout
//! stops it and every child it started.
//!
//! The timeout covers the whole job, not only bash: a child that left the
//! group (`setsid`) and keeps stdout open is found by the job id in its
//! environment and killed when the time is up. stdout is read up to the
//! job type's limit and stderr into a bounded tail, so no job can make the
//! agent hold more than those bounds. An input value the environment
//! cannot hold (see [`env_plan`]) is written to a file in the working
//! directory instead, named by `CARONI_FILE_<input>`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::output::{env_plan, failed, failed_as, ENV_VALUE_MAX, JOB_PATH};
use super::{Executor, RunSpec};
use crate::logs::{tee_tail, Stream};
use crate::machine::{Failure, RunResult, STDERR_TAIL_BYTES};

/// The bash executor.
#[derive(Clone, Debug)]
pub struct BashExecutor {
    work_root: PathBuf,
    bash: PathBuf,
    blobs: Option<caroni_blob::Blobs>,
}

/// bash's absolute path. Naming the program by path (not by name with a
/// PATH of our own in the environment) lets the standard library start it
/// with `posix_spawn` (a vfork) instead of `fork`, which copies the agent's
/// page tables: a third of the agent's CPU under load, measured.
fn find_bash() -> PathBuf {
    JOB_PATH
        .split(':')
        .map(|d| PathBuf::from(d).join("bash"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("bash"))
}

impl BashExecutor {
    /// Working directories are created under `work_root`.
    pub fn new(work_root: PathBuf) -> Self {
        Self {
            work_root,
            bash: find_bash(),
            blobs: None,
        }
    }

    /// File inputs are staged from, and File outputs stored into, `blobs`.
    pub fn with_blobs(mut self, blobs: Option<caroni_blob::Blobs>) -> Self {
        self.blobs = blobs;
        self
    }
}

/// Reads stdout up to `limit + 1` bytes, then keeps draining (and
/// discarding) so that the job is not killed by a full pipe: an over-long
/// output is reported as such, not as a signal.
/// Everything read is also written to `log`, when kept.
async fn read_limited(
    mut r: impl tokio::io::AsyncRead + Unpin,
    limit: u64,
    mut log: Option<crate::logs::LogWriter>,
) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut over = false;
    let mut chunk = [0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        if let Some(l) = log.as_mut() {
            l.write(&chunk[..n]);
        }
        if over {
            continue;
        }
        let room = usize::try_from(limit.saturating_sub(buf.len() as u64)).unwrap_or(usize::MAX);
        if n > room {
            buf.extend_from_slice(&chunk[..room]);
            over = true;
        } else {
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    if let Some(l) = log {
        l.finish();
    }
    (buf, over)
}

/// Kills every process whose environment holds this job's id: the ones
/// that left the job's process group too. Linux only (reads `/proc`).
fn kill_job_processes(job_id: uuid::Uuid) {
    let marker = format!("CARONI_JOB_ID={job_id}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(p.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// CPU time of ended jobs' processes (ms), by job, until the agent's
/// service takes it for the job's receipt ([`take_cpu_ms`]).
static CPU_MS: std::sync::Mutex<Vec<(uuid::Uuid, u64)>> = std::sync::Mutex::new(Vec::new());
/// Most entries kept for receipts not made (a job that ends unrecorded).
const CPU_KEPT: usize = 4096;

/// The CPU time (user + system, ms) job `job`'s bash and the children it
/// waited for used, once its run ended; taken once.
pub fn take_cpu_ms(job: &uuid::Uuid) -> Option<u64> {
    let mut all = CPU_MS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let at = all.iter().position(|(j, _)| j == job)?;
    Some(all.swap_remove(at).1)
}

fn keep_cpu_ms(job: uuid::Uuid, ms: u64) {
    let mut all = CPU_MS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if all.len() >= CPU_KEPT {
        all.remove(0);
    }
    all.push((job, ms));
}

/// Waits until process `pid` has exited without reaping it (the caller
/// reaps it), then reads from its `/proc` entry the CPU time it and the
/// children it waited for used (ms). `None` when that cannot be read.
fn exited_cpu_ms(pid: u32) -> Option<u64> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let p = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    waitid(Id::Pid(p), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis start at the 3rd;
    // utime, stime, cutime and cstime are the 14th to the 17th.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .filter(|h| *h > 0)?;
    Some(ticks.saturating_mul(1000) / hz)
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Executor for BashExecutor {
    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
        let dir = self.work_root.join(spec.job_id.to_string());
        // A fresh directory: remove leftovers of an earlier run first.
        let fresh = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        };
        if let Err(e) = fresh {
            return failed(
                format!("cannot create the working directory {}: {e}", dir.display()),
                None,
                b"",
            );
        }
        let started = tokio::time::Instant::now();
        let deadline = started + spec.timeout;
        let mut cmd = tokio::process::Command::new(&self.bash);
        cmd.arg("-c")
            .arg(&spec.body)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", JOB_PATH)
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .env("LANG", "C.UTF-8")
            .env("CARONI_JOB_ID", spec.job_id.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let to_files = match env_plan(&spec) {
            Ok(f) => f,
            Err(msg) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return failed(msg.to_string(), None, b"");
            }
        };
        let staged = {
            let (blobs, inputs, d) = (self.blobs.clone(), spec.inputs.clone(), dir.clone());
            tokio::task::spawn_blocking(move || {
                super::files::stage(blobs.as_ref(), &inputs, &d, &d)
            })
            .await
            .unwrap_or_else(|e| {
                Err(super::files::FileError::Stage {
                    input: String::new(),
                    reason: e.to_string(),
                })
            })
        };
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return failed(e.to_string(), None, b"");
            }
        };
        for (k, v) in &spec.inputs {
            if let Some((path, env)) = staged.get(k) {
                cmd.env(format!("CARONI_FILE_{k}"), path);
                cmd.env(format!("CARONI_ENV_{k}"), env);
            } else if to_files.contains(k) {
                let file = dir.join(format!("caroni-input-{k}"));
                if let Err(e) = tokio::fs::write(&file, v).await {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    return failed(
                        format!("cannot write input {k} to {}: {e}", file.display()),
                        None,
                        b"",
                    );
                }
                cmd.env(format!("CARONI_FILE_{k}"), &file);
            } else {
                cmd.env(format!("CARONI_ENV_{k}"), v);
            }
        }
        for (k, v) in &spec.job_kvs {
            if caroni_types::validate_env_name(k).is_ok() && v.len() <= ENV_VALUE_MAX {
                cmd.env(format!("CARONI_KV_{k}"), v);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return failed(format!("cannot start bash: {e}"), None, b"");
            }
        };
        let pid = child.id();
        let limit = spec.max_output_bytes;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (out_log, err_log) = match &spec.logs {
            Some(l) => (
                Some(l.writer(Stream::Stdout)),
                Some(l.writer(Stream::Stderr)),
            ),
            None => (None, None),
        };
        let mut out_task = tokio::spawn(async move {
            match stdout {
                Some(s) => read_limited(s, limit, out_log).await,
                None => (Vec::new(), false),
            }
        });
        let mut err_task = tokio::spawn(async move {
            match stderr {
                Some(s) => tee_tail(s, err_log, STDERR_TAIL_BYTES).await,
                None => Vec::new(),
            }
        });
        let timed_out = || format!("timed out after {} s", spec.timeout.as_secs());
        // The process's end, seen before it is reaped: its CPU time is
        // read then (for the job's receipt), and it is reaped below.
        let mut exited = tokio::task::spawn_blocking(move || pid.and_then(exited_cpu_ms));
        let status = tokio::select! {
            cpu = &mut exited => {
                if let Ok(Some(ms)) = cpu {
                    keep_cpu_ms(spec.job_id, ms);
                }
                Ok(child.wait().await)
            }
            _ = tokio::time::sleep_until(deadline) => Err((Failure::Timeout, timed_out())),
            _ = cancel.cancelled() => Err((Failure::Killed, "killed".to_string())),
        };
        if status.is_err() {
            kill_group(pid);
            let _ = child.wait().await;
        }
        // Children that outlive bash must not keep the pipes open.
        kill_group(pid);
        // The pipes close when the last process holding them ends; one that
        // left the group is killed when the job's time is up.
        let mut status = status;
        let outputs = tokio::select! {
            r = async { ((&mut out_task).await, (&mut err_task).await) } => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = cancel.cancelled() => None,
        };
        let (stdout, over, stderr) = match outputs {
            Some((out, err)) => {
                let (out, over) = out.unwrap_or_default();
                (out, over, err.unwrap_or_default())
            }
            None => {
                let job = spec.job_id;
                let _ = tokio::task::spawn_blocking(move || kill_job_processes(job)).await;
                if status.is_ok() {
                    status = Err(if cancel.is_cancelled() {
                        (Failure::Killed, "killed".to_string())
                    } else {
                        (
                            Failure::Timeout,
                            format!(
                                "{} (a process it started kept its output open)",
                                timed_out()
                            ),
                        )
                    });
                }
                let err = tokio::time::timeout(Duration::from_secs(2), err_task)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                out_task.abort();
                (Vec::new(), false, err)
            }
        };
        let r = self.result(&spec, &dir, status, stdout, over, stderr).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        r
    }
}

impl BashExecutor {
    /// What an ended run yields; its working directory is still there.
    async fn result(
        &self,
        spec: &RunSpec,
        dir: &std::path::Path,
        status: Result<std::io::Result<std::process::ExitStatus>, (Failure, String)>,
        stdout: Vec<u8>,
        over: bool,
        stderr: Vec<u8>,
    ) -> RunResult {
        let limit = spec.max_output_bytes;
        let status = match status {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return failed(format!("cannot wait for the process: {e}"), None, &stderr)
            }
            Err((kind, why)) => return failed_as(kind, why, None, &stderr),
        };
        if over {
            return failed(
                format!("stdout is larger than the job type's limit of {limit} bytes"),
                status.code(),
                &stderr,
            );
        }
        if !status.success() {
            let code = status.code();
            return match code {
                Some(c) => failed(format!("exit status {c}"), code, &stderr),
                None => failed_as(Failure::Killed, "killed by a signal".into(), None, &stderr),
            };
        }
        super::files::completed(
            self.blobs.clone(),
            &stdout,
            spec,
            dir.to_path_buf(),
            None,
            &stderr,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(body: &str) -> RunSpec {
        RunSpec {
            job_id: uuid::Uuid::new_v4(),
            body: body.into(),
            inputs: BTreeMap::from([("message".into(), "caronirocks".into())]),
            job_kvs: BTreeMap::new(),
            outputs: vec!["jobout".into()],
            timeout: Duration::from_secs(10),
            max_output_bytes: 1 << 20,
            executor: Default::default(),
            cwl_tool: None,
            logs: None,
        }
    }

    async fn run(body: &str) -> RunResult {
        let dir = tempfile::tempdir().expect("tempdir");
        BashExecutor::new(dir.path().into())
            .run(spec(body), CancellationToken::new())
            .await
    }

    #[tokio::test]
    async fn inputs_arrive_as_env_and_outputs_are_parsed() {
        let r = run(r#"printf '{"jobout": "%s"}' "${CARONI_ENV_message^^}""#).await;
        assert_eq!(
            r,
            RunResult::Completed {
                outputs: BTreeMap::from([("jobout".into(), "CARONIROCKS".into())]),
                stderr_tail: String::new()
            }
        );
    }

    #[tokio::test]
    async fn the_environment_is_minimal() {
        std::env::set_var("CARONI_SECRET_TEST", "leak");
        let r = run(r#"printf '{"jobout": "%s"}' "${CARONI_SECRET_TEST:-none}""#).await;
        assert!(matches!(r, RunResult::Completed { outputs, .. } if outputs["jobout"] == "none"));
    }

    #[tokio::test]
    async fn failures_say_what_was_wrong() {
        let r = run("echo oops >&2; exit 3").await;
        assert!(
            matches!(&r, RunResult::Failed { message, exit_status: Some(3), stderr_tail, kind: Failure::ExitStatus } if message == "exit status 3" && stderr_tail.contains("oops")),
            "{r:?}"
        );
        let r = run("echo not json").await;
        assert!(
            matches!(&r, RunResult::Failed { message, kind: Failure::Output, .. } if message.contains("stdout is not a JSON object")),
            "{r:?}"
        );
        let r = run(r#"echo '{"other": 1}'"#).await;
        assert!(
            matches!(&r, RunResult::Failed { message, .. } if message.contains("lacks the declared output(s) jobout")),
            "{r:?}"
        );
    }

    /// A child that leaves the process group and keeps stdout open does
    /// not outlive the job's timeout; it is killed.
    #[tokio::test]
    async fn the_timeout_covers_children_that_left_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = uuid::Uuid::new_v4().to_string();
        let mut s = spec(&format!(
            "setsid bash -c 'sleep 60; echo {marker}' & sleep 0.3; echo started"
        ));
        s.timeout = Duration::from_secs(1);
        let job = s.job_id;
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Failed { message, kind: Failure::Timeout, .. } if message.contains("timed out") && message.contains("kept its output open")),
            "{r:?}"
        );
        // The straggler is gone (it may take a moment to be reaped).
        let mut alive = true;
        for _ in 0..50 {
            alive = std::fs::read_dir("/proc")
                .expect("proc")
                .flatten()
                .any(|p| {
                    std::fs::read(p.path().join("cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                        .unwrap_or(false)
                        && std::fs::read_to_string(p.path().join("stat"))
                            .map(|st| !st.contains(") Z "))
                            .unwrap_or(false)
                });
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!alive, "the setsid child of job {job} still runs");
    }

    /// stderr is kept as a bounded tail however much is written; stdout
    /// over the limit is the output-limit error, not a signal.
    #[tokio::test]
    async fn output_bounds_are_enforced_and_named() {
        let r = run("head -c 50000000 /dev/zero | tr '\\0' x >&2; echo end >&2; exit 1").await;
        match &r {
            RunResult::Failed { stderr_tail, .. } => {
                assert!(
                    stderr_tail.len() <= STDERR_TAIL_BYTES,
                    "{}",
                    stderr_tail.len()
                );
                assert!(stderr_tail.ends_with("end\n"), "{stderr_tail:?}");
            }
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec("yes | head -c 5000000; echo '{}'");
        s.max_output_bytes = 1000;
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Failed { message, .. } if message.contains("larger than the job type's limit of 1000 bytes")),
            "{r:?}"
        );
    }

    /// A value too large for the environment arrives as a file.
    #[tokio::test]
    async fn a_large_input_arrives_as_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(r#"printf '{"jobout": "%s"}' "$(wc -c < "$CARONI_FILE_message")""#);
        s.inputs.insert("message".into(), "y".repeat(300_000));
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Completed { outputs, .. } if outputs["jobout"] == "300000"),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "the working directory is removed"
        );
    }

    /// Issue 19, item 11: a 70,000-byte input (over the old 64 KiB bound)
    /// reaches a body that reads `$CARONI_ENV_<input>` whole; one that
    /// fits no environment fails the job naming the input and its file.
    #[tokio::test]
    async fn safety_11_a_large_input_is_never_silently_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(r#"printf '{"jobout": "%s"}' "${#CARONI_ENV_message}""#);
        s.inputs.insert("message".into(), "z".repeat(70_000));
        let r = BashExecutor::new(dir.path().into())
            .run(s.clone(), CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Completed { outputs, .. } if outputs["jobout"] == "70000"),
            "{r:?}"
        );
        s.inputs.insert("message".into(), "z".repeat(200_000));
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Failed { message, .. }
                if message.contains("input `message` is 200000 bytes") && message.contains("$CARONI_FILE_message")),
            "{r:?}"
        );
    }

    /// Issue 19, item 12: 32 inputs of 64 KiB (2 MiB, the manager's total
    /// bound) run: what the environment cannot hold goes to files, and a
    /// body that reads the files sees every byte.
    #[tokio::test]
    async fn safety_12_inputs_within_the_accepted_limits_can_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(
            r#"n=0; for v in ${!CARONI_ENV_*}; do val=${!v}; n=$((n + ${#val})); done
               for f in ${!CARONI_FILE_*}; do n=$((n + $(wc -c < "${!f}"))); done
               printf '{"jobout": "%s"}' "$n""#,
        );
        s.inputs = (0..32)
            .map(|i| (format!("in{i:02}"), "q".repeat(64 * 1024)))
            .collect();
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Completed { outputs, .. } if outputs["jobout"] == (32 * 64 * 1024).to_string()),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec("sleep 30 & sleep 30; echo '{}'");
        s.timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let r = BashExecutor::new(dir.path().into())
            .run(s, CancellationToken::new())
            .await;
        assert!(
            matches!(&r, RunResult::Failed { message, kind: Failure::Timeout, .. } if message.contains("timed out")),
            "{r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "children must not hold the job"
        );
    }
}
