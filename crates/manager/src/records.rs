//! How workflows are laid out on disk: a head record per workflow (state,
//! times), one record per step (its request, results' names, attempts),
//! and one record per value (a workflow input or output, a step's input
//! or result). A message writes what it changed: the head and the step it
//! touched, and only the values it set, so that a workflow with large
//! values that waits and re-publishes its requests writes a few hundred
//! bytes, not its values again. Records of earlier layouts (one whole
//! workflow per key; heads and steps with their values) are converted at
//! start.
//!
//! (Over 600 lines: the current layout, its codecs and the conversion of
//! the two earlier layouts belong together, so that a change of one is
//! seen with the others.)

use std::collections::BTreeMap;

use caroni_cwl::Source;
use caroni_store::{keys::Key, keys::Reader, tables, Batch, Store, Table};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{
    Attempt, Fan, Parent, Request, Step, StepInput, StepState, Value, Workflow, WorkflowState,
};

/// A workflow head as stored: no values, no steps.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Head<S = String, O = Vec<(String, Source)>> {
    id: Uuid,
    template: S,
    state: WorkflowState,
    message: S,
    created_at_ms: u64,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    max_attempts: u32,
    output_sources: O,
    step_count: u32,
    started: bool,
}

/// A step as stored: no values.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StepRecord<
    S = String,
    M = BTreeMap<String, String>,
    I = Vec<StepInput>,
    V = Vec<String>,
    R = Option<Request>,
    A = Vec<Attempt>,
    P = caroni_cwl::Retry,
> {
    id: S,
    job_type: S,
    job_kvs: M,
    inputs: I,
    outputs: V,
    state: StepState,
    request: R,
    attempts: A,
    /// The step's retry policy (`()`, no bytes, in the 0x18 layout).
    policy: P,
}

type HeadRef<'a> = Head<&'a str, &'a Vec<(String, Source)>>;
type StepRef<'a> = StepRecord<
    &'a str,
    &'a BTreeMap<String, String>,
    &'a Vec<StepInput>,
    &'a Vec<String>,
    &'a Option<Request>,
    &'a Vec<Attempt>,
    &'a caroni_cwl::Retry,
>;

fn head_ref(wf: &Workflow) -> HeadRef<'_> {
    Head {
        id: wf.id,
        template: &wf.template,
        state: wf.state,
        message: &wf.message,
        created_at_ms: wf.created_at_ms,
        updated_at_ms: wf.updated_at_ms,
        finished_at_ms: wf.finished_at_ms,
        max_attempts: wf.max_attempts,
        output_sources: &wf.output_sources,
        step_count: wf.steps.len() as u32,
        started: wf.started,
    }
}

fn step_ref(s: &Step) -> StepRef<'_> {
    let Step {
        id,
        job_type,
        job_kvs,
        inputs,
        outputs,
        state,
        values: _,
        results: _,
        request,
        attempts,
        dynamic: _,
        fan: _,
        prepared: _,
        policy,
        needs: _,
    } = s;
    StepRecord {
        id,
        job_type,
        job_kvs,
        inputs,
        outputs,
        state: *state,
        request,
        attempts,
        policy,
    }
}

/// Which value of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ValueKey {
    /// A workflow input.
    Input(String),
    /// A workflow output.
    Output(String),
    /// An input of step `n`.
    StepValue(usize, String),
    /// A result of step `n`'s current job.
    StepResult(usize, String),
}

impl ValueKey {
    fn key(&self, wf: &Uuid) -> Vec<u8> {
        let (kind, n, name) = match self {
            ValueKey::Input(k) => (0, 0, k),
            ValueKey::Output(k) => (1, 0, k),
            ValueKey::StepValue(n, k) => (2, *n as u64, k),
            ValueKey::StepResult(n, k) => (3, *n as u64, k),
        };
        Key::new().uuid(wf).u64(kind).u64(n).str(name).finish()
    }

    fn of(key: &[u8]) -> Option<Self> {
        let mut r = Reader::new(key);
        r.uuid()?;
        let kind = r.u64()?;
        let n = usize::try_from(r.u64()?).ok()?;
        let name = r.str()?.to_string();
        Some(match kind {
            0 => ValueKey::Input(name),
            1 => ValueKey::Output(name),
            2 => ValueKey::StepValue(n, name),
            3 => ValueKey::StepResult(n, name),
            _ => return None,
        })
    }

    fn get<'a>(&self, wf: &'a Workflow) -> Option<&'a Value> {
        match self {
            ValueKey::Input(k) => wf.inputs.get(k),
            ValueKey::Output(k) => wf.outputs.get(k),
            ValueKey::StepValue(n, k) => wf.steps.get(*n)?.values.get(k),
            ValueKey::StepResult(n, k) => wf.steps.get(*n)?.results.get(k),
        }
    }
}

const HEADS: Table<Head> = Table::new(tables::WORKFLOW_HEADS_V3, "workflow_heads");
const STEPS: Table<StepRecord> = Table::new(tables::WORKFLOW_STEPS_V4, "workflow_steps");

