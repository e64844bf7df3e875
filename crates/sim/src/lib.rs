//! A deterministic simulation of the whole protocol, in the style of
//! iroh-gossip's simulator: several managers and agents as their IO-less
//! machines ([`caroni_manager::engine::Manager`],
//! [`caroni_agent::engine::Agent`]) in one process, on a virtual clock,
//! over a seeded network that delays, reorders, duplicates and drops
//! messages; nodes crash and restart from what they persisted (their
//! records, applied ids and outbox), come back at a new address, and a
//! hostile sender with a valid key of its own forges messages about real
//! jobs, offers and requests. Every run is a function of its seed: a
//! failing seed prints itself and replays.
//!
//! The model of the transport is the real one's: a message is staged in
//! its sender's durable outbox in the same group as the change that caused
//! it, sent (and re-sent until acknowledged) to the address its sender
//! last learnt for the destination from what that destination signed, and
//! acknowledged by the receiver only after the receiver's group is
//! written; gossip is best effort. Each input is its own group, written
//! atomically before anything it caused is performed.
//!
//! After each run, [`Sim::check`] asserts the guarantees of
//! ARCHITECTURE.md: every workflow ends; each completed step has exactly
//! one successful job, and the workflow's output is the right one; no
//! message is applied twice; no honest peer is refused; nothing is sent
//! to the stranger except answers to its gossip; no completed job runs
//! again.
//!
//! This crate is a test harness: it owns no rule of its own.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use caroni_agent::engine::Agent;
use caroni_agent::executor::Execution;
use caroni_agent::machine::{Job, Offer, RunResult};
use caroni_manager::engine::Manager;
use caroni_manager::model::Workflow;

use caroni_types::msg::{JobRequest, Outbound};

use rand_core::{Rng, SeedableRng};
use uuid::Uuid;

mod check;
mod events;
mod groups;
mod net;
mod world;

use world::{agent_options, manager_options, MWorld, Peers, TEMPLATES};

/// The budget of every fourth workflow, in thousandths of a credit.
pub const SIM_BUDGET_MILLI: u64 = 1_500;

/// The stranger's node id.
pub const MALLORY: &str = "mallory";
/// The address the stranger names in what it forges.
pub const EVIL: &str = "http://evil.example:1";

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Config {
    /// Managers.
    pub managers: usize,
    /// Agents.
    pub agents: usize,
    /// Workflows started over the run (spread over each manager).
    pub workflows: usize,
    /// Chance that a transmission is lost.
    pub drop: f64,
    /// Chance that a transmission is duplicated.
    pub duplicate: f64,
    /// Chance, per scheduling step, that a node crashes.
    pub crash: f64,
    /// Chance that a job run fails.
    pub job_failure: f64,
    /// Forged messages injected by the stranger.
    pub forgeries: usize,
    /// Simulated time after which faults stop and the run must settle.
    pub fault_ms: u64,
    /// Simulated time by which every workflow must have ended.
    pub limit_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            managers: 2,
            agents: 3,
            workflows: 6,
            drop: 0.05,
            duplicate: 0.05,
            crash: 0.002,
            job_failure: 0.05,
            forgeries: 40,
            fault_ms: 60_000,
            limit_ms: 3_600_000,
        }
    }
}

/// A seeded random source with the two draws the simulator needs.
struct Dice(rand_pcg::Pcg64Mcg);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.0.next_u64() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.0.next_u64() >> 11) as f64 / ((1u64 << 53) as f64)) < p
    }
    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(
            ((u128::from(self.0.next_u64()) << 64) | u128::from(self.0.next_u64())).to_be_bytes(),
        )
        .into_uuid()
    }
}

/// A message staged in a node's outbox, kept until acknowledged.
#[derive(Clone, Debug)]
struct Staged {
    id: Uuid,
    out: Outbound,
    trace: Option<Uuid>,
    /// When it was staged (ms).
    at: u64,
}

/// Messages to a peer that never acknowledged one expire after this long,
/// as in the real outbox.
const UNCONFIRMED_TTL_MS: u64 = 10 * 60 * 1000;

