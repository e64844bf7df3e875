//! The protocol in domain form: what the engines read and write. The node
//! converts these to and from the wire types of `caroni-proto` at the edge.

use std::collections::BTreeMap;

use crate::delivery::Refusal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// State of a job, the same on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted; waits for inputs.
    Pending,
    /// Inputs complete; waits for a slot.
    Queued,
    /// Running.
    Running,
    /// Finished with outputs.
    Completed,
    /// Failed.
    Failed,
    /// Stopped by its manager (the workflow was cancelled or ended, or
    /// the job was replaced): not a failure.
    Cancelled,
}

impl JobState {
    /// Completed, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job fulfillment request (gossip).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Request id.
    pub request_id: Uuid,
    /// Job type wanted.
    pub job_type: String,
    /// Input names.
    pub parameter_keys: Vec<String>,
    /// Output names expected.
    pub output_keys: Vec<String>,
    /// Static parameters.
    pub job_kvs: BTreeMap<String, String>,
    /// Void after this instant (ms since epoch).
    pub expires_at_ms: u64,
    /// The manager's peer endpoint.
    pub manager_endpoint: String,
    /// 1 for the first publication.
    pub publish_count: u32,
    /// The workflow the job is for, when the manager says.
    pub workflow_id: Option<Uuid>,
    /// Resources and labels the step needs.
    #[serde(default)]
    pub needs: crate::market::Needs,
    /// The workflow's priority (higher first): orders this manager's own
    /// queued jobs on an agent.
    #[serde(default)]
    pub priority: i32,
}

/// Most names or parameters in one request.
const MAX_REQUEST_FIELDS: usize = 256;
/// Most bytes of a request's static parameters.
const MAX_REQUEST_KV_BYTES: usize = 64 * 1024;
/// Furthest a request may expire in the future.
const MAX_REQUEST_LIFETIME_MS: u64 = 30 * 24 * 3600 * 1000;

impl JobRequest {
    /// Checks what no honest manager would send: names that cannot be job
    /// types or inputs, absurd sizes, an expiry in the past or beyond 30
    /// days, a reply endpoint that is not an http(s) URL of sane length. An
    /// agent drops such a request without answering.
    pub fn check(&self, now_ms: u64) -> Result<(), Refusal> {
        if self.job_type != crate::CWL_TOOL_JOB_TYPE {
            crate::validate_env_name(&self.job_type)
                .map_err(|e| Refusal(format!("job type {e}")))?;
        }
        for (kind, names) in [
            ("input", &self.parameter_keys),
            ("output", &self.output_keys),
        ] {
            if names.len() > MAX_REQUEST_FIELDS {
                return Err(Refusal(format!(
                    "{} {kind} names (at most {MAX_REQUEST_FIELDS})",
                    names.len()
                )));
            }
            for n in names {
                if self.job_type == crate::CWL_TOOL_JOB_TYPE {
                    crate::validate_cwl_name(n)
                } else {
                    crate::validate_env_name(n)
                }
                .map_err(|e| Refusal(format!("{kind} {e}")))?;
            }
        }
        let kv_bytes: usize = self.job_kvs.iter().map(|(k, v)| k.len() + v.len()).sum();
        if self.job_kvs.len() > MAX_REQUEST_FIELDS || kv_bytes > MAX_REQUEST_KV_BYTES {
            return Err(Refusal(format!(
                "{} static parameters of {kv_bytes} bytes (at most {MAX_REQUEST_FIELDS} and {MAX_REQUEST_KV_BYTES})",
                self.job_kvs.len()
            )));
        }
        let e = &self.manager_endpoint;
        if e.len() > 256 || !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(Refusal(
                "the manager endpoint is not an http(s) URL of at most 256 bytes".into(),
            ));
        }
        if self.needs.labels.len() > MAX_REQUEST_FIELDS {
            return Err(Refusal(format!(
                "{} labels wanted (at most {MAX_REQUEST_FIELDS})",
                self.needs.labels.len()
            )));
        }
        for (k, v) in &self.needs.labels {
            crate::market::check_label(k, v).map_err(Refusal)?;
        }
        if self.expires_at_ms <= now_ms {
            return Err(Refusal("it has expired".into()));
        }
        if self.expires_at_ms - now_ms > MAX_REQUEST_LIFETIME_MS {
            return Err(Refusal("it expires more than 30 days from now".into()));
        }
        Ok(())
    }
}

