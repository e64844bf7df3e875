//! The manager's rules as a pure state machine: events in, effects out,
//! time and fresh ids passed in. No I/O, no clock, no network: every rule
//! of the protocol is unit-testable here.

use std::collections::BTreeMap;

use caroni_cwl::{Kind, Source};
use caroni_types::msg::{JobRequest, Outbound};
use uuid::Uuid;

use crate::model::{
    Attempt, JobState, RequestState, Step, StepInput, StepState, Value, Workflow, WorkflowState,
};

/// Default attempts per step.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// First re-publication delay of an unanswered request; doubles up to
/// [`REPUBLISH_MAX_MS`]. Agents answer a request once (the answer is
/// durable in their outbox), so a re-publication only reaches agents that
/// missed the gossip or joined later; under load an early one is pure
/// cost.
pub const REPUBLISH_MIN_MS: u64 = 1_000;
/// Longest re-publication delay.
pub const REPUBLISH_MAX_MS: u64 = 4_000;
/// How long an agent asked directly has to answer before the next one is
/// asked (or, when every fitting agent was asked, the request is
/// broadcast). Its answer still counts when it comes later.
pub const ASK_WAIT_MS: u64 = 3_000;
/// Default time for agents to answer a request before it counts as
/// blocked (shown with the reason).
pub const DEFAULT_ANSWER_TIMEOUT_MS: u64 = 10_000;
/// Default time a request may stay blocked (every known agent declined,
/// or none answered) before its step, and the workflow, fail.
pub const DEFAULT_UNPLACEABLE_MS: u64 = 300_000;
/// Default delay before a step's first retry; it doubles per failure.
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 1_000;
/// Default longest delay between retries.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 60_000;
/// Failure kinds not retried unless a policy says otherwise: none. Even a
/// job whose stdout was not what its job type declares may succeed when
/// its job type is fixed during the back-off (the original's failure
/// drill); a template that knows better says `CaroniNoRetry: [output]`.
pub const DEFAULT_NO_RETRY: [&str; 0] = [];

/// What the manager knows about the agents beyond one workflow.
pub trait Peers {
    /// When the agent was last heard from at all (any message, any ack).
    fn last_heard_ms(&self, agent: &str) -> Option<u64>;
    /// How many agents answer this manager's requests.
    fn known_agents(&self) -> usize;
    /// Live jobs this manager has placed on the agent.
    fn live_jobs(&self, agent: &str) -> u32;
    /// Whom to ask for a request, from the agents' adverts, leaving out
    /// `exclude` (docs/market.md).
    fn choose(&self, req: &JobRequest, exclude: &[String]) -> crate::market::Choice {
        let _ = (req, exclude);
        crate::market::Choice::Broadcast
    }
    /// Why no advertised agent can ever serve `req`, when adverts are
    /// known and none fits.
    fn none_fits(&self, req: &JobRequest) -> Option<String> {
        let _ = req;
        None
    }
}

/// No knowledge beyond the workflow: every offer is taken at once.
#[derive(Debug, Default)]
pub struct NoPeers;

impl Peers for NoPeers {
    fn last_heard_ms(&self, _: &str) -> Option<u64> {
        None
    }
    fn known_agents(&self) -> usize {
        0
    }
    fn live_jobs(&self, _: &str) -> u32 {
        0
    }
}

/// Files this manager holds, read for `loadContents` of a step input.
pub trait Blobs {
    /// The first `limit` bytes of a file, or `None` when it is not here.
    fn head(&self, file: &caroni_types::file::FileRef, limit: usize) -> Option<Vec<u8>>;
}

impl Blobs for NoPeers {
    fn head(&self, _: &caroni_types::file::FileRef, _: usize) -> Option<Vec<u8>> {
        None
    }
}

