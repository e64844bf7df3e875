//! The stranger's forgeries, and the guarantees checked after a run.

use std::collections::BTreeMap;

use caroni_manager::model::WorkflowState;

use caroni_types::msg::{JobRequest, JobState, Msg, Outbound, StatusUpdate};

use crate::*;

impl Sim {
    /// The stranger forges a message about something real.
    pub(crate) fn forge(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let to = names[self.dice.below(names.len() as u64) as usize].clone();
        let job = if self.seen_jobs.is_empty() {
            self.dice.uuid()
        } else {
            self.seen_jobs[self.dice.below(self.seen_jobs.len() as u64) as usize].1
        };
        let (offer_id, request_id) = if self.seen_offers.is_empty() {
            (self.dice.uuid(), self.dice.uuid())
        } else {
            let o = &self.seen_offers[self.dice.below(self.seen_offers.len() as u64) as usize];
            (o.1, o.2)
        };
        let msg = match self.dice.below(8) {
            0 => Msg::Status(StatusUpdate {
                job_id: job,
                state: JobState::Completed,
                message: String::new(),
                exit_status: Some(0),
                stderr_tail: String::new(),
                sequence: 99,
                executor: String::new(),
                external_id: String::new(),
                queued_at_ms: None,
                started_at_ms: None,
                ended_at_ms: None,
                failure: String::new(),
                receipt: None,
            }),
            1 => Msg::Data {
                job_id: job,
                items: BTreeMap::from([("out".into(), "forged".into())]),
                outputs: true,
            },
            2 => Msg::Data {
                job_id: job,
                items: BTreeMap::from([("x".into(), "forged".into())]),
                outputs: false,
            },
            3 => Msg::Kill {
                job_id: job,
                reason: "forged".into(),
            },
            4 => Msg::Accept {
                offer_id,
                request_id,
                job_id: self.dice.uuid(),
            },
            5 => Msg::Reject {
                offer_id,
                request_id,
            },
            6 => Msg::Accepted {
                job_id: job,
                offer_id,
            },
            _ => Msg::StatusRequest { job_id: job },
        };
        let s = Staged {
            id: self.dice.uuid(),
            out: Outbound {
                to: to.clone(),
                endpoint: String::new(),
                msg,
            },
            trace: None,
            at: self.now,
        };
        let endpoint = self
            .nodes
            .get(&to)
            .map(|n| n.endpoint.clone())
            .unwrap_or_default();
        // It signs the address it wants answers sent to.
        self.transmit(MALLORY, &to, &endpoint, s, EVIL);
        // And gossips a request whose reply address is not its own.
        if let Some((_, job_type)) = self.seen_requests.first().cloned() {
            let req = JobRequest {
                request_id: self.dice.uuid(),
                job_type,
                parameter_keys: vec!["message".into()],
                output_keys: vec!["jobout".into()],
                job_kvs: BTreeMap::new(),
                expires_at_ms: self.now + 60_000,
                manager_endpoint: EVIL.into(),
                publish_count: 1,
                workflow_id: None,
                needs: Default::default(),
                priority: 0,
            };
            let agents: Vec<String> = names
                .into_iter()
                .filter(|n| n.starts_with("agent"))
                .collect();
            for a in agents {
                let at = self.now + 1 + self.dice.below(30);
                self.push(
                    at,
                    Event::Gossip {
                        to: a,
                        from: MALLORY.into(),
                        endpoint: "http://mallory:1".into(),
                        req: req.clone(),
                    },
                );
            }
        }
    }

