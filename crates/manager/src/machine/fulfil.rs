//! Fulfilment: a step's request, published with back-off; offers gathered
//! over the offer window and the least busy agent taken; declines noted.

use caroni_types::msg::{JobRequest, JobState, Load, Msg, Outbound};
use uuid::Uuid;

use super::{Ctx, Effect, ASK_WAIT_MS, REPUBLISH_MAX_MS, REPUBLISH_MIN_MS};
use crate::market::Choice;
use crate::model::{Attempt, Candidate, Request, RequestState, StepState, Workflow};

impl Workflow {
    /// A new request for step `n`, published after `delay_ms` (a retry's
    /// back-off; 0 publishes at once).
    pub(super) fn new_request(
        &mut self,
        n: usize,
        ctx: &mut Ctx<'_>,
        delay_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let id = (ctx.new_id)();
        let step = &mut self.steps[n];
        step.state = StepState::Fulfilling;
        step.results.clear();
        let from = ctx.now_ms + delay_ms;
        step.request = Some(Request {
            id,
            state: RequestState::Fulfilling,
            created_at_ms: from,
            expires_at_ms: from + ctx.request_ttl_ms,
            publish_count: 0,
            next_publish_at_ms: from,
            declines: Vec::new(),
            candidates: Vec::new(),
            answered: Vec::new(),
            decide_at_ms: None,
            blocked: None,
            asked: Vec::new(),
            broadcasts: 0,
        });
        self.publish_due(n, ctx, fx);
    }

    /// Why step `n`'s open request cannot be placed now, if so: every
    /// agent this manager knows declined it, or none answered within the
    /// answer timeout.
    pub(super) fn blocked_reason(&self, n: usize, ctx: &Ctx<'_>) -> Option<String> {
        let req = self.steps[n]
            .request
            .as_ref()
            .filter(|r| r.state == RequestState::Fulfilling && r.publish_count > 0)?;
        if !req.candidates.is_empty() {
            return None;
        }
        // Adverts are known and none can ever serve it: say so once the
        // first re-publication is due (a newer advert may still come).
        let jr = self.job_request(n, ctx)?;
        if ctx.now_ms >= req.created_at_ms + REPUBLISH_MIN_MS {
            if let Some(why) = ctx.peers.none_fits(&jr) {
                if self.budget_blocks(n, ctx) {
                    return Some(format!("{}: {why}", self.budget_text()));
                }
                return Some(why);
            }
        }
        let known = ctx.peers.known_agents();
        let answered_all = |list: &[String]| list.iter().all(|a| req.answered.contains(a));
        // Every fitting agent was asked directly and each declined.
        let exclude: Vec<String> = req.asked.iter().chain(&req.answered).cloned().collect();
        let asked_out = !req.asked.is_empty()
            && !req.declines.is_empty()
            && answered_all(&req.asked)
            && ctx.peers.choose(&jr, &exclude) == Choice::Broadcast;
        let all_declined =
            asked_out || known > 0 && !req.declines.is_empty() && req.answered.len() >= known;
        let timed_out = ctx.now_ms >= req.created_at_ms + ctx.answer_timeout_ms;
        if !all_declined && !timed_out {
            return None;
        }
        let secs = ctx.answer_timeout_ms.div_ceil(1000);
        if req.declines.is_empty() {
            return Some(if known == 0 {
                format!("no agent answered within {secs} s, and this manager knows no agent; start one that serves job type {} and reaches this manager", self.steps[n].job_type)
            } else if !req.asked.is_empty() {
                format!(
                    "no agent answered within {secs} s ({} asked directly, then the request was broadcast)",
                    req.asked.len()
                )
            } else {
                format!(
                    "no agent answered within {secs} s ({known} agent(s) known to this manager)"
                )
            });
        }
        // The reasons, each once, with how many agents gave it.
        let mut reasons: Vec<(&str, usize)> = Vec::new();
        for (_, why) in &req.declines {
            match reasons.iter_mut().find(|(r, _)| *r == why.as_str()) {
                Some((_, c)) => *c += 1,
                None => reasons.push((why, 1)),
            }
        }
        let listed: Vec<String> = reasons
            .iter()
            .map(|(r, c)| {
                if *c > 1 {
                    format!("{r} ({c} agents)")
                } else {
                    r.to_string()
                }
            })
            .collect();
        let silent = if req.asked.is_empty() {
            known.saturating_sub(req.answered.len())
        } else {
            req.asked
                .iter()
                .filter(|a| !req.answered.contains(a))
                .count()
        };
        let mut out = format!(
            "declined by {} agent(s): {}",
            req.answered.len(),
            listed.join("; ")
        );
        if silent > 0 {
            out.push_str(&format!("; {silent} agent(s) did not answer"));
        }
        Some(out)
    }