// Events are queued by value; boxing the larger ones buys nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Event {
    /// A transmission of a direct message arrives.
    Arrive {
        from: String,
        to: String,
        at_endpoint: String,
        msg: Staged,
        sender_endpoint: String,
    },
    /// An acknowledgement (or a refusal in it) arrives back at the sender.
    Ack {
        to: String,
        id: Uuid,
        refused: Option<String>,
    },
    /// A gossip request arrives at an agent.
    Gossip {
        to: String,
        from: String,
        endpoint: String,
        req: JobRequest,
    },
    /// An agent's advert arrives at a manager (gossip).
    Advert {
        to: String,
        from: String,
        endpoint: String,
        advert: caroni_types::market::Advert,
    },
    /// A node's timer (settle).
    Wake { node: String },
    /// A run ended (of a given incarnation of the agent).
    RunEnd {
        node: String,
        life: u64,
        job: Uuid,
        result: RunResult,
    },
    /// The outbox sender of a node re-sends what is unacknowledged.
    Resend { node: String },
    /// A node restarts.
    Restart { node: String },
    /// A client starts a workflow.
    Run {
        node: String,
        template: usize,
        input: String,
    },
    /// A client cancels a workflow.
    Cancel { node: String, pick: u64 },
    /// The stranger forges a message.
    Forge,
}

struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// What a manager keeps on disk.
#[derive(Default)]
struct ManagerDisk {
    workflows: BTreeMap<Uuid, Workflow>,
    /// Receipts received, by job: (agent, charge, agreed), as the
    /// manager's service chains them.
    ledger: BTreeMap<Uuid, (String, u64, bool)>,
}

/// What an agent keeps on disk.
#[derive(Default)]
struct AgentDisk {
    jobs: BTreeMap<Uuid, Job>,
    offers: BTreeMap<Uuid, Offer>,
    request_workflows: HashMap<Uuid, Uuid>,
    executions: HashMap<Uuid, Execution>,
    /// The price each priced offer named, and its maximum.
    request_prices: HashMap<Uuid, (caroni_types::market::Price, u64)>,
    /// Receipts issued, by job: (manager, charge, verdict once it came),
    /// as the agent's service chains them.
    ledger: BTreeMap<Uuid, (String, u64, Option<bool>)>,
}

// A simulation holds a few nodes: the size of a role does not matter.
#[allow(clippy::large_enum_variant)]
enum Role {
    Manager(Option<Manager>, ManagerDisk),
    Agent(Option<Agent>, AgentDisk),
}

struct Node {
    name: String,
    endpoint: String,
    role: Role,
    /// Applied message ids (on disk).
    applied: HashSet<Uuid>,
    /// The outbox (on disk).
    outbox: Vec<Staged>,
    /// Where each peer last said it is (on disk, as the address book).
    book: HashMap<String, String>,
    /// Peers that acknowledged a message of this node (on disk).
    confirmed: HashSet<String>,
    /// When each peer was last heard from (memory).
    heard: HashMap<String, u64>,
    up: bool,
    /// Incarnation: runs of an earlier one die with it.
    life: u64,
    /// The timer currently queued.
    wake_at: Option<u64>,
}

/// What went wrong in a run.
#[derive(Debug, Default)]
pub struct Findings {
    /// Violations of a guarantee, each a sentence.
    pub violations: Vec<String>,
}

/// Counts of what a run did, for the report.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Events processed.
    pub events: u64,
    /// Workflows that ended completed / failed / cancelled.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Crashes.
    pub crashes: u64,
    /// Forged messages refused.
    pub forgeries_refused: u64,
    /// Honest messages from a peer not yet confirmed, about something
    /// the receiver no longer knows, answered in the ack.
    pub answered_in_ack: u64,
    /// Direct messages staged by honest nodes (each once, however often
    /// it was transmitted).
    pub direct_messages: u64,
    /// Job runs that completed.
    pub runs_completed: u64,
    /// Runs started per agent.
    pub runs_per_agent: BTreeMap<String, u64>,
    /// Workflows failed because their budget ran out.
    pub over_budget: u64,
}