/// A request as the 0x18 layout stored it (no blocked reason).
#[derive(Debug, Deserialize)]
struct RequestV3 {
    id: Uuid,
    state: crate::model::RequestState,
    created_at_ms: u64,
    expires_at_ms: u64,
    publish_count: u32,
    next_publish_at_ms: u64,
    declines: Vec<(String, String)>,
    candidates: Vec<crate::model::Candidate>,
    answered: Vec<String>,
    decide_at_ms: Option<u64>,
}

/// An attempt as the 0x18 layout stored it (no run times, no failure
/// kind).
#[derive(Debug, Deserialize)]
struct AttemptV3 {
    job_id: Option<Uuid>,
    request_id: Uuid,
    offer_id: Option<Uuid>,
    agent: String,
    endpoint: String,
    state: crate::model::JobState,
    accepted: bool,
    superseded: bool,
    started_at_ms: u64,
    ended_at_ms: Option<u64>,
    last_heard_ms: u64,
    last_probe_ms: u64,
    status_seq: u64,
    exit_status: Option<i32>,
    message: String,
    stderr_tail: String,
}

type StepRecordV3 = StepRecord<
    String,
    BTreeMap<String, String>,
    Vec<StepInput>,
    Vec<String>,
    Option<RequestV3>,
    Vec<AttemptV3>,
    (),
>;
const STEPS_V3: Table<StepRecordV3> =
    Table::new(tables::WORKFLOW_STEPS_V3, "workflow_steps (0x18 layout)");

impl From<StepRecordV3> for StepRecord {
    fn from(s: StepRecordV3) -> Self {
        StepRecord {
            id: s.id,
            job_type: s.job_type,
            job_kvs: s.job_kvs,
            inputs: s.inputs,
            outputs: s.outputs,
            state: s.state,
            request: s.request.map(|r| Request {
                id: r.id,
                state: r.state,
                created_at_ms: r.created_at_ms,
                expires_at_ms: r.expires_at_ms,
                publish_count: r.publish_count,
                next_publish_at_ms: r.next_publish_at_ms,
                declines: r.declines,
                candidates: r.candidates,
                answered: r.answered,
                decide_at_ms: r.decide_at_ms,
                blocked: None,
                asked: Vec::new(),
                broadcasts: 0,
            }),
            attempts: s
                .attempts
                .into_iter()
                .map(|a| Attempt {
                    // Failed attempts were all marked superseded then; a
                    // failure was never a replacement.
                    superseded: a.superseded && !a.state.is_final(),
                    job_id: a.job_id,
                    request_id: a.request_id,
                    offer_id: a.offer_id,
                    agent: a.agent,
                    endpoint: a.endpoint,
                    state: a.state,
                    accepted: a.accepted,
                    started_at_ms: a.started_at_ms,
                    ended_at_ms: a.ended_at_ms,
                    last_heard_ms: a.last_heard_ms,
                    last_probe_ms: a.last_probe_ms,
                    status_seq: a.status_seq,
                    exit_status: a.exit_status,
                    message: a.message,
                    stderr_tail: a.stderr_tail,
                    queued_at_ms: None,
                    ran_at_ms: None,
                    failure: String::new(),
                    price: None,
                })
                .collect(),
            policy: caroni_cwl::Retry::default(),
        }
    }
}
const VALUES: Table<String> = Table::new(tables::WORKFLOW_VALUES, "workflow_values");
const LEGACY: Table<Workflow> = Table::new(tables::WORKFLOWS, "workflows (whole records)");

/// The second layout: heads and steps with their values.
#[derive(Debug, Deserialize)]
struct HeadV2 {
    id: Uuid,
    template: String,
    state: WorkflowState,
    message: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    max_attempts: u32,
    inputs: BTreeMap<String, Value>,
    output_sources: Vec<(String, Source)>,
    outputs: BTreeMap<String, Value>,
    step_count: u32,
    started: bool,
}
const HEADS_V2: Table<HeadV2> = Table::new(tables::WORKFLOW_HEADS, "workflow_heads (with values)");
const STEPS_V2: Table<Step> = Table::new(tables::WORKFLOW_STEPS, "workflow_steps (with values)");

const LINKS: Table<Parent> = Table::new(tables::WORKFLOW_LINKS, "workflow_links");
const PLANS: Table<caroni_cwl::Workflow> = Table::new(tables::WORKFLOW_PLANS, "workflow_plans");
const FANS: Table<Fan> = Table::new(tables::WORKFLOW_FANS, "workflow_fans");
const ELEMENTS: Table<BTreeMap<String, String>> =
    Table::new(tables::WORKFLOW_ELEMENTS, "workflow_elements");
const CHILDREN: Table<Uuid> = Table::new(tables::WORKFLOW_CHILDREN, "workflow_children");
const PRICES: Table<(caroni_types::market::Price, u64)> =
    Table::new(tables::WORKFLOW_ATTEMPT_PRICES, "workflow_attempt_prices");
const BUDGETS: Table<crate::model::WorkflowBudget> =
    Table::new(tables::WORKFLOW_BUDGETS, "workflow_budgets");
const PRIORITIES: Table<i32> = Table::new(tables::WORKFLOW_PRIORITIES, "workflow_priorities");
const NEEDS: Table<Vec<(String, caroni_types::market::Needs)>> =
    Table::new(tables::WORKFLOW_STEP_NEEDS, "workflow_step_needs");
