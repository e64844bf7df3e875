//! Jobs and runs: recovery at start, forgetting expired offers, recording
//! a job's change and what it causes, the scheduling decision, and the end
//! of a run.

use std::time::Duration;

use caroni_types::msg::{JobState, Msg, Outbound};
use caroni_types::ExecutorSpec;
use uuid::Uuid;

use super::{Agent, Failure, JobChange, Out, Start, World, LOOK_PAST};
use crate::executor::{Execution, RunSpec};
use crate::machine::{Effect, Job, RunResult};

impl Agent {
    /// The jobs loaded at start: a job that was running re-runs, a queued
    /// one takes its place in the queue again.
    pub(super) fn recover(&mut self, world: &dyn World, out: &mut Out) {
        self.queue.clear();
        // Priorities of live requests, as stored with their offers.
        let requests: Vec<Uuid> = self
            .jobs
            .values()
            .map(|j| j.request_id)
            .chain(self.offers.keys().copied())
            .collect();
        for r in requests {
            let p = world.priority(&r);
            if p != 0 {
                self.priorities.insert(r, p);
            }
        }
        let mut ids: Vec<(u64, Uuid)> = self
            .jobs
            .values()
            .map(|j| (j.queue_seq.unwrap_or(0), j.id))
            .collect();
        ids.sort();
        for (_, id) in ids {
            let Some(mut job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let was_running = job.state == JobState::Running;
            let fx = job.on_restart();
            if fx.is_empty() {
                continue;
            }
            if was_running {
                tracing::warn!(job = %id, "job was running when the agent stopped; it runs again");
            }
            let trace = world.workflow_of(&job.request_id);
            self.commit(Some(job), fx, trace, world, out);
        }
    }

    pub(super) fn forget_expired(&mut self, now_ms: u64, out: &mut Out) {
        self.declined.retain(|_, until| *until > now_ms);
        let expired: Vec<Uuid> = self
            .offers
            .values()
            .filter(|o| o.expires_at_ms <= now_ms)
            .map(|o| o.request_id)
            .collect();
        for r in expired {
            self.offers.remove(&r);
            out.forget_offers.push(r);
        }
        // Needs are kept in memory while their offer or job lives.
        let live: std::collections::HashSet<Uuid> = self
            .offers
            .keys()
            .copied()
            .chain(self.jobs.values().map(|j| j.request_id))
            .collect();
        self.needs.retain(|r, _| live.contains(r));
        self.priorities.retain(|r, _| live.contains(r));
    }

    /// Where a job runs: as recorded when it started, else its job type's
    /// executor.
    pub(super) fn runs_on(&self, job_id: Uuid, world: &dyn World, out: &Out) -> Option<Execution> {
        if let Some((_, x)) = out.executions.iter().rev().find(|(j, _)| *j == job_id) {
            return Some(x.clone());
        }
        if let Some(x) = world.execution(&job_id) {
            return Some(x);
        }
        let job = self.jobs.get(&job_id)?;
        let e = world.job_type(&job.job_type).ok()??.1;
        Some(Execution {
            executor: e.name().to_string(),
            external_id: String::new(),
        })
    }

    /// Records a job's change and what it causes; `trace` is the workflow
    /// the messages are about.
    pub(super) fn commit(
        &mut self,
        job: Option<Job>,
        mut fx: Vec<Effect>,
        trace: Option<Uuid>,
        world: &dyn World,
        out: &mut Out,
    ) {
        let mut job = job;
        for e in &mut fx {
            match e {
                // Status updates say where the job runs.
                Effect::Send(Outbound {
                    msg: Msg::Status(s),
                    ..
                }) => {
                    if let Some(x) = self.runs_on(s.job_id, world, out) {
                        s.executor = x.executor;
                        s.external_id = x.external_id;
                    }
                }
                Effect::Enqueue(_) => {
                    if let Some(j) = job.as_mut() {
                        j.queue_seq = Some(self.next_queue_seq);
                        self.next_queue_seq += 1;
                    }
                }
                _ => {}
            }
        }
        // A job that ran and ended: its receipt goes with its final status
        // (signed by the service, which holds the key).
        if let Some(j) = job.as_ref().filter(|j| j.state.is_final()) {
            if let Some(receipt) = self.receipt(j, trace, world) {
                for e in &mut fx {
                    if let Effect::Send(Outbound {
                        msg: Msg::Status(s),
                        ..
                    }) = e
                    {
                        if s.job_id == j.id && s.state.is_final() {
                            s.receipt = Some(Box::new(receipt.clone()));
                        }
                    }
                }
            }
        }
        for e in &fx {
            match e {
                Effect::Send(o) => out.send(o.clone(), trace),
                Effect::Enqueue(id) => {
                    if let Some(seq) = job.as_ref().and_then(|j| j.queue_seq) {
                        self.queue.insert(seq, *id);
                    }
                }
                Effect::StopProcess(id) => {
                    if self.running.remove(id) {
                        self.slurm_running.remove(id);
                        self.held.remove(id);
                        out.stop.push(*id);
                    }
                }
            }
        }
        if let Some(j) = job {
            out.changed.push(JobChange {
                id: j.id,
                state: j.state,
            });
            if j.state.is_final() {
                self.jobs.remove(&j.id);
                if let Some(seq) = j.queue_seq {
                    if self.queue.get(&seq) == Some(&j.id) {
                        self.queue.remove(&seq);
                    }
                }
            } else {
                self.jobs.insert(j.id, j.clone());
            }
            out.jobs.insert(j.id, j);
        }
    }

    /// The receipt of a job that ran and ended (none for one that never
    /// started: it cost nothing).
    fn receipt(
        &self,
        j: &Job,
        workflow: Option<Uuid>,
        world: &dyn World,
    ) -> Option<caroni_types::ledger::SignedReceipt> {
        use caroni_types::ledger::{values_sha256, Receipt, SignedReceipt};
        let started = j.started_at_ms?;
        let ended = j.ended_at_ms.unwrap_or(started).max(started);
        let (price, max) = world.offer_price(&j.request_id).unwrap_or_default();
        let wall_ms = ended - started;
        Some(SignedReceipt {
            receipt: Receipt {
                job_id: j.id,
                workflow_id: workflow,
                manager: j.manager.clone(),
                agent: self.opts.node_id.clone(),
                job_type: j.job_type.clone(),
                state: j.state,
                inputs_sha256: values_sha256(&j.values),
                outputs_sha256: values_sha256(&j.outputs),
                wall_ms,
                cpu_ms: None,
                price,
                max_charge_milli: max,
                charge_milli: price.charge(wall_ms, max),
                ended_at_ms: ended,
            },
            signature: Vec::new(),
        })
    }

    /// Starts queued jobs, oldest first, while slots are free. Jobs of
    /// Slurm job types do not take local slots: at most their type's
    /// `max_in_flight` are submitted at once. A job that does not fit now
    /// stays queued in its place; at most [`LOOK_PAST`] are looked past.
    pub(super) fn schedule(&mut self, now_ms: u64, world: &dyn World, out: &mut Out) {
        let mut skipped = Vec::new();
        self.start_queued(now_ms, world, out, &mut skipped);
        for (seq, id) in skipped {
            self.queue.insert(seq, id);
        }
    }

    pub(super) fn start_queued(
        &mut self,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
        skipped: &mut Vec<(u64, Uuid)>,
    ) {
        loop {
            let local = self
                .running
                .iter()
                .filter(|k| !self.slurm_running.contains_key(k))
                .count();
            if skipped.len() >= LOOK_PAST || (local >= self.opts.slots && !self.slurm_seen) {
                return;
            }
            let Some((_, id)) = self.pop_fair(now_ms) else {
                return;
            };
            let Some(mut job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let found = if job.job_type == caroni_types::CWL_TOOL_JOB_TYPE {
                Ok(Some((
                    crate::cwl::job_type(&job.job_kvs, self.opts.cwl_tools).0,
                    ExecutorSpec::Bash,
                )))
            } else {
                world.job_type(&job.job_type)
            };
            let (def, executor) = match found {
                Ok(Some(found)) => found,
                Ok(None) => {
                    let mut fx = job.on_started(now_ms);
                    fx.append(&mut job.on_finished(
                        RunResult::Failed {
                            message: format!(
                                "job type {} was removed from this agent",
                                job.job_type
                            ),
                            exit_status: None,
                            stderr_tail: String::new(),
                            kind: Failure::Other,
                        },
                        now_ms,
                    ));
                    let trace = world.workflow_of(&job.request_id);
                    self.commit(Some(job), fx, trace, world, out);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read job types");
                    self.queue.insert(job.queue_seq.unwrap_or(0), id);
                    return;
                }
            };
            let fits = match &executor {
                ExecutorSpec::Slurm(s) => {
                    self.slurm_seen = true;
                    let of_type = self
                        .slurm_running
                        .values()
                        .filter(|t| **t == job.job_type)
                        .count();
                    of_type < s.max_in_flight as usize
                }
                // A local job also needs its resources free (a Slurm job
                // holds the cluster's, not this host's).
                _ => {
                    local < self.opts.slots
                        && self
                            .job_needs(&job.request_id, world)
                            .resources
                            .fits(&self.free_resources())
                }
            };
            if !fits {
                skipped.push((job.queue_seq.unwrap_or(0), id));
                continue;
            }
            let slurm = matches!(executor, ExecutorSpec::Slurm(_));
            let fx = job.on_started(now_ms);
            let spec = RunSpec {
                job_id: id,
                body: def.body.clone(),
                inputs: job.values.clone(),
                job_kvs: job.job_kvs.clone(),
                outputs: def.outputs.clone(),
                timeout: Duration::from_secs(u64::from(def.timeout_seconds)),
                max_output_bytes: def.max_output_bytes,
                executor,
                cwl_tool: (job.job_type == caroni_types::CWL_TOOL_JOB_TYPE)
                    .then(|| job.job_kvs.get(caroni_types::CWL_TOOL_KV).cloned())
                    .flatten(),
                logs: None,
            };
            // Where it runs, written with its start (a Slurm job's id is
            // written by its executor once sbatch has given it).
            if !slurm {
                out.executions.push((
                    id,
                    Execution {
                        executor: spec.executor.name().to_string(),
                        external_id: world.external_id(&spec),
                    },
                ));
            }
            let workflow = world.workflow_of(&job.request_id);
            if slurm {
                self.slurm_running.insert(id, job.job_type.clone());
            } else {
                let held = self.job_needs(&job.request_id, world).resources;
                if !held.is_zero() {
                    self.held.insert(id, held);
                }
            }
            self.commit(Some(job), fx, workflow, world, out);
            self.running.insert(id);
            out.start.push(Start { spec, workflow });
        }
    }

    pub(super) fn finished(
        &mut self,
        id: Uuid,
        result: RunResult,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
    ) {
        self.running.remove(&id);
        self.slurm_running.remove(&id);
        self.held.remove(&id);
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        if let Some(started) = job.started_at_ms {
            let seconds = now_ms.saturating_sub(started) as f64 / 1000.0;
            self.used(&job.manager.clone(), seconds, now_ms);
        }
        out.results.push((id, result.clone()));
        match &result {
            // Stopped because its manager cancelled it: counted then.
            _ if job.state == JobState::Cancelled => {}
            RunResult::Completed { .. } => out.completed += 1,
            RunResult::Failed { kind, .. } => out.failures.push(*kind),
        }
        let fx = job.on_finished(result, now_ms);
        let trace = world.workflow_of(&job.request_id);
        tracing::debug!(workflow = %caroni_types::msg::Trace(trace), job = %id, state = job.state.as_str(), reason = %job.message, "job finished");
        self.commit(Some(job), fx, trace, world, out);
    }
}
