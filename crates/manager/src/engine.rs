//! The manager as one IO-less machine over all its live workflows.
//!
//! [`Manager::handle`] takes one input (a client's run or cancel, a
//! delivered message with its verified sender) with the time and a source
//! of fresh ids, and writes what it decided into an [`Out`] collector:
//! records to persist, messages to send, requests to publish, the answer
//! (a refusal with its reason), peers to count as refused.
//! [`Manager::settle`] does what is due (timers, admission) and
//! [`Manager::next_timer`] says when that is next. Every rule that spans
//! workflows lives here: routing by id, duplicates, the `--use-agents`
//! allowlist, reject-or-kill for work no live workflow needs (and the
//! stranger rule that answers those in the ack), admission. The rules of
//! one workflow live in [`crate::machine`].
//!
//! The machine reads what its memory does not hold (applied ids,
//! finished or waiting workflows, who the transport knows) through
//! [`World`], which the service backs with the store and the transport and
//! the simulator with its own model; it never writes.
//!
//! The indexes over live workflows (by request, by job, deadlines, live
//! jobs per agent, open requests) are derived in one place,
//! [`Index::add`]/[`Index::remove`], from the workflow itself.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, Msg, Outbound};
use uuid::Uuid;

use crate::machine::{Ctx, Effect, Peers};
use crate::model::{RequestState, StepState, Workflow, WorkflowState};
use crate::records::{self, RunsOn, ValueKey};
use crate::Error;

/// How long an agent that answered requests counts as known.
const AGENT_MEMORY_MS: u64 = 10 * 60 * 1000;
/// Values held by a waiting workflow above which they wait on disk only.
const SHELVE_BYTES: usize = 64 * 1024;

/// The manager's options.
#[derive(Debug, Clone)]
pub struct Options {
    /// This manager's peer endpoint.
    pub endpoint: String,
    /// Lease on live jobs.
    pub lease: std::time::Duration,
    /// Lifetime of a job request.
    pub request_ttl: std::time::Duration,
    /// Job requests out at once; further workflows wait in `created`.
    pub max_open_requests: usize,
    /// How long to gather offers before taking the least busy agent.
    pub offer_window: std::time::Duration,
    /// The agents whose offers are taken (`--use-agents`); `None` takes
    /// every agent's.
    pub use_agents: Option<HashSet<String>>,
}

/// What the machine reads beyond its memory. Errors are storage errors:
/// the input is answered "retry later", never "no such thing".
pub trait World {
    /// The message id was applied in an earlier group.
    fn is_applied(&self, id: &Uuid) -> Result<bool, String>;
    /// A workflow as stored (finished ones, and waiting ones' values).
    fn stored(&self, id: &Uuid) -> Result<Option<Workflow>, String>;
    /// The peer has acknowledged a message of this node (not a stranger).
    fn knows(&self, node: &str) -> bool;
    /// When the peer was last heard from (a message or an ack), ms.
    fn last_heard_ms(&self, node: &str) -> Option<u64>;
}

/// An input of the machine (taken by value, applied at once).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A client starts a workflow from a parsed template.
    Run {
        /// The template's name.
        template: String,
        /// The template, parsed.
        parsed: Arc<caroni_cwl::Workflow>,
        /// The inputs given.
        inputs: BTreeMap<String, String>,
    },
    /// A client cancels a workflow.
    Cancel(Uuid),
    /// A direct message from a peer, its sender verified.
    Deliver(Inbound),
}

/// The machine's answer to an input.
#[derive(Debug)]
pub enum Answer {
    /// To [`Input::Run`]: the new workflow's id.
    Run(Result<Uuid, Error>),
    /// To [`Input::Cancel`].
    Cancel(Result<(), Error>),
    /// To [`Input::Deliver`]: applied (or a duplicate), refused or retry.
    Deliver(Result<(), DeliverError>),
}

