//! Where job bodies run: the [`Executor`] trait, what a run needs
//! ([`RunSpec`]) and leaves ([`Execution`]), and [`Executors`], which
//! picks one per job by its job type's `executor`: [`bash`] on the agent's
//! host, [`docker`] in a container, [`slurm`] as a batch job. What they
//! share (the environment plan for inputs, bounded output, the check of
//! stdout) is in [`output`].

pub mod bash;
pub mod cwl;
mod cwl_values;
pub mod docker;
pub mod files;
pub mod output;
pub mod slurm;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::machine::RunResult;

pub use bash::BashExecutor;
pub use output::{parse_outputs, ENV_VALUE_MAX};

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
    /// Where it runs (the job type's executor when the job started).
    pub executor: caroni_types::ExecutorSpec,
    /// The real CWL tool it runs, as JSON, when its job type is
    /// `CWL_TOOL_JOB_TYPE` (set by the agent from the job type, never from
    /// what a manager chose to put in the static parameters).
    pub cwl_tool: Option<String>,
    /// Where its stdout and stderr are kept (set by [`Executors`] when the
    /// agent keeps logs).
    pub logs: Option<crate::logs::LogFiles>,
}

/// Where a job runs, as `caroni job show` tells it: kept per job.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Execution {
    /// bash, docker or slurm.
    pub executor: String,
    /// The container's name (docker) or the Slurm job id (slurm), once
    /// known.
    pub external_id: String,
}

/// Runs job bodies.
pub trait Executor: Send + Sync + 'static {
    /// Runs `spec` until it ends, times out or `cancel` fires.
    fn run(
        &self,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> impl Future<Output = RunResult> + Send;

    /// Why jobs with this executor cannot run now (a daemon down, a
    /// command missing), if so: the agent declines their requests with it.
    fn unavailable(&self, executor: &caroni_types::ExecutorSpec) -> Option<String> {
        let _ = executor;
        None
    }

    /// Where the job runs, known before it starts (the container's name).
    fn external_id(&self, spec: &RunSpec) -> String {
        let _ = spec;
        String::new()
    }
}

/// Every executor, chosen per job by its job type's `executor`.
#[derive(Clone, Debug)]
pub struct Executors {
    bash: BashExecutor,
    cwl: cwl::CwlExecutor,
    docker: docker::DockerExecutor,
    slurm: slurm::SlurmExecutor,
    /// Set once a job type of that executor was asked about: only those
    /// are checked again every 5 s (no pings or `scontrol` runs on an
    /// agent that uses neither).
    wanted: Arc<[AtomicBool; 2]>,
    /// Where jobs' stdout and stderr are kept, if they are.
    logs: Option<crate::logs::JobLogs>,
}

const DOCKER: usize = 0;
const SLURM: usize = 1;

impl Executors {
    /// `node_id` labels containers; working directories go under
    /// `work_root`; Slurm job ids are recorded in `store`.
    pub fn new(
        node_id: String,
        work_root: PathBuf,
        store: caroni_store::Store,
        blobs: Option<caroni_blob::Blobs>,
    ) -> Self {
        Self {
            bash: BashExecutor::new(work_root.clone()).with_blobs(blobs.clone()),
            cwl: cwl::CwlExecutor::new(work_root.join("cwl"), blobs.clone()),
            docker: docker::DockerExecutor::new(node_id, work_root.join("docker"))
                .with_blobs(blobs.clone()),
            slurm: slurm::SlurmExecutor::new(work_root.join("slurm"), store)
                .with_blobs(blobs.clone()),
            wanted: Arc::new([AtomicBool::new(false), AtomicBool::new(false)]),
            logs: None,
        }
    }

    /// Keeps every job's stdout and stderr in `logs`.
    pub fn with_logs(mut self, logs: crate::logs::JobLogs) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Runs CWL tools in containers (`--cwl-tools container`), labelled
    /// as this agent's.
    pub fn with_cwl_containers(mut self, node_id: String) -> Self {
        self.cwl = self.cwl.in_containers(node_id);
        self
    }

    /// Bounds of every CWL expression the tools evaluate.
    pub fn with_cwl_limits(mut self, limits: caroni_cwl_exec::expr::Limits) -> Self {
        self.cwl = self.cwl.with_limits(limits);
        self
    }

    /// Checks which executors can run now, removes containers left by an
    /// earlier run of this agent, and keeps checking every 5 s. Call once,
    /// in the runtime, before jobs run.
    pub async fn start(&self) {
        if self.docker.refresh().await.is_ok() {
            match self.docker.reap().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(containers = n, "removed containers left by an earlier run")
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for leftover containers"),
            }
        }
        self.slurm.spawn_poller();
        // Checked in the background: a silent controller must not delay
        // the node's start (until then Slurm job types are declined).
        let first = self.slurm.clone();
        tokio::spawn(async move {
            first.refresh().await;
        });
        let (docker, slurm) = (self.docker.clone(), self.slurm.clone());
        let wanted = self.wanted.clone();
        tokio::spawn(async move {
            let mut was = (docker.unavailable(), slurm.unavailable());
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if wanted[DOCKER].load(Ordering::Relaxed) {
                    let _ = docker.refresh().await;
                }
                if wanted[SLURM].load(Ordering::Relaxed) {
                    slurm.refresh().await;
                }
                let now = (docker.unavailable(), slurm.unavailable());
                if now.0.is_some() != was.0.is_some() {
                    tracing::info!(why = ?now.0, "the Docker executor's availability changed");
                }
                if now.1.is_some() != was.1.is_some() {
                    tracing::info!(why = ?now.1, "the Slurm executor's availability changed");
                }
                was = now;
            }
        });
    }
}

impl Executor for Executors {
    async fn run(&self, mut spec: RunSpec, cancel: CancellationToken) -> RunResult {
        if let Some(logs) = &self.logs {
            spec.logs = Some(logs.files(spec.job_id));
        }
        if spec.cwl_tool.is_some() {
            return self.cwl.run(spec, cancel).await;
        }
        match spec.executor.clone() {
            caroni_types::ExecutorSpec::Bash => self.bash.run(spec, cancel).await,
            caroni_types::ExecutorSpec::Docker(d) => self.docker.run(spec, &d, cancel).await,
            caroni_types::ExecutorSpec::Slurm(s) => self.slurm.run(spec, &s, cancel).await,
        }
    }

    fn unavailable(&self, executor: &caroni_types::ExecutorSpec) -> Option<String> {
        match executor {
            caroni_types::ExecutorSpec::Docker(_) => {
                self.wanted[DOCKER].store(true, Ordering::Relaxed)
            }
            caroni_types::ExecutorSpec::Slurm(_) => {
                self.wanted[SLURM].store(true, Ordering::Relaxed)
            }
            caroni_types::ExecutorSpec::Bash => {}
        }
        match executor {
            caroni_types::ExecutorSpec::Bash => None,
            caroni_types::ExecutorSpec::Docker(_) => self.docker.unavailable(),
            caroni_types::ExecutorSpec::Slurm(_) => self.slurm.unavailable(),
        }
    }

    fn external_id(&self, spec: &RunSpec) -> String {
        match spec.executor {
            caroni_types::ExecutorSpec::Docker(_) => docker::container_name(spec.job_id),
            _ => String::new(),
        }
    }
}
