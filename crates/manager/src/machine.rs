//! The manager's rules as a pure state machine: events in, effects out,
//! time and fresh ids passed in. No I/O, no clock, no network: every rule
//! of the protocol is unit-testable here.

use std::collections::BTreeMap;

use caroni_cwl::Source;
use caroni_types::msg::{JobRequest, JobState, Load, Msg, Outbound, StatusUpdate};
use uuid::Uuid;

use crate::model::{
    Attempt, Candidate, Request, RequestState, Step, StepInput, StepState, Value, Workflow,
    WorkflowState,
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

/// What the manager knows about the agents beyond one workflow.
pub trait Peers {
    /// When the agent was last heard from at all (any message, any ack).
    fn last_heard_ms(&self, agent: &str) -> Option<u64>;
    /// How many agents answer this manager's requests.
    fn known_agents(&self) -> usize;
    /// Live jobs this manager has placed on the agent.
    fn live_jobs(&self, agent: &str) -> u32;
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
}

/// An effect for the service to perform after persisting the workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send directly (through the outbox, in the same batch).
    Send(Outbound),
    /// Publish a request on gossip.
    Publish(JobRequest),
}

/// Why a message was refused: the sender has no right to say it (one
/// type across the crates).
pub use caroni_types::delivery::Refusal;

/// When each timer of one step is due (ms since the epoch).
#[derive(Debug, Default)]
struct StepTimers {
    /// The open request expires.
    expire: Option<u64>,
    /// The offer window of the open request closes.
    decide: Option<u64>,
    /// The open request is published again.
    publish: Option<u64>,
    /// The current job counts as lost.
    lost: Option<u64>,
    /// The current job is asked about.
    probe: Option<u64>,
    /// When its agent was last heard from (for the lost job's message).
    agent_heard: u64,
}

impl StepTimers {
    fn first(&self) -> Option<u64> {
        [
            self.expire,
            self.decide,
            self.publish,
            self.lost,
            self.probe,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

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
                for i in &s.inputs {
                    let v = match &i.source {
                        Some(Source::Input(name)) => inputs.get(name).cloned(),
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
        })
    }

    /// Creates a request for every step and publishes them.
    pub fn start(&mut self, ctx: &mut Ctx<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state != WorkflowState::Created {
            return fx;
        }
        self.state = WorkflowState::Initializing;
        for n in 0..self.steps.len() {
            self.new_request(n, ctx, &mut fx);
        }
        self.touch(ctx);
        fx
    }

    fn touch(&mut self, ctx: &Ctx<'_>) {
        self.updated_at_ms = ctx.now_ms;
    }

    fn new_request(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let id = (ctx.new_id)();
        let step = &mut self.steps[n];
        step.state = StepState::Fulfilling;
        step.results.clear();
        step.request = Some(Request {
            id,
            state: RequestState::Fulfilling,
            created_at_ms: ctx.now_ms,
            expires_at_ms: ctx.now_ms + ctx.request_ttl_ms,
            publish_count: 0,
            next_publish_at_ms: ctx.now_ms,
            declines: Vec::new(),
            candidates: Vec::new(),
            answered: Vec::new(),
            decide_at_ms: None,
        });
        self.publish_due(n, ctx, fx);
    }

    /// Publishes the step's request if it is due, and schedules the next
    /// publication with exponential backoff.
    fn publish_due(&mut self, n: usize, ctx: &Ctx<'_>, fx: &mut Vec<Effect>) {
        let step = &mut self.steps[n];
        let Some(req) = step.request.as_mut() else {
            return;
        };
        if req.state != RequestState::Fulfilling || req.next_publish_at_ms > ctx.now_ms {
            return;
        }
        req.publish_count += 1;
        let known = ctx.peers.known_agents();
        let delay = if known > 0 && req.answered.len() >= known {
            // Every agent we know has answered: only a newcomer could.
            REPUBLISH_MAX_MS
        } else {
            (REPUBLISH_MIN_MS << (req.publish_count - 1).min(10)).min(REPUBLISH_MAX_MS)
        };
        req.next_publish_at_ms = ctx.now_ms + delay;
        fx.push(Effect::Publish(JobRequest {
            request_id: req.id,
            job_type: step.job_type.clone(),
            parameter_keys: step.inputs.iter().map(|i| i.name.clone()).collect(),
            output_keys: step.outputs.clone(),
            job_kvs: step.job_kvs.clone(),
            expires_at_ms: req.expires_at_ms,
            manager_endpoint: ctx.endpoint.to_string(),
            publish_count: req.publish_count,
            workflow_id: Some(self.id),
        }));
    }

    fn find_request(&self, request_id: Uuid) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| s.request.as_ref().is_some_and(|r| r.id == request_id))
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