/// What a group of inputs decided, to persist and then perform (an action
/// collector: the machine only appends).
#[derive(Debug, Default)]
pub struct Out {
    /// Workflows that changed (their head is written, watchers told).
    pub heads: BTreeSet<Uuid>,
    /// Steps whose record changed.
    pub steps: BTreeSet<(Uuid, usize)>,
    /// Values set, changed or removed.
    pub values: BTreeSet<(Uuid, ValueKey)>,
    /// Workflows that ended in this group (no longer live).
    pub finished: HashMap<Uuid, Workflow>,
    /// Messages to stage, with the workflow they are about.
    pub send: Vec<(Outbound, Option<Uuid>)>,
    /// Requests to publish on gossip.
    pub publish: Vec<JobRequest>,
    /// Message ids applied in this group, to mark in its batch.
    pub applied: Vec<Uuid>,
    applied_set: HashSet<Uuid>,
    /// Where jobs run, as their agents reported.
    pub runs_on: Vec<(Uuid, RunsOn)>,
    /// Peers refused by an allowlist, and why (counted per peer).
    pub refused: Vec<(String, String)>,
    /// Seconds from a step's last input to its completion.
    pub step_seconds: Vec<f64>,
}

impl Out {
    fn applied(&mut self, id: Uuid) {
        if self.applied_set.insert(id) {
            self.applied.push(id);
        }
    }

    /// Every workflow a record of which changed.
    pub fn touched(&self) -> BTreeSet<Uuid> {
        let mut ids = self.heads.clone();
        ids.extend(self.steps.iter().map(|(id, _)| *id));
        ids.extend(self.values.iter().map(|(id, _)| *id));
        ids
    }
}

/// The indexes over live workflows, derived from each workflow in one
/// place: a workflow is added once it is (back) in the live set and
/// removed before it changes.
#[derive(Debug, Default)]
struct Index {
    by_request: HashMap<Uuid, Uuid>,
    by_job: HashMap<Uuid, Uuid>,
    /// Live jobs this manager placed on each agent.
    agent_jobs: HashMap<String, u32>,
    /// Requests out now (state `fulfilling`).
    open_requests: usize,
    /// Next timer of each live workflow, and the same ordered by time.
    deadline_of: HashMap<Uuid, u64>,
    deadlines: BTreeSet<(u64, Uuid)>,
}

impl Index {
    fn add(&mut self, wf: &Workflow, deadline: Option<u64>) {
        for step in &wf.steps {
            if let Some(r) = &step.request {
                self.by_request.insert(r.id, wf.id);
            }
            for a in &step.attempts {
                if let Some(j) = a.job_id {
                    self.by_job.insert(j, wf.id);
                }
            }
        }
        for (_, a) in wf.live_jobs() {
            *self.agent_jobs.entry(a.agent.clone()).or_default() += 1;
        }
        self.open_requests += wf.open_requests().count();
        if let Some(d) = deadline {
            self.deadline_of.insert(wf.id, d);
            self.deadlines.insert((d, wf.id));
        }
    }

    /// Takes out what depends on the workflow's current state; `ended`
    /// also forgets its ids.
    fn remove(&mut self, wf: &Workflow, ended: bool) {
        for (_, a) in wf.live_jobs() {
            if let Some(n) = self.agent_jobs.get_mut(&a.agent) {
                *n = n.saturating_sub(1);
            }
        }
        self.open_requests = self
            .open_requests
            .saturating_sub(wf.open_requests().count());
        if let Some(d) = self.deadline_of.remove(&wf.id) {
            self.deadlines.remove(&(d, wf.id));
        }
        if ended {
            for step in &wf.steps {
                for a in &step.attempts {
                    if let Some(j) = a.job_id {
                        self.by_job.remove(&j);
                    }
                    self.by_request.remove(&a.request_id);
                }
                if let Some(r) = &step.request {
                    self.by_request.remove(&r.id);
                }
            }
        }
    }
}

/// What the machine knows of the agents, for one workflow's rules.
struct PeerView<'a> {
    answered: &'a HashMap<String, u64>,
    agent_jobs: &'a HashMap<String, u32>,
    world: &'a dyn World,
    now_ms: u64,
    quiet_ms: u64,
}

