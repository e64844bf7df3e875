//! Answers: requests heard on gossip (an offer or a decline, declined
//! once), and direct messages (accept, reject, data, status requests,
//! kills) with the rights, allowlist and stranger rules.

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, JobState, Load, Msg, Outbound, StatusUpdate};
use caroni_types::ExecutorSpec;
use uuid::Uuid;

use super::{Agent, Delivered, Now, Out, World, RECEIPT_ANSWER_MS};
use crate::machine::{self, AcceptOutcome, Answering, Effect, Job};

/// True when `msg` was applied in this group or an earlier one (a storage
/// error is a retry for the sender).
fn applied_before(msg: &Inbound, world: &dyn World, out: &Out) -> Result<bool, DeliverError> {
    let retry = |e: caroni_store::Error| DeliverError::Retry(e.to_string());
    Ok(out.applied_set.contains(&msg.id) || world.is_applied(&msg.id).map_err(retry)?)
}

impl Agent {
    /// How busy this agent is, for its offers.
    pub(super) fn load_now(&self) -> Load {
        let slots = self.opts.slots as u32;
        let running = self.running.len() as u32;
        let local = running.saturating_sub(self.slurm_running.len() as u32);
        Load {
            slots,
            free_slots: slots.saturating_sub(local),
            queue_length: (self.jobs.len() as u32).saturating_sub(running),
        }
    }

    /// A request sent to this agent directly by a manager that chose it
    /// from its advert: answered like a gossip request, through the same
    /// checks, but always answered (a decline says why), and applied once.
    pub(super) fn asked(
        &mut self,
        msg: Inbound,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Delivered, DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        if applied_before(&msg, world, out)? {
            return Ok(Delivered::Applied);
        }
        let Msg::Request(req) = &msg.msg else {
            return Ok(Delivered::NotMine);
        };
        // The answer goes where the signer says it is now (a manager that
        // moved since it staged the request gave its new address when it
        // sent it); the body's endpoint is not a way to name another.
        let mut req = req.clone();
        req.manager_endpoint = msg.endpoint.clone();
        if let Err(why) = req.check(now.ms) {
            if req.expires_at_ms > now.ms {
                return Err(DeliverError::Refused(format!("a job request: {why}")));
            }
            // Expired on the way (a long queue): nothing to answer.
        } else {
            self.on_request(&msg.from, &req, true, now, world, out);
        }
        out.applied(msg.id);
        Ok(Delivered::Applied)
    }

