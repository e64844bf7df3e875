//! The agent's tables of jobs and offers, in one place: the service and
//! the executors read and write them through these (job types have their
//! own module, [`crate::job_types`]).

use caroni_store::{tables, Table};
use uuid::Uuid;

use crate::executor::Execution;
use crate::machine::{Job, Offer};

/// Offers made, by request.
pub(crate) const OFFERS: Table<Offer> = Table::new(tables::AGENT_OFFERS, "agent_offers");
/// Jobs held, by job id.
pub(crate) const JOBS: Table<Job> = Table::new(tables::AGENT_JOBS_V2, "agent_jobs");

/// A job as the 0x21 layout stored it (no queue time, no failure kind).
#[derive(serde::Deserialize)]
struct JobV1 {
    id: Uuid,
    offer_id: Uuid,
    request_id: Uuid,
    manager: String,
    endpoint: String,
    job_type: String,
    job_kvs: std::collections::BTreeMap<String, String>,
    inputs: Vec<String>,
    values: std::collections::BTreeMap<String, String>,
    outputs: std::collections::BTreeMap<String, String>,
    state: caroni_types::msg::JobState,
    seq: u64,
    queue_seq: Option<u64>,
    created_at_ms: u64,
    started_at_ms: Option<u64>,
    ended_at_ms: Option<u64>,
    exit_status: Option<i32>,
    message: String,
    stderr_tail: String,
}

const JOBS_V1: Table<JobV1> = Table::new(tables::AGENT_JOBS, "agent_jobs (0x21 layout)");

/// Up to `limit` job ids whose bytes start with `prefix`, in key order
/// from after `after`.
pub fn job_ids_with_prefix(
    store: &caroni_store::Store,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> caroni_store::Result<Vec<Uuid>> {
    Ok(store
        .scan_after(JOBS, prefix, after, limit)?
        .into_iter()
        .map(|(_, j)| j.id)
        .collect())
}

/// A page of jobs, newest first (job ids are UUID v7): at most `limit`
/// matching `keep`, from before `after`; and the last id read when more
/// may match.
pub fn jobs_page(
    store: &caroni_store::Store,
    limit: usize,
    after: Option<Uuid>,
    keep: &dyn Fn(&Job) -> bool,
) -> caroni_store::Result<(Vec<Job>, Option<Uuid>)> {
    let limit = limit.max(1);
    let mut before = after.map(|id| caroni_store::keys::Key::new().uuid(&id).finish());
    let mut out = Vec::new();
    let mut scanned = 0usize;
    loop {
        let page = store.scan_back(JOBS, before.as_deref(), 512)?;
        if page.is_empty() {
            return Ok((out, None));
        }
        for (key, job) in page {
            scanned += 1;
            before = Some(key);
            let id = job.id;
            if keep(&job) {
                out.push(job);
                if out.len() == limit {
                    return Ok((out, Some(id)));
                }
            }
            if scanned >= 200_000 {
                return Ok((out, Some(id)));
            }
        }
    }
}

/// Deletes jobs that ended before `before_ms` (at most 1,000 a call) with
/// where they ran; returns how many.
pub fn delete_ended(store: &caroni_store::Store, before_ms: u64) -> caroni_store::Result<usize> {
    let mut b = caroni_store::Batch::default();
    let mut n = 0;
    let mut after: Option<Vec<u8>> = None;
    'scan: loop {
        let page = store.scan_after(JOBS, &[], after.as_deref(), 1024)?;
        if page.is_empty() {
            break;
        }
        for (key, job) in page {
            // Ids are time-ordered: one created after the cut-off cannot
            // have ended before it, nor can any after it.
            if job.created_at_ms >= before_ms {
                break 'scan;
            }
            if job.state.is_final() && job.ended_at_ms.is_some_and(|t| t < before_ms) {
                b.delete(JOBS, &key);
                b.delete(EXECUTIONS, &key);
                let request = caroni_store::keys::Key::new()
                    .uuid(&job.request_id)
                    .finish();
                b.delete(REQUEST_NEEDS, &request);
                for stream in [crate::logs::Stream::Stdout, crate::logs::Stream::Stderr] {
                    b.delete(LOGS, &crate::logs::row(job.id, stream));
                }
                n += 1;
                if n >= 1000 {
                    break 'scan;
                }
            }
            after = Some(key);
        }
    }
    if n > 0 {
        store.write(b)?;
    }
    Ok(n)
}

