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
        if a.superseded || self.state.is_final() {
            fx.extend(Self::kill(a, "superseded"));
            return Ok(fx);
        }
        if a.accepted {
            return Ok(fx);
        }
        self.accept_attempt(n, k, &mut fx);
        self.touch(ctx);
        Ok(fx)
    }

    /// Records that the agent holds the job of attempt `k` of step `n`.
    pub(super) fn accept_attempt(&mut self, n: usize, k: usize, fx: &mut Vec<Effect>) {
        let a = &mut self.steps[n].attempts[k];
        // No status request here: the agent reports every change of the
        // job by itself, and the lease probes a job that falls silent.
        a.accepted = true;
        a.last_probe_ms = a.last_heard_ms;
        if self.steps[n].state == StepState::Fulfilling {
            self.steps[n].state = StepState::Fulfilled;
        }
        if self.started {
            // A re-fulfilled step: send again what it already had.
            self.send_values(n, fx);
        }
        self.maybe_run(fx);
    }

    /// True when no step waits for a job.
    pub(super) fn all_fulfilled(&self) -> bool {
        self.steps.iter().filter(|s| !s.dynamic).all(|s| {
            matches!(
                s.state,
                StepState::Fulfilled | StepState::Running | StepState::Completed
            )
        })
    }

    /// Starts data flowing once every step is fulfilled; leaves `stalled`
    /// when every step is fulfilled again.
    pub(super) fn maybe_run(&mut self, fx: &mut Vec<Effect>) {
        if !self.all_fulfilled() {
            return;
        }
        if !self.started {
            self.started = true;
            for n in 0..self.steps.len() {
                self.send_values(n, fx);
            }
        }
        if matches!(
            self.state,
            WorkflowState::Initializing | WorkflowState::Stalled
        ) {
            self.state = WorkflowState::Running;
        }
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
            if update.state.is_final() {
                a.ended_at_ms = Some(ctx.now_ms);
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
                    self.steps[n].attempts[k].state = JobState::Failed;
                    self.steps[n].attempts[k].message = msg.clone();
                    self.fail_attempt(n, ctx, &msg, &mut fx);
                }
            }
            JobState::Failed => {
                let msg = update.message.clone();
                self.fail_attempt(n, ctx, &msg, &mut fx);
            }
        }
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
                if self.started {
                    self.send_items(m, items, fx);
                }
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

    /// The current attempt of step `n` failed: retry or give up.
    pub(super) fn fail_attempt(
        &mut self,
        n: usize,
        ctx: &mut Ctx<'_>,
        why: &str,
        fx: &mut Vec<Effect>,
    ) {
        if let Some(a) = self.steps[n].attempts.last_mut() {
            a.superseded = true;
            if a.state != JobState::Failed {
                // Lost or timed out on our side: tell the agent to drop it.
                a.state = JobState::Failed;
                a.ended_at_ms = Some(ctx.now_ms);
                if a.message.is_empty() {
                    a.message = why.to_string();
                }
                fx.extend(Self::kill(a, why));
            }
        }
        let failures = self.steps[n].failures() as u32;
        if failures >= self.max_attempts {
            self.steps[n].state = StepState::Failed;
            self.finish(
                WorkflowState::Failed,
                format!(
                    "step {} failed {failures} time(s), the limit; last error: {why}",
                    self.steps[n].id
                ),
                ctx,
                fx,
            );
            return;
        }
        if self.state == WorkflowState::Running {
            self.state = WorkflowState::Stalled;
        }
        self.new_request(n, ctx, fx);
    }

    /// Ends the workflow, killing every live job and withdrawing requests.
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
                    a.superseded = true;
                    fx.extend(Self::kill(a, state.as_str()));
                }
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
