//! Receipts and the ledger (docs/market.md, "Receipts and the ledger").
//!
//! When a job that ran ends, its agent signs a [`Receipt`]: the job, its
//! workflow, hashes of its inputs and outputs, its measured wall and CPU
//! time, and the price charged. The receipt travels with the job's final
//! status; the manager checks it against its own record of the job and
//! answers with a signed [`Verdict`]: countersigned, or disputed with a
//! reason. Each node appends both to its own hash-chained ledger
//! ([`Entry`]), one chain per role.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::market::Price;
use crate::msg::JobState;

/// What a receipt's signature covers first: a signature made for another
/// purpose (a message, a blob read) can never pass for a receipt's.
const RECEIPT_PURPOSE: &str = "caroni receipt v1";
/// The same for a manager's verdict on a receipt.
const VERDICT_PURPOSE: &str = "caroni receipt verdict v1";
/// Longest dispute reason kept.
pub const MAX_REASON: usize = 512;

/// What an agent says a job cost, signed by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: Uuid,
    /// Its workflow, as its manager said.
    pub workflow_id: Option<Uuid>,
    /// The manager that placed it (node id).
    pub manager: String,
    /// The agent that ran it (node id).
    pub agent: String,
    /// Its job type.
    pub job_type: String,
    /// How it ended: completed, failed or cancelled.
    pub state: JobState,
    /// SHA-256 of its inputs as received ([`values_sha256`]).
    pub inputs_sha256: String,
    /// SHA-256 of its outputs as sent (empty map when it failed).
    pub outputs_sha256: String,
    /// Run time by the agent's clock, start to end (ms).
    pub wall_ms: u64,
    /// CPU time of its processes (user + system, ms), when the executor
    /// measures it (bash does; Docker, Slurm and CWL tools do not).
    pub cpu_ms: Option<u64>,
    /// The price its offer named.
    pub price: Price,
    /// The most it could cost (the offer's maximum).
    pub max_charge_milli: u64,
    /// What it costs: [`Price::charge`] of `wall_ms`, at most the maximum.
    pub charge_milli: u64,
    /// When it ended, by the agent's clock (ms since the epoch).
    pub ended_at_ms: u64,
}

impl Receipt {
    /// The bytes the agent signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        // serde_json of a struct with fields in declared order and no maps
        // is deterministic.
        serde_json::to_vec(&(RECEIPT_PURPOSE, self)).unwrap_or_default()
    }

    /// Checks the fields a peer sent: sizes, a final state, a charge within
    /// its own maximum.
    pub fn check(&self) -> Result<(), String> {
        if !self.state.is_final() {
            return Err(format!(
                "a receipt for a job that is {}",
                self.state.as_str()
            ));
        }
        let long = |s: &str| s.len() > 256;
        if long(&self.manager) || long(&self.agent) || long(&self.job_type) {
            return Err("a receipt with a name over 256 bytes".into());
        }
        if long(&self.inputs_sha256) || long(&self.outputs_sha256) {
            return Err("a receipt with a hash over 256 bytes".into());
        }
        if self.charge_milli > self.max_charge_milli {
            return Err(format!(
                "a receipt that charges {} credits, over its own maximum {}",
                crate::market::credits(self.charge_milli),
                crate::market::credits(self.max_charge_milli)
            ));
        }
        Ok(())
    }
}

/// A receipt with its agent's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// The agent's signature of [`Receipt::signed_bytes`] (empty until the
    /// agent's service signs it).
    pub signature: Vec<u8>,
}

/// A manager's answer to a receipt, signed by the manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The job the receipt is for.
    pub job_id: Uuid,
    /// True: countersigned; false: disputed.
    pub agreed: bool,
    /// Why it was disputed (empty when agreed).
    pub reason: String,
    /// The manager's signature of [`Verdict::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Verdict {
    /// The bytes the manager signs: the verdict over the receipt and the
    /// agent's signature of it.
    pub fn signed_bytes(&self, receipt: &SignedReceipt) -> Vec<u8> {
        serde_json::to_vec(&(
            VERDICT_PURPOSE,
            &receipt.receipt,
            &receipt.signature,
            self.agreed,
            &self.reason,
        ))
        .unwrap_or_default()
    }
}

/// SHA-256 (hex) of a job's named values (inputs or outputs), as they
/// travel: both sides compute it the same way.
pub fn values_sha256(values: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in values {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    crate::file::hex(&h.finalize())
}

/// Whose chain an entry is on: a node that is both manager and agent keeps
/// two chains, each written by one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Receipts this node issued for jobs it ran.
    Agent,
    /// Receipts this node received for jobs it placed.
    Manager,
}

impl Role {
    /// Its key byte.
    pub fn byte(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Manager => 2,
        }
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Manager => "manager",
        }
    }
}

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A receipt issued (agent) or received (manager).
    Receipt(SignedReceipt),
    /// The manager's verdict on the receipt for a job.
    Verdict(Verdict),
}

