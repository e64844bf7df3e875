//! The agent as one IO-less machine over its offers and live jobs.
//!
//! [`Agent::handle`] takes one input — a direct message with its verified
//! sender, a gossip request, a finished run — with the time and a source of
//! fresh ids, and appends what it decided to an [`Out`] collector: jobs and
//! offers to persist, messages to send, the answer (a refusal with its
//! reason), runs to start or stop. [`Agent::settle`] makes the scheduling
//! decision (which queued job runs next under the slots, the executors'
//! limits and the queue order) and forgets expired offers;
//! [`Agent::next_timer`] says when that is next due. Every rule that spans
//! jobs lives here: `--serve-managers`, who may reject an offer, the
//! stranger rule (a message about a job this agent does not know is
//! answered in the ack, never at an address the sender chose), the
//! declined-once memory, duplicates. The rules of one job and one offer
//! live in [`crate::machine`].
//!
//! What memory does not hold (job types, finished jobs, accepted or
//! expired offers, applied ids, whether an executor can run now) the
//! machine reads through [`World`]; it never writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, JobState, Load, Msg, Outbound, StatusUpdate};
use caroni_types::{ExecutorSpec, JobTypeDef};
use uuid::Uuid;

use crate::executor::{Execution, RunSpec};
use crate::machine::{self, AcceptOutcome, Answering, Effect, Job, Offer, RunResult};

/// How often expired offers and declines are forgotten.
const CLEANUP_MS: u64 = 30_000;
/// Most queued jobs looked past per scheduling decision.
const LOOK_PAST: usize = 64;

/// The agent's options.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's id.
    pub node_id: String,
    /// Concurrent jobs.
    pub slots: usize,
    /// The managers served (`--serve-managers`); `None` serves every one.
    pub serve_managers: Option<HashSet<String>>,
}

impl Options {
    /// True when this agent serves manager `node`.
    pub fn serves(&self, node: &str) -> bool {
        self.serve_managers
            .as_ref()
            .is_none_or(|list| list.contains(node))
    }
}

/// What the machine reads beyond its memory. Errors are storage errors:
/// the input is answered "retry later", never "no such thing".
pub trait World {
    /// The message id was applied in an earlier group.
    fn is_applied(&self, id: &Uuid) -> Result<bool, String>;
    /// A job type and its executor.
    fn job_type(&self, name: &str) -> Result<Option<(JobTypeDef, ExecutorSpec)>, String>;
    /// An offer as stored (accepted or expired ones are not in memory).
    fn offer(&self, request_id: &Uuid) -> Result<Option<Offer>, String>;
    /// A job as stored (finished ones are not in memory).
    fn job(&self, id: &Uuid) -> Result<Option<Job>, String>;
    /// Where a job runs, as recorded when it started.
    fn execution(&self, job: &Uuid) -> Option<Execution>;
    /// The workflow a request is for, as its manager said.
    fn workflow_of(&self, request: &Uuid) -> Option<Uuid>;
    /// Why the executor cannot run jobs now, if so.
    fn unavailable(&self, executor: &ExecutorSpec) -> Option<String>;
    /// Where a run will be, known before it starts (a container's name).
    fn external_id(&self, spec: &RunSpec) -> String;
    /// The peer has acknowledged a message of this node (not a stranger).
    fn knows(&self, node: &str) -> bool;
}

/// An input of the machine (taken by value, applied at once).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A direct message from a peer, its sender verified.
    Deliver(Inbound),
    /// A job request heard on gossip, or handed over by this node's own
    /// manager (through the same checks).
    Gossip {
        /// Its signer.
        from: String,
        /// The endpoint its signer gave for itself.
        endpoint: String,
        /// The request.
        req: JobRequest,
    },
    /// A run ended.
    Finished(Uuid, RunResult),
}

/// The outcome of handing a message to the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Applied (or a duplicate of one applied before).
    Applied,
    /// Not about a job of this agent; another engine may take it.
    NotMine,
}

/// A job whose record changed, once the change is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobChange {
    /// The job.
    pub id: Uuid,
    /// Its state after the change.
    pub state: JobState,
}

/// A run to start.
#[derive(Debug)]
pub struct Start {
    /// What to run.
    pub spec: RunSpec,
    /// The workflow it serves, when its manager said.
    pub workflow: Option<Uuid>,
}

