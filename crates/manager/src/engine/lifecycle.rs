//! A workflow's life in the live set: created, waiting for admission
//! (its large values shelved on disk), admitted, changed by one of its
//! rules (and its records and indexes updated from the change), cancelled,
//! ended.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{Manager, Now, Out, PeerView, World, SHELVE_BYTES};
use crate::machine::Ctx;
use crate::model::{StepState, Workflow, WorkflowState};
use crate::{records, Error};

impl Manager {
    pub(super) fn start(
        &mut self,
        template: &str,
        parsed: &std::sync::Arc<caroni_cwl::Workflow>,
        inputs: BTreeMap<String, String>,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Uuid, Error> {
        // A file given must be here (uploaded) before anything starts.
        for (name, v) in &inputs {
            for f in caroni_types::file::refs_in(v) {
                if !world.holds_file(&f) {
                    return Err(Error::BadInput(format!(
                        "workflow input `{name}`: file {} is not on this manager; upload it first (caroni run TEMPLATE {name}=@path uploads and passes it)",
                        f.describe()
                    )));
                }
            }
        }
        let id = (now.new_id)();
        let mut wf = Workflow::create(id, template, parsed, inputs, now.ms)
            .map_err(|e| Error::BadInput(e.to_string()))?;
        if parsed.is_dynamic() {
            wf.plan = Some(parsed.clone());
        }
        out.created.push(id);
        tracing::debug!(workflow = %id, template, "workflow created");
        out.heads.insert(id);
        out.steps.extend((0..wf.steps.len()).map(|n| (id, n)));
        out.values
            .extend(records::value_keys(&wf).into_iter().map(|v| (id, v)));
        self.waiting.push_back(id);
        self.insert_live(wf, world, now.ms);
        Ok(id)
    }

    /// Starts waiting workflows, the highest priority first and the oldest
    /// first among equals, while their requests fit.
    pub(super) fn admit(&mut self, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        // The highest priority first, the oldest first among equals
        // (looking at most this far into the queue).
        const LOOK: usize = 4096;
        loop {
            // Requests out fill every place: nothing is admitted, and the
            // queue is not looked through (this runs in every group).
            let open = self.index.open_requests;
            if self.waiting.is_empty() || open > 0 && open >= self.opts.max_open_requests {
                return;
            }
            let pick = self
                .waiting
                .iter()
                .take(LOOK)
                .enumerate()
                .map(|(i, id)| (i, self.live.get(id).map_or(i32::MAX, |w| w.priority)))
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i);
            let Some((pick, id)) = pick.and_then(|i| self.waiting.get(i).map(|id| (i, *id))) else {
                return;
            };
            let Some(wf) = self.live.get(&id) else {
                self.waiting.remove(pick);
                continue;
            };
            if wf.state != WorkflowState::Created {
                self.waiting.remove(pick);
                continue;
            }
            // Always admit one when nothing is out, however large.
            let open = self.index.open_requests;
            if open > 0 && open + wf.steps.len() > self.opts.max_open_requests {
                return;
            }
            if !self.unshelve(&id, world) {
                return;
            }
            self.waiting.remove(pick);
            if let Some(fx) = self.change(id, now, world, out, |wf, ctx| wf.start(ctx)) {
                self.effects(id, fx, out);
            }
        }
    }

    pub(super) fn cancel(
        &mut self,
        id: Uuid,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), Error> {
        if !self.live.contains_key(&id) {
            let wf = Self::ended(id, world, out)?;
            return Err(Error::Finished(format!(
                "workflow {id} is already {}; only a live workflow can be cancelled",
                wf.state.as_str()
            )));
        }
        let fx = self
            .change(id, now, world, out, |wf, ctx| {
                wf.cancel(ctx, "cancelled by a user")
            })
            .ok_or_else(|| Error::NotFound(format!("no workflow {id}")))?;
        tracing::info!(workflow = %id, "workflow cancelled");
        self.effects(id, fx, out);
        Ok(())
    }

