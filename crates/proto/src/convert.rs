//! Conversions between the wire messages and the engines' domain messages
//! (`caroni_types::msg`). Decoding checks what protobuf cannot: ids must be
//! UUIDs, states must be known.

use caroni_types::ledger::{Receipt, SignedReceipt, Verdict, MAX_REASON};
use caroni_types::market::{Advert, AdvertisedType, Needs, Price, Resources};
use caroni_types::msg::{JobRequest, JobState, Load, Msg, StatusUpdate};
use uuid::Uuid;

use crate::v1::{self as pb, message::Payload};

/// A wire message that does not make sense.
#[derive(Debug, thiserror::Error)]
#[error("malformed {message}: {problem}")]
pub struct Malformed {
    /// Message name.
    pub message: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn uuid(message: &'static str, field: &str, s: &str) -> Result<Uuid, Malformed> {
    s.parse().map_err(|_| Malformed {
        message,
        problem: format!("{field} `{s}` is not a UUID"),
    })
}

fn ms(t: &Option<prost_types::Timestamp>) -> u64 {
    t.as_ref().map(crate::timestamp_to_ms).unwrap_or(0)
}

/// Domain job state → wire.
pub fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// Domain receipt → wire.
pub fn receipt_to_pb(r: SignedReceipt) -> pb::JobReceipt {
    let SignedReceipt {
        receipt: r,
        signature,
    } = r;
    pb::JobReceipt {
        job_id: r.job_id.to_string(),
        workflow_id: r.workflow_id.map(|w| w.to_string()).unwrap_or_default(),
        manager: r.manager,
        agent: r.agent,
        job_type: r.job_type,
        state: job_state_to_pb(r.state) as i32,
        inputs_sha256: r.inputs_sha256,
        outputs_sha256: r.outputs_sha256,
        wall_ms: r.wall_ms,
        cpu_ms: r.cpu_ms,
        price: Some(price_to_pb(&r.price)),
        max_charge_milli: r.max_charge_milli,
        charge_milli: r.charge_milli,
        ended_at_ms: r.ended_at_ms,
        signature,
    }
}

/// Wire receipt → domain.
fn receipt_from_pb(r: pb::JobReceipt) -> Result<SignedReceipt, Malformed> {
    const M: &str = "JobReceipt";
    let state = job_state_from_pb(r.state)
        .filter(|s| s.is_final())
        .ok_or_else(|| Malformed {
            message: M,
            problem: format!("state {} is not a final one", r.state),
        })?;
    let workflow_id = if r.workflow_id.is_empty() {
        None
    } else {
        Some(uuid(M, "workflow_id", &r.workflow_id)?)
    };
    Ok(SignedReceipt {
        receipt: Receipt {
            job_id: uuid(M, "job_id", &r.job_id)?,
            workflow_id,
            manager: r.manager,
            agent: r.agent,
            job_type: r.job_type,
            state,
            inputs_sha256: r.inputs_sha256,
            outputs_sha256: r.outputs_sha256,
            wall_ms: r.wall_ms,
            cpu_ms: r.cpu_ms,
            price: price_from_pb(r.price),
            max_charge_milli: r.max_charge_milli,
            charge_milli: r.charge_milli,
            ended_at_ms: r.ended_at_ms,
        },
        signature: r.signature,
    })
}

/// Wire job state → domain (`None`: unknown or unspecified).
fn job_state_from_pb(s: i32) -> Option<JobState> {
    Some(match pb::JobState::try_from(s).ok()? {
        pb::JobState::Pending => JobState::Pending,
        pb::JobState::Queued => JobState::Queued,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Completed => JobState::Completed,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        _ => return None,
    })
}

/// Domain price → wire.
pub fn price_to_pb(p: &Price) -> pb::Price {
    pb::Price {
        fixed_milli: p.fixed_milli,
        per_second_milli: p.per_second_milli,
    }
}

/// Wire price → domain (absent: free).
pub fn price_from_pb(p: Option<pb::Price>) -> Price {
    let p = p.unwrap_or_default();
    Price {
        fixed_milli: p.fixed_milli,
        per_second_milli: p.per_second_milli,
    }
}

/// Domain resources → wire.
pub fn resources_to_pb(r: &Resources) -> pb::Resources {
    pb::Resources {
        cpu_milli: r.cpu_milli,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        disk_mib: r.disk_mib,
    }
}

/// Wire resources → domain (absent: none).
pub fn resources_from_pb(r: Option<pb::Resources>) -> Resources {
    let r = r.unwrap_or_default();
    Resources {
        cpu_milli: r.cpu_milli,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        disk_mib: r.disk_mib,
    }
}

impl From<Msg> for Payload {
    fn from(m: Msg) -> Self {
        match m {
            Msg::Request(r) => Payload::JobFulfillmentRequest(pb::JobFulfillmentRequest {
                request_id: r.request_id.to_string(),
                job_type: r.job_type,
                parameter_keys: r.parameter_keys,
                output_keys: r.output_keys,
                job_kvs: r.job_kvs.into_iter().collect(),
                expires_at: Some(crate::timestamp_ms(r.expires_at_ms)),
                manager_endpoint: r.manager_endpoint,
                publish_count: r.publish_count,
                workflow_id: r.workflow_id.map(|w| w.to_string()).unwrap_or_default(),
                needs: Some(resources_to_pb(&r.needs.resources)),
                max_charge_milli: r.needs.max_price_milli,
                labels: r.needs.labels.into_iter().collect(),
                priority: r.priority,
            }),
            Msg::Offer {
                offer_id,
                request_id,
                expires_at_ms,
                load,
                price,
                max_charge_milli,
            } => Payload::JobFulfillmentOffer(pb::JobFulfillmentOffer {
                offer_id: offer_id.to_string(),
                request_id: request_id.to_string(),
                expires_at: Some(crate::timestamp_ms(expires_at_ms)),
                slots: load.slots,
                free_slots: load.free_slots,
                queue_length: load.queue_length,
                price: (!price.is_zero()).then(|| price_to_pb(&price)),
                max_charge_milli,
            }),
            Msg::Decline { request_id, reason } => {
                Payload::JobFulfillmentDecline(pb::JobFulfillmentDecline {
                    request_id: request_id.to_string(),
                    reason,
                })
            }
            Msg::Accept {
                offer_id,
                request_id,
                job_id,
            } => Payload::JobFulfillmentOfferAccept(pb::JobFulfillmentOfferAccept {
                offer_id: offer_id.to_string(),
                request_id: request_id.to_string(),
                job_id: job_id.to_string(),
            }),
            Msg::Reject {
                offer_id,
                request_id,
            } => Payload::JobFulfillmentOfferReject(pb::JobFulfillmentOfferReject {
                offer_id: offer_id.to_string(),
                request_id: request_id.to_string(),
            }),
            Msg::Accepted { job_id, offer_id } => Payload::JobAccepted(pb::JobAccepted {
                job_id: job_id.to_string(),
                offer_id: offer_id.to_string(),
            }),
            Msg::StatusRequest { job_id } => Payload::JobStatusRequest(pb::JobStatusRequest {
                job_id: job_id.to_string(),
            }),
            Msg::Status(s) => Payload::JobStatusUpdate(pb::JobStatusUpdate {
                job_id: s.job_id.to_string(),
                state: job_state_to_pb(s.state) as i32,
                message: s.message,
                exit_status: s.exit_status,
                stderr_tail: s.stderr_tail,
                sequence: s.sequence,
                executor: s.executor,
                external_id: s.external_id,
                queued_at_ms: s.queued_at_ms.unwrap_or(0),
                started_at_ms: s.started_at_ms.unwrap_or(0),
                ended_at_ms: s.ended_at_ms.unwrap_or(0),
                failure: s.failure,
                receipt: s.receipt.map(|r| receipt_to_pb(*r)),
            }),
            Msg::Data {
                job_id,
                items,
                outputs,
            } => Payload::JobDataAvailable(pb::JobDataAvailable {
                job_id: job_id.to_string(),
                items: items
                    .into_iter()
                    .map(|(name, value)| pb::DataItem { name, value })
                    .collect(),
                outputs,
            }),
            Msg::Kill { job_id, reason } => Payload::JobKill(pb::JobKill {
                job_id: job_id.to_string(),
                reason,
            }),
            Msg::Verdicts(vs) => Payload::ReceiptVerdicts(pb::ReceiptVerdicts {
                verdicts: vs
                    .into_iter()
                    .map(|v| pb::ReceiptVerdict {
                        job_id: v.job_id.to_string(),
                        agreed: v.agreed,
                        reason: v.reason,
                        signature: v.signature,
                    })
                    .collect(),
            }),
            Msg::Advert(a) => Payload::AgentAdvert(pb::AgentAdvert {
                seq: a.seq,
                expires_at: Some(crate::timestamp_ms(a.expires_at_ms)),
                slots: a.load.slots,
                free_slots: a.load.free_slots,
                queue_length: a.load.queue_length,
                total: Some(resources_to_pb(&a.total)),
                free: Some(resources_to_pb(&a.free)),
                labels: a.labels.into_iter().collect(),
                job_types: a
                    .job_types
                    .into_iter()
                    .map(|t| pb::AdvertisedJobType {
                        name: t.name,
                        inputs: t.inputs,
                        price: (!t.price.is_zero()).then(|| price_to_pb(&t.price)),
                        max_seconds: t.max_seconds,
                    })
                    .collect(),
                cwl_tools: a.cwl_tools,
                serves: a.serves,
            }),
        }
    }
}

impl TryFrom<Payload> for Msg {
    type Error = Malformed;

