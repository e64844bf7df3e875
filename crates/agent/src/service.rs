//! The agent service: the [`Agent`] machine driven by the shared commit
//! driver ([`caroni_engine::driver`]), with what it decides persisted and
//! performed. Each group's jobs, offers and messages are written in one
//! synced batch; runs the machine starts are spawned just before that
//! write (a job's process starts before its `running` state is written: if
//! the agent dies first, the job re-runs after the restart, as for any
//! job that was running; see ARCHITECTURE.md, Guarantees), runs it stops
//! are cancelled; once written, the messages are announced and the
//! senders answered. A failed write answers "retry", reloads from disk,
//! and applies the results of runs that ended meanwhile again.
//!
//! Gossip requests are taken with `try_send`: when the agent is busy a
//! request is dropped, not queued (the manager re-publishes it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use caroni_engine::{driver, Staged, Wire};
use caroni_store::{applied, keys::Key, ledger, Batch, Store};
use caroni_types::msg::{Inbound, JobRequest, Msg};
use caroni_types::{ExecutorSpec, JobTypeDef};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::engine::{Agent, Input, Now, Out, World};
pub use crate::engine::{Delivered, JobChange, Options};
use crate::executor::{Execution, Executor, RunSpec};
use crate::job_types;
use crate::machine::{Job, Offer, RunResult};
use crate::records::{
    EXECUTIONS, JOBS, OFFERS, REQUEST_NEEDS, REQUEST_PRICES, REQUEST_PRIORITIES, REQUEST_WORKFLOWS,
};

/// Most commands applied in one batch.
pub use caroni_engine::GROUP;

/// Why a message was not applied (one type across the crates).
pub use caroni_types::delivery::DeliverError;

type DeliverReply = oneshot::Sender<Result<Delivered, DeliverError>>;

/// A command for the service (built by [`Handle`] and by ended runs).
pub enum Cmd {
    /// Apply a peer's message.
    Deliver(Box<Inbound>, DeliverReply),
    /// A request heard on gossip: its signer, the endpoint the signer
    /// gave, the request.
    Gossip(String, String, Box<JobRequest>),
    /// A run ended.
    Finished(Uuid, RunResult),
    /// A job type was put or deleted.
    JobTypesChanged,
}

const STOPPED: &str = "agent shutting down";

/// Counters of the agent since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Job runs that ended completed.
    pub completed: AtomicU64,
    /// Job runs that ended failed.
    pub failed: AtomicU64,
    /// Jobs cancelled by their manager.
    pub cancelled: AtomicU64,
}

/// A cheap handle to the agent service.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    store: Store,
    stats: Arc<Stats>,
    events: tokio::sync::broadcast::Sender<JobChange>,
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
            .send(Cmd::Deliver(Box::new(msg), tx))
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

    /// A request heard on gossip from manager `from`, which signed it
    /// giving `endpoint` as its own (checked against the request's reply
    /// endpoint). Dropped when the agent is busy (returns false): requests
    /// are re-published.
    pub fn gossip(&self, from: String, endpoint: String, req: JobRequest) -> bool {
        self.tx
            .try_send(Cmd::Gossip(from, endpoint, Box::new(req)))
            .is_ok()
    }

    /// A job type was put or deleted, or a peer joined the gossip: the
    /// agent advertises soon (at most every 200 ms). Dropped when the agent
    /// is busy (the periodic advert says it).
    pub fn job_types_changed(&self) {
        let _ = self.tx.try_send(Cmd::JobTypesChanged);
    }

    /// Jobs, newest first, at most `limit`. Job ids are UUID v7 chosen by
    /// the managers, so key order is creation order (across managers, as
    /// far as their clocks agree) and only `limit` records are read.
    pub fn list_jobs(&self, limit: usize) -> caroni_store::Result<Vec<Job>> {
        self.store.scan_last(JOBS, limit)
    }

    /// A page of jobs, newest first, that `keep` takes, from before
    /// `after`; and where the next page starts when more may match.
    pub fn list_jobs_page(
        &self,
        limit: usize,
        after: Option<Uuid>,
        keep: &dyn Fn(&Job) -> bool,
    ) -> caroni_store::Result<(Vec<Job>, Option<Uuid>)> {
        crate::records::jobs_page(&self.store, limit, after, keep)
    }

    /// Deletes jobs that ended more than `retention` ago (at most 1,000 a
    /// call); returns how many.
    pub async fn sweep(&self, retention: std::time::Duration) -> caroni_store::Result<usize> {
        let store = self.store.clone();
        let cut = caroni_types::now_ms().saturating_sub(retention.as_millis() as u64);
        tokio::task::spawn_blocking(move || crate::records::delete_ended(&store, cut))
            .await
            .map_err(|e| caroni_store::Error::Unavailable(e.to_string()))?
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
        workflow_of(&self.store, &job.request_id)
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

/// What one group decided, and what it staged.
#[derive(Default)]
pub struct Group {
    out: Out,
    replies: Vec<(DeliverReply, Result<Delivered, DeliverError>)>,
    staged: Vec<Staged>,
}

/// The store, the transport and the executors, as the machine reads them.
struct NodeWorld<'a, E> {
    store: &'a Store,
    wire: &'a dyn Wire,
    executor: &'a E,
    receipts: &'a HashMap<String, ManagerReceipts>,
}

