//! The Slurm executor: each Caroni job is one Slurm batch job submitted
//! with `sbatch`, named `caroni-<job id>`. Its working directory (inputs,
//! the body, stdout, stderr and the exit status the batch script writes)
//! lives under the agent's data directory, which compute nodes must see at
//! the same path (a shared file system; on a single-node cluster it is
//! local). The Slurm job id is stored with the job as soon as `sbatch`
//! returns; an agent that restarts finds its Slurm job by that id, or by
//! name when it died between `sbatch` and that write, and waits for it
//! instead of submitting it again. The states of every watched Slurm job
//! come from one `scontrol -o show job` per second, whatever their number;
//! `scancel` stops one on kill, cancel or timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caroni_store::{keys::Key, Store};
use caroni_types::SlurmSpec;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::output::{env_plan, failed, failed_as, ENV_VALUE_MAX};
use super::{Execution, RunSpec};
use crate::machine::{Failure, RunResult};

/// How often the states of watched Slurm jobs are read.
const POLL: Duration = Duration::from_secs(1);
/// How long one Slurm command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// What Slurm says of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlurmJob {
    /// Slurm job id.
    pub id: String,
    /// Job name.
    pub name: String,
    /// PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, …
    pub state: String,
    /// Why it is in that state.
    pub reason: String,
    /// The exit code Slurm recorded (`ExitCode=a:b`, the `a`).
    pub exit_code: Option<i32>,
}

impl SlurmJob {
    fn ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESV_DEL_HOLD"
                | "SPECIAL_EXIT"
        )
    }
}

/// Parses `scontrol -o show job` output: one job per line.
pub fn parse_jobs(text: &str) -> Vec<SlurmJob> {
    text.lines()
        .filter_map(|line| {
            let mut f: HashMap<&str, &str> = HashMap::new();
            for part in line.split(' ') {
                if let Some((k, v)) = part.split_once('=') {
                    f.entry(k).or_insert(v);
                }
            }
            let id = f.get("JobId")?.to_string();
            Some(SlurmJob {
                id,
                name: f.get("JobName").unwrap_or(&"").to_string(),
                state: f.get("JobState").unwrap_or(&"").to_string(),
                reason: f.get("Reason").unwrap_or(&"").to_string(),
                exit_code: f
                    .get("ExitCode")
                    .and_then(|c| c.split(':').next())
                    .and_then(|c| c.parse().ok()),
            })
        })
        .collect()
}