const POLICIES: Table<Vec<(String, caroni_cwl::Retry)>> =
    Table::new(tables::WORKFLOW_PLAN_POLICIES, "workflow_plan_policies");
const SUBMISSIONS: Table<(Uuid, u64)> =
    Table::new(tables::WORKFLOW_SUBMISSIONS, "workflow_submissions");

/// Writes what a new workflow keeps for good: its parent link (and its
/// place in the parent's children) and its plan.
pub(crate) fn put_created(b: &mut Batch, wf: &Workflow) {
    if let Some(p) = &wf.parent {
        b.put(LINKS, &head_key(&wf.id), p);
        b.put(
            CHILDREN,
            &Key::new()
                .uuid(&p.id)
                .u64(u64::from(p.step))
                .u64(p.index)
                .finish(),
            &wf.id,
        );
    }
    if let Some(plan) = &wf.plan {
        let plans: Table<&caroni_cwl::Workflow> =
            Table::new(tables::WORKFLOW_PLANS, "workflow_plans");
        b.put(plans, &head_key(&wf.id), &&**plan);
        b.put(POLICIES, &head_key(&wf.id), &plan.policies());
    }
    let needs = match &wf.plan {
        Some(plan) => plan.all_needs(),
        None => wf
            .steps
            .iter()
            .filter(|s| !s.needs.is_empty())
            .map(|s| (s.id.clone(), s.needs.clone()))
            .collect(),
    };
    if !needs.is_empty() {
        b.put(NEEDS, &head_key(&wf.id), &needs);
    }
}

/// Writes the outputs of element `k` of step `n` of workflow `id`.
pub(crate) fn put_element(
    b: &mut Batch,
    id: &Uuid,
    n: usize,
    k: u64,
    outputs: &BTreeMap<String, Value>,
) {
    let plain: BTreeMap<String, String> = outputs
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    b.put(
        ELEMENTS,
        &Key::new().uuid(id).u64(n as u64).u64(k).finish(),
        &plain,
    );
}

/// The outputs of the completed elements of `wf`'s dynamic steps that
/// have not gathered yet.
pub(crate) fn elements(
    store: &Store,
    wf: &Workflow,
) -> caroni_store::Result<Vec<crate::model::ElementOutputs>> {
    let mut out = Vec::new();
    for (n, s) in wf.steps.iter().enumerate() {
        if s.fan.is_none() || s.state != StepState::Running {
            continue;
        }
        for (key, m) in store.scan(ELEMENTS, &Key::new().uuid(&wf.id).u64(n as u64).finish())? {
            let mut r = Reader::new(&key);
            let (Some(_), Some(_), Some(k)) = (r.uuid(), r.u64(), r.u64()) else {
                continue;
            };
            out.push((
                wf.id,
                n,
                k,
                m.into_iter().map(|(a, v)| (a, Value::from(v))).collect(),
            ));
        }
    }
    Ok(out)
}

/// The child workflows of step `n` of `id`, by element, at most `limit`
/// from element `from`.
pub(crate) fn children(
    store: &Store,
    id: &Uuid,
    n: usize,
    limit: usize,
) -> caroni_store::Result<Vec<(u64, Uuid)>> {
    Ok(store
        .scan_limit(CHILDREN, &Key::new().uuid(id).u64(n as u64).finish(), limit)?
        .into_iter()
        .filter_map(|(key, child)| {
            let mut r = Reader::new(&key);
            r.uuid()?;
            r.u64()?;
            Some((r.u64()?, child))
        })
        .collect())
}

/// The child workflows of step `n` of `id` (at most `limit`, by
/// element), each with its state.
pub fn children_of(
    store: &Store,
    id: &Uuid,
    n: usize,
    limit: usize,
) -> Vec<(u64, Uuid, WorkflowState)> {
    children(store, id, n, limit)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, c)| {
            let h = store.get(HEADS, &head_key(&c)).ok()??;
            Some((k, c, h.state))
        })
        .collect()
}

fn head_key(id: &Uuid) -> Vec<u8> {
    Key::new().uuid(id).finish()
}

fn step_key(id: &Uuid, n: usize) -> Vec<u8> {
    Key::new().uuid(id).u64(n as u64).finish()
}

/// Writes the head of `wf`.
pub(crate) fn put_head(b: &mut Batch, wf: &Workflow) {
    let heads: Table<HeadRef<'_>> = Table::new(tables::WORKFLOW_HEADS_V3, "workflow_heads");
    b.put(heads, &head_key(&wf.id), &head_ref(wf));
    if let Some(budget) = &wf.budget {
        b.put(BUDGETS, &head_key(&wf.id), budget);
    }
    if wf.priority != 0 {
        b.put(PRIORITIES, &head_key(&wf.id), &wf.priority);
    }
}