/// What the machine needs from the outside world.
pub struct Ctx<'a> {
    /// Now, in ms since the epoch.
    pub now_ms: u64,
    /// Silence after which a live job counts as lost.
    pub lease_ms: u64,
    /// Lifetime of a request.
    pub request_ttl_ms: u64,
    /// This manager's peer endpoint (put in requests).
    pub endpoint: &'a str,
    /// Fresh ids.
    pub new_id: &'a mut dyn FnMut() -> Uuid,
    /// How long to gather offers for a request before taking the best
    /// (0: take the first). Never waited once every known agent answered.
    pub offer_window_ms: u64,
    /// The agents as the manager knows them.
    pub peers: &'a dyn Peers,
    /// The files this manager holds.
    pub blobs: &'a dyn Blobs,
    /// How long agents have to answer a request before it counts as
    /// blocked.
    pub answer_timeout_ms: u64,
    /// How long a request may stay blocked before its step fails.
    pub unplaceable_ms: u64,
}

/// An effect for the service to perform after persisting the workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send directly (through the outbox, in the same batch).
    Send(Outbound),
    /// Publish a request on gossip.
    Publish(JobRequest),
    /// Make a child workflow that runs one element of a dynamic step.
    Spawn(Spawn),
    /// Every element of a dynamic step ended: hand their outputs to
    /// [`Workflow::on_gathered`].
    Gather(usize),
}

/// A child workflow to make: element `index` of dynamic step `step`, with
/// its inputs (as they travel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spawn {
    /// The step (index).
    pub step: usize,
    /// The element.
    pub index: u64,
    /// The child's inputs.
    pub inputs: BTreeMap<String, String>,
}

/// Why a message was refused: the sender has no right to say it (one
/// type across the crates).
pub use caroni_types::delivery::Refusal;

/// Why a workflow cannot be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// A required input is missing.
    #[error("missing workflow input `{0}`; give it as {0}=VALUE")]
    MissingInput(String),
    /// An input the template does not declare.
    #[error("unknown workflow input `{0}`; the template's inputs are: {1}")]
    UnknownInput(String, String),
    /// A value no job could be given.
    #[error("workflow input `{0}` {1}")]
    BadValue(String, String),
}

/// Largest workflow input value, in bytes. Values travel in messages of
/// at most 4 MiB together with the rest of a job's data.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Largest sum of a workflow's input values, in bytes.
pub const MAX_INPUTS_BYTES: usize = 2 << 20;

/// Checks that a given value is what its input carries: a File input
/// takes one File reference, a `File[]` input a list of them (or `[]`),
/// and any other input a value that is not a File reference (no string
/// may pass for a file).
fn check_kind(name: &str, kind: Kind, v: &str) -> Result<(), CreateError> {
    use caroni_types::file::{files_of, Files};
    if v == "null" {
        // Absent: the process decides whether it may be.
        return Ok(());
    }
    let files = files_of(v);
    if kind == Kind::Data {
        // JSON whose Files and Directories must all be references; any
        // other text is a plain value, read by the consuming tool's type.
        let t = v.trim_start();
        if t.starts_with('{') || t.starts_with('[') {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(t) {
                caroni_types::file::data_refs(&json, &mut Vec::new()).map_err(|e| {
                    CreateError::BadValue(
                        name.to_string(),
                        format!("holds a file that is not an uploaded reference: {e}"),
                    )
                })?;
            }
        }
        return Ok(());
    }
    let ok = match kind {
        Kind::Value => files == Files::None && caroni_types::file::refs_in(v).is_empty(),
        Kind::File => matches!(files, Files::One(_)),
        Kind::Files => matches!(files, Files::Many(_)) || v.trim() == "[]",
        Kind::Data => true,
    };
    if ok {
        return Ok(());
    }
    Err(CreateError::BadValue(
        name.to_string(),
        match kind {
            Kind::Value => "is a File reference, but the input is not declared `type: File`; declare it File or pass text".into(),
            Kind::File => format!("is declared `File` but was given text, not a File reference; upload the file and pass its reference (caroni run TEMPLATE {name}=@path does both)"),
            Kind::Files => format!("is declared `File[]` but was not given a JSON list of File references; give {name}=@path,@path to upload the files"),
            Kind::Data => String::new(),
        },
    ))
}

