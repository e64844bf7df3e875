//! AgentService: job types (and, with the mesh, jobs).

use caroni_agent::job_types;
use caroni_proto::v1::{self as pb, agent_service_server::AgentService};
use caroni_store::Store;
use caroni_types::{DockerSpec, ExecutorSpec, JobTypeDef, SlurmSpec};
use tonic::{Request, Response, Status};

use super::{blocking, internal, require_role};
use caroni_agent::machine::Job;
use caroni_agent::service::Handle;
use caroni_proto::timestamp_ms;

/// Serves the agent API.
#[derive(Clone)]
pub struct AgentApi {
    store: Store,
    agent: Option<Handle>,
    logs: crate::logs::SharedLogs,
}

type JobLogChunks = crate::logs::Boxed<pb::JobLogChunk>;

impl AgentApi {
    /// `agent` is `None` on a node without the agent role.
    pub fn new(store: Store, agent: Option<Handle>) -> Self {
        Self {
            store,
            agent,
            logs: None,
        }
    }

    /// Serves the jobs' logs kept in `logs`.
    pub fn with_logs(mut self, logs: crate::logs::SharedLogs) -> Self {
        self.logs = logs;
        self
    }

    fn job_id(&self, s: &str) -> Result<uuid::Uuid, Status> {
        super::resolve_id("job", s, |prefix, after| {
            caroni_agent::records::job_ids_with_prefix(&self.store, prefix, after, 8)
                .map_err(|e| Status::unavailable(e.to_string()))
        })
    }

    fn store(&self) -> Result<Store, Status> {
        require_role(self.agent.as_ref(), "agent")?;
        Ok(self.store.clone())
    }
}

/// Domain → wire.
pub fn job_to_pb(
    j: Job,
    workflow: Option<uuid::Uuid>,
    execution: Option<caroni_agent::executor::Execution>,
) -> pb::Job {
    let execution = execution.unwrap_or_default();
    pb::Job {
        executor: execution.executor,
        external_id: execution.external_id,
        workflow_id: workflow.map(|w| w.to_string()).unwrap_or_default(),
        id: j.id.to_string(),
        manager: j.manager,
        job_type: j.job_type,
        state: j.state.as_str().into(),
        inputs: j.values.into_iter().collect(),
        outputs: j.outputs.into_iter().collect(),
        exit_status: j.exit_status,
        message: j.message,
        stderr_tail: j.stderr_tail,
        created_at: Some(timestamp_ms(j.created_at_ms)),
        started_at: j.started_at_ms.map(timestamp_ms),
        ended_at: j.ended_at_ms.map(timestamp_ms),
    }
}

/// Domain → wire.
pub fn job_type_to_pb(d: JobTypeDef, executor: ExecutorSpec) -> pb::JobType {
    let (docker, slurm) = match &executor {
        ExecutorSpec::Bash => (None, None),
        ExecutorSpec::Docker(d) => (
            Some(pb::DockerExecutor {
                image: d.image.clone(),
                cpus: d.nano_cpus.map_or(0.0, |n| n as f64 / 1e9),
                memory: d.memory_bytes.map(|m| format!("{m}b")).unwrap_or_default(),
                network: d.network.clone(),
                env: d.env.clone(),
            }),
            None,
        ),
        ExecutorSpec::Slurm(s) => (
            None,
            Some(pb::SlurmExecutor {
                partition: s.partition.clone().unwrap_or_default(),
                time_limit: s.time_limit.clone().unwrap_or_default(),
                cpus: s.cpus.unwrap_or(0),
                memory: s.memory.clone().unwrap_or_default(),
                sbatch: s.sbatch.clone(),
                max_in_flight: s.max_in_flight,
            }),
        ),
    };
    pb::JobType {
        executor: executor.name().into(),
        docker,
        slurm,
        name: d.name,
        inputs: d.inputs,
        outputs: d.outputs,
        body: d.body,
        timeout_seconds: d.timeout_seconds,
        max_output_bytes: d.max_output_bytes,
        updated_at: Some(caroni_proto::timestamp_ms(d.updated_at_ms)),
        price: None,
    }
}