/// One manager's receipts here that count against `--dispute-limit`.
#[derive(Debug, Default)]
struct ManagerReceipts {
    /// Disputed.
    disputed: u64,
    /// Not answered yet: job → when the receipt was issued.
    open: HashMap<Uuid, u64>,
}

impl<E: Executor> World for NodeWorld<'_, E> {
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
        applied::is_applied(self.store, id)
    }
    fn job_type(&self, name: &str) -> caroni_store::Result<Option<(JobTypeDef, ExecutorSpec)>> {
        let Some(def) = job_types::find(self.store, name)? else {
            return Ok(None);
        };
        let executor = job_types::executor_of(self.store, name)?;
        Ok(Some((def, executor)))
    }
    fn price(&self, job_type: &str) -> caroni_types::market::Price {
        crate::job_types::price_of(self.store, job_type).unwrap_or_default()
    }
    fn receipts_standing(&self, manager: &str, now_ms: u64) -> (u64, u64) {
        self.receipts.get(manager).map_or((0, 0), |r| {
            let overdue = r
                .open
                .values()
                .filter(|t| now_ms.saturating_sub(**t) > crate::engine::RECEIPT_ANSWER_MS)
                .count() as u64;
            (r.disputed, overdue)
        })
    }
    fn priority(&self, request: &Uuid) -> i32 {
        self.store
            .get(REQUEST_PRIORITIES, &Key::new().uuid(request).finish())
            .ok()
            .flatten()
            .unwrap_or(0)
    }
    fn offer_price(&self, request: &Uuid) -> Option<(caroni_types::market::Price, u64)> {
        self.store
            .get(REQUEST_PRICES, &Key::new().uuid(request).finish())
            .ok()
            .flatten()
    }
    fn needs(&self, request: &Uuid) -> Option<caroni_types::market::Needs> {
        self.store
            .get(REQUEST_NEEDS, &Key::new().uuid(request).finish())
            .ok()
            .flatten()
    }
    fn job_types(&self) -> caroni_store::Result<Vec<JobTypeDef>> {
        Ok(self
            .store
            .scan(crate::job_types::JOB_TYPES, &[])?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }
    fn offer(&self, request_id: &Uuid) -> caroni_store::Result<Option<Offer>> {
        self.store
            .get(OFFERS, &Key::new().uuid(request_id).finish())
    }
    fn job(&self, id: &Uuid) -> caroni_store::Result<Option<Job>> {
        self.store.get(JOBS, &Key::new().uuid(id).finish())
    }
    fn execution(&self, job: &Uuid) -> Option<Execution> {
        self.store
            .get(EXECUTIONS, &Key::new().uuid(job).finish())
            .ok()
            .flatten()
    }
    fn workflow_of(&self, request: &Uuid) -> Option<Uuid> {
        workflow_of(self.store, request)
    }
    fn unavailable(&self, executor: &ExecutorSpec) -> Option<String> {
        self.executor.unavailable(executor)
    }
    fn external_id(&self, spec: &RunSpec) -> String {
        self.executor.external_id(spec)
    }
    fn knows(&self, node: &str) -> bool {
        self.wire.knows(node)
    }
}

