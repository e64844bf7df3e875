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
use caroni_types::msg::{Inbound, JobRequest, Outbound};
use uuid::Uuid;

use crate::machine::{Effect, Peers};
use crate::market::{Choice, Directory};
use crate::model::{Parent, Value, Workflow, WorkflowState};
use crate::records::{RunsOn, ValueKey};
use crate::Error;

mod family;
mod lifecycle;
mod route;

/// How long an agent that answered requests counts as known.
const AGENT_MEMORY_MS: u64 = 10 * 60 * 1000;
/// Values held by a waiting workflow above which they wait on disk only.
const SHELVE_BYTES: usize = 64 * 1024;

/// Default lease on live jobs (s).
pub const DEFAULT_LEASE_SECONDS: u64 = 30;
/// Default lifetime of an unanswered request (s).
pub const DEFAULT_REQUEST_TTL_SECONDS: u64 = 600;
/// Default bound on requests out at once.
pub const DEFAULT_MAX_OPEN_REQUESTS: usize = 512;
/// Default offer window (ms).
pub const DEFAULT_OFFER_WINDOW_MS: u64 = 20;

/// The manager's options (the node composes them from its configuration,
/// whose defaults are the constants above).
#[derive(Debug, Clone)]
pub struct Options {
    /// This manager's node id (agents' adverts say which managers they
    /// serve).
    pub node_id: String,
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
    /// How long agents have to answer a request before it is shown as
    /// blocked (with the declines' reasons).
    pub answer_timeout: std::time::Duration,
    /// How long a request may stay blocked before its step and workflow
    /// fail with the reason.
    pub unplaceable_timeout: std::time::Duration,
}

impl Options {
    /// True when this manager takes offers of `agent` (`--use-agents`).
    pub fn uses(&self, agent: &str) -> bool {
        self.use_agents
            .as_ref()
            .is_none_or(|list| list.contains(agent))
    }

    /// (answer timeout, unplaceable time) in ms, as the machine takes them.
    pub(crate) fn blocking(&self) -> (u64, u64) {
        (
            self.answer_timeout.as_millis() as u64,
            self.unplaceable_timeout.as_millis() as u64,
        )
    }
}

/// What the machine reads beyond its memory. Errors are storage errors:
/// the input is answered "retry later", never "no such thing".
pub trait World {
    /// The message id was applied in an earlier group.
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool>;
    /// A workflow as stored (finished ones, and waiting ones' values).
    fn stored(&self, id: &Uuid) -> caroni_store::Result<Option<Workflow>>;
    /// The peer has acknowledged a message of this node (not a stranger).
    fn knows(&self, node: &str) -> bool;
    /// When the peer was last heard from (a message or an ack), ms.
    fn last_heard_ms(&self, node: &str) -> Option<u64>;
    /// True when this node's blob store holds the file whole.
    fn holds_file(&self, file: &caroni_types::file::FileRef) -> bool;
    /// The first `limit` bytes of a file this node holds (`loadContents`
    /// of a step input).
    fn read_head(&self, _file: &caroni_types::file::FileRef, _limit: usize) -> Option<Vec<u8>> {
        None
    }
    /// The workflow an earlier submission with this client request id
    /// made, if it is still remembered.
    fn submission(&self, _request_id: &str) -> caroni_store::Result<Option<Uuid>> {
        Ok(None)
    }
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
        /// The client's id of this submission (idempotency), if any.
        request_id: Option<String>,
    },
    /// A client cancels a workflow.
    Cancel(Uuid),
    /// A client resumes a failed or cancelled workflow.
    Resume(Uuid),
    /// A direct message from a peer, its sender verified.
    Deliver(Inbound),
}

/// The machine's answer to an input.
#[derive(Debug)]
pub enum Answer {
    /// To [`Input::Run`]: the workflow's id, and true when an earlier
    /// submission with the same request id made it.
    Run(Result<(Uuid, bool), Error>),
    /// To [`Input::Cancel`] and [`Input::Resume`].
    Cancel(Result<(), Error>),
    /// To a deletion: how many workflows were deleted.
    Delete(Result<u64, Error>),
    /// To [`Input::Deliver`]: applied (or a duplicate), refused or retry.
    Deliver(Result<(), DeliverError>),
}

