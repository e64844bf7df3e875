//! The agent's rules as pure functions over its records: offers, jobs and
//! their state machine (`pending → queued → running → completed | failed`).
//! Time and ids are passed in; effects come out as data.

use std::collections::BTreeMap;

use caroni_types::msg::{JobRequest, JobState, Load, Msg, Outbound, StatusUpdate};
use caroni_types::JobTypeDef;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long an offer stays valid.
pub const OFFER_TTL_MS: u64 = 60_000;
/// Bytes of stderr kept on a job.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// An offer this agent made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Offer id.
    pub offer_id: Uuid,
    /// Request answered.
    pub request_id: Uuid,
    /// Manager node id it was made to.
    pub manager: String,
    /// Manager endpoint.
    pub endpoint: String,
    /// Job type offered.
    pub job_type: String,
    /// Static parameters of the request.
    pub job_kvs: BTreeMap<String, String>,
    /// Void after (ms).
    pub expires_at_ms: u64,
    /// The job it became, once accepted.
    pub job_id: Option<Uuid>,
}

/// A job held by this agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Job id (chosen by the manager).
    pub id: Uuid,
    /// Offer it came from.
    pub offer_id: Uuid,
    /// Request it answered.
    pub request_id: Uuid,
    /// Owning manager node id.
    pub manager: String,
    /// Manager endpoint.
    pub endpoint: String,
    /// Job type name.
    pub job_type: String,
    /// Static parameters.
    pub job_kvs: BTreeMap<String, String>,
    /// Input names expected.
    pub inputs: Vec<String>,
    /// Input values received.
    pub values: BTreeMap<String, String>,
    /// Outputs produced.
    pub outputs: BTreeMap<String, String>,
    /// State.
    pub state: JobState,
    /// Status sequence (increments on every change).
    pub seq: u64,
    /// Position in the run queue once queued.
    pub queue_seq: Option<u64>,
    /// Created (ms).
    pub created_at_ms: u64,
    /// Had every input and waited for a slot (ms).
    #[serde(default)]
    pub queued_at_ms: Option<u64>,
    /// Started running (ms).
    pub started_at_ms: Option<u64>,
    /// Ended (ms).
    pub ended_at_ms: Option<u64>,
    /// Exit status.
    pub exit_status: Option<i32>,
    /// Why it failed.
    pub message: String,
    /// Tail of stderr.
    pub stderr_tail: String,
    /// The kind of failure ([`Failure::as_str`]); empty unless it failed.
    #[serde(default)]
    pub failure: String,
}

/// Why a message was refused: the sender has no right to say it (one
/// type across the crates).
pub use caroni_types::delivery::Refusal;

/// What the service must do besides persisting. (Short-lived, a few per
/// message: a send's size is not worth a box.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send a message (through the outbox, same batch).
    Send(Outbound),
    /// Put the job in the run queue.
    Enqueue(Uuid),
    /// Stop the job's process.
    StopProcess(Uuid),
}

/// The result of running a job's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunResult {
    /// Exit 0 and a JSON object with every declared output.
    Completed {
        /// Output values.
        outputs: BTreeMap<String, String>,
        /// Tail of stderr.
        stderr_tail: String,
    },
    /// Anything else.
    Failed {
        /// What was wrong.
        message: String,
        /// Exit status, if the process exited.
        exit_status: Option<i32>,
        /// Tail of stderr.
        stderr_tail: String,
        /// The kind of failure, as the executor knew it.
        kind: Failure,
    },
}

/// Why a run failed, as the executor that ran it knew it (and as a bounded
/// metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// It outlived its timeout.
    Timeout,
    /// It was killed: cancelled by its manager, stopped by the agent, out
    /// of memory in its container, cancelled in Slurm.
    Killed,
    /// It exited with a non-zero status.
    ExitStatus,
    /// It exited 0 but its stdout was not what its job type declares.
    Output,
    /// Anything else (it could not start, its job type was removed).
    Other,
}

impl Failure {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Killed => "killed",
            Failure::ExitStatus => "exit_status",
            Failure::Output => "output",
            Failure::Other => "other",
        }
    }
}

