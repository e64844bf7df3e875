//! Running a job's body: `bash -c BODY` in a fresh working directory, with
//! each input as `CARONI_ENV_<name>` and a minimal, explicit environment.
//! The process runs in its own process group so that a kill or a timeout
//! stops it and every child it started.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::machine::{RunResult, STDERR_TAIL_BYTES};

/// Everything needed to run one job.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Job id (also the working directory's name).
    pub job_id: uuid::Uuid,
    /// The bash body, as it was when the job started.
    pub body: String,
    /// Input values.
    pub inputs: BTreeMap<String, String>,
    /// Static parameters, as `CARONI_KV_<key>` where the key allows it.
    pub job_kvs: BTreeMap<String, String>,
    /// Declared outputs.
    pub outputs: Vec<String>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Largest stdout accepted.
    pub max_output_bytes: u64,
}

/// Runs job bodies.
pub trait Executor: Send + Sync + 'static {
    /// Runs `spec` until it ends, times out or `cancel` fires.
    fn run(
        &self,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> impl Future<Output = RunResult> + Send;
}

/// The bash executor.
#[derive(Clone, Debug)]
pub struct BashExecutor {
    work_root: PathBuf,
    bash: PathBuf,
}

/// The PATH jobs run with.
const JOB_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

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
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn failed(message: String, exit_status: Option<i32>, stderr: &[u8]) -> RunResult {
    RunResult::Failed {
        message,
        exit_status,
        stderr_tail: tail(stderr),
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Checks stdout: one JSON object with every declared output.
pub fn parse_outputs(
    stdout: &[u8],
    outputs: &[String],
) -> Result<BTreeMap<String, String>, String> {
    let text = String::from_utf8_lossy(stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        let shown: String = text.chars().take(200).collect();
        format!("stdout is not a JSON object ({e}); it began with: {shown:?}")
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err("stdout is JSON but not an object; print {\"output\": \"value\", …}".into());
    };
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for name in outputs {
        match map.get(name) {
            Some(serde_json::Value::String(s)) => {
                out.insert(name.clone(), s.clone());
            }
            Some(serde_json::Value::Null) | None => missing.push(name.as_str()),
            Some(other) => {
                out.insert(name.clone(), other.to_string());
            }
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "stdout's JSON object lacks the declared output(s) {}",
            missing.join(", ")
        ));
    }
    Ok(out)
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
        for (k, v) in &spec.inputs {
            cmd.env(format!("CARONI_ENV_{k}"), v);
        }
        for (k, v) in &spec.job_kvs {
            if caroni_types::validate_env_name(k).is_ok() {
                cmd.env(format!("CARONI_KV_{k}"), v);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return failed(format!("cannot start bash: {e}"), None, b""),
        };
        let pid = child.id();
        let limit = spec.max_output_bytes;
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let out_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(limit + 1).read_to_end(&mut buf).await;
            }
            buf
        });
        let err_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut buf).await;
            }
            buf
        });
        let status = tokio::select! {
            s = child.wait() => Ok(s),
            _ = tokio::time::sleep(spec.timeout) => Err(format!("timed out after {} s", spec.timeout.as_secs())),
            _ = cancel.cancelled() => Err("killed".to_string()),
        };
        if status.is_err() {
            kill_group(pid);
            let _ = child.wait().await;
        }
        // Children that outlive bash must not keep the pipes open.
        kill_group(pid);
        let stdout = out_task.await.unwrap_or_default();
        let stderr = err_task.await.unwrap_or_default();
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let status = match status {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return failed(format!("cannot wait for the process: {e}"), None, &stderr)
            }
            Err(why) => return failed(why, None, &stderr),
        };
        if !status.success() {
            let code = status.code();
            let msg = match code {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_string(),
            };
            return failed(msg, code, &stderr);
        }
        if stdout.len() as u64 > limit {
            return failed(
                format!("stdout is larger than the job type's limit of {limit} bytes"),
                Some(0),
                &stderr,
            );
        }
        match parse_outputs(&stdout, &spec.outputs) {
            Ok(outputs) => RunResult::Completed {
                outputs,
                stderr_tail: tail(&stderr),
            },
            Err(msg) => failed(msg, Some(0), &stderr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(body: &str) -> RunSpec {
        RunSpec {
            job_id: uuid::Uuid::new_v4(),
            body: body.into(),
            inputs: BTreeMap::from([("message".into(), "caronirocks".into())]),
            job_kvs: BTreeMap::new(),
            outputs: vec!["jobout".into()],
            timeout: Duration::from_secs(10),
            max_output_bytes: 1 << 20,
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
            matches!(&r, RunResult::Failed { message, exit_status: Some(3), stderr_tail } if message == "exit status 3" && stderr_tail.contains("oops")),
            "{r:?}"
        );
        let r = run("echo not json").await;
        assert!(
            matches!(&r, RunResult::Failed { message, .. } if message.contains("stdout is not a JSON object")),
            "{r:?}"
        );
        let r = run(r#"echo '{"other": 1}'"#).await;
        assert!(
            matches!(&r, RunResult::Failed { message, .. } if message.contains("lacks the declared output(s) jobout")),
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
            matches!(&r, RunResult::Failed { message, .. } if message.contains("timed out")),
            "{r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "children must not hold the job"
        );
    }
}