/// What a group of inputs decided, to persist and then perform (an action
/// collector: the machine only appends).
#[derive(Debug, Default)]
pub struct Out {
    /// Workflows that changed in any record (their head is written,
    /// watchers told): every id of `steps` and `values` is here too.
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
    /// Workflows made in this group (their parent link and plan are
    /// written once).
    pub created: Vec<Uuid>,
    /// Outputs of elements of dynamic steps that completed in this group:
    /// (parent, step, element, outputs).
    pub elements: Vec<crate::model::ElementOutputs>,
    /// Submissions with a client request id made in this group: (request
    /// id, workflow).
    pub submissions: Vec<(String, Uuid)>,
    /// Ended workflows to delete, with everything kept of them.
    pub deletes: Vec<Uuid>,
    /// Receipts that came with jobs' final statuses, with this manager's
    /// verdict (the service verifies their signatures, chains them and
    /// sends the verdicts).
    pub receipts: Vec<ReceiptIn>,
}

/// A receipt received, and what this manager makes of it.
#[derive(Debug)]
pub struct ReceiptIn {
    /// The agent that sent it.
    pub agent: String,
    /// Its endpoint (the verdict goes there).
    pub endpoint: String,
    /// The receipt as signed.
    pub receipt: caroni_types::ledger::SignedReceipt,
    /// Agreed, or disputed with the reason.
    pub verdict: Result<(), String>,
}

impl Out {
    fn applied(&mut self, id: Uuid) {
        if self.applied_set.insert(id) {
            self.applied.push(id);
        }
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
    /// Live child workflows of each workflow.
    children: HashMap<Uuid, HashSet<Uuid>>,
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
        if let Some(p) = &wf.parent {
            self.children.entry(p.id).or_default().insert(wf.id);
        }
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
            if let Some(p) = &wf.parent {
                if let Some(set) = self.children.get_mut(&p.id) {
                    set.remove(&wf.id);
                    if set.is_empty() {
                        self.children.remove(&p.id);
                    }
                }
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
        }
    }
}

/// What the machine knows of the agents, for one workflow's rules.
struct PeerView<'a> {
    directory: &'a Directory,
    opts: &'a Options,
    answered: &'a HashMap<String, u64>,
    agent_jobs: &'a HashMap<String, u32>,
    world: &'a dyn World,
    now_ms: u64,
    quiet_ms: u64,
}

impl crate::machine::Blobs for PeerView<'_> {
    fn head(&self, file: &caroni_types::file::FileRef, limit: usize) -> Option<Vec<u8>> {
        self.world.read_head(file, limit)
    }
}

impl Peers for PeerView<'_> {
    fn last_heard_ms(&self, agent: &str) -> Option<u64> {
        self.world.last_heard_ms(agent)
    }
    fn known_agents(&self) -> usize {
        // Agents that answered lately and have not gone quiet (a stopped
        // agent must not hold every request for the whole offer window),
        // and agents whose advert is live.
        let answered = self
            .answered
            .keys()
            .filter(|a| {
                self.world
                    .last_heard_ms(a)
                    .is_none_or(|t| self.now_ms.saturating_sub(t) < self.quiet_ms)
            })
            .count();
        answered.max(self.directory.len(self.now_ms))
    }
    fn live_jobs(&self, agent: &str) -> u32 {
        self.agent_jobs.get(agent).copied().unwrap_or(0)
    }
    fn choose(&self, req: &JobRequest, exclude: &[String]) -> Choice {
        let allowed = |a: &str| self.opts.uses(a);
        let placed = |a: &str| self.live_jobs(a);
        self.directory.choose(
            req,
            &self.opts.node_id,
            exclude,
            &allowed,
            &placed,
            self.now_ms,
        )
    }
    fn none_fits(&self, req: &JobRequest) -> Option<String> {
        let allowed = |a: &str| self.opts.uses(a);
        self.directory
            .none_fits(req, &self.opts.node_id, &allowed, self.now_ms)
    }
}

