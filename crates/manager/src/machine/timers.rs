//! Timers: when each of a step's timers is due (one function, read by
//! both `tick` and `next_deadline`), and what is done when they are.

use caroni_types::msg::{JobState, Msg, Outbound};

use super::{Ctx, Effect, Peers};
use crate::model::{Attempt, RequestState, Workflow};

/// When each timer of one step is due (ms since the epoch).
#[derive(Debug, Default)]
pub(super) struct StepTimers {
    /// The open request expires.
    expire: Option<u64>,
    /// The offer window of the open request closes.
    decide: Option<u64>,
    /// The open request is published again.
    publish: Option<u64>,
    /// The current job counts as lost.
    lost: Option<u64>,
    /// The current job is asked about.
    probe: Option<u64>,
    /// The open request counts as blocked if no agent answered.
    blocked: Option<u64>,
    /// The blocked request's step fails.
    unplaceable: Option<u64>,
    /// When its agent was last heard from (for the lost job's message).
    agent_heard: u64,
}

impl StepTimers {
    fn first(&self) -> Option<u64> {
        [
            self.expire,
            self.decide,
            self.publish,
            self.lost,
            self.probe,
            self.blocked,
            self.unplaceable,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl Workflow {
    /// When each timer of step `n` is due (ms): the one function of the
    /// state that both [`Workflow::tick`] (what is due now) and
    /// [`Workflow::next_deadline`] (when to wake) read, so the two never
    /// disagree.
    pub(super) fn timers(&self, n: usize, lease_ms: u64, peers: &dyn Peers) -> StepTimers {
        self.timers_with(n, lease_ms, peers, None)
    }

    /// [`Workflow::timers`], with the blocked-request timers when
    /// `blocking` gives (answer timeout, unplaceable time) in ms.
    pub(super) fn timers_with(
        &self,
        n: usize,
        lease_ms: u64,
        peers: &dyn Peers,
        blocking: Option<(u64, u64)>,
    ) -> StepTimers {
        let mut t = StepTimers::default();
        let step = &self.steps[n];
        if let Some(r) = step
            .request
            .as_ref()
            .filter(|r| r.state == RequestState::Fulfilling)
        {
            t.expire = Some(r.expires_at_ms);
            t.decide = r.decide_at_ms;
            t.publish = Some(r.next_publish_at_ms);
            if let Some((answer, unplaceable)) = blocking {
                match &r.blocked {
                    Some(b) => t.unplaceable = Some(b.since_ms + unplaceable),
                    None if r.candidates.is_empty() => t.blocked = Some(r.created_at_ms + answer),
                    None => {}
                }
            }
        }
        if let Some(a) = step.current() {
            // The job's own silence, and the agent's: an agent that is
            // heard from (its messages, its acks) holds its jobs even when
            // their news waits in a long queue. Lost after a lease of the
            // agent's silence; probed a third of a lease into it, or once
            // a lease about a silent job of a live agent.
            let probe_every = (lease_ms / 3).max(1);
            let agent_heard = peers
                .last_heard_ms(&a.agent)
                .unwrap_or(0)
                .max(a.last_heard_ms);
            t.agent_heard = agent_heard;
            t.lost = Some(agent_heard + lease_ms);
            if a.job_id.is_some() {
                let silent_agent = agent_heard.max(a.last_probe_ms) + probe_every;
                let live_agent = (a.last_heard_ms + probe_every).max(a.last_probe_ms + lease_ms);
                t.probe = Some(silent_agent.min(live_agent));
            }
        }
        t
    }

    /// Timers: re-publication, request expiry, lease probes and lost jobs.
    pub fn tick(&mut self, ctx: &mut Ctx<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state.is_final() {
            return fx;
        }
        let now = ctx.now_ms;
        let due = |at: Option<u64>| at.is_some_and(|at| at <= now);
        let mut fx_changed = false;
        for n in 0..self.steps.len() {
            if self.state.is_final() {
                break;
            }
            if self.update_blocked(n, ctx) {
                fx_changed = true;
            }
            // `CaroniBudget: {exhausted: fail}`: a step the budget keeps
            // from being placed fails the workflow at once.
            let blocked = self.steps[n]
                .request
                .as_ref()
                .and_then(|r| r.blocked.as_ref())
                .map(|b| b.reason.clone());
            if let Some(reason) = blocked.filter(|_| {
                self.budget.is_some_and(|b| b.limit.fail_when_exhausted)
                    && self.budget_blocks(n, ctx)
            }) {
                let step = self.steps[n].id.clone();
                self.steps[n].state = crate::model::StepState::Failed;
                self.finish(
                    crate::model::WorkflowState::Failed,
                    format!("step {step} cannot be placed within the workflow's budget: {reason}"),
                    ctx,
                    &mut fx,
                );
                break;
            }
            let t = self.timers_with(
                n,
                ctx.lease_ms,
                ctx.peers,
                Some((ctx.answer_timeout_ms, ctx.unplaceable_ms)),
            );
            if due(t.unplaceable) {
                let reason = self.steps[n]
                    .request
                    .as_ref()
                    .and_then(|r| r.blocked.as_ref())
                    .map(|b| b.reason.clone())
                    .unwrap_or_default();
                let step = self.steps[n].id.clone();
                self.steps[n].state = crate::model::StepState::Failed;
                self.finish(
                    crate::model::WorkflowState::Failed,
                    format!(
                        "step {step} could not be placed for {} s: {reason}",
                        ctx.unplaceable_ms / 1000
                    ),
                    ctx,
                    &mut fx,
                );
                break;
            }
            if due(t.expire) {
                let req_id = self.steps[n]
                    .request
                    .as_ref()
                    .map(|r| r.id)
                    .unwrap_or_default();
                if let Some(r) = self.steps[n].request.as_mut() {
                    r.state = RequestState::Expired;
                }
                let msg = format!(
                    "no agent offered to run job type {} before the request expired",
                    self.steps[n].job_type
                );
                self.steps[n].attempts.push(Attempt {
                    job_id: None,
                    request_id: req_id,
                    offer_id: None,
                    agent: String::new(),
                    endpoint: String::new(),
                    state: JobState::Failed,
                    accepted: false,
                    superseded: false,
                    started_at_ms: ctx.now_ms,
                    ended_at_ms: Some(ctx.now_ms),
                    last_heard_ms: ctx.now_ms,
                    last_probe_ms: ctx.now_ms,
                    status_seq: 0,
                    exit_status: None,
                    message: msg.clone(),
                    stderr_tail: String::new(),
                    queued_at_ms: None,
                    ran_at_ms: None,
                    failure: "unplaceable".into(),
                    price: None,
                });
                self.fail_attempt(n, ctx, &msg, &mut fx);
                continue;
            }
            if due(t.decide) {
                self.decide(n, ctx, &mut fx);
                // All gathered offers may have expired: publish again.
                if let Some(r) = self.steps[n].request.as_mut() {
                    if r.state == RequestState::Fulfilling {
                        r.next_publish_at_ms = r.next_publish_at_ms.min(ctx.now_ms);
                    }
                }
            }
            self.publish_due(n, ctx, &mut fx);
            // Deciding may have placed a job: its timers, afresh.
            let t = self.timers(n, ctx.lease_ms, ctx.peers);
            let Some(a) = self.steps[n].current().cloned() else {
                continue;
            };
            if due(t.lost) {
                let silent = ctx.now_ms.saturating_sub(t.agent_heard);
                let msg = format!(
                    "agent {} was silent for {} s (lease {} s); counted as lost",
                    a.agent,
                    silent / 1000,
                    ctx.lease_ms / 1000
                );
                self.fail_attempt(n, ctx, &msg, &mut fx);
            } else if due(t.probe) {
                if let (Some(job_id), Some(cur)) = (a.job_id, self.steps[n].attempts.last_mut()) {
                    cur.last_probe_ms = ctx.now_ms;
                    fx.push(Effect::Send(Outbound {
                        to: a.agent.clone(),
                        endpoint: a.endpoint.clone(),
                        msg: Msg::StatusRequest { job_id },
                    }));
                }
            }
        }
        if !fx.is_empty() || fx_changed {
            self.touch(ctx);
        }
        fx
    }

    /// When [`Workflow::tick`] next has something to do; `blocking` is
    /// (answer timeout, unplaceable time) in ms, as in the tick's context.
    pub fn next_deadline(
        &self,
        lease_ms: u64,
        peers: &dyn Peers,
        blocking: (u64, u64),
    ) -> Option<u64> {
        if self.state.is_final() {
            return None;
        }
        (0..self.steps.len())
            .filter_map(|n| self.timers_with(n, lease_ms, peers, Some(blocking)).first())
            .min()
    }
}
