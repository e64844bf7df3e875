//! The manager service: owns the live workflows, applies messages and
//! timers through the pure machine, and persists each change together with
//! the messages it causes. Finished workflows live on disk only.
//!
//! **Group commit.** The service takes every command waiting in its channel
//! (up to [`GROUP`]), applies them one after the other in memory, writes
//! all their changes, messages and applied ids in one synced batch on a
//! blocking thread, and only then answers them, sends and publishes. While
//! that write is in flight new commands queue up and form the next group,
//! so the cost of a sync is shared by everything that arrived meanwhile.
//! A failed write answers every command of the group with "retry later"
//! and reloads the live state from disk, so memory never runs ahead of it.
//!
//! **Admission.** At most `max_open_requests` job requests are out at once;
//! new workflows wait in `created`, in order, until their requests fit.
//! Load turns into a queue on the manager, not into a storm of gossip,
//! offers and expiring leases.
//!
//! **Timers** sit in a deadline index (one entry per live workflow), so a
//! tick touches only the workflows that are due.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use caroni_store::{wire, Batch, Store};
use caroni_types::msg::{Inbound, JobRequest, Msg, Outbound};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::machine::{Ctx, Effect, Peers, Refusal};
use crate::model::{RequestState, StepState, Workflow, WorkflowState};
use crate::{records, templates, Error};

/// Most commands applied in one batch.
pub const GROUP: usize = 1024;
/// How long an agent that answered requests counts as known.
const AGENT_MEMORY_MS: u64 = 10 * 60 * 1000;

/// Options.
#[derive(Debug, Clone)]
pub struct Options {
    /// This manager's peer endpoint.
    pub endpoint: String,
    /// Lease on live jobs.
    pub lease: Duration,
    /// Lifetime of a job request.
    pub request_ttl: Duration,
    /// Job requests out at once; further workflows wait in `created`.
    pub max_open_requests: usize,
    /// How long to gather offers before taking the least busy agent.
    pub offer_window: Duration,
    /// The agents whose offers are taken (`--use-agents`); `None` takes
    /// every agent's.
    pub use_agents: Option<std::collections::HashSet<String>>,
}

/// Why a message was not applied (shared by both engines).
pub use caroni_store::wire::DeliverError;

type DeliverReply = oneshot::Sender<Result<(), DeliverError>>;

enum Cmd {
    Run(
        String,
        BTreeMap<String, String>,
        oneshot::Sender<Result<Uuid, Error>>,
    ),
    Cancel(Uuid, oneshot::Sender<Result<(), Error>>),
    Deliver(Box<Inbound>, DeliverReply),
}

/// A change of a workflow, as announced to watchers once written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The workflow.
    pub id: Uuid,
    /// Its state after the change.
    pub state: WorkflowState,
    /// Created (ms).
    pub created_at_ms: u64,
    /// Ended (ms), once it has.
    pub finished_at_ms: Option<u64>,
}

/// Counters of the manager since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Workflows that ended completed.
    pub completed: AtomicU64,
    /// Workflows that ended failed.
    pub failed: AtomicU64,
    /// Live workflows (not ended).
    pub live: AtomicU64,
    /// Live workflows waiting for admission.
    pub waiting: AtomicU64,
}

/// A cheap handle to the manager service.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    store: Store,
    events: broadcast::Sender<Change>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("manager::Handle").finish()
    }
}

const STOPPED: &str = "the manager is shutting down";

