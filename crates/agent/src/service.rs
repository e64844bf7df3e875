//! The agent service: owns the agent's live records, applies messages
//! through the pure machine, and schedules jobs FIFO within its slots.
//!
//! Group commit, as in the manager: every command waiting in the channel
//! (and every job that finished meanwhile) is applied in memory, their
//! changes and messages are written in one synced batch on a blocking
//! thread, and only then are the messages announced and the senders
//! answered. A failed write answers "retry" and reloads from disk.
//!
//! Gossip requests are taken with `try_send`: when the agent is busy a
//! request is dropped, not queued (the manager re-publishes it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use caroni_store::{keys::Key, wire, Batch, Store};
use caroni_types::msg::{Inbound, JobRequest, JobState, Load, Msg, Outbound};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::executor::{Execution, Executor, RunSpec};
use crate::job_types;
use crate::machine::{self, AcceptOutcome, Answering, Effect, Job, Offer, RunResult};
use crate::records::{EXECUTIONS, JOBS, OFFERS, REQUEST_WORKFLOWS};

/// Most commands applied in one batch.
pub const GROUP: usize = 1024;

/// The outcome of handing a message to the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Applied (or a duplicate of one applied before).
    Applied,
    /// Not about a job of this agent; another engine may take it.
    NotMine,
}

/// Why a message was not applied (shared by both engines).
pub use caroni_store::wire::DeliverError;

/// Options.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's id.
    pub node_id: String,
    /// Concurrent jobs.
    pub slots: usize,
    /// The managers served (`--serve-managers`); `None` serves every one.
    pub serve_managers: Option<std::collections::HashSet<String>>,
}

impl Options {
    /// True when this agent serves manager `node`.
    pub fn serves(&self, node: &str) -> bool {
        self.serve_managers
            .as_ref()
            .is_none_or(|list| list.contains(node))
    }
}

type DeliverReply = oneshot::Sender<Result<Delivered, DeliverError>>;

enum Cmd {
    Deliver(Inbound, DeliverReply),
    Gossip(String, JobRequest),
}

const STOPPED: &str = "agent shutting down";

/// Counters of the agent since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Job runs that ended completed.
    pub completed: AtomicU64,
    /// Job runs that ended failed.
    pub failed: AtomicU64,
}

/// A cheap handle to the agent service.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    store: Store,
    stats: Arc<Stats>,
    events: tokio::sync::broadcast::Sender<JobChange>,
}

/// A job whose record changed, once the change is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobChange {
    /// The job.
    pub id: Uuid,
    /// Its state after the change.
    pub state: caroni_types::msg::JobState,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("agent::Handle").finish()
    }
}

impl Handle {
    /// Queues a direct message behind those submitted before it; the
    /// receiver resolves once it is durable.
    pub async fn submit(
        &self,
        msg: Inbound,
    ) -> Result<oneshot::Receiver<Result<Delivered, DeliverError>>, DeliverError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Deliver(msg, tx))
            .await
            .map_err(|_| DeliverError::Retry(STOPPED.into()))?;
        Ok(rx)
    }

    /// Applies a direct message; returns once it is durable.
    pub async fn deliver(&self, msg: Inbound) -> Result<Delivered, DeliverError> {
        self.submit(msg)
            .await?
            .await
            .map_err(|_| DeliverError::Retry(STOPPED.into()))?
    }

    /// A request heard on gossip from manager `from`. Dropped when the
    /// agent is busy (returns false): requests are re-published.
    pub fn gossip(&self, from: String, req: JobRequest) -> bool {
        self.tx.try_send(Cmd::Gossip(from, req)).is_ok()
    }

    /// Jobs, newest first, at most `limit`. Job ids are UUID v7 chosen by
    /// the managers, so key order is creation order (across managers, as
    /// far as their clocks agree) and only `limit` records are read.
    pub fn list_jobs(&self, limit: usize) -> caroni_store::Result<Vec<Job>> {
        self.store.scan_last(JOBS, limit)
    }

    /// One job.
    pub fn get_job(&self, id: Uuid) -> caroni_store::Result<Option<Job>> {
        self.store.get(JOBS, &Key::new().uuid(&id).finish())
    }

    /// Counters since the agent started.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The workflow a job serves, when its manager said.
    pub fn workflow_of(&self, job: &Job) -> Option<Uuid> {
        workflow_of(&self.store, job)
    }

    /// Where a job runs or ran: recorded when it started; before that, its
    /// job type's executor.
    pub fn execution_of(&self, job: &Job) -> Option<Execution> {
        let key = Key::new().uuid(&job.id).finish();
        match self.store.get(EXECUTIONS, &key) {
            Ok(Some(x)) => Some(x),
            _ => job_types::executor_of(&self.store, &job.job_type)
                .ok()
                .map(|e| Execution {
                    executor: e.name().to_string(),
                    external_id: String::new(),
                }),
        }
    }

    /// Jobs as they change (once each change is written).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<JobChange> {
        self.events.subscribe()
    }
}