/// The agent service.
pub struct Service<E> {
    machine: Agent,
    node_id: String,
    store: Store,
    wire: Arc<dyn Wire>,
    executor: Arc<E>,
    tx: mpsc::Sender<Cmd>,
    rx: Option<mpsc::Receiver<Cmd>>,
    /// The processes of running jobs.
    tokens: HashMap<Uuid, CancellationToken>,
    stats: Arc<Stats>,
    events: tokio::sync::broadcast::Sender<JobChange>,
    /// Results of runs whose end could not be written yet.
    retry_results: Vec<(Uuid, RunResult)>,
    /// Each manager's disputed and unanswered receipts (from the ledger).
    receipts: HashMap<String, ManagerReceipts>,
}

impl<E: Executor> Service<E> {
    /// Loads live records from storage.
    pub fn new(
        opts: Options,
        store: Store,
        wire: Arc<dyn Wire>,
        executor: E,
    ) -> caroni_store::Result<(Self, Handle)> {
        let (tx, rx) = mpsc::channel(GROUP);
        let stats = Arc::new(Stats::default());
        let (events, _) = tokio::sync::broadcast::channel(4096);
        let handle = Handle {
            tx: tx.clone(),
            store: store.clone(),
            stats: stats.clone(),
            events: events.clone(),
        };
        let mut s = Self {
            node_id: opts.node_id.clone(),
            machine: Agent::new(opts),
            store,
            wire,
            executor: Arc::new(executor),
            tx,
            rx: Some(rx),
            tokens: HashMap::new(),
            stats,
            events,
            retry_results: Vec::new(),
            receipts: HashMap::new(),
        };
        s.load()?;
        Ok((s, handle))
    }

    fn load(&mut self) -> caroni_store::Result<()> {
        let n = crate::records::migrate(&self.store)?;
        if n > 0 {
            tracing::info!(jobs = n, "converted jobs of an earlier layout");
        }
        let offers = self
            .store
            .scan(OFFERS, &[])?
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        let jobs = self
            .store
            .scan(JOBS, &[])?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        self.machine.load(offers, jobs, caroni_types::now_ms());
        self.receipts.clear();
        for (job, r) in ledger::jobs(&self.store, caroni_types::ledger::Role::Agent)? {
            let m = self.receipts.entry(r.peer).or_default();
            match r.standing {
                caroni_types::ledger::Standing::Open => {
                    m.open.insert(job, r.at_ms);
                }
                caroni_types::ledger::Standing::Disputed => m.disputed += 1,
                caroni_types::ledger::Standing::Agreed => {}
            }
        }
        Ok(())
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let Some(rx) = self.rx.take() else {
            return;
        };
        let store = self.store.clone();
        driver::run(self, rx, store, cancel, "agent").await;
    }

    fn input(&mut self, input: Input, g: &mut Group) -> Result<Delivered, DeliverError> {
        self.step(|a, now, world| a.handle(input, now, world, &mut g.out))
    }

    /// Runs `f` on the machine with the clock and the node's world.
    fn step<R>(&mut self, f: impl FnOnce(&mut Agent, &mut Now<'_>, &dyn World) -> R) -> R {
        let Self {
            machine,
            store,
            wire,
            executor,
            receipts,
            ..
        } = self;
        let world = NodeWorld {
            store,
            wire: wire.as_ref(),
            executor: executor.as_ref(),
            receipts,
        };
        caroni_types::wall_clock(Uuid::new_v4, |now| f(machine, now, &world))
    }

    /// Spawns a run the machine started.
    fn spawn(&mut self, spec: RunSpec, workflow: Option<Uuid>) {
        let id = spec.job_id;
        let token = CancellationToken::new();
        self.tokens.insert(id, token.clone());
        let exec = self.executor.clone();
        let done = self.tx.clone();
        let span = tracing::info_span!(
            "job",
            node = %self.node_id,
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
                let _ = done.send(Cmd::Finished(id, result)).await;
            }
            .instrument(span),
        );
    }
}

impl<E: Executor> driver::Engine for Service<E> {
    type Cmd = Cmd;
    type Group = Group;