/// Converts jobs of the 0x21 layout; returns how many.
pub(crate) fn migrate(store: &caroni_store::Store) -> caroni_store::Result<usize> {
    let mut converted = 0;
    loop {
        let old = store.scan_limit(JOBS_V1, &[], 1024)?;
        if old.is_empty() {
            return Ok(converted);
        }
        let mut b = caroni_store::Batch::default();
        for (key, j) in old {
            let job = Job {
                id: j.id,
                offer_id: j.offer_id,
                request_id: j.request_id,
                manager: j.manager,
                endpoint: j.endpoint,
                job_type: j.job_type,
                job_kvs: j.job_kvs,
                inputs: j.inputs,
                values: j.values,
                outputs: j.outputs,
                state: j.state,
                seq: j.seq,
                queue_seq: j.queue_seq,
                created_at_ms: j.created_at_ms,
                queued_at_ms: None,
                started_at_ms: j.started_at_ms,
                ended_at_ms: j.ended_at_ms,
                exit_status: j.exit_status,
                message: j.message,
                stderr_tail: j.stderr_tail,
                failure: String::new(),
            };
            b.put(JOBS, &key, &job);
            b.delete(JOBS_V1, &key);
            converted += 1;
        }
        store.write(b)?;
    }
}
/// Where each job runs (executor and container name or Slurm job id).
/// Short logs of ended jobs ([`crate::logs`]): key = job, stream.
pub(crate) const LOGS: Table<Vec<u8>> = Table::new(tables::AGENT_JOB_LOGS, "agent_job_logs");

pub(crate) const EXECUTIONS: Table<Execution> =
    Table::new(tables::AGENT_JOB_EXECUTIONS, "agent_job_executions");
/// The workflow each offered request is for, as its manager said (kept
/// with the jobs; a request from a manager that does not say has none).
/// What each offered request needs (those that need anything).
pub(crate) const REQUEST_NEEDS: Table<caroni_types::market::Needs> =
    Table::new(tables::AGENT_REQUEST_NEEDS, "agent_request_needs");
/// The price each priced offer named, and its maximum.
pub(crate) const REQUEST_PRICES: Table<(caroni_types::market::Price, u64)> =
    Table::new(tables::AGENT_REQUEST_PRICES, "agent_request_prices");
/// The priority of each offered request's workflow, when not 0.
pub(crate) const REQUEST_PRIORITIES: Table<i32> =
    Table::new(tables::AGENT_REQUEST_PRIORITIES, "agent_request_priorities");
pub(crate) const REQUEST_WORKFLOWS: Table<Uuid> =
    Table::new(tables::AGENT_REQUEST_WORKFLOWS, "agent_request_workflows");

/// How long a finished job's File outputs are kept for its manager to
/// fetch, even when the cache is full.
pub const OUTPUT_GRACE_MS: u64 = 60 * 60 * 1000;

/// The SHA-256 of every file a job this agent holds still needs: the
/// inputs and outputs of jobs that have not ended, and the outputs of jobs
/// that ended less than [`OUTPUT_GRACE_MS`] ago (their manager may not
/// have fetched them yet).
pub fn live_files(
    store: &caroni_store::Store,
    now_ms: u64,
) -> caroni_store::Result<std::collections::HashSet<String>> {
    let mut out = std::collections::HashSet::new();
    for (_, job) in store.scan(JOBS, &[])? {
        let recent = job
            .ended_at_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < OUTPUT_GRACE_MS);
        let values: Vec<&String> = if !job.state.is_final() {
            job.values.values().chain(job.outputs.values()).collect()
        } else if recent {
            job.outputs.values().collect()
        } else {
            continue;
        };
        for v in values {
            for f in caroni_types::file::refs_in(v) {
                out.insert(f.sha256.clone());
            }
        }
    }
    Ok(out)
}