/// Writes step `n` of `wf` (without its values).
pub(crate) fn put_step(b: &mut Batch, wf: &Workflow, n: usize) {
    if let Some(step) = wf.steps.get(n) {
        let steps: Table<StepRef<'_>> = Table::new(tables::WORKFLOW_STEPS_V4, "workflow_steps");
        b.put(steps, &step_key(&wf.id, n), &step_ref(step));
        // An attempt's price is written with the step that accepted it
        // (again when the step changes: a put of the same value).
        for a in &step.attempts {
            if let (Some(j), Some(p)) = (a.job_id, a.price) {
                b.put(PRICES, &Key::new().uuid(&j).finish(), &p);
            }
        }
        match &step.fan {
            Some(fan) => b.put(FANS, &step_key(&wf.id, n), fan),
            // A resumed step expands afresh.
            None if step.dynamic => b.delete(FANS, &step_key(&wf.id, n)),
            None => {}
        }
    }
}

/// Writes one value of `wf` as it is now, or deletes it when `wf` no
/// longer has it.
pub(crate) fn put_value(b: &mut Batch, wf: &Workflow, which: &ValueKey) {
    let key = which.key(&wf.id);
    match which.get(wf) {
        Some(v) => {
            let values: Table<&str> = Table::new(tables::WORKFLOW_VALUES, "workflow_values");
            b.put(values, &key, &&**v)
        }
        None => b.delete(VALUES, &key),
    }
}

/// Every value of `wf`.
pub(crate) fn value_keys(wf: &Workflow) -> Vec<ValueKey> {
    let mut out: Vec<ValueKey> = wf.inputs.keys().cloned().map(ValueKey::Input).collect();
    out.extend(wf.outputs.keys().cloned().map(ValueKey::Output));
    for (n, s) in wf.steps.iter().enumerate() {
        out.extend(s.values.keys().map(|k| ValueKey::StepValue(n, k.clone())));
        out.extend(s.results.keys().map(|k| ValueKey::StepResult(n, k.clone())));
    }
    out
}

/// True when the head records of `a` and `b` are the same.
pub(crate) fn same_head(a: &Workflow, b: &Workflow) -> bool {
    head_ref(a) == head_ref(b)
}

/// True when the step records of `a` and `b` are the same, leaving out
/// the re-publication schedule of their request (when it next goes out,
/// how often it went): a restarted manager publishes every open request
/// at once anyway, so a re-publication alone writes nothing.
pub(crate) fn same_step(a: &Step, b: &Step) -> bool {
    let (ra, rb) = (step_ref(a), step_ref(b));
    let schedule_free = |r: &Option<Request>| {
        r.clone().map(|mut r| {
            r.publish_count = 0;
            r.next_publish_at_ms = 0;
            r.asked.clear();
            r.broadcasts = 0;
            r
        })
    };
    ra.id == rb.id
        && ra.job_type == rb.job_type
        && ra.job_kvs == rb.job_kvs
        && ra.inputs == rb.inputs
        && ra.outputs == rb.outputs
        && ra.state == rb.state
        && ra.attempts == rb.attempts
        && a.fan == b.fan
        && (ra.request == rb.request || schedule_free(ra.request) == schedule_free(rb.request))
}

/// The values whose records differ between `before` and `after` (set,
/// changed or removed).
pub(crate) fn changed_values(before: &Workflow, after: &Workflow) -> Vec<ValueKey> {
    fn diff(
        a: &BTreeMap<String, Value>,
        b: &BTreeMap<String, Value>,
        key: impl Fn(&String) -> ValueKey,
        out: &mut Vec<ValueKey>,
    ) {
        for (k, v) in b {
            if a.get(k)
                .is_none_or(|old| !(std::sync::Arc::ptr_eq(old, v) || old == v))
            {
                out.push(key(k));
            }
        }
        for k in a.keys().filter(|k| !b.contains_key(*k)) {
            out.push(key(k));
        }
    }
    let mut out = Vec::new();
    diff(
        &before.inputs,
        &after.inputs,
        |k| ValueKey::Input(k.clone()),
        &mut out,
    );
    diff(
        &before.outputs,
        &after.outputs,
        |k| ValueKey::Output(k.clone()),
        &mut out,
    );
    for (n, (a, b)) in before.steps.iter().zip(&after.steps).enumerate() {
        diff(
            &a.values,
            &b.values,
            |k| ValueKey::StepValue(n, k.clone()),
            &mut out,
        );
        diff(
            &a.results,
            &b.results,
            |k| ValueKey::StepResult(n, k.clone()),
            &mut out,
        );
    }
    out
}

/// Writes the whole workflow.
pub(crate) fn put(b: &mut Batch, wf: &Workflow) {
    put_head(b, wf);
    for n in 0..wf.steps.len() {
        put_step(b, wf, n);
    }
    for k in value_keys(wf) {
        put_value(b, wf, &k);
    }
}

/// A workflow's step records are as many as its head says.
fn same_count(table: &'static str, id: &Uuid, found: usize, said: u32) -> caroni_store::Result<()> {
    if found == said as usize {
        return Ok(());
    }
    Err(caroni_store::Error::Decode {
        table,
        reason: format!("workflow {id} has {found} step record(s), its head says {said}"),
    })
}