/// How busy an agent is, as it says in its offers; the manager takes the
/// offer of the least busy agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Jobs it runs at once.
    pub slots: u32,
    /// Slots not running a job.
    pub free_slots: u32,
    /// Jobs it holds that are not running (waiting for inputs or a slot).
    pub queue_length: u32,
}

impl Load {
    /// Jobs per slot, counting `known` jobs when that is more than the
    /// agent said (its offer may be older than the jobs it was given
    /// since). Lower is better.
    pub fn per_slot(&self, known: u32) -> f64 {
        // Checked arithmetic: the fields come from a peer.
        let busy = self
            .slots
            .saturating_sub(self.free_slots)
            .saturating_add(self.queue_length)
            .max(known);
        f64::from(busy) / f64::from(self.slots.max(1))
    }
}

#[cfg(test)]
mod load_tests {
    use super::Load;

    #[test]
    fn extreme_loads_from_peers_do_not_overflow() {
        let l = Load {
            slots: 1,
            free_slots: 0,
            queue_length: u32::MAX,
        };
        assert_eq!(l.per_slot(0), f64::from(u32::MAX));
        let idle = Load {
            slots: 0,
            free_slots: 9,
            queue_length: 0,
        };
        assert_eq!(idle.per_slot(0), 0.0);
        assert_eq!(idle.per_slot(2), 2.0);
    }
}

/// A job status report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The job.
    pub job_id: Uuid,
    /// Its state.
    pub state: JobState,
    /// Why it failed, if it did.
    pub message: String,
    /// Exit status of the process, if it exited.
    pub exit_status: Option<i32>,
    /// Tail of stderr.
    pub stderr_tail: String,
    /// Per-job counter; older updates are ignored.
    pub sequence: u64,
    /// The executor that runs the job (bash, docker, slurm); empty when
    /// the agent does not say.
    #[serde(default)]
    pub executor: String,
    /// The container's name or the Slurm job id, once known.
    #[serde(default)]
    pub external_id: String,
    /// When the job had every input and waited for a slot, by the agent's
    /// clock (ms since the epoch).
    #[serde(default)]
    pub queued_at_ms: Option<u64>,
    /// When its process started, by the agent's clock.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// When it ended, by the agent's clock.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// The kind of failure (`exit_status`, `output`, `timeout`, `killed`,
    /// `other`); empty unless it failed.
    #[serde(default)]
    pub failure: String,
    /// On a final status of a job that ran: the agent's signed receipt.
    #[serde(default)]
    pub receipt: Option<Box<crate::ledger::SignedReceipt>>,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// JobFulfillmentRequest.
    Request(JobRequest),
    /// JobFulfillmentOffer.
    Offer {
        /// Offer id.
        offer_id: Uuid,
        /// Request answered.
        request_id: Uuid,
        /// Void after (ms since epoch).
        expires_at_ms: u64,
        /// How busy the agent was when it offered.
        load: Load,
        /// What the job costs (signed with the offer).
        price: crate::market::Price,
        /// The most it can cost (its price at its timeout).
        max_charge_milli: u64,
    },
    /// JobFulfillmentDecline.
    Decline {
        /// Request answered.
        request_id: Uuid,
        /// Why.
        reason: String,
    },
    /// JobFulfillmentOfferAccept.
    Accept {
        /// Offer taken.
        offer_id: Uuid,
        /// Its request.
        request_id: Uuid,
        /// The job's id.
        job_id: Uuid,
    },
    /// JobFulfillmentOfferReject.
    Reject {
        /// Offer declined.
        offer_id: Uuid,
        /// Its request.
        request_id: Uuid,
    },
    /// JobAccepted.
    Accepted {
        /// The job.
        job_id: Uuid,
        /// Its offer.
        offer_id: Uuid,
    },
    /// JobStatusRequest.
    StatusRequest {
        /// The job.
        job_id: Uuid,
    },
    /// JobStatusUpdate.
    Status(StatusUpdate),
    /// JobDataAvailable.
    Data {
        /// The job.
        job_id: Uuid,
        /// Name → value.
        items: BTreeMap<String, String>,
        /// True for a job's outputs (agent → manager), false for its
        /// inputs (manager → agent).
        outputs: bool,
    },
    /// JobKill.
    Kill {
        /// The job.
        job_id: Uuid,
        /// Why.
        reason: String,
    },
    /// AgentAdvert (gossip): what an agent serves and has.
    Advert(crate::market::Advert),
    /// ReceiptVerdicts: a manager countersigns or disputes receipts.
    Verdicts(Vec<crate::ledger::Verdict>),
}