/// One entry of a ledger: append-only, each naming the hash of the one
/// before, so that an entry changed or removed breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in its chain, from 1.
    pub seq: u64,
    /// The chain.
    pub role: Role,
    /// When it was appended (ms since the epoch, this node's clock).
    pub at_ms: u64,
    /// The other side (the manager on an agent's chain, the agent on a
    /// manager's).
    pub peer: String,
    /// What it records.
    pub record: Record,
    /// The hash of the entry before (empty for the first).
    pub prev: String,
    /// This entry's hash: [`Entry::compute_hash`].
    pub hash: String,
}

impl Entry {
    /// SHA-256 (hex) of the entry's content and the hash before it.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::to_vec(&(
            self.seq,
            self.role,
            self.at_ms,
            &self.peer,
            &self.record,
            &self.prev,
        ))
        .unwrap_or_default();
        let mut h = Sha256::new();
        h.update(&body);
        crate::file::hex(&h.finalize())
    }

    /// The job the entry is about.
    pub fn job_id(&self) -> Uuid {
        match &self.record {
            Record::Receipt(r) => r.receipt.job_id,
            Record::Verdict(v) => v.job_id,
        }
    }
}

/// Where a receipt stands, on either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// Issued or received, no verdict yet.
    Open,
    /// Countersigned by the manager.
    Agreed,
    /// Disputed by the manager.
    Disputed,
}

/// A job's receipt as indexed beside the chain (one per job and role).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReceipt {
    /// The receipt's entry.
    pub seq: u64,
    /// The other side.
    pub peer: String,
    /// What it charges.
    pub charge_milli: u64,
    /// Where it stands.
    pub standing: Standing,
    /// When the receipt was appended.
    pub at_ms: u64,
}

/// What one peer and this node owe each other, from one chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// The peer.
    pub peer: String,
    /// Receipts countersigned, and their sum.
    pub agreed: u64,
    /// Sum of countersigned charges (thousandths of a credit).
    pub agreed_milli: u64,
    /// Receipts disputed.
    pub disputed: u64,
    /// Sum of disputed charges.
    pub disputed_milli: u64,
    /// Receipts without a verdict yet.
    pub open: u64,
    /// Sum of their charges.
    pub open_milli: u64,
}

impl Balance {
    /// Counts one receipt.
    pub fn add(&mut self, standing: Standing, charge_milli: u64) {
        let (n, sum) = match standing {
            Standing::Open => (&mut self.open, &mut self.open_milli),
            Standing::Agreed => (&mut self.agreed, &mut self.agreed_milli),
            Standing::Disputed => (&mut self.disputed, &mut self.disputed_milli),
        };
        *n += 1;
        *sum = sum.saturating_add(charge_milli);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            job_id: Uuid::from_u128(1),
            workflow_id: Some(Uuid::from_u128(2)),
            manager: "m".into(),
            agent: "a".into(),
            job_type: "echo".into(),
            state: JobState::Completed,
            inputs_sha256: values_sha256(&BTreeMap::new()),
            outputs_sha256: values_sha256(&BTreeMap::from([("out".into(), "x".into())])),
            wall_ms: 1500,
            cpu_ms: Some(3),
            price: Price {
                fixed_milli: 100,
                per_second_milli: 10,
            },
            max_charge_milli: 3100,
            charge_milli: 120,
            ended_at_ms: 9,
        }
    }

    #[test]
    fn signed_bytes_name_their_purpose_and_change_with_any_field() {
        let r = receipt();
        let mut other = r.clone();
        other.charge_milli += 1;
        assert_ne!(r.signed_bytes(), other.signed_bytes());
        let v = Verdict {
            job_id: r.job_id,
            agreed: true,
            reason: String::new(),
            signature: Vec::new(),
        };
        let s = SignedReceipt {
            receipt: r.clone(),
            signature: vec![1],
        };
        assert_ne!(v.signed_bytes(&s), r.signed_bytes());
        let disputed = Verdict {
            agreed: false,
            ..v.clone()
        };
        assert_ne!(v.signed_bytes(&s), disputed.signed_bytes(&s));
    }

    #[test]
    fn values_hash_separates_names_from_values() {
        let a = BTreeMap::from([("ab".to_string(), "c".to_string())]);
        let b = BTreeMap::from([("a".to_string(), "bc".to_string())]);
        assert_ne!(values_sha256(&a), values_sha256(&b));
        assert_eq!(values_sha256(&a).len(), 64);
    }

    #[test]
    fn a_receipt_over_its_maximum_or_not_final_is_refused() {
        let mut r = receipt();
        assert!(r.check().is_ok());
        r.charge_milli = 5000;
        assert!(r
            .check()
            .expect_err("over")
            .contains("over its own maximum"));
        let mut r = receipt();
        r.state = JobState::Running;
        assert!(r.check().is_err());
    }

    #[test]
    fn an_entry_hash_covers_the_hash_before() {
        let e = Entry {
            seq: 1,
            role: Role::Agent,
            at_ms: 5,
            peer: "m".into(),
            record: Record::Receipt(SignedReceipt {
                receipt: receipt(),
                signature: vec![7],
            }),
            prev: String::new(),
            hash: String::new(),
        };
        let mut f = e.clone();
        f.prev = "00".into();
        assert_ne!(e.compute_hash(), f.compute_hash());
    }
}
