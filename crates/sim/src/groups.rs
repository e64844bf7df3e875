//! One group of a node: an input and what is due, applied by its machine,
//! written to its disk at once, then performed (messages out, runs
//! started, the timer set).

use caroni_agent::engine::{self as agent, Agent};

use caroni_agent::machine::RunResult;
use caroni_manager::engine::{self as manager, Manager};

use caroni_types::delivery::DeliverError;
use caroni_types::msg::Msg;

use rand_core::SeedableRng;

use crate::world::compute;
use crate::world::{job_types, AWorld};
use crate::*;

impl Sim {
    pub(crate) fn settle(&mut self, name: &str) {
        let is_manager = self
            .nodes
            .get(name)
            .is_some_and(|n| matches!(n.role, Role::Manager(..)));
        if is_manager {
            self.manager_group(name, |m, now, world, out| {
                m.settle(now, world, out);
                None
            });
        } else {
            let _ = self.agent_group(name, |a, now, world, out| {
                a.settle(now, world, out);
                Ok(agent::Delivered::Applied)
            });
        }
    }

    pub(crate) fn manager_input(
        &mut self,
        name: &str,
        input: manager::Input,
    ) -> Option<manager::Answer> {
        self.manager_group(name, |m, now, world, out| {
            Some(m.handle(input, now, world, out))
        })
    }

    pub(crate) fn agent_input(
        &mut self,
        name: &str,
        input: agent::Input,
    ) -> Option<Result<agent::Delivered, DeliverError>> {
        let r = self.agent_group(name, |a, now, world, out| a.handle(input, now, world, out));
        Some(r)
    }

    /// One group of a manager: the input, then what is due; written at
    /// once, then performed.
    pub(crate) fn manager_group(
        &mut self,
        name: &str,
        f: impl FnOnce(
            &mut Manager,
            &mut manager::Now<'_>,
            &dyn manager::World,
            &mut manager::Out,
        ) -> Option<manager::Answer>,
    ) -> Option<manager::Answer> {
        let now = self.now;
        let mut dice =
            std::mem::replace(&mut self.dice, Dice(rand_pcg::Pcg64Mcg::seed_from_u64(0)));
        let Some(node) = self.nodes.get_mut(name) else {
            self.dice = dice;
            return None;
        };
        let Node {
            role,
            applied: node_applied,
            confirmed,
            heard,
            outbox,
            ..
        } = node;
        let Role::Manager(slot, disk) = role else {
            self.dice = dice;
            return None;
        };
        let Some(mut m) = slot.take() else {
            self.dice = dice;
            return None;
        };
        let mut out = manager::Out::default();
        let answer = {
            let world = MWorld {
                peers: Peers {
                    applied: node_applied,
                    confirmed,
                    heard,
                },
                disk,
            };
            let mut gen = || dice.uuid();
            let mut clock = manager::Now {
                ms: now,
                new_id: &mut gen,
            };
            let a = f(&mut m, &mut clock, &world, &mut out);
            m.settle(&mut clock, &world, &mut out);
            a
        };
        // Written: records, applied ids, outbox.
        for id in out.heads.iter().chain(out.finished.keys()) {
            if let Some(wf) = m.workflow(id, &out) {
                disk.workflows.insert(*id, wf.clone());
            }
        }
        m.written(&out);
        let mut staged = Vec::new();
        // Receipts, chained once each, answered with one verdicts message
        // per agent (as the service does; signatures are the transport's).
        let mut verdicts: BTreeMap<(String, String), Vec<caroni_types::ledger::Verdict>> =
            BTreeMap::new();
        for r in &out.receipts {
            let job = r.receipt.receipt.job_id;
            if disk.ledger.contains_key(&job) {
                continue;
            }
            disk.ledger.insert(
                job,
                (
                    r.agent.clone(),
                    r.receipt.receipt.charge_milli,
                    r.verdict.is_ok(),
                ),
            );
            verdicts
                .entry((r.agent.clone(), r.endpoint.clone()))
                .or_default()
                .push(caroni_types::ledger::Verdict {
                    job_id: job,
                    agreed: r.verdict.is_ok(),
                    reason: r.verdict.clone().err().unwrap_or_default(),
                    signature: Vec::new(),
                });
        }
        for ((to, endpoint), vs) in verdicts {
            staged.push(Staged {
                id: dice.uuid(),
                out: Outbound {
                    to,
                    endpoint,
                    msg: Msg::Verdicts(vs),
                },
                trace: None,
                at: now,
            });
        }
        for (o, trace) in out.send {
            staged.push(Staged {
                id: dice.uuid(),
                out: o,
                trace,
                at: now,
            });
        }
        for id in &out.applied {
            node_applied.insert(*id);
        }
        outbox.extend(staged.iter().cloned());
        let next = m.next_timer();
        *slot = Some(m);
        let applied = out.applied;
        let publish = out.publish;
        self.dice = dice;
        for id in applied {
            *self
                .applied_count
                .entry((name.to_string(), id))
                .or_default() += 1;
        }
        self.performed(name, staged, next);
        // Gossip, best effort, to every agent.
        for req in publish {
            self.seen_requests
                .push((req.request_id, req.job_type.clone()));
            let endpoint = self
                .nodes
                .get(name)
                .map(|n| n.endpoint.clone())
                .unwrap_or_default();
            let agents: Vec<String> = self
                .nodes
                .keys()
                .filter(|n| n.starts_with("agent"))
                .cloned()
                .collect();
            for a in agents {
                if self.faults() && self.dice.chance(self.cfg.drop * 4.0) {
                    continue;
                }
                let at = self.now + 1 + self.dice.below(30);
                self.push(
                    at,
                    Event::Gossip {
                        to: a,
                        from: name.to_string(),
                        endpoint: endpoint.clone(),
                        req: req.clone(),
                    },
                );
            }
        }
        answer
    }

