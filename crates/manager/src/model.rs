//! The manager's records: one [`Workflow`] holds its steps, their requests
//! and every attempt, so that one write stores a whole state change.

use std::collections::BTreeMap;

use caroni_cwl::Source;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use caroni_types::msg::JobState;

/// A value (a workflow input, a step's input or result, a workflow
/// output): shared, so that copying a workflow record to compare it
/// before and after a change never copies its values (up to 1 MiB each).
pub type Value = std::sync::Arc<str>;

/// Workflow states (the original's, plus `cancelled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowState {
    /// Recorded, requests not yet out.
    Created,
    /// Requests out; not every step has a job yet.
    Initializing,
    /// Every step has (or had) a job; data flows.
    Running,
    /// A step is being re-fulfilled after a failure.
    Stalled,
    /// Every step completed; outputs collected.
    Completed,
    /// A step ran out of attempts.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl WorkflowState {
    /// Completed, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            WorkflowState::Completed | WorkflowState::Failed | WorkflowState::Cancelled
        )
    }
    /// The state a name names.
    pub fn parse(name: &str) -> Option<Self> {
        [
            WorkflowState::Created,
            WorkflowState::Initializing,
            WorkflowState::Running,
            WorkflowState::Stalled,
            WorkflowState::Completed,
            WorkflowState::Failed,
            WorkflowState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Created => "created",
            WorkflowState::Initializing => "initializing",
            WorkflowState::Running => "running",
            WorkflowState::Stalled => "stalled",
            WorkflowState::Completed => "completed",
            WorkflowState::Failed => "failed",
            WorkflowState::Cancelled => "cancelled",
        }
    }
}

/// Step states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Recorded.
    Created,
    /// A request is out; no job yet.
    Fulfilling,
    /// An agent holds a job for it.
    Fulfilled,
    /// Its job runs.
    Running,
    /// Its job completed with every output.
    Completed,
    /// Out of attempts.
    Failed,
    /// Its condition (`when`) was false: no job, null outputs.
    Skipped,
    /// The workflow ended (cancelled, or failed elsewhere) before it did.
    Cancelled,
}

impl StepState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Created => "created",
            StepState::Fulfilling => "fulfilling",
            StepState::Fulfilled => "fulfilled",
            StepState::Running => "running",
            StepState::Completed => "completed",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Cancelled => "cancelled",
        }
    }
}

/// Job request states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Recorded.
    Created,
    /// Published; waiting for offers.
    Fulfilling,
    /// An offer was accepted.
    Fulfilled,
    /// Withdrawn without an offer (workflow ended).
    Unanswered,
    /// No offer before it expired.
    Expired,
}

/// One job request of a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Request id.
    pub id: Uuid,
    /// State.
    pub state: RequestState,
    /// Created (ms).
    pub created_at_ms: u64,
    /// Void after (ms).
    pub expires_at_ms: u64,
    /// Times published.
    pub publish_count: u32,
    /// Next (re-)publication (ms).
    pub next_publish_at_ms: u64,
    /// Declines received (most recent last, at most 8 kept).
    pub declines: Vec<(String, String)>,
    /// Offers gathered while the offer window is open.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Agents that answered (offer or decline), to close the window early.
    #[serde(default)]
    pub answered: Vec<String>,
    /// When the offer window closes (ms), once an offer arrived.
    #[serde(default)]
    pub decide_at_ms: Option<u64>,
    /// Why no agent can take it, once every agent known declined or none
    /// answered in time.
    #[serde(default)]
    pub blocked: Option<Blocked>,
    /// Agents asked directly, in order (memory only: a restarted manager
    /// asks again).
    #[serde(skip)]
    pub asked: Vec<String>,
    /// Times broadcast on gossip (memory only, for the back-off).
    #[serde(skip)]
    pub broadcasts: u32,
}

/// A request no agent can take now: since when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// When it was first seen blocked (ms).
    pub since_ms: u64,
    /// The declines' reasons, or that no agent answered.
    pub reason: String,
}