/// What one group changed, written in one batch.
#[derive(Default)]
struct Group {
    batch: Batch,
    staged: Vec<Option<wire::Staged>>,
    /// The last status staged in this group for each job: a later status
    /// of the same job replaces it (the manager takes the newest state;
    /// `queued` then `running` in one group is sent as `running`).
    last_status: HashMap<Uuid, usize>,
    applied: HashSet<Uuid>,
    replies: Vec<(DeliverReply, Result<Delivered, DeliverError>)>,
    commands: usize,
    /// Results of jobs that ended in this group: applied again after a
    /// failed write, so that no ended job stays `running`.
    results: Vec<(Uuid, RunResult)>,
    /// Jobs changed in this group, announced once it is written.
    changed: Vec<JobChange>,
}

/// The agent service.
pub struct Service<E> {
    opts: Options,
    store: Store,
    wire: Arc<dyn wire::Wire>,
    executor: Arc<E>,
    rx: mpsc::Receiver<Cmd>,
    done_tx: mpsc::Sender<(Uuid, RunResult)>,
    done_rx: mpsc::Receiver<(Uuid, RunResult)>,
    offers: HashMap<Uuid, Offer>,
    jobs: HashMap<Uuid, Job>,
    queue: BTreeMap<u64, Uuid>,
    next_queue_seq: u64,
    running: HashMap<Uuid, CancellationToken>,
    /// Running jobs of Slurm job types, with their type (not in local
    /// slots; bounded per type by `max_in_flight`).
    slurm_running: HashMap<Uuid, String>,
    /// True once a Slurm job type was seen (scheduling then looks past a
    /// full set of local slots).
    slurm_seen: bool,
    /// Requests declined, until they expire (ms): declined once only.
    declined: HashMap<Uuid, u64>,
    group: Group,
    stats: Arc<Stats>,
    events: tokio::sync::broadcast::Sender<JobChange>,
    /// The state in memory is unreliable until a reload succeeds.
    stale: bool,
    /// Results of jobs whose end could not be written yet.
    retry_results: Vec<(Uuid, RunResult)>,
}

/// A failed run's reason as a bounded metric label.
fn failure_reason(message: &str, exit_status: Option<i32>) -> &'static str {
    if message.contains("timed out") {
        "timeout"
    } else if message.contains("cancel") || message.contains("killed") {
        "killed"
    } else if exit_status.is_some_and(|c| c != 0) {
        "exit_status"
    } else if message.contains("stdout") || message.contains("output") {
        "output"
    } else {
        "other"
    }
}

fn now_ms() -> u64 {
    caroni_types::now_ms()
}

impl<E: Executor> Service<E> {
    /// Loads live records from storage.
    pub fn new(
        opts: Options,
        store: Store,
        wire: Arc<dyn wire::Wire>,
        executor: E,
    ) -> caroni_store::Result<(Self, Handle)> {
        let (tx, rx) = mpsc::channel(GROUP);
        let (done_tx, done_rx) = mpsc::channel(256);
        let stats = Arc::new(Stats::default());
        let (events, _) = tokio::sync::broadcast::channel(4096);
        let handle = Handle {
            tx,
            store: store.clone(),
            stats: stats.clone(),
            events: events.clone(),
        };
        let mut s = Self {
            opts,
            store,
            wire,
            executor: Arc::new(executor),
            rx,
            done_tx,
            done_rx,
            offers: HashMap::new(),
            jobs: HashMap::new(),
            queue: BTreeMap::new(),
            next_queue_seq: 1,
            running: HashMap::new(),
            slurm_running: HashMap::new(),
            slurm_seen: false,
            declined: HashMap::new(),
            group: Group::default(),
            stats,
            events,
            stale: false,
            retry_results: Vec::new(),
        };
        s.load()?;
        Ok((s, handle))
    }