    /// A workflow that is not live: ended in this group, or as stored.
    fn ended(id: Uuid, world: &dyn World, out: &Out) -> Result<Workflow, Error> {
        match out.finished.get(&id) {
            Some(wf) => Ok(wf.clone()),
            None => world
                .stored(&id)
                .map_err(|e| Error::Unavailable(e.to_string()))?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "no workflow {id}; `caroni workflow list` shows them"
                    ))
                }),
        }
    }

    /// Resumes a failed or cancelled workflow (see
    /// [`Workflow::resume`]).
    pub(super) fn resume(
        &mut self,
        id: Uuid,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), Error> {
        if let Some(wf) = self.live.get(&id) {
            return Err(Error::Finished(format!(
                "workflow {id} is {}; only a failed or cancelled workflow can be retried",
                wf.state.as_str()
            )));
        }
        let wf = Self::ended(id, world, out)?;
        // Refused (not ended, or a child) before anything changes.
        wf.resumable().map_err(Error::Finished)?;
        out.finished.remove(&id);
        // Back in the live set, then resumed as a change of it.
        self.insert_live(wf, world, now.ms);
        let fx = self
            .change(id, now, world, out, |wf, ctx| wf.resume(ctx))
            .ok_or_else(|| Error::NotFound(format!("no workflow {id}")))?
            .map_err(Error::Finished)?;
        tracing::info!(workflow = %id, "workflow resumed");
        self.effects(id, fx, out);
        Ok(())
    }

    pub(super) fn deadline(&self, wf: &Workflow, world: &dyn World, now_ms: u64) -> Option<u64> {
        let view = PeerView {
            directory: &self.directory,
            opts: &self.opts,
            answered: &self.answered,
            agent_jobs: &self.index.agent_jobs,
            world,
            now_ms,
            quiet_ms: self.opts.lease.as_millis() as u64,
        };
        wf.next_deadline(
            self.opts.lease.as_millis() as u64,
            &view,
            self.opts.blocking(),
        )
    }

    pub(super) fn insert_live(&mut self, wf: Workflow, world: &dyn World, now_ms: u64) {
        let d = self.deadline(&wf, world, now_ms);
        self.index.add(&wf, d);
        self.live.insert(wf.id, wf);
    }

    /// Runs `f` on a live workflow with a context, then puts it back (or
    /// records it as ended) and notes which of its records changed.
    pub(super) fn change<R>(
        &mut self,
        id: Uuid,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
        f: impl FnOnce(&mut Workflow, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let mut wf = self.live.remove(&id)?;
        self.index.remove(&wf, false);
        let before = wf.clone();
        let r = {
            let view = PeerView {
                directory: &self.directory,
                opts: &self.opts,
                answered: &self.answered,
                agent_jobs: &self.index.agent_jobs,
                world,
                now_ms: now.ms,
                quiet_ms: self.opts.lease.as_millis() as u64,
            };
            let mut ctx = Ctx {
                now_ms: now.ms,
                lease_ms: self.opts.lease.as_millis() as u64,
                request_ttl_ms: self.opts.request_ttl.as_millis() as u64,
                endpoint: &self.opts.endpoint,
                new_id: &mut *now.new_id,
                offer_window_ms: self.opts.offer_window.as_millis() as u64,
                peers: &view,
                blobs: &view,
                answer_timeout_ms: self.opts.blocking().0,
                unplaceable_ms: self.opts.blocking().1,
            };
            f(&mut wf, &mut ctx)
        };
        // What must be written: the head, the steps and the values whose
        // records changed (a re-publication alone changes none).
        let values = records::changed_values(&before, &wf);
        let mut changed = !records::same_head(&before, &wf) || !values.is_empty();
        for (n, (a, b)) in before.steps.iter().zip(&wf.steps).enumerate() {
            if records::same_step(a, b) {
                continue;
            }
            changed = true;
            out.steps.insert((id, n));
            // Each agent's record: jobs that ended here, by outcome.
            for (was, now) in a.attempts.iter().zip(&b.attempts) {
                if was.is_live() && !now.is_live() && now.job_id.is_some() {
                    self.directory
                        .note_outcome(&now.agent, now.state, &now.failure);
                }
            }
            if b.state == StepState::Completed && a.state != StepState::Completed {
                if let Some(ready) = self.ready_at.remove(&(id, n)) {
                    out.step_seconds
                        .push(now.ms.saturating_sub(ready) as f64 / 1000.0);
                }
            } else if b.state != StepState::Completed
                && b.inputs.iter().all(|i| b.values.contains_key(&i.name))
            {
                self.ready_at.entry((id, n)).or_insert(now.ms);
            }
        }
        out.values.extend(values.into_iter().map(|v| (id, v)));
        if changed {
            // The head is written with any change of the workflow, and
            // watchers hear of it.
            out.heads.insert(id);
        }
        if wf.state.is_final() && !before.state.is_final() {
            self.family_ended(&wf);
        }
        if wf.state.is_final() {
            self.shelved.remove(&id);
            tracing::info!(workflow = %id, state = wf.state.as_str(), reason = %wf.message, "workflow finished");
            for n in 0..wf.steps.len() {
                self.ready_at.remove(&(id, n));
            }
            self.index.remove(&wf, true);
            out.finished.insert(id, wf);
        } else {
            self.insert_live(wf, world, now.ms);
        }
        Some(r)
    }

    /// Drops the values of a workflow that waits for admission from
    /// memory, when they are large; call only once they are on disk.
    pub(super) fn shelve(&mut self, id: &Uuid) {
        let Some(wf) = self.live.get_mut(id) else {
            return;
        };
        let held: usize = wf.inputs.values().map(|v| v.len()).sum();
        if wf.state != WorkflowState::Created || held < SHELVE_BYTES || self.shelved.contains(id) {
            return;
        }
        wf.inputs.clear();
        for s in &mut wf.steps {
            s.values.clear();
            s.results.clear();
        }
        self.shelved.insert(*id);
    }

    /// Reads a shelved workflow's values back; false when storage fails
    /// (it stays shelved and waits).
    pub(super) fn unshelve(&mut self, id: &Uuid, world: &dyn World) -> bool {
        if !self.shelved.contains(id) {
            return true;
        }
        match world.stored(id) {
            Ok(Some(full)) => {
                self.shelved.remove(id);
                // Nothing but the values differs: a waiting workflow has
                // no request, job or timer in the indexes.
                if let Some(wf) = self.live.get_mut(id) {
                    *wf = full;
                }
                true
            }
            Ok(None) => {
                tracing::error!(workflow = %id, "a waiting workflow is not on disk");
                false
            }
            Err(e) => {
                tracing::error!(workflow = %id, error = %e, "cannot read a waiting workflow's values; it waits");
                false
            }
        }
    }
}