/// An offer waiting for the request's offer window to close.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The agent's node id.
    pub agent: String,
    /// Its endpoint.
    pub endpoint: String,
    /// The offer.
    pub offer_id: Uuid,
    /// Void after (ms).
    pub expires_at_ms: u64,
    /// How busy the agent said it was.
    pub load: caroni_types::msg::Load,
    /// Its price and the most it can charge (memory only).
    #[serde(skip)]
    pub price: Option<(caroni_types::market::Price, u64)>,
}

/// One attempt at a step: an accepted offer and the job it became, or an
/// expired request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The job (absent when the request expired unanswered).
    pub job_id: Option<Uuid>,
    /// The request it answered.
    pub request_id: Uuid,
    /// The accepted offer.
    pub offer_id: Option<Uuid>,
    /// Node id of the agent holding the job.
    pub agent: String,
    /// The agent's endpoint.
    pub endpoint: String,
    /// Last state reported (pending until the agent says otherwise).
    pub state: JobState,
    /// True once the agent answered JobAccepted.
    pub accepted: bool,
    /// True once a newer attempt replaced this one while it could still
    /// have run (a lost job, a resumed workflow's failed attempts); late
    /// results are ignored.
    pub superseded: bool,
    /// Accept sent: the job was placed (ms, manager's clock).
    pub started_at_ms: u64,
    /// Final state reached (ms): the agent's time when it said, else the
    /// manager's.
    pub ended_at_ms: Option<u64>,
    /// Last message from the agent about this job (ms).
    pub last_heard_ms: u64,
    /// Last status request sent (ms).
    pub last_probe_ms: u64,
    /// Highest status sequence applied.
    pub status_seq: u64,
    /// Exit status of the process.
    pub exit_status: Option<i32>,
    /// Why it failed.
    pub message: String,
    /// Tail of stderr.
    pub stderr_tail: String,
    /// When the job had every input and waited for a slot (the agent's
    /// clock, ms).
    #[serde(default)]
    pub queued_at_ms: Option<u64>,
    /// When its process started (the agent's clock, ms).
    #[serde(default)]
    pub ran_at_ms: Option<u64>,
    /// The kind of failure (`exit_status`, `output`, `timeout`, `killed`,
    /// `lost`, `unplaceable`, `other`); empty unless it failed.
    #[serde(default)]
    pub failure: String,
    /// The price its offer named and the most it can charge, when not
    /// free (kept in a record of its own, `WORKFLOW_ATTEMPT_PRICES`).
    #[serde(skip)]
    pub price: Option<(caroni_types::market::Price, u64)>,
}

impl Attempt {
    /// What it cost, once it ended: its price for the time it ran by the
    /// agent's clock, at most its maximum. A job that never started, or
    /// that was lost (no end from its agent), costs nothing.
    pub fn charge(&self) -> Option<u64> {
        let (price, max) = self.price?;
        if !self.state.is_final() || self.failure == "lost" {
            return None;
        }
        let (ran, ended) = (self.ran_at_ms?, self.ended_at_ms?);
        Some(price.charge(ended.saturating_sub(ran), max))
    }

    /// What it may still cost: its maximum while it is live.
    pub fn reserved(&self) -> u64 {
        match self.price {
            Some((_, max)) if self.is_live() => max,
            _ => 0,
        }
    }

    /// Still able to produce a result.
    pub fn is_live(&self) -> bool {
        self.job_id.is_some() && !self.superseded && !self.state.is_final()
    }
}

/// One bound input of a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInput {
    /// Input name.
    pub name: String,
    /// Where its value comes from.
    pub source: Option<Source>,
    /// Fallback value.
    pub default: Option<String>,
}

/// The outputs of one completed element of a dynamic step: (workflow,
/// step index, element, outputs by name).
pub type ElementOutputs = (Uuid, usize, u64, BTreeMap<String, Value>);

/// Where a workflow that runs one element of a dynamic step reports: its
/// parent workflow, the step and the element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    /// The parent workflow.
    pub id: Uuid,
    /// The step of the parent (its index).
    pub step: u32,
    /// The element (0 when the step does not scatter).
    pub index: u64,
}