impl Peers for PeerView<'_> {
    fn last_heard_ms(&self, agent: &str) -> Option<u64> {
        self.world.last_heard_ms(agent)
    }
    fn known_agents(&self) -> usize {
        // Agents that answered lately and have not gone quiet: a stopped
        // agent must not hold every request for the whole offer window.
        self.answered
            .keys()
            .filter(|a| {
                self.world
                    .last_heard_ms(a)
                    .is_none_or(|t| self.now_ms.saturating_sub(t) < self.quiet_ms)
            })
            .count()
    }
    fn live_jobs(&self, agent: &str) -> u32 {
        self.agent_jobs.get(agent).copied().unwrap_or(0)
    }
}

/// The manager: every live workflow and the rules between them.
pub struct Manager {
    opts: Options,
    live: HashMap<Uuid, Workflow>,
    index: Index,
    /// Agents that answered requests, and when they last did.
    answered: HashMap<String, u64>,
    /// Workflows waiting in `created` for admission, oldest first.
    waiting: VecDeque<Uuid>,
    /// Waiting workflows whose values are on disk only (their copy here
    /// holds none), read back when admitted.
    shelved: HashSet<Uuid>,
    /// When each live step had all its inputs (ms), for the step latency
    /// histogram; memory only.
    ready_at: HashMap<(Uuid, usize), u64>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("live", &self.live.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// Time and fresh ids for one call.
pub struct Now<'a> {
    /// Now, ms since the epoch.
    pub ms: u64,
    /// Fresh ids (UUID v7 in a node; seeded in the simulator).
    pub new_id: &'a mut dyn FnMut() -> Uuid,
}

impl Manager {
    /// An empty manager.
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            live: HashMap::new(),
            index: Index::default(),
            answered: HashMap::new(),
            waiting: VecDeque::new(),
            shelved: HashSet::new(),
            ready_at: HashMap::new(),
        }
    }

    /// Replaces the live state with `live` (the non-final workflows as
    /// stored), as after a start or a failed write. Waiting workflows
    /// with large values keep them on disk only.
    pub fn load(&mut self, live: Vec<Workflow>, world: &dyn World, now_ms: u64) {
        self.live.clear();
        self.index = Index::default();
        self.waiting.clear();
        self.shelved.clear();
        for wf in live {
            let id = wf.id;
            if wf.state == WorkflowState::Created {
                self.waiting.push_back(id);
            }
            self.insert_live(wf, world, now_ms);
            self.shelve(&id);
        }
    }

    /// Live workflows.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Live workflows waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Job requests out now.
    pub fn open_requests(&self) -> usize {
        self.index.open_requests
    }

    /// A live workflow, or one that ended in `out`'s group.
    pub fn workflow<'a>(&'a self, id: &Uuid, out: &'a Out) -> Option<&'a Workflow> {
        self.live.get(id).or_else(|| out.finished.get(id))
    }

    /// When [`Manager::settle`] next has something to do.
    pub fn next_timer(&self) -> Option<u64> {
        self.index.deadlines.first().map(|(at, _)| *at)
    }

    /// Applies one input.
    pub fn handle(
        &mut self,
        input: Input,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Answer {
        match input {
            Input::Run {
                template,
                parsed,
                inputs,
            } => Answer::Run(self.start(&template, &parsed, inputs, now, world, out)),
            Input::Cancel(id) => Answer::Cancel(self.cancel(id, now, world, out)),
            Input::Deliver(msg) => Answer::Deliver(self.deliver(msg, now, world, out)),
        }
    }

    /// Does what is due: timers, then admission of waiting workflows.
    pub fn settle(&mut self, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        let due: Vec<Uuid> = self
            .index
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now.ms)
            .map(|(_, id)| *id)
            .collect();
        for id in due {
            if let Some(fx) = self.change(id, now, world, out, |wf, ctx| wf.tick(ctx)) {
                self.effects(id, fx, out);
            }
        }
        self.admit(now, world, out);
        // Forget agents that stopped answering long ago.
        let horizon = now.ms.saturating_sub(AGENT_MEMORY_MS);
        if self.answered.values().any(|t| *t < horizon) {
            self.answered.retain(|_, t| *t >= horizon);
        }
    }

    /// After the group is written: drop the values of waiting workflows
    /// from memory when they are large (they are on disk now).
    pub fn written(&mut self, out: &Out) {
        for id in &out.heads {
            self.shelve(id);
        }
    }

    fn start(
        &mut self,
        template: &str,
        parsed: &caroni_cwl::Workflow,
        inputs: BTreeMap<String, String>,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Uuid, Error> {
        let id = (now.new_id)();
        let wf = Workflow::create(id, template, parsed, inputs, now.ms)
            .map_err(|e| Error::BadInput(e.to_string()))?;
        tracing::debug!(workflow = %id, template, "workflow created");
        out.heads.insert(id);
        out.steps.extend((0..wf.steps.len()).map(|n| (id, n)));
        out.values
            .extend(records::value_keys(&wf).into_iter().map(|v| (id, v)));
        self.waiting.push_back(id);
        self.insert_live(wf, world, now.ms);
        Ok(id)
    }

    /// Starts waiting workflows, oldest first, while their requests fit.
    fn admit(&mut self, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        while let Some(&id) = self.waiting.front() {
            let Some(wf) = self.live.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if wf.state != WorkflowState::Created {
                self.waiting.pop_front();
                continue;
            }
            // Always admit one when nothing is out, however large.
            let open = self.index.open_requests;
            if open > 0 && open + wf.steps.len() > self.opts.max_open_requests {
                return;
            }
            if !self.unshelve(&id, world) {
                return;
            }
            self.waiting.pop_front();
            if let Some(fx) = self.change(id, now, world, out, |wf, ctx| wf.start(ctx)) {
                self.effects(id, fx, out);
            }
        }
    }

    fn cancel(
        &mut self,
        id: Uuid,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), Error> {
        if !self.live.contains_key(&id) {
            let wf = match out.finished.get(&id) {
                Some(wf) => wf.clone(),
                None => world
                    .stored(&id)
                    .map_err(Error::Unavailable)?
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "no workflow {id}; `caroni workflow list` shows them"
                        ))
                    })?,
            };
            return Err(Error::Finished(format!(
                "workflow {id} is already {}; only a live workflow can be cancelled",
                wf.state.as_str()
            )));
        }
        let fx = self
            .change(id, now, world, out, |wf, ctx| {
                wf.cancel(ctx, "cancelled by a user")
            })
            .ok_or_else(|| Error::NotFound(format!("no workflow {id}")))?;
        tracing::info!(workflow = %id, "workflow cancelled");
        self.effects(id, fx, out);
        Ok(())
    }

    fn deliver(
        &mut self,
        msg: Inbound,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        // Duplicates: applied in this group or an earlier one.
        if out.applied_set.contains(&msg.id)
            || world.is_applied(&msg.id).map_err(DeliverError::Retry)?
        {
            return Ok(());
        }
        // The allowlist: offers of other agents are let go (rejected), a
        // stranger's refused in the ack.
        if let Msg::Offer {
            offer_id,
            request_id,
            ..
        } = &msg.msg
        {
            let used = self
                .opts
                .use_agents
                .as_ref()
                .is_none_or(|list| list.contains(&msg.from));
            if !used {
                let why = format!(
                    "this manager does not use agent {}: it takes offers only from the agents in its --use-agents list",
                    msg.from
                );
                out.refused.push((msg.from.clone(), why.clone()));
                if !world.knows(&msg.from) {
                    return Err(DeliverError::Refused(why));
                }
                let reject = Msg::Reject {
                    offer_id: *offer_id,
                    request_id: *request_id,
                };
                reply(&msg, reject, out);
                out.applied(msg.id);
                return Ok(());
            }
        }
        // Routing by id.
        let key = match &msg.msg {
            Msg::Offer { request_id, .. } | Msg::Decline { request_id, .. } => {
                self.answered.insert(msg.from.clone(), now.ms);
                self.index.by_request.get(request_id)
            }
            Msg::Accepted { job_id, .. }
            | Msg::Data {
                job_id,
                outputs: true,
                ..
            } => self.index.by_job.get(job_id),
            Msg::Status(s) => self.index.by_job.get(&s.job_id),
            other => {
                return Err(DeliverError::Refused(format!(
                    "a manager does not take {}",
                    other.name()
                )))
            }
        }
        .copied()
        .filter(|id| self.live.contains_key(id));
        let Some(id) = key else {
            return self.not_ours(&msg, world, out);
        };
        if let Msg::Status(s) = &msg.msg {
            if let Some(r) = RunsOn::reported(&s.executor, &s.external_id) {
                out.runs_on.push((s.job_id, r));
            }
        }
        let fx = self
            .change(
                id,
                now,
                world,
                out,
                |wf, ctx| -> Result<Vec<Effect>, DeliverError> {
                    Ok(match &msg.msg {
                        Msg::Offer {
                            offer_id,
                            request_id,
                            expires_at_ms,
                            load,
                        } => wf.on_offer(
                            ctx,
                            &msg.from,
                            &msg.endpoint,
                            *request_id,
                            *offer_id,
                            *expires_at_ms,
                            *load,
                        ),
                        Msg::Decline { request_id, reason } => {
                            wf.on_decline(ctx, &msg.from, *request_id, reason)
                        }
                        Msg::Accepted { job_id, .. } => wf.on_accepted(ctx, &msg.from, *job_id)?,
                        Msg::Data { job_id, items, .. } => {
                            wf.on_data(ctx, &msg.from, *job_id, items)?
                        }
                        Msg::Status(s) => wf.on_status(ctx, &msg.from, s)?,
                        _ => Vec::new(),
                    })
                },
            )
            .ok_or_else(|| DeliverError::Retry("workflow vanished".into()))??;
        self.effects(id, fx, out);
        out.applied(msg.id);
        Ok(())
    }

    /// A message about no live workflow of ours: tell the agent to let go
    /// (reject the offer, kill the job), in the ack when it is a stranger
    /// (never at an address it chose).
    fn not_ours(
        &self,
        msg: &Inbound,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), DeliverError> {
        let answer = match &msg.msg {
            Msg::Offer {
                offer_id,
                request_id,
                ..
            } => Some(Msg::Reject {
                offer_id: *offer_id,
                request_id: *request_id,
            }),
            Msg::Accepted { job_id, .. } => Some(Msg::Kill {
                job_id: *job_id,
                reason: "no live workflow needs this job".into(),
            }),
            Msg::Status(s) if !s.state.is_final() => Some(Msg::Kill {
                job_id: s.job_id,
                reason: "no live workflow needs this job".into(),
            }),
            _ => None,
        };
        if answer.is_some() && !world.knows(&msg.from) {
            return Err(DeliverError::Refused(format!(
                "no live workflow of this manager has this {} (message {})",
                msg.msg.name(),
                msg.id
            )));
        }
        if let Some(m) = answer {
            reply(msg, m, out);
        }
        out.applied(msg.id);
        Ok(())
    }

    /// Collects workflow `id`'s effects (traced with its id).
    fn effects(&self, id: Uuid, fx: Vec<Effect>, out: &mut Out) {
        for e in fx {
            match e {
                Effect::Send(o) => out.send.push((o, Some(id))),
                Effect::Publish(req) => out.publish.push(req),
            }
        }
    }

    fn deadline(&self, wf: &Workflow, world: &dyn World, now_ms: u64) -> Option<u64> {
        let view = PeerView {
            answered: &self.answered,
            agent_jobs: &self.index.agent_jobs,
            world,
            now_ms,
            quiet_ms: self.opts.lease.as_millis() as u64,
        };
        wf.next_deadline(self.opts.lease.as_millis() as u64, &view)
    }

    fn insert_live(&mut self, wf: Workflow, world: &dyn World, now_ms: u64) {
        let d = self.deadline(&wf, world, now_ms);
        self.index.add(&wf, d);
        self.live.insert(wf.id, wf);
    }

    /// Runs `f` on a live workflow with a context, then puts it back (or
    /// records it as ended) and notes which of its records changed.
    fn change<R>(
        &mut self,
        id: Uuid,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
        f: impl FnOnce(&mut Workflow, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let mut wf = self.live.remove(&id)?;
        self.index.remove(&wf, false);
        let before = wf.clone();
        let r = {
            let view = PeerView {
                answered: &self.answered,
                agent_jobs: &self.index.agent_jobs,
                world,
                now_ms: now.ms,
                quiet_ms: self.opts.lease.as_millis() as u64,
            };
            let mut ctx = Ctx {
                now_ms: now.ms,
                lease_ms: self.opts.lease.as_millis() as u64,
                request_ttl_ms: self.opts.request_ttl.as_millis() as u64,
                endpoint: &self.opts.endpoint,
                new_id: &mut *now.new_id,
                offer_window_ms: self.opts.offer_window.as_millis() as u64,
                peers: &view,
            };
            f(&mut wf, &mut ctx)
        };
        // What must be written: the head, the steps and the values whose
        // records changed (a re-publication alone changes none).
        let values = records::changed_values(&before, &wf);
        let mut changed = !records::same_head(&before, &wf) || !values.is_empty();
        for (n, (a, b)) in before.steps.iter().zip(&wf.steps).enumerate() {
            if records::same_step(a, b) {
                continue;
            }
            changed = true;
            out.steps.insert((id, n));
            if b.state == StepState::Completed && a.state != StepState::Completed {
                if let Some(ready) = self.ready_at.remove(&(id, n)) {
                    out.step_seconds
                        .push(now.ms.saturating_sub(ready) as f64 / 1000.0);
                }
            } else if b.state != StepState::Completed
                && b.inputs.iter().all(|i| b.values.contains_key(&i.name))
            {
                self.ready_at.entry((id, n)).or_insert(now.ms);
            }
        }
        out.values.extend(values.into_iter().map(|v| (id, v)));
        if changed {
            // The head is written with any change of the workflow, and
            // watchers hear of it.
            out.heads.insert(id);
        }
        if wf.state.is_final() {
            self.shelved.remove(&id);
            tracing::info!(workflow = %id, state = wf.state.as_str(), reason = %wf.message, "workflow finished");
            for n in 0..wf.steps.len() {
                self.ready_at.remove(&(id, n));
            }
            self.index.remove(&wf, true);
            out.finished.insert(id, wf);
        } else {
            self.insert_live(wf, world, now.ms);
        }
        Some(r)
    }

    /// Drops the values of a workflow that waits for admission from
    /// memory, when they are large; call only once they are on disk.
    fn shelve(&mut self, id: &Uuid) {
        let Some(wf) = self.live.get_mut(id) else {
            return;
        };
        let held: usize = wf.inputs.values().map(|v| v.len()).sum();
        if wf.state != WorkflowState::Created || held < SHELVE_BYTES || self.shelved.contains(id) {
            return;
        }
        wf.inputs.clear();
        for s in &mut wf.steps {
            s.values.clear();
            s.results.clear();
        }
        self.shelved.insert(*id);
    }

    /// Reads a shelved workflow's values back; false when storage fails
    /// (it stays shelved and waits).
    fn unshelve(&mut self, id: &Uuid, world: &dyn World) -> bool {
        if !self.shelved.contains(id) {
            return true;
        }
        match world.stored(id) {
            Ok(Some(full)) => {
                self.shelved.remove(id);
                // Nothing but the values differs: a waiting workflow has
                // no request, job or timer in the indexes.
                if let Some(wf) = self.live.get_mut(id) {
                    *wf = full;
                }
                true
            }
            Ok(None) => {
                tracing::error!(workflow = %id, "a waiting workflow is not on disk");
                false
            }
            Err(e) => {
                tracing::error!(workflow = %id, error = %e, "cannot read a waiting workflow's values; it waits");
                false
            }
        }
    }
}

/// Answers the sender of `msg`, under the same trace.
fn reply(msg: &Inbound, m: Msg, out: &mut Out) {
    out.send.push((
        Outbound {
            to: msg.from.clone(),
            endpoint: msg.endpoint.clone(),
            msg: m,
        },
        msg.trace,
    ));
}

/// True when a workflow has a request out (for tests and the simulator).
pub fn has_open_request(wf: &Workflow) -> bool {
    wf.steps.iter().any(|s| {
        s.request
            .as_ref()
            .is_some_and(|r| r.state == RequestState::Fulfilling)
    })
}
