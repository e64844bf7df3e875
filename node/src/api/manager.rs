//! ManagerService: templates and workflows.

use std::pin::Pin;

use caroni_manager::model::{Workflow, WorkflowState};
use caroni_manager::records::ListFilter;
use caroni_manager::service::{Handle, Submission};
use caroni_manager::templates::{self, TemplateRecord};
use caroni_proto::timestamp_ms;
use caroni_proto::v1::{self as pb, manager_service_server::ManagerService};
use caroni_store::Store;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{blocking, require_role, IntoStatus};

/// Serves the manager API.
#[derive(Clone)]
pub struct ManagerApi {
    store: Store,
    manager: Option<Handle>,
    logs: Option<LogAccess>,
}

/// How the manager reaches its jobs' logs: from the agent that ran each
/// (over the peer port, signed as this node), or in process when that
/// agent is this node.
#[derive(Clone)]
pub struct LogAccess {
    /// This node's id.
    pub me: String,
    /// Reads from other nodes.
    pub fetcher: caroni_peer::blobs::Fetcher,
    /// This node's own agent's logs.
    pub local: crate::logs::SharedLogs,
}

type LogChunks = crate::logs::Boxed<pb::LogChunk>;

impl ManagerApi {
    /// `manager` is `None` on a node without the manager role.
    pub fn new(store: Store, manager: Option<Handle>) -> Self {
        Self {
            store,
            manager,
            logs: None,
        }
    }

    /// Serves attempts' logs through `logs`.
    pub fn with_logs(mut self, logs: LogAccess) -> Self {
        self.logs = Some(logs);
        self
    }

    fn store(&self) -> Result<Store, Status> {
        require_role(self.manager.as_ref(), "manager")?;
        Ok(self.store.clone())
    }

    /// A workflow id, or a unique prefix of one.
    fn workflow_id(&self, s: &str) -> Result<uuid::Uuid, Status> {
        super::resolve_id("workflow", s, |prefix, after| {
            caroni_manager::records::ids_with_prefix(&self.store, prefix, after, 8)
                .map_err(|e| Status::unavailable(e.to_string()))
        })
    }
}

/// A client's submission id: 1 to 128 printable characters.
fn request_id(s: String) -> Result<Option<String>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > 128 || !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(
            "request_id must be 1 to 128 printable ASCII characters without spaces (a UUID is a good choice)",
        ));
    }
    Ok(Some(s))
}

fn to_pb(r: TemplateRecord, with_text: bool) -> pb::Template {
    let wf = r.workflow().ok();
    pb::Template {
        inputs: wf
            .iter()
            .flat_map(|w| w.inputs.iter().map(|i| i.id.clone()))
            .collect(),
        outputs: wf
            .iter()
            .flat_map(|w| w.outputs.iter().map(|o| o.id.clone()))
            .collect(),
        steps: wf
            .iter()
            .flat_map(|w| {
                w.steps.iter().map(|s| pb::TemplateStep {
                    id: s.id.clone(),
                    job_type: s.job_type.clone(),
                    inputs: s.inputs.iter().map(|i| i.name.clone()).collect(),
                    outputs: s.outputs.clone(),
                })
            })
            .collect(),
        input_details: wf
            .iter()
            .flat_map(|w| {
                w.inputs.iter().map(|i| pb::TemplateInput {
                    id: i.id.clone(),
                    r#type: i.cwl_type.clone().unwrap_or_default(),
                    default: i.default.clone(),
                })
            })
            .collect(),
        name: r.name,
        cwl: if with_text { r.cwl } else { String::new() },
        updated_at: Some(timestamp_ms(r.updated_at_ms)),
    }
}

/// The workflow whole, with where each attempt ran as its agent reported.
pub fn full_workflow_pb(store: &Store, w: &Workflow) -> pb::Workflow {
    let mut out = workflow_to_pb(w, true);
    for (n, s) in out.steps.iter_mut().enumerate() {
        if s.elements.is_some() {
            s.children = caroni_manager::children_of(store, &w.id, n, 20)
                .into_iter()
                .map(|(index, id, state)| pb::ElementChild {
                    index,
                    workflow_id: id.to_string(),
                    state: state.as_str().into(),
                })
                .collect();
        }
    }
    for a in out
        .steps
        .iter_mut()
        .flat_map(|s| s.attempt_history.iter_mut())
    {
        if let Some(r) = a
            .job_id
            .parse()
            .ok()
            .and_then(|j| caroni_manager::runs_on(store, &j))
        {
            a.executor = r.executor;
            a.external_id = r.external_id;
        }
    }
    out
}