    fn apply(&mut self, cmd: Cmd, g: &mut Group) {
        match cmd {
            Cmd::Deliver(msg, reply) => {
                let r = self.input(Input::Deliver(*msg), g);
                g.replies.push((reply, r));
            }
            Cmd::Gossip(from, endpoint, req) => {
                let _ = self.input(
                    Input::Gossip {
                        from,
                        endpoint,
                        req: *req,
                    },
                    g,
                );
            }
            Cmd::Finished(id, result) => {
                self.tokens.remove(&id);
                let _ = self.input(Input::Finished(id, result), g);
            }
            Cmd::JobTypesChanged => {
                let _ = self.input(Input::JobTypesChanged, g);
            }
        }
    }

    fn settle(&mut self, g: &mut Group) {
        // Runs that ended while the state could not be written.
        for (id, result) in std::mem::take(&mut self.retry_results) {
            let _ = self.input(Input::Finished(id, result), g);
        }
        self.step(|a, now, world| a.settle(now, world, &mut g.out));
    }

    fn seal(&mut self, g: &mut Group) -> Batch {
        let mut batch = Batch::default();
        let out = &mut g.out;
        for (id, job) in &out.jobs {
            batch.put(JOBS, &Key::new().uuid(id).finish(), job);
        }
        for r in &out.forget_offers {
            batch.delete(OFFERS, &Key::new().uuid(r).finish());
        }
        for o in &out.offers {
            batch.put(OFFERS, &Key::new().uuid(&o.request_id).finish(), o);
        }
        for (r, w) in &out.request_workflows {
            batch.put(REQUEST_WORKFLOWS, &Key::new().uuid(r).finish(), w);
        }
        for (r, n) in &out.request_needs {
            batch.put(REQUEST_NEEDS, &Key::new().uuid(r).finish(), n);
        }
        for (r, p) in &out.request_priorities {
            batch.put(REQUEST_PRIORITIES, &Key::new().uuid(r).finish(), p);
        }
        for (r, p) in &out.request_prices {
            batch.put(REQUEST_PRICES, &Key::new().uuid(r).finish(), p);
        }
        for (id, x) in &out.executions {
            batch.put(EXECUTIONS, &Key::new().uuid(id).finish(), x);
        }
        if let Err(e) = self.ledger(&mut batch, out) {
            tracing::error!(error = %e, "cannot read the ledger; receipts and verdicts of this group wait");
        }
        for (o, trace) in out.send.iter().flatten() {
            match self.wire.stage(&mut batch, o, *trace) {
                Ok(s) => g.staged.push(s),
                Err(e) => tracing::error!(error = %e, to = %o.to, "cannot stage a message"),
            }
        }
        for id in &out.applied {
            applied::mark_applied(&mut batch, id);
        }
        // Runs start before their `running` state is written and stop at
        // once (this is the blocking thread of the group: the runtime is
        // at hand to spawn on).
        for id in std::mem::take(&mut out.stop) {
            if let Some(t) = self.tokens.remove(&id) {
                t.cancel();
            }
        }
        for s in std::mem::take(&mut out.start) {
            self.spawn(s.spec, s.workflow);
        }
        batch
    }

    fn written(&mut self, g: Group) {
        self.wire.notify(g.staged);
        if let Some(a) = g.out.advert.clone() {
            self.wire.advertise(a);
        }
        for (peer, why) in &g.out.refused {
            self.wire.refused(peer, why);
        }
        for (peer, why) in &g.out.dropped {
            self.wire.dropped(peer, why);
        }
        for (tx, r) in g.replies {
            let _ = tx.send(r);
        }
        for c in g.out.changed {
            let _ = self.events.send(c);
        }
        let m = &caroni_metrics::METRICS;
        let label = |k, v| caroni_metrics::label(k, v);
        if g.out.offers_made > 0 {
            m.offers
                .get_or_create(&label("outcome", "made"))
                .inc_by(g.out.offers_made);
        }
        if g.out.declines > 0 {
            m.offers
                .get_or_create(&label("outcome", "declined"))
                .inc_by(g.out.declines);
        }
        for f in &g.out.failures {
            m.job_failures
                .get_or_create(&label("reason", f.as_str()))
                .inc();
        }
        self.stats
            .completed
            .fetch_add(g.out.completed, Ordering::Relaxed);
        self.stats
            .failed
            .fetch_add(g.out.failures.len() as u64, Ordering::Relaxed);
        self.stats
            .cancelled
            .fetch_add(g.out.cancelled, Ordering::Relaxed);
    }

    fn failed(&mut self, g: Group, why: &str) {
        for (tx, r) in g.replies {
            let _ = tx.send(r.and(Err(DeliverError::Retry(why.to_string()))));
        }
        self.retry_results.extend(g.out.results);
    }