/// One seeded run.
pub struct Sim {
    seed: u64,
    cfg: Config,
    dice: Dice,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    nodes: BTreeMap<String, Node>,
    templates: Vec<Arc<caroni_cwl::Workflow>>,
    /// Workflows started: (manager, id) → expected output value.
    started: BTreeMap<Uuid, (String, String)>,
    /// (receiver, message id) → times applied.
    applied_count: HashMap<(String, Uuid), u32>,
    /// Jobs whose run completed.
    completed_runs: HashSet<Uuid>,
    /// Real ids seen, for the stranger to forge with.
    seen_jobs: Vec<(String, Uuid)>,
    seen_requests: Vec<(Uuid, String)>,
    seen_offers: Vec<(String, Uuid, Uuid)>,
    findings: Findings,
    counts: Counts,
    /// Per sender and receiver, the last arrival scheduled: one stream
    /// per pair delivers in order.
    pair_at: HashMap<(String, String), u64>,
    /// Pairs whose stream broke (a lost transmission, a receiver down or
    /// asking to retry): nothing more goes through until the sender
    /// re-sends what is unacknowledged, in order.
    broken: HashSet<(String, String)>,
    /// Events by kind (with `CARONI_SIM_VERBOSE`).
    kinds: BTreeMap<String, u64>,
}

impl Sim {
    /// A run for `seed`.
    pub fn new(seed: u64, cfg: Config) -> Self {
        let mut dice = Dice(rand_pcg::Pcg64Mcg::seed_from_u64(seed));
        let templates = TEMPLATES
            .iter()
            .map(|t| {
                Arc::new(caroni_cwl::parse(t).unwrap_or_else(|e| panic!("a demo template: {e}")))
            })
            .collect();
        let mut nodes = BTreeMap::new();
        for m in 0..cfg.managers {
            let name = format!("manager{m}");
            let endpoint = format!("http://{name}:1");
            nodes.insert(
                name.clone(),
                Node::new(
                    &name,
                    &endpoint,
                    Role::Manager(None, ManagerDisk::default()),
                ),
            );
        }
        for a in 0..cfg.agents {
            let name = format!("agent{a}");
            let endpoint = format!("http://{name}:1");
            nodes.insert(
                name.clone(),
                Node::new(&name, &endpoint, Role::Agent(None, AgentDisk::default())),
            );
        }
        let mut sim = Self {
            seed,
            cfg,
            dice: Dice(rand_pcg::Pcg64Mcg::seed_from_u64(0)),
            now: 1_000_000,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            templates,
            started: BTreeMap::new(),
            applied_count: HashMap::new(),
            completed_runs: HashSet::new(),
            seen_jobs: Vec::new(),
            seen_requests: Vec::new(),
            seen_offers: Vec::new(),
            findings: Findings::default(),
            counts: Counts::default(),
            kinds: BTreeMap::new(),
            pair_at: HashMap::new(),
            broken: HashSet::new(),
        };
        std::mem::swap(&mut sim.dice, &mut dice);
        let names: Vec<String> = sim.nodes.keys().cloned().collect();
        for n in &names {
            sim.boot(n);
        }
        let managers: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with("manager"))
            .cloned()
            .collect();
        for w in 0..sim.cfg.workflows {
            let at = sim.now + sim.dice.below(sim.cfg.fault_ms / 2);
            let node = managers[w % managers.len()].clone();
            let template = sim.dice.below(2) as usize;
            let input = format!("w{w}s{}", sim.dice.below(1000));
            sim.push(
                at,
                Event::Run {
                    node,
                    template,
                    input,
                },
            );
        }
        if sim.dice.chance(0.5) {
            let at = sim.now + sim.dice.below(sim.cfg.fault_ms / 2);
            let node = managers[0].clone();
            let pick = sim.dice.below(u64::MAX);
            sim.push(at, Event::Cancel { node, pick });
        }
        for _ in 0..sim.cfg.forgeries {
            let at = sim.now + sim.dice.below(sim.cfg.fault_ms);
            sim.push(at, Event::Forge);
        }
        sim
    }

    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            event,
        });
    }

    fn faults(&self) -> bool {
        self.now < 1_000_000 + self.cfg.fault_ms
    }

    /// (Re)starts a node's machine from its disk.
    fn boot(&mut self, name: &str) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        node.up = true;
        node.life += 1;
        node.heard.clear();
        node.wake_at = None;
        let Node {
            role,
            applied,
            confirmed,
            heard,
            endpoint,
            name: node_name,
            ..
        } = node;
        let peers = Peers {
            applied,
            confirmed,
            heard,
        };
        match role {
            Role::Manager(m, disk) => {
                let mut machine = Manager::new(manager_options(node_name, endpoint));
                let live: Vec<Workflow> = disk
                    .workflows
                    .values()
                    .filter(|w| !w.state.is_final())
                    .cloned()
                    .collect();
                let world = MWorld { peers, disk };
                machine.load(live, &world, now);
                *m = Some(machine);
            }
            Role::Agent(a, disk) => {
                let mut machine = Agent::new(agent_options(node_name));
                machine.load(
                    disk.offers.values().cloned().collect(),
                    disk.jobs.values().cloned().collect(),
                    now,
                );
                *a = Some(machine);
            }
        }
        // The first group: what is due at start.
        self.settle(name);
        let at = self.now + 50;
        self.push(
            at,
            Event::Resend {
                node: name.to_string(),
            },
        );
    }

    /// Runs the simulation to its end and checks it.
    pub fn run(mut self) -> (Findings, Counts) {
        let end = 1_000_000 + self.cfg.limit_ms;
        while let Some(q) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = self.now.max(q.at);
            self.counts.events += 1;
            if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
                let kind = format!("{:?}", q.event);
                let kind = kind.split([' ', '{', '(']).next().unwrap_or("").to_string();
                *self.kinds.entry(kind).or_default() += 1;
            }
            self.step(q.event);
            if self.all_ended()
                && !self.faults()
                && self
                    .queue
                    .iter()
                    .all(|q| !matches!(q.event, Event::Run { .. }))
            {
                break;
            }
        }
        self.check();
        (self.findings, self.counts)
    }

    fn all_ended(&self) -> bool {
        self.started.len() == self.cfg.workflows
            && self.started.iter().all(|(id, (m, _))| {
                self.nodes.get(m).is_some_and(|n| match &n.role {
                    Role::Manager(_, disk) => {
                        disk.workflows.get(id).is_some_and(|w| w.state.is_final())
                    }
                    Role::Agent(..) => false,
                })
            })
    }
}