    /// One group of an agent.
    pub(crate) fn agent_group(
        &mut self,
        name: &str,
        f: impl FnOnce(
            &mut Agent,
            &mut agent::Now<'_>,
            &dyn agent::World,
            &mut agent::Out,
        ) -> Result<agent::Delivered, DeliverError>,
    ) -> Result<agent::Delivered, DeliverError> {
        let now = self.now;
        let types = job_types();
        let mut dice =
            std::mem::replace(&mut self.dice, Dice(rand_pcg::Pcg64Mcg::seed_from_u64(0)));
        let Some(node) = self.nodes.get_mut(name) else {
            self.dice = dice;
            return Err(DeliverError::Retry("no node".into()));
        };
        let life = node.life;
        let Node {
            role,
            applied: node_applied,
            confirmed,
            heard,
            outbox,
            ..
        } = node;
        let Role::Agent(slot, disk) = role else {
            self.dice = dice;
            return Err(DeliverError::Retry("not an agent".into()));
        };
        let Some(mut a) = slot.take() else {
            self.dice = dice;
            return Err(DeliverError::Retry("down".into()));
        };
        let mut out = agent::Out::default();
        let answer = {
            let world = AWorld {
                peers: Peers {
                    applied: node_applied,
                    confirmed,
                    heard,
                },
                disk,
                types: &types,
            };
            let mut gen = || dice.uuid();
            let mut clock = agent::Now {
                ms: now,
                new_id: &mut gen,
            };
            let r = f(&mut a, &mut clock, &world, &mut out);
            a.settle(&mut clock, &world, &mut out);
            r
        };
        for (id, job) in &out.jobs {
            disk.jobs.insert(*id, job.clone());
        }
        for r in &out.forget_offers {
            disk.offers.remove(r);
        }
        for o in &out.offers {
            disk.offers.insert(o.request_id, o.clone());
        }
        for (r, w) in &out.request_workflows {
            disk.request_workflows.insert(*r, *w);
        }
        for (j, x) in &out.executions {
            disk.executions.insert(*j, x.clone());
        }
        for (r, p) in &out.request_prices {
            disk.request_prices.insert(*r, *p);
        }
        // Receipts going out with final statuses, chained once each; the
        // verdicts that came back.
        for (o, _) in out.send.iter().flatten() {
            if let Msg::Status(s) = &o.msg {
                if let Some(r) = &s.receipt {
                    disk.ledger.entry(r.receipt.job_id).or_insert((
                        o.to.clone(),
                        r.receipt.charge_milli,
                        None,
                    ));
                }
            }
        }
        for (manager, vs) in &out.verdicts {
            for v in vs {
                if let Some(e) = disk.ledger.get_mut(&v.job_id) {
                    if e.0 == *manager && e.2.is_none() {
                        e.2 = Some(v.agreed);
                    }
                }
            }
        }
        for id in &out.applied {
            node_applied.insert(*id);
        }
        let mut staged = Vec::new();
        for (o, trace) in out.send.into_iter().flatten() {
            staged.push(Staged {
                id: dice.uuid(),
                out: o,
                trace,
                at: now,
            });
        }
        outbox.extend(staged.iter().cloned());
        let advert = out.advert.take();
        let next = a.next_timer();
        *slot = Some(a);
        self.dice = dice;
        for id in out.applied {
            *self
                .applied_count
                .entry((name.to_string(), id))
                .or_default() += 1;
        }
        if let Some(advert) = advert {
            // Gossip, best effort, to every manager.
            let endpoint = self
                .nodes
                .get(name)
                .map(|n| n.endpoint.clone())
                .unwrap_or_default();
            let managers: Vec<String> = self
                .nodes
                .keys()
                .filter(|n| n.starts_with("manager"))
                .cloned()
                .collect();
            for m in managers {
                if self.faults() && self.dice.chance(self.cfg.drop * 4.0) {
                    continue;
                }
                let at = self.now + 1 + self.dice.below(30);
                self.push(
                    at,
                    Event::Advert {
                        to: m,
                        from: name.to_string(),
                        endpoint: endpoint.clone(),
                        advert: advert.clone(),
                    },
                );
            }
        }
        for s in out.start {
            *self
                .counts
                .runs_per_agent
                .entry(name.to_string())
                .or_default() += 1;
            let id = s.spec.job_id;
            if self.completed_runs.contains(&id) {
                self.findings
                    .violations
                    .push(format!("{name} started job {id} again after it completed"));
            }
            let job_type = self
                .nodes
                .get(name)
                .and_then(|n| match &n.role {
                    Role::Agent(_, d) => d.jobs.get(&id).map(|j| j.job_type.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let result = if self.dice.chance(self.cfg.job_failure) {
                RunResult::Failed {
                    message: "exit status 1".into(),
                    exit_status: Some(1),
                    stderr_tail: String::new(),
                    kind: caroni_agent::machine::Failure::ExitStatus,
                }
            } else {
                RunResult::Completed {
                    outputs: compute(&job_type, &s.spec.inputs),
                    stderr_tail: String::new(),
                }
            };
            let at = self.now + 1 + self.dice.below(200);
            self.push(
                at,
                Event::RunEnd {
                    node: name.to_string(),
                    life,
                    job: id,
                    result,
                },
            );
        }
        self.performed(name, staged, next);
        answer
    }

    /// After a group is written: its messages go out, its timer is set.
    pub(crate) fn performed(&mut self, name: &str, staged: Vec<Staged>, next: Option<u64>) {
        self.counts.direct_messages += staged.len() as u64;
        for s in &staged {
            if s.out.to == MALLORY && !matches!(s.out.msg, Msg::Offer { .. } | Msg::Decline { .. })
            {
                self.findings.violations.push(format!(
                    "{name} sent {} to the stranger, which never acknowledged anything",
                    s.out.msg.name()
                ));
            }
            if s.out.endpoint == EVIL {
                self.findings.violations.push(format!(
                    "{name} sent {} to the address the stranger named",
                    s.out.msg.name()
                ));
            }
            match &s.out.msg {
                Msg::Accept {
                    offer_id, job_id, ..
                } => {
                    self.seen_jobs.push((s.out.to.clone(), *job_id));
                    self.seen_offers
                        .push((s.out.to.clone(), *offer_id, *job_id));
                }
                Msg::Offer {
                    offer_id,
                    request_id,
                    ..
                } => {
                    self.seen_offers
                        .push((name.to_string(), *offer_id, *request_id));
                }
                _ => {}
            }
        }
        let (me, book) = match self.nodes.get(name) {
            Some(n) => (n.endpoint.clone(), n.book.clone()),
            None => return,
        };
        for s in staged {
            if s.out.to == MALLORY {
                continue;
            }
            let endpoint = book
                .get(&s.out.to)
                .cloned()
                .unwrap_or_else(|| s.out.endpoint.clone());
            let to = s.out.to.clone();
            self.transmit(name, &to, &endpoint, s, &me);
        }
        if let Some(at) = next {
            let at = at.max(self.now + 1);
            let queue_it = self
                .nodes
                .get(name)
                .is_some_and(|n| n.wake_at.is_none_or(|w| w > at));
            if queue_it {
                if let Some(n) = self.nodes.get_mut(name) {
                    n.wake_at = Some(at);
                }
                self.push(
                    at,
                    Event::Wake {
                        node: name.to_string(),
                    },
                );
            }
        }
    }
}