/// What a group of inputs decided, to persist and then perform.
#[derive(Debug, Default)]
pub struct Out {
    /// Jobs to write (the newest copy of each).
    pub jobs: BTreeMap<Uuid, Job>,
    /// Offers to write.
    pub offers: Vec<Offer>,
    /// Offers to delete, by request.
    pub forget_offers: Vec<Uuid>,
    /// The workflow of each request offered for.
    pub request_workflows: Vec<(Uuid, Uuid)>,
    /// Where started jobs run.
    pub executions: Vec<(Uuid, Execution)>,
    /// Messages to stage, with the workflow they are about; a status
    /// superseded by a newer one of the same job in the group is `None`
    /// (the manager takes the newest state).
    pub send: Vec<Option<(Outbound, Option<Uuid>)>>,
    last_status: HashMap<Uuid, usize>,
    /// Message ids applied in this group.
    pub applied: Vec<Uuid>,
    applied_set: HashSet<Uuid>,
    /// Runs to start.
    pub start: Vec<Start>,
    /// Runs to stop.
    pub stop: Vec<Uuid>,
    /// Jobs that changed.
    pub changed: Vec<JobChange>,
    /// Runs that ended in this group: applied again after a failed write,
    /// so that no ended job stays `running`.
    pub results: Vec<(Uuid, RunResult)>,
    /// Peers refused by an allowlist, and why.
    pub refused: Vec<(String, String)>,
    /// Gossip dropped unanswered, its signer and why.
    pub dropped: Vec<(String, String)>,
    /// Offers made and declines sent.
    pub offers_made: u64,
    /// Declines sent.
    pub declines: u64,
    /// Runs that ended completed.
    pub completed: u64,
    /// Runs that ended failed, by reason.
    pub failures: Vec<Failure>,
}

impl Out {
    fn send(&mut self, out: Outbound, trace: Option<Uuid>) {
        if let Msg::Status(s) = &out.msg {
            if let Some(prev) = self.last_status.insert(s.job_id, self.send.len()) {
                if let Some(slot) = self.send.get_mut(prev) {
                    *slot = None;
                }
            }
        }
        self.send.push(Some((out, trace)));
    }

    fn applied(&mut self, id: Uuid) {
        if self.applied_set.insert(id) {
            self.applied.push(id);
        }
    }
}

/// Why a run failed, as a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// It outlived its timeout.
    Timeout,
    /// It was killed (cancelled by its manager, or the agent stopped).
    Killed,
    /// It exited with a non-zero status.
    ExitStatus,
    /// Its stdout was not what its job type declares.
    Output,
    /// Anything else (could not start, job type removed).
    Other,
}

impl Failure {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Killed => "killed",
            Failure::ExitStatus => "exit_status",
            Failure::Output => "output",
            Failure::Other => "other",
        }
    }

    /// The kind of a failed run, from what the executor said.
    pub fn of(message: &str, exit_status: Option<i32>) -> Self {
        if message.contains("timed out") {
            Failure::Timeout
        } else if message.contains("cancel") || message.contains("killed") {
            Failure::Killed
        } else if exit_status.is_some_and(|c| c != 0) {
            Failure::ExitStatus
        } else if message.contains("stdout") || message.contains("output") {
            Failure::Output
        } else {
            Failure::Other
        }
    }
}

/// Time and fresh ids for one call.
pub struct Now<'a> {
    /// Now, ms since the epoch.
    pub ms: u64,
    /// Fresh ids.
    pub new_id: &'a mut dyn FnMut() -> Uuid,
}

/// The agent: offers, live jobs, the run queue and what runs.
pub struct Agent {
    opts: Options,
    offers: HashMap<Uuid, Offer>,
    jobs: HashMap<Uuid, Job>,
    queue: BTreeMap<u64, Uuid>,
    next_queue_seq: u64,
    /// Jobs whose process runs now (kept across a reload: the processes
    /// do not stop when a write fails).
    running: HashSet<Uuid>,
    /// Running jobs of Slurm job types, with their type (not in local
    /// slots; bounded per type by `max_in_flight`).
    slurm_running: HashMap<Uuid, String>,
    /// True once a Slurm job type was seen (scheduling then looks past a
    /// full set of local slots).
    slurm_seen: bool,
    /// Requests declined, until they expire (ms): declined once only.
    declined: HashMap<Uuid, u64>,
    /// When expired offers are next forgotten.
    cleanup_at: u64,
    /// Jobs to look at again after a restart (running ones re-run).
    recover: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("jobs", &self.jobs.len())
            .field("queued", &self.queue.len())
            .field("running", &self.running.len())
            .finish()
    }
}