    /// Reloads the state after a failed write; until that succeeds the
    /// agent takes no command (see [`Service::run`]). Results of jobs that
    /// ended meanwhile are applied again once it has.
    fn reload(&mut self) {
        match self.load() {
            Ok(()) => {
                self.stale = false;
                for (id, result) in std::mem::take(&mut self.retry_results) {
                    self.finished(id, result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the agent's state; will try again");
                self.stale = true;
            }
        }
    }

    /// (Re)reads live offers and jobs from disk.
    fn load(&mut self) -> caroni_store::Result<()> {
        let now = now_ms();
        self.offers = self
            .store
            .scan(OFFERS, &[])?
            .into_iter()
            .map(|(_, o)| (o.request_id, o))
            .filter(|(_, o)| o.job_id.is_none() && o.expires_at_ms > now)
            .collect();
        self.jobs = self
            .store
            .scan(JOBS, &[])?
            .into_iter()
            .map(|(_, j)| (j.id, j))
            .filter(|(_, j)| !j.state.is_final())
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
            .filter(|j| j.state == JobState::Queued && !self.running.contains_key(&j.id))
            .filter_map(|j| j.queue_seq.map(|q| (q, j.id)))
            .collect();
        Ok(())
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.queue.clear();
        self.recover();
        self.schedule();
        self.flush().await;
        let mut cleanup = tokio::time::interval(Duration::from_secs(30));
        let mut backoff = wire::Backoff::default();
        loop {
            if self.stale {
                self.reload();
                if self.stale {
                    // Answer at once meanwhile: nobody waits on a disk.
                    let until = tokio::time::Instant::now() + backoff.delay(false);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep_until(until) => break,
                            Some(cmd) = self.rx.recv() => {
                                if let Cmd::Deliver(_, reply) = cmd {
                                    let _ = reply.send(Err(DeliverError::Retry(format!(
                                        "the agent cannot read its state from storage now ({}); retry later",
                                        self.store.health().borrow().as_deref().unwrap_or("unknown error")
                                    ))));
                                }
                            }
                        }
                    }
                    if cancel.is_cancelled() {
                        break;
                    }
                    continue;
                }
                self.schedule();
                self.flush().await;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(cmd) = self.rx.recv() => {
                    self.apply(cmd);
                    while self.group.commands < GROUP {
                        match self.rx.try_recv() {
                            Ok(cmd) => self.apply(cmd),
                            Err(_) => break,
                        }
                    }
                }
                Some((id, result)) = self.done_rx.recv() => self.finished(id, result),
                _ = cleanup.tick() => self.forget_expired(),
            }
            while let Ok((id, result)) = self.done_rx.try_recv() {
                self.finished(id, result);
            }
            self.schedule();
            let ok = self.flush().await;
            if !backoff.after(ok, &cancel).await {
                break;
            }
        }
        for token in self.running.values() {
            token.cancel();
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        self.group.commands += 1;
        match cmd {
            Cmd::Deliver(msg, reply) => {
                let r = self.deliver(msg);
                self.group.replies.push((reply, r));
            }
            Cmd::Gossip(from, req) => self.on_request(&from, &req),
        }
    }

    fn recover(&mut self) {
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
            let trace = workflow_of(&self.store, &job);
            if let Err(e) = self.commit(None, Some(job), None, fx, trace) {
                tracing::error!(error = %e, "cannot recover a job");
            }
        }
    }