/// A job type on the wire with its price (absent when free).
fn priced(mut t: pb::JobType, p: caroni_types::market::Price) -> pb::JobType {
    t.price = (!p.is_zero()).then(|| caroni_proto::convert::price_to_pb(&p));
    t
}

/// Wire → domain; the error names the setting that is wrong.
fn job_type_from_pb(j: pb::JobType) -> Result<(JobTypeDef, ExecutorSpec), Status> {
    let bad =
        |e: caroni_types::SettingError| Status::invalid_argument(format!("invalid job type: {e}"));
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    let executor = match j.executor.as_str() {
        "" | "bash" => ExecutorSpec::Bash,
        "docker" => {
            let d = j.docker.clone().unwrap_or_default();
            ExecutorSpec::Docker(DockerSpec {
                image: d.image,
                nano_cpus: match d.cpus {
                    0.0 => None,
                    c => Some(caroni_types::parse_cpus(c).map_err(bad)?),
                },
                memory_bytes: match d.memory.as_str() {
                    "" => None,
                    m => Some(caroni_types::parse_memory(m).map_err(bad)?),
                },
                network: d.network,
                env: d.env,
            })
        }
        "slurm" => {
            let s = j.slurm.clone().unwrap_or_default();
            ExecutorSpec::Slurm(SlurmSpec {
                partition: non_empty(s.partition),
                time_limit: non_empty(s.time_limit),
                cpus: (s.cpus > 0).then_some(s.cpus),
                memory: non_empty(s.memory),
                sbatch: s.sbatch,
                max_in_flight: s.max_in_flight,
            })
        }
        other => {
            return Err(bad(caroni_types::SettingError(format!(
                "executor `{}` is not one of bash, docker, slurm",
                other.escape_debug()
            ))))
        }
    };
    let def = JobTypeDef {
        name: j.name,
        inputs: j.inputs,
        outputs: j.outputs,
        body: j.body,
        timeout_seconds: j.timeout_seconds,
        max_output_bytes: j.max_output_bytes,
        updated_at_ms: 0,
    };
    Ok((def, executor))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn put_job_type(
        &self,
        req: Request<pb::PutJobTypeRequest>,
    ) -> Result<Response<pb::JobType>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        let price =
            caroni_proto::convert::price_from_pb(req.job_type.as_ref().and_then(|j| j.price));
        let (def, executor) = req
            .job_type
            .map(job_type_from_pb)
            .ok_or_else(|| Status::invalid_argument("job_type is missing from the request"))??;
        let replace = req.replace;
        let (def, executor) =
            blocking(move || job_types::put_priced(&store, def, executor, price, replace)).await?;
        if let Some(a) = &self.agent {
            a.job_types_changed();
        }
        tracing::info!(job_type = %def.name, executor = executor.name(), price = %price.describe(), replace, "job type stored");
        Ok(Response::new(priced(job_type_to_pb(def, executor), price)))
    }

    async fn list_job_types(
        &self,
        _: Request<pb::ListJobTypesRequest>,
    ) -> Result<Response<pb::ListJobTypesResponse>, Status> {
        let store = self.store()?;
        let all = blocking(move || {
            job_types::list(&store)?
                .into_iter()
                .map(|d| {
                    let e = job_types::executor_of(&store, &d.name)?;
                    let p = job_types::price_of(&store, &d.name)?;
                    Ok((e, d, p))
                })
                .collect::<caroni_agent::Result<Vec<_>>>()
        })
        .await?;
        Ok(Response::new(pb::ListJobTypesResponse {
            job_types: all
                .into_iter()
                .map(|(e, d, p)| priced(job_type_to_pb(d, e), p))
                .collect(),
        }))
    }

    async fn get_job_type(
        &self,
        req: Request<pb::GetJobTypeRequest>,
    ) -> Result<Response<pb::JobType>, Status> {
        let store = self.store()?;
        let name = req.into_inner().name;
        let (d, e, p) = blocking(move || -> caroni_agent::Result<_> {
            let d = job_types::get(&store, &name)?;
            let e = job_types::executor_of(&store, &d.name)?;
            let p = job_types::price_of(&store, &d.name)?;
            Ok((d, e, p))
        })
        .await?;
        Ok(Response::new(priced(job_type_to_pb(d, e), p)))
    }

    async fn delete_job_type(
        &self,
        req: Request<pb::DeleteJobTypeRequest>,
    ) -> Result<Response<pb::DeleteJobTypeResponse>, Status> {
        let store = self.store()?;
        let name = req.into_inner().name;
        blocking(move || job_types::delete(&store, &name)).await?;
        if let Some(a) = &self.agent {
            a.job_types_changed();
        }
        Ok(Response::new(pb::DeleteJobTypeResponse {}))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let a = require_role(self.agent.as_ref(), "agent")?.clone();
        let req = req.into_inner();
        let limit = super::list_limit(req.limit);
        let known = [
            "pending",
            "queued",
            "running",
            "completed",
            "failed",
            "cancelled",
        ];
        if let Some(bad) = req.states.iter().find(|s| !known.contains(&s.as_str())) {
            return Err(Status::invalid_argument(format!(
                "unknown job state `{bad}`; the states are {}",
                known.join(", ")
            )));
        }
        let after = match req.page_token.trim() {
            "" => None,
            t => Some(t.parse::<uuid::Uuid>().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token `{t}` is not one this agent gave (pass next_page_token as it came)"
                ))
            })?),
        };
        let (states, job_type) = (req.states, req.job_type);
        let (jobs, next) = tokio::task::spawn_blocking(move || {
            let keep = |j: &caroni_agent::machine::Job| {
                (states.is_empty() || states.iter().any(|s| s == j.state.as_str()))
                    && (job_type.is_empty() || j.job_type == job_type)
            };
            a.list_jobs_page(limit, after, &keep).map(|(jobs, next)| {
                let jobs = jobs
                    .into_iter()
                    .map(|j| {
                        let w = a.workflow_of(&j);
                        let x = a.execution_of(&j);
                        (j, w, x)
                    })
                    .collect::<Vec<_>>();
                (jobs, next)
            })
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let mut jobs: Vec<pb::Job> = jobs
            .into_iter()
            .map(|(j, w, x)| {
                let mut j = job_to_pb(j, w, x);
                for v in j.inputs.values_mut().chain(j.outputs.values_mut()) {
                    *v = super::list_value(v);
                }
                j
            })
            .collect();
        let truncated = super::fit(&mut jobs);
        let next = match (truncated, jobs.last()) {
            (true, Some(j)) => Some(j.id.clone()),
            _ => next.map(|id| id.to_string()),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            truncated,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let a = require_role(self.agent.as_ref(), "agent")?;
        let id = self.job_id(&req.into_inner().job_id)?;
        match a.get_job(id).map_err(internal)? {
            Some(j) => {
                let w = a.workflow_of(&j);
                let x = a.execution_of(&j);
                Ok(Response::new(job_to_pb(j, w, x)))
            }
            None => Err(Status::not_found(format!(
                "no job {id} on this agent; `caroni job list` shows them"
            ))),
        }
    }

    type GetJobLogsStream = JobLogChunks;

    async fn get_job_logs(
        &self,
        req: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<Self::GetJobLogsStream>, Status> {
        require_role(self.agent.as_ref(), "agent")?;
        let logs = self
            .logs
            .clone()
            .ok_or_else(|| Status::unimplemented("this node serves no logs"))?;
        let req = req.into_inner();
        let id = self.job_id(&req.job_id)?;
        logs.job(id)?;
        let streams = crate::logs::streams_asked(&req.stream)?;
        let mut all: Vec<JobLogChunks> = Vec::new();
        for &stream in streams {
            let pieces = logs.open(id, crate::logs::stream_named(stream)?, 0, req.follow)?;
            let chunks: JobLogChunks = Box::pin(tokio_stream::StreamExt::map(pieces, move |p| {
                p.map(|p| pb::JobLogChunk {
                    stream: stream.into(),
                    offset: p.offset,
                    data: p.data,
                })
            }));
            all.push(chunks);
        }
        Ok(Response::new(crate::logs::merged(all)))
    }
}