fn assemble(store: &Store, h: Head) -> caroni_store::Result<Workflow> {
    let steps: Vec<StepRecord> = store
        .scan(STEPS, &head_key(&h.id))?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    same_count("workflow_steps", &h.id, steps.len(), h.step_count)?;
    let needs = store.get(NEEDS, &head_key(&h.id))?.unwrap_or_default();
    let plan = match store.get(PLANS, &head_key(&h.id))? {
        Some(mut p) => {
            if let Some(policies) = store.get(POLICIES, &head_key(&h.id))? {
                p.set_policies(&policies);
            }
            p.set_needs(&needs);
            Some(std::sync::Arc::new(p))
        }
        None => None,
    };
    let parent = store.get(LINKS, &head_key(&h.id))?;
    let mut fans: BTreeMap<usize, Fan> = BTreeMap::new();
    if plan.is_some() {
        for (key, fan) in store.scan(FANS, &head_key(&h.id))? {
            let mut r = Reader::new(&key);
            if let (Some(_), Some(n)) = (r.uuid(), r.u64()) {
                fans.insert(n as usize, fan);
            }
        }
    }
    let mut wf = Workflow {
        id: h.id,
        template: h.template,
        state: h.state,
        message: h.message,
        created_at_ms: h.created_at_ms,
        updated_at_ms: h.updated_at_ms,
        finished_at_ms: h.finished_at_ms,
        max_attempts: h.max_attempts,
        inputs: BTreeMap::new(),
        output_sources: h.output_sources,
        outputs: BTreeMap::new(),
        steps: steps
            .into_iter()
            .enumerate()
            .map(|(n, s)| Step {
                needs: needs
                    .iter()
                    .find(|(path, _)| *path == s.id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default(),
                id: s.id,
                job_type: s.job_type,
                job_kvs: s.job_kvs,
                inputs: s.inputs,
                outputs: s.outputs,
                state: s.state,
                values: BTreeMap::new(),
                results: BTreeMap::new(),
                request: s.request,
                attempts: s
                    .attempts
                    .into_iter()
                    .map(|mut a| {
                        if let Some(j) = a.job_id {
                            a.price = store
                                .get(PRICES, &Key::new().uuid(&j).finish())
                                .ok()
                                .flatten();
                        }
                        a
                    })
                    .collect(),
                policy: s.policy,
                dynamic: plan
                    .as_ref()
                    .and_then(|p| p.steps.get(n))
                    .is_some_and(|p| p.dynamic.is_some()),
                fan: fans.remove(&n),
                prepared: None,
            })
            .collect(),
        started: h.started,
        parent,
        plan,
        budget: store.get(BUDGETS, &head_key(&h.id))?,
        priority: store.get(PRIORITIES, &head_key(&h.id))?.unwrap_or(0),
    };
    for (key, v) in store.scan(VALUES, &head_key(&wf.id))? {
        let v = Value::from(v);
        match ValueKey::of(&key) {
            Some(ValueKey::Input(k)) => {
                wf.inputs.insert(k, v);
            }
            Some(ValueKey::Output(k)) => {
                wf.outputs.insert(k, v);
            }
            Some(ValueKey::StepValue(n, k)) => {
                if let Some(s) = wf.steps.get_mut(n) {
                    s.values.insert(k, v);
                }
            }
            Some(ValueKey::StepResult(n, k)) => {
                if let Some(s) = wf.steps.get_mut(n) {
                    s.results.insert(k, v);
                }
            }
            None => {
                return Err(caroni_store::Error::Decode {
                    table: "workflow_values",
                    reason: format!("workflow {} has a value key that does not decode", wf.id),
                })
            }
        }
    }
    Ok(wf)
}

/// One workflow.
pub(crate) fn get(store: &Store, id: &Uuid) -> caroni_store::Result<Option<Workflow>> {
    match store.get(HEADS, &head_key(id))? {
        Some(h) => Ok(Some(assemble(store, h)?)),
        None => Ok(None),
    }
}

/// What a list of workflows is filtered by.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only these states (empty: any).
    pub states: Vec<WorkflowState>,
    /// Only this template.
    pub template: Option<String>,
    /// Created at or after (ms).
    pub created_after_ms: Option<u64>,
    /// Created before (ms).
    pub created_before_ms: Option<u64>,
    /// Only ids whose text starts with this.
    pub id_prefix: Option<String>,
    /// Go on after this workflow (the previous page's last).
    pub after: Option<Uuid>,
}

/// Heads read at most per page: a filter that matches little stops there
/// and says where to go on.
const LIST_SCAN_MAX: usize = 200_000;

