//! The manager service: the [`Manager`] machine driven by the shared
//! commit driver ([`caroni_engine::driver`]), with what it decides
//! persisted and performed: records and messages written in one synced
//! batch per group, then the senders answered, the messages announced,
//! the requests published and the watchers told.
//!
//! The service decides nothing: admission, routing, duplicates, the
//! allowlist and the timers are the machine's ([`crate::engine`]). It
//! backs the machine's [`World`] with the store and the transport, and
//! keeps the parsed templates (parsed once per version).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use caroni_engine::{driver, Wire};
use caroni_store::{applied, Batch, Store};
use caroni_types::msg::Inbound;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use crate::engine::Options;
use crate::engine::{Answer, Input, Manager, Now, Out, World};
use crate::model::{Workflow, WorkflowState};
use crate::{records, templates, Error};

/// Most commands applied in one batch.
pub use caroni_engine::GROUP;

/// Why a message was not applied (one type across the crates).
pub use caroni_types::delivery::DeliverError;

type DeliverReply = oneshot::Sender<Result<(), DeliverError>>;

/// A command for the service (built by [`Handle`]).
pub enum Cmd {
    /// Start a workflow.
    Run(Submission, oneshot::Sender<Result<(Uuid, bool), Error>>),
    /// Cancel a workflow.
    Cancel(Uuid, oneshot::Sender<Result<(), Error>>),
    /// Resume a failed or cancelled workflow.
    Resume(Uuid, oneshot::Sender<Result<(), Error>>),
    /// Delete ended workflows (and their elements' workflows); answers
    /// how many were deleted.
    Delete(Vec<Uuid>, oneshot::Sender<Result<u64, Error>>),
    /// Apply a peer's message.
    Deliver(Box<Inbound>, DeliverReply),
    /// An agent's advert heard on gossip: its signer, the endpoint the
    /// signer gave, the advert.
    Advert(String, String, Box<caroni_types::market::Advert>),
}

