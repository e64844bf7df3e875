//! What each event does to the simulated nodes, and the random crashes
//! between events while faults are on.

use caroni_agent::engine::{self as agent};

use caroni_agent::machine::RunResult;
use caroni_manager::engine::{self as manager};

use std::collections::BTreeMap;

use uuid::Uuid;
use world::expected;

use crate::*;

impl Sim {
    pub(crate) fn step(&mut self, event: Event) {
        match event {
            Event::Arrive {
                from,
                to,
                at_endpoint,
                msg,
                sender_endpoint,
            } => self.arrive(from, to, at_endpoint, msg, sender_endpoint),
            Event::Ack { to, id, refused } => {
                let Some(node) = self.nodes.get_mut(&to) else {
                    return;
                };
                if !node.up {
                    return;
                }
                let before = node.outbox.len();
                let mut peer = None;
                node.outbox.retain(|s| {
                    if s.id == id {
                        peer = Some(s.out.to.clone());
                        false
                    } else {
                        true
                    }
                });
                if let Some(p) = peer {
                    if refused.is_none() && node.outbox.len() < before {
                        node.confirmed.insert(p.clone());
                    }
                    node.heard.insert(p, self.now);
                }
            }
            Event::Gossip {
                to,
                from,
                endpoint,
                req,
            } => {
                let Some(node) = self.nodes.get_mut(&to) else {
                    return;
                };
                if !node.up || !matches!(node.role, Role::Agent(..)) {
                    return;
                }
                // Learnt from what the signer signed, as for direct
                // messages.
                node.book.insert(from.clone(), endpoint.clone());
                self.agent_input(
                    &to,
                    agent::Input::Gossip {
                        from,
                        endpoint,
                        req,
                    },
                );
            }
            Event::Advert {
                to,
                from,
                endpoint,
                advert,
            } => {
                let now = self.now;
                let Some(node) = self.nodes.get_mut(&to) else {
                    return;
                };
                if !node.up {
                    return;
                }
                if let Role::Manager(Some(m), _) = &mut node.role {
                    // Soft state: nothing is written.
                    let _ = m.on_advert(&from, &endpoint, advert, now);
                }
            }
            Event::Wake { node } => {
                let due = self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.up && n.wake_at.is_some_and(|w| w <= self.now));
                if due {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.wake_at = None;
                    }
                    self.settle(&node);
                }
            }
            Event::RunEnd {
                node,
                life,
                job,
                result,
            } => {
                let alive = self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.up && n.life == life);
                if alive {
                    if matches!(result, RunResult::Completed { .. }) {
                        self.completed_runs.insert(job);
                        self.counts.runs_completed += 1;
                    }
                    self.agent_input(&node, agent::Input::Finished(job, result));
                }
            }
            Event::Resend { node } => self.resend(&node),
            Event::Restart { node } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    // Restarted at another address, as a moved container.
                    n.endpoint = format!("http://{}:{}", n.name, n.life + 1);
                }
                self.boot(&node);
            }
            Event::Run {
                node,
                template,
                input,
            } => {
                if !self.nodes.get(&node).is_some_and(|n| n.up) {
                    // The client retries later.
                    let at = self.now + 1_000;
                    self.push(
                        at,
                        Event::Run {
                            node,
                            template,
                            input,
                        },
                    );
                    return;
                }
                let mut parsed = self.templates[template].clone();
                // Every fourth workflow has a tight budget that fails it
                // once a retry no longer fits (a priced job type may cost
                // 0.9 or 1 credit per attempt).
                if self.started.len() % 4 == 3 {
                    let mut p = (*parsed).clone();
                    p.budget = Some(caroni_types::market::Budget {
                        limit_milli: crate::SIM_BUDGET_MILLI,
                        fail_when_exhausted: true,
                    });
                    parsed = std::sync::Arc::new(p);
                }
                let inputs = match template {
                    0 => BTreeMap::from([("start_message".to_string(), input.clone())]),
                    _ => BTreeMap::from([("text".to_string(), input.clone())]),
                };
                let answer = self.manager_input(
                    &node,
                    manager::Input::Run {
                        template: format!("t{template}"),
                        parsed,
                        inputs,
                        request_id: None,
                    },
                );
                if let Some(manager::Answer::Run(Ok((id, _)))) = answer {
                    self.started
                        .insert(id, (node, expected(template, &input).1));
                }
            }
            Event::Cancel { node, pick } => {
                let ids: Vec<Uuid> = self
                    .started
                    .iter()
                    .filter(|(_, (m, _))| *m == node)
                    .map(|(id, _)| *id)
                    .collect();
                if ids.is_empty() || !self.nodes.get(&node).is_some_and(|n| n.up) {
                    return;
                }
                let id = ids[(pick % ids.len() as u64) as usize];
                self.manager_input(&node, manager::Input::Cancel(id));
            }
            Event::Forge => self.forge(),
        }
        // Random crashes while faults are on.
        if self.faults() && self.dice.chance(self.cfg.crash) {
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            let name = names[self.dice.below(names.len() as u64) as usize].clone();
            if let Some(n) = self.nodes.get_mut(&name) {
                if n.up {
                    n.up = false;
                    match &mut n.role {
                        Role::Manager(m, _) => *m = None,
                        Role::Agent(a, _) => *a = None,
                    }
                    self.counts.crashes += 1;
                    let at = self.now + 100 + self.dice.below(5_000);
                    self.push(at, Event::Restart { node: name });
                }
            }
        }
    }
}