/// A page of the workflows users started (not elements' children), newest
/// first, filtered; and the last id read when more may match (the next
/// page's `after`).
pub(crate) fn list_page(
    store: &Store,
    limit: usize,
    f: &ListFilter,
) -> caroni_store::Result<(Vec<Workflow>, Option<Uuid>)> {
    let limit = limit.max(1);
    // Ids are UUID v7: the newest a page may hold bounds where to start.
    let mut before: Option<Vec<u8>> = f.after.map(|id| head_key(&id));
    if let Some(t) = f.created_before_ms {
        let bound = head_key(&uuid::Builder::from_unix_timestamp_millis(t, &[0; 10]).into_uuid());
        before = Some(match before {
            Some(b) if b < bound => b,
            _ => bound,
        });
    }
    let mut top = Vec::new();
    let mut scanned = 0;
    loop {
        let heads = store.scan_back(HEADS, before.as_deref(), 512)?;
        if heads.is_empty() {
            return Ok((
                top.into_iter()
                    .map(|h| assemble(store, h))
                    .collect::<Result<_, _>>()?,
                None,
            ));
        }
        for (key, h) in heads {
            scanned += 1;
            before = Some(key);
            if f.created_after_ms.is_some_and(|t| h.created_at_ms < t) {
                // Older ones were all created before it too.
                let all = top
                    .into_iter()
                    .map(|h| assemble(store, h))
                    .collect::<Result<_, _>>()?;
                return Ok((all, None));
            }
            let matches = (f.states.is_empty() || f.states.contains(&h.state))
                && f.template.as_ref().is_none_or(|t| *t == h.template)
                && f.id_prefix
                    .as_ref()
                    .is_none_or(|p| h.id.to_string().starts_with(p.as_str()))
                && f.created_before_ms.is_none_or(|t| h.created_at_ms < t)
                && store.get(LINKS, &head_key(&h.id))?.is_none();
            if matches {
                let id = h.id;
                top.push(h);
                if top.len() == limit {
                    let all = top
                        .into_iter()
                        .map(|h| assemble(store, h))
                        .collect::<Result<_, _>>()?;
                    return Ok((all, Some(id)));
                }
            }
            if scanned >= LIST_SCAN_MAX {
                let last = Reader::new(before.as_deref().unwrap_or_default()).uuid();
                let all = top
                    .into_iter()
                    .map(|h| assemble(store, h))
                    .collect::<Result<_, _>>()?;
                return Ok((all, last));
            }
        }
    }
}

/// Up to `limit` workflow ids (any, children too) whose bytes start with
/// `prefix`, in key order from after `after`.
pub fn ids_with_prefix(
    store: &Store,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> caroni_store::Result<Vec<Uuid>> {
    Ok(store
        .scan_after(HEADS, prefix, after, limit)?
        .into_iter()
        .map(|(_, h)| h.id)
        .collect())
}

/// The workflow made by the submission with this client request id.
pub(crate) fn submission(store: &Store, request_id: &str) -> caroni_store::Result<Option<Uuid>> {
    Ok(store
        .get(SUBMISSIONS, &Key::new().str(request_id).finish())?
        .map(|(id, _)| id))
}

/// Records the workflow a submission with a client request id made.
pub(crate) fn put_submission(b: &mut Batch, request_id: &str, id: &Uuid, now_ms: u64) {
    b.put(
        SUBMISSIONS,
        &Key::new().str(request_id).finish(),
        &(*id, now_ms),
    );
}

/// Forgets submissions recorded before `before_ms`; returns how many.
pub(crate) fn forget_submissions(store: &Store, before_ms: u64) -> caroni_store::Result<usize> {
    let mut b = Batch::default();
    let mut n = 0;
    for (key, (_, at)) in store.scan(SUBMISSIONS, &[])? {
        if at < before_ms {
            b.delete(SUBMISSIONS, &key);
            n += 1;
        }
    }
    if n > 0 {
        store.write(b)?;
    }
    Ok(n)
}

/// A workflow and every workflow under it (its elements' children, at any
/// depth); empty when there is no such workflow.
pub(crate) fn family(store: &Store, id: &Uuid) -> caroni_store::Result<Vec<Uuid>> {
    if store.get(HEADS, &head_key(id))?.is_none() {
        return Ok(Vec::new());
    }
    let mut out = vec![*id];
    let mut k = 0;
    while k < out.len() {
        let parent = out[k];
        for (_, child) in store.scan(CHILDREN, &head_key(&parent))? {
            if !out.contains(&child) {
                out.push(child);
            }
        }
        k += 1;
    }
    Ok(out)
}

/// Deletes every record of one workflow (not its children: [`family`]
/// lists them) into `b`.
pub(crate) fn delete(store: &Store, b: &mut Batch, id: &Uuid) -> caroni_store::Result<()> {
    let key = head_key(id);
    for (k, s) in store.scan(STEPS, &key)? {
        for a in &s.attempts {
            if let Some(j) = a.job_id {
                b.delete(RUNS_ON, &Key::new().uuid(&j).finish());
                b.delete(PRICES, &Key::new().uuid(&j).finish());
            }
        }
        b.delete(STEPS, &k);
    }
    b.delete(HEADS, &key);
    for (k, _) in store.scan(VALUES, &key)? {
        b.delete(VALUES, &k);
    }
    for (k, _) in store.scan(FANS, &key)? {
        b.delete(FANS, &k);
    }
    for (k, _) in store.scan(ELEMENTS, &key)? {
        b.delete(ELEMENTS, &k);
    }
    for (k, _) in store.scan(CHILDREN, &key)? {
        b.delete(CHILDREN, &k);
    }
    b.delete(LINKS, &key);
    b.delete(PLANS, &key);
    b.delete(POLICIES, &key);
    b.delete(NEEDS, &key);
    b.delete(BUDGETS, &key);
    b.delete(PRIORITIES, &key);
    Ok(())
}

/// Ended workflows users started that finished before `before_ms`,
/// oldest first, at most `limit`.
pub(crate) fn expired(
    store: &Store,
    before_ms: u64,
    limit: usize,
) -> caroni_store::Result<Vec<Uuid>> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let heads = store.scan_after(HEADS, &[], after.as_deref(), 1024)?;
        if heads.is_empty() {
            return Ok(out);
        }
        for (key, h) in heads {
            // Ids are time-ordered: past the cut-off, nothing older ended
            // before it that was not created before it.
            if h.created_at_ms >= before_ms {
                return Ok(out);
            }
            if h.state.is_final()
                && h.finished_at_ms.is_some_and(|t| t < before_ms)
                && store.get(LINKS, &key)?.is_none()
            {
                out.push(h.id);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            after = Some(key);
        }
    }
}