impl Handle {
    /// Starts a workflow from a template; returns its id once it is durable.
    pub async fn run(
        &self,
        template: String,
        inputs: BTreeMap<String, String>,
    ) -> Result<Uuid, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Run(template, inputs, tx))
            .await
            .map_err(|_| Error::Unavailable(STOPPED.into()))?;
        rx.await.map_err(|_| Error::Unavailable(STOPPED.into()))?
    }

    /// Cancels a workflow.
    pub async fn cancel(&self, id: Uuid) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Cancel(id, tx))
            .await
            .map_err(|_| Error::Unavailable(STOPPED.into()))?;
        rx.await.map_err(|_| Error::Unavailable(STOPPED.into()))?
    }

    /// Queues a direct message behind those submitted before it; the
    /// receiver resolves once it is durable.
    pub async fn submit(
        &self,
        msg: Inbound,
    ) -> Result<oneshot::Receiver<Result<(), DeliverError>>, DeliverError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Deliver(Box::new(msg), tx))
            .await
            .map_err(|_| DeliverError::Retry(STOPPED.into()))?;
        Ok(rx)
    }

    /// Applies a direct message; returns once it is durable.
    pub async fn deliver(&self, msg: Inbound) -> Result<(), DeliverError> {
        self.submit(msg)
            .await?
            .await
            .map_err(|_| DeliverError::Retry(STOPPED.into()))?
    }

    /// One workflow, from disk.
    pub fn get(&self, id: Uuid) -> Result<Workflow, Error> {
        records::get(&self.store, &id)?.ok_or_else(|| {
            Error::NotFound(format!(
                "no workflow {id}; `caroni workflow list` shows them"
            ))
        })
    }

    /// Workflows, newest first, at most `limit`. Workflow ids are UUID v7,
    /// so key order is creation order and only `limit` records are read.
    pub fn list(&self, limit: usize) -> Result<Vec<Workflow>, Error> {
        Ok(records::list_last(&self.store, limit)?)
    }

    /// Workflows as they change (once each change is written).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    /// Counters since the manager started.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// A command's answer, given once its group is written.
/// The answer while the manager cannot trust its state.
const STALE: &str = "the manager cannot read its state from storage now (see the node's log and health); it recovers by itself when storage works again, retry then";

impl Cmd {
    /// Answers without applying: the manager cannot now.
    fn refuse(self, why: &str) {
        match self {
            Cmd::Run(_, _, tx) => Reply::Run(tx, Ok(Uuid::nil())).send(Err(why)),
            Cmd::Cancel(_, tx) => Reply::Cancel(tx, Ok(())).send(Err(why)),
            Cmd::Deliver(_, tx) => Reply::Deliver(tx, Ok(())).send(Err(why)),
        }
    }
}

enum Reply {
    Run(oneshot::Sender<Result<Uuid, Error>>, Result<Uuid, Error>),
    Cancel(oneshot::Sender<Result<(), Error>>, Result<(), Error>),
    Deliver(DeliverReply, Result<(), DeliverError>),
}

impl Reply {
    /// Sends the answer; a failed write turns successes into "retry".
    fn send(self, written: Result<(), &str>) {
        match self {
            Reply::Run(tx, r) => {
                let _ = tx.send(match written {
                    Ok(()) => r,
                    Err(e) => r.and(Err(Error::Unavailable(e.to_string()))),
                });
            }
            Reply::Cancel(tx, r) => {
                let _ = tx.send(match written {
                    Ok(()) => r,
                    Err(e) => r.and(Err(Error::Unavailable(e.to_string()))),
                });
            }
            Reply::Deliver(tx, r) => {
                let _ = tx.send(match written {
                    Ok(()) => r,
                    Err(e) => r.and(Err(DeliverError::Retry(e.to_string()))),
                });
            }
        }
    }
}

/// What one group of commands changed, written in one batch.
#[derive(Default)]
struct Group {
    batch: Batch,
    staged: Vec<wire::Staged>,
    publish: Vec<JobRequest>,
    /// Workflows whose head changed (live ones, or finished in this group).
    changed: BTreeSet<Uuid>,
    /// Their steps that changed.
    changed_steps: BTreeSet<(Uuid, usize)>,
    /// Their values that were set, changed or removed.
    changed_values: BTreeSet<(Uuid, records::ValueKey)>,
    finished: HashMap<Uuid, Workflow>,
    /// Message ids applied in this group (not yet visible in the store).
    applied: HashSet<Uuid>,
    replies: Vec<Reply>,
}

/// What the service knows of the agents, for the machine.
#[derive(Default)]
struct AgentBook {
    /// Agents that answered requests, and when they last did.
    answered: HashMap<String, u64>,
    /// Live jobs this manager placed on each agent.
    jobs: HashMap<String, u32>,
    /// Silence after which an agent no longer counts as known (the lease).
    quiet_ms: u64,
}

struct PeerView<'a> {
    book: &'a AgentBook,
    wire: &'a dyn wire::Wire,
}

