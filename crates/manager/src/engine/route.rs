//! Messages from peers: duplicates, the `--use-agents` allowlist,
//! routing by request and job id to the workflow they are about, and the
//! answer to news of work no live workflow needs (reject the offer, kill
//! the job; in the ack for a stranger).

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, Msg, Outbound};
use uuid::Uuid;

use super::{Manager, Now, Out, World};
use crate::machine::Effect;
use crate::records::RunsOn;

impl Manager {
    pub(super) fn deliver(
        &mut self,
        msg: Inbound,
        now: &mut Now<'_>,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), DeliverError> {
        let span = msg.span();
        let _in = span.enter();
        // Duplicates: applied in this group or an earlier one.
        if out.applied_set.contains(&msg.id)
            || world
                .is_applied(&msg.id)
                .map_err(|e| DeliverError::Retry(e.to_string()))?
        {
            return Ok(());
        }
        // The allowlist: offers of other agents are let go (rejected), a
        // stranger's refused in the ack.
        if let Msg::Offer {
            offer_id,
            request_id,
            ..
        } = &msg.msg
        {
            let used = self
                .opts
                .use_agents
                .as_ref()
                .is_none_or(|list| list.contains(&msg.from));
            if !used {
                let why = format!(
                    "this manager does not use agent {}: it takes offers only from the agents in its --use-agents list",
                    msg.from
                );
                out.refused.push((msg.from.clone(), why.clone()));
                if !world.knows(&msg.from) {
                    return Err(DeliverError::Refused(why));
                }
                let reject = Msg::Reject {
                    offer_id: *offer_id,
                    request_id: *request_id,
                };
                reply(&msg, reject, out);
                out.applied(msg.id);
                return Ok(());
            }
        }
        // Routing by id.
        let key = match &msg.msg {
            Msg::Offer { request_id, .. } | Msg::Decline { request_id, .. } => {
                self.answered.insert(msg.from.clone(), now.ms);
                self.directory.note_answered(&msg.from);
                self.index.by_request.get(request_id)
            }
            Msg::Accepted { job_id, .. }
            | Msg::Data {
                job_id,
                outputs: true,
                ..
            } => self.index.by_job.get(job_id),
            Msg::Status(s) => self.index.by_job.get(&s.job_id),
            other => {
                return Err(DeliverError::Refused(format!(
                    "a manager does not take {}",
                    other.name()
                )))
            }
        }
        .copied()
        .filter(|id| self.live.contains_key(id));
        let Some(id) = key else {
            self.receipt(&msg, None, world, out);
            return self.not_ours(&msg, world, out);
        };
        if let Msg::Status(s) = &msg.msg {
            if let Some(r) = RunsOn::reported(&s.executor, &s.external_id) {
                out.runs_on.push((s.job_id, r));
            }
        }
        let fx = self
            .change(
                id,
                now,
                world,
                out,
                |wf, ctx| -> Result<Vec<Effect>, DeliverError> {
                    Ok(match &msg.msg {
                        Msg::Offer {
                            offer_id,
                            request_id,
                            expires_at_ms,
                            load,
                            price,
                            max_charge_milli,
                        } => wf.on_offer(
                            ctx,
                            &msg.from,
                            &msg.endpoint,
                            *request_id,
                            *offer_id,
                            *expires_at_ms,
                            *load,
                            (!price.is_zero()).then_some((*price, *max_charge_milli)),
                        ),
                        Msg::Decline { request_id, reason } => {
                            wf.on_decline(ctx, &msg.from, *request_id, reason)
                        }
                        Msg::Accepted { job_id, .. } => wf.on_accepted(ctx, &msg.from, *job_id)?,
                        Msg::Data { job_id, items, .. } => {
                            wf.on_data(ctx, &msg.from, *job_id, items, msg.unfetched.as_deref())?
                        }
                        Msg::Status(s) => wf.on_status(ctx, &msg.from, s)?,
                        _ => Vec::new(),
                    })
                },
            )
            .ok_or_else(|| DeliverError::Retry("workflow vanished".into()))??;
        self.effects(id, fx, out);
        self.receipt(&msg, Some(id), world, out);
        out.applied(msg.id);
        Ok(())
    }

    /// A receipt with a job's final status: checked against the job's
    /// workflow (live, ended in this group, or stored).
    fn receipt(&self, msg: &Inbound, live: Option<Uuid>, world: &dyn World, out: &mut Out) {
        let Msg::Status(s) = &msg.msg else {
            return;
        };
        let Some(r) = &s.receipt else {
            return;
        };
        let wf_id = live.or(r.receipt.workflow_id);
        let stored;
        let wf = match wf_id {
            Some(id) => match self.live.get(&id).or_else(|| out.finished.get(&id)) {
                Some(w) => Some(w),
                None => {
                    stored = world.stored(&id).ok().flatten();
                    stored.as_ref()
                }
            },
            None => None,
        };
        let verdict = r.receipt.check().and_then(|()| {
            if r.receipt.job_id != s.job_id {
                return Err("the receipt is for another job than its status".to_string());
            }
            match wf {
                Some(w) => w.check_receipt(&self.opts.node_id, &msg.from, &r.receipt),
                None => Err(format!(
                    "this manager has no workflow with job {}",
                    r.receipt.job_id
                )),
            }
        });
        out.receipts.push(super::ReceiptIn {
            agent: msg.from.clone(),
            endpoint: msg.endpoint.clone(),
            receipt: (**r).clone(),
            verdict,
        });
    }

    /// A message about no live workflow of ours: tell the agent to let go
    /// (reject the offer, kill the job), in the ack when it is a stranger
    /// (never at an address it chose).
    pub(super) fn not_ours(
        &self,
        msg: &Inbound,
        world: &dyn World,
        out: &mut Out,
    ) -> Result<(), DeliverError> {
        let answer = match &msg.msg {
            Msg::Offer {
                offer_id,
                request_id,
                ..
            } => Some(Msg::Reject {
                offer_id: *offer_id,
                request_id: *request_id,
            }),
            Msg::Accepted { job_id, .. } => Some(Msg::Kill {
                job_id: *job_id,
                reason: "no live workflow needs this job".into(),
            }),
            Msg::Status(s) if !s.state.is_final() => Some(Msg::Kill {
                job_id: s.job_id,
                reason: "no live workflow needs this job".into(),
            }),
            _ => None,
        };
        if answer.is_some() && !world.knows(&msg.from) {
            return Err(DeliverError::Refused(format!(
                "no live workflow of this manager has this {} (message {})",
                msg.msg.name(),
                msg.id
            )));
        }
        if let Some(m) = answer {
            reply(msg, m, out);
        }
        out.applied(msg.id);
        Ok(())
    }

    /// Collects workflow `id`'s effects (traced with its id).
    pub(super) fn effects(&mut self, id: Uuid, fx: Vec<Effect>, out: &mut Out) {
        for e in fx {
            match e {
                Effect::Send(o) => {
                    if matches!(o.msg, Msg::Request(_)) {
                        self.directory.note_asked(&o.to);
                    }
                    out.send.push((o, Some(id)))
                }
                Effect::Publish(req) => out.publish.push(req),
                e @ (Effect::Spawn(_) | Effect::Gather(_)) => self.pending.push_back((id, e)),
            }
        }
    }
}

/// Answers the sender of `msg`, under the same trace.
fn reply(msg: &Inbound, m: Msg, out: &mut Out) {
    out.send.push((
        Outbound {
            to: msg.from.clone(),
            endpoint: msg.endpoint.clone(),
            msg: m,
        },
        msg.trace,
    ));
}