    /// Notes (or clears) why step `n`'s request cannot be placed; true
    /// when that changed.
    pub(super) fn update_blocked(&mut self, n: usize, ctx: &Ctx<'_>) -> bool {
        let reason = self.blocked_reason(n, ctx);
        let Some(req) = self.steps[n].request.as_mut() else {
            return false;
        };
        match (reason, req.blocked.as_mut()) {
            (None, None) => false,
            (None, Some(_)) => {
                req.blocked = None;
                true
            }
            (Some(r), Some(b)) if b.reason == r => false,
            (Some(r), Some(b)) => {
                b.reason = r;
                true
            }
            (Some(r), None) => {
                req.blocked = Some(crate::model::Blocked {
                    since_ms: ctx.now_ms,
                    reason: r,
                });
                true
            }
        }
    }

    /// The job request of step `n` as it travels (its open request's id
    /// and expiry, this manager's endpoint).
    pub(super) fn job_request(&self, n: usize, ctx: &Ctx<'_>) -> Option<JobRequest> {
        let step = &self.steps[n];
        let req = step.request.as_ref()?;
        Some(JobRequest {
            request_id: req.id,
            job_type: step.job_type.clone(),
            parameter_keys: step.inputs.iter().map(|i| i.name.clone()).collect(),
            output_keys: step.outputs.clone(),
            job_kvs: step.job_kvs.clone(),
            expires_at_ms: req.expires_at_ms,
            manager_endpoint: ctx.endpoint.to_string(),
            publish_count: req.publish_count,
            workflow_id: Some(self.id),
            needs: {
                let mut needs = step.needs.clone();
                needs.max_price_milli = self.attempt_limit(n);
                needs
            },
            priority: self.priority,
        })
    }

    /// The most one new attempt of step `n` may cost: the step's
    /// `CaroniMaxPrice` and what is left of the workflow's budget, the
    /// lower of the two.
    pub(super) fn attempt_limit(&self, n: usize) -> Option<u64> {
        let step = self.steps.get(n).and_then(|s| s.needs.max_price_milli);
        match (step, self.budget_left_milli()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when the budget, not the agents, keeps step `n` from being
    /// placed: an advertised agent fits the step, but none within what is
    /// left of the budget.
    pub(super) fn budget_blocks(&self, n: usize, ctx: &Ctx<'_>) -> bool {
        if self.budget.is_none() {
            return false;
        }
        let Some(mut jr) = self.job_request(n, ctx) else {
            return false;
        };
        if ctx.peers.none_fits(&jr).is_none() {
            return false;
        }
        jr.needs.max_price_milli = self.steps[n].needs.max_price_milli;
        ctx.peers.none_fits(&jr).is_none()
    }

    /// "the workflow's budget has 0.5 credits left (9 spent, 0.5 reserved
    /// by running jobs, 0 given to element workflows)".
    pub(super) fn budget_text(&self) -> String {
        let Some(b) = self.budget.as_ref() else {
            return String::new();
        };
        let credits = caroni_types::market::credits;
        let mut out = format!(
            "the workflow's budget of {} credits has {} left ({} spent, {} reserved by running jobs",
            credits(b.limit.limit_milli),
            credits(self.budget_left_milli().unwrap_or(0)),
            credits(self.spent_milli()),
            credits(self.reserved_milli())
        );
        if b.allotted_milli > 0 {
            out.push_str(&format!(
                ", {} given to element workflows",
                credits(b.allotted_milli)
            ));
        }
        out.push(')');
        out
    }

    /// Sends the step's request if it is due: directly to the best
    /// advertised agent not asked yet (docs/market.md), or, when no advert
    /// fits, on gossip with exponential backoff.
    pub(super) fn publish_due(&mut self, n: usize, ctx: &Ctx<'_>, fx: &mut Vec<Effect>) {
        let due = self.steps[n].request.as_ref().is_some_and(|r| {
            r.state == RequestState::Fulfilling && r.next_publish_at_ms <= ctx.now_ms
        });
        if !due {
            return;
        }
        let Some(req) = self.steps[n].request.as_mut() else {
            return;
        };
        // The agent asked last has not answered but is alive (its answer
        // waits behind its other messages, as under a burst): wait for it
        // rather than ask another, up to the answer timeout.
        if let Some(last) = req.asked.last() {
            let alive = ctx
                .peers
                .last_heard_ms(last)
                .is_some_and(|t| ctx.now_ms.saturating_sub(t) < ASK_WAIT_MS);
            if alive
                && !req.answered.contains(last)
                && ctx.now_ms < req.created_at_ms + ctx.answer_timeout_ms
            {
                req.next_publish_at_ms = ctx.now_ms + ASK_WAIT_MS;
                return;
            }
        }
        req.publish_count += 1;
        let exclude: Vec<String> = req.asked.iter().chain(&req.answered).cloned().collect();
        let Some(jr) = self.job_request(n, ctx) else {
            return;
        };
        let Some(req) = self.steps[n].request.as_mut() else {
            return;
        };
        match ctx.peers.choose(&jr, &exclude) {
            Choice::Ask(agent, endpoint) => {
                req.asked.push(agent.clone());
                req.next_publish_at_ms = ctx.now_ms + ASK_WAIT_MS;
                fx.push(Effect::Send(Outbound {
                    to: agent,
                    endpoint,
                    msg: Msg::Request(jr),
                }));
            }
            Choice::Broadcast => {
                let known = ctx.peers.known_agents();
                let broadcasts = req.broadcasts;
                req.broadcasts += 1;
                let delay = if known > 0 && req.answered.len() >= known {
                    // Every agent we know has answered: only a newcomer could.
                    REPUBLISH_MAX_MS
                } else {
                    (REPUBLISH_MIN_MS << broadcasts.min(10)).min(REPUBLISH_MAX_MS)
                };
                req.next_publish_at_ms = ctx.now_ms + delay;
                fx.push(Effect::Publish(jr));
            }
        }
    }

    pub(super) fn find_request(&self, request_id: Uuid) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| s.request.as_ref().is_some_and(|r| r.id == request_id))
    }