impl Peers for PeerView<'_> {
    fn last_heard_ms(&self, agent: &str) -> Option<u64> {
        self.wire.last_heard_ms(agent)
    }
    fn known_agents(&self) -> usize {
        // Agents that answered lately and have not gone quiet: a stopped
        // agent must not hold every request for the whole offer window.
        let now = caroni_types::now_ms();
        self.book
            .answered
            .keys()
            .filter(|a| {
                self.wire
                    .last_heard_ms(a)
                    .is_none_or(|t| now.saturating_sub(t) < self.book.quiet_ms)
            })
            .count()
    }
    fn live_jobs(&self, agent: &str) -> u32 {
        self.book.jobs.get(agent).copied().unwrap_or(0)
    }
}

/// The manager service.
pub struct Service {
    opts: Options,
    store: Store,
    wire: Arc<dyn wire::Wire>,
    rx: mpsc::Receiver<Cmd>,
    events: broadcast::Sender<Change>,
    stats: Arc<Stats>,
    live: HashMap<Uuid, Workflow>,
    by_request: HashMap<Uuid, Uuid>,
    by_job: HashMap<Uuid, Uuid>,
    /// When each live step had all its inputs (ms), for the step latency
    /// histogram; kept in memory only.
    ready_at: HashMap<(Uuid, usize), u64>,
    /// Workflows waiting in `created` for admission, oldest first.
    waiting: VecDeque<Uuid>,
    /// Waiting workflows whose values are on disk only (their copy here
    /// holds none), read back when admitted: memory does not grow with
    /// the values of workflows that wait.
    shelved: HashSet<Uuid>,
    /// Requests out now (state `fulfilling`) over all live workflows.
    open_requests: usize,
    /// Next timer of each live workflow, and the same ordered by time.
    deadline_of: HashMap<Uuid, u64>,
    deadlines: BTreeSet<(u64, Uuid)>,
    agents: AgentBook,
    /// Parsed templates by name, with the version they were parsed from.
    parsed: HashMap<String, (u64, Arc<caroni_cwl::Workflow>)>,
    /// A failed write left the state in memory unreliable and reloading
    /// it failed too.
    stale: bool,
}

/// Values held by a waiting workflow above which they wait on disk only.
const SHELVE_BYTES: usize = 64 * 1024;

fn open_requests(wf: &Workflow) -> usize {
    wf.steps
        .iter()
        .filter(|s| {
            s.request
                .as_ref()
                .is_some_and(|r| r.state == RequestState::Fulfilling)
        })
        .count()
}

