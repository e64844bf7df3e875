//! Dynamic steps: a step that scatters, runs on a condition, runs a
//! sub-workflow or computes its inputs waits until every source has a
//! value, then the manager evaluates its input object (sources merged,
//! `pickValue`, defaults), cuts it into elements (scatter), evaluates each
//! element's `valueFrom` and `when`, and runs each element that is not
//! skipped as a child workflow of its own (made by the engine from
//! [`Effect::Spawn`]). At most [`FAN_WINDOW`] elements of a step are live
//! at once; each one that ends lets the next in. When every element has
//! ended, the engine hands their outputs back ([`Effect::Gather`]) and the
//! step's outputs are gathered in element order.

use std::collections::BTreeMap;
use std::sync::Arc;

use caroni_cwl::dynamic::{self as dynamic_rules, Expressions, Shape};
use caroni_cwl::Source;
use serde_json::{Map, Value as J};

use super::{Ctx, Effect, Spawn};
use crate::model::{Fan, StepState, Value, Workflow, WorkflowState};

/// Live elements of one dynamic step at most (the engine's admission
/// bounds their requests further).
pub const FAN_WINDOW: u64 = 256;

/// Bytes of a file read into `contents` (`loadContents`).
const CONTENTS_BYTES: usize = 64 * 1024;

impl Workflow {
    /// The template's step `n` when it is dynamic.
    fn plan_step(&self, n: usize) -> Option<&caroni_cwl::Step> {
        let plan = self.plan.as_ref()?;
        let s = plan.steps.get(n)?;
        s.dynamic.as_ref().map(|_| s)
    }

    /// True when step `m` reads `from` (any source of any input).
    pub(super) fn reads(&self, m: usize, from: &Source) -> bool {
        self.plan_step(m).is_some_and(|s| {
            s.inputs
                .iter()
                .any(|i| i.all_sources().into_iter().any(|src| src == from))
        })
    }

    /// Starts dynamic step `n` once every source has a value.
    pub(super) fn try_expand(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if !self.steps[n].dynamic || self.steps[n].state != StepState::Created {
            return;
        }
        let Some(s) = self.plan_step(n) else {
            return;
        };
        let ready = s.inputs.iter().all(|i| {
            i.all_sources()
                .into_iter()
                .all(|src| self.steps[n].values.contains_key(&src.to_string()))
        });
        if !ready {
            return;
        }
        let prepared = match self.prepare(n) {
            Ok(p) => p,
            Err(why) => return self.fail_dynamic(n, why, ctx, fx),
        };
        let Some(d) = self.plan_step(n).and_then(|s| s.dynamic.as_ref()) else {
            return;
        };
        let shape = match Shape::of(d, &prepared) {
            Ok(s) => s,
            Err(why) => return self.fail_dynamic(n, why, ctx, fx),
        };
        let step = &mut self.steps[n];
        step.fan = Some(Fan {
            total: shape.total(),
            shape,
            decided: 0,
            done: 0,
            skipped: 0,
            failed: 0,
        });
        step.prepared = Some(prepared);
        step.state = StepState::Running;
        self.fill(n, ctx, fx);
    }

    /// The input object of dynamic step `n` before scatter and
    /// `valueFrom`: each input's sources combined, picked, defaulted.
    fn prepare(&self, n: usize) -> Result<Arc<J>, String> {
        let s = self
            .plan_step(n)
            .ok_or_else(|| format!("step {} has no plan", self.steps[n].id))?;
        let Some(d) = s.dynamic.as_ref() else {
            return Err(format!("step {} is not dynamic", s.id));
        };
        let ex = Expressions::of(d);
        let mut obj = Map::new();
        for i in &s.inputs {
            let sources = i.all_sources();
            let many = sources.len() > 1;
            let combined = many || i.link_merge.is_some();
            // The process's type reads the value only where the value is
            // what the process gets (not scattered, merged or computed).
            let ty = d
                .input_types
                .get(&i.name)
                .map(String::as_str)
                .filter(|_| i.value_from.is_none() && !d.scatter.contains(&i.name));
            let values: Vec<J> = sources
                .iter()
                .map(|src| {
                    let text = self.steps[n]
                        .values
                        .get(&src.to_string())
                        .map(|v| &**v)
                        .unwrap_or("null");
                    dynamic_rules::read(text, if combined { None } else { ty }, &ex.names)
                })
                .collect();
            let mut v = if sources.is_empty() {
                J::Null
            } else {
                dynamic_rules::merge(values, i.link_merge, many)
            };
            if let Some(p) = i.pick_value {
                v = dynamic_rules::pick(v, p, &format!("step {} input {}", s.id, i.name))?;
            }
            if v.is_null() {
                if let Some(dflt) = i.default.as_deref() {
                    v = dynamic_rules::read(dflt, ty, &ex.names);
                }
            }
            obj.insert(i.name.clone(), v);
        }
        Ok(Arc::new(J::Object(obj)))
    }