    fn forget_expired(&mut self) {
        let now = now_ms();
        self.declined.retain(|_, until| *until > now);
        let expired: Vec<Offer> = self
            .offers
            .values()
            .filter(|o| o.expires_at_ms <= now)
            .cloned()
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut b = Batch::default();
        for o in &expired {
            b.delete(OFFERS, &Key::new().uuid(&o.request_id).finish());
            self.offers.remove(&o.request_id);
        }
        if let Err(e) = self.store.write_relaxed(b) {
            tracing::warn!(error = %e, "cannot forget expired offers");
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

    fn on_request(&mut self, from: &str, req: &JobRequest) {
        let def = match job_types::find(&self.store, &req.job_type) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read job types");
                return;
            }
        };
        let executor = job_types::executor_of(&self.store, &req.job_type).unwrap_or_default();
        let unavailable = def
            .as_ref()
            .and_then(|_| self.executor.unavailable(&executor));
        // An offer tells the capacity of the executor that would run it.
        let load = match &executor {
            caroni_types::ExecutorSpec::Slurm(s) => {
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
            self.wire.refused(
                from,
                "not in this agent's --serve-managers: its requests are declined",
            );
        }
        let Some((offer, out)) =
            machine::answer_request(def.as_ref(), prior, from, req, now_ms(), Uuid::new_v4, how)
        else {
            return;
        };
        if matches!(out.msg, Msg::Decline { .. }) {
            self.declined.insert(req.request_id, req.expires_at_ms);
        }
        let outcome = if offer.is_some() { "made" } else { "declined" };
        caroni_store::metrics::METRICS
            .offers
            .get_or_create(&caroni_store::metrics::label("outcome", outcome))
            .inc();
        if let (Some(_), Some(w)) = (&offer, req.workflow_id) {
            self.group.batch.put(
                REQUEST_WORKFLOWS,
                &Key::new().uuid(&req.request_id).finish(),
                &w,
            );
        }
        tracing::debug!(workflow = %caroni_types::msg::Trace(req.workflow_id), request = %req.request_id, answer = out.msg.name(), "answering a request");
        let trace = req.workflow_id;
        if let Err(e) = self.commit(None, None, offer, vec![Effect::Send(out)], trace) {
            tracing::error!(error = %e, "cannot answer a request");
        }
    }

    fn deliver(&mut self, msg: Inbound) -> Result<Delivered, DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        if self.group.applied.contains(&msg.id) {
            return Ok(Delivered::Applied);
        }
        match wire::is_applied(&self.store, &msg.id) {
            Ok(true) => return Ok(Delivered::Applied),
            Ok(false) => {}
            Err(e) => return Err(DeliverError::Retry(e.to_string())),
        }
        let now = now_ms();
        if matches!(msg.msg, Msg::Accept { .. }) && !self.opts.serves(&msg.from) {
            let why = format!(
                "this agent does not serve manager {}: it serves only the managers in its --serve-managers list",
                msg.from
            );
            self.wire.refused(&msg.from, &why);
            return Err(DeliverError::Refused(why));
        }
        let refused = |e: machine::Refusal| DeliverError::Refused(e.0);
        let (job, offer, fx) = match &msg.msg {
            Msg::Accept {
                offer_id,
                job_id,
                request_id,
            } => {
                let retry = |e: caroni_store::Error| DeliverError::Retry(e.to_string());
                let offer = match self.offers.get(request_id) {
                    Some(o) => Some(o.clone()),
                    None => self
                        .store
                        .get(OFFERS, &Key::new().uuid(request_id).finish())
                        .map_err(retry)?,
                };
                let def = match &offer {
                    Some(o) => job_types::find(&self.store, &o.job_type)
                        .map_err(|e| DeliverError::Retry(e.to_string()))?,
                    None => None,
                };
                match machine::accept(
                    offer.as_ref(),
                    def.as_ref(),
                    &msg.from,
                    &msg.endpoint,
                    *offer_id,
                    *job_id,
                    now,
                )
                .map_err(refused)?
                {
                    AcceptOutcome::Created(job, used, fx) => {
                        tracing::debug!(job = %job.id, job_type = %job.job_type, manager = %job.manager, "job accepted");
                        (Some(*job), Some(used), fx)
                    }
                    AcceptOutcome::Answer(out) if self.wire.knows(&msg.from) => {
                        (None, None, vec![Effect::Send(out)])
                    }
                    // A stranger is answered in the ack, not at an
                    // address it chose.
                    AcceptOutcome::Answer(out) => {
                        return Err(DeliverError::Refused(match out.msg {
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
                self.group
                    .batch
                    .delete(OFFERS, &Key::new().uuid(request_id).finish());
                wire::mark_applied(&mut self.group.batch, &msg.id);
                self.group.applied.insert(msg.id);
                return Ok(Delivered::Applied);
            }
            Msg::Data {
                job_id,
                items,
                outputs: false,
            } => {
                let Some(mut job) = self.job(*job_id)? else {
                    return Err(DeliverError::Refused(format!(
                        "this agent holds no job {job_id}"
                    )));
                };
                let fx = job.on_data(&msg.from, items).map_err(refused)?;
                (Some(job), None, fx)
            }
            Msg::StatusRequest { job_id } => match self.job(*job_id)? {
                Some(job) => {
                    let fx = job.on_status_request(&msg.from).map_err(refused)?;
                    (None, None, fx)
                }
                None if self.wire.knows(&msg.from) => {
                    (None, None, vec![Effect::Send(unknown_job(&msg, *job_id))])
                }
                None => {
                    return Err(DeliverError::Refused(format!(
                        "this agent does not know job {job_id}"
                    )))
                }
            },
            Msg::Kill { job_id, reason } => match self.job(*job_id)? {
                Some(mut job) => {
                    let fx = job.on_kill(&msg.from, reason, now).map_err(refused)?;
                    tracing::info!(job = %job_id, reason = %reason, "job killed by its manager");
                    (Some(job), None, fx)
                }
                None => (None, None, Vec::new()),
            },
            _ => return Ok(Delivered::NotMine),
        };
        self.commit(Some(msg.id), job, offer, fx, msg.trace)
            .map_err(DeliverError::Retry)?;
        Ok(Delivered::Applied)
    }

    /// A job, live in memory or finished on disk. A storage error is a
    /// retry for the sender, never "no such job".
    fn job(&self, id: Uuid) -> Result<Option<Job>, DeliverError> {
        match self.jobs.get(&id) {
            Some(j) => Ok(Some(j.clone())),
            None => self
                .store
                .get(JOBS, &Key::new().uuid(&id).finish())
                .map_err(|e| DeliverError::Retry(e.to_string())),
        }
    }

    /// Where a job runs: as recorded when it started, else its job type's
    /// executor; `None` for a job this agent does not hold.
    fn runs_on(&self, job_id: Uuid) -> Option<Execution> {
        let key = Key::new().uuid(&job_id).finish();
        if let Ok(Some(x)) = self.store.get(EXECUTIONS, &key) {
            return Some(x);
        }
        let job = self.jobs.get(&job_id)?;
        let e = job_types::executor_of(&self.store, &job.job_type).ok()?;
        Some(Execution {
            executor: e.name().to_string(),
            external_id: String::new(),
        })
    }

    /// Adds a change and the messages it causes to the group's batch and
    /// applies it in memory; the group is written by [`Service::flush`].
    /// `trace` is the workflow the messages are about (for the receiver's
    /// logs).
    fn commit(
        &mut self,
        applied: Option<Uuid>,
        job: Option<Job>,
        offer: Option<Offer>,
        fx: Vec<Effect>,
        trace: Option<Uuid>,
    ) -> Result<(), String> {
        let mut job = job;
        let mut fx = fx;
        // Status updates say where the job runs (for `workflow show`).
        for e in &mut fx {
            if let Effect::Send(Outbound {
                msg: Msg::Status(s),
                ..
            }) = e
            {
                if let Some(x) = self.runs_on(s.job_id) {
                    s.executor = x.executor;
                    s.external_id = x.external_id;
                }
            }
        }
        let g = &mut self.group;
        for e in &fx {
            if let Effect::Send(out) = e {
                let staged = self.wire.stage(&mut g.batch, out, trace)?;
                if let Msg::Status(s) = &out.msg {
                    if let Some(prev) = g
                        .last_status
                        .insert(s.job_id, g.staged.len())
                        .and_then(|i| g.staged.get_mut(i))
                        .and_then(Option::take)
                    {
                        self.wire.unstage(&mut g.batch, &prev);
                    }
                }
                g.staged.push(Some(staged));
            }
            if let (Effect::Enqueue(_), Some(j)) = (e, job.as_mut()) {
                j.queue_seq = Some(self.next_queue_seq);
                self.next_queue_seq += 1;
            }
        }
        if let Some(j) = &job {
            g.batch.put(JOBS, &Key::new().uuid(&j.id).finish(), j);
            g.changed.push(JobChange {
                id: j.id,
                state: j.state,
            });
        }
        if let Some(o) = &offer {
            g.batch
                .put(OFFERS, &Key::new().uuid(&o.request_id).finish(), o);
        }
        if let Some(id) = applied {
            wire::mark_applied(&mut g.batch, &id);
            g.applied.insert(id);
        }
        if let Some(o) = offer {
            self.offers.insert(o.request_id, o);
        }
        if let Some(j) = job {
            for e in &fx {
                match e {
                    Effect::Enqueue(id) => {
                        if let Some(seq) = j.queue_seq {
                            self.queue.insert(seq, *id);
                        }
                    }
                    Effect::StopProcess(id) => {
                        if let Some(t) = self.running.remove(id) {
                            t.cancel();
                        }
                    }
                    Effect::Send(_) => {}
                }
            }
            if j.state.is_final() {
                self.jobs.remove(&j.id);
                if let Some(seq) = j.queue_seq {
                    if self.queue.get(&seq) == Some(&j.id) {
                        self.queue.remove(&seq);
                    }
                }
            } else {
                self.jobs.insert(j.id, j);
            }
        }
        Ok(())
    }

    /// Writes the group in one synced batch, then announces its messages
    /// and answers its senders. False when the write failed: the state is
    /// reloaded from disk, senders are told to retry, and the results of
    /// jobs that ended are applied again to the next group.
    async fn flush(&mut self) -> bool {
        let g = std::mem::take(&mut self.group);
        if g.batch.is_empty() && g.replies.is_empty() {
            return true;
        }
        let written = if g.batch.is_empty() {
            Ok(())
        } else {
            self.store.write_blocking(g.batch).await
        };
        match written {
            Ok(()) => {
                self.wire.notify(g.staged.into_iter().flatten().collect());
                for (tx, r) in g.replies {
                    let _ = tx.send(r);
                }
                for c in g.changed {
                    let _ = self.events.send(c);
                }
            }
            Err(e) => {
                let e = format!("cannot write the agent's state: {e}");
                tracing::error!(error = %e, "group not written; reloading from disk");
                for (tx, r) in g.replies {
                    let _ = tx.send(r.and(Err(DeliverError::Retry(e.clone()))));
                }
                self.retry_results.extend(g.results);
                self.reload();
                return false;
            }
        }
        true
    }

    /// Starts queued jobs, oldest first, while slots are free. A job's
    /// process starts before its `running` state is written: if the agent
    /// dies first, the job re-runs after the restart, as for any job that
    /// was running (see ARCHITECTURE.md, Guarantees).
    ///
    /// Jobs of Slurm job types do not take local slots: at most their
    /// type's `max_in_flight` are submitted at once. A job that does not
    /// fit now stays queued in its place; at most 64 are looked past per
    /// call.
    fn schedule(&mut self) {
        let mut skipped = Vec::new();
        self.start_queued(&mut skipped);
        for (seq, id) in skipped {
            self.queue.insert(seq, id);
        }
    }

    fn start_queued(&mut self, skipped: &mut Vec<(u64, Uuid)>) {
        loop {
            let local = self
                .running
                .keys()
                .filter(|k| !self.slurm_running.contains_key(k))
                .count();
            if skipped.len() >= 64 || (local >= self.opts.slots && !self.slurm_seen) {
                return;
            }
            let Some((_, id)) = self.queue.pop_first() else {
                return;
            };
            let Some(mut job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let def = match job_types::find(&self.store, &job.job_type) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    let fx = job.on_started(now_ms());
                    let mut job2 = job.clone();
                    let mut fx2 = job2.on_finished(
                        RunResult::Failed {
                            message: format!(
                                "job type {} was removed from this agent",
                                job.job_type
                            ),
                            exit_status: None,
                            stderr_tail: String::new(),
                        },
                        now_ms(),
                    );
                    let mut all = fx;
                    all.append(&mut fx2);
                    let trace = workflow_of(&self.store, &job2);
                    let _ = self.commit(None, Some(job2), None, all, trace);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read job types");
                    self.queue.insert(job.queue_seq.unwrap_or(0), id);
                    return;
                }
            };
            let executor = match job_types::executor_of(&self.store, &job.job_type) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read job types");
                    self.queue.insert(job.queue_seq.unwrap_or(0), id);
                    return;
                }
            };
            let fits = match &executor {
                caroni_types::ExecutorSpec::Slurm(s) => {
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
            let slurm_type = matches!(executor, caroni_types::ExecutorSpec::Slurm(_))
                .then(|| job.job_type.clone());
            let fx = job.on_started(now_ms());
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
            if !matches!(spec.executor, caroni_types::ExecutorSpec::Slurm(_)) {
                let execution = Execution {
                    executor: spec.executor.name().to_string(),
                    external_id: self.executor.external_id(&spec),
                };
                self.group
                    .batch
                    .put(EXECUTIONS, &Key::new().uuid(&id).finish(), &execution);
            }
            let workflow = workflow_of(&self.store, &job);
            if let Err(e) = self.commit(None, Some(job), None, fx, workflow) {
                tracing::error!(error = %e, "cannot start a job");
                continue;
            }
            let token = CancellationToken::new();
            self.running.insert(id, token.clone());
            if let Some(t) = slurm_type {
                self.slurm_running.insert(id, t);
            }
            let exec = self.executor.clone();
            let done = self.done_tx.clone();
            let span = tracing::info_span!(
                "job",
                node = %self.opts.node_id,
                job = %id,
                workflow = tracing::field::Empty
            );
            if let Some(w) = workflow {
                span.record("workflow", tracing::field::display(w));
            }
            tokio::spawn(
                async move {
                    tracing::debug!("job started");
                    let result = exec.run(spec, token).await;
                    let _ = done.send((id, result)).await;
                }
                .instrument(span),
            );
        }
    }

    fn finished(&mut self, id: Uuid, result: RunResult) {
        self.running.remove(&id);
        self.slurm_running.remove(&id);
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        self.group.results.push((id, result.clone()));
        let fx = job.on_finished(result, now_ms());
        match job.state {
            JobState::Completed => self.stats.completed.fetch_add(1, Ordering::Relaxed),
            _ => {
                let reason = failure_reason(&job.message, job.exit_status);
                caroni_store::metrics::METRICS
                    .job_failures
                    .get_or_create(&caroni_store::metrics::label("reason", reason))
                    .inc();
                self.stats.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        let trace = workflow_of(&self.store, &job);
        tracing::debug!(workflow = %caroni_types::msg::Trace(trace), job = %id, state = job.state.as_str(), reason = %job.message, "job finished");
        if let Err(e) = self.commit(None, Some(job), None, fx, trace) {
            tracing::error!(error = %e, "cannot record a finished job");
        }
    }
}

/// The workflow a job serves, as its request said (kept per request).
fn workflow_of(store: &Store, job: &Job) -> Option<Uuid> {
    store
        .get(
            REQUEST_WORKFLOWS,
            &Key::new().uuid(&job.request_id).finish(),
        )
        .ok()
        .flatten()
}

fn unknown_job(msg: &Inbound, job_id: Uuid) -> caroni_types::msg::Outbound {
    caroni_types::msg::Outbound {
        to: msg.from.clone(),
        endpoint: msg.endpoint.clone(),
        msg: Msg::Status(caroni_types::msg::StatusUpdate {
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

#[cfg(test)]
mod tests {
    use super::*;
    use caroni_types::msg::Outbound;
    use caroni_types::JobTypeDef;
    use std::sync::Mutex;

    /// Records what the service sends (what it announces once written).
    #[derive(Default)]
    struct FakeWire(Mutex<Vec<Outbound>>);

    impl wire::Wire for FakeWire {
        fn stage(
            &self,
            _: &mut Batch,
            out: &Outbound,
            _: Option<Uuid>,
        ) -> Result<wire::Staged, String> {
            Ok(wire::Staged {
                to: out.to.clone(),
                endpoint: out.endpoint.clone(),
                item: Some(Arc::new(out.clone())),
            })
        }
        fn notify(&self, staged: Vec<wire::Staged>) {
            let mut sent = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in staged {
                if let Some(out) = s.item.and_then(|i| i.downcast::<Outbound>().ok()) {
                    sent.push((*out).clone());
                }
            }
        }
        fn publish(&self, _: Vec<JobRequest>) {}
    }

    /// Records which jobs start, and never finishes them.
    struct FakeExec(mpsc::UnboundedSender<Uuid>);

    impl Executor for FakeExec {
        async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
            let _ = self.0.send(spec.job_id);
            cancel.cancelled().await;
            RunResult::Failed {
                message: "killed".into(),
                exit_status: None,
                stderr_tail: String::new(),
            }
        }
    }

    fn inbound(from: &str, msg: Msg) -> Inbound {
        Inbound {
            id: Uuid::new_v4(),
            from: from.into(),
            endpoint: format!("http://{from}"),
            trace: None,
            msg,
        }
    }

    /// With one slot, a job of manager B whose inputs are all there runs
    /// before an older job of manager A that still waits for data.
    #[tokio::test]
    async fn a_ready_job_runs_before_an_older_one_that_waits_for_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        job_types::put(
            &store,
            JobTypeDef {
                name: "work".into(),
                inputs: vec!["x".into()],
                outputs: vec!["y".into()],
                body: "true".into(),
                timeout_seconds: 60,
                max_output_bytes: 0,
                updated_at_ms: 0,
            },
            false,
        )
        .expect("job type");
        let wire = Arc::new(FakeWire::default());
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (svc, handle) = Service::new(
            Options {
                node_id: "me".into(),
                slots: 1,
                serve_managers: None,
            },
            store,
            wire.clone(),
            FakeExec(started_tx),
        )
        .expect("service");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(svc.run(cancel.clone()));

        let mut jobs = Vec::new();
        for manager in ["managerA", "managerB"] {
            let req = JobRequest {
                request_id: Uuid::new_v4(),
                job_type: "work".into(),
                parameter_keys: vec!["x".into()],
                output_keys: vec!["y".into()],
                job_kvs: BTreeMap::new(),
                expires_at_ms: now_ms() + 60_000,
                manager_endpoint: format!("http://{manager}"),
                publish_count: 1,
                workflow_id: None,
            };
            assert!(handle.gossip(manager.into(), req.clone()));
            // The offer is staged once the gossip is handled; read it back.
            let offer = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let found = wire
                        .0
                        .lock()
                        .expect("lock")
                        .iter()
                        .find_map(|o| match o.msg {
                            Msg::Offer {
                                offer_id,
                                request_id,
                                ..
                            } if request_id == req.request_id => Some(offer_id),
                            _ => None,
                        });
                    if let Some(f) = found {
                        return f;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("offer in time");
            let job_id = Uuid::new_v4();
            handle
                .deliver(inbound(
                    manager,
                    Msg::Accept {
                        offer_id: offer,
                        request_id: req.request_id,
                        job_id,
                    },
                ))
                .await
                .expect("accept");
            jobs.push(job_id);
        }
        // Only manager B's job gets its input.
        let items = BTreeMap::from([("x".to_string(), "1".to_string())]);
        handle
            .deliver(inbound(
                "managerB",
                Msg::Data {
                    job_id: jobs[1],
                    items,
                    outputs: false,
                },
            ))
            .await
            .expect("data");
        let first = tokio::time::timeout(Duration::from_secs(5), started.recv())
            .await
            .expect("a job starts")
            .expect("id");
        assert_eq!(first, jobs[1], "the ready job of manager B runs first");
        // Queued and started in one group: the manager hears `running`
        // only (the newer status replaces the older one in the batch).
        let statuses = || -> Vec<JobState> {
            wire.0
                .lock()
                .expect("lock")
                .iter()
                .filter_map(|o| match &o.msg {
                    Msg::Status(s) if s.job_id == jobs[1] => Some(s.state),
                    _ => None,
                })
                .collect()
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while statuses().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a status in time");
        assert_eq!(statuses(), [JobState::Running]);
        assert_eq!(
            handle.get_job(jobs[0]).expect("read").map(|j| j.state),
            Some(JobState::Pending)
        );
        cancel.cancel();
        let _ = task.await;
    }
}