    /// The guarantees of ARCHITECTURE.md, over the whole run.
    pub(crate) fn check(&mut self) {
        let seed = self.seed;
        if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
            println!(
                "seed {seed}: ended at {} ms, events {:?}",
                self.now - 1_000_000,
                self.kinds
            );
        }
        let mut v = Vec::new();
        if self.started.len() != self.cfg.workflows {
            v.push(format!(
                "{} of {} workflows were started",
                self.started.len(),
                self.cfg.workflows
            ));
        }
        for (id, (m, want)) in &self.started {
            let Some(Role::Manager(_, disk)) = self.nodes.get(m).map(|n| &n.role) else {
                continue;
            };
            let Some(wf) = disk.workflows.get(id) else {
                v.push(format!("workflow {id} is not on {m}'s disk"));
                continue;
            };
            if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
                println!(
                    "workflow {id} on {m}: {} {:?}",
                    wf.state.as_str(),
                    wf.message
                );
                for st in &wf.steps {
                    println!(
                        "  step {} {:?} request {:?}",
                        st.id,
                        st.state,
                        st.request
                            .as_ref()
                            .map(|r| (r.state, r.publish_count, r.expires_at_ms))
                    );
                    for a in &st.attempts {
                        println!(
                            "    attempt {:?} on {} {:?} {}",
                            a.job_id, a.agent, a.state, a.message
                        );
                    }
                }
            }
            // A budget is never exceeded: what ended attempts cost, what
            // live ones may still cost and what went to elements.
            if let Some(b) = wf.budget {
                let used = wf.spent_milli() + wf.reserved_milli() + b.allotted_milli;
                if used > b.limit.limit_milli {
                    v.push(format!(
                        "workflow {id} used {used} of its budget of {}",
                        b.limit.limit_milli
                    ));
                }
            }
            match wf.state {
                WorkflowState::Completed => {
                    self.counts.completed += 1;
                    let got: Vec<String> = wf.outputs.values().map(|x| x.to_string()).collect();
                    if got != [want.clone()] {
                        v.push(format!(
                            "workflow {id} completed with {got:?}, not [{want:?}]"
                        ));
                    }
                    for s in &wf.steps {
                        let ok: Vec<_> = s
                            .attempts
                            .iter()
                            .filter(|a| a.state == JobState::Completed && !a.superseded)
                            .collect();
                        if ok.len() != 1 {
                            v.push(format!(
                                "step {} of completed workflow {id} has {} successful jobs",
                                s.id,
                                ok.len()
                            ));
                        }
                        for a in ok {
                            let held = self.nodes.get(&a.agent).and_then(|n| match &n.role {
                                Role::Agent(_, d) => a.job_id.and_then(|j| d.jobs.get(&j)),
                                _ => None,
                            });
                            if held.is_none_or(|j| j.state != JobState::Completed) {
                                v.push(format!(
                                    "step {} of workflow {id}: its job is not completed on {}",
                                    s.id, a.agent
                                ));
                            }
                        }
                    }
                }
                WorkflowState::Failed => {
                    self.counts.failed += 1;
                    if wf.message.contains("within the workflow's budget") {
                        self.counts.over_budget += 1;
                    }
                }
                WorkflowState::Cancelled => self.counts.cancelled += 1,
                other => v.push(format!("workflow {id} did not end: {}", other.as_str())),
            }
        }
        for ((node, id), n) in &self.applied_count {
            if *n > 1 {
                v.push(format!("{node} applied message {id} {n} times"));
            }
        }
        v.extend(self.ledger_violations());
        self.findings.violations.extend(v);
        if !self.findings.violations.is_empty() {
            self.findings
                .violations
                .insert(0, format!("seed {seed} (replay: CARONI_SIM_SEED={seed})"));
        }
    }

    /// Receipts: every job that ran to its end has one receipt on its
    /// agent; every receipt got its manager's verdict or is still on its
    /// way in an outbox (durable: a manager that moved is reached once its
    /// new address is learnt); both sides of each manager–agent pair count
    /// the same settled receipts and sums.
    fn ledger_violations(&self) -> Vec<String> {
        // (manager, agent) → (agreed, agreed sum, disputed).
        type Tally = BTreeMap<(String, String), (u64, u64, u64)>;
        let mut v = Vec::new();
        // Receipts and verdicts still in outboxes.
        let mut receipts_out = std::collections::HashSet::new();
        let mut verdicts_out = std::collections::HashSet::new();
        for n in self.nodes.values() {
            for st in &n.outbox {
                match &st.out.msg {
                    Msg::Status(u) if u.receipt.is_some() => {
                        receipts_out.insert(u.job_id);
                    }
                    Msg::Verdicts(vs) => verdicts_out.extend(vs.iter().map(|v| v.job_id)),
                    _ => {}
                }
            }
        }
        // Receipts whose verdict reached their agent.
        let settled: std::collections::HashSet<uuid::Uuid> = self
            .nodes
            .values()
            .flat_map(|n| match &n.role {
                Role::Agent(_, d) => d
                    .ledger
                    .iter()
                    .filter(|(_, e)| e.2.is_some())
                    .map(|(j, _)| *j)
                    .collect::<Vec<_>>(),
                Role::Manager(..) => Vec::new(),
            })
            .collect();
        let (mut agents, mut managers): (Tally, Tally) = Default::default();
        let mut in_flight = 0;
        for node in self.nodes.values() {
            match &node.role {
                Role::Agent(_, d) => {
                    for (job, (m, charge, verdict)) in &d.ledger {
                        let key = (m.clone(), node.name.clone());
                        match verdict {
                            Some(true) => {
                                let t = agents.entry(key).or_default();
                                t.0 += 1;
                                t.1 += charge;
                            }
                            Some(false) => agents.entry(key).or_default().2 += 1,
                            None if receipts_out.contains(job) || verdicts_out.contains(job) => {
                                in_flight += 1
                            }
                            None => v.push(format!(
                                "{}: the receipt for job {job} got no verdict from {m} and is in no outbox",
                                node.name
                            )),
                        }
                    }
                    for (id, j) in &d.jobs {
                        if j.state.is_final()
                            && j.started_at_ms.is_some()
                            && !d.ledger.contains_key(id)
                        {
                            v.push(format!(
                                "{}: job {id} ran and ended without a receipt",
                                node.name
                            ));
                        }
                    }
                }
                Role::Manager(_, d) => {
                    for (job, (a, charge, agreed)) in &d.ledger {
                        if verdicts_out.contains(job) && !settled.contains(job) {
                            continue; // the agent counts it once it arrives
                        }
                        let t = managers.entry((node.name.clone(), a.clone())).or_default();
                        if *agreed {
                            t.0 += 1;
                            t.1 += charge;
                        } else {
                            t.2 += 1;
                        }
                    }
                }
            }
        }
        if agents != managers {
            v.push(format!(
                "receipts do not balance: agents' ledgers {agents:?}, managers' {managers:?}"
            ));
        }
        if std::env::var_os("CARONI_SIM_VERBOSE").is_some() {
            println!(
                "receipts (agreed, agreed milli, disputed) per (manager, agent): {managers:?}; {in_flight} in flight"
            );
        }
        v
    }
}
