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

use caroni_agent::engine::{self as agent, Agent};
use caroni_agent::executor::{Execution, RunSpec};
use caroni_agent::machine::{Job, Offer, RunResult};
use caroni_manager::engine::{self as manager, Manager};
use caroni_manager::model::{Workflow, WorkflowState};
use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, JobState, Msg, Outbound, StatusUpdate};
use caroni_types::{ExecutorSpec, JobTypeDef};
use rand_core::{Rng, SeedableRng};
use uuid::Uuid;

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
}

/// What an agent keeps on disk.
#[derive(Default)]
struct AgentDisk {
    jobs: BTreeMap<Uuid, Job>,
    offers: BTreeMap<Uuid, Offer>,
    request_workflows: HashMap<Uuid, Uuid>,
    executions: HashMap<Uuid, Execution>,
}

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

const TEMPLATES: [&str; 2] = [
    include_str!("../../../examples/templates/test_simple.cwl"),
    include_str!("../../../examples/templates/diamond.cwl"),
];

/// The job types every agent has, as functions of their inputs.
fn job_types() -> Vec<JobTypeDef> {
    let def = |name: &str, inputs: &[&str], outputs: &[&str]| JobTypeDef {
        name: name.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        body: String::from("simulated"),
        timeout_seconds: 60,
        max_output_bytes: 1 << 20,
        updated_at_ms: 0,
    };
    vec![
        def("foojob0", &["message"], &["jobout"]),
        def("foojob1", &["text"], &["outSB"]),
        def("foojob2", &["final_text"], &["out"]),
        def("split", &["text"], &["left", "right"]),
        def("upper", &["value"], &["upper"]),
        def("reverse", &["value"], &["reversed"]),
        def("join", &["a", "b"], &["joined"]),
        def("finalize", &["joined"], &["wrapped"]),
    ]
}

/// What a job's body computes.
fn compute(job_type: &str, i: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let v = |k: &str| i.get(k).cloned().unwrap_or_default();
    let one = |k: &str, x: String| BTreeMap::from([(k.to_string(), x)]);
    match job_type {
        "foojob0" => one("jobout", v("message").to_uppercase()),
        "foojob1" => one("outSB", format!("prepend{}", v("text"))),
        "foojob2" => one("out", format!("{} append", v("final_text"))),
        "split" => BTreeMap::from([("left".into(), v("text")), ("right".into(), v("text"))]),
        "upper" => one("upper", v("value").to_uppercase()),
        "reverse" => one("reversed", v("value").chars().rev().collect()),
        "join" => one("joined", format!("{}+{}", v("a"), v("b"))),
        "finalize" => one("wrapped", format!("[{}]", v("joined"))),
        _ => BTreeMap::new(),
    }
}

/// A template's expected output for an input.
fn expected(template: usize, input: &str) -> (String, String) {
    match template {
        0 => (
            "result".into(),
            format!("prepend{} append", input.to_uppercase()),
        ),
        _ => {
            let rev: String = input.chars().rev().collect();
            ("final".into(), format!("[{}+{rev}]", input.to_uppercase()))
        }
    }
}

struct MWorld<'a> {
    peers: Peers<'a>,
    disk: &'a ManagerDisk,
}

/// What a node knows of its peers and what it applied, as its machine
/// reads it.
#[derive(Clone, Copy)]
struct Peers<'a> {
    applied: &'a HashSet<Uuid>,
    confirmed: &'a HashSet<String>,
    heard: &'a HashMap<String, u64>,
}

impl manager::World for MWorld<'_> {
    fn is_applied(&self, id: &Uuid) -> Result<bool, String> {
        Ok(self.peers.applied.contains(id))
    }
    fn stored(&self, id: &Uuid) -> Result<Option<Workflow>, String> {
        Ok(self.disk.workflows.get(id).cloned())
    }
    fn knows(&self, node: &str) -> bool {
        self.peers.confirmed.contains(node)
    }
    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.peers.heard.get(node).copied()
    }
}

