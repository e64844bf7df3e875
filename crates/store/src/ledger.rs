//! The ledger's tables: each node's receipts and verdicts in append-only,
//! hash-chained entries, one chain per role, and an index of each job's
//! receipt with where it stands (docs/market.md). An engine appends
//! through an [`Appender`] into the same batch as the state change that
//! caused the entry, so that an entry is written exactly when its cause
//! is; nothing here ever rewrites or deletes an entry.

use std::collections::{BTreeMap, HashMap};

use caroni_types::ledger::{Balance, Entry, JobReceipt, Record, Role, Standing};
use uuid::Uuid;

use crate::keys::Key;
use crate::{tables, Batch, Result, Store, Table};

/// The entries.
pub const LEDGER: Table<Entry> = Table::new(tables::LEDGER, "ledger");
/// Each job's receipt, by role and job.
pub const LEDGER_JOBS: Table<JobReceipt> = Table::new(tables::LEDGER_JOBS, "ledger jobs");

/// The key of entry `seq` of a chain.
pub fn entry_key(role: Role, seq: u64) -> Vec<u8> {
    Key::new().u64(u64::from(role.byte())).u64(seq).finish()
}

fn job_key(role: Role, job: &Uuid) -> Vec<u8> {
    Key::new().u64(u64::from(role.byte())).uuid(job).finish()
}

/// Appends to one chain within a batch: it reads the chain's last entry
/// when made and keeps what the batch appended, so that several entries
/// of one batch chain correctly. Made afresh for every batch (one engine
/// writes each chain, one batch at a time).
#[derive(Debug)]
pub struct Appender {
    role: Role,
    seq: u64,
    hash: String,
    jobs: HashMap<Uuid, JobReceipt>,
}

impl Appender {
    /// Starts after the chain's last entry.
    pub fn open(store: &Store, role: Role) -> Result<Self> {
        let last = last_entry(store, role)?;
        Ok(Self {
            role,
            seq: last.as_ref().map_or(0, |e| e.seq),
            hash: last.map(|e| e.hash).unwrap_or_default(),
            jobs: HashMap::new(),
        })
    }

    /// The receipt of `job` on this chain, as written or appended in this
    /// batch.
    pub fn job(&self, store: &Store, job: &Uuid) -> Result<Option<JobReceipt>> {
        if let Some(j) = self.jobs.get(job) {
            return Ok(Some(j.clone()));
        }
        store.get(LEDGER_JOBS, &job_key(self.role, job))
    }

    /// Appends an entry to `batch` and updates the job's index: a receipt
    /// opens it, a verdict settles it. Returns the entry.
    pub fn append(
        &mut self,
        batch: &mut Batch,
        peer: &str,
        record: Record,
        charge_milli: u64,
        now_ms: u64,
        prior: Option<JobReceipt>,
    ) -> Entry {
        let mut e = Entry {
            seq: self.seq + 1,
            role: self.role,
            at_ms: now_ms,
            peer: peer.to_string(),
            record,
            prev: std::mem::take(&mut self.hash),
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        self.seq = e.seq;
        self.hash = e.hash.clone();
        batch.put(LEDGER, &entry_key(self.role, e.seq), &e);
        let job = e.job_id();
        let index = match &e.record {
            Record::Receipt(_) => JobReceipt {
                seq: e.seq,
                peer: peer.to_string(),
                charge_milli,
                standing: Standing::Open,
                at_ms: now_ms,
            },
            Record::Verdict(v) => {
                let mut j = prior.unwrap_or(JobReceipt {
                    seq: e.seq,
                    peer: peer.to_string(),
                    charge_milli,
                    standing: Standing::Open,
                    at_ms: now_ms,
                });
                j.standing = if v.agreed {
                    Standing::Agreed
                } else {
                    Standing::Disputed
                };
                j
            }
        };
        batch.put(LEDGER_JOBS, &job_key(self.role, &job), &index);
        self.jobs.insert(job, index);
        e
    }
}

/// The last entry of a chain.
pub fn last_entry(store: &Store, role: Role) -> Result<Option<Entry>> {
    let end = Key::new().u64(u64::from(role.byte()) + 1).finish();
    Ok(store
        .scan_back(LEDGER, Some(&end), 1)?
        .into_iter()
        .map(|(_, e)| e)
        .find(|e| e.role == role))
}

/// Entries of a chain with a sequence below `before` (all when `None`),
/// newest first, at most `limit`.
pub fn entries(store: &Store, role: Role, before: Option<u64>, limit: usize) -> Result<Vec<Entry>> {
    let end = match before {
        Some(s) => entry_key(role, s),
        None => Key::new().u64(u64::from(role.byte()) + 1).finish(),
    };
    Ok(store
        .scan_back(LEDGER, Some(&end), limit)?
        .into_iter()
        .map(|(_, e)| e)
        .take_while(|e| e.role == role)
        .collect())
}

/// Walks a chain from its first entry: `Ok(n)` when all `n` entries hold
/// their place and hash, else where it breaks.
pub fn verify(store: &Store, role: Role) -> Result<std::result::Result<u64, String>> {
    let prefix = Key::new().u64(u64::from(role.byte())).finish();
    let mut prev = String::new();
    let mut n = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan_after(LEDGER, &prefix, after.as_deref(), 1024)?;
        let Some((last_key, _)) = page.last() else {
            return Ok(Ok(n));
        };
        let next_after = last_key.clone();
        for (_, e) in page {
            n += 1;
            if e.seq != n {
                return Ok(Err(format!("entry {n} holds sequence {}", e.seq)));
            }
            if e.prev != prev {
                return Ok(Err(format!(
                    "entry {n} does not name the hash of entry {}",
                    n - 1
                )));
            }
            if e.compute_hash() != e.hash {
                return Ok(Err(format!("entry {n} does not match its hash")));
            }
            prev = e.hash;
        }
        after = Some(next_after);
    }
}