impl Workflow {
    /// A new workflow from a validated template.
    pub fn create(
        id: Uuid,
        template: &str,
        wf: &caroni_cwl::Workflow,
        given: BTreeMap<String, String>,
        now_ms: u64,
    ) -> Result<Self, CreateError> {
        let declared: Vec<&str> = wf.inputs.iter().map(|i| i.id.as_str()).collect();
        for (k, v) in &given {
            if !declared.contains(&k.as_str()) {
                return Err(CreateError::UnknownInput(
                    k.chars().take(64).collect(),
                    declared.join(", "),
                ));
            }
            if v.contains('\0') {
                return Err(CreateError::BadValue(
                    k.clone(),
                    "contains a NUL character; values must be text without NUL".into(),
                ));
            }
            if v.len() > MAX_INPUT_BYTES {
                return Err(CreateError::BadValue(
                    k.clone(),
                    format!(
                        "is {} bytes long; at most {MAX_INPUT_BYTES} bytes are accepted (pass a path or URL to larger data)",
                        v.len()
                    ),
                ));
            }
        }
        let total: usize = given.values().map(String::len).sum();
        if total > MAX_INPUTS_BYTES {
            return Err(CreateError::BadValue(
                "values".into(),
                format!("add up to {total} bytes; at most {MAX_INPUTS_BYTES} bytes are accepted"),
            ));
        }
        let mut inputs = BTreeMap::new();
        for i in &wf.inputs {
            if let Some(v) = given.get(&i.id) {
                check_kind(&i.id, i.kind, v)?;
                if let Some(ty) = &i.cwl_type {
                    caroni_cwl::check_input(ty, v).map_err(|wanted| {
                        CreateError::BadValue(
                            i.id.clone(),
                            format!(
                                "is `{}`, but its type is {ty}: give {wanted}",
                                v.chars().take(64).collect::<String>()
                            ),
                        )
                    })?;
                }
            }
            match given.get(&i.id).or(i.default.as_ref()) {
                Some(v) => {
                    inputs.insert(i.id.clone(), Value::from(v.as_str()));
                }
                None => return Err(CreateError::MissingInput(i.id.clone())),
            }
        }
        let steps = wf
            .steps
            .iter()
            .map(|s| {
                let mut values = BTreeMap::new();
                if s.dynamic.is_some() {
                    // Kept by source: the step combines them when all are
                    // known.
                    for i in &s.inputs {
                        for src in i.all_sources() {
                            if let Source::Input(name) = src {
                                if let Some(v) = inputs.get(name) {
                                    values.insert(src.to_string(), v.clone());
                                }
                            }
                        }
                    }
                }
                for i in s.inputs.iter().filter(|_| s.dynamic.is_none()) {
                    let v = match &i.source {
                        Some(Source::Input(name)) => inputs
                            .get(name)
                            .map(|v| report::or_default(v, i.default.as_deref())),
                        Some(Source::StepOutput { .. }) => None,
                        None => None,
                    };
                    if let Some(v) = v.or_else(|| match &i.source {
                        Some(Source::StepOutput { .. }) => None,
                        _ => i.default.as_deref().map(Value::from),
                    }) {
                        values.insert(i.name.clone(), v);
                    }
                }
                Step {
                    policy: s.retry.clone(),
                    id: s.id.clone(),
                    job_type: s.job_type.clone(),
                    job_kvs: s.job_kvs.clone(),
                    inputs: s
                        .inputs
                        .iter()
                        .map(|i| StepInput {
                            name: i.name.clone(),
                            source: i.source.clone(),
                            default: i.default.clone(),
                        })
                        .collect(),
                    outputs: s.outputs.clone(),
                    state: StepState::Created,
                    values,
                    results: BTreeMap::new(),
                    request: None,
                    attempts: Vec::new(),
                    dynamic: s.dynamic.is_some(),
                    fan: None,
                    prepared: None,
                    needs: s.needs.clone(),
                }
            })
            .collect();
        Ok(Workflow {
            id,
            template: template.to_string(),
            state: WorkflowState::Created,
            message: String::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            finished_at_ms: None,
            max_attempts: wf.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            inputs,
            output_sources: wf
                .outputs
                .iter()
                .map(|o| (o.id.clone(), o.source.clone()))
                .collect(),
            outputs: BTreeMap::new(),
            steps,
            started: false,
            parent: None,
            plan: None,
            budget: wf.budget.map(|limit| crate::model::WorkflowBudget {
                limit,
                allotted_milli: 0,
            }),
            priority: wf.priority,
        })
    }

