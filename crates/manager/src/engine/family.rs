//! Parents and children: the child workflows that run the elements of
//! dynamic steps are made here (from [`Effect::Spawn`]), go through
//! admission like any workflow, and tell their parent when they end; a
//! parent that gathers reads its elements' outputs here; a workflow that
//! ends without completing stops its live children. All of it happens in
//! the group of the change that caused it, so one write holds a parent
//! and its children consistent.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::{Manager, Notice, Now, Out, World};
use crate::machine::{Effect, Spawn};
use crate::model::{Parent, Workflow, WorkflowState};
use crate::records;

impl Manager {
    /// Notes what the end of `wf` means for its parent and children.
    pub(super) fn family_ended(&mut self, wf: &Workflow) {
        if let Some(p) = wf.parent {
            let outcome = if wf.state == WorkflowState::Completed {
                Ok(wf.outputs.clone())
            } else {
                Err(format!("{}: {}", wf.state.as_str(), wf.message))
            };
            self.notices.push_back(Notice::Ended(p, outcome));
        }
        if wf.state != WorkflowState::Completed && self.index.children.contains_key(&wf.id) {
            let why = format!(
                "its parent workflow {} {}",
                wf.id,
                if wf.state == WorkflowState::Cancelled {
                    "was cancelled"
                } else {
                    "failed"
                }
            );
            self.notices.push_back(Notice::Orphans(wf.id, why));
        }
    }

    /// Makes pending children, gathers, tells parents and stops orphans
    /// until nothing is left to do; admits what now fits.
    pub(super) fn family(&mut self, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        loop {
            if let Some((id, e)) = self.pending.pop_front() {
                match e {
                    Effect::Spawn(sp) => self.spawn(id, sp, now, world, out),
                    Effect::Gather(n) => self.gather(id, n, now, world, out),
                    other => self.effects(id, vec![other], out),
                }
                continue;
            }
            if let Some(notice) = self.notices.pop_front() {
                match notice {
                    Notice::Ended(p, outcome) => self.child_ended(p, outcome, now, world, out),
                    Notice::Orphans(id, why) => {
                        let children: Vec<Uuid> = self
                            .index
                            .children
                            .get(&id)
                            .map(|s| s.iter().copied().collect())
                            .unwrap_or_default();
                        for c in children {
                            if let Some(fx) =
                                self.change(c, now, world, out, |wf, ctx| wf.cancel(ctx, &why))
                            {
                                self.effects(c, fx, out);
                            }
                        }
                    }
                }
                continue;
            }
            // Admitting a child may make more work (a child of dynamic
            // steps only starts them at once); go round until none.
            self.admit(now, world, out);
            if self.pending.is_empty() && self.notices.is_empty() {
                break;
            }
        }
    }

    /// Makes the child workflow of one element.
    fn spawn(
        &mut self,
        parent: Uuid,
        sp: Spawn,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) {
        let Some(p) = self.live.get(&parent) else {
            return;
        };
        let Some((step_id, body)) = p.plan.as_ref().and_then(|plan| {
            let s = plan.steps.get(sp.step)?;
            Some((s.id.clone(), s.dynamic.as_ref()?.body.clone()))
        }) else {
            return;
        };
        let id = (now.new_id)();
        let template = format!("{}/{}", p.template, step_id);
        let max_attempts = p.max_attempts;
        let link = Parent {
            id: parent,
            step: sp.step as u32,
            index: sp.index,
        };
        let mut wf = match Workflow::create(id, &template, &body, sp.inputs, now.ms) {
            Ok(wf) => wf,
            Err(e) => {
                self.notices.push_back(Notice::Ended(
                    link,
                    Err(format!("its inputs are refused: {e}")),
                ));
                return;
            }
        };
        wf.max_attempts = max_attempts;
        wf.parent = Some(link);
        wf.priority = self.live.get(&parent).map_or(0, |p| p.priority);
        // A budget is shared: each element gets an even share of what is
        // left among the elements of this step being made now.
        let siblings = self
            .pending
            .iter()
            .filter(|(w, e)| *w == parent && matches!(e, Effect::Spawn(s) if s.step == sp.step))
            .count() as u64;
        if let Some(p) = self.live.get_mut(&parent) {
            if let (Some(left), Some(b)) = (p.budget_left_milli(), p.budget) {
                let share = left / (siblings + 1);
                wf.budget = Some(crate::model::WorkflowBudget {
                    limit: caroni_types::market::Budget {
                        limit_milli: share,
                        fail_when_exhausted: b.limit.fail_when_exhausted,
                    },
                    allotted_milli: 0,
                });
                if let Some(pb) = p.budget.as_mut() {
                    pb.allotted_milli = pb.allotted_milli.saturating_add(share);
                }
                out.heads.insert(parent);
            }
        }
        if body.is_dynamic() {
            wf.plan = Some(Arc::new(*body));
        }
        out.heads.insert(id);
        out.steps.extend((0..wf.steps.len()).map(|n| (id, n)));
        out.values
            .extend(records::value_keys(&wf).into_iter().map(|v| (id, v)));
        out.created.push(id);
        self.waiting.push_back(id);
        self.insert_live(wf, world, now.ms);
    }

    /// A child ended: its outputs are kept for the gather, its parent
    /// learns the outcome.
    fn child_ended(
        &mut self,
        p: Parent,
        outcome: Result<BTreeMap<String, crate::model::Value>, String>,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) {
        if !self.live.contains_key(&p.id) {
            return;
        }
        let n = p.step as usize;
        let outcome = match outcome {
            Ok(outputs) => {
                out.elements.push((p.id, n, p.index, outputs.clone()));
                self.elements
                    .entry((p.id, n))
                    .or_default()
                    .insert(p.index, outputs);
                Ok(())
            }
            Err(why) => Err(why),
        };
        if let Some(fx) = self.change(p.id, now, world, out, |wf, ctx| {
            wf.on_child(ctx, n, p.index, outcome)
        }) {
            self.effects(p.id, fx, out);
        }
    }

    /// Every element of step `n` of `id` ended: hand their outputs over.
    fn gather(&mut self, id: Uuid, n: usize, now: &mut Now<'_>, world: &dyn World, out: &mut Out) {
        let Some(total) = self
            .live
            .get(&id)
            .and_then(|wf| wf.steps.get(n))
            .and_then(|s| s.fan.as_ref())
            .map(|f| f.total)
        else {
            return;
        };
        let mut done = self.elements.remove(&(id, n)).unwrap_or_default();
        let elements = (0..total).map(|k| done.remove(&k)).collect();
        if let Some(fx) = self.change(id, now, world, out, |wf, ctx| {
            wf.on_gathered(ctx, n, elements)
        }) {
            self.effects(id, fx, out);
        }
    }
}