    pub(super) fn on_request(
        &mut self,
        from: &str,
        req: &JobRequest,
        asked: bool,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) {
        let mut not_here = None;
        let found = if req.job_type == caroni_types::CWL_TOOL_JOB_TYPE {
            // A real CWL tool: the job type is made from the tool, and
            // `--cwl-tools` says whether it runs here.
            let (def, why) = crate::cwl::job_type(&req.job_kvs, self.opts.cwl_tools);
            not_here = why;
            Ok(Some((
                def,
                crate::cwl::executor(&req.job_kvs, self.opts.cwl_tools),
            )))
        } else {
            world.job_type(&req.job_type)
        };
        let found = match found {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read job types");
                return;
            }
        };
        let (def, executor) = match found {
            Some((d, e)) => (Some(d), e),
            None => (None, ExecutorSpec::default()),
        };
        let unavailable =
            not_here.or_else(|| def.as_ref().and_then(|_| world.unavailable(&executor)));
        // An offer tells the capacity of the executor that would run it.
        let load = match &executor {
            ExecutorSpec::Slurm(s) => {
                self.slurm_seen = true;
                let n = self
                    .slurm_running
                    .values()
                    .filter(|t| **t == req.job_type)
                    .count() as u32;
                Load {
                    slots: s.max_in_flight,
                    free_slots: s.max_in_flight.saturating_sub(n),
                    queue_length: 0,
                }
            }
            _ => self.load_now(),
        };
        let prior = self.offers.get(&req.request_id);
        let how = Answering {
            unavailable,
            load,
            declined_before: self.declined.contains_key(&req.request_id),
            not_served: !self.opts.serves(from),
            asked,
            price: if def.is_some() {
                world.price(&req.job_type)
            } else {
                Default::default()
            },
            distrust: self.opts.dispute_limit.and_then(|limit| {
                let (disputed, overdue) = world.receipts_standing(from, now.ms);
                (disputed + overdue > limit).then(|| format!(
                    "this agent takes no more work from manager {from}: {disputed} of its receipts were disputed and {overdue} not answered within {} s, over this agent's --dispute-limit {limit}",
                    RECEIPT_ANSWER_MS / 1000
                ))
            }),
            unmet: req
                .needs
                .unmet(&self.opts.resources, &self.opts.labels)
                .map(|why| format!("this agent cannot ever run it: {why}")),
        };
        if how.not_served && !how.declined_before {
            out.refused.push((
                from.to_string(),
                "not in this agent's --serve-managers: its requests are declined".into(),
            ));
        }
        let Some((offer, answer)) = machine::answer_request(
            def.as_ref(),
            prior,
            from,
            req,
            now.ms,
            &mut *now.new_id,
            how,
        ) else {
            return;
        };
        if matches!(answer.msg, Msg::Decline { .. }) {
            self.declined.insert(req.request_id, req.expires_at_ms);
            out.declines += 1;
        } else {
            out.offers_made += 1;
        }
        if let (Some(_), Some(w)) = (&offer, req.workflow_id) {
            out.request_workflows.push((req.request_id, w));
        }
        if let (
            Some(_),
            Msg::Offer {
                price,
                max_charge_milli,
                ..
            },
        ) = (&offer, &answer.msg)
        {
            if !price.is_zero() {
                out.request_prices
                    .push((req.request_id, (*price, *max_charge_milli)));
            }
        }
        if offer.is_some() && req.priority != 0 {
            out.request_priorities.push((req.request_id, req.priority));
            self.priorities.insert(req.request_id, req.priority);
        }
        if offer.is_some() && !req.needs.is_empty() {
            out.request_needs.push((req.request_id, req.needs.clone()));
            self.needs.insert(req.request_id, req.needs.clone());
        }
        tracing::debug!(workflow = %caroni_types::msg::Trace(req.workflow_id), request = %req.request_id, answer = answer.msg.name(), "answering a request");
        if let Some(o) = offer {
            out.offers.push(o.clone());
            self.offers.insert(o.request_id, o);
        }
        out.send(answer, req.workflow_id);
    }

    pub(super) fn deliver(
        &mut self,
        msg: Inbound,
        now_ms: u64,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<Delivered, DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        if applied_before(&msg, world, out)? {
            return Ok(Delivered::Applied);
        }
        let retry = |e: caroni_store::Error| DeliverError::Retry(e.to_string());
        if matches!(msg.msg, Msg::Accept { .. }) && !self.opts.serves(&msg.from) {
            let why = format!(
                "this agent does not serve manager {}: it serves only the managers in its --serve-managers list",
                msg.from
            );
            out.refused.push((msg.from.clone(), why.clone()));
            return Err(DeliverError::Refused(why));
        }
        let (job, fx) = match &msg.msg {
            // Verdicts on this agent's receipts: checked and chained by the
            // service (it holds the receipts and verifies the signatures).
            Msg::Verdicts(vs) => {
                out.verdicts.push((msg.from.clone(), vs.clone()));
                out.applied(msg.id);
                return Ok(Delivered::Applied);
            }
            Msg::Accept {
                offer_id,
                job_id,
                request_id,
            } => {
                let offer = match self.offers.get(request_id) {
                    Some(o) => Some(o.clone()),
                    None => world.offer(request_id).map_err(retry)?,
                };
                let def = match &offer {
                    Some(o) if o.job_type == caroni_types::CWL_TOOL_JOB_TYPE => {
                        Some(crate::cwl::job_type(&o.job_kvs, self.opts.cwl_tools).0)
                    }
                    Some(o) => world.job_type(&o.job_type).map_err(retry)?.map(|(d, _)| d),
                    None => None,
                };
                match machine::accept(
                    offer.as_ref(),
                    def.as_ref(),
                    &msg.from,
                    &msg.endpoint,
                    *offer_id,
                    *job_id,
                    now_ms,
                )? {
                    AcceptOutcome::Created(job, used, fx) => {
                        tracing::debug!(job = %job.id, job_type = %job.job_type, manager = %job.manager, "job accepted");
                        out.offers.push(used.clone());
                        self.offers.insert(used.request_id, used);
                        (Some(*job), fx)
                    }
                    AcceptOutcome::Answer(answer) if world.knows(&msg.from) => {
                        (None, vec![Effect::Send(answer)])
                    }
                    // A stranger is answered in the ack, not at an
                    // address it chose.
                    AcceptOutcome::Answer(answer) => {
                        return Err(DeliverError::Refused(match answer.msg {
                            Msg::Status(s) => s.message,
                            other => format!("not accepted ({})", other.name()),
                        }))
                    }
                }
            }
            Msg::Reject {
                offer_id,
                request_id,
            } => {
                // The offer as held, or as stored once it left memory
                // (accepted, or reloaded after it expired).
                let offer = match self.offers.get(request_id) {
                    Some(o) => Some(o.clone()),
                    None => world.offer(request_id).map_err(retry)?,
                };
                if let Some(o) = offer.filter(|o| o.offer_id == *offer_id) {
                    if o.manager != msg.from {
                        return Err(DeliverError::Refused(
                            "only the manager an offer was made to may reject it".into(),
                        ));
                    }
                    // An accepted offer stays: it answers a re-sent accept.
                    if o.job_id.is_none() {
                        self.offers.remove(request_id);
                        out.forget_offers.push(*request_id);
                    }
                }
                out.applied(msg.id);
                return Ok(Delivered::Applied);
            }
            Msg::Data {
                job_id,
                items,
                outputs: false,
            } => {
                let Some(mut job) = self.job(*job_id, world)? else {
                    return Err(DeliverError::Refused(format!(
                        "this agent holds no job {job_id}"
                    )));
                };
                let fx = job.on_data(&msg.from, items, msg.unfetched.as_deref(), now_ms)?;
                (Some(job), fx)
            }
            Msg::StatusRequest { job_id } => match self.job(*job_id, world)? {
                Some(job) => (None, job.on_status_request(&msg.from)?),
                None if world.knows(&msg.from) => {
                    (None, vec![Effect::Send(unknown_job(&msg, *job_id))])
                }
                None => {
                    return Err(DeliverError::Refused(format!(
                        "this agent does not know job {job_id}"
                    )))
                }
            },
            Msg::Kill { job_id, reason } => match self.job(*job_id, world)? {
                Some(mut job) => {
                    let was_live = !job.state.is_final();
                    let fx = job.on_kill(&msg.from, reason, now_ms)?;
                    if was_live {
                        out.cancelled += 1;
                    }
                    tracing::info!(job = %job_id, reason = %reason, "job killed by its manager");
                    (Some(job), fx)
                }
                None => (None, Vec::new()),
            },
            Msg::Request(_) => {
                return Err(DeliverError::Refused(
                    "job requests travel on gossip, not direct".into(),
                ))
            }
            _ => return Ok(Delivered::NotMine),
        };
        self.commit(job, fx, msg.trace, world, out);
        out.applied(msg.id);
        Ok(Delivered::Applied)
    }

    /// A job, live in memory or finished on disk. A storage error is a
    /// retry for the sender, never "no such job".
    pub(super) fn job(&self, id: Uuid, world: &dyn World) -> Result<Option<Job>, DeliverError> {
        match self.jobs.get(&id) {
            Some(j) => Ok(Some(j.clone())),
            None => world
                .job(&id)
                .map_err(|e| DeliverError::Retry(e.to_string())),
        }
    }
}

fn unknown_job(msg: &Inbound, job_id: Uuid) -> Outbound {
    Outbound {
        to: msg.from.clone(),
        endpoint: msg.endpoint.clone(),
        msg: Msg::Status(StatusUpdate {
            job_id,
            state: JobState::Failed,
            message: "this agent does not know the job (it may have lost its data)".into(),
            exit_status: None,
            stderr_tail: String::new(),
            sequence: u64::MAX,
            executor: String::new(),
            external_id: String::new(),
            queued_at_ms: None,
            started_at_ms: None,
            ended_at_ms: None,
            failure: String::new(),
            receipt: None,
        }),
    }
}
