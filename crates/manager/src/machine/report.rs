//! What agents report about jobs (accepted, data, status), who may say
//! it, and what follows: data sent along the dataflows, steps completed or
//! retried, the workflow finished or cancelled.

use std::collections::BTreeMap;

use caroni_cwl::Source;
use caroni_types::msg::{JobState, Msg, Outbound, StatusUpdate};
use uuid::Uuid;

use super::{Ctx, Effect, Refusal};
use crate::model::{Attempt, RequestState, StepState, Value, Workflow, WorkflowState};

impl Workflow {
    /// Checks that `agent` holds the job; returns its place.
    pub(super) fn holder(&self, agent: &str, job_id: Uuid) -> Result<(usize, usize), Refusal> {
        let (n, k) = self
            .find_job(job_id)
            .ok_or_else(|| Refusal(format!("job {job_id} is not part of workflow {}", self.id)))?;
        if self.steps[n].attempts[k].agent != agent {
            return Err(Refusal(format!(
                "node {agent} does not hold job {job_id}; only the agent that holds a job may report on it"
            )));
        }
        Ok((n, k))
    }

    /// Tells an agent to drop a job the workflow no longer needs.
    pub(super) fn kill(a: &Attempt, reason: &str) -> Option<Effect> {
        a.job_id.map(|job_id| {
            Effect::Send(Outbound {
                to: a.agent.clone(),
                endpoint: a.endpoint.clone(),
                msg: Msg::Kill {
                    job_id,
                    reason: reason.to_string(),
                },
            })
        })
    }