/// Every workflow that has not ended.
pub(crate) fn live(store: &Store) -> caroni_store::Result<Vec<Workflow>> {
    let mut out = Vec::new();
    for (_, h) in store.scan(HEADS, &[])? {
        if !h.state.is_final() {
            out.push(assemble(store, h)?);
        }
    }
    Ok(out)
}

/// The SHA-256 of every file a workflow that has not ended refers to (its
/// inputs, outputs and step values): the blobs the manager must keep.
pub fn live_files(store: &Store) -> caroni_store::Result<std::collections::HashSet<String>> {
    let mut out = std::collections::HashSet::new();
    for wf in live(store)? {
        let gathered: Vec<Value> = elements(store, &wf)?
            .into_iter()
            .flat_map(|(_, _, _, m)| m.into_values())
            .collect();
        let values = wf
            .inputs
            .values()
            .chain(wf.outputs.values())
            .chain(
                wf.steps
                    .iter()
                    .flat_map(|s| s.values.values().chain(s.results.values())),
            )
            .chain(gathered.iter());
        for v in values {
            for f in caroni_types::file::refs_in(v) {
                out.insert(f.sha256.clone());
            }
        }
    }
    Ok(out)
}

/// Converts the records of earlier layouts (whole workflows; heads and
/// steps with their values; steps without run times); returns how many
/// workflows were converted.
pub(crate) fn migrate(store: &Store) -> caroni_store::Result<usize> {
    let mut converted = 0;
    loop {
        let old = store.scan_limit(STEPS_V3, &[], 1024)?;
        if old.is_empty() {
            break;
        }
        let mut b = Batch::default();
        let mut ids = std::collections::BTreeSet::new();
        for (key, s) in old {
            let mut r = Reader::new(&key);
            if let Some(id) = r.uuid() {
                ids.insert(id);
            }
            b.put(STEPS, &key, &StepRecord::from(s));
            b.delete(STEPS_V3, &key);
        }
        converted += ids.len();
        store.write(b)?;
    }
    let old = store.scan(LEGACY, &[])?;
    for chunk in old.chunks(512) {
        let mut b = Batch::default();
        for (key, wf) in chunk {
            put(&mut b, wf);
            b.delete(LEGACY, key);
        }
        store.write(b)?;
    }
    converted += old.len();
    loop {
        let heads = store.scan_limit(HEADS_V2, &[], 256)?;
        if heads.is_empty() {
            break;
        }
        let mut b = Batch::default();
        for (key, h) in heads {
            let steps = store.scan(STEPS_V2, &key)?;
            same_count(
                "workflow_steps (with values)",
                &h.id,
                steps.len(),
                h.step_count,
            )?;
            let wf = Workflow {
                id: h.id,
                template: h.template,
                state: h.state,
                message: h.message,
                created_at_ms: h.created_at_ms,
                updated_at_ms: h.updated_at_ms,
                finished_at_ms: h.finished_at_ms,
                max_attempts: h.max_attempts,
                inputs: h.inputs,
                output_sources: h.output_sources,
                outputs: h.outputs,
                steps: steps.iter().map(|(_, s)| s.clone()).collect(),
                started: h.started,
                parent: None,
                plan: None,
                budget: None,
                priority: 0,
            };
            put(&mut b, &wf);
            for (k, _) in &steps {
                b.delete(STEPS_V2, k);
            }
            b.delete(HEADS_V2, &key);
            converted += 1;
        }
        store.write(b)?;
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = include_str!("../../../examples/templates/test_simple.cwl");

    fn workflow() -> Workflow {
        let parsed = caroni_cwl::parse(SIMPLE).expect("template");
        let inputs = BTreeMap::from([("start_message".to_string(), "x".to_string())]);
        Workflow::create(Uuid::now_v7(), "t", &parsed, inputs, 5).expect("create")
    }

    #[test]
    fn a_workflow_round_trips_through_head_step_and_value_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut wf = workflow();
        let mut b = Batch::default();
        put(&mut b, &wf);
        store.write(b).expect("write");
        assert_eq!(get(&store, &wf.id).expect("get"), Some(wf.clone()));
        // A new value of one step writes that value, its step and the head.
        let before = wf.clone();
        wf.steps[1].values.insert("text".into(), Value::from("v"));
        wf.updated_at_ms = 9;
        let values = changed_values(&before, &wf);
        assert_eq!(values, vec![ValueKey::StepValue(1, "text".into())]);
        let mut b = Batch::default();
        put_head(&mut b, &wf);
        put_step(&mut b, &wf, 1);
        put_value(&mut b, &wf, &values[0]);
        assert_eq!(b.len(), 3);
        store.write(b).expect("write");
        assert_eq!(get(&store, &wf.id).expect("get"), Some(wf.clone()));
        assert_eq!(live(&store).expect("live"), vec![wf.clone()]);
        let (page, next) = list_page(&store, 5, &ListFilter::default()).expect("list");
        assert_eq!((page, next), (vec![wf], None));
    }

    #[test]
    fn a_republication_changes_no_record() {
        let mut wf = workflow();
        wf.steps[0].request = Some(Request {
            id: Uuid::now_v7(),
            state: crate::model::RequestState::Fulfilling,
            created_at_ms: 1,
            expires_at_ms: 100,
            publish_count: 1,
            next_publish_at_ms: 10,
            declines: Vec::new(),
            candidates: Vec::new(),
            answered: Vec::new(),
            decide_at_ms: None,
            blocked: None,
            asked: Vec::new(),
            broadcasts: 0,
        });
        let before = wf.clone();
        if let Some(r) = wf.steps[0].request.as_mut() {
            r.publish_count = 2;
            r.next_publish_at_ms = 30;
            // Asking an agent directly is schedule too: nothing to write.
            r.asked.push("agent1".into());
            r.broadcasts = 1;
        }
        assert!(same_step(&before.steps[0], &wf.steps[0]));
        assert!(changed_values(&before, &wf).is_empty());
        if let Some(r) = wf.steps[0].request.as_mut() {
            r.declines.push(("agent".into(), "no such job type".into()));
        }
        assert!(!same_step(&before.steps[0], &wf.steps[0]));
    }

    #[test]
    fn records_of_earlier_layouts_are_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let first = workflow();
        let second = workflow();
        let mut b = Batch::default();
        b.put(LEGACY, &head_key(&first.id), &first);
        // The second layout, as it was written: heads with values.
        #[derive(Serialize)]
        struct HeadV2Ref<'a> {
            id: &'a Uuid,
            template: &'a str,
            state: WorkflowState,
            message: &'a str,
            created_at_ms: u64,
            updated_at_ms: u64,
            finished_at_ms: Option<u64>,
            max_attempts: u32,
            inputs: &'a BTreeMap<String, Value>,
            output_sources: &'a Vec<(String, Source)>,
            outputs: &'a BTreeMap<String, Value>,
            step_count: u32,
            started: bool,
        }
        let w = &second;
        let heads: Table<HeadV2Ref<'_>> = Table::new(tables::WORKFLOW_HEADS, "v2");
        b.put(
            heads,
            &head_key(&w.id),
            &HeadV2Ref {
                id: &w.id,
                template: &w.template,
                state: w.state,
                message: &w.message,
                created_at_ms: w.created_at_ms,
                updated_at_ms: w.updated_at_ms,
                finished_at_ms: w.finished_at_ms,
                max_attempts: w.max_attempts,
                inputs: &w.inputs,
                output_sources: &w.output_sources,
                outputs: &w.outputs,
                step_count: w.steps.len() as u32,
                started: w.started,
            },
        );
        for (n, s) in w.steps.iter().enumerate() {
            b.put(STEPS_V2, &step_key(&w.id, n), s);
        }
        store.write(b).expect("write");
        assert_eq!(migrate(&store).expect("migrate"), 2);
        assert_eq!(get(&store, &first.id).expect("get"), Some(first));
        assert_eq!(get(&store, &second.id).expect("get"), Some(second));
        assert!(store.scan(LEGACY, &[]).expect("scan").is_empty());
        assert!(store.scan(HEADS_V2, &[]).expect("scan").is_empty());
        assert!(store.scan(STEPS_V2, &[]).expect("scan").is_empty());
        assert_eq!(migrate(&store).expect("again"), 0);
    }
}