    /// An agent offers to serve a request. The offer is gathered with the
    /// others for the request; the request is decided (the least busy
    /// agent taken, the others rejected) at once when every known agent
    /// has answered or no window is set, else when the window closes.
    #[allow(clippy::too_many_arguments)]
    pub fn on_offer(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        endpoint: &str,
        request_id: Uuid,
        offer_id: Uuid,
        expires_at_ms: u64,
        load: Load,
        price: Option<(caroni_types::market::Price, u64)>,
    ) -> Vec<Effect> {
        let reject = || {
            vec![Effect::Send(Outbound {
                to: agent.to_string(),
                endpoint: endpoint.to_string(),
                msg: Msg::Reject {
                    offer_id,
                    request_id,
                },
            })]
        };
        // A re-sent offer we already accepted or hold: nothing new.
        if self
            .steps
            .iter()
            .any(|s| s.attempts.iter().any(|a| a.offer_id == Some(offer_id)))
        {
            return Vec::new();
        }
        let Some(n) = self.find_request(request_id) else {
            return reject();
        };
        let open = !self.state.is_final()
            && self.steps[n].state == StepState::Fulfilling
            && self.steps[n].request.as_ref().is_some_and(|r| {
                r.state == RequestState::Fulfilling && r.expires_at_ms > ctx.now_ms
            });
        if !open || expires_at_ms <= ctx.now_ms {
            return reject();
        }
        // An offer that may cost more than the step pays is let go, and
        // counted as that agent's answer (a decline with the reason).
        let limit = self.attempt_limit(n);
        let cost = price.map_or(0, |(_, max)| max);
        if let Some(limit) = limit.filter(|l| cost > *l) {
            let by_budget = self.steps[n]
                .needs
                .max_price_milli
                .is_none_or(|m| m > limit);
            let why = if by_budget {
                format!(
                    "offered a job that may cost up to {} credits; {}",
                    caroni_types::market::credits(cost),
                    self.budget_text()
                )
            } else {
                format!(
                    "offered a job that may cost up to {} credits, the step pays at most {}",
                    caroni_types::market::credits(cost),
                    caroni_types::market::credits(limit)
                )
            };
            let mut fx = reject();
            fx.extend(self.on_decline(ctx, agent, request_id, &why));
            return fx;
        }
        let Some(req) = self.steps[n].request.as_mut() else {
            return reject();
        };
        if req.candidates.iter().any(|c| c.offer_id == offer_id) {
            return Vec::new();
        }
        req.candidates.push(Candidate {
            agent: agent.to_string(),
            endpoint: endpoint.to_string(),
            offer_id,
            expires_at_ms,
            load,
            price,
        });
        if !req.answered.iter().any(|a| a == agent) {
            req.answered.push(agent.to_string());
        }
        req.blocked = None;
        // An agent asked directly was chosen already: take it at once.
        let everyone =
            req.asked.iter().any(|a| a == agent) || req.answered.len() >= ctx.peers.known_agents();
        if ctx.offer_window_ms == 0 || everyone {
            let mut fx = Vec::new();
            self.decide(n, ctx, &mut fx);
            return fx;
        }
        if req.decide_at_ms.is_none() {
            req.decide_at_ms = Some(ctx.now_ms + ctx.offer_window_ms);
        }
        Vec::new()
    }