impl Service {
    /// Loads live workflows from storage.
    pub fn new(
        opts: Options,
        store: Store,
        wire: Arc<dyn wire::Wire>,
    ) -> Result<(Self, Handle), Error> {
        let (tx, rx) = mpsc::channel(GROUP);
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Stats::default());
        let quiet_ms = opts.lease.as_millis() as u64;
        let mut s = Self {
            opts,
            store: store.clone(),
            wire,
            rx,
            events: events.clone(),
            stats: stats.clone(),
            live: HashMap::new(),
            by_request: HashMap::new(),
            by_job: HashMap::new(),
            ready_at: HashMap::new(),
            waiting: VecDeque::new(),
            shelved: HashSet::new(),
            open_requests: 0,
            deadline_of: HashMap::new(),
            deadlines: BTreeSet::new(),
            agents: AgentBook {
                quiet_ms,
                ..AgentBook::default()
            },
            parsed: HashMap::new(),
            stale: false,
        };
        let n = records::migrate(&store)?;
        if n > 0 {
            tracing::info!(
                workflows = n,
                "converted workflow records to the head + step layout"
            );
        }
        s.load()?;
        Ok((
            s,
            Handle {
                tx,
                store,
                events,
                stats,
            },
        ))
    }

    /// (Re)reads every live workflow from disk.
    /// Reloads the live state after a failed write. Until that succeeds
    /// the state in memory is not to be trusted: [`Service::run`] takes no
    /// command and fires no timer, and tries again after a back-off.
    fn reload(&mut self) {
        match self.load() {
            Ok(()) => self.stale = false,
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the manager's state; will try again");
                self.stale = true;
            }
        }
    }

    fn load(&mut self) -> Result<(), Error> {
        self.live.clear();
        self.by_request.clear();
        self.by_job.clear();
        self.waiting.clear();
        self.shelved.clear();
        self.open_requests = 0;
        self.deadline_of.clear();
        self.deadlines.clear();
        self.agents.jobs.clear();
        for wf in records::live(&self.store)? {
            let id = wf.id;
            if wf.state == WorkflowState::Created {
                self.waiting.push_back(id);
            }
            self.insert_live(wf);
            self.shelve(&id);
        }
        Ok(())
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
    fn unshelve(&mut self, id: &Uuid) -> bool {
        if !self.shelved.contains(id) {
            return true;
        }
        match records::get(&self.store, id) {
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

    fn insert_live(&mut self, wf: Workflow) {
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
            *self.agents.jobs.entry(a.agent.clone()).or_default() += 1;
        }
        self.open_requests += open_requests(&wf);
        self.set_deadline(&wf);
        self.live.insert(wf.id, wf);
    }

    /// Takes a workflow out of the live set (and its indexes) to change it.
    fn take_live(&mut self, id: Uuid) -> Option<Workflow> {
        let wf = self.live.remove(&id)?;
        for (_, a) in wf.live_jobs() {
            if let Some(n) = self.agents.jobs.get_mut(&a.agent) {
                *n = n.saturating_sub(1);
            }
        }
        self.open_requests = self.open_requests.saturating_sub(open_requests(&wf));
        if let Some(d) = self.deadline_of.remove(&id) {
            self.deadlines.remove(&(d, id));
        }
        Some(wf)
    }

    fn set_deadline(&mut self, wf: &Workflow) {
        if let Some(d) = self.deadline_of.remove(&wf.id) {
            self.deadlines.remove(&(d, wf.id));
        }
        let view = PeerView {
            book: &self.agents,
            wire: self.wire.as_ref(),
        };
        if let Some(d) = wf.next_deadline(self.opts.lease.as_millis() as u64, &view) {
            self.deadline_of.insert(wf.id, d);
            self.deadlines.insert((d, wf.id));
        }
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        if !self.live.is_empty() {
            tracing::info!(workflows = self.live.len(), "resuming live workflows");
        }
        let mut g = Group::default();
        self.admit(&mut g);
        self.flush(g).await;
        let mut backoff = caroni_store::wire::Backoff::default();
        loop {
            if self.stale {
                self.reload();
                if self.stale {
                    // Answer at once meanwhile: nobody waits on a disk.
                    let until = tokio::time::Instant::now() + backoff.delay(false);
                    let why = format!(
                        "{STALE} ({})",
                        self.store
                            .health()
                            .borrow()
                            .as_deref()
                            .unwrap_or("unknown error")
                    );
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep_until(until) => break,
                            Some(cmd) = self.rx.recv() => cmd.refuse(&why),
                        }
                    }
                    continue;
                }
            }
            let sleep = match self.deadlines.first() {
                Some((at, _)) => Duration::from_millis(at.saturating_sub(caroni_types::now_ms())),
                None => Duration::from_secs(3600),
            };
            let mut g = Group::default();
            tokio::select! {
                _ = cancel.cancelled() => return,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => {
                        self.apply(cmd, &mut g);
                        while g.replies.len() < GROUP {
                            match self.rx.try_recv() {
                                Ok(cmd) => self.apply(cmd, &mut g),
                                Err(_) => break,
                            }
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep(sleep) => {}
            }
            self.tick(&mut g);
            self.admit(&mut g);
            let ok = self.flush(g).await;
            // Storage fails: wait before the next try instead of spinning
            // on the same due timers.
            if !backoff.after(ok, &cancel).await {
                return;
            }
        }
    }

    fn apply(&mut self, cmd: Cmd, g: &mut Group) {
        match cmd {
            Cmd::Run(t, inputs, reply) => {
                let r = self.start(&t, inputs, g);
                g.replies.push(Reply::Run(reply, r));
            }
            Cmd::Cancel(id, reply) => {
                let r = self.cancel(id, g);
                g.replies.push(Reply::Cancel(reply, r));
            }
            Cmd::Deliver(msg, reply) => {
                let r = self.deliver(*msg, g);
                g.replies.push(Reply::Deliver(reply, r));
            }
        }
    }

    /// Runs `f` on a live workflow with a context, then puts it back
    /// (or records it as finished) and collects its effects.
    fn change<R>(
        &mut self,
        id: Uuid,
        g: &mut Group,
        f: impl FnOnce(&mut Workflow, &mut Ctx<'_>) -> R,
    ) -> Option<(R, bool)> {
        let mut wf = self.take_live(id)?;
        let before = wf.clone();
        let mut gen = Uuid::now_v7;
        let view = PeerView {
            book: &self.agents,
            wire: self.wire.as_ref(),
        };
        let r = {
            let mut ctx = Ctx {
                now_ms: caroni_types::now_ms(),
                lease_ms: self.opts.lease.as_millis() as u64,
                request_ttl_ms: self.opts.request_ttl.as_millis() as u64,
                endpoint: &self.opts.endpoint,
                new_id: &mut gen,
                offer_window_ms: self.opts.offer_window.as_millis() as u64,
                peers: &view,
            };
            f(&mut wf, &mut ctx)
        };
        // What must be written: the head, the steps and the values whose
        // records changed (a re-publication alone changes none).
        let values = records::changed_values(&before, &wf);
        let head = !records::same_head(&before, &wf);
        let mut steps = false;
        let now = caroni_types::now_ms();
        for (n, (a, b)) in before.steps.iter().zip(&wf.steps).enumerate() {
            if records::same_step(a, b) {
                continue;
            }
            steps = true;
            g.changed_steps.insert((id, n));
            if b.state == StepState::Completed && a.state != StepState::Completed {
                if let Some(ready) = self.ready_at.remove(&(id, n)) {
                    caroni_store::metrics::METRICS
                        .step_seconds
                        .observe(now.saturating_sub(ready) as f64 / 1000.0);
                }
            } else if b.state != StepState::Completed
                && b.inputs.iter().all(|i| b.values.contains_key(&i.name))
            {
                self.ready_at.entry((id, n)).or_insert(now);
            }
        }
        let changed = head || steps || !values.is_empty();
        g.changed_values.extend(values.into_iter().map(|v| (id, v)));
        self.put_back(wf, changed, g);
        Some((r, changed))
    }

    fn put_back(&mut self, wf: Workflow, changed: bool, g: &mut Group) {
        let id = wf.id;
        if changed {
            g.changed.insert(id);
        }
        if wf.state.is_final() {
            self.shelved.remove(&id);
            tracing::info!(workflow = %id, state = wf.state.as_str(), reason = %wf.message, "workflow finished");
            for n in 0..wf.steps.len() {
                self.ready_at.remove(&(id, n));
            }
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
            g.finished.insert(id, wf);
        } else {
            self.insert_live(wf);
        }
    }

    /// Stages the messages of workflow `id`'s change (traced with its id)
    /// and collects its publications.
    fn effects(&self, id: Uuid, fx: Vec<Effect>, g: &mut Group) -> Result<(), String> {
        for e in fx {
            match e {
                Effect::Send(out) => {
                    g.staged
                        .push(self.wire.stage(&mut g.batch, &out, Some(id))?)
                }
                Effect::Publish(req) => g.publish.push(req),
            }
        }
        Ok(())
    }

    /// The parsed template, parsed once per version.
    fn template(&mut self, name: &str) -> Result<Arc<caroni_cwl::Workflow>, Error> {
        let record = templates::get(&self.store, name)?;
        if let Some((at, wf)) = self.parsed.get(name) {
            if *at == record.updated_at_ms {
                return Ok(wf.clone());
            }
        }
        let wf = Arc::new(record.workflow()?);
        self.parsed
            .insert(name.to_string(), (record.updated_at_ms, wf.clone()));
        Ok(wf)
    }

    fn start(
        &mut self,
        template: &str,
        inputs: BTreeMap<String, String>,
        g: &mut Group,
    ) -> Result<Uuid, Error> {
        let parsed = self.template(template)?;
        let id = Uuid::now_v7();
        let wf = Workflow::create(id, template, &parsed, inputs, caroni_types::now_ms())
            .map_err(|e| Error::BadInput(e.to_string()))?;
        tracing::debug!(workflow = %id, template, "workflow created");
        g.changed.insert(id);
        g.changed_steps.extend((0..wf.steps.len()).map(|n| (id, n)));
        g.changed_values
            .extend(records::value_keys(&wf).into_iter().map(|v| (id, v)));
        self.waiting.push_back(id);
        self.insert_live(wf);
        Ok(id)
    }

    /// Starts waiting workflows, oldest first, while their requests fit.
    fn admit(&mut self, g: &mut Group) {
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
            if self.open_requests > 0
                && self.open_requests + wf.steps.len() > self.opts.max_open_requests
            {
                return;
            }
            if !self.unshelve(&id) {
                return;
            }
            self.waiting.pop_front();
            let fx = self.change(id, g, |wf, ctx| wf.start(ctx));
            if let Some((fx, _)) = fx {
                if let Err(e) = self.effects(id, fx, g) {
                    tracing::error!(error = %e, "cannot stage a workflow's messages");
                }
            }
        }
    }

    fn cancel(&mut self, id: Uuid, g: &mut Group) -> Result<(), Error> {
        if !self.live.contains_key(&id) {
            let wf = g.finished.get(&id).cloned().map(Ok).unwrap_or_else(|| {
                records::get(&self.store, &id)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "no workflow {id}; `caroni workflow list` shows them"
                    ))
                })
            })?;
            return Err(Error::Finished(format!(
                "workflow {id} is already {}; only a live workflow can be cancelled",
                wf.state.as_str()
            )));
        }
        let (fx, _) = self
            .change(id, g, |wf, ctx| wf.cancel(ctx, "cancelled by a user"))
            .ok_or_else(|| Error::NotFound(format!("no workflow {id}")))?;
        tracing::info!(workflow = %id, "workflow cancelled");
        self.effects(id, fx, g).map_err(Error::Unavailable)
    }

    /// Applies every due timer.
    fn tick(&mut self, g: &mut Group) {
        let now = caroni_types::now_ms();
        let due: Vec<Uuid> = self
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect();
        for id in due {
            if let Some((fx, _)) = self.change(id, g, |wf, ctx| wf.tick(ctx)) {
                if let Err(e) = self.effects(id, fx, g) {
                    tracing::error!(error = %e, "cannot stage a timer's messages");
                }
            }
        }
    }

    /// Stages `m` for the sender of `msg`, under the same trace.
    fn reply(&self, msg: &Inbound, m: Msg, g: &mut Group) -> Result<(), DeliverError> {
        let out = Outbound {
            to: msg.from.clone(),
            endpoint: msg.endpoint.clone(),
            msg: m,
        };
        let staged = self
            .wire
            .stage(&mut g.batch, &out, msg.trace)
            .map_err(DeliverError::Retry)?;
        g.staged.push(staged);
        Ok(())
    }

    fn deliver(&mut self, msg: Inbound, g: &mut Group) -> Result<(), DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        if g.applied.contains(&msg.id) {
            return Ok(());
        }
        match wire::is_applied(&self.store, &msg.id) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(DeliverError::Retry(e.to_string())),
        }
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
                self.wire.refused(&msg.from, &why);
                if !self.wire.knows(&msg.from) {
                    return Err(DeliverError::Refused(why));
                }
                // The agent lets go of its offer.
                let reject = Msg::Reject {
                    offer_id: *offer_id,
                    request_id: *request_id,
                };
                self.reply(&msg, reject, g)?;
                wire::mark_applied(&mut g.batch, &msg.id);
                g.applied.insert(msg.id);
                return Ok(());
            }
        }
        let key = match &msg.msg {
            Msg::Offer { request_id, .. } | Msg::Decline { request_id, .. } => {
                self.agents
                    .answered
                    .insert(msg.from.clone(), caroni_types::now_ms());
                self.by_request.get(request_id)
            }
            Msg::Accepted { job_id, .. }
            | Msg::Data {
                job_id,
                outputs: true,
                ..
            } => self.by_job.get(job_id),
            Msg::Status(s) => self.by_job.get(&s.job_id),
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
            // Not a live workflow of ours: tell the agent to let go.
            let reply = match &msg.msg {
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
            if reply.is_some() && !self.wire.knows(&msg.from) {
                // A stranger is answered in the ack, not at an address it
                // chose.
                return Err(DeliverError::Refused(format!(
                    "no live workflow of this manager has this {} (message {})",
                    msg.msg.name(),
                    msg.id
                )));
            }
            if let Some(m) = reply {
                self.reply(&msg, m, g)?;
            }
            wire::mark_applied(&mut g.batch, &msg.id);
            g.applied.insert(msg.id);
            return Ok(());
        };
        if let Msg::Status(s) = &msg.msg {
            if let Some(r) = records::RunsOn::reported(&s.executor, &s.external_id) {
                records::put_runs_on(&mut g.batch, &s.job_id, &r);
            }
        }
        let refused = |e: Refusal| DeliverError::Refused(e.0);
        let (fx, _) = self
            .change(id, g, |wf, ctx| -> Result<Vec<Effect>, DeliverError> {
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
                    Msg::Accepted { job_id, .. } => {
                        wf.on_accepted(ctx, &msg.from, *job_id).map_err(refused)?
                    }
                    Msg::Data { job_id, items, .. } => wf
                        .on_data(ctx, &msg.from, *job_id, items)
                        .map_err(refused)?,
                    Msg::Status(s) => wf.on_status(ctx, &msg.from, s).map_err(refused)?,
                    _ => Vec::new(),
                })
            })
            .ok_or_else(|| DeliverError::Retry("workflow vanished".into()))?;
        let fx = fx?;
        self.effects(id, fx, g).map_err(DeliverError::Retry)?;
        wire::mark_applied(&mut g.batch, &msg.id);
        g.applied.insert(msg.id);
        Ok(())
    }

    /// Writes the group in one synced batch; then answers, sends and
    /// publishes. On failure, answers "retry" and reloads from disk.
    /// Writes the group; false when the write failed (the state was
    /// reloaded from disk and every sender told to retry).
    async fn flush(&mut self, mut g: Group) -> bool {
        if g.changed.is_empty() && g.batch.is_empty() && g.replies.is_empty() {
            return true;
        }
        for id in &g.changed {
            if let Some(wf) = self.live.get(id).or_else(|| g.finished.get(id)) {
                records::put_head(&mut g.batch, wf);
            }
        }
        for (id, n) in &g.changed_steps {
            if let Some(wf) = self.live.get(id).or_else(|| g.finished.get(id)) {
                records::put_step(&mut g.batch, wf, *n);
            }
        }
        for (id, v) in &g.changed_values {
            if let Some(wf) = self.live.get(id).or_else(|| g.finished.get(id)) {
                records::put_value(&mut g.batch, wf, v);
            }
        }
        let written = if g.batch.is_empty() {
            Ok(())
        } else {
            self.store
                .write_blocking(std::mem::take(&mut g.batch))
                .await
        };
        let ok = written.is_ok();
        match written {
            Ok(()) => {
                for id in &g.changed {
                    self.shelve(id);
                }
                self.wire.notify(g.staged);
                if !g.publish.is_empty() {
                    self.wire.publish(g.publish);
                }
                for r in g.replies {
                    r.send(Ok(()));
                }
                for id in g.changed {
                    if let Some(wf) = self.live.get(&id).or_else(|| g.finished.get(&id)) {
                        let _ = self.events.send(Change {
                            id,
                            state: wf.state,
                            created_at_ms: wf.created_at_ms,
                            finished_at_ms: wf.finished_at_ms,
                        });
                    }
                }
                for wf in g.finished.values() {
                    if let Some(end) = wf.finished_at_ms {
                        caroni_store::metrics::METRICS
                            .workflow_seconds
                            .get_or_create(&caroni_store::metrics::label(
                                "state",
                                wf.state.as_str(),
                            ))
                            .observe(end.saturating_sub(wf.created_at_ms) as f64 / 1000.0);
                    }
                    match wf.state {
                        WorkflowState::Completed => &self.stats.completed,
                        _ => &self.stats.failed,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let e = format!("cannot write the manager's state: {e}");
                tracing::error!(error = %e, "group not written; reloading from disk");
                for r in g.replies {
                    r.send(Err(&e));
                }
                self.reload();
            }
        }
        self.stats
            .live
            .store(self.live.len() as u64, Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        // Forget agents that stopped answering long ago.
        let horizon = caroni_types::now_ms().saturating_sub(AGENT_MEMORY_MS);
        if self.agents.answered.values().any(|t| *t < horizon) {
            self.agents.answered.retain(|_, t| *t >= horizon);
        }
        ok
    }
}