    fn try_from(p: Payload) -> Result<Self, Malformed> {
        Ok(match p {
            Payload::JobFulfillmentRequest(r) => {
                const M: &str = "JobFulfillmentRequest";
                Msg::Request(JobRequest {
                    request_id: uuid(M, "request_id", &r.request_id)?,
                    job_type: r.job_type,
                    parameter_keys: r.parameter_keys,
                    output_keys: r.output_keys,
                    job_kvs: r.job_kvs.into_iter().collect(),
                    expires_at_ms: ms(&r.expires_at),
                    manager_endpoint: r.manager_endpoint,
                    publish_count: r.publish_count,
                    workflow_id: match r.workflow_id.as_str() {
                        "" => None,
                        w => Some(uuid(M, "workflow_id", w)?),
                    },
                    needs: Needs {
                        resources: resources_from_pb(r.needs),
                        labels: r.labels.into_iter().collect(),
                        max_price_milli: r.max_charge_milli,
                    },
                    priority: r.priority,
                })
            }
            Payload::JobFulfillmentOffer(o) => {
                const M: &str = "JobFulfillmentOffer";
                Msg::Offer {
                    offer_id: uuid(M, "offer_id", &o.offer_id)?,
                    request_id: uuid(M, "request_id", &o.request_id)?,
                    expires_at_ms: ms(&o.expires_at),
                    load: caroni_types::msg::Load {
                        slots: o.slots,
                        free_slots: o.free_slots,
                        queue_length: o.queue_length,
                    },
                    price: price_from_pb(o.price),
                    max_charge_milli: o.max_charge_milli,
                }
            }
            Payload::JobFulfillmentDecline(d) => Msg::Decline {
                request_id: uuid("JobFulfillmentDecline", "request_id", &d.request_id)?,
                reason: d.reason,
            },
            Payload::JobFulfillmentOfferAccept(a) => {
                const M: &str = "JobFulfillmentOfferAccept";
                Msg::Accept {
                    offer_id: uuid(M, "offer_id", &a.offer_id)?,
                    request_id: uuid(M, "request_id", &a.request_id)?,
                    job_id: uuid(M, "job_id", &a.job_id)?,
                }
            }
            Payload::JobFulfillmentOfferReject(r) => {
                const M: &str = "JobFulfillmentOfferReject";
                Msg::Reject {
                    offer_id: uuid(M, "offer_id", &r.offer_id)?,
                    request_id: uuid(M, "request_id", &r.request_id)?,
                }
            }
            Payload::JobAccepted(a) => Msg::Accepted {
                job_id: uuid("JobAccepted", "job_id", &a.job_id)?,
                offer_id: uuid("JobAccepted", "offer_id", &a.offer_id)?,
            },
            Payload::JobStatusRequest(r) => Msg::StatusRequest {
                job_id: uuid("JobStatusRequest", "job_id", &r.job_id)?,
            },
            Payload::JobStatusUpdate(s) => {
                const M: &str = "JobStatusUpdate";
                let state = job_state_from_pb(s.state).ok_or_else(|| Malformed {
                    message: M,
                    problem: format!("unknown job state {}", s.state),
                })?;
                Msg::Status(StatusUpdate {
                    job_id: uuid(M, "job_id", &s.job_id)?,
                    state,
                    message: s.message,
                    exit_status: s.exit_status,
                    stderr_tail: s.stderr_tail,
                    sequence: s.sequence,
                    executor: s.executor,
                    external_id: s.external_id,
                    queued_at_ms: Some(s.queued_at_ms).filter(|t| *t > 0),
                    started_at_ms: Some(s.started_at_ms).filter(|t| *t > 0),
                    ended_at_ms: Some(s.ended_at_ms).filter(|t| *t > 0),
                    failure: s.failure.chars().take(32).collect(),
                    receipt: s.receipt.map(receipt_from_pb).transpose()?.map(Box::new),
                })
            }
            Payload::JobDataAvailable(d) => Msg::Data {
                job_id: uuid("JobDataAvailable", "job_id", &d.job_id)?,
                items: d.items.into_iter().map(|i| (i.name, i.value)).collect(),
                outputs: d.outputs,
            },
            Payload::JobKill(k) => Msg::Kill {
                job_id: uuid("JobKill", "job_id", &k.job_id)?,
                reason: k.reason,
            },
            Payload::ReceiptVerdicts(v) => Msg::Verdicts(
                v.verdicts
                    .into_iter()
                    .map(|v| {
                        Ok(Verdict {
                            job_id: uuid("ReceiptVerdict", "job_id", &v.job_id)?,
                            agreed: v.agreed,
                            reason: v.reason.chars().take(MAX_REASON).collect(),
                            signature: v.signature,
                        })
                    })
                    .collect::<Result<_, Malformed>>()?,
            ),
            Payload::AgentAdvert(a) => Msg::Advert(Advert {
                seq: a.seq,
                expires_at_ms: ms(&a.expires_at),
                load: Load {
                    slots: a.slots,
                    free_slots: a.free_slots,
                    queue_length: a.queue_length,
                },
                total: resources_from_pb(a.total),
                free: resources_from_pb(a.free),
                labels: a.labels.into_iter().collect(),
                job_types: a
                    .job_types
                    .into_iter()
                    .map(|t| AdvertisedType {
                        name: t.name,
                        inputs: t.inputs,
                        price: price_from_pb(t.price),
                        max_seconds: t.max_seconds,
                    })
                    .collect(),
                cwl_tools: a.cwl_tools,
                serves: a.serves,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn every_message_round_trips() {
        let id = Uuid::new_v4;
        let msgs = vec![
            Msg::Request(JobRequest {
                request_id: id(),
                job_type: "foojob0".into(),
                parameter_keys: vec!["message".into()],
                output_keys: vec!["jobout".into()],
                job_kvs: BTreeMap::from([("k".into(), "v".into())]),
                expires_at_ms: 1_700_000_000_123,
                manager_endpoint: "http://m:1".into(),
                publish_count: 2,
                workflow_id: Some(id()),
                needs: Needs {
                    resources: Resources {
                        cpu_milli: 1500,
                        memory_mib: 512,
                        gpus: 1,
                        disk_mib: 9,
                    },
                    labels: BTreeMap::from([("region".into(), "eu".into())]),
                    max_price_milli: Some(2500),
                },
                priority: 0,
            }),
            Msg::Advert(Advert {
                seq: 7,
                expires_at_ms: 1_700_000_000_000,
                load: Load {
                    slots: 4,
                    free_slots: 1,
                    queue_length: 3,
                },
                total: Resources {
                    cpu_milli: 4000,
                    memory_mib: 8192,
                    gpus: 2,
                    disk_mib: 100,
                },
                free: Resources::default(),
                labels: BTreeMap::from([("gpu".into(), "a100".into())]),
                job_types: vec![AdvertisedType {
                    name: "wc".into(),
                    inputs: vec!["a".into()],
                    price: Price {
                        fixed_milli: 1,
                        per_second_milli: 2,
                    },
                    max_seconds: 60,
                }],
                cwl_tools: true,
                serves: vec!["m1".into()],
            }),
            Msg::Offer {
                offer_id: id(),
                request_id: id(),
                expires_at_ms: 5_000,
                load: caroni_types::msg::Load {
                    slots: 2,
                    free_slots: 1,
                    queue_length: 7,
                },
                price: Price {
                    fixed_milli: 500,
                    per_second_milli: 10,
                },
                max_charge_milli: 1100,
            },
            Msg::Decline {
                request_id: id(),
                reason: "no".into(),
            },
            Msg::Accept {
                offer_id: id(),
                request_id: id(),
                job_id: id(),
            },
            Msg::Reject {
                offer_id: id(),
                request_id: id(),
            },
            Msg::Accepted {
                job_id: id(),
                offer_id: id(),
            },
            Msg::StatusRequest { job_id: id() },
            Msg::Status(StatusUpdate {
                job_id: id(),
                state: JobState::Failed,
                message: "exit status 1".into(),
                exit_status: Some(1),
                stderr_tail: "oops".into(),
                sequence: 4,
                executor: String::new(),
                external_id: String::new(),
                queued_at_ms: Some(5),
                started_at_ms: Some(6),
                ended_at_ms: Some(7),
                failure: "exit_status".into(),
                receipt: Some(Box::new(SignedReceipt {
                    receipt: Receipt {
                        job_id: id(),
                        workflow_id: Some(id()),
                        manager: "m".into(),
                        agent: "a".into(),
                        job_type: "t".into(),
                        state: JobState::Failed,
                        inputs_sha256: "00".into(),
                        outputs_sha256: "11".into(),
                        wall_ms: 1200,
                        cpu_ms: Some(40),
                        price: Price {
                            fixed_milli: 1,
                            per_second_milli: 2,
                        },
                        max_charge_milli: 600,
                        charge_milli: 5,
                        ended_at_ms: 7,
                    },
                    signature: vec![1, 2, 3],
                })),
            }),
            Msg::Verdicts(vec![Verdict {
                job_id: id(),
                agreed: false,
                reason: "too dear".into(),
                signature: vec![9],
            }]),
            Msg::Data {
                job_id: id(),
                items: BTreeMap::from([("a".into(), "b".into())]),
                outputs: true,
            },
            Msg::Kill {
                job_id: id(),
                reason: "cancelled".into(),
            },
        ];
        for m in msgs {
            let back = Msg::try_from(Payload::from(m.clone())).expect("decode");
            assert_eq!(back, m);
        }
    }

    #[test]
    fn bad_ids_are_named() {
        let e = Msg::try_from(Payload::JobKill(pb::JobKill {
            job_id: "nope".into(),
            reason: String::new(),
        }))
        .expect_err("bad");
        assert_eq!(
            e.to_string(),
            "malformed JobKill: job_id `nope` is not a UUID"
        );
    }
}