    /// An agent offers to serve a request. The offer is gathered with the
    /// others for the request; the request is decided (the least busy
    /// agent taken, the others rejected) at once when every known agent
    /// has answered or no window is set, else when the window closes.
    #[allow(clippy::too_many_arguments)]
    pub fn on_offer(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        endpoint: &str,
        request_id: Uuid,
        offer_id: Uuid,
        expires_at_ms: u64,
        load: Load,
    ) -> Vec<Effect> {
        let reject = || {
            vec![Effect::Send(Outbound {
                to: agent.to_string(),
                endpoint: endpoint.to_string(),
                msg: Msg::Reject {
                    offer_id,
                    request_id,
                },
            })]
        };
        // A re-sent offer we already accepted or hold: nothing new.
        if self
            .steps
            .iter()
            .any(|s| s.attempts.iter().any(|a| a.offer_id == Some(offer_id)))
        {
            return Vec::new();
        }
        let Some(n) = self.find_request(request_id) else {
            return reject();
        };
        let open = !self.state.is_final()
            && self.steps[n].state == StepState::Fulfilling
            && self.steps[n].request.as_ref().is_some_and(|r| {
                r.state == RequestState::Fulfilling && r.expires_at_ms > ctx.now_ms
            });
        if !open || expires_at_ms <= ctx.now_ms {
            return reject();
        }
        let Some(req) = self.steps[n].request.as_mut() else {
            return reject();
        };
        if req.candidates.iter().any(|c| c.offer_id == offer_id) {
            return Vec::new();
        }
        req.candidates.push(Candidate {
            agent: agent.to_string(),
            endpoint: endpoint.to_string(),
            offer_id,
            expires_at_ms,
            load,
        });
        if !req.answered.iter().any(|a| a == agent) {
            req.answered.push(agent.to_string());
        }
        let everyone = req.answered.len() >= ctx.peers.known_agents();
        if ctx.offer_window_ms == 0 || everyone {
            let mut fx = Vec::new();
            self.decide(n, ctx, &mut fx);
            return fx;
        }
        if req.decide_at_ms.is_none() {
            req.decide_at_ms = Some(ctx.now_ms + ctx.offer_window_ms);
        }
        Vec::new()
    }