/// What the agent knows beyond the request when it answers one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answering {
    /// How busy the agent is now (carried in the offer).
    pub load: Load,
    /// The agent declined this request before.
    pub declined_before: bool,
    /// The manager is not one this agent serves (`--serve-managers`).
    pub not_served: bool,
    /// Why the job type's executor cannot run jobs now, if so.
    pub unavailable: Option<String>,
    /// The manager asked this agent directly (from its advert), rather
    /// than broadcasting: a decline is always sent. On a broadcast, a
    /// missing job type or unmet needs are not answered (the manager
    /// knows them from the adverts); a reason an operator needs (policy,
    /// an executor down, other inputs) is.
    pub asked: bool,
    /// Why this agent can never serve the request's resources or labels.
    pub unmet: Option<String>,
    /// The job type's price (carried in the offer).
    pub price: caroni_types::market::Price,
    /// Why this agent no longer works for the manager: its disputed or
    /// unacknowledged receipts passed `--dispute-limit`.
    pub distrust: Option<String>,
}

/// Answers a request: a new offer or a decline. `None` when nothing is to
/// be said: the request expired, the agent already offered (the offer is
/// durable in its outbox and reaches the manager however long the queue;
/// answering each re-publication again is what turns load into a storm),
/// the offer was accepted, or the agent already declined it for the same
/// reason class (a decline).
pub fn answer_request(
    def: Option<&JobTypeDef>,
    prior: Option<&Offer>,
    manager: &str,
    req: &JobRequest,
    now_ms: u64,
    new_id: impl FnOnce() -> Uuid,
    how: Answering,
) -> Option<(Option<Offer>, Outbound)> {
    if req.expires_at_ms <= now_ms {
        return None;
    }
    let to = |msg| Outbound {
        to: manager.to_string(),
        endpoint: req.manager_endpoint.clone(),
        msg,
    };
    if let Some(p) = prior.filter(|p| p.manager == manager) {
        if p.job_id.is_some() || p.expires_at_ms > now_ms {
            return None;
        }
    }
    let decline = |reason: String| {
        if how.declined_before {
            return None;
        }
        Some((
            None,
            to(Msg::Decline {
                request_id: req.request_id,
                reason,
            }),
        ))
    };
    if how.not_served {
        return decline(format!(
            "this agent does not serve manager {manager}: it serves only the managers in its --serve-managers list"
        ));
    }
    if let Some(why) = how.distrust {
        return decline(why);
    }
    let Some(def) = def else {
        if !how.asked {
            return None;
        }
        return decline(format!("no job type named {}", req.job_type));
    };
    let max_charge = how.price.max_charge(def.timeout_seconds);
    let over_price = req.needs.max_price_milli.filter(|limit| max_charge > *limit).map(|limit| {
        format!(
            "job type {} may charge up to {} credits ({} for at most {} s), the step pays at most {}",
            def.name,
            caroni_types::market::credits(max_charge),
            how.price.describe(),
            def.timeout_seconds,
            caroni_types::market::credits(limit)
        )
    });
    if let Some(why) = how.unmet.or(over_price) {
        if !how.asked {
            return None;
        }
        return decline(why);
    }
    if let Some(why) = &how.unavailable {
        return decline(format!("job type {} cannot run here now: {why}", def.name));
    }
    let mut have = def.inputs.clone();
    have.sort();
    let mut want = req.parameter_keys.clone();
    want.sort();
    if have != want {
        return decline(format!(
            "job type {} takes inputs [{}], the request has [{}]",
            def.name,
            have.join(", "),
            want.join(", ")
        ));
    }
    let offer = Offer {
        offer_id: new_id(),
        request_id: req.request_id,
        manager: manager.to_string(),
        endpoint: req.manager_endpoint.clone(),
        job_type: def.name.clone(),
        job_kvs: req.job_kvs.clone(),
        expires_at_ms: (now_ms + OFFER_TTL_MS).min(req.expires_at_ms),
        job_id: None,
    };
    let out = to(Msg::Offer {
        offer_id: offer.offer_id,
        request_id: offer.request_id,
        expires_at_ms: offer.expires_at_ms,
        load: how.load,
        price: how.price,
        max_charge_milli: max_charge,
    });
    Some((Some(offer), out))
}