    /// Decides the next elements of step `n` while fewer than
    /// [`FAN_WINDOW`] are live; gathers when every element has ended.
    pub(super) fn fill(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(plan) = self.plan.clone() else {
            return;
        };
        let Some(d) = plan.steps.get(n).and_then(|s| s.dynamic.as_ref()) else {
            return;
        };
        if self.steps[n].prepared.is_none() {
            match self.prepare(n) {
                Ok(p) => self.steps[n].prepared = Some(p),
                Err(why) => return self.fail_dynamic(n, why, ctx, fx),
            }
        }
        let mut ex: Option<Expressions> = None;
        loop {
            let step = &self.steps[n];
            let (Some(fan), Some(prepared)) = (step.fan.as_ref(), step.prepared.clone()) else {
                return;
            };
            if fan.decided >= fan.total {
                if fan.live() == 0 {
                    fx.push(Effect::Gather(n));
                }
                return;
            }
            if fan.live() >= FAN_WINDOW {
                return;
            }
            let k = fan.decided;
            let shape = fan.shape.clone();
            let ex = ex.get_or_insert_with(|| Expressions::of(d));
            let element = match self.element(n, &shape, &prepared, k, ex, ctx) {
                Ok(e) => e,
                Err(why) => {
                    let why = if shape.scatters() {
                        format!("element {k}: {why}")
                    } else {
                        why
                    };
                    return self.fail_dynamic(n, why, ctx, fx);
                }
            };
            let Some(fan) = self.steps[n].fan.as_mut() else {
                return;
            };
            fan.decided += 1;
            match element {
                None => fan.skipped += 1,
                Some(inputs) => fx.push(Effect::Spawn(Spawn {
                    step: n,
                    index: k,
                    inputs,
                })),
            }
        }
    }

    /// Element `k`'s inputs for its child, or `None` when its condition
    /// is false.
    fn element(
        &self,
        n: usize,
        shape: &Shape,
        prepared: &J,
        k: u64,
        ex: &mut Expressions,
        ctx: &Ctx<'_>,
    ) -> Result<Option<BTreeMap<String, String>>, String> {
        let Some((s, d)) = self
            .plan_step(n)
            .and_then(|s| s.dynamic.as_ref().map(|d| (s, d)))
        else {
            return Err("the step is not in the plan".into());
        };
        let mut el = shape.element(d, prepared, k);
        for i in s.inputs.iter().filter(|i| i.load_contents) {
            if let Some(f) = el.get_mut(&i.name) {
                load_contents(f, ctx)?;
            }
        }
        let mut fin = el.clone();
        for i in &s.inputs {
            if let Some(expr) = &i.value_from {
                let this = el.get(&i.name).cloned().unwrap_or(J::Null);
                let v = ex
                    .eval(expr, &el, &this)
                    .map_err(|e| format!("valueFrom of input {}: {e}", i.name))?;
                fin[&i.name] = v;
            }
        }
        if let Some(when) = &d.when {
            if !ex.when(when, &fin)? {
                return Ok(None);
            }
        }
        let mut inputs = BTreeMap::new();
        for bi in &d.body.inputs {
            let mut v = fin.get(&bi.id).cloned().unwrap_or(J::Null);
            dynamic_rules::travel_form(&mut v);
            if v.is_null() && bi.default.as_deref().is_some_and(|x| x != "null") {
                // The process's own default applies.
                continue;
            }
            let ty = d.input_types.get(&bi.id).map(String::as_str);
            inputs.insert(bi.id.clone(), dynamic_rules::write(&v, ty, &ex.names));
        }
        Ok(Some(inputs))
    }

    /// A child of step `n` ended: element `k` completed (its outputs are
    /// with the engine) or failed with a reason.
    pub fn on_child(
        &mut self,
        ctx: &mut Ctx<'_>,
        n: usize,
        k: u64,
        outcome: Result<(), String>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state.is_final() || n >= self.steps.len() {
            return fx;
        }
        let Some(fan) = self.steps[n].fan.as_mut() else {
            return fx;
        };
        match outcome {
            Ok(()) => {
                fan.done += 1;
                self.fill(n, ctx, &mut fx);
            }
            Err(why) => {
                fan.failed += 1;
                let why = if fan.shape.scatters() {
                    format!("element {k} failed: {why}")
                } else {
                    why
                };
                self.fail_dynamic(n, why, ctx, &mut fx);
            }
        }
        self.touch(ctx);
        fx
    }