    /// The agent created the job.
    pub fn on_accepted(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        job_id: Uuid,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, job_id)?;
        let mut fx = Vec::new();
        let a = &mut self.steps[n].attempts[k];
        a.last_heard_ms = ctx.now_ms;
        if a.superseded || self.state.is_final() || a.state.is_final() {
            if !a.state.is_final() || a.state == JobState::Cancelled {
                fx.extend(Self::kill(a, "no longer needed"));
            }
            return Ok(fx);
        }
        if a.accepted {
            return Ok(fx);
        }
        self.accept_attempt(n, k, &mut fx);
        self.touch(ctx);
        Ok(fx)
    }

    /// Records that the agent holds the job of attempt `k` of step `n`,
    /// and sends it every input value known so far: a step runs as soon
    /// as its own inputs are there, whatever the other steps do.
    pub(super) fn accept_attempt(&mut self, n: usize, k: usize, fx: &mut Vec<Effect>) {
        let a = &mut self.steps[n].attempts[k];
        // No status request here: the agent reports every change of the
        // job by itself, and the lease probes a job that falls silent.
        a.accepted = true;
        a.last_probe_ms = a.last_heard_ms;
        if self.steps[n].state == StepState::Fulfilling {
            self.steps[n].state = StepState::Fulfilled;
        }
        self.send_values(n, fx);
        self.maybe_run(fx);
    }

    /// The workflow's state from its steps' (for a workflow not ended):
    /// `stalled` while a step that failed looks for a new job, `running`
    /// once any step has (or had) a job, `initializing` before.
    pub(super) fn maybe_run(&mut self, _fx: &mut Vec<Effect>) {
        if self.state.is_final() || self.state == WorkflowState::Created {
            return;
        }
        let retrying = self.steps.iter().any(|s| {
            !s.dynamic
                && s.state == StepState::Fulfilling
                && s.attempts.iter().any(|a| a.state == JobState::Failed)
        });
        let going = self.steps.iter().any(|s| {
            s.fan.is_some()
                || matches!(
                    s.state,
                    StepState::Fulfilled
                        | StepState::Running
                        | StepState::Completed
                        | StepState::Skipped
                )
        });
        // Kept in the record: true once any step had a job.
        self.started |= going;
        self.state = if retrying {
            WorkflowState::Stalled
        } else if going {
            WorkflowState::Running
        } else {
            WorkflowState::Initializing
        };
    }

    /// Sends every known input value of step `n` to its accepted job (when
    /// data starts flowing, or to a job that replaces a failed one).
    pub(super) fn send_values(&self, n: usize, fx: &mut Vec<Effect>) {
        let step = &self.steps[n];
        self.send_items(n, step.values.clone(), fx);
    }

    /// Sends `items` (input name → value) to step `n`'s accepted job.
    pub(super) fn send_items(
        &self,
        n: usize,
        items: BTreeMap<String, Value>,
        fx: &mut Vec<Effect>,
    ) {
        let step = &self.steps[n];
        if items.is_empty() || step.state == StepState::Completed {
            return;
        }
        if let Some(a) = step.current().filter(|a| a.accepted) {
            if let Some(job_id) = a.job_id {
                fx.push(Effect::Send(Outbound {
                    to: a.agent.clone(),
                    endpoint: a.endpoint.clone(),
                    msg: Msg::Data {
                        job_id,
                        items: items.into_iter().map(|(k, v)| (k, v.to_string())).collect(),
                        outputs: false,
                    },
                }));
            }
        }
    }

    /// Outputs of a job. `unfetched` says why the files they name cannot
    /// be fetched from the agent for good: the attempt fails with it (and
    /// the step is tried again as for any failure).
    pub fn on_data(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        job_id: Uuid,
        items: &BTreeMap<String, String>,
        unfetched: Option<&str>,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, job_id)?;
        let step = &mut self.steps[n];
        let last = k + 1 == step.attempts.len();
        let a = &mut step.attempts[k];
        a.last_heard_ms = ctx.now_ms;
        if a.superseded || self.state.is_final() || !a.is_live() {
            return Ok(Vec::new());
        }
        if let Some(why) = unfetched.filter(|_| last) {
            let why = format!("its output files cannot be fetched from agent {agent}: {why}");
            a.failure = "other".into();
            let mut fx = Vec::new();
            self.fail_attempt(n, ctx, &why, &mut fx);
            self.touch(ctx);
            return Ok(fx);
        }
        for (name, value) in items {
            if step.outputs.contains(name) {
                step.results
                    .insert(name.clone(), Value::from(value.as_str()));
            }
        }
        self.touch(ctx);
        Ok(Vec::new())
    }

    /// A status report from the agent holding a job.
    pub fn on_status(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        update: &StatusUpdate,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, update.job_id)?;
        let mut fx = Vec::new();
        {
            let a = &mut self.steps[n].attempts[k];
            a.last_heard_ms = ctx.now_ms;
            if a.superseded || self.state.is_final() || a.state.is_final() {
                // Late news of a job nobody needs any more: drop it.
                if !update.state.is_final() {
                    fx.extend(Self::kill(
                        a,
                        "superseded: the manager no longer needs this job",
                    ));
                }
                return Ok(fx);
            }
            if update.sequence <= a.status_seq {
                return Ok(fx);
            }
            if !a.accepted {
                // News of the job implies the agent holds it, even if its
                // JobAccepted has not arrived yet.
                self.accept_attempt(n, k, &mut fx);
            }
            let a = &mut self.steps[n].attempts[k];
            a.status_seq = update.sequence;
            a.state = update.state;
            a.exit_status = update.exit_status;
            a.message = update.message.clone();
            a.stderr_tail = update.stderr_tail.clone();
            // Run times as the agent saw them.
            a.queued_at_ms = update.queued_at_ms.or(a.queued_at_ms);
            a.ran_at_ms = update.started_at_ms.or(a.ran_at_ms);
            if update.state.is_final() {
                a.ended_at_ms = Some(update.ended_at_ms.unwrap_or(ctx.now_ms));
            }
            if update.state == JobState::Failed {
                a.failure = if caroni_cwl::FAILURE_KINDS.contains(&update.failure.as_str()) {
                    update.failure.clone()
                } else {
                    "other".into()
                };
            }
        }
        match update.state {
            JobState::Pending | JobState::Queued => {}
            JobState::Running => {
                if self.steps[n].state == StepState::Fulfilled {
                    self.steps[n].state = StepState::Running;
                }
            }
            JobState::Completed => {
                let step = &self.steps[n];
                let missing: Vec<&str> = step
                    .outputs
                    .iter()
                    .filter(|o| !step.results.contains_key(*o))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    self.complete_step(n, ctx, &mut fx);
                } else {
                    let msg = format!("completed without output(s) {}", missing.join(", "));
                    let a = &mut self.steps[n].attempts[k];
                    a.state = JobState::Failed;
                    a.message = msg.clone();
                    a.failure = "output".into();
                    self.fail_attempt(n, ctx, &msg, &mut fx);
                }
            }
            JobState::Failed => {
                let msg = update.message.clone();
                self.fail_attempt(n, ctx, &msg, &mut fx);
            }
            JobState::Cancelled => {
                // The agent stopped a job its manager still needs (it was
                // stopped there): a failure like any other.
                let msg = format!("cancelled on agent {agent}: {}", update.message);
                let a = &mut self.steps[n].attempts[k];
                a.state = JobState::Failed;
                a.failure = "killed".into();
                self.fail_attempt(n, ctx, &msg, &mut fx);
            }
        }
        self.maybe_run(&mut fx);
        self.touch(ctx);
        Ok(fx)
    }

    pub(super) fn complete_step(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if self.steps[n].state != StepState::Skipped {
            self.steps[n].state = StepState::Completed;
        }
        let id = self.steps[n].id.clone();
        let results = self.steps[n].results.clone();
        let mut fed = Vec::new();
        for (output, value) in &results {
            let from = Source::StepOutput {
                step: id.clone(),
                output: output.clone(),
            };
            for m in 0..self.steps.len() {
                if self.steps[m].dynamic {
                    // Kept by source until the step has them all.
                    if self.reads(m, &from) {
                        self.steps[m].values.insert(from.to_string(), value.clone());
                        fed.push(m);
                    }
                    continue;
                }
                // Only the values that arrive now: what the job had before
                // was sent before (values are sent once).
                let items: BTreeMap<String, Value> = self.steps[m]
                    .inputs
                    .iter()
                    .filter(|i| i.source.as_ref() == Some(&from))
                    .map(|i| (i.name.clone(), or_default(value, i.default.as_deref())))
                    .collect();
                for (name, v) in &items {
                    self.steps[m].values.insert(name.clone(), v.clone());
                }
                self.send_items(m, items, fx);
            }
            for (wid, src) in &self.output_sources {
                if *src == from {
                    self.outputs.insert(wid.clone(), value.clone());
                }
            }
        }
        fed.dedup();
        for m in fed {
            if self.state.is_final() {
                return;
            }
            self.try_expand(m, ctx, fx);
        }
        self.maybe_complete(ctx, fx);
    }

    /// The current attempt of step `n` failed: retry it after its
    /// back-off, or give up (out of attempts, or a kind of failure the
    /// step's policy does not retry).
    pub(super) fn fail_attempt(
        &mut self,
        n: usize,
        ctx: &mut Ctx<'_>,
        why: &str,
        fx: &mut Vec<Effect>,
    ) {
        if let Some(a) = self.steps[n].attempts.last_mut() {
            if !a.state.is_final() {
                // Lost or timed out on our side: tell the agent to drop it.
                a.state = JobState::Failed;
                a.ended_at_ms = Some(ctx.now_ms);
                if a.message.is_empty() {
                    a.message = why.to_string();
                }
                if a.failure.is_empty() {
                    a.failure = "lost".into();
                }
                fx.extend(Self::kill(a, why));
            }
            if a.failure.is_empty() {
                a.failure = "other".into();
            }
        }
        let kind = self.steps[n]
            .attempts
            .last()
            .map(|a| a.failure.clone())
            .unwrap_or_default();
        let policy = &self.steps[n].policy;
        let max = policy.max_attempts.unwrap_or(self.max_attempts).max(1);
        let not_retried = match &policy.no_retry {
            Some(kinds) => kinds.contains(&kind),
            None => super::DEFAULT_NO_RETRY.contains(&kind.as_str()),
        };
        let initial = policy
            .backoff_initial_ms
            .unwrap_or(super::DEFAULT_BACKOFF_INITIAL_MS);
        let most = policy
            .backoff_max_ms
            .unwrap_or(super::DEFAULT_BACKOFF_MAX_MS)
            .max(initial);
        let failures = self.steps[n].failures() as u32;
        if not_retried || failures >= max {
            let step = self.steps[n].id.clone();
            self.steps[n].state = StepState::Failed;
            let message = if not_retried {
                format!("step {step} failed and is not retried (a failure of kind `{kind}`; see CaroniNoRetry): {why}")
            } else {
                format!("step {step} failed {failures} time(s), the limit; last error: {why}")
            };
            self.finish(WorkflowState::Failed, message, ctx, fx);
            return;
        }
        let delay = initial
            .saturating_mul(1u64 << failures.saturating_sub(1).min(30))
            .min(most);
        self.new_request(n, ctx, delay, fx);
        self.maybe_run(fx);
    }

    /// Ends the workflow: every step not ended is cancelled, with its
    /// live job (killed) and open request (withdrawn).
    pub(super) fn finish(
        &mut self,
        state: WorkflowState,
        message: String,
        ctx: &Ctx<'_>,
        fx: &mut Vec<Effect>,
    ) {
        self.state = state;
        self.message = message;
        self.finished_at_ms = Some(ctx.now_ms);
        for step in &mut self.steps {
            if let Some(r) = step.request.as_mut() {
                if r.state == RequestState::Fulfilling {
                    r.state = RequestState::Unanswered;
                    r.decide_at_ms = None;
                    r.blocked = None;
                    for c in r.candidates.drain(..) {
                        fx.push(Effect::Send(Outbound {
                            to: c.agent,
                            endpoint: c.endpoint,
                            msg: Msg::Reject {
                                offer_id: c.offer_id,
                                request_id: r.id,
                            },
                        }));
                    }
                }
            }
            for a in &mut step.attempts {
                if a.is_live() {
                    a.state = JobState::Cancelled;
                    a.ended_at_ms = Some(ctx.now_ms);
                    if a.message.is_empty() {
                        a.message = format!("the workflow was {}", state.as_str());
                    }
                    fx.extend(Self::kill(a, state.as_str()));
                }
            }
            if !matches!(
                step.state,
                StepState::Completed | StepState::Skipped | StepState::Failed
            ) {
                step.state = StepState::Cancelled;
            }
        }
    }

    /// A user cancels the workflow.
    pub fn cancel(&mut self, ctx: &mut Ctx<'_>, reason: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        if !self.state.is_final() {
            self.finish(WorkflowState::Cancelled, reason.to_string(), ctx, &mut fx);
            self.touch(ctx);
        }
        fx
    }
}

/// A step input's value: its source's, or its default where the source
/// gave null (CWL: "the default applies when the source is null").
pub(super) fn or_default(value: &Value, default: Option<&str>) -> Value {
    match default {
        Some(d) if &**value == "null" => Value::from(d),
        _ => value.clone(),
    }
}