/// A workflow to start.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// The template's name.
    pub template: String,
    /// Its inputs.
    pub inputs: BTreeMap<String, String>,
    /// The client's id of this submission: the same id again returns the
    /// same workflow and creates nothing.
    pub request_id: Option<String>,
    /// Its priority, over the template's `CaroniPriority`.
    pub priority: Option<i32>,
    /// Its budget, over the template's `CaroniBudget`.
    pub budget: Option<caroni_types::market::Budget>,
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
    /// Workflows that were cancelled.
    pub cancelled: AtomicU64,
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
        self.submit_run(Submission {
            template,
            inputs,
            request_id: None,
            priority: None,
            budget: None,
        })
        .await
        .map(|(id, _)| id)
    }

    /// Starts a workflow; returns its id once it is durable, and true when
    /// the submission's request id named an earlier one (nothing new).
    pub async fn submit_run(&self, s: Submission) -> Result<(Uuid, bool), Error> {
        self.ask(|tx| Cmd::Run(s, tx)).await
    }

    /// Cancels a workflow.
    pub async fn cancel(&self, id: Uuid) -> Result<(), Error> {
        self.ask(|tx| Cmd::Cancel(id, tx)).await
    }

    /// Resumes a failed or cancelled workflow from its unfinished steps.
    pub async fn resume(&self, id: Uuid) -> Result<(), Error> {
        self.ask(|tx| Cmd::Resume(id, tx)).await
    }

    /// An agent's advert heard on gossip from `from`, which signed it
    /// giving `endpoint` as its own. Dropped when the manager is busy
    /// (returns false): adverts come again.
    pub fn advert(
        &self,
        from: String,
        endpoint: String,
        advert: caroni_types::market::Advert,
    ) -> bool {
        self.tx
            .try_send(Cmd::Advert(from, endpoint, Box::new(advert)))
            .is_ok()
    }

    /// Deletes ended workflows and everything kept of them; returns how
    /// many workflows (elements' included) were deleted.
    pub async fn delete(&self, ids: Vec<Uuid>) -> Result<u64, Error> {
        self.ask(|tx| Cmd::Delete(ids, tx)).await
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Cmd,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(cmd(tx))
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

    /// A page of workflows users started, newest first, filtered; and
    /// where the next page starts when more may match.
    pub fn list_page(
        &self,
        limit: usize,
        filter: &records::ListFilter,
    ) -> Result<(Vec<Workflow>, Option<Uuid>), Error> {
        Ok(records::list_page(&self.store, limit, filter)?)
    }

    /// Deletes workflows that ended more than `retention` ago (at most
    /// 1,000 a call) and forgets submissions older than
    /// `submission_retention`; returns how many workflows went.
    pub async fn sweep(
        &self,
        retention: std::time::Duration,
        submission_retention: std::time::Duration,
    ) -> Result<u64, Error> {
        let now = caroni_types::now_ms();
        let store = self.store.clone();
        let cut = now.saturating_sub(retention.as_millis() as u64);
        let forget = now.saturating_sub(submission_retention.as_millis() as u64);
        let ids = tokio::task::spawn_blocking(move || {
            records::forget_submissions(&store, forget)?;
            records::expired(&store, cut, 1000)
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))??;
        if ids.is_empty() {
            return Ok(0);
        }
        self.delete(ids).await
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

/// Who waits for a command's answer.
enum Pending {
    /// Nobody waits for an answer (an advert).
    Nobody,
    Run(oneshot::Sender<Result<(Uuid, bool), Error>>),
    Cancel(oneshot::Sender<Result<(), Error>>),
    Delete(oneshot::Sender<Result<u64, Error>>),
    Deliver(DeliverReply),
}

impl Cmd {
    fn split(self) -> (Pending, Option<Input>) {
        match self {
            Cmd::Run(_, tx) => (Pending::Run(tx), None),
            Cmd::Delete(_, tx) => (Pending::Delete(tx), None),
            Cmd::Cancel(id, tx) => (Pending::Cancel(tx), Some(Input::Cancel(id))),
            Cmd::Resume(id, tx) => (Pending::Cancel(tx), Some(Input::Resume(id))),
            Cmd::Deliver(msg, tx) => (Pending::Deliver(tx), Some(Input::Deliver(*msg))),
            Cmd::Advert(..) => (Pending::Nobody, None),
        }
    }
}

/// A command's answer, given once its group is written (a failed write
/// turns successes into "retry").
struct Reply(Pending, Answer);

impl Reply {
    fn send(self, written: Result<(), &str>) {
        let unavailable = |e: &str| Error::Unavailable(e.to_string());
        match self {
            Reply(Pending::Run(tx), Answer::Run(r)) => {
                let _ = tx.send(written.map_err(unavailable).and(r));
            }
            Reply(Pending::Cancel(tx), Answer::Cancel(r)) => {
                let _ = tx.send(written.map_err(unavailable).and(r));
            }
            Reply(Pending::Delete(tx), Answer::Delete(r)) => {
                let _ = tx.send(written.map_err(unavailable).and(r));
            }
            Reply(Pending::Deliver(tx), Answer::Deliver(r)) => {
                let _ = tx.send(
                    written
                        .map_err(|e| DeliverError::Retry(e.to_string()))
                        .and(r),
                );
            }
            Reply(p, _) => p.fail("the manager gave an answer of another kind (a bug)"),
        }
    }
}

impl Pending {
    /// Answers "not now" without applying.
    fn fail(self, why: &str) {
        match self {
            Pending::Nobody => {}
            Pending::Run(tx) => {
                let _ = tx.send(Err(Error::Unavailable(why.to_string())));
            }
            Pending::Cancel(tx) => {
                let _ = tx.send(Err(Error::Unavailable(why.to_string())));
            }
            Pending::Delete(tx) => {
                let _ = tx.send(Err(Error::Unavailable(why.to_string())));
            }
            Pending::Deliver(tx) => {
                let _ = tx.send(Err(DeliverError::Retry(why.to_string())));
            }
        }
    }
}

/// What one group decided, and what it staged.
#[derive(Default)]
pub struct Group {
    out: Out,
    replies: Vec<Reply>,
    staged: Vec<caroni_engine::Staged>,
}

/// The store and the transport, as the machine reads them.
struct NodeWorld<'a> {
    store: &'a Store,
    wire: &'a dyn Wire,
}

impl World for NodeWorld<'_> {
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
        applied::is_applied(self.store, id)
    }
    fn stored(&self, id: &Uuid) -> caroni_store::Result<Option<Workflow>> {
        records::get(self.store, id)
    }
    fn knows(&self, node: &str) -> bool {
        self.wire.knows(node)
    }
    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.wire.last_heard_ms(node)
    }
    fn holds_file(&self, file: &caroni_types::file::FileRef) -> bool {
        self.wire.holds_file(file)
    }
    fn read_head(&self, file: &caroni_types::file::FileRef, limit: usize) -> Option<Vec<u8>> {
        self.wire.read_head(file, limit)
    }
    fn submission(&self, request_id: &str) -> caroni_store::Result<Option<Uuid>> {
        records::submission(self.store, request_id)
    }
}