    /// Creates a request for every step and publishes them.
    pub fn start(&mut self, ctx: &mut Ctx<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state != WorkflowState::Created {
            return fx;
        }
        self.state = WorkflowState::Initializing;
        self.launch(ctx, &mut fx);
        fx
    }

    /// Asks for a job for every step in `created` and expands the dynamic
    /// ones whose inputs are known (at start, and on a resume).
    fn launch(&mut self, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        for n in 0..self.steps.len() {
            if self.steps[n].state == StepState::Created && !self.steps[n].dynamic {
                self.new_request(n, ctx, 0, fx);
            }
        }
        for n in 0..self.steps.len() {
            if self.state.is_final() {
                break;
            }
            self.try_expand(n, ctx, fx);
        }
        if !self.state.is_final() {
            // A workflow of dynamic steps only has nothing to wait for.
            self.maybe_run(fx);
            self.maybe_complete(ctx, fx);
        }
        self.touch(ctx);
    }

    /// Why this workflow cannot be resumed, if so: it has not failed or
    /// been cancelled, or it runs an element of another's step.
    pub fn resumable(&self) -> Result<(), String> {
        if !matches!(self.state, WorkflowState::Failed | WorkflowState::Cancelled) {
            return Err(format!(
                "workflow {} is {}; only a failed or cancelled workflow can be retried",
                self.id,
                self.state.as_str()
            ));
        }
        if let Some(p) = self.parent {
            return Err(format!(
                "workflow {} runs element {} of a step of workflow {}; retry that workflow",
                self.id, p.index, p.id
            ));
        }
        Ok(())
    }

    /// A user resumes a failed or cancelled workflow: completed (and
    /// skipped) steps keep their outputs; every other step starts afresh,
    /// its earlier attempts kept in its history as superseded (they no
    /// longer count against its limit). A dynamic step that had not
    /// completed expands again.
    pub fn resume(&mut self, ctx: &mut Ctx<'_>) -> Result<Vec<Effect>, String> {
        self.resumable()?;
        self.state = WorkflowState::Initializing;
        self.message.clear();
        self.finished_at_ms = None;
        let mut fx = Vec::new();
        for step in &mut self.steps {
            if matches!(step.state, StepState::Completed | StepState::Skipped) {
                continue;
            }
            for a in &mut step.attempts {
                if a.state.is_final() && a.state != JobState::Completed {
                    a.superseded = true;
                }
            }
            step.state = StepState::Created;
            step.request = None;
            step.results.clear();
            step.fan = None;
            step.prepared = None;
        }
        self.launch(ctx, &mut fx);
        Ok(fx)
    }

    fn touch(&mut self, ctx: &Ctx<'_>) {
        self.updated_at_ms = ctx.now_ms;
    }

    /// (step index, attempt index) of a job.
    pub fn find_job(&self, job_id: Uuid) -> Option<(usize, usize)> {
        self.steps.iter().enumerate().find_map(|(n, s)| {
            s.attempts
                .iter()
                .position(|a| a.job_id == Some(job_id))
                .map(|k| (n, k))
        })
    }

    /// Every job that may still run somewhere, with its agent.
    pub fn live_jobs(&self) -> impl Iterator<Item = (Uuid, &Attempt)> {
        self.steps
            .iter()
            .flat_map(|s| s.attempts.iter())
            .filter(|a| a.is_live())
            .filter_map(|a| a.job_id.map(|j| (j, a)))
    }

    /// Every request id still open.
    pub fn open_requests(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.steps
            .iter()
            .filter_map(|s| s.request.as_ref())
            .filter(|r| r.state == RequestState::Fulfilling)
            .map(|r| r.id)
    }
}

mod dynamic;
mod fulfil;
mod receipts;
mod report;

pub use dynamic::FAN_WINDOW;
mod timers;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