    fn reload(&mut self) -> caroni_store::Result<()> {
        self.load()
    }

    fn refuse(&mut self, cmd: Cmd, why: &str) {
        match cmd {
            Cmd::Deliver(_, reply) => {
                let _ = reply.send(Err(DeliverError::Retry(why.to_string())));
            }
            // Dropped like any gossip the agent cannot take now.
            Cmd::Gossip(..) => {}
            // Adverts go every few seconds anyway.
            Cmd::JobTypesChanged => {}
            // Kept, and applied once the state is back.
            Cmd::Finished(id, result) => {
                self.tokens.remove(&id);
                self.retry_results.push((id, result));
            }
        }
    }

    fn next_timer(&self) -> Option<u64> {
        self.machine.next_timer()
    }

    fn stop(&mut self) {
        for token in self.tokens.values() {
            token.cancel();
        }
    }
}

/// The workflow a request is for, as its manager said (kept per request).
fn workflow_of(store: &Store, request: &Uuid) -> Option<Uuid> {
    store
        .get(REQUEST_WORKFLOWS, &Key::new().uuid(request).finish())
        .ok()
        .flatten()
}

impl<E: Executor> Service<E> {
    /// Signs the receipts going out with final statuses and chains them;
    /// checks and chains the verdicts that came in (docs/market.md).
    fn ledger(&mut self, batch: &mut Batch, out: &mut Out) -> caroni_store::Result<()> {
        use caroni_types::ledger::{Record, Role, Standing};
        let has_receipts = out
            .send
            .iter()
            .flatten()
            .any(|(o, _)| matches!(&o.msg, Msg::Status(s) if s.receipt.is_some()));
        if !has_receipts && out.verdicts.is_empty() {
            return Ok(());
        }
        let now = caroni_types::now_ms();
        let mut chain = ledger::Appender::open(&self.store, Role::Agent)?;
        for (o, _) in out.send.iter_mut().flatten() {
            let Msg::Status(s) = &mut o.msg else {
                continue;
            };
            let Some(r) = s.receipt.as_mut() else {
                continue;
            };
            if chain.job(&self.store, &r.receipt.job_id)?.is_some() {
                // Issued once: a job's end is committed once.
                continue;
            }
            r.receipt.cpu_ms = crate::executor::bash::take_cpu_ms(&r.receipt.job_id);
            r.signature = self.wire.sign(&r.receipt.signed_bytes());
            let charge = r.receipt.charge_milli;
            chain.append(
                batch,
                &o.to,
                Record::Receipt((**r).clone()),
                charge,
                now,
                None,
            );
            self.receipts
                .entry(o.to.clone())
                .or_default()
                .open
                .insert(r.receipt.job_id, now);
        }
        for (manager, verdicts) in std::mem::take(&mut out.verdicts) {
            for v in verdicts {
                let Some(prior) = chain.job(&self.store, &v.job_id)? else {
                    tracing::warn!(job = %v.job_id, %manager, "a verdict on no receipt of this agent; ignored");
                    continue;
                };
                if prior.peer != manager || prior.standing != Standing::Open {
                    tracing::warn!(job = %v.job_id, %manager, "a verdict from another manager, or a second one; ignored");
                    continue;
                }
                let receipt = self
                    .store
                    .get(ledger::LEDGER, &ledger::entry_key(Role::Agent, prior.seq))?;
                let Some(Record::Receipt(receipt)) = receipt.map(|e| e.record) else {
                    continue;
                };
                if !self
                    .wire
                    .verify(&manager, &v.signed_bytes(&receipt), &v.signature)
                {
                    tracing::warn!(job = %v.job_id, %manager, "a verdict whose signature does not verify; ignored");
                    continue;
                }
                if !v.agreed {
                    tracing::warn!(job = %v.job_id, %manager, reason = %v.reason, "a receipt was disputed");
                }
                let charge = prior.charge_milli;
                let standing = self.receipts.entry(manager.clone()).or_default();
                standing.open.remove(&v.job_id);
                if !v.agreed {
                    standing.disputed += 1;
                }
                chain.append(
                    batch,
                    &manager,
                    Record::Verdict(v),
                    charge,
                    now,
                    Some(prior),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
