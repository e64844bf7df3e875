//! The Docker executor: the job's body runs as `bash -c BODY` in a fresh
//! container of the job type's image, through the Docker Engine API on the
//! local socket (`DOCKER_HOST` when set). Inputs arrive as
//! `CARONI_ENV_<input>` (larger ones as files under `/caroni/inputs`,
//! named by `CARONI_FILE_<input>`); stdout is read up to the job type's
//! limit and checked as for bash. The container is labelled with the job
//! and the agent, killed on cancel or timeout, and removed in every case;
//! an agent that restarts removes the containers it had started.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use caroni_types::DockerSpec;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::output::{env_plan, failed, failed_as, ENV_VALUE_MAX};
use super::RunSpec;
use crate::machine::{Failure, RunResult};

/// Label holding the Caroni job id.
pub const JOB_LABEL: &str = "org.caroni.job";
/// Label holding the node id of the agent that started the container.
pub const AGENT_LABEL: &str = "org.caroni.agent";
/// How long one call to the daemon may take before the job fails.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Runs jobs in containers.
#[derive(Clone)]
pub struct DockerExecutor {
    node_id: String,
    work_root: PathBuf,
    blobs: Option<caroni_blob::Blobs>,
    /// The client and why the daemon is unreachable, refreshed by
    /// [`DockerExecutor::refresh`].
    state: Arc<Mutex<Result<Docker, DockerError>>>,
}

impl std::fmt::Debug for DockerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerExecutor")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// The container's working directory: a host directory of the job, so
/// that the files a job declares as outputs can be stored.
const WORK_DIR: &str = "/caroni/work";

/// The container name of a job.
pub fn container_name(job_id: uuid::Uuid) -> String {
    format!("caroni-{job_id}")
}

/// Why the Docker daemon could not do what the agent asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    /// Not pinged yet.
    #[error("the Docker daemon has not been checked yet")]
    NotChecked,
    /// The daemon cannot be reached (its socket, `DOCKER_HOST`).
    #[error("the Docker daemon is not reachable ({0}); start it or set DOCKER_HOST")]
    Unreachable(String),
    /// The daemon did not answer in time.
    #[error("the Docker daemon did not answer {what} within {seconds} s")]
    Timeout {
        /// What was asked.
        what: &'static str,
        /// The bound.
        seconds: u64,
    },
    /// The daemon refused or failed the call (bollard's message).
    #[error("{0}")]
    Api(String),
}

fn daemon_error(e: &bollard::errors::Error) -> DockerError {
    DockerError::Unreachable(e.to_string())
}

impl DockerExecutor {
    /// `node_id` labels the containers; large inputs are written under
    /// `work_root`.
    pub fn new(node_id: String, work_root: PathBuf) -> Self {
        Self {
            node_id,
            work_root,
            blobs: None,
            state: Arc::new(Mutex::new(Err(DockerError::NotChecked))),
        }
    }

    /// File inputs are staged from, and File outputs stored into, `blobs`.
    pub fn with_blobs(mut self, blobs: Option<caroni_blob::Blobs>) -> Self {
        self.blobs = blobs;
        self
    }

    fn client(&self) -> Result<Docker, DockerError> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why jobs cannot run now (the daemon is down), if so.
    pub fn unavailable(&self) -> Option<String> {
        self.client().err().map(|e| e.to_string())
    }

    /// Pings the daemon and records the outcome; returns it.
    pub async fn refresh(&self) -> Result<(), DockerError> {
        let r = match Docker::connect_with_local_defaults() {
            Ok(d) => match tokio::time::timeout(Duration::from_secs(5), d.ping()).await {
                Ok(Ok(_)) => Ok(d),
                Ok(Err(e)) => Err(daemon_error(&e)),
                Err(_) => Err(DockerError::Timeout {
                    what: "a ping",
                    seconds: 5,
                }),
            },
            Err(e) => Err(daemon_error(&e)),
        };
        let out = r.as_ref().map(|_| ()).map_err(Clone::clone);
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = r;
        out
    }