/// The elements of a dynamic step (one unless it scatters): each runs as
/// a child workflow; they are decided in order, at most
/// [`crate::machine::FAN_WINDOW`] live at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fan {
    /// Its scatter (no dims: one element).
    pub shape: caroni_cwl::dynamic::Shape,
    /// Elements in all.
    pub total: u64,
    /// Elements decided so far (a child made, or skipped), from 0.
    pub decided: u64,
    /// Elements whose child completed.
    pub done: u64,
    /// Elements skipped by the condition.
    pub skipped: u64,
    /// Elements whose child failed or was cancelled.
    pub failed: u64,
}

impl Fan {
    /// Elements whose child runs (or waits to run).
    pub fn live(&self) -> u64 {
        self.decided
            .saturating_sub(self.done + self.skipped + self.failed)
    }
    /// Elements not decided yet.
    pub fn waiting(&self) -> u64 {
        self.total.saturating_sub(self.decided)
    }
}

/// One step of a workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Step id.
    pub id: String,
    /// Job type.
    pub job_type: String,
    /// Static parameters.
    pub job_kvs: BTreeMap<String, String>,
    /// Inputs.
    pub inputs: Vec<StepInput>,
    /// Output names.
    pub outputs: Vec<String>,
    /// State.
    pub state: StepState,
    /// Input values known so far.
    pub values: BTreeMap<String, Value>,
    /// Outputs received from the current job.
    pub results: BTreeMap<String, Value>,
    /// The current request.
    pub request: Option<Request>,
    /// Every attempt, oldest first.
    pub attempts: Vec<Attempt>,
    /// How the step is retried, as its template says (unsaid parts: the
    /// workflow's limit and the manager's defaults).
    #[serde(default)]
    pub policy: caroni_cwl::Retry,
    /// True for a dynamic step (scatter, condition, sub-workflow, computed
    /// inputs): its values are kept by source (`x`, `step/out`), and its
    /// elements run as child workflows. Derived from the plan.
    #[serde(skip)]
    pub dynamic: bool,
    /// A dynamic step's elements, once its inputs were all known.
    #[serde(skip)]
    pub fan: Option<Fan>,
    /// A dynamic step's input object, evaluated once (memory only; made
    /// again from its values after a restart).
    #[serde(skip)]
    pub prepared: Option<std::sync::Arc<serde_json::Value>>,
    /// Resources and labels its job needs (from the template; kept in a
    /// record of their own, `WORKFLOW_STEP_NEEDS`).
    #[serde(skip)]
    pub needs: caroni_types::market::Needs,
}

impl Step {
    /// The attempt that may still produce this step's result.
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.is_live())
    }
    /// The state as people read it: `fulfilled` is told apart into
    /// `waiting` (for inputs) and `queued` (for a slot on the agent), and
    /// a step waiting out its back-off is `retrying`.
    pub fn shown_state(&self) -> &'static str {
        match self.state {
            StepState::Fulfilling
                if !self.attempts.is_empty()
                    && self.request.as_ref().is_some_and(|r| r.publish_count == 0) =>
            {
                "retrying"
            }
            StepState::Fulfilled => match self.current().map(|a| a.state) {
                Some(JobState::Queued) => "queued",
                Some(JobState::Running) => "running",
                _ => "waiting",
            },
            s => s.as_str(),
        }
    }

    /// Failed attempts that count against the limit (those a resume
    /// replaced do not).
    pub fn failures(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.state == JobState::Failed && !a.superseded)
            .count()
    }
}

/// A dataflow edge with its value once delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataflow {
    /// `input` or `step/output`.
    pub source: String,
    /// `step/input` or `output` (workflow output).
    pub destination: String,
    /// The value, once known.
    pub value: Option<Value>,
}

