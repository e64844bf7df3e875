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

use super::output::{env_plan, failed, failed_as, parse_outputs, tail, ENV_VALUE_MAX};
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
    /// The client and why the daemon is unreachable, refreshed by
    /// [`DockerExecutor::refresh`].
    state: Arc<Mutex<Result<Docker, String>>>,
}

impl std::fmt::Debug for DockerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerExecutor")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// The container name of a job.
pub fn container_name(job_id: uuid::Uuid) -> String {
    format!("caroni-{job_id}")
}

fn daemon_error(e: &bollard::errors::Error) -> String {
    format!("the Docker daemon is not reachable ({e}); start it or set DOCKER_HOST")
}

impl DockerExecutor {
    /// `node_id` labels the containers; large inputs are written under
    /// `work_root`.
    pub fn new(node_id: String, work_root: PathBuf) -> Self {
        Self {
            node_id,
            work_root,
            state: Arc::new(Mutex::new(Err("not checked yet".into()))),
        }
    }

    fn client(&self) -> Result<Docker, String> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why jobs cannot run now (the daemon is down), if so.
    pub fn unavailable(&self) -> Option<String> {
        self.client().err()
    }

    /// Pings the daemon and records the outcome; returns it.
    pub async fn refresh(&self) -> Result<(), String> {
        let r = match Docker::connect_with_local_defaults() {
            Ok(d) => match tokio::time::timeout(Duration::from_secs(5), d.ping()).await {
                Ok(Ok(_)) => Ok(d),
                Ok(Err(e)) => Err(daemon_error(&e)),
                Err(_) => Err("the Docker daemon did not answer a ping within 5 s".into()),
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
    pub async fn reap(&self) -> Result<usize, String> {
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
                    Err(e) => return failed(e, None, b""),
                },
                Err(e) => return failed(e, None, b""),
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
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "the job's {} s ran out while pulling",
                            spec.timeout.as_secs()
                        ))
                    });
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
            Ok(Err(e)) => return failed(daemon_error(&e), None, b""),
            Err(e) => return failed(e, None, b""),
        }
        let mut env = vec![
            format!("CARONI_JOB_ID={}", spec.job_id),
            "LANG=C.UTF-8".to_string(),
        ];
        let mut binds = Vec::new();
        let to_files = match env_plan(&spec) {
            Ok(f) => f,
            Err(msg) => return failed(msg, None, b""),
        };
        for (k, v) in &spec.inputs {
            if to_files.contains(k) {
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
            working_dir: Some("/tmp".into()),
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
            Err(e) => return failed(e, None, b""),
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
            Err(e) => return failed(e, None, b""),
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
        let read = async move {
            let mut logs = std::pin::pin!(logs);
            let (mut out, mut err, mut over) = (Vec::new(), Vec::new(), false);
            while let Some(item) = logs.next().await {
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
            Err(e) => return failed(e, None, &stderr),
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
            Some(0) => match parse_outputs(&stdout, &spec.outputs) {
                Ok(outputs) => RunResult::Completed {
                    outputs,
                    stderr_tail: tail(&stderr),
                },
                Err(msg) => failed(msg, Some(0), &stderr),
            },
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
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CALL_LIMIT, f).await.map_err(|_| {
        format!(
            "the Docker daemon did not answer within {} s",
            CALL_LIMIT.as_secs()
        )
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
async fn pull(docker: &Docker, image: &str) -> Result<(), String> {
    let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let stream = docker.create_image(Some(opts), None, None);
    let pulled = tokio::time::timeout(Duration::from_secs(60), async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            item.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    })
    .await;
    match pulled {
        Ok(r) => r,
        Err(_) => Err("the pull did not finish within 60 s".into()),
    }
}

/// Opens `dir` and its files for reading by every user (0755/0644).
async fn readable_by_all(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).await;
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = entries.next_entry().await {
            let _ =
                tokio::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644)).await;
        }
    }
}