    /// Removes the containers this agent started and that are left over
    /// (their jobs run again after a restart); returns how many.
    pub async fn reap(&self) -> Result<usize, DockerError> {
        let docker = self.client()?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{AGENT_LABEL}={}", self.node_id)],
        )]);
        let list = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| daemon_error(&e))?;
        let mut n = 0;
        for c in list {
            if let Some(id) = c.id {
                if remove(&docker, &id).await.is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Runs one job in a container of `d.image`.
    pub async fn run(&self, spec: RunSpec, d: &DockerSpec, cancel: CancellationToken) -> RunResult {
        let docker = match self.client() {
            Ok(c) => c,
            Err(_) => match self.refresh().await {
                Ok(()) => match self.client() {
                    Ok(c) => c,
                    Err(e) => return failed(e.to_string(), None, b""),
                },
                Err(e) => return failed(e.to_string(), None, b""),
            },
        };
        let name = container_name(spec.job_id);
        let dir = self.work_root.join(spec.job_id.to_string());
        let r = self.run_in(&docker, &name, &dir, spec, d, cancel).await;
        // Removed in every case: finished, failed, killed or timed out.
        let _ = remove(&docker, &name).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        r
    }

    async fn run_in(
        &self,
        docker: &Docker,
        name: &str,
        dir: &std::path::Path,
        spec: RunSpec,
        d: &DockerSpec,
        cancel: CancellationToken,
    ) -> RunResult {
        let deadline = tokio::time::Instant::now() + spec.timeout;
        // The image must be here; one pull is tried (it fails at once
        // where no registry is reachable).
        match bounded(docker.inspect_image(&d.image)).await {
            Ok(Ok(_)) => {}
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => {
                // Within the job's own time limit too.
                let pulled = tokio::time::timeout_at(deadline, pull(docker, &d.image))
                    .await
                    .unwrap_or(Err(DockerError::Timeout {
                        what: "the pull within the job's time limit",
                        seconds: spec.timeout.as_secs(),
                    }));
                if let Err(why) = pulled {
                    return failed(
                        format!(
                            "image {} is not on this agent's Docker host and cannot be pulled: {why}",
                            d.image
                        ),
                        None,
                        b"",
                    );
                }
            }
            Ok(Err(e)) => return failed(daemon_error(&e).to_string(), None, b""),
            Err(e) => return failed(e.to_string(), None, b""),
        }
        let mut env = vec![
            format!("CARONI_JOB_ID={}", spec.job_id),
            "LANG=C.UTF-8".to_string(),
        ];
        let mut binds = Vec::new();
        let to_files = match env_plan(&spec) {
            Ok(f) => f,
            Err(msg) => return failed(msg.to_string(), None, b""),
        };
        // File inputs in `files/` of the inputs mount; the working
        // directory is `/caroni/work`, on the host, so that File outputs
        // can be read from it.
        let work = dir.join("work");
        if let Err(e) = tokio::fs::create_dir_all(&work).await {
            return failed(format!("cannot create {}: {e}", work.display()), None, b"");
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = tokio::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).await;
        }
        binds.push(format!("{}:{WORK_DIR}", work.display()));
        let staged = {
            let (blobs, values, d) = (self.blobs.clone(), spec.inputs.clone(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || {
                super::files::stage(
                    blobs.as_ref(),
                    &values,
                    &d,
                    std::path::Path::new("/caroni/inputs"),
                )
            })
            .await
        };
        let staged = match staged {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(e.to_string(), None, b""),
            Err(e) => return failed(e.to_string(), None, b""),
        };
        for (k, v) in &spec.inputs {
            if let Some((path, json)) = staged.get(k) {
                env.push(format!("CARONI_FILE_{k}={}", path.display()));
                env.push(format!("CARONI_ENV_{k}={json}"));
            } else if to_files.contains(k) {
                if let Err(e) = tokio::fs::create_dir_all(dir).await {
                    return failed(format!("cannot create {}: {e}", dir.display()), None, b"");
                }
                let file = dir.join(k);
                if let Err(e) = tokio::fs::write(&file, v).await {
                    return failed(format!("cannot write input {k}: {e}"), None, b"");
                }
                env.push(format!("CARONI_FILE_{k}=/caroni/inputs/{k}"));
            } else {
                env.push(format!("CARONI_ENV_{k}={v}"));
            }
        }
        if tokio::fs::metadata(dir).await.is_ok() {
            // Readable by the image's user, whoever it is: the data
            // directory above (0700) keeps other users of the host out.
            readable_by_all(dir).await;
            binds.push(format!("{}:/caroni/inputs:ro", dir.display()));
        }
        for (k, v) in &spec.job_kvs {
            if caroni_types::validate_env_name(k).is_ok() && v.len() <= ENV_VALUE_MAX {
                env.push(format!("CARONI_KV_{k}={v}"));
            }
        }
        for n in &d.env {
            if let Ok(v) = std::env::var(n) {
                env.push(format!("{n}={v}"));
            }
        }
        let body = ContainerCreateBody {
            image: Some(d.image.clone()),
            entrypoint: Some(vec!["bash".into(), "-c".into()]),
            cmd: Some(vec![spec.body.clone()]),
            env: Some(env),
            working_dir: Some(WORK_DIR.into()),
            labels: Some(HashMap::from([
                (JOB_LABEL.to_string(), spec.job_id.to_string()),
                (AGENT_LABEL.to_string(), self.node_id.clone()),
            ])),
            host_config: Some(HostConfig {
                network_mode: Some(d.network.clone()),
                nano_cpus: d.nano_cpus.and_then(|n| i64::try_from(n).ok()),
                memory: d.memory_bytes.and_then(|n| i64::try_from(n).ok()),
                binds: (!binds.is_empty()).then_some(binds),
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A container of this name left by an earlier attempt goes first.
        let _ = remove(docker, name).await;
        let created = bounded(docker.create_container(
            Some(CreateContainerOptionsBuilder::default().name(name).build()),
            body,
        ))
        .await;
        match created {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return failed(
                    format!("cannot create a container of {}: {e}", d.image),
                    None,
                    b"",
                )
            }
            Err(e) => return failed(e.to_string(), None, b""),
        }
        match bounded(docker.start_container(name, None)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return failed(
                    format!("cannot start the container of {}: {e}", d.image),
                    None,
                    b"",
                )
            }
            Err(e) => return failed(e.to_string(), None, b""),
        }
        let limit = spec.max_output_bytes;
        let logs = docker.logs(
            name,
            Some(
                LogsOptionsBuilder::default()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        let (mut out_log, mut err_log) = match &spec.logs {
            Some(l) => (
                Some(l.writer(crate::logs::Stream::Stdout)),
                Some(l.writer(crate::logs::Stream::Stderr)),
            ),
            None => (None, None),
        };
        let read = async {
            let mut logs = std::pin::pin!(logs);
            let (mut out, mut err, mut over) = (Vec::new(), Vec::new(), false);
            while let Some(item) = logs.next().await {
                match &item {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        if let Some(l) = out_log.as_mut() {
                            l.write(message);
                        }
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        if let Some(l) = err_log.as_mut() {
                            l.write(message);
                        }
                    }
                    _ => {}
                }
                match item {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        let room = usize::try_from(limit.saturating_sub(out.len() as u64))
                            .unwrap_or(usize::MAX);
                        if message.len() > room {
                            over = true;
                            out.extend_from_slice(&message[..room]);
                        } else {
                            out.extend_from_slice(&message);
                        }
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        err.extend_from_slice(&message);
                        let extra = err
                            .len()
                            .saturating_sub(2 * crate::machine::STDERR_TAIL_BYTES);
                        err.drain(..extra);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            (out, err, over)
        };
        let ended = tokio::select! {
            r = read => Ok(r),
            _ = tokio::time::sleep_until(deadline) => {
                Err((Failure::Timeout, format!("timed out after {} s", spec.timeout.as_secs())))
            }
            _ = cancel.cancelled() => Err((Failure::Killed, "killed".to_string())),
        };
        for log in [out_log, err_log].into_iter().flatten() {
            log.finish();
        }
        let (stdout, stderr, over) = match ended {
            Ok(r) => r,
            Err((kind, why)) => {
                let _ = remove(docker, name).await;
                return failed_as(kind, why, None, b"");
            }
        };
        // The log stream ends when the container stops; its state says how.
        let state = match bounded(docker.inspect_container(name, None)).await {
            Ok(Ok(c)) => c.state.unwrap_or_default(),
            Ok(Err(e)) => {
                return failed(format!("cannot inspect the container: {e}"), None, &stderr)
            }
            Err(e) => return failed(e.to_string(), None, &stderr),
        };
        let code = state.exit_code.and_then(|c| i32::try_from(c).ok());
        if state.oom_killed == Some(true) {
            return failed_as(
                Failure::Killed,
                "killed for exceeding the job type's memory limit".into(),
                code,
                &stderr,
            );
        }
        if over {
            return failed(
                format!("stdout is larger than the job type's limit of {limit} bytes"),
                code,
                &stderr,
            );
        }
        match code {
            Some(0) => {
                super::files::completed(
                    self.blobs.clone(),
                    &stdout,
                    &spec,
                    dir.join("work"),
                    Some(std::path::Path::new(WORK_DIR)),
                    &stderr,
                )
                .await
            }
            Some(c) => failed(format!("exit status {c}"), Some(c), &stderr),
            None => failed(
                "the container ended without an exit status".into(),
                None,
                &stderr,
            ),
        }
    }
}

/// A daemon call bounded by [`CALL_LIMIT`].
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> Result<T, DockerError> {
    tokio::time::timeout(CALL_LIMIT, f)
        .await
        .map_err(|_| DockerError::Timeout {
            what: "a call",
            seconds: CALL_LIMIT.as_secs(),
        })
}

async fn remove(docker: &Docker, name: &str) -> Result<(), bollard::errors::Error> {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match tokio::time::timeout(CALL_LIMIT, docker.remove_container(name, Some(opts))).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// One pull attempt, bounded to 60 s; the error says why it failed.
async fn pull(docker: &Docker, image: &str) -> Result<(), DockerError> {
    let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let stream = docker.create_image(Some(opts), None, None);
    let pulled = tokio::time::timeout(Duration::from_secs(60), async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            item.map_err(|e| DockerError::Api(e.to_string()))?;
        }
        Ok::<(), DockerError>(())
    })
    .await;
    match pulled {
        Ok(r) => r,
        Err(_) => Err(DockerError::Timeout {
            what: "the pull",
            seconds: 60,
        }),
    }
}

/// Opens `dir` and its files for reading by every user (0755/0644).
async fn readable_by_all(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let mode = |p: &std::path::Path, m: u32| {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        };
        mode(&dir, 0o755);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                // The working directory is written by the image's user.
                Ok(t) if t.is_dir() && e.file_name() == "work" => mode(&p, 0o777),
                // Staged File inputs: directories open, files as stored
                // (read-only for all).
                Ok(t) if t.is_dir() => {
                    let mut stack = vec![p];
                    while let Some(d) = stack.pop() {
                        mode(&d, 0o755);
                        if let Ok(sub) = std::fs::read_dir(&d) {
                            stack.extend(
                                sub.flatten()
                                    .filter(|x| x.file_type().is_ok_and(|t| t.is_dir()))
                                    .map(|x| x.path()),
                            );
                        }
                    }
                }
                _ => mode(&p, 0o644),
            }
        }
    })
    .await;
}
