//! How workflows are laid out on disk: a head record per workflow (state,
//! inputs, outputs, times) and one record per step (its request, values,
//! results and attempts), so that a message writes the step it changed and
//! the head, not the whole workflow. Records of the first layout (one
//! whole workflow per key) are converted at start.

use std::collections::BTreeMap;

use caroni_cwl::Source;
use caroni_store::{keys::Key, tables, Batch, Store, Table};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Step, Workflow, WorkflowState};

/// A workflow without its steps, as stored.
#[derive(Debug, Deserialize)]
struct Head {
    id: Uuid,
    template: String,
    state: WorkflowState,
    message: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    max_attempts: u32,
    inputs: BTreeMap<String, String>,
    output_sources: Vec<(String, Source)>,
    outputs: BTreeMap<String, String>,
    step_count: u32,
    started: bool,
}

/// The same fields, borrowed, for writing (field order must match [`Head`]).
#[derive(Serialize)]
struct HeadRef<'a> {
    id: &'a Uuid,
    template: &'a str,
    state: WorkflowState,
    message: &'a str,
    created_at_ms: u64,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    max_attempts: u32,
    inputs: &'a BTreeMap<String, String>,
    output_sources: &'a Vec<(String, Source)>,
    outputs: &'a BTreeMap<String, String>,
    step_count: u32,
    started: bool,
}

const HEADS: Table<Head> = Table::new(tables::WORKFLOW_HEADS, "workflow_heads");
const STEPS: Table<Step> = Table::new(tables::WORKFLOW_STEPS, "workflow_steps");
const LEGACY: Table<Workflow> = Table::new(tables::WORKFLOWS, "workflows (whole records)");

fn head_key(id: &Uuid) -> Vec<u8> {
    Key::new().uuid(id).finish()
}

fn step_key(id: &Uuid, n: usize) -> Vec<u8> {
    Key::new().uuid(id).u64(n as u64).finish()
}

/// Writes the head of `wf`.
pub(crate) fn put_head(b: &mut Batch, wf: &Workflow) {
    let head = HeadRef {
        id: &wf.id,
        template: &wf.template,
        state: wf.state,
        message: &wf.message,
        created_at_ms: wf.created_at_ms,
        updated_at_ms: wf.updated_at_ms,
        finished_at_ms: wf.finished_at_ms,
        max_attempts: wf.max_attempts,
        inputs: &wf.inputs,
        output_sources: &wf.output_sources,
        outputs: &wf.outputs,
        step_count: wf.steps.len() as u32,
        started: wf.started,
    };
    let heads: Table<HeadRef<'_>> = Table::new(tables::WORKFLOW_HEADS, "workflow_heads");
    b.put(heads, &head_key(&wf.id), &head);
}

/// Writes step `n` of `wf`.
pub(crate) fn put_step(b: &mut Batch, wf: &Workflow, n: usize) {
    if let Some(step) = wf.steps.get(n) {
        b.put(STEPS, &step_key(&wf.id, n), step);
    }
}

/// Writes the whole workflow.
pub(crate) fn put(b: &mut Batch, wf: &Workflow) {
    put_head(b, wf);
    for n in 0..wf.steps.len() {
        put_step(b, wf, n);
    }
}

fn with_steps(store: &Store, h: Head) -> caroni_store::Result<Workflow> {
    let steps: Vec<Step> = store
        .scan(STEPS, &head_key(&h.id))?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    if steps.len() != h.step_count as usize {
        return Err(caroni_store::Error::Decode {
            table: "workflow_steps",
            reason: format!(
                "workflow {} has {} step record(s), its head says {}",
                h.id,
                steps.len(),
                h.step_count
            ),
        });
    }
    Ok(Workflow {
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
        steps,
        started: h.started,
    })
}

/// One workflow.
pub(crate) fn get(store: &Store, id: &Uuid) -> caroni_store::Result<Option<Workflow>> {
    match store.get(HEADS, &head_key(id))? {
        Some(h) => Ok(Some(with_steps(store, h)?)),
        None => Ok(None),
    }
}

/// The newest `limit` workflows, newest first (ids are UUID v7).
pub(crate) fn list_last(store: &Store, limit: usize) -> caroni_store::Result<Vec<Workflow>> {
    store
        .scan_last(HEADS, limit)?
        .into_iter()
        .map(|h| with_steps(store, h))
        .collect()
}

/// Every workflow that has not ended.
pub(crate) fn live(store: &Store) -> caroni_store::Result<Vec<Workflow>> {
    let mut out = Vec::new();
    for (_, h) in store.scan(HEADS, &[])? {
        if !h.state.is_final() {
            out.push(with_steps(store, h)?);
        }
    }
    Ok(out)
}

/// Converts whole-workflow records of the first layout.
pub(crate) fn migrate(store: &Store) -> caroni_store::Result<usize> {
    let old = store.scan(LEGACY, &[])?;
    if old.is_empty() {
        return Ok(0);
    }
    for chunk in old.chunks(512) {
        let mut b = Batch::default();
        for (key, wf) in chunk {
            put(&mut b, wf);
            b.delete(LEGACY, key);
        }
        store.write(b)?;
    }
    Ok(old.len())
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
    fn a_workflow_round_trips_through_head_and_step_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut wf = workflow();
        let mut b = Batch::default();
        put(&mut b, &wf);
        store.write(b).expect("write");
        assert_eq!(get(&store, &wf.id).expect("get"), Some(wf.clone()));
        // A change of one step writes that step and the head only.
        wf.steps[1].values.insert("text".into(), "v".into());
        wf.updated_at_ms = 9;
        let mut b = Batch::default();
        put_head(&mut b, &wf);
        put_step(&mut b, &wf, 1);
        assert_eq!(b.len(), 2);
        store.write(b).expect("write");
        assert_eq!(get(&store, &wf.id).expect("get"), Some(wf.clone()));
        assert_eq!(live(&store).expect("live"), vec![wf.clone()]);
        assert_eq!(list_last(&store, 5).expect("list"), vec![wf]);
    }

    #[test]
    fn whole_records_of_the_first_layout_are_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let wf = workflow();
        let mut b = Batch::default();
        b.put(LEGACY, &head_key(&wf.id), &wf);
        store.write(b).expect("write");
        assert_eq!(migrate(&store).expect("migrate"), 1);
        assert_eq!(get(&store, &wf.id).expect("get"), Some(wf));
        assert!(store.scan(LEGACY, &[]).expect("scan").is_empty());
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