impl Agent {
    /// An agent with nothing; [`Agent::load`] gives it its records.
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            offers: HashMap::new(),
            jobs: HashMap::new(),
            queue: BTreeMap::new(),
            next_queue_seq: 1,
            running: HashSet::new(),
            slurm_running: HashMap::new(),
            slurm_seen: false,
            declined: HashMap::new(),
            cleanup_at: 0,
            recover: true,
        }
    }

    /// Replaces the live records with the stored ones: open offers and
    /// jobs not yet final. Runs still going keep their place.
    pub fn load(&mut self, offers: Vec<Offer>, jobs: Vec<Job>, now_ms: u64) {
        self.offers = offers
            .into_iter()
            .filter(|o| o.job_id.is_none() && o.expires_at_ms > now_ms)
            .map(|o| (o.request_id, o))
            .collect();
        self.jobs = jobs
            .into_iter()
            .filter(|j| !j.state.is_final())
            .map(|j| (j.id, j))
            .collect();
        self.next_queue_seq = self
            .jobs
            .values()
            .filter_map(|j| j.queue_seq)
            .max()
            .unwrap_or(0)
            + 1;
        self.queue = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && !self.running.contains(&j.id))
            .filter_map(|j| j.queue_seq.map(|q| (q, j.id)))
            .collect();
    }

    /// Live (not final) jobs.
    pub fn live_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Jobs whose process runs now.
    pub fn running(&self) -> impl Iterator<Item = &Uuid> {
        self.running.iter()
    }

    /// When [`Agent::settle`] next has something to do.
    pub fn next_timer(&self) -> Option<u64> {
        Some(self.cleanup_at)
    }

    /// Applies one input. The answer is for a delivered message.
    pub fn handle(
        &mut self,
        input: Input,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Delivered, DeliverError> {
        match input {
            Input::Deliver(msg) => self.deliver(msg, now.ms, world, out),
            Input::Gossip {
                from,
                endpoint,
                req,
            } => {
                // The answer goes to the signer, where the signer says it
                // is: a request cannot name another reply address; absurd
                // fields are dropped unanswered.
                if req.manager_endpoint != endpoint {
                    out.dropped.push((
                        from,
                        "a job request whose reply endpoint is not its sender's".into(),
                    ));
                } else if let Err(why) = req.check(now.ms) {
                    out.dropped.push((from, format!("a job request: {why}")));
                } else {
                    self.on_request(&from, &req, now, world, out);
                }
                Ok(Delivered::Applied)
            }
            Input::Finished(id, result) => {
                self.finished(id, result, now.ms, world, out);
                Ok(Delivered::Applied)
            }
        }
    }

    /// Does what is due: after a (re)start, the recovery of live jobs;
    /// the forgetting of expired offers; the scheduling decision.
    pub fn settle(&mut self, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        if std::mem::take(&mut self.recover) {
            self.recover(world, out);
        }
        if now.ms >= self.cleanup_at {
            self.cleanup_at = now.ms + CLEANUP_MS;
            self.forget_expired(now.ms, out);
        }
        self.schedule(now.ms, world, out);
    }

    /// The jobs loaded at start: a job that was running re-runs, a queued
    /// one takes its place in the queue again.
    fn recover(&mut self, world: &dyn World, out: &mut Out) {
        self.queue.clear();
        let mut ids: Vec<(u64, Uuid)> = self
            .jobs
            .values()
            .map(|j| (j.queue_seq.unwrap_or(0), j.id))
            .collect();
        ids.sort();
        for (_, id) in ids {
            let Some(mut job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let was_running = job.state == JobState::Running;
            let fx = job.on_restart();
            if fx.is_empty() {
                continue;
            }
            if was_running {
                tracing::warn!(job = %id, "job was running when the agent stopped; it runs again");
            }
            let trace = world.workflow_of(&job.request_id);
            self.commit(Some(job), fx, trace, world, out);
        }
    }

    fn forget_expired(&mut self, now_ms: u64, out: &mut Out) {
        self.declined.retain(|_, until| *until > now_ms);
        let expired: Vec<Uuid> = self
            .offers
            .values()
            .filter(|o| o.expires_at_ms <= now_ms)
            .map(|o| o.request_id)
            .collect();
        for r in expired {
            self.offers.remove(&r);
            out.forget_offers.push(r);
        }
    }

    /// How busy this agent is, for its offers.
    fn load_now(&self) -> Load {
        let slots = self.opts.slots as u32;
        let running = self.running.len() as u32;
        let local = running.saturating_sub(self.slurm_running.len() as u32);
        Load {
            slots,
            free_slots: slots.saturating_sub(local),
            queue_length: (self.jobs.len() as u32).saturating_sub(running),
        }
    }

    fn on_request(
        &mut self,
        from: &str,
        req: &JobRequest,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) {
        let found = match world.job_type(&req.job_type) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read job types");
                return;
            }
        };
        let (def, executor) = match found {
            Some((d, e)) => (Some(d), e),
            None => (None, ExecutorSpec::default()),
        };
        let unavailable = def.as_ref().and_then(|_| world.unavailable(&executor));
        // An offer tells the capacity of the executor that would run it.
        let load = match &executor {
            ExecutorSpec::Slurm(s) => {
                self.slurm_seen = true;
                let n = self
                    .slurm_running
                    .values()
                    .filter(|t| **t == req.job_type)
                    .count() as u32;
                Load {
                    slots: s.max_in_flight,
                    free_slots: s.max_in_flight.saturating_sub(n),
                    queue_length: 0,
                }
            }
            _ => self.load_now(),
        };
        let prior = self.offers.get(&req.request_id);
        let how = Answering {
            unavailable,
            load,
            declined_before: self.declined.contains_key(&req.request_id),
            not_served: !self.opts.serves(from),
        };
        if how.not_served && !how.declined_before {
            out.refused.push((
                from.to_string(),
                "not in this agent's --serve-managers: its requests are declined".into(),
            ));
        }
        let Some((offer, answer)) = machine::answer_request(
            def.as_ref(),
            prior,
            from,
            req,
            now.ms,
            &mut *now.new_id,
            how,
        ) else {
            return;
        };
        if matches!(answer.msg, Msg::Decline { .. }) {
            self.declined.insert(req.request_id, req.expires_at_ms);
            out.declines += 1;
        } else {
            out.offers_made += 1;
        }
        if let (Some(_), Some(w)) = (&offer, req.workflow_id) {
            out.request_workflows.push((req.request_id, w));
        }
        tracing::debug!(workflow = %caroni_types::msg::Trace(req.workflow_id), request = %req.request_id, answer = answer.msg.name(), "answering a request");
        if let Some(o) = offer {
            out.offers.push(o.clone());
            self.offers.insert(o.request_id, o);
        }
        out.send(answer, req.workflow_id);
    }

    fn deliver(
        &mut self,
        msg: Inbound,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Delivered, DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        let retry = DeliverError::Retry;
        if out.applied_set.contains(&msg.id) || world.is_applied(&msg.id).map_err(retry)? {
            return Ok(Delivered::Applied);
        }
        if matches!(msg.msg, Msg::Accept { .. }) && !self.opts.serves(&msg.from) {
            let why = format!(
                "this agent does not serve manager {}: it serves only the managers in its --serve-managers list",
                msg.from
            );
            out.refused.push((msg.from.clone(), why.clone()));
            return Err(DeliverError::Refused(why));
        }
        let (job, fx) = match &msg.msg {
            Msg::Accept {
                offer_id,
                job_id,
                request_id,
            } => {
                let offer = match self.offers.get(request_id) {
                    Some(o) => Some(o.clone()),
                    None => world.offer(request_id).map_err(retry)?,
                };
                let def = match &offer {
                    Some(o) => world.job_type(&o.job_type).map_err(retry)?.map(|(d, _)| d),
                    None => None,
                };
                match machine::accept(
                    offer.as_ref(),
                    def.as_ref(),
                    &msg.from,
                    &msg.endpoint,
                    *offer_id,
                    *job_id,
                    now_ms,
                )? {
                    AcceptOutcome::Created(job, used, fx) => {
                        tracing::debug!(job = %job.id, job_type = %job.job_type, manager = %job.manager, "job accepted");
                        out.offers.push(used.clone());
                        self.offers.insert(used.request_id, used);
                        (Some(*job), fx)
                    }
                    AcceptOutcome::Answer(answer) if world.knows(&msg.from) => {
                        (None, vec![Effect::Send(answer)])
                    }
                    // A stranger is answered in the ack, not at an
                    // address it chose.
                    AcceptOutcome::Answer(answer) => {
                        return Err(DeliverError::Refused(match answer.msg {
                            Msg::Status(s) => s.message,
                            other => format!("not accepted ({})", other.name()),
                        }))
                    }
                }
            }
            Msg::Reject { request_id, .. } => {
                if let Some(o) = self.offers.get(request_id) {
                    if o.manager != msg.from {
                        return Err(DeliverError::Refused(
                            "only the manager an offer was made to may reject it".into(),
                        ));
                    }
                }
                self.offers.remove(request_id);
                out.forget_offers.push(*request_id);
                out.applied(msg.id);
                return Ok(Delivered::Applied);
            }
            Msg::Data {
                job_id,
                items,
                outputs: false,
            } => {
                let Some(mut job) = self.job(*job_id, world)? else {
                    return Err(DeliverError::Refused(format!(
                        "this agent holds no job {job_id}"
                    )));
                };
                let fx = job.on_data(&msg.from, items)?;
                (Some(job), fx)
            }
            Msg::StatusRequest { job_id } => match self.job(*job_id, world)? {
                Some(job) => (None, job.on_status_request(&msg.from)?),
                None if world.knows(&msg.from) => {
                    (None, vec![Effect::Send(unknown_job(&msg, *job_id))])
                }
                None => {
                    return Err(DeliverError::Refused(format!(
                        "this agent does not know job {job_id}"
                    )))
                }
            },
            Msg::Kill { job_id, reason } => match self.job(*job_id, world)? {
                Some(mut job) => {
                    let fx = job.on_kill(&msg.from, reason, now_ms)?;
                    tracing::info!(job = %job_id, reason = %reason, "job killed by its manager");
                    (Some(job), fx)
                }
                None => (None, Vec::new()),
            },
            Msg::Request(_) => {
                return Err(DeliverError::Refused(
                    "job requests travel on gossip, not direct".into(),
                ))
            }
            _ => return Ok(Delivered::NotMine),
        };
        self.commit(job, fx, msg.trace, world, out);
        out.applied(msg.id);
        Ok(Delivered::Applied)
    }

    /// A job, live in memory or finished on disk. A storage error is a
    /// retry for the sender, never "no such job".
    fn job(&self, id: Uuid, world: &dyn World) -> Result<Option<Job>, DeliverError> {
        match self.jobs.get(&id) {
            Some(j) => Ok(Some(j.clone())),
            None => world.job(&id).map_err(DeliverError::Retry),
        }
    }

    /// Where a job runs: as recorded when it started, else its job type's
    /// executor.
    fn runs_on(&self, job_id: Uuid, world: &dyn World, out: &Out) -> Option<Execution> {
        if let Some((_, x)) = out.executions.iter().rev().find(|(j, _)| *j == job_id) {
            return Some(x.clone());
        }
        if let Some(x) = world.execution(&job_id) {
            return Some(x);
        }
        let job = self.jobs.get(&job_id)?;
        let e = world.job_type(&job.job_type).ok()??.1;
        Some(Execution {
            executor: e.name().to_string(),
            external_id: String::new(),
        })
    }

    /// Records a job's change and what it causes; `trace` is the workflow
    /// the messages are about.
    fn commit(
        &mut self,
        job: Option<Job>,
        mut fx: Vec<Effect>,
        trace: Option<Uuid>,
        world: &dyn World,
        out: &mut Out,
    ) {
        let mut job = job;
        for e in &mut fx {
            match e {
                // Status updates say where the job runs.
                Effect::Send(Outbound {
                    msg: Msg::Status(s),
                    ..
                }) => {
                    if let Some(x) = self.runs_on(s.job_id, world, out) {
                        s.executor = x.executor;
                        s.external_id = x.external_id;
                    }
                }
                Effect::Enqueue(_) => {
                    if let Some(j) = job.as_mut() {
                        j.queue_seq = Some(self.next_queue_seq);
                        self.next_queue_seq += 1;
                    }
                }
                _ => {}
            }
        }
        for e in &fx {
            match e {
                Effect::Send(o) => out.send(o.clone(), trace),
                Effect::Enqueue(id) => {
                    if let Some(seq) = job.as_ref().and_then(|j| j.queue_seq) {
                        self.queue.insert(seq, *id);
                    }
                }
                Effect::StopProcess(id) => {
                    if self.running.remove(id) {
                        self.slurm_running.remove(id);
                        out.stop.push(*id);
                    }
                }
            }
        }
        if let Some(j) = job {
            out.changed.push(JobChange {
                id: j.id,
                state: j.state,
            });
            if j.state.is_final() {
                self.jobs.remove(&j.id);
                if let Some(seq) = j.queue_seq {
                    if self.queue.get(&seq) == Some(&j.id) {
                        self.queue.remove(&seq);
                    }
                }
            } else {
                self.jobs.insert(j.id, j.clone());
            }
            out.jobs.insert(j.id, j);
        }
    }

    /// Starts queued jobs, oldest first, while slots are free. Jobs of
    /// Slurm job types do not take local slots: at most their type's
    /// `max_in_flight` are submitted at once. A job that does not fit now
    /// stays queued in its place; at most [`LOOK_PAST`] are looked past.
    fn schedule(&mut self, now_ms: u64, world: &dyn World, out: &mut Out) {
        let mut skipped = Vec::new();
        self.start_queued(now_ms, world, out, &mut skipped);
        for (seq, id) in skipped {
            self.queue.insert(seq, id);
        }
    }

    fn start_queued(
        &mut self,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
        skipped: &mut Vec<(u64, Uuid)>,
    ) {
        loop {
            let local = self
                .running
                .iter()
                .filter(|k| !self.slurm_running.contains_key(k))
                .count();
            if skipped.len() >= LOOK_PAST || (local >= self.opts.slots && !self.slurm_seen) {
                return;
            }
            let Some((_, id)) = self.queue.pop_first() else {
                return;
            };
            let Some(mut job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let (def, executor) = match world.job_type(&job.job_type) {
                Ok(Some(found)) => found,
                Ok(None) => {
                    let mut fx = job.on_started(now_ms);
                    fx.append(&mut job.on_finished(
                        RunResult::Failed {
                            message: format!(
                                "job type {} was removed from this agent",
                                job.job_type
                            ),
                            exit_status: None,
                            stderr_tail: String::new(),
                        },
                        now_ms,
                    ));
                    let trace = world.workflow_of(&job.request_id);
                    self.commit(Some(job), fx, trace, world, out);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read job types");
                    self.queue.insert(job.queue_seq.unwrap_or(0), id);
                    return;
                }
            };
            let fits = match &executor {
                ExecutorSpec::Slurm(s) => {
                    self.slurm_seen = true;
                    let of_type = self
                        .slurm_running
                        .values()
                        .filter(|t| **t == job.job_type)
                        .count();
                    of_type < s.max_in_flight as usize
                }
                _ => local < self.opts.slots,
            };
            if !fits {
                skipped.push((job.queue_seq.unwrap_or(0), id));
                continue;
            }
            let slurm = matches!(executor, ExecutorSpec::Slurm(_));
            let fx = job.on_started(now_ms);
            let spec = RunSpec {
                job_id: id,
                body: def.body.clone(),
                inputs: job.values.clone(),
                job_kvs: job.job_kvs.clone(),
                outputs: def.outputs.clone(),
                timeout: Duration::from_secs(u64::from(def.timeout_seconds)),
                max_output_bytes: def.max_output_bytes,
                executor,
            };
            // Where it runs, written with its start (a Slurm job's id is
            // written by its executor once sbatch has given it).
            if !slurm {
                out.executions.push((
                    id,
                    Execution {
                        executor: spec.executor.name().to_string(),
                        external_id: world.external_id(&spec),
                    },
                ));
            }
            let workflow = world.workflow_of(&job.request_id);
            if slurm {
                self.slurm_running.insert(id, job.job_type.clone());
            }
            self.commit(Some(job), fx, workflow, world, out);
            self.running.insert(id);
            out.start.push(Start { spec, workflow });
        }
    }

    fn finished(
        &mut self,
        id: Uuid,
        result: RunResult,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
    ) {
        self.running.remove(&id);
        self.slurm_running.remove(&id);
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        out.results.push((id, result.clone()));
        let fx = job.on_finished(result, now_ms);
        match job.state {
            JobState::Completed => out.completed += 1,
            _ => out
                .failures
                .push(Failure::of(&job.message, job.exit_status)),
        }
        let trace = world.workflow_of(&job.request_id);
        tracing::debug!(workflow = %caroni_types::msg::Trace(trace), job = %id, state = job.state.as_str(), reason = %job.message, "job finished");
        self.commit(Some(job), fx, trace, world, out);
    }
}

fn unknown_job(msg: &Inbound, job_id: Uuid) -> Outbound {
    Outbound {
        to: msg.from.clone(),
        endpoint: msg.endpoint.clone(),
        msg: Msg::Status(StatusUpdate {
            job_id,
            state: JobState::Failed,
            message: "this agent does not know the job (it may have lost its data)".into(),
            exit_status: None,
            stderr_tail: String::new(),
            sequence: u64::MAX,
            executor: String::new(),
            external_id: String::new(),
        }),
    }
}