    /// Takes the least busy of the offers gathered for step `n`'s request
    /// and rejects the others.
    fn decide(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(req) = self.steps[n].request.as_mut() else {
            return;
        };
        req.decide_at_ms = None;
        let candidates = std::mem::take(&mut req.candidates);
        let request_id = req.id;
        let now = ctx.now_ms;
        let best = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.expires_at_ms > now)
            .min_by(|(i, a), (j, b)| {
                let la = a.load.per_slot(ctx.peers.live_jobs(&a.agent));
                let lb = b.load.per_slot(ctx.peers.live_jobs(&b.agent));
                la.total_cmp(&lb).then(i.cmp(j))
            })
            .map(|(i, _)| i);
        for (i, c) in candidates.into_iter().enumerate() {
            if Some(i) == best {
                fx.push(self.accept_offer(n, ctx, c));
            } else {
                fx.push(Effect::Send(Outbound {
                    to: c.agent,
                    endpoint: c.endpoint,
                    msg: Msg::Reject {
                        offer_id: c.offer_id,
                        request_id,
                    },
                }));
            }
        }
    }

    /// Turns an offer into the step's new attempt and accepts it.
    fn accept_offer(&mut self, n: usize, ctx: &mut Ctx<'_>, c: Candidate) -> Effect {
        let job_id = (ctx.new_id)();
        let step = &mut self.steps[n];
        let mut request_id = Uuid::nil();
        if let Some(r) = step.request.as_mut() {
            r.state = RequestState::Fulfilled;
            request_id = r.id;
        }
        step.attempts.push(Attempt {
            job_id: Some(job_id),
            request_id,
            offer_id: Some(c.offer_id),
            agent: c.agent.clone(),
            endpoint: c.endpoint.clone(),
            state: JobState::Pending,
            accepted: false,
            superseded: false,
            started_at_ms: ctx.now_ms,
            ended_at_ms: None,
            last_heard_ms: ctx.now_ms,
            last_probe_ms: ctx.now_ms,
            status_seq: 0,
            exit_status: None,
            message: String::new(),
            stderr_tail: String::new(),
        });
        self.touch(ctx);
        Effect::Send(Outbound {
            to: c.agent,
            endpoint: c.endpoint,
            msg: Msg::Accept {
                offer_id: c.offer_id,
                request_id,
                job_id,
            },
        })
    }

    /// An agent declines a request. Declines never end a request; the last
    /// one of the known agents to answer closes the offer window.
    pub fn on_decline(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        request_id: Uuid,
        reason: &str,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(n) = self.find_request(request_id) else {
            return fx;
        };
        let Some(r) = self.steps[n].request.as_mut() else {
            return fx;
        };
        r.declines.push((agent.to_string(), reason.to_string()));
        if r.declines.len() > 8 {
            r.declines.remove(0);
        }
        if !r.answered.iter().any(|a| a == agent) {
            r.answered.push(agent.to_string());
        }
        if r.state == RequestState::Fulfilling
            && !r.candidates.is_empty()
            && r.answered.len() >= ctx.peers.known_agents()
        {
            self.decide(n, ctx, &mut fx);
        }
        fx
    }

    /// Checks that `agent` holds the job; returns its place.
    fn holder(&self, agent: &str, job_id: Uuid) -> Result<(usize, usize), Refusal> {
        let (n, k) = self
            .find_job(job_id)
            .ok_or_else(|| Refusal(format!("job {job_id} is not part of workflow {}", self.id)))?;
        if self.steps[n].attempts[k].agent != agent {
            return Err(Refusal(format!(
                "node {agent} does not hold job {job_id}; only the agent that holds a job may report on it"
            )));
        }
        Ok((n, k))
    }

    /// Tells an agent to drop a job the workflow no longer needs.
    fn kill(a: &Attempt, reason: &str) -> Option<Effect> {
        a.job_id.map(|job_id| {
            Effect::Send(Outbound {
                to: a.agent.clone(),
                endpoint: a.endpoint.clone(),
                msg: Msg::Kill {
                    job_id,
                    reason: reason.to_string(),
                },
            })
        })
    }

    /// The agent created the job.
    pub fn on_accepted(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        job_id: Uuid,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, job_id)?;
        let mut fx = Vec::new();
        let a = &mut self.steps[n].attempts[k];
        a.last_heard_ms = ctx.now_ms;
        if a.superseded || self.state.is_final() {
            fx.extend(Self::kill(a, "superseded"));
            return Ok(fx);
        }
        if a.accepted {
            return Ok(fx);
        }
        self.accept_attempt(n, k, &mut fx);
        self.touch(ctx);
        Ok(fx)
    }

    /// Records that the agent holds the job of attempt `k` of step `n`.
    fn accept_attempt(&mut self, n: usize, k: usize, fx: &mut Vec<Effect>) {
        let a = &mut self.steps[n].attempts[k];
        // No status request here: the agent reports every change of the
        // job by itself, and the lease probes a job that falls silent.
        a.accepted = true;
        a.last_probe_ms = a.last_heard_ms;
        if self.steps[n].state == StepState::Fulfilling {
            self.steps[n].state = StepState::Fulfilled;
        }
        if self.started {
            // A re-fulfilled step: send again what it already had.
            self.send_values(n, fx);
        }
        self.maybe_run(fx);
    }

    /// True when no step waits for a job.
    fn all_fulfilled(&self) -> bool {
        self.steps.iter().all(|s| {
            matches!(
                s.state,
                StepState::Fulfilled | StepState::Running | StepState::Completed
            )
        })
    }

    /// Starts data flowing once every step is fulfilled; leaves `stalled`
    /// when every step is fulfilled again.
    fn maybe_run(&mut self, fx: &mut Vec<Effect>) {
        if !self.all_fulfilled() {
            return;
        }
        if !self.started {
            self.started = true;
            for n in 0..self.steps.len() {
                self.send_values(n, fx);
            }
        }
        if matches!(
            self.state,
            WorkflowState::Initializing | WorkflowState::Stalled
        ) {
            self.state = WorkflowState::Running;
        }
    }

    /// Sends every known input value of step `n` to its accepted job (when
    /// data starts flowing, or to a job that replaces a failed one).
    fn send_values(&self, n: usize, fx: &mut Vec<Effect>) {
        let step = &self.steps[n];
        self.send_items(n, step.values.clone(), fx);
    }

    /// Sends `items` (input name → value) to step `n`'s accepted job.
    fn send_items(&self, n: usize, items: BTreeMap<String, Value>, fx: &mut Vec<Effect>) {
        let step = &self.steps[n];
        if items.is_empty() || step.state == StepState::Completed {
            return;
        }
        if let Some(a) = step.current().filter(|a| a.accepted) {
            if let Some(job_id) = a.job_id {
                fx.push(Effect::Send(Outbound {
                    to: a.agent.clone(),
                    endpoint: a.endpoint.clone(),
                    msg: Msg::Data {
                        job_id,
                        items: items.into_iter().map(|(k, v)| (k, v.to_string())).collect(),
                        outputs: false,
                    },
                }));
            }
        }
    }

    /// Outputs of a job.
    pub fn on_data(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        job_id: Uuid,
        items: &BTreeMap<String, String>,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, job_id)?;
        let step = &mut self.steps[n];
        let a = &mut step.attempts[k];
        a.last_heard_ms = ctx.now_ms;
        if a.superseded || self.state.is_final() || !a.is_live() {
            return Ok(Vec::new());
        }
        for (name, value) in items {
            if step.outputs.contains(name) {
                step.results
                    .insert(name.clone(), Value::from(value.as_str()));
            }
        }
        self.touch(ctx);
        Ok(Vec::new())
    }

    /// A status report from the agent holding a job.
    pub fn on_status(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        update: &StatusUpdate,
    ) -> Result<Vec<Effect>, Refusal> {
        let (n, k) = self.holder(agent, update.job_id)?;
        let mut fx = Vec::new();
        {
            let a = &mut self.steps[n].attempts[k];
            a.last_heard_ms = ctx.now_ms;
            if a.superseded || self.state.is_final() || a.state.is_final() {
                // Late news of a job nobody needs any more: drop it.
                if !update.state.is_final() {
                    fx.extend(Self::kill(
                        a,
                        "superseded: the manager no longer needs this job",
                    ));
                }
                return Ok(fx);
            }
            if update.sequence <= a.status_seq {
                return Ok(fx);
            }
            if !a.accepted {
                // News of the job implies the agent holds it, even if its
                // JobAccepted has not arrived yet.
                self.accept_attempt(n, k, &mut fx);
            }
            let a = &mut self.steps[n].attempts[k];
            a.status_seq = update.sequence;
            a.state = update.state;
            a.exit_status = update.exit_status;
            a.message = update.message.clone();
            a.stderr_tail = update.stderr_tail.clone();
            if update.state.is_final() {
                a.ended_at_ms = Some(ctx.now_ms);
            }
        }
        match update.state {
            JobState::Pending | JobState::Queued => {}
            JobState::Running => {
                if self.steps[n].state == StepState::Fulfilled {
                    self.steps[n].state = StepState::Running;
                }
            }
            JobState::Completed => {
                let step = &self.steps[n];
                let missing: Vec<&str> = step
                    .outputs
                    .iter()
                    .filter(|o| !step.results.contains_key(*o))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    self.complete_step(n, ctx, &mut fx);
                } else {
                    let msg = format!("completed without output(s) {}", missing.join(", "));
                    self.steps[n].attempts[k].state = JobState::Failed;
                    self.steps[n].attempts[k].message = msg.clone();
                    self.fail_attempt(n, ctx, &msg, &mut fx);
                }
            }
            JobState::Failed => {
                let msg = update.message.clone();
                self.fail_attempt(n, ctx, &msg, &mut fx);
            }
        }
        self.touch(ctx);
        Ok(fx)
    }

    fn complete_step(&mut self, n: usize, ctx: &Ctx<'_>, fx: &mut Vec<Effect>) {
        self.steps[n].state = StepState::Completed;
        let id = self.steps[n].id.clone();
        let results = self.steps[n].results.clone();
        for (output, value) in &results {
            let from = Source::StepOutput {
                step: id.clone(),
                output: output.clone(),
            };
            for m in 0..self.steps.len() {
                // Only the values that arrive now: what the job had before
                // was sent before (values are sent once).
                let items: BTreeMap<String, Value> = self.steps[m]
                    .inputs
                    .iter()
                    .filter(|i| i.source.as_ref() == Some(&from))
                    .map(|i| (i.name.clone(), value.clone()))
                    .collect();
                for (name, v) in &items {
                    self.steps[m].values.insert(name.clone(), v.clone());
                }
                if self.started {
                    self.send_items(m, items, fx);
                }
            }
            for (wid, src) in &self.output_sources {
                if *src == from {
                    self.outputs.insert(wid.clone(), value.clone());
                }
            }
        }
        if self.steps.iter().all(|s| s.state == StepState::Completed) {
            self.state = WorkflowState::Completed;
            self.finished_at_ms = Some(ctx.now_ms);
        }
    }

    /// The current attempt of step `n` failed: retry or give up.
    fn fail_attempt(&mut self, n: usize, ctx: &mut Ctx<'_>, why: &str, fx: &mut Vec<Effect>) {
        if let Some(a) = self.steps[n].attempts.last_mut() {
            a.superseded = true;
            if a.state != JobState::Failed {
                // Lost or timed out on our side: tell the agent to drop it.
                a.state = JobState::Failed;
                a.ended_at_ms = Some(ctx.now_ms);
                if a.message.is_empty() {
                    a.message = why.to_string();
                }
                fx.extend(Self::kill(a, why));
            }
        }
        let failures = self.steps[n].failures() as u32;
        if failures >= self.max_attempts {
            self.steps[n].state = StepState::Failed;
            self.finish(
                WorkflowState::Failed,
                format!(
                    "step {} failed {failures} time(s), the limit; last error: {why}",
                    self.steps[n].id
                ),
                ctx,
                fx,
            );
            return;
        }
        if self.state == WorkflowState::Running {
            self.state = WorkflowState::Stalled;
        }
        self.new_request(n, ctx, fx);
    }

    /// Ends the workflow, killing every live job and withdrawing requests.
    fn finish(
        &mut self,
        state: WorkflowState,
        message: String,
        ctx: &Ctx<'_>,
        fx: &mut Vec<Effect>,
    ) {
        self.state = state;
        self.message = message;
        self.finished_at_ms = Some(ctx.now_ms);
        for step in &mut self.steps {
            if let Some(r) = step.request.as_mut() {
                if r.state == RequestState::Fulfilling {
                    r.state = RequestState::Unanswered;
                    r.decide_at_ms = None;
                    for c in r.candidates.drain(..) {
                        fx.push(Effect::Send(Outbound {
                            to: c.agent,
                            endpoint: c.endpoint,
                            msg: Msg::Reject {
                                offer_id: c.offer_id,
                                request_id: r.id,
                            },
                        }));
                    }
                }
            }
            for a in &mut step.attempts {
                if a.is_live() {
                    a.superseded = true;
                    fx.extend(Self::kill(a, state.as_str()));
                }
            }
        }
    }

    /// A user cancels the workflow.
    pub fn cancel(&mut self, ctx: &mut Ctx<'_>, reason: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        if !self.state.is_final() {
            self.finish(WorkflowState::Cancelled, reason.to_string(), ctx, &mut fx);
            self.touch(ctx);
        }
        fx
    }

    /// When each timer of step `n` is due (ms): the one function of the
    /// state that both [`Workflow::tick`] (what is due now) and
    /// [`Workflow::next_deadline`] (when to wake) read, so the two never
    /// disagree.
    fn timers(&self, n: usize, lease_ms: u64, peers: &dyn Peers) -> StepTimers {
        let mut t = StepTimers::default();
        let step = &self.steps[n];
        if let Some(r) = step
            .request
            .as_ref()
            .filter(|r| r.state == RequestState::Fulfilling)
        {
            t.expire = Some(r.expires_at_ms);
            t.decide = r.decide_at_ms;
            t.publish = Some(r.next_publish_at_ms);
        }
        if let Some(a) = step.current() {
            // The job's own silence, and the agent's: an agent that is
            // heard from (its messages, its acks) holds its jobs even when
            // their news waits in a long queue. Lost after a lease of the
            // agent's silence; probed a third of a lease into it, or once
            // a lease about a silent job of a live agent.
            let probe_every = (lease_ms / 3).max(1);
            let agent_heard = peers
                .last_heard_ms(&a.agent)
                .unwrap_or(0)
                .max(a.last_heard_ms);
            t.agent_heard = agent_heard;
            t.lost = Some(agent_heard + lease_ms);
            if a.job_id.is_some() {
                let silent_agent = agent_heard.max(a.last_probe_ms) + probe_every;
                let live_agent = (a.last_heard_ms + probe_every).max(a.last_probe_ms + lease_ms);
                t.probe = Some(silent_agent.min(live_agent));
            }
        }
        t
    }

    /// Timers: re-publication, request expiry, lease probes and lost jobs.
    pub fn tick(&mut self, ctx: &mut Ctx<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state.is_final() {
            return fx;
        }
        let now = ctx.now_ms;
        let due = |at: Option<u64>| at.is_some_and(|at| at <= now);
        for n in 0..self.steps.len() {
            if self.state.is_final() {
                break;
            }
            let t = self.timers(n, ctx.lease_ms, ctx.peers);
            if due(t.expire) {
                let req_id = self.steps[n]
                    .request
                    .as_ref()
                    .map(|r| r.id)
                    .unwrap_or_default();
                if let Some(r) = self.steps[n].request.as_mut() {
                    r.state = RequestState::Expired;
                }
                let msg = format!(
                    "no agent offered to run job type {} before the request expired",
                    self.steps[n].job_type
                );
                self.steps[n].attempts.push(Attempt {
                    job_id: None,
                    request_id: req_id,
                    offer_id: None,
                    agent: String::new(),
                    endpoint: String::new(),
                    state: JobState::Failed,
                    accepted: false,
                    superseded: true,
                    started_at_ms: ctx.now_ms,
                    ended_at_ms: Some(ctx.now_ms),
                    last_heard_ms: ctx.now_ms,
                    last_probe_ms: ctx.now_ms,
                    status_seq: 0,
                    exit_status: None,
                    message: msg.clone(),
                    stderr_tail: String::new(),
                });
                self.fail_attempt(n, ctx, &msg, &mut fx);
                continue;
            }
            if due(t.decide) {
                self.decide(n, ctx, &mut fx);
                // All gathered offers may have expired: publish again.
                if let Some(r) = self.steps[n].request.as_mut() {
                    if r.state == RequestState::Fulfilling {
                        r.next_publish_at_ms = r.next_publish_at_ms.min(ctx.now_ms);
                    }
                }
            }
            self.publish_due(n, ctx, &mut fx);
            // Deciding may have placed a job: its timers, afresh.
            let t = self.timers(n, ctx.lease_ms, ctx.peers);
            let Some(a) = self.steps[n].current().cloned() else {
                continue;
            };
            if due(t.lost) {
                let silent = ctx.now_ms.saturating_sub(t.agent_heard);
                let msg = format!(
                    "agent {} was silent for {} s (lease {} s); counted as lost",
                    a.agent,
                    silent / 1000,
                    ctx.lease_ms / 1000
                );
                self.fail_attempt(n, ctx, &msg, &mut fx);
            } else if due(t.probe) {
                if let (Some(job_id), Some(cur)) = (a.job_id, self.steps[n].attempts.last_mut()) {
                    cur.last_probe_ms = ctx.now_ms;
                    fx.push(Effect::Send(Outbound {
                        to: a.agent.clone(),
                        endpoint: a.endpoint.clone(),
                        msg: Msg::StatusRequest { job_id },
                    }));
                }
            }
        }
        if !fx.is_empty() {
            self.touch(ctx);
        }
        fx
    }

    /// When [`Workflow::tick`] next has something to do.
    pub fn next_deadline(&self, lease_ms: u64, peers: &dyn Peers) -> Option<u64> {
        if self.state.is_final() {
            return None;
        }
        (0..self.steps.len())
            .filter_map(|n| self.timers(n, lease_ms, peers).first())
            .min()
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