/// The manager: every live workflow and the rules between them.
pub struct Manager {
    opts: Options,
    live: HashMap<Uuid, Workflow>,
    index: Index,
    /// Agents that answered requests, and when they last did.
    answered: HashMap<String, u64>,
    /// The agents' adverts (docs/market.md).
    directory: Directory,
    /// Workflows waiting in `created` for admission, oldest first.
    waiting: VecDeque<Uuid>,
    /// Waiting workflows whose values are on disk only (their copy here
    /// holds none), read back when admitted.
    shelved: HashSet<Uuid>,
    /// When each live step had all its inputs (ms), for the step latency
    /// histogram; memory only.
    ready_at: HashMap<(Uuid, usize), u64>,
    /// Outputs of the completed elements of each running dynamic step,
    /// until it gathers them.
    elements: HashMap<(Uuid, usize), BTreeMap<u64, BTreeMap<String, Value>>>,
    /// Children to make and steps to gather, in order.
    pending: VecDeque<(Uuid, Effect)>,
    /// Workflows that ended with a parent to tell, or children to stop.
    notices: VecDeque<Notice>,
}

/// What a workflow's end means for its family.
#[derive(Debug)]
enum Notice {
    /// A child ended: its parent learns the outcome (its outputs, or why
    /// it did not complete).
    Ended(Parent, Result<BTreeMap<String, Value>, String>),
    /// A workflow ended without completing: its live children stop.
    Orphans(Uuid, String),
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("live", &self.live.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// Time and fresh ids for one call (one type for both engines).
pub use caroni_types::Now;

impl Manager {
    /// An empty manager.
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            live: HashMap::new(),
            index: Index::default(),
            answered: HashMap::new(),
            directory: Directory::default(),
            waiting: VecDeque::new(),
            shelved: HashSet::new(),
            ready_at: HashMap::new(),
            elements: HashMap::new(),
            pending: VecDeque::new(),
            notices: VecDeque::new(),
        }
    }

    /// Takes an agent's advert heard on gossip (or from this node's own
    /// agent): checked, then kept until it expires or a newer one comes.
    /// Returns why it was dropped, if it was.
    pub fn on_advert(
        &mut self,
        agent: &str,
        endpoint: &str,
        advert: caroni_types::market::Advert,
        now_ms: u64,
    ) -> Result<(), caroni_types::delivery::Refusal> {
        advert.check(now_ms)?;
        self.directory.expire(now_ms);
        self.directory.update(agent, endpoint, advert);
        Ok(())
    }

    /// Replaces the live state with `live` (the non-final workflows as
    /// stored), as after a start or a failed write. Waiting workflows
    /// with large values keep them on disk only.
    pub fn load(&mut self, live: Vec<Workflow>, world: &dyn World, now_ms: u64) {
        self.load_with(live, Vec::new(), world, now_ms)
    }

    /// [`Manager::load`] with the outputs of the completed elements of
    /// live dynamic steps.
    pub fn load_with(
        &mut self,
        live: Vec<Workflow>,
        elements: Vec<crate::model::ElementOutputs>,
        world: &dyn World,
        now_ms: u64,
    ) {
        self.live.clear();
        self.index = Index::default();
        self.waiting.clear();
        self.shelved.clear();
        self.pending.clear();
        self.notices.clear();
        self.elements.clear();
        for (id, n, k, outputs) in elements {
            self.elements.entry((id, n)).or_default().insert(k, outputs);
        }
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
        let answer = match input {
            Input::Run {
                template,
                parsed,
                inputs,
                request_id,
            } => {
                let known = match &request_id {
                    Some(r) => match out.submissions.iter().find(|(k, _)| k == r) {
                        Some((_, id)) => Ok(Some(*id)),
                        None => world
                            .submission(r)
                            .map_err(|e| Error::Unavailable(e.to_string())),
                    },
                    None => Ok(None),
                };
                Answer::Run(match known {
                    Ok(Some(id)) => Ok((id, true)),
                    Ok(None) => self
                        .start(&template, &parsed, inputs, now, world, out)
                        .map(|id| {
                            if let Some(r) = request_id {
                                out.submissions.push((r, id));
                            }
                            (id, false)
                        }),
                    Err(e) => Err(e),
                })
            }
            Input::Cancel(id) => Answer::Cancel(self.cancel(id, now, world, out)),
            Input::Resume(id) => Answer::Cancel(self.resume(id, now, world, out)),
            Input::Deliver(msg) => Answer::Deliver(self.deliver(msg, now, world, out)),
        };
        self.family(now, world, out);
        answer
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
        self.family(now, world, out);
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
}

#[cfg(test)]
mod tests;