impl Msg {
    /// The protocol name, for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Request(_) => "JobFulfillmentRequest",
            Msg::Offer { .. } => "JobFulfillmentOffer",
            Msg::Decline { .. } => "JobFulfillmentDecline",
            Msg::Accept { .. } => "JobFulfillmentOfferAccept",
            Msg::Reject { .. } => "JobFulfillmentOfferReject",
            Msg::Accepted { .. } => "JobAccepted",
            Msg::StatusRequest { .. } => "JobStatusRequest",
            Msg::Status(_) => "JobStatusUpdate",
            Msg::Data { .. } => "JobDataAvailable",
            Msg::Kill { .. } => "JobKill",
            Msg::Advert(_) => "AgentAdvert",
            Msg::Verdicts(_) => "ReceiptVerdicts",
        }
    }

    /// True for messages an agent handles; false for a manager's.
    pub fn for_agent(&self) -> bool {
        matches!(
            self,
            Msg::Request(_)
                | Msg::Accept { .. }
                | Msg::Reject { .. }
                | Msg::StatusRequest { .. }
                | Msg::Kill { .. }
                | Msg::Data { outputs: false, .. }
                | Msg::Verdicts(_)
        )
    }
}

/// A verified inbound message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// Message id (applied at most once).
    pub id: Uuid,
    /// Sender node id.
    pub from: String,
    /// Sender's peer endpoint.
    pub endpoint: String,
    /// The workflow the sender says it is about (logs only).
    pub trace: Option<Uuid>,
    /// The message.
    pub msg: Msg,
    /// Set by the receiving node, never by the sender: why the files a data
    /// message names cannot be fetched for good (a wrong hash, more bytes
    /// than declared, a holder that says it has no such file). The engine
    /// fails the job with this reason instead of waiting for data that
    /// will never arrive.
    pub unfetched: Option<String>,
}

/// A workflow id for a log field: the UUID, or nothing when there is none.
#[derive(Clone, Copy, Debug)]
pub struct Trace(pub Option<Uuid>);

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => Ok(()),
        }
    }
}

impl Inbound {
    /// A span for handling this message (and a `received` event in it): its kind, its sender and the
    /// workflow it is about (the envelope's trace), so that what the
    /// receiver logs meanwhile can be followed across nodes. Target
    /// `caroni::message`, level DEBUG (`RUST_LOG=caroni=debug`).
    pub fn span(&self) -> tracing::Span {
        let span = tracing::debug_span!(
            target: "caroni::message",
            "message",
            kind = self.msg.name(),
            from = %self.from,
            workflow = tracing::field::Empty
        );
        if let Some(t) = self.trace {
            span.record("workflow", tracing::field::display(t));
        }
        span.in_scope(|| tracing::debug!(target: "caroni::message", id = %self.id, "received"));
        span
    }
}

/// A message to send directly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    /// Destination node id.
    pub to: String,
    /// Destination endpoint.
    pub endpoint: String,
    /// The message.
    pub msg: Msg,
}