/// Every job's receipt on a chain: (job, receipt).
pub fn jobs(store: &Store, role: Role) -> Result<Vec<(Uuid, JobReceipt)>> {
    let prefix = Key::new().u64(u64::from(role.byte())).finish();
    Ok(store
        .scan(LEDGER_JOBS, &prefix)?
        .into_iter()
        .filter_map(|(k, j)| {
            let mut r = crate::keys::Reader::new(&k);
            r.u64()?;
            Some((r.uuid()?, j))
        })
        .collect())
}

/// What each peer and this node owe each other on a chain, by peer.
pub fn balances(store: &Store, role: Role) -> Result<Vec<Balance>> {
    let mut by: BTreeMap<String, Balance> = BTreeMap::new();
    for (_, j) in jobs(store, role)? {
        by.entry(j.peer.clone())
            .or_insert_with(|| Balance {
                peer: j.peer.clone(),
                ..Balance::default()
            })
            .add(j.standing, j.charge_milli);
    }
    Ok(by.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caroni_types::ledger::{Receipt, SignedReceipt, Verdict};
    use caroni_types::msg::JobState;

    fn receipt(job: u128, charge: u64) -> Record {
        Record::Receipt(SignedReceipt {
            receipt: Receipt {
                job_id: Uuid::from_u128(job),
                workflow_id: None,
                manager: "m".into(),
                agent: "a".into(),
                job_type: "t".into(),
                state: JobState::Completed,
                inputs_sha256: String::new(),
                outputs_sha256: String::new(),
                wall_ms: 10,
                cpu_ms: None,
                price: Default::default(),
                max_charge_milli: charge,
                charge_milli: charge,
                ended_at_ms: 1,
            },
            signature: vec![1],
        })
    }

    fn verdict(job: u128, agreed: bool) -> Record {
        Record::Verdict(Verdict {
            job_id: Uuid::from_u128(job),
            agreed,
            reason: if agreed { String::new() } else { "no".into() },
            signature: vec![2],
        })
    }

    #[test]
    fn entries_chain_across_batches_and_balances_follow_verdicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut b = Batch::default();
        let mut chain = Appender::open(&store, Role::Agent).expect("open chain");
        chain.append(&mut b, "m", receipt(1, 500), 500, 10, None);
        chain.append(&mut b, "m", receipt(2, 300), 300, 11, None);
        let prior = chain.job(&store, &Uuid::from_u128(1)).expect("read");
        chain.append(&mut b, "m", verdict(1, true), 500, 12, prior);
        store.write(b).expect("write");
        // A second batch continues the chain where the first ended.
        let mut b = Batch::default();
        let mut chain = Appender::open(&store, Role::Agent).expect("open chain");
        let prior = chain.job(&store, &Uuid::from_u128(2)).expect("read");
        chain.append(&mut b, "m", verdict(2, false), 300, 13, prior);
        // The other role's chain is apart.
        let mut other = Appender::open(&store, Role::Manager).expect("open chain");
        other.append(&mut b, "a", receipt(1, 500), 500, 14, None);
        store.write(b).expect("write");

        assert_eq!(verify(&store, Role::Agent).expect("read"), Ok(4));
        assert_eq!(verify(&store, Role::Manager).expect("read"), Ok(1));
        let newest = entries(&store, Role::Agent, None, 10).expect("read");
        assert_eq!(
            newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 3, 2, 1]
        );
        assert_eq!(newest[0].prev, newest[1].hash);
        let page = entries(&store, Role::Agent, Some(3), 10).expect("read");
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 1]);
        let b = balances(&store, Role::Agent).expect("read");
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].agreed, b[0].agreed_milli), (1, 500));
        assert_eq!((b[0].disputed, b[0].disputed_milli), (1, 300));
        assert_eq!(b[0].open, 0);
        let m = balances(&store, Role::Manager).expect("read");
        assert_eq!((m[0].open, m[0].open_milli), (1, 500));
    }

    #[test]
    fn an_entry_changed_afterwards_breaks_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut b = Batch::default();
        let mut chain = Appender::open(&store, Role::Manager).expect("open chain");
        for j in 1..=3 {
            chain.append(&mut b, "a", receipt(j, 100), 100, j as u64, None);
        }
        store.write(b).expect("write");
        let mut e = store
            .get(LEDGER, &entry_key(Role::Manager, 2))
            .expect("read")
            .expect("entry");
        // A charge lowered after the fact.
        if let Record::Receipt(r) = &mut e.record {
            r.receipt.charge_milli = 1;
        }
        store
            .put(LEDGER, &entry_key(Role::Manager, 2), &e)
            .expect("write");
        let broken = verify(&store, Role::Manager)
            .expect("read")
            .expect_err("broken");
        assert!(
            broken.contains("entry 2 does not match its hash"),
            "{broken}"
        );
    }
}