/// A workflow run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflow {
    /// Workflow id.
    pub id: Uuid,
    /// Template it was made from.
    pub template: String,
    /// State.
    pub state: WorkflowState,
    /// Why it failed or was cancelled.
    pub message: String,
    /// Created (ms).
    pub created_at_ms: u64,
    /// Last change (ms).
    pub updated_at_ms: u64,
    /// Finished (ms).
    pub finished_at_ms: Option<u64>,
    /// Attempts allowed per step.
    pub max_attempts: u32,
    /// Workflow inputs (given or defaulted).
    pub inputs: BTreeMap<String, Value>,
    /// Workflow outputs: id → source.
    pub output_sources: Vec<(String, Source)>,
    /// Workflow outputs collected so far.
    pub outputs: BTreeMap<String, Value>,
    /// Steps in topological order.
    pub steps: Vec<Step>,
    /// True once data was first sent (every step was fulfilled).
    pub started: bool,
    /// The workflow whose step element this one runs.
    #[serde(skip)]
    pub parent: Option<Parent>,
    /// The parsed template, kept when a step is dynamic (to make its
    /// elements) or an output combines sources.
    #[serde(skip)]
    pub plan: Option<std::sync::Arc<caroni_cwl::Workflow>>,
    /// What it may spend, when it has a budget (a record of its own,
    /// `WORKFLOW_BUDGETS`).
    #[serde(skip)]
    pub budget: Option<WorkflowBudget>,
    /// Its priority among this manager's workflows (higher first): the
    /// order of admission, and of this manager's queued jobs on an agent
    /// (a record of its own when not 0, `WORKFLOW_PRIORITIES`).
    #[serde(skip)]
    pub priority: i32,
}

impl Workflow {
    /// What its ended attempts cost (thousandths of a credit).
    pub fn spent_milli(&self) -> u64 {
        self.steps
            .iter()
            .flat_map(|s| &s.attempts)
            .filter_map(Attempt::charge)
            .sum()
    }

    /// The most its live attempts may still cost.
    pub fn reserved_milli(&self) -> u64 {
        self.steps
            .iter()
            .flat_map(|s| &s.attempts)
            .map(Attempt::reserved)
            .sum()
    }

    /// What is left of its budget for new attempts: the budget less what
    /// ended attempts cost, what live ones may still cost, and the shares
    /// given to element workflows. `None` without a budget.
    pub fn budget_left_milli(&self) -> Option<u64> {
        let b = self.budget.as_ref()?;
        Some(
            b.limit
                .limit_milli
                .saturating_sub(self.spent_milli())
                .saturating_sub(self.reserved_milli())
                .saturating_sub(b.allotted_milli),
        )
    }
}

/// A workflow's budget and what of it went to element workflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowBudget {
    /// The budget.
    pub limit: caroni_types::market::Budget,
    /// Given to element workflows (each spends within its share; what a
    /// share leaves unspent is not given back).
    pub allotted_milli: u64,
}

impl Workflow {
    /// Every dataflow with its value, derived from the steps.
    pub fn dataflows(&self) -> Vec<Dataflow> {
        let mut out = Vec::new();
        for (n, s) in self.steps.iter().enumerate() {
            let plan = self
                .plan
                .as_ref()
                .and_then(|p| p.steps.get(n))
                .filter(|_| s.dynamic);
            match plan {
                // A dynamic step keeps its values by source.
                Some(p) => {
                    for i in &p.inputs {
                        for src in i.all_sources() {
                            out.push(Dataflow {
                                source: src.to_string(),
                                destination: format!("{}/{}", s.id, i.name),
                                value: s.values.get(&src.to_string()).cloned(),
                            });
                        }
                    }
                }
                None => {
                    for i in &s.inputs {
                        if let Some(src) = &i.source {
                            out.push(Dataflow {
                                source: src.to_string(),
                                destination: format!("{}/{}", s.id, i.name),
                                value: s.values.get(&i.name).cloned(),
                            });
                        }
                    }
                }
            }
        }
        for (id, src) in &self.output_sources {
            let all = self
                .plan
                .as_ref()
                .and_then(|p| p.outputs.iter().find(|o| &o.id == id))
                .map(|o| o.all_sources().into_iter().cloned().collect())
                .unwrap_or_else(|| vec![src.clone()]);
            for src in all {
                out.push(Dataflow {
                    source: src.to_string(),
                    destination: id.clone(),
                    value: self.outputs.get(id).cloned(),
                });
            }
        }
        out
    }
}