struct AWorld<'a> {
    peers: Peers<'a>,
    disk: &'a AgentDisk,
    types: &'a [JobTypeDef],
}

impl agent::World for AWorld<'_> {
    fn is_applied(&self, id: &Uuid) -> Result<bool, String> {
        Ok(self.peers.applied.contains(id))
    }
    fn job_type(&self, name: &str) -> Result<Option<(JobTypeDef, ExecutorSpec)>, String> {
        Ok(self
            .types
            .iter()
            .find(|t| t.name == name)
            .map(|t| (t.clone(), ExecutorSpec::Bash)))
    }
    fn offer(&self, request_id: &Uuid) -> Result<Option<Offer>, String> {
        Ok(self.disk.offers.get(request_id).cloned())
    }
    fn job(&self, id: &Uuid) -> Result<Option<Job>, String> {
        Ok(self.disk.jobs.get(id).cloned())
    }
    fn execution(&self, job: &Uuid) -> Option<Execution> {
        self.disk.executions.get(job).cloned()
    }
    fn workflow_of(&self, request: &Uuid) -> Option<Uuid> {
        self.disk.request_workflows.get(request).copied()
    }
    fn unavailable(&self, _: &ExecutorSpec) -> Option<String> {
        None
    }
    fn external_id(&self, _: &RunSpec) -> String {
        String::new()
    }
    fn knows(&self, node: &str) -> bool {
        self.peers.confirmed.contains(node)
    }
}

fn manager_options(endpoint: &str) -> manager::Options {
    manager::Options {
        endpoint: endpoint.to_string(),
        lease: Duration::from_secs(30),
        request_ttl: Duration::from_secs(600),
        max_open_requests: 8,
        offer_window: Duration::from_millis(5),
        use_agents: None,
    }
}