    /// Every element of step `n` ended: `elements[k]` holds element k's
    /// outputs (`None`: skipped). The step's outputs are gathered and
    /// flow on.
    pub fn on_gathered(
        &mut self,
        ctx: &mut Ctx<'_>,
        n: usize,
        elements: Vec<Option<BTreeMap<String, Value>>>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state.is_final() || n >= self.steps.len() {
            return fx;
        }
        let Some(fan) = self.steps[n].fan.clone() else {
            return fx;
        };
        if self.steps[n].state != StepState::Running {
            return fx;
        }
        let names = dynamic_rules::Names::default();
        let types = self
            .plan
            .as_ref()
            .and_then(|p| p.steps.get(n))
            .map(|s| s.output_types.clone())
            .unwrap_or_default();
        let mut results = BTreeMap::new();
        for o in self.steps[n].outputs.clone() {
            let ty = types.get(&o).map(String::as_str);
            let v: Value = if fan.shape.scatters() {
                let items = elements
                    .iter()
                    .map(|e| {
                        e.as_ref()
                            .and_then(|m| m.get(&o))
                            .map(|t| dynamic_rules::read(t, ty, &names))
                            .unwrap_or(J::Null)
                    })
                    .collect();
                Value::from(fan.shape.gather(items).to_string())
            } else {
                elements
                    .first()
                    .and_then(|e| e.as_ref())
                    .and_then(|m| m.get(&o).cloned())
                    .unwrap_or_else(|| Value::from("null"))
            };
            results.insert(o, v);
        }
        let step = &mut self.steps[n];
        step.results = results;
        step.prepared = None;
        if !fan.shape.scatters() && fan.skipped == 1 {
            step.state = StepState::Skipped;
        }
        self.complete_step(n, ctx, &mut fx);
        self.touch(ctx);
        fx
    }

    /// Dynamic step `n` cannot go on: the workflow fails with the reason.
    fn fail_dynamic(&mut self, n: usize, why: String, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        self.steps[n].state = StepState::Failed;
        self.steps[n].prepared = None;
        let msg = format!("step {} failed: {why}", self.steps[n].id);
        self.finish(WorkflowState::Failed, msg, ctx, fx);
    }

    /// Completes the workflow once every step has completed or was
    /// skipped, computing the outputs that combine sources.
    pub(super) fn maybe_complete(&mut self, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        if self.state.is_final()
            || !self
                .steps
                .iter()
                .all(|s| matches!(s.state, StepState::Completed | StepState::Skipped))
        {
            return;
        }
        if let Err(why) = self.combined_outputs() {
            self.finish(WorkflowState::Failed, why, ctx, fx);
            return;
        }
        self.state = WorkflowState::Completed;
        self.finished_at_ms = Some(ctx.now_ms);
    }

    /// The outputs that combine several sources (`linkMerge`,
    /// `pickValue`), from the workflow inputs and the steps' results.
    fn combined_outputs(&mut self) -> Result<(), String> {
        let Some(plan) = self.plan.clone() else {
            return Ok(());
        };
        let names = dynamic_rules::Names::default();
        for o in &plan.outputs {
            let many = o.sources.len() > 1;
            if !many && o.link_merge.is_none() && o.pick_value.is_none() {
                continue;
            }
            let values: Vec<J> = o
                .all_sources()
                .into_iter()
                .map(|src| {
                    let text = self.source_value(src);
                    dynamic_rules::read(
                        text.as_deref().unwrap_or("null"),
                        self.source_type(src).as_deref(),
                        &names,
                    )
                })
                .collect();
            let mut v = dynamic_rules::merge(values, o.link_merge, many);
            if let Some(p) = o.pick_value {
                v = dynamic_rules::pick(v, p, &format!("workflow output {}", o.id))?;
            }
            self.outputs.insert(
                o.id.clone(),
                Value::from(dynamic_rules::write(&v, None, &names)),
            );
        }
        Ok(())
    }

    /// The CWL type a source's value is read by, where the text alone is
    /// not enough: a step output's declared type (a scattered step's
    /// outputs are JSON lists).
    fn source_type(&self, src: &Source) -> Option<String> {
        let Source::StepOutput { step, output } = src else {
            return None;
        };
        let s = self.plan.as_ref()?.steps.iter().find(|s| &s.id == step)?;
        if s.dynamic.as_ref().is_some_and(|d| !d.scatter.is_empty()) {
            return None;
        }
        s.output_types.get(output).cloned()
    }

    /// The value a source has now (a workflow input or a step's result).
    fn source_value(&self, src: &Source) -> Option<Value> {
        match src {
            Source::Input(name) => self.inputs.get(name).cloned(),
            Source::StepOutput { step, output } => self
                .steps
                .iter()
                .find(|s| &s.id == step)
                .and_then(|s| s.results.get(output).cloned()),
        }
    }
}

/// Reads the first 64 KiB of a File value into its `contents`.
fn load_contents(v: &mut J, ctx: &Ctx<'_>) -> Result<(), String> {
    if v.get("class").and_then(J::as_str) != Some("File") {
        return Ok(());
    }
    let Ok(f) = caroni_types::file::FileRef::of_data(v) else {
        return Ok(());
    };
    let bytes = ctx
        .blobs
        .head(&f, CONTENTS_BYTES)
        .ok_or_else(|| format!("loadContents: file {} is not on this manager", f.describe()))?;
    v["contents"] = J::String(String::from_utf8_lossy(&bytes).into_owned());
    Ok(())
}