/// What accepting an offer does.
#[derive(Debug)]
pub enum AcceptOutcome {
    /// A new job (store it and the used offer), with what to do.
    Created(Box<Job>, Offer, Vec<Effect>),
    /// Nothing new; answer again.
    Answer(Outbound),
}

/// The manager accepts an offer.
pub fn accept(
    offer: Option<&Offer>,
    def: Option<&JobTypeDef>,
    from: &str,
    from_endpoint: &str,
    offer_id: Uuid,
    job_id: Uuid,
    now_ms: u64,
) -> Result<AcceptOutcome, Refusal> {
    let fail = |message: &str| {
        AcceptOutcome::Answer(Outbound {
            to: from.to_string(),
            endpoint: from_endpoint.to_string(),
            msg: Msg::Status(StatusUpdate {
                job_id,
                state: JobState::Failed,
                message: message.to_string(),
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
        })
    };
    let Some(offer) = offer.filter(|o| o.offer_id == offer_id) else {
        return Ok(fail("this agent has no such offer (expired and forgotten)"));
    };
    if offer.manager != from {
        return Err(Refusal(format!(
            "offer {offer_id} was made to {}, not to {from}; only the manager an offer was made to may accept it",
            offer.manager
        )));
    }
    let accepted = |job_id| Outbound {
        to: from.to_string(),
        endpoint: offer.endpoint.clone(),
        msg: Msg::Accepted { job_id, offer_id },
    };
    match offer.job_id {
        Some(existing) if existing == job_id => return Ok(AcceptOutcome::Answer(accepted(job_id))),
        Some(_) => return Ok(fail("offer already used for another job")),
        None => {}
    }
    if offer.expires_at_ms <= now_ms {
        return Ok(fail("offer expired before it was accepted"));
    }
    let Some(def) = def else {
        return Ok(fail(&format!(
            "job type {} was removed from this agent",
            offer.job_type
        )));
    };
    let mut used = offer.clone();
    used.job_id = Some(job_id);
    let job = Job {
        id: job_id,
        offer_id,
        request_id: offer.request_id,
        manager: from.to_string(),
        endpoint: offer.endpoint.clone(),
        job_type: def.name.clone(),
        job_kvs: offer.job_kvs.clone(),
        inputs: def.inputs.clone(),
        values: BTreeMap::new(),
        outputs: BTreeMap::new(),
        state: JobState::Pending,
        seq: 1,
        queue_seq: None,
        created_at_ms: now_ms,
        queued_at_ms: None,
        started_at_ms: None,
        ended_at_ms: None,
        exit_status: None,
        message: String::new(),
        stderr_tail: String::new(),
        failure: String::new(),
    };
    let mut job = job;
    let mut fx = vec![Effect::Send(accepted(job_id))];
    // A job type without inputs is ready at once.
    job.maybe_queue(now_ms, &mut fx);
    Ok(AcceptOutcome::Created(Box::new(job), used, fx))
}

impl Job {
    fn status(&self) -> Outbound {
        Outbound {
            to: self.manager.clone(),
            endpoint: self.endpoint.clone(),
            msg: Msg::Status(StatusUpdate {
                job_id: self.id,
                state: self.state,
                message: self.message.clone(),
                exit_status: self.exit_status,
                stderr_tail: self.stderr_tail.clone(),
                sequence: self.seq,
                executor: String::new(),
                external_id: String::new(),
                queued_at_ms: self.queued_at_ms,
                started_at_ms: self.started_at_ms,
                ended_at_ms: self.ended_at_ms,
                failure: self.failure.clone(),
                receipt: None,
            }),
        }
    }

    fn set(&mut self, state: JobState, fx: &mut Vec<Effect>) {
        self.state = state;
        self.seq += 1;
        fx.push(Effect::Send(self.status()));
    }

    fn check_owner(&self, from: &str) -> Result<(), Refusal> {
        if self.manager == from {
            Ok(())
        } else {
            Err(Refusal(format!(
                "job {} belongs to manager {}; node {from} may not send it data, status requests or kills",
                self.id, self.manager
            )))
        }
    }

    fn maybe_queue(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.state == JobState::Pending
            && self.inputs.iter().all(|i| self.values.contains_key(i))
        {
            self.queued_at_ms = Some(now_ms);
            self.set(JobState::Queued, fx);
            fx.push(Effect::Enqueue(self.id));
        }
    }

    /// Input data from the owning manager. Values already present are
    /// ignored (re-sent data), as are names the job does not take.
    /// `unfetched` says why the files they name cannot be fetched for
    /// good: the job fails with it, and never runs.
    pub fn on_data(
        &mut self,
        from: &str,
        items: &BTreeMap<String, String>,
        unfetched: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Refusal> {
        self.check_owner(from)?;
        let mut fx = Vec::new();
        if self.state != JobState::Pending {
            return Ok(fx);
        }
        if let Some(why) = unfetched {
            self.message = format!("its input files cannot be fetched from the manager: {why}");
            self.failure = Failure::Other.as_str().to_string();
            self.ended_at_ms = Some(now_ms);
            self.set(JobState::Failed, &mut fx);
            return Ok(fx);
        }
        for (k, v) in items {
            if self.inputs.contains(k) && !self.values.contains_key(k) {
                self.values.insert(k.clone(), v.clone());
            }
        }
        self.maybe_queue(now_ms, &mut fx);
        Ok(fx)
    }

    /// The owning manager asks for the state.
    pub fn on_status_request(&self, from: &str) -> Result<Vec<Effect>, Refusal> {
        self.check_owner(from)?;
        Ok(vec![Effect::Send(self.status())])
    }

    /// The owning manager stops the job: it is cancelled (not failed).
    pub fn on_kill(
        &mut self,
        from: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Refusal> {
        self.check_owner(from)?;
        let mut fx = Vec::new();
        if self.state.is_final() {
            return Ok(fx);
        }
        if self.state == JobState::Running {
            fx.push(Effect::StopProcess(self.id));
        }
        self.message = format!("cancelled by the manager: {reason}");
        self.ended_at_ms = Some(now_ms);
        self.set(JobState::Cancelled, &mut fx);
        Ok(fx)
    }

    /// The scheduler starts it.
    pub fn on_started(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state == JobState::Queued {
            self.started_at_ms = Some(now_ms);
            self.set(JobState::Running, &mut fx);
        }
        fx
    }

    /// The process finished. Outputs are sent before the final status.
    pub fn on_finished(&mut self, result: RunResult, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.state != JobState::Running {
            return fx; // killed meanwhile
        }
        self.ended_at_ms = Some(now_ms);
        match result {
            RunResult::Completed {
                outputs,
                stderr_tail,
            } => {
                self.exit_status = Some(0);
                self.stderr_tail = stderr_tail;
                self.outputs = outputs.clone();
                fx.push(Effect::Send(Outbound {
                    to: self.manager.clone(),
                    endpoint: self.endpoint.clone(),
                    msg: Msg::Data {
                        job_id: self.id,
                        items: outputs,
                        outputs: true,
                    },
                }));
                self.set(JobState::Completed, &mut fx);
            }
            RunResult::Failed {
                message,
                exit_status,
                stderr_tail,
                kind,
            } => {
                self.failure = kind.as_str().to_string();
                self.exit_status = exit_status;
                self.stderr_tail = stderr_tail;
                self.message = message;
                self.set(JobState::Failed, &mut fx);
            }
        }
        fx
    }

    /// After a restart: a job that was running when the agent died lost
    /// its process; it is queued again and re-run from the start (its
    /// result was never reported, so the manager sees one run). A queued
    /// job is queued again.
    pub fn on_restart(&mut self) -> Vec<Effect> {
        let mut fx = Vec::new();
        match self.state {
            JobState::Running => {
                self.started_at_ms = None;
                self.ended_at_ms = None;
                self.set(JobState::Queued, &mut fx);
                fx.push(Effect::Enqueue(self.id));
            }
            JobState::Queued => fx.push(Effect::Enqueue(self.id)),
            _ => {}
        }
        fx
    }
}

#[cfg(test)]
mod tests;