fn agent_options(name: &str) -> agent::Options {
    agent::Options {
        node_id: name.to_string(),
        slots: 2,
        serve_managers: None,
    }
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
                let mut machine = Manager::new(manager_options(endpoint));
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

    fn step(&mut self, event: Event) {
        match event {
            Event::Arrive {
                from,
                to,
                at_endpoint,
                msg,
                sender_endpoint,
            } => self.arrive(from, to, at_endpoint, msg, sender_endpoint),
            Event::Ack { to, id, refused } => {
                let Some(node) = self.nodes.get_mut(&to) else {
                    return;
                };
                if !node.up {
                    return;
                }
                let before = node.outbox.len();
                let mut peer = None;
                node.outbox.retain(|s| {
                    if s.id == id {
                        peer = Some(s.out.to.clone());
                        false
                    } else {
                        true
                    }
                });
                if let Some(p) = peer {
                    if refused.is_none() && node.outbox.len() < before {
                        node.confirmed.insert(p.clone());
                    }
                    node.heard.insert(p, self.now);
                }
            }
            Event::Gossip {
                to,
                from,
                endpoint,
                req,
            } => {
                let Some(node) = self.nodes.get_mut(&to) else {
                    return;
                };
                if !node.up || !matches!(node.role, Role::Agent(..)) {
                    return;
                }
                // Learnt from what the signer signed, as for direct
                // messages.
                node.book.insert(from.clone(), endpoint.clone());
                self.agent_input(
                    &to,
                    agent::Input::Gossip {
                        from,
                        endpoint,
                        req,
                    },
                );
            }
            Event::Wake { node } => {
                let due = self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.up && n.wake_at.is_some_and(|w| w <= self.now));
                if due {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.wake_at = None;
                    }
                    self.settle(&node);
                }
            }
            Event::RunEnd {
                node,
                life,
                job,
                result,
            } => {
                let alive = self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.up && n.life == life);
                if alive {
                    if matches!(result, RunResult::Completed { .. }) {
                        self.completed_runs.insert(job);
                    }
                    self.agent_input(&node, agent::Input::Finished(job, result));
                }
            }
            Event::Resend { node } => self.resend(&node),
            Event::Restart { node } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    // Restarted at another address, as a moved container.
                    n.endpoint = format!("http://{}:{}", n.name, n.life + 1);
                }
                self.boot(&node);
            }
            Event::Run {
                node,
                template,
                input,
            } => {
                if !self.nodes.get(&node).is_some_and(|n| n.up) {
                    // The client retries later.
                    let at = self.now + 1_000;
                    self.push(
                        at,
                        Event::Run {
                            node,
                            template,
                            input,
                        },
                    );
                    return;
                }
                let parsed = self.templates[template].clone();
                let inputs = match template {
                    0 => BTreeMap::from([("start_message".to_string(), input.clone())]),
                    _ => BTreeMap::from([("text".to_string(), input.clone())]),
                };
                let answer = self.manager_input(
                    &node,
                    manager::Input::Run {
                        template: format!("t{template}"),
                        parsed,
                        inputs,
                    },
                );
                if let Some(manager::Answer::Run(Ok(id))) = answer {
                    self.started
                        .insert(id, (node, expected(template, &input).1));
                }
            }
            Event::Cancel { node, pick } => {
                let ids: Vec<Uuid> = self
                    .started
                    .iter()
                    .filter(|(_, (m, _))| *m == node)
                    .map(|(id, _)| *id)
                    .collect();
                if ids.is_empty() || !self.nodes.get(&node).is_some_and(|n| n.up) {
                    return;
                }
                let id = ids[(pick % ids.len() as u64) as usize];
                self.manager_input(&node, manager::Input::Cancel(id));
            }
            Event::Forge => self.forge(),
        }
        // Random crashes while faults are on.
        if self.faults() && self.dice.chance(self.cfg.crash) {
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            let name = names[self.dice.below(names.len() as u64) as usize].clone();
            if let Some(n) = self.nodes.get_mut(&name) {
                if n.up {
                    n.up = false;
                    match &mut n.role {
                        Role::Manager(m, _) => *m = None,
                        Role::Agent(a, _) => *a = None,
                    }
                    self.counts.crashes += 1;
                    let at = self.now + 100 + self.dice.below(5_000);
                    self.push(at, Event::Restart { node: name });
                }
            }
        }
    }

    /// A transmission arrives: applied (or refused) and acknowledged, or
    /// lost when the node is down or the address is no longer its own.
    fn arrive(
        &mut self,
        from: String,
        to: String,
        at_endpoint: String,
        msg: Staged,
        sender_endpoint: String,
    ) {
        let Some(node) = self.nodes.get_mut(&to) else {
            return;
        };
        if !node.up || node.endpoint != at_endpoint {
            self.broken.insert((from, to));
            return;
        }
        // Learnt from what the sender signed.
        node.book.insert(from.clone(), sender_endpoint.clone());
        node.heard.insert(from.clone(), self.now);
        let inbound = Inbound {
            id: msg.id,
            from: from.clone(),
            endpoint: sender_endpoint,
            trace: msg.trace,
            msg: msg.out.msg.clone(),
        };
        let r = if inbound.msg.for_agent() {
            match self
                .nodes
                .get(&to)
                .map(|n| matches!(n.role, Role::Agent(..)))
            {
                Some(true) => match self.agent_input(&to, agent::Input::Deliver(inbound)) {
                    Some(Ok(agent::Delivered::Applied)) => Ok(()),
                    Some(Ok(agent::Delivered::NotMine)) => {
                        Err(DeliverError::Refused("not for an agent".into()))
                    }
                    Some(Err(e)) => Err(e),
                    None => return,
                },
                _ => Err(DeliverError::Refused("not an agent".into())),
            }
        } else {
            match self
                .nodes
                .get(&to)
                .map(|n| matches!(n.role, Role::Manager(..)))
            {
                Some(true) => match self.manager_input(&to, manager::Input::Deliver(inbound)) {
                    Some(manager::Answer::Deliver(r)) => r,
                    _ => return,
                },
                _ => Err(DeliverError::Refused("not a manager".into())),
            }
        };
        let refused = match r {
            Ok(()) => None,
            Err(DeliverError::Retry(_)) => {
                self.broken.insert((from, to));
                return;
            }
            Err(DeliverError::Refused(why)) => {
                let known = self
                    .nodes
                    .get(&to)
                    .is_some_and(|n| n.confirmed.contains(&from));
                if from == MALLORY {
                    self.counts.forgeries_refused += 1;
                } else if !known {
                    // The stranger rule: news about something the node
                    // does not know, from a peer that never acknowledged
                    // one of its messages, is answered in the ack.
                    self.counts.answered_in_ack += 1;
                } else {
                    self.findings.violations.push(format!(
                        "{to} refused {} from honest {from}: {why}",
                        msg.out.msg.name()
                    ));
                }
                Some(why)
            }
        };
        if from == MALLORY {
            return;
        }
        let at = self.now + 1 + self.dice.below(20);
        if !self.dice.chance(self.cfg.drop) || !self.faults() {
            self.push(
                at,
                Event::Ack {
                    to: from,
                    id: msg.id,
                    refused,
                },
            );
        }
    }

    /// Sends every unacknowledged message of a node again (the outbox
    /// sender), to the address it knows.
    fn resend(&mut self, name: &str) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        if !node.up {
            return;
        }
        let confirmed = &node.confirmed;
        node.outbox.retain(|s| {
            confirmed.contains(&s.out.to) || now.saturating_sub(s.at) < UNCONFIRMED_TTL_MS
        });
        let node = &*node;
        let mine: Vec<(String, String)> = self
            .broken
            .iter()
            .filter(|(f, _)| f == name)
            .cloned()
            .collect();
        for p in mine {
            self.broken.remove(&p);
        }
        let sends: Vec<(String, String, Staged)> = node
            .outbox
            .iter()
            // The stranger takes nothing it is sent.
            .filter(|s| s.out.to != MALLORY)
            .map(|s| {
                let endpoint = node
                    .book
                    .get(&s.out.to)
                    .cloned()
                    .unwrap_or_else(|| s.out.endpoint.clone());
                (s.out.to.clone(), endpoint, s.clone())
            })
            .collect();
        let me = node.endpoint.clone();
        for (to, endpoint, s) in sends {
            self.transmit(name, &to, &endpoint, s, &me);
        }
        let at = self.now + 200 + self.dice.below(300);
        self.push(
            at,
            Event::Resend {
                node: name.to_string(),
            },
        );
    }

    fn transmit(&mut self, from: &str, to: &str, endpoint: &str, s: Staged, me: &str) {
        let faults = self.faults();
        let pair = (from.to_string(), to.to_string());
        if self.broken.contains(&pair) {
            return;
        }
        if faults && self.dice.chance(self.cfg.drop) {
            self.broken.insert(pair);
            return;
        }
        let copies = if faults && self.dice.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + 1 + self.dice.below(if faults { 50 } else { 5 });
            let at = at.max(self.pair_at.get(&pair).copied().unwrap_or(0));
            self.pair_at.insert(pair.clone(), at);
            self.push(
                at,
                Event::Arrive {
                    from: from.to_string(),
                    to: to.to_string(),
                    at_endpoint: endpoint.to_string(),
                    msg: s.clone(),
                    sender_endpoint: me.to_string(),
                },
            );
        }
    }

    fn settle(&mut self, name: &str) {
        let is_manager = self
            .nodes
            .get(name)
            .is_some_and(|n| matches!(n.role, Role::Manager(..)));
        if is_manager {
            self.manager_group(name, |m, now, world, out| {
                m.settle(now, world, out);
                None
            });
        } else {
            let _ = self.agent_group(name, |a, now, world, out| {
                a.settle(now, world, out);
                Ok(agent::Delivered::Applied)
            });
        }
    }

    fn manager_input(&mut self, name: &str, input: manager::Input) -> Option<manager::Answer> {
        self.manager_group(name, |m, now, world, out| {
            Some(m.handle(input, now, world, out))
        })
    }

    fn agent_input(
        &mut self,
        name: &str,
        input: agent::Input,
    ) -> Option<Result<agent::Delivered, DeliverError>> {
        let r = self.agent_group(name, |a, now, world, out| a.handle(input, now, world, out));
        Some(r)
    }

    /// One group of a manager: the input, then what is due; written at
    /// once, then performed.
    fn manager_group(
        &mut self,
        name: &str,
        f: impl FnOnce(
            &mut Manager,
            &mut manager::Now<'_>,
            &dyn manager::World,
            &mut manager::Out,
        ) -> Option<manager::Answer>,
    ) -> Option<manager::Answer> {
        let now = self.now;
        let mut dice =
            std::mem::replace(&mut self.dice, Dice(rand_pcg::Pcg64Mcg::seed_from_u64(0)));
        let Some(node) = self.nodes.get_mut(name) else {
            self.dice = dice;
            return None;
        };
        let Node {
            role,
            applied: node_applied,
            confirmed,
            heard,
            outbox,
            ..
        } = node;
        let Role::Manager(slot, disk) = role else {
            self.dice = dice;
            return None;
        };
        let Some(mut m) = slot.take() else {
            self.dice = dice;
            return None;
        };
        let mut out = manager::Out::default();
        let answer = {
            let world = MWorld {
                peers: Peers {
                    applied: node_applied,
                    confirmed,
                    heard,
                },
                disk,
            };
            let mut gen = || dice.uuid();
            let mut clock = manager::Now {
                ms: now,
                new_id: &mut gen,
            };
            let a = f(&mut m, &mut clock, &world, &mut out);
            m.settle(&mut clock, &world, &mut out);
            a
        };
        // Written: records, applied ids, outbox.
        for id in out.touched().iter().chain(out.finished.keys()) {
            if let Some(wf) = m.workflow(id, &out) {
                disk.workflows.insert(*id, wf.clone());
            }
        }
        m.written(&out);
        let mut staged = Vec::new();
        for (o, trace) in out.send {
            staged.push(Staged {
                id: dice.uuid(),
                out: o,
                trace,
                at: now,
            });
        }
        for id in &out.applied {
            node_applied.insert(*id);
        }
        outbox.extend(staged.iter().cloned());
        let next = m.next_timer();
        *slot = Some(m);
        let applied = out.applied;
        let publish = out.publish;
        self.dice = dice;
        for id in applied {
            *self
                .applied_count
                .entry((name.to_string(), id))
                .or_default() += 1;
        }
        self.performed(name, staged, next);
        // Gossip, best effort, to every agent.
        for req in publish {
            self.seen_requests
                .push((req.request_id, req.job_type.clone()));
            let endpoint = self
                .nodes
                .get(name)
                .map(|n| n.endpoint.clone())
                .unwrap_or_default();
            let agents: Vec<String> = self
                .nodes
                .keys()
                .filter(|n| n.starts_with("agent"))
                .cloned()
                .collect();
            for a in agents {
                if self.faults() && self.dice.chance(self.cfg.drop * 4.0) {
                    continue;
                }
                let at = self.now + 1 + self.dice.below(30);
                self.push(
                    at,
                    Event::Gossip {
                        to: a,
                        from: name.to_string(),
                        endpoint: endpoint.clone(),
                        req: req.clone(),
                    },
                );
            }
        }
        answer
    }

    /// One group of an agent.
    fn agent_group(
        &mut self,
        name: &str,
        f: impl FnOnce(
            &mut Agent,
            &mut agent::Now<'_>,
            &dyn agent::World,
            &mut agent::Out,
        ) -> Result<agent::Delivered, DeliverError>,
    ) -> Result<agent::Delivered, DeliverError> {
        let now = self.now;
        let types = job_types();
        let mut dice =
            std::mem::replace(&mut self.dice, Dice(rand_pcg::Pcg64Mcg::seed_from_u64(0)));
        let Some(node) = self.nodes.get_mut(name) else {
            self.dice = dice;
            return Err(DeliverError::Retry("no node".into()));
        };
        let life = node.life;
        let Node {
            role,
            applied: node_applied,
            confirmed,
            heard,
            outbox,
            ..
        } = node;
        let Role::Agent(slot, disk) = role else {
            self.dice = dice;
            return Err(DeliverError::Retry("not an agent".into()));
        };
        let Some(mut a) = slot.take() else {
            self.dice = dice;
            return Err(DeliverError::Retry("down".into()));
        };
        let mut out = agent::Out::default();
        let answer = {
            let world = AWorld {
                peers: Peers {
                    applied: node_applied,
                    confirmed,
                    heard,
                },
                disk,
                types: &types,
            };
            let mut gen = || dice.uuid();
            let mut clock = agent::Now {
                ms: now,
                new_id: &mut gen,
            };
            let r = f(&mut a, &mut clock, &world, &mut out);
            a.settle(&mut clock, &world, &mut out);
            r
        };
        for (id, job) in &out.jobs {
            disk.jobs.insert(*id, job.clone());
        }
        for r in &out.forget_offers {
            disk.offers.remove(r);
        }
        for o in &out.offers {
            disk.offers.insert(o.request_id, o.clone());
        }
        for (r, w) in &out.request_workflows {
            disk.request_workflows.insert(*r, *w);
        }
        for (j, x) in &out.executions {
            disk.executions.insert(*j, x.clone());
        }
        for id in &out.applied {
            node_applied.insert(*id);
        }
        let mut staged = Vec::new();
        for (o, trace) in out.send.into_iter().flatten() {
            staged.push(Staged {
                id: dice.uuid(),
                out: o,
                trace,
                at: now,
            });
        }
        outbox.extend(staged.iter().cloned());
        let next = a.next_timer();
        *slot = Some(a);
        self.dice = dice;
        for id in out.applied {
            *self
                .applied_count
                .entry((name.to_string(), id))
                .or_default() += 1;
        }
        for s in out.start {
            let id = s.spec.job_id;
            if self.completed_runs.contains(&id) {
                self.findings
                    .violations
                    .push(format!("{name} started job {id} again after it completed"));
            }
            let job_type = self
                .nodes
                .get(name)
                .and_then(|n| match &n.role {
                    Role::Agent(_, d) => d.jobs.get(&id).map(|j| j.job_type.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let result = if self.dice.chance(self.cfg.job_failure) {
                RunResult::Failed {
                    message: "exit status 1".into(),
                    exit_status: Some(1),
                    stderr_tail: String::new(),
                }
            } else {
                RunResult::Completed {
                    outputs: compute(&job_type, &s.spec.inputs),
                    stderr_tail: String::new(),
                }
            };
            let at = self.now + 1 + self.dice.below(200);
            self.push(
                at,
                Event::RunEnd {
                    node: name.to_string(),
                    life,
                    job: id,
                    result,
                },
            );
        }
        self.performed(name, staged, next);
        answer
    }

    /// After a group is written: its messages go out, its timer is set.
    fn performed(&mut self, name: &str, staged: Vec<Staged>, next: Option<u64>) {
        for s in &staged {
            if s.out.to == MALLORY && !matches!(s.out.msg, Msg::Offer { .. } | Msg::Decline { .. })
            {
                self.findings.violations.push(format!(
                    "{name} sent {} to the stranger, which never acknowledged anything",
                    s.out.msg.name()
                ));
            }
            if s.out.endpoint == EVIL {
                self.findings.violations.push(format!(
                    "{name} sent {} to the address the stranger named",
                    s.out.msg.name()
                ));
            }
            match &s.out.msg {
                Msg::Accept {
                    offer_id, job_id, ..
                } => {
                    self.seen_jobs.push((s.out.to.clone(), *job_id));
                    self.seen_offers
                        .push((s.out.to.clone(), *offer_id, *job_id));
                }
                Msg::Offer {
                    offer_id,
                    request_id,
                    ..
                } => {
                    self.seen_offers
                        .push((name.to_string(), *offer_id, *request_id));
                }
                _ => {}
            }
        }
        let (me, book) = match self.nodes.get(name) {
            Some(n) => (n.endpoint.clone(), n.book.clone()),
            None => return,
        };
        for s in staged {
            if s.out.to == MALLORY {
                continue;
            }
            let endpoint = book
                .get(&s.out.to)
                .cloned()
                .unwrap_or_else(|| s.out.endpoint.clone());
            let to = s.out.to.clone();
            self.transmit(name, &to, &endpoint, s, &me);
        }
        if let Some(at) = next {
            let at = at.max(self.now + 1);
            let queue_it = self
                .nodes
                .get(name)
                .is_some_and(|n| n.wake_at.is_none_or(|w| w > at));
            if queue_it {
                if let Some(n) = self.nodes.get_mut(name) {
                    n.wake_at = Some(at);
                }
                self.push(
                    at,
                    Event::Wake {
                        node: name.to_string(),
                    },
                );
            }
        }
    }

    /// The stranger forges a message about something real.
    fn forge(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let to = names[self.dice.below(names.len() as u64) as usize].clone();
        let job = if self.seen_jobs.is_empty() {
            self.dice.uuid()
        } else {
            self.seen_jobs[self.dice.below(self.seen_jobs.len() as u64) as usize].1
        };
        let (offer_id, request_id) = if self.seen_offers.is_empty() {
            (self.dice.uuid(), self.dice.uuid())
        } else {
            let o = &self.seen_offers[self.dice.below(self.seen_offers.len() as u64) as usize];
            (o.1, o.2)
        };
        let msg = match self.dice.below(8) {
            0 => Msg::Status(StatusUpdate {
                job_id: job,
                state: JobState::Completed,
                message: String::new(),
                exit_status: Some(0),
                stderr_tail: String::new(),
                sequence: 99,
                executor: String::new(),
                external_id: String::new(),
            }),
            1 => Msg::Data {
                job_id: job,
                items: BTreeMap::from([("out".into(), "forged".into())]),
                outputs: true,
            },
            2 => Msg::Data {
                job_id: job,
                items: BTreeMap::from([("x".into(), "forged".into())]),
                outputs: false,
            },
            3 => Msg::Kill {
                job_id: job,
                reason: "forged".into(),
            },
            4 => Msg::Accept {
                offer_id,
                request_id,
                job_id: self.dice.uuid(),
            },
            5 => Msg::Reject {
                offer_id,
                request_id,
            },
            6 => Msg::Accepted {
                job_id: job,
                offer_id,
            },
            _ => Msg::StatusRequest { job_id: job },
        };
        let s = Staged {
            id: self.dice.uuid(),
            out: Outbound {
                to: to.clone(),
                endpoint: String::new(),
                msg,
            },
            trace: None,
            at: self.now,
        };
        let endpoint = self
            .nodes
            .get(&to)
            .map(|n| n.endpoint.clone())
            .unwrap_or_default();
        // It signs the address it wants answers sent to.
        self.transmit(MALLORY, &to, &endpoint, s, EVIL);
        // And gossips a request whose reply address is not its own.
        if let Some((_, job_type)) = self.seen_requests.first().cloned() {
            let req = JobRequest {
                request_id: self.dice.uuid(),
                job_type,
                parameter_keys: vec!["message".into()],
                output_keys: vec!["jobout".into()],
                job_kvs: BTreeMap::new(),
                expires_at_ms: self.now + 60_000,
                manager_endpoint: EVIL.into(),
                publish_count: 1,
                workflow_id: None,
            };
            let agents: Vec<String> = names
                .into_iter()
                .filter(|n| n.starts_with("agent"))
                .collect();
            for a in agents {
                let at = self.now + 1 + self.dice.below(30);
                self.push(
                    at,
                    Event::Gossip {
                        to: a,
                        from: MALLORY.into(),
                        endpoint: "http://mallory:1".into(),
                        req: req.clone(),
                    },
                );
            }
        }
    }

    /// The guarantees of ARCHITECTURE.md, over the whole run.
    fn check(&mut self) {
        let seed = self.seed;
        if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
            println!(
                "seed {seed}: ended at {} ms, events {:?}",
                self.now - 1_000_000,
                self.kinds
            );
        }
        let mut v = Vec::new();
        if self.started.len() != self.cfg.workflows {
            v.push(format!(
                "{} of {} workflows were started",
                self.started.len(),
                self.cfg.workflows
            ));
        }
        for (id, (m, want)) in &self.started {
            let Some(Role::Manager(_, disk)) = self.nodes.get(m).map(|n| &n.role) else {
                continue;
            };
            let Some(wf) = disk.workflows.get(id) else {
                v.push(format!("workflow {id} is not on {m}'s disk"));
                continue;
            };
            if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
                println!(
                    "workflow {id} on {m}: {} {:?}",
                    wf.state.as_str(),
                    wf.message
                );
                for st in &wf.steps {
                    println!(
                        "  step {} {:?} request {:?}",
                        st.id,
                        st.state,
                        st.request
                            .as_ref()
                            .map(|r| (r.state, r.publish_count, r.expires_at_ms))
                    );
                    for a in &st.attempts {
                        println!(
                            "    attempt {:?} on {} {:?} {}",
                            a.job_id, a.agent, a.state, a.message
                        );
                    }
                }
            }
            match wf.state {
                WorkflowState::Completed => {
                    self.counts.completed += 1;
                    let got: Vec<String> = wf.outputs.values().map(|x| x.to_string()).collect();
                    if got != [want.clone()] {
                        v.push(format!(
                            "workflow {id} completed with {got:?}, not [{want:?}]"
                        ));
                    }
                    for s in &wf.steps {
                        let ok: Vec<_> = s
                            .attempts
                            .iter()
                            .filter(|a| a.state == JobState::Completed && !a.superseded)
                            .collect();
                        if ok.len() != 1 {
                            v.push(format!(
                                "step {} of completed workflow {id} has {} successful jobs",
                                s.id,
                                ok.len()
                            ));
                        }
                        for a in ok {
                            let held = self.nodes.get(&a.agent).and_then(|n| match &n.role {
                                Role::Agent(_, d) => a.job_id.and_then(|j| d.jobs.get(&j)),
                                _ => None,
                            });
                            if held.is_none_or(|j| j.state != JobState::Completed) {
                                v.push(format!(
                                    "step {} of workflow {id}: its job is not completed on {}",
                                    s.id, a.agent
                                ));
                            }
                        }
                    }
                }
                WorkflowState::Failed => self.counts.failed += 1,
                WorkflowState::Cancelled => self.counts.cancelled += 1,
                other => v.push(format!("workflow {id} did not end: {}", other.as_str())),
            }
        }
        for ((node, id), n) in &self.applied_count {
            if *n > 1 {
                v.push(format!("{node} applied message {id} {n} times"));
            }
        }
        self.findings.violations.extend(v);
        if !self.findings.violations.is_empty() {
            self.findings
                .violations
                .insert(0, format!("seed {seed} (replay: CARONI_SIM_SEED={seed})"));
        }
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

/// Runs seeds `from..from + n`; returns the first failure's findings and
/// the totals.
pub fn run_seeds(from: u64, n: u64, cfg: &Config) -> (Vec<Findings>, Counts) {
    let mut failures = Vec::new();
    let mut total = Counts::default();
    for seed in from..from + n {
        let (f, c) = Sim::new(seed, cfg.clone()).run();
        total.events += c.events;
        total.completed += c.completed;
        total.failed += c.failed;
        total.cancelled += c.cancelled;
        total.crashes += c.crashes;
        total.forgeries_refused += c.forgeries_refused;
        total.answered_in_ack += c.answered_in_ack;
        if !f.violations.is_empty() {
            failures.push(f);
        }
    }
    (failures, total)
}

#[cfg(test)]
mod tests;