/// The manager service.
pub struct Service {
    machine: Manager,
    store: Store,
    wire: Arc<dyn Wire>,
    rx: Option<mpsc::Receiver<Cmd>>,
    events: broadcast::Sender<Change>,
    stats: Arc<Stats>,
    /// Parsed templates by name, with the version they were parsed from.
    parsed: HashMap<String, (u64, Arc<caroni_cwl::Workflow>)>,
}

impl Service {
    /// Loads live workflows from storage.
    pub fn new(opts: Options, store: Store, wire: Arc<dyn Wire>) -> Result<(Self, Handle), Error> {
        let (tx, rx) = mpsc::channel(GROUP);
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Stats::default());
        let n = records::migrate(&store)?;
        if n > 0 {
            tracing::info!(
                workflows = n,
                "converted workflow records to the head + step layout"
            );
        }
        let mut s = Self {
            machine: Manager::new(opts),
            store: store.clone(),
            wire,
            rx: Some(rx),
            events: events.clone(),
            stats: stats.clone(),
            parsed: HashMap::new(),
        };
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

    fn load(&mut self) -> caroni_store::Result<()> {
        let live = records::live(&self.store)?;
        let mut elements = Vec::new();
        for wf in live.iter().filter(|w| w.plan.is_some()) {
            elements.extend(records::elements(&self.store, wf)?);
        }
        let world = NodeWorld {
            store: &self.store,
            wire: self.wire.as_ref(),
        };
        self.machine
            .load_with(live, elements, &world, caroni_types::now_ms());
        Ok(())
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        if self.machine.live() > 0 {
            tracing::info!(workflows = self.machine.live(), "resuming live workflows");
        }
        let Some(rx) = self.rx.take() else {
            return;
        };
        let store = self.store.clone();
        driver::run(self, rx, store, cancel, "manager").await;
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

    /// Deletes ended workflows with their elements' workflows (refusing a
    /// live one); the records go in this group's batch.
    fn delete(&mut self, ids: &[Uuid], out: &mut Out) -> Result<u64, Error> {
        let mut all = Vec::new();
        for id in ids {
            if self
                .machine
                .workflow(id, out)
                .is_some_and(|w| !w.state.is_final())
            {
                return Err(Error::Finished(format!(
                    "workflow {id} has not ended; cancel it first (caroni workflow cancel {id})"
                )));
            }
            let family = records::family(&self.store, id)?;
            if family.is_empty() {
                return Err(Error::NotFound(format!(
                    "no workflow {id}; `caroni workflow list` shows them"
                )));
            }
            all.extend(family);
        }
        let n = all.len() as u64;
        out.deletes.extend(all);
        Ok(n)
    }

    /// Runs `f` on the machine with the clock and the node's world.
    fn step<R>(&mut self, f: impl FnOnce(&mut Manager, &mut Now<'_>, &dyn World) -> R) -> R {
        let Self {
            machine,
            store,
            wire,
            ..
        } = self;
        let world = NodeWorld {
            store,
            wire: wire.as_ref(),
        };
        caroni_types::wall_clock(Uuid::now_v7, |now| f(machine, now, &world))
    }

    fn stats_now(&self) {
        self.stats
            .live
            .store(self.machine.live() as u64, Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.machine.waiting() as u64, Ordering::Relaxed);
    }
}

impl driver::Engine for Service {
    type Cmd = Cmd;
    type Group = Group;

    fn apply(&mut self, cmd: Cmd, g: &mut Group) {
        let input = match cmd {
            Cmd::Run(s, tx) => match self.template(&s.template) {
                Ok(mut parsed) => {
                    // What the submission says over what the template says.
                    if s.priority.is_some() || s.budget.is_some() {
                        let mut p = (*parsed).clone();
                        p.priority = s.priority.unwrap_or(p.priority);
                        p.budget = s.budget.or(p.budget);
                        parsed = std::sync::Arc::new(p);
                    }
                    let input = Input::Run {
                        template: s.template,
                        parsed,
                        inputs: s.inputs,
                        request_id: s.request_id,
                    };
                    (Pending::Run(tx), Some(input))
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            },
            Cmd::Advert(from, endpoint, advert) => {
                let now = caroni_types::now_ms();
                if let Err(why) = self.machine.on_advert(&from, &endpoint, *advert, now) {
                    self.wire.dropped(&from, &format!("an advert: {why}"));
                }
                return;
            }
            Cmd::Delete(ids, tx) => {
                let answer = self.delete(&ids, &mut g.out);
                g.replies
                    .push(Reply(Pending::Delete(tx), Answer::Delete(answer)));
                return;
            }
            other => other.split(),
        };
        let (pending, Some(input)) = input else {
            return;
        };
        let answer = self.step(|m, now, world| m.handle(input, now, world, &mut g.out));
        g.replies.push(Reply(pending, answer));
    }

    fn settle(&mut self, g: &mut Group) {
        self.step(|m, now, world| m.settle(now, world, &mut g.out));
    }

    fn seal(&mut self, g: &mut Group) -> Batch {
        let mut batch = Batch::default();
        let out = &g.out;
        for id in &out.heads {
            if let Some(wf) = self.machine.workflow(id, out) {
                records::put_head(&mut batch, wf);
            }
        }
        for (id, n) in &out.steps {
            if let Some(wf) = self.machine.workflow(id, out) {
                records::put_step(&mut batch, wf, *n);
            }
        }
        for (id, v) in &out.values {
            if let Some(wf) = self.machine.workflow(id, out) {
                records::put_value(&mut batch, wf, v);
            }
        }
        for id in &out.created {
            if let Some(wf) = self.machine.workflow(id, out) {
                records::put_created(&mut batch, wf);
            }
        }
        for (id, n, k, outputs) in &out.elements {
            records::put_element(&mut batch, id, *n, *k, outputs);
        }
        for (job, r) in &out.runs_on {
            records::put_runs_on(&mut batch, job, r);
        }
        let now = caroni_types::now_ms();
        for (rid, id) in &out.submissions {
            records::put_submission(&mut batch, rid, id, now);
        }
        for id in &out.deletes {
            if let Err(e) = records::delete(&self.store, &mut batch, id) {
                tracing::error!(workflow = %id, error = %e, "cannot read a workflow's records to delete them");
            }
        }
        for (o, trace) in &out.send {
            match self.wire.stage(&mut batch, o, *trace) {
                Ok(s) => g.staged.push(s),
                Err(e) => tracing::error!(error = %e, to = %o.to, "cannot stage a message"),
            }
        }
        match self.ledger(&mut batch, &out.receipts, now) {
            Ok(verdicts) => {
                for o in verdicts {
                    match self.wire.stage(&mut batch, &o, None) {
                        Ok(s) => g.staged.push(s),
                        Err(e) => tracing::error!(error = %e, to = %o.to, "cannot stage verdicts"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the ledger; receipts of this group are not recorded")
            }
        }
        for id in &out.applied {
            applied::mark_applied(&mut batch, id);
        }
        batch
    }

    fn written(&mut self, g: Group) {
        let Group {
            mut out,
            replies,
            staged,
        } = g;
        self.machine.written(&out);
        self.wire.notify(staged);
        if !out.publish.is_empty() {
            self.wire.publish(std::mem::take(&mut out.publish));
        }
        for (peer, why) in &out.refused {
            self.wire.refused(peer, why);
        }
        for r in replies {
            r.send(Ok(()));
        }
        for id in &out.heads {
            if let Some(wf) = self.machine.workflow(id, &out) {
                let _ = self.events.send(Change {
                    id: *id,
                    state: wf.state,
                    created_at_ms: wf.created_at_ms,
                    finished_at_ms: wf.finished_at_ms,
                });
            }
        }
        let m = &caroni_metrics::METRICS;
        for s in out.step_seconds {
            m.step_seconds.observe(s);
        }
        for wf in out.finished.values() {
            if let Some(end) = wf.finished_at_ms {
                m.workflow_seconds
                    .get_or_create(&caroni_metrics::label("state", wf.state.as_str()))
                    .observe(end.saturating_sub(wf.created_at_ms) as f64 / 1000.0);
            }
            match wf.state {
                WorkflowState::Completed => &self.stats.completed,
                WorkflowState::Cancelled => &self.stats.cancelled,
                _ => &self.stats.failed,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        self.stats_now();
    }

    fn failed(&mut self, g: Group, why: &str) {
        for (peer, reason) in &g.out.refused {
            self.wire.refused(peer, reason);
        }
        for r in g.replies {
            r.send(Err(why));
        }
    }

    fn reload(&mut self) -> caroni_store::Result<()> {
        let r = self.load();
        self.stats_now();
        r
    }

    fn refuse(&mut self, cmd: Cmd, why: &str) {
        cmd.split().0.fail(why);
    }

    fn next_timer(&self) -> Option<u64> {
        self.machine.next_timer()
    }
}

impl Service {
    /// Chains the receipts received with this manager's verdicts, signed,
    /// and returns the verdicts to send: one message per agent.
    fn ledger(
        &self,
        batch: &mut Batch,
        receipts: &[crate::engine::ReceiptIn],
        now: u64,
    ) -> caroni_store::Result<Vec<caroni_types::msg::Outbound>> {
        use caroni_types::ledger::{Record, Role, Verdict};
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let mut chain = caroni_store::ledger::Appender::open(&self.store, Role::Manager)?;
        let mut by_agent: std::collections::BTreeMap<(String, String), Vec<Verdict>> =
            std::collections::BTreeMap::new();
        for r in receipts {
            let job = r.receipt.receipt.job_id;
            if chain.job(&self.store, &job)?.is_some() {
                continue; // already answered
            }
            let mut verdict = r.verdict.clone();
            if verdict.is_ok()
                && !self.wire.verify(
                    &r.agent,
                    &r.receipt.receipt.signed_bytes(),
                    &r.receipt.signature,
                )
            {
                verdict = Err("the receipt's signature is not its agent's".into());
            }
            let charge = r.receipt.receipt.charge_milli;
            chain.append(
                batch,
                &r.agent,
                Record::Receipt(r.receipt.clone()),
                charge,
                now,
                None,
            );
            let mut v = Verdict {
                job_id: job,
                agreed: verdict.is_ok(),
                reason: verdict.err().unwrap_or_default(),
                signature: Vec::new(),
            };
            if !v.agreed {
                tracing::warn!(%job, agent = %r.agent, reason = %v.reason, "disputed a receipt");
            }
            v.signature = self.wire.sign(&v.signed_bytes(&r.receipt));
            let prior = chain.job(&self.store, &job)?;
            chain.append(
                batch,
                &r.agent,
                Record::Verdict(v.clone()),
                charge,
                now,
                prior,
            );
            by_agent
                .entry((r.agent.clone(), r.endpoint.clone()))
                .or_default()
                .push(v);
        }
        Ok(by_agent
            .into_iter()
            .map(|((to, endpoint), vs)| caroni_types::msg::Outbound {
                to,
                endpoint,
                msg: caroni_types::msg::Msg::Verdicts(vs),
            })
            .collect())
    }
}
