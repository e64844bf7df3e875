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

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, JobState, Msg, Outbound};
use caroni_types::{ExecutorSpec, JobTypeDef};
use uuid::Uuid;

use crate::executor::{Execution, RunSpec};

mod advert;
mod answer;
mod fair;
mod run;
use crate::machine::{Job, Offer, RunResult};
pub use advert::{ADVERT_EVERY_MS, ADVERT_LIFETIME_MS, ADVERT_MIN_GAP_MS};
pub use fair::DEFAULT_HALF_LIFE_MS;

/// How often expired offers and declines are forgotten.
const CLEANUP_MS: u64 = 30_000;
/// Most queued jobs looked past per scheduling decision.
const LOOK_PAST: usize = 64;

/// Default concurrent jobs.
pub const DEFAULT_SLOTS: usize = 2;

/// The agent's options (the node composes them from its configuration,
/// whose defaults are the constants above).
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's id.
    pub node_id: String,
    /// Concurrent jobs.
    pub slots: usize,
    /// The managers served (`--serve-managers`); `None` serves every one.
    pub serve_managers: Option<HashSet<String>>,
    /// Which real CWL tools it runs (`--cwl-tools`).
    pub cwl_tools: crate::cwl::CwlTools,
    /// What it has (`--cpus`, `--memory`, `--gpus`, `--disk`).
    pub resources: caroni_types::market::Resources,
    /// Its labels (`--label key=value`).
    pub labels: BTreeMap<String, String>,
    /// Half-life of each manager's usage, for fair share
    /// (`--fair-share-half-life`).
    pub fair_half_life_ms: u64,
    /// Managers' weights for fair share (`--manager-weight NODE=W`; 1 when
    /// not listed).
    pub manager_weights: HashMap<String, f64>,
    /// Most receipts a manager may have disputed or left unanswered for
    /// [`RECEIPT_ANSWER_MS`] before this agent declines its requests
    /// (`--dispute-limit`); `None`: no limit.
    pub dispute_limit: Option<u64>,
}

/// How long a manager has to answer a receipt before it counts against
/// `--dispute-limit`.
pub const RECEIPT_ANSWER_MS: u64 = 60_000;

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
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool>;
    /// A job type and its executor.
    fn job_type(&self, name: &str) -> caroni_store::Result<Option<(JobTypeDef, ExecutorSpec)>>;
    /// Every job type (for the advert).
    fn job_types(&self) -> caroni_store::Result<Vec<JobTypeDef>>;
    /// An offer as stored (accepted or expired ones are not in memory).
    fn offer(&self, request_id: &Uuid) -> caroni_store::Result<Option<Offer>>;
    /// A job as stored (finished ones are not in memory).
    fn job(&self, id: &Uuid) -> caroni_store::Result<Option<Job>>;
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
    /// A job type's price (free when it has none).
    fn price(&self, job_type: &str) -> caroni_types::market::Price {
        let _ = job_type;
        caroni_types::market::Price::default()
    }
    /// Manager `manager`'s receipts here: how many it disputed, and how
    /// many it has not answered for [`RECEIPT_ANSWER_MS`].
    fn receipts_standing(&self, manager: &str, now_ms: u64) -> (u64, u64) {
        let _ = (manager, now_ms);
        (0, 0)
    }
    /// The price an offer for `request` named and its maximum, when not
    /// free.
    fn offer_price(&self, request: &Uuid) -> Option<(caroni_types::market::Price, u64)> {
        let _ = request;
        None
    }
    /// The priority of a request's workflow (0 when it said none).
    fn priority(&self, request: &Uuid) -> i32 {
        let _ = request;
        0
    }
    /// What an offered or accepted request needs, when it needs anything.
    fn needs(&self, request: &Uuid) -> Option<caroni_types::market::Needs> {
        let _ = request;
        None
    }
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
    /// A job type was put or deleted: the next advert says so.
    JobTypesChanged,
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
    /// What each request offered for needs (those that need anything).
    pub request_needs: Vec<(Uuid, caroni_types::market::Needs)>,
    /// The priority of each request offered for, when not 0.
    pub request_priorities: Vec<(Uuid, i32)>,
    /// The price each priced offer named, and its maximum.
    pub request_prices: Vec<(Uuid, (caroni_types::market::Price, u64))>,
    /// Verdicts on this agent's receipts, by the manager that sent them
    /// (checked and chained by the service).
    pub verdicts: Vec<(String, Vec<caroni_types::ledger::Verdict>)>,
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
    /// Offers made.
    pub offers_made: u64,
    /// Declines sent.
    pub declines: u64,
    /// Runs that ended completed.
    pub completed: u64,
    /// Runs that ended failed, by reason.
    pub failures: Vec<Failure>,
    /// Jobs cancelled by their manager.
    pub cancelled: u64,
    /// An advert to publish on gossip once the group is written.
    pub advert: Option<caroni_types::market::Advert>,
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

/// Why a run failed (typed by the executor that ran it).
pub use crate::machine::Failure;

/// Time and fresh ids for one call (one type for both engines).
pub use caroni_types::Now;

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
    /// What each live request (offer or job) needs, by request id, as far
    /// as it needs anything (the rest are read through [`World::needs`]).
    needs: HashMap<Uuid, caroni_types::market::Needs>,
    /// The priority of each live request (offer or job), when not 0 (the
    /// rest are read through [`World::priority`] after a restart).
    priorities: HashMap<Uuid, i32>,
    /// Resources held by running local jobs.
    held: HashMap<Uuid, caroni_types::market::Resources>,
    /// Each manager's run time here, decayed (fair share).
    usage: fair::Usage,
    /// Requests declined, until they expire (ms): declined once only.
    declined: HashMap<Uuid, u64>,
    /// When expired offers are next forgotten.
    cleanup_at: u64,
    /// What it last advertised.
    advert: advert::AdvertState,
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
    /// What the job of request `request` needs (nothing when it says
    /// nothing).
    pub(super) fn job_needs(
        &self,
        request: &Uuid,
        world: &dyn World,
    ) -> caroni_types::market::Needs {
        match self.needs.get(request) {
            Some(n) => n.clone(),
            None => world.needs(request).unwrap_or_default(),
        }
    }

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
            needs: HashMap::new(),
            priorities: HashMap::new(),
            held: HashMap::new(),
            usage: fair::Usage::default(),
            declined: HashMap::new(),
            cleanup_at: 0,
            advert: advert::AdvertState::default(),
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

    /// When [`Agent::settle`] next has something to do.
    pub fn next_timer(&self) -> Option<u64> {
        Some(self.cleanup_at.min(self.advert_due()))
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
            Input::Deliver(msg) if matches!(msg.msg, Msg::Request(_)) => {
                self.asked(msg, now, world, out)
            }
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
                    self.on_request(&from, &req, false, now, world, out);
                }
                Ok(Delivered::Applied)
            }
            Input::Finished(id, result) => {
                self.finished(id, result, now.ms, world, out);
                Ok(Delivered::Applied)
            }
            Input::JobTypesChanged => {
                self.advert.dirty = true;
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
        self.advertise(now.ms, world, out);
    }
}

#[cfg(test)]
mod tests;