/// Why a Slurm command or a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// The command is not installed.
    #[error("{0} is not on this agent's PATH; install Slurm's client commands (slurm-client)")]
    Missing(String),
    /// The command could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The command.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The command did not finish in time.
    #[error("{program} did not finish within {seconds} s")]
    Timeout {
        /// The command.
        program: String,
        /// The bound.
        seconds: u64,
    },
    /// The command exited non-zero.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// sbatch printed no job id.
    #[error("sbatch printed no job id: {0}")]
    NoJobId(String),
    /// The job's files could not be written.
    #[error("cannot write {what}: {source}")]
    Write {
        /// Which file.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An input the body reads from the environment is too large.
    #[error(transparent)]
    TooLarge(#[from] super::output::TooLarge),
    /// File inputs could not be staged.
    #[error("{0}")]
    Files(String),
    /// The Slurm job id could not be recorded.
    #[error("cannot record the Slurm job id: {0}")]
    Record(#[from] caroni_store::Error),
}

/// Runs a command with a time limit; stdout on success, else why not.
async fn command(program: &str, args: &[String]) -> Result<String, SlurmError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(COMMAND_LIMIT, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SlurmError::Missing(program.to_string()))
        }
        Ok(Err(source)) => {
            return Err(SlurmError::Spawn {
                program: program.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(SlurmError::Timeout {
                program: program.to_string(),
                seconds: COMMAND_LIMIT.as_secs(),
            })
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SlurmError::Failed {
            program: program.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The Slurm job name of a Caroni job.
pub fn job_name(job_id: uuid::Uuid) -> String {
    format!("caroni-{job_id}")
}

type Watchers = HashMap<String, watch::Sender<Option<SlurmJob>>>;

/// Runs jobs as Slurm batch jobs.
#[derive(Clone)]
pub struct SlurmExecutor {
    work_root: PathBuf,
    store: Store,
    blobs: Option<caroni_blob::Blobs>,
    watchers: Arc<Mutex<Watchers>>,
    unavailable: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for SlurmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlurmExecutor").finish()
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

impl SlurmExecutor {
    /// Working directories go under `work_root`; Slurm job ids are
    /// recorded in `store`.
    pub fn new(work_root: PathBuf, store: Store) -> Self {
        Self {
            work_root,
            store,
            blobs: None,
            watchers: Arc::default(),
            unavailable: Arc::new(Mutex::new(Some("not checked yet".into()))),
        }
    }

    /// File inputs are staged from, and File outputs stored into, `blobs`
    /// (the working directory is shared with the cluster's nodes).
    pub fn with_blobs(mut self, blobs: Option<caroni_blob::Blobs>) -> Self {
        self.blobs = blobs;
        self
    }

    /// Why jobs cannot be submitted now, if so.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Asks the controller whether it answers; records and returns why not.
    pub async fn refresh(&self) -> Option<String> {
        let why = match command("sbatch", &["--version".into()]).await {
            Err(e) => Some(e.to_string()),
            Ok(_) => command("scontrol", &["ping".into()])
                .await
                .err()
                .map(|e| format!("the Slurm controller does not answer ({e})")),
        };
        *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why.clone();
        why
    }

    /// Reads the states of every watched Slurm job, once per second, with
    /// one `scontrol` call. Runs until the runtime stops.
    pub fn spawn_poller(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let watched = {
                    let mut w = me
                        .watchers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    w.retain(|_, tx| !tx.is_closed());
                    !w.is_empty()
                };
                if !watched {
                    continue;
                }
                let jobs =
                    match command("scontrol", &["-o".into(), "show".into(), "job".into()]).await {
                        Ok(text) => parse_jobs(&text),
                        Err(e) if e.to_string().contains("No jobs in the system") => Vec::new(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the Slurm jobs' states");
                            continue;
                        }
                    };
                let by_id: HashMap<&str, &SlurmJob> =
                    jobs.iter().map(|j| (j.id.as_str(), j)).collect();
                let w = me
                    .watchers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (id, tx) in w.iter() {
                    let _ = tx.send(by_id.get(id.as_str()).map(|j| (*j).clone()));
                }
            }
        });
    }

    fn record(&self, job: uuid::Uuid, slurm_id: &str) -> Result<(), SlurmError> {
        self.store
            .put(
                crate::records::EXECUTIONS,
                &Key::new().uuid(&job).finish(),
                &Execution {
                    executor: "slurm".into(),
                    external_id: slurm_id.to_string(),
                },
            )
            .map_err(SlurmError::Record)
    }

    /// The Slurm job already submitted for this Caroni job, if any: by the
    /// recorded id, else by name (submitted, then the agent died before
    /// recording it).
    async fn existing(&self, job: uuid::Uuid) -> Option<String> {
        let recorded: Option<Execution> = self
            .store
            .get(crate::records::EXECUTIONS, &Key::new().uuid(&job).finish())
            .ok()
            .flatten();
        if let Some(x) = recorded.filter(|x| x.executor == "slurm" && !x.external_id.is_empty()) {
            return Some(x.external_id);
        }
        let out = command(
            "squeue",
            &[
                "-h".into(),
                "-t".into(),
                "all".into(),
                "-o".into(),
                "%i".into(),
                "--name".into(),
                job_name(job),
            ],
        )
        .await
        .ok()?;
        let id = out
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())?
            .to_string();
        let _ = self.record(job, &id);
        Some(id)
    }

    async fn submit(
        &self,
        spec: &RunSpec,
        s: &SlurmSpec,
        dir: &Path,
    ) -> Result<String, SlurmError> {
        let _ = tokio::fs::remove_dir_all(dir).await;
        let inputs = dir.join("inputs");
        tokio::fs::create_dir_all(&inputs)
            .await
            .map_err(|source| SlurmError::Write {
                what: inputs.display().to_string(),
                source,
            })?;
        // The body sees exactly the documented environment (as bash jobs
        // do) plus the SLURM_* variables of its allocation: `env -i`, with
        // the Caroni variables built up in an array. sbatch runs with
        // --export=NIL, so nothing of the agent's environment travels.
        let mut script = format!(
            "#!/bin/bash\n# Caroni job {id}\nexport PATH={path}\nDIR={dir}\ncd \"$DIR\" || exit 97\nE=(PATH={path} \"HOME=$DIR\" \"TMPDIR=$DIR\" LANG=C.UTF-8 CARONI_JOB_ID={id})\n",
            id = spec.job_id,
            dir = quote(dir),
            path = super::output::JOB_PATH,
        );
        let to_files = env_plan(spec)?;
        let staged = {
            let (blobs, values, d) = (self.blobs.clone(), spec.inputs.clone(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || {
                super::files::stage(blobs.as_ref(), &values, &d, &d)
            })
            .await
            .map_err(|e| SlurmError::Files(e.to_string()))?
            .map_err(|e| SlurmError::Files(e.to_string()))?
        };
        for (k, v) in &spec.inputs {
            let (v, file) = match staged.get(k) {
                Some((path, env)) => (env.as_str(), Some(path)),
                None => (v.as_str(), None),
            };
            if let Some(path) = file {
                script.push_str(&format!("E+=(CARONI_FILE_{k}={})\n", quote(path)));
            }
            tokio::fs::write(inputs.join(k), v)
                .await
                .map_err(|source| SlurmError::Write {
                    what: format!("input {k}"),
                    source,
                })?;
            if to_files.contains(k) && file.is_none() {
                script.push_str(&format!("E+=(\"CARONI_FILE_{k}=$DIR/inputs/{k}\")\n"));
            } else {
                script.push_str(&format!(
                    "IFS= read -r -d '' v < \"$DIR/inputs/{k}\"; E+=(\"CARONI_ENV_{k}=$v\")\n"
                ));
            }
        }
        for (k, v) in &spec.job_kvs {
            if caroni_types::validate_env_name(k).is_ok() && v.len() <= ENV_VALUE_MAX {
                let f = inputs.join(format!("kv-{k}"));
                tokio::fs::write(&f, v)
                    .await
                    .map_err(|source| SlurmError::Write {
                        what: format!("parameter {k}"),
                        source,
                    })?;
                script.push_str(&format!(
                    "IFS= read -r -d '' v < \"$DIR/inputs/kv-{k}\"; E+=(\"CARONI_KV_{k}=$v\")\n"
                ));
            }
        }
        script.push_str(
            "while IFS='=' read -r -d '' n v; do case \"$n\" in SLURM_*) E+=(\"$n=$v\");; esac; done < <(env -0)\nunset v n\nenv -i \"${E[@]}\" /bin/bash \"$DIR/body.sh\" > \"$DIR/stdout\" 2> \"$DIR/stderr\"\ncode=$?\necho \"$code\" > \"$DIR/exit.tmp\" && mv \"$DIR/exit.tmp\" \"$DIR/exit\"\nexit \"$code\"\n",
        );
        tokio::fs::write(dir.join("body.sh"), &spec.body)
            .await
            .map_err(|source| SlurmError::Write {
                what: "the body".into(),
                source,
            })?;
        let batch = dir.join("batch.sh");
        tokio::fs::write(&batch, script)
            .await
            .map_err(|source| SlurmError::Write {
                what: "the batch script".into(),
                source,
            })?;
        let mut args: Vec<String> = vec![
            "--parsable".into(),
            "--export=NIL".into(),
            "--job-name".into(),
            job_name(spec.job_id),
            "--output".into(),
            dir.join("slurm.out").display().to_string(),
            "--chdir".into(),
            dir.display().to_string(),
        ];
        if let Some(p) = &s.partition {
            args.extend(["--partition".into(), p.clone()]);
        }
        if let Some(t) = &s.time_limit {
            args.extend(["--time".into(), t.clone()]);
        }
        if let Some(c) = s.cpus {
            args.extend(["--cpus-per-task".into(), c.to_string()]);
        }
        if let Some(m) = &s.memory {
            args.extend(["--mem".into(), m.clone()]);
        }
        args.extend(s.sbatch.iter().cloned());
        args.push(batch.display().to_string());
        let out = command("sbatch", &args).await?;
        let id = out.trim().split(';').next().unwrap_or_default().to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return Err(SlurmError::NoJobId(out.trim().to_string()));
        }
        // At once: a restart from here on finds it instead of submitting
        // again.
        self.record(spec.job_id, &id)?;
        Ok(id)
    }

    async fn scancel(&self, id: &str) {
        if let Err(e) = command("scancel", &[id.to_string()]).await {
            tracing::warn!(slurm_job = id, error = %e, "scancel failed");
        }
    }

    /// Runs (or re-attaches to) the Slurm job of `spec`.
    pub async fn run(&self, spec: RunSpec, s: &SlurmSpec, cancel: CancellationToken) -> RunResult {
        let dir = self.work_root.join(spec.job_id.to_string());
        let id = match self.existing(spec.job_id).await {
            Some(id) => {
                tracing::info!(job = %spec.job_id, slurm_job = %id, "re-attached to the job's Slurm job");
                id
            }
            None => match self.submit(&spec, s, &dir).await {
                Ok(id) => {
                    tracing::debug!(job = %spec.job_id, slurm_job = %id, "submitted to Slurm");
                    id
                }
                Err(e) => return failed(e.to_string(), None, b""),
            },
        };
        let r = self.wait(&spec, &id, &dir, cancel).await;
        // The job wrote its streams to files on the shared disk: kept
        // as its logs once it has ended.
        if let Some(logs) = spec.logs.clone() {
            let d = dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                logs.copy_from(crate::logs::Stream::Stdout, &d.join("stdout"));
                logs.copy_from(crate::logs::Stream::Stderr, &d.join("stderr"));
            })
            .await;
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
        r
    }

    async fn wait(
        &self,
        spec: &RunSpec,
        id: &str,
        dir: &Path,
        cancel: CancellationToken,
    ) -> RunResult {
        let (tx, mut rx) = watch::channel(None);
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), tx);
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let mut unseen = 0u32;
        let last = loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break None;
                    }
                    let now = rx.borrow_and_update().clone();
                    match now {
                        Some(j) if j.ended() => break Some(j),
                        Some(_) => unseen = 0,
                        None => {
                            // Gone from the controller (finished long
                            // ago): the files the script wrote tell.
                            unseen += 1;
                            if unseen >= 5 {
                                break None;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.scancel(id).await;
                    self.unwatch(id);
                    return failed_as(Failure::Timeout, format!("timed out after {} s (Slurm job {id} cancelled)", spec.timeout.as_secs()), None, &read_tail(dir, "stderr").await);
                }
                _ = cancel.cancelled() => {
                    self.scancel(id).await;
                    self.unwatch(id);
                    return failed_as(Failure::Killed, format!("killed (Slurm job {id} cancelled)"), None, b"");
                }
            }
        };
        self.unwatch(id);
        let stderr = read_tail(dir, "stderr").await;
        let exit: Option<i32> = tokio::fs::read_to_string(dir.join("exit"))
            .await
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let state = match &last {
            Some(j) => j.state.as_str(),
            None if exit.is_some() => "COMPLETED",
            None => {
                return failed(
                    format!("Slurm no longer knows job {id} and it left no exit status"),
                    None,
                    &stderr,
                )
            }
        };
        let code = exit.or(last.as_ref().and_then(|j| j.exit_code));
        let reason = last.as_ref().map(|j| j.reason.clone()).unwrap_or_default();
        match state {
            "COMPLETED" | "FAILED" if code != Some(0) || state == "FAILED" => failed_as(
                if code.is_some_and(|c| c != 0) {
                    Failure::ExitStatus
                } else {
                    Failure::Other
                },
                match code {
                    Some(c) => format!("exit status {c} (Slurm job {id} {state})"),
                    None => format!("Slurm job {id} {state} ({reason})"),
                },
                code,
                &stderr,
            ),
            "COMPLETED" => {
                let limit = spec.max_output_bytes;
                let out = match read_bounded(&dir.join("stdout"), limit).await {
                    Ok(Some(o)) => o,
                    Ok(None) => {
                        return failed(
                            format!("stdout is larger than the job type's limit of {limit} bytes"),
                            code,
                            &stderr,
                        )
                    }
                    Err(e) => {
                        return failed(format!("cannot read the job's stdout: {e}"), code, &stderr)
                    }
                };
                super::files::completed(
                    self.blobs.clone(),
                    &out,
                    spec,
                    dir.to_path_buf(),
                    None,
                    &stderr,
                )
                .await
            }
            "TIMEOUT" => failed_as(
                Failure::Timeout,
                format!("timed out: Slurm job {id} reached its time limit (TIMEOUT)"),
                code,
                &stderr,
            ),
            "OUT_OF_MEMORY" => failed(
                format!("Slurm job {id} ran out of memory (OUT_OF_MEMORY)"),
                code,
                &stderr,
            ),
            "CANCELLED" => failed_as(
                Failure::Killed,
                format!("Slurm job {id} was cancelled outside Caroni (CANCELLED)"),
                code,
                &stderr,
            ),
            "NODE_FAIL" => failed(
                format!("Slurm job {id} failed with its node (NODE_FAIL)"),
                code,
                &stderr,
            ),
            other => failed(
                format!("Slurm job {id} ended {other} ({reason})"),
                code,
                &stderr,
            ),
        }
    }

    fn unwatch(&self, id: &str) {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}