/// Domain → wire; `full` adds attempts and dataflows.
pub fn workflow_to_pb(w: &Workflow, full: bool) -> pb::Workflow {
    pb::Workflow {
        id: w.id.to_string(),
        template: w.template.clone(),
        state: w.state.as_str().into(),
        message: w.message.clone(),
        created_at: Some(timestamp_ms(w.created_at_ms)),
        updated_at: Some(timestamp_ms(w.updated_at_ms)),
        finished_at: w.finished_at_ms.map(timestamp_ms),
        inputs: w
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        outputs: w
            .outputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        steps: w
            .steps
            .iter()
            .map(|s| {
                let last = s.attempts.last();
                pb::WorkflowStep {
                    id: s.id.clone(),
                    job_type: s.job_type.clone(),
                    state: s.shown_state().into(),
                    attempts: s.attempts.len() as u32,
                    blocked: s
                        .request
                        .as_ref()
                        .and_then(|r| r.blocked.as_ref())
                        .map(|b| b.reason.clone())
                        .unwrap_or_default(),
                    blocked_since: s
                        .request
                        .as_ref()
                        .and_then(|r| r.blocked.as_ref())
                        .map(|b| timestamp_ms(b.since_ms)),
                    retry_at: (s.shown_state() == "retrying")
                        .then(|| {
                            s.request
                                .as_ref()
                                .map(|r| timestamp_ms(r.next_publish_at_ms))
                        })
                        .flatten(),
                    job_id: last
                        .and_then(|a| a.job_id)
                        .map(|j| j.to_string())
                        .unwrap_or_default(),
                    agent: last.map(|a| a.agent.clone()).unwrap_or_default(),
                    request_id: s
                        .request
                        .as_ref()
                        .map(|r| r.id.to_string())
                        .unwrap_or_default(),
                    request_state: s
                        .request
                        .as_ref()
                        .map(|r| format!("{:?}", r.state).to_lowercase())
                        .unwrap_or_default(),
                    attempt_history: if full {
                        s.attempts
                            .iter()
                            .map(|a| pb::Attempt {
                                job_id: a.job_id.map(|j| j.to_string()).unwrap_or_default(),
                                agent: a.agent.clone(),
                                state: a.state.as_str().into(),
                                exit_status: a.exit_status,
                                message: a.message.clone(),
                                stderr_tail: a.stderr_tail.clone(),
                                started_at: a.ran_at_ms.map(timestamp_ms),
                                ended_at: a.ended_at_ms.map(timestamp_ms),
                                superseded: a.superseded,
                                executor: String::new(),
                                external_id: String::new(),
                                placed_at: a.job_id.map(|_| timestamp_ms(a.started_at_ms)),
                                queued_at: a.queued_at_ms.map(timestamp_ms),
                                failure: a.failure.clone(),
                                price: a.price.map(|(p, _)| caroni_proto::convert::price_to_pb(&p)),
                                max_charge_milli: a.price.map_or(0, |(_, m)| m),
                                charge_milli: a.charge(),
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    elements: s.fan.as_ref().map(|f| pb::StepElements {
                        total: f.total,
                        waiting: f.waiting(),
                        live: f.live(),
                        completed: f.done,
                        skipped: f.skipped,
                        failed: f.failed,
                        scatter: f.shape.scatters(),
                    }),
                    children: Vec::new(),
                    subworkflow: s.dynamic && s.job_type.is_empty(),
                    declines: match (&s.request, full) {
                        (Some(r), true) => r
                            .declines
                            .iter()
                            .map(|(agent, reason)| pb::Decline {
                                agent: agent.clone(),
                                reason: reason.clone(),
                            })
                            .collect(),
                        _ => Vec::new(),
                    },
                }
            })
            .collect(),
        parent_id: w.parent.map(|p| p.id.to_string()).unwrap_or_default(),
        // A child's template is named `<parent's>/<step id>`.
        parent_step: w
            .parent
            .and(w.template.rsplit('/').next())
            .unwrap_or_default()
            .to_string(),
        parent_index: w.parent.map(|p| p.index).unwrap_or_default(),
        spent_milli: w.spent_milli(),
        reserved_milli: w.reserved_milli(),
        budget_milli: w.budget.map(|b| b.limit.limit_milli),
        budget_left_milli: w.budget_left_milli().unwrap_or(0),
        budget_allotted_milli: w.budget.map_or(0, |b| b.allotted_milli),
        priority: w.priority,
        dataflows: if full {
            w.dataflows()
                .into_iter()
                .map(|d| pb::Dataflow {
                    source: d.source,
                    destination: d.destination,
                    value: d.value.map(|v| v.to_string()),
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// A list request's filter, checked.
fn list_filter(req: &pb::ListWorkflowsRequest) -> Result<ListFilter, Status> {
    let states = req
        .states
        .iter()
        .map(|s| {
            WorkflowState::parse(s.trim()).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown workflow state `{s}`; the states are created, initializing, running, stalled, completed, failed, cancelled"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
    };
    let after = match req.page_token.trim() {
        "" => None,
        t => Some(t.parse::<uuid::Uuid>().map_err(|_| {
            Status::invalid_argument(format!(
                "page_token `{t}` is not one this manager gave (pass next_page_token as it came)"
            ))
        })?),
    };
    let id_prefix: String = req.id_prefix.trim().to_ascii_lowercase();
    if !id_prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Status::invalid_argument(
            "id_prefix must be hex digits (and dashes), the start of a workflow id",
        ));
    }
    Ok(ListFilter {
        states,
        template: Some(req.template.trim().to_string()).filter(|t| !t.is_empty()),
        created_after_ms: ms(&req.created_after),
        created_before_ms: ms(&req.created_before),
        id_prefix: Some(id_prefix).filter(|p| !p.is_empty()),
        after,
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Workflow, Status>> + Send>>;

/// The step and attempt (numbered from 1) a logs request names.
fn pick_attempt<'w>(
    w: &'w Workflow,
    step: &str,
    attempt: u32,
) -> Result<
    (
        &'w caroni_manager::model::Step,
        u32,
        &'w caroni_manager::model::Attempt,
    ),
    Status,
> {
    let names = || {
        w.steps
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let s = match (step, w.steps.as_slice()) {
        ("", [only]) => only,
        ("", _) => {
            return Err(Status::invalid_argument(format!(
                "workflow {} has {} steps ({}): name one with `step`",
                w.id,
                w.steps.len(),
                names()
            )))
        }
        (name, steps) => steps.iter().find(|s| s.id == name).ok_or_else(|| {
            Status::not_found(format!(
                "workflow {} has no step `{}`; its steps are {}",
                w.id,
                name.chars().take(64).collect::<String>(),
                names()
            ))
        })?,
    };
    if attempt == 0 {
        let (i, a) = s
            .attempts
            .iter()
            .enumerate()
            .rev()
            .find(|(_, a)| a.job_id.is_some())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "step {} has not reached an agent yet ({}): it has no logs yet",
                    s.id,
                    s.shown_state()
                ))
            })?;
        return Ok((s, i as u32 + 1, a));
    }
    let a = s.attempts.get(attempt as usize - 1).ok_or_else(|| {
        Status::not_found(format!(
            "step {} has {} attempt(s), not {attempt}",
            s.id,
            s.attempts.len()
        ))
    })?;
    Ok((s, attempt, a))
}

/// Why a log could not be read from an agent.
fn log_status(agent: &str, e: caroni_peer::blobs::FetchError) -> Status {
    use caroni_peer::blobs::FetchError;
    match e {
        FetchError::Refused { reason, .. } => Status::failed_precondition(format!(
            "agent {agent} would not give the log: {reason}"
        )),
        other => Status::unavailable(format!(
            "agent {agent}, which ran the job, cannot be reached now ({other}); it keeps the logs until its --retention: try again later"
        )),
    }
}

#[tonic::async_trait]
impl ManagerService for ManagerApi {
    async fn put_template(
        &self,
        req: Request<pb::PutTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        let (record, _) = blocking(move || templates::put(&store, &req.name, &req.cwl)).await?;
        tracing::info!(template = %record.name, "template registered");
        Ok(Response::new(to_pb(record, true)))
    }

    async fn list_templates(
        &self,
        _: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let store = self.store()?;
        let all = blocking(move || templates::list(&store)).await?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: all.into_iter().map(|r| to_pb(r, false)).collect(),
        }))
    }

    async fn get_template(
        &self,
        req: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let store = self.store()?;
        let name = req.into_inner().name;
        let r = blocking(move || templates::get(&store, &name)).await?;
        Ok(Response::new(to_pb(r, true)))
    }

    async fn delete_template(
        &self,
        req: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let store = self.store()?;
        let name = req.into_inner().name;
        blocking(move || templates::delete(&store, &name)).await?;
        Ok(Response::new(pb::DeleteTemplateResponse {}))
    }

    async fn run_workflow(
        &self,
        req: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<pb::RunWorkflowResponse>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?;
        let req = req.into_inner();
        if let Some(p) = req.priority.filter(|p| !(-1000..=1000).contains(p)) {
            return Err(Status::invalid_argument(format!(
                "priority {p} is out of range; give a whole number from -1000 to 1000 (higher runs first)"
            )));
        }
        let (id, existing) = m
            .submit_run(Submission {
                template: req.template,
                inputs: req.inputs.into_iter().collect(),
                request_id: request_id(req.request_id)?,
                priority: req.priority,
                budget: req
                    .budget_milli
                    .map(|limit_milli| caroni_types::market::Budget {
                        limit_milli,
                        fail_when_exhausted: req.fail_when_exhausted,
                    }),
            })
            .await
            .map_err(IntoStatus::into_status)?;
        Ok(Response::new(pb::RunWorkflowResponse {
            workflow_id: id.to_string(),
            existing,
        }))
    }

    async fn retry_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let id = self.workflow_id(&req.into_inner().workflow_id)?;
        m.resume(id).await.map_err(IntoStatus::into_status)?;
        let w = blocking(move || m.get(id)).await?;
        Ok(Response::new(full_workflow_pb(&self.store, &w)))
    }

    async fn rerun_workflow(
        &self,
        req: Request<pb::RerunWorkflowRequest>,
    ) -> Result<Response<pb::RunWorkflowResponse>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let req = req.into_inner();
        let id = self.workflow_id(&req.workflow_id)?;
        let old = {
            let m = m.clone();
            blocking(move || m.get(id)).await?
        };
        if let Some(p) = old.parent {
            return Err(Status::failed_precondition(format!(
                "workflow {id} runs element {} of a step of workflow {}; rerun that workflow",
                p.index, p.id
            )));
        }
        let mut inputs: std::collections::BTreeMap<String, String> = old
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        inputs.extend(req.inputs);
        let (new, existing) = m
            .submit_run(Submission {
                template: old.template.clone(),
                inputs,
                request_id: request_id(req.request_id)?,
                // A rerun keeps what the first run was given.
                priority: Some(old.priority),
                budget: old.budget.map(|b| b.limit),
            })
            .await
            .map_err(IntoStatus::into_status)?;
        tracing::info!(workflow = %new, of = %id, "workflow rerun");
        Ok(Response::new(pb::RunWorkflowResponse {
            workflow_id: new.to_string(),
            existing,
        }))
    }

    async fn delete_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::DeleteWorkflowResponse>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let id = self.workflow_id(&req.into_inner().workflow_id)?;
        let deleted = m.delete(vec![id]).await.map_err(IntoStatus::into_status)?;
        tracing::info!(workflow = %id, deleted, "workflow deleted");
        Ok(Response::new(pb::DeleteWorkflowResponse { deleted }))
    }

    async fn list_workflows(
        &self,
        req: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let req = req.into_inner();
        let limit = super::list_limit(req.limit);
        let filter = list_filter(&req)?;
        let (all, next) = blocking(move || m.list_page(limit, &filter)).await?;
        let mut workflows: Vec<pb::Workflow> = all
            .iter()
            .map(|w| {
                let mut w = workflow_to_pb(w, false);
                for v in w.inputs.values_mut().chain(w.outputs.values_mut()) {
                    *v = super::list_value(v);
                }
                w
            })
            .collect();
        let truncated = super::fit(&mut workflows);
        // Left out to fit: the next page starts after the last one kept.
        let next = match (truncated, workflows.last()) {
            (true, Some(w)) => Some(w.id.clone()),
            _ => next.map(|id| id.to_string()),
        };
        Ok(Response::new(pb::ListWorkflowsResponse {
            workflows,
            truncated,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    type GetLogsStream = LogChunks;

    async fn get_logs(
        &self,
        req: Request<pb::GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let access = self
            .logs
            .clone()
            .ok_or_else(|| Status::unimplemented("this node serves no logs"))?;
        let req = req.into_inner();
        let id = self.workflow_id(&req.workflow_id)?;
        let w = blocking(move || m.get(id)).await?;
        let (step, n, attempt) = pick_attempt(&w, &req.step, req.attempt)?;
        let job = attempt.job_id.ok_or_else(|| {
            Status::failed_precondition(format!(
                "attempt {n} of step {} never reached an agent (its request expired unanswered): it has no logs",
                step.id
            ))
        })?;
        let streams = crate::logs::streams_asked(&req.stream)?;
        let mut all: Vec<LogChunks> = Vec::new();
        for &stream in streams {
            let pieces = if attempt.agent == access.me {
                let local = access.local.as_ref().ok_or_else(|| {
                    Status::not_found(
                        "this node ran the job but is no longer an agent: its logs are not served",
                    )
                })?;
                caroni_peer::LogSource::read(
                    local.as_ref(),
                    &access.me,
                    job,
                    stream,
                    0,
                    req.follow,
                )?
            } else {
                let remote = access
                    .fetcher
                    .read_log(&attempt.agent, job, stream, 0, req.follow)
                    .await
                    .map_err(|e| log_status(&attempt.agent, e))?;
                Box::pin(remote)
            };
            let (step, agent) = (step.id.clone(), attempt.agent.clone());
            let chunks: LogChunks = Box::pin(tokio_stream::StreamExt::map(pieces, move |p| {
                p.map(|p| pb::LogChunk {
                    step: step.clone(),
                    attempt: n,
                    stream: stream.into(),
                    offset: p.offset,
                    data: p.data,
                    job_id: job.to_string(),
                    agent: agent.clone(),
                })
            }));
            all.push(chunks);
        }
        Ok(Response::new(crate::logs::merged(all)))
    }

    async fn get_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let id = self.workflow_id(&req.into_inner().workflow_id)?;
        let w = blocking(move || m.get(id)).await?;
        Ok(Response::new(full_workflow_pb(&self.store, &w)))
    }

    type WatchWorkflowsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WorkflowChange, Status>> + Send>>;
    type WatchWorkflowStream = WatchStream;

    async fn watch_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<Self::WatchWorkflowStream>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let id = self.workflow_id(&req.into_inner().workflow_id)?;
        // Subscribe before the first read so that no change falls between.
        let mut changes = m.subscribe();
        let first = m.get(id).map_err(IntoStatus::into_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(full_workflow_pb(&store, &last))).await.is_err() {
                return;
            }
            while !last.state.is_final() {
                match changes.recv().await {
                    Ok(changed) if changed.id != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
                let Ok(now) = m.get(id) else { return };
                if now != last {
                    last = now;
                    if tx.send(Ok(full_workflow_pb(&store, &last))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn watch_workflows(
        &self,
        _: Request<pb::WatchWorkflowsRequest>,
    ) -> Result<Response<Self::WatchWorkflowsStream>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let mut changes = m.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let mut missed = 0u64;
            loop {
                let c = match changes.recv().await {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        missed += n;
                        continue;
                    }
                    Err(_) => return,
                };
                let change = pb::WorkflowChange {
                    workflow_id: c.id.to_string(),
                    state: c.state.as_str().to_string(),
                    created_at: Some(timestamp_ms(c.created_at_ms)),
                    finished_at: c.finished_at_ms.map(timestamp_ms),
                    missed: std::mem::take(&mut missed),
                };
                if tx.send(Ok(change)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let m = require_role(self.manager.as_ref(), "manager")?.clone();
        let id = self.workflow_id(&req.into_inner().workflow_id)?;
        m.cancel(id).await.map_err(IntoStatus::into_status)?;
        let w = m.get(id).map_err(IntoStatus::into_status)?;
        debug_assert_eq!(w.state, WorkflowState::Cancelled);
        Ok(Response::new(full_workflow_pb(&self.store, &w)))
    }
}