    /// Takes the least busy of the offers gathered for step `n`'s request
    /// and rejects the others.
    pub(super) fn decide(&mut self, n: usize, ctx: &mut Ctx<'_>, fx: &mut Vec<Effect>) {
        let Some(req) = self.steps[n].request.as_mut() else {
            return;
        };
        req.decide_at_ms = None;
        let candidates = std::mem::take(&mut req.candidates);
        let request_id = req.id;
        let now = ctx.now_ms;
        // Other steps may have taken budget since these offers came.
        let limit = self.attempt_limit(n).unwrap_or(u64::MAX);
        let best = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.expires_at_ms > now)
            .filter(|(_, c)| c.price.map_or(0, |(_, max)| max) <= limit)
            .min_by(|(i, a), (j, b)| {
                // The cheapest (at most), then the least busy.
                let cost = |c: &Candidate| c.price.map_or(0, |(_, max)| max);
                let la = a.load.per_slot(ctx.peers.live_jobs(&a.agent));
                let lb = b.load.per_slot(ctx.peers.live_jobs(&b.agent));
                cost(a).cmp(&cost(b)).then(la.total_cmp(&lb)).then(i.cmp(j))
            })
            .map(|(i, _)| i);
        for (i, c) in candidates.into_iter().enumerate() {
            if Some(i) == best {
                fx.push(self.accept_offer(n, ctx, c));
            } else {
                fx.push(Effect::Send(Outbound {
                    to: c.agent,
                    endpoint: c.endpoint,
                    msg: Msg::Reject {
                        offer_id: c.offer_id,
                        request_id,
                    },
                }));
            }
        }
    }

    /// Turns an offer into the step's new attempt and accepts it.
    pub(super) fn accept_offer(&mut self, n: usize, ctx: &mut Ctx<'_>, c: Candidate) -> Effect {
        let job_id = (ctx.new_id)();
        let step = &mut self.steps[n];
        let mut request_id = Uuid::nil();
        if let Some(r) = step.request.as_mut() {
            r.state = RequestState::Fulfilled;
            request_id = r.id;
        }
        step.attempts.push(Attempt {
            job_id: Some(job_id),
            request_id,
            offer_id: Some(c.offer_id),
            agent: c.agent.clone(),
            endpoint: c.endpoint.clone(),
            state: JobState::Pending,
            accepted: false,
            superseded: false,
            started_at_ms: ctx.now_ms,
            ended_at_ms: None,
            last_heard_ms: ctx.now_ms,
            last_probe_ms: ctx.now_ms,
            status_seq: 0,
            exit_status: None,
            message: String::new(),
            stderr_tail: String::new(),
            queued_at_ms: None,
            ran_at_ms: None,
            failure: String::new(),
            price: c.price,
        });
        self.touch(ctx);
        Effect::Send(Outbound {
            to: c.agent,
            endpoint: c.endpoint,
            msg: Msg::Accept {
                offer_id: c.offer_id,
                request_id,
                job_id,
            },
        })
    }

    /// An agent declines a request. Declines never end a request; the last
    /// one of the known agents to answer closes the offer window.
    pub fn on_decline(
        &mut self,
        ctx: &mut Ctx<'_>,
        agent: &str,
        request_id: Uuid,
        reason: &str,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(n) = self.find_request(request_id) else {
            return fx;
        };
        let Some(r) = self.steps[n].request.as_mut() else {
            return fx;
        };
        r.declines.push((agent.to_string(), reason.to_string()));
        if r.declines.len() > 8 {
            r.declines.remove(0);
        }
        if !r.answered.iter().any(|a| a == agent) {
            r.answered.push(agent.to_string());
        }
        let asked = r.asked.iter().any(|a| a == agent);
        if r.state == RequestState::Fulfilling
            && !r.candidates.is_empty()
            && r.answered.len() >= ctx.peers.known_agents()
        {
            self.decide(n, ctx, &mut fx);
        } else if asked && r.state == RequestState::Fulfilling && r.candidates.is_empty() {
            // The agent asked declined: ask the next one now.
            r.next_publish_at_ms = ctx.now_ms;
            self.publish_due(n, ctx, &mut fx);
        }
        self.update_blocked(n, ctx);
        self.touch(ctx);
        fx
    }
}