impl Node {
    fn new(name: &str, endpoint: &str, role: Role) -> Self {
        Node {
            name: name.to_string(),
            endpoint: endpoint.to_string(),
            role,
            applied: HashSet::new(),
            outbox: Vec::new(),
            book: HashMap::new(),
            confirmed: HashSet::new(),
            heard: HashMap::new(),
            up: false,
            life: 0,
            wake_at: None,
        }
    }
}

/// Runs seeds `from..from + n`, spread over the machine's cores (each
/// seed's run is its own and deterministic); returns the findings of the
/// seeds that broke a guarantee, in seed order, and the totals.
pub fn run_seeds(from: u64, n: u64, cfg: &Config) -> (Vec<Findings>, Counts) {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get() as u64);
    let parts: Vec<(Vec<(u64, Findings)>, Counts)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    let mut total = Counts::default();
                    let mut seed = from + t;
                    while seed < from + n {
                        let (f, c) = Sim::new(seed, cfg.clone()).run();
                        total.add(&c);
                        if !f.violations.is_empty() {
                            failures.push((seed, f));
                        }
                        seed += threads;
                    }
                    (failures, total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(part) => part,
                Err(e) => std::panic::resume_unwind(e),
            })
            .collect()
    });
    let mut failures = Vec::new();
    let mut total = Counts::default();
    for (f, c) in parts {
        failures.extend(f);
        total.add(&c);
    }
    failures.sort_by_key(|(seed, _)| *seed);
    (failures.into_iter().map(|(_, f)| f).collect(), total)
}

impl Counts {
    fn add(&mut self, c: &Counts) {
        self.events += c.events;
        self.completed += c.completed;
        self.failed += c.failed;
        self.cancelled += c.cancelled;
        self.crashes += c.crashes;
        self.forgeries_refused += c.forgeries_refused;
        self.answered_in_ack += c.answered_in_ack;
        self.direct_messages += c.direct_messages;
        self.runs_completed += c.runs_completed;
        self.over_budget += c.over_budget;
        for (a, n) in &c.runs_per_agent {
            *self.runs_per_agent.entry(a.clone()).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests;
