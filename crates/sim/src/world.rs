//! The demo templates and job types the simulated nodes run, and the
//! disks and peers the machines read through their `World`.

use std::collections::{BTreeMap, HashMap, HashSet};

use caroni_agent::engine as agent;
use caroni_agent::executor::{Execution, RunSpec};
use caroni_agent::machine::{Job, Offer};
use caroni_manager::engine as manager;
use caroni_manager::model::Workflow;

use caroni_types::{ExecutorSpec, JobTypeDef};

use uuid::Uuid;

use crate::*;

pub(crate) const TEMPLATES: [&str; 2] = [
    include_str!("../../../examples/templates/test_simple.cwl"),
    include_str!("../../../examples/templates/diamond.cwl"),
];

/// The job types every agent has, as functions of their inputs.
pub(crate) fn job_types() -> Vec<JobTypeDef> {
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
pub(crate) fn compute(job_type: &str, i: &BTreeMap<String, String>) -> BTreeMap<String, String> {
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
pub(crate) fn expected(template: usize, input: &str) -> (String, String) {
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

pub(crate) struct MWorld<'a> {
    pub(crate) peers: Peers<'a>,
    pub(crate) disk: &'a ManagerDisk,
}

/// What a node knows of its peers and what it applied, as its machine
/// reads it.
#[derive(Clone, Copy)]
pub(crate) struct Peers<'a> {
    pub(crate) applied: &'a HashSet<Uuid>,
    pub(crate) confirmed: &'a HashSet<String>,
    pub(crate) heard: &'a HashMap<String, u64>,
}

impl manager::World for MWorld<'_> {
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
        Ok(self.peers.applied.contains(id))
    }
    fn stored(&self, id: &Uuid) -> caroni_store::Result<Option<Workflow>> {
        Ok(self.disk.workflows.get(id).cloned())
    }
    fn knows(&self, node: &str) -> bool {
        self.peers.confirmed.contains(node)
    }
    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.peers.heard.get(node).copied()
    }
    fn holds_file(&self, _: &caroni_types::file::FileRef) -> bool {
        false
    }
}

pub(crate) struct AWorld<'a> {
    pub(crate) peers: Peers<'a>,
    pub(crate) disk: &'a AgentDisk,
    pub(crate) types: &'a [JobTypeDef],
}

impl agent::World for AWorld<'_> {
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
        Ok(self.peers.applied.contains(id))
    }
    fn job_type(&self, name: &str) -> caroni_store::Result<Option<(JobTypeDef, ExecutorSpec)>> {
        Ok(self
            .types
            .iter()
            .find(|t| t.name == name)
            .map(|t| (t.clone(), ExecutorSpec::Bash)))
    }
    fn job_types(&self) -> caroni_store::Result<Vec<JobTypeDef>> {
        Ok(self.types.to_vec())
    }
    fn offer(&self, request_id: &Uuid) -> caroni_store::Result<Option<Offer>> {
        Ok(self.disk.offers.get(request_id).cloned())
    }
    fn job(&self, id: &Uuid) -> caroni_store::Result<Option<Job>> {
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
    fn price(&self, job_type: &str) -> caroni_types::market::Price {
        PRICES
            .iter()
            .find(|(t, _)| *t == job_type)
            .map(|(_, p)| *p)
            .unwrap_or_default()
    }
    fn offer_price(&self, request: &Uuid) -> Option<(caroni_types::market::Price, u64)> {
        self.disk.request_prices.get(request).copied()
    }
}

/// Job types with a price (the rest are free): receipts then charge.
pub(crate) const PRICES: [(&str, caroni_types::market::Price); 2] = [
    (
        "foojob1",
        caroni_types::market::Price {
            fixed_milli: 300,
            per_second_milli: 10,
        },
    ),
    (
        "join",
        caroni_types::market::Price {
            fixed_milli: 1_000,
            per_second_milli: 0,
        },
    ),
];

pub(crate) fn manager_options(name: &str, endpoint: &str) -> manager::Options {
    manager::Options {
        endpoint: endpoint.to_string(),
        lease: Duration::from_secs(30),
        request_ttl: Duration::from_secs(600),
        max_open_requests: 8,
        offer_window: Duration::from_millis(5),
        use_agents: None,
        answer_timeout: std::time::Duration::from_secs(10),
        unplaceable_timeout: std::time::Duration::from_secs(300),
        node_id: name.to_string(),
    }
}

pub(crate) fn agent_options(name: &str) -> agent::Options {
    agent::Options {
        node_id: name.to_string(),
        slots: 2,
        serve_managers: None,
        cwl_tools: Default::default(),
        resources: caroni_types::market::Resources {
            cpu_milli: 4000,
            memory_mib: 8192,
            gpus: 0,
            disk_mib: 10240,
        },
        labels: Default::default(),
        fair_half_life_ms: 600_000,
        manager_weights: Default::default(),
        dispute_limit: None,
    }
}