/// The last [`crate::machine::STDERR_TAIL_BYTES`] of a file the job
/// wrote, read from there on: a job's gigabytes of output never enter the
/// agent's memory.
async fn read_tail(dir: &Path, name: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(dir.join(name)).await else {
        return Vec::new();
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let keep = crate::machine::STDERR_TAIL_BYTES as u64;
    if f.seek(std::io::SeekFrom::Start(len.saturating_sub(keep)))
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = f.take(keep).read_to_end(&mut out).await;
    out
}

/// The whole file when it holds at most `limit` bytes, `None` when it
/// holds more (without reading it).
async fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let f = tokio::fs::File::open(path).await?;
    if f.metadata().await?.len() > limit {
        return Ok(None);
    }
    let mut out = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .await?;
    Ok((out.len() as u64 <= limit).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_parse_into_states_and_exit_codes() {
        let text = "JobId=7 JobName=caroni-x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15 RunTime=00:01:00\n\
                    JobId=8 JobName=other JobState=RUNNING Reason=None ExitCode=0:0\n\
                    garbage line\n";
        let jobs = parse_jobs(text);
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (
                jobs[0].id.as_str(),
                jobs[0].state.as_str(),
                jobs[0].exit_code
            ),
            ("7", "TIMEOUT", Some(0))
        );
        assert!(jobs[0].ended());
        assert!(!jobs[1].ended());
    }
}