/// Where a job runs, as its agent reported in its status updates: the
/// executor (bash, docker, slurm) and the container's name or Slurm job id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunsOn {
    /// bash, docker or slurm.
    pub executor: String,
    /// Container name or Slurm job id; empty when not (yet) known.
    pub external_id: String,
}

const RUNS_ON: Table<RunsOn> = Table::new(tables::MANAGER_JOB_EXECUTIONS, "manager_job_executions");

impl RunsOn {
    /// What an agent said, if it is something to show: a known executor
    /// and a short printable id (a peer's text is never trusted further).
    pub fn reported(executor: &str, external_id: &str) -> Option<Self> {
        let known = matches!(executor, "bash" | "docker" | "slurm");
        let printable =
            external_id.len() <= 128 && external_id.chars().all(|c| c.is_ascii_graphic());
        (known && printable).then(|| Self {
            executor: executor.to_string(),
            external_id: external_id.to_string(),
        })
    }
}

/// Records where `job` runs.
pub fn put_runs_on(batch: &mut Batch, job: &Uuid, r: &RunsOn) {
    batch.put(RUNS_ON, &Key::new().uuid(job).finish(), r);
}

/// Where `job` runs, if its agent said.
pub fn runs_on(store: &Store, job: &Uuid) -> Option<RunsOn> {
    store
        .get(RUNS_ON, &Key::new().uuid(job).finish())
        .ok()
        .flatten()
}
