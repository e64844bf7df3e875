//! The agents this manager has heard advertise (docs/market.md): the job
//! types each serves, for whom, what it has and how busy it is. Soft
//! state, in memory only: adverts come again every few seconds, and a
//! manager that knows none broadcasts its requests as before.
//!
//! [`Directory::choose`] picks whom to ask for a request: an agent whose
//! advert serves the job type with the same inputs, this manager, the
//! step's labels and resources, not asked yet; the least busy first, by
//! its advert corrected with the jobs this manager placed there since.
//! Ties go to the agent this manager asked least often, then by a hash of
//! the request and the agent, so that each manager spreads its own work
//! evenly and managers that see the same adverts do not all pick the same
//! agent.

use std::collections::HashMap;

use caroni_types::market::Advert;
use caroni_types::msg::{JobRequest, JobState};

/// How long an agent counts as advertised after its last advert, at most
/// (its advert's own expiry may be sooner).
pub const ADVERT_TTL_MS: u64 = 30_000;

/// One advertised agent.
#[derive(Clone, Debug)]
struct Known {
    endpoint: String,
    advert: Advert,
    /// Requests this manager asked it that it has not answered yet.
    outstanding: u32,
    /// Requests this manager asked it in all (kept across adverts).
    asked_total: u64,
}

/// Whom to ask for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Ask this agent directly (node id, endpoint).
    Ask(String, String),
    /// No advert is known, or every fitting agent was asked: broadcast.
    Broadcast,
}

/// The advertised agents.
#[derive(Debug, Default)]
pub struct Directory {
    agents: HashMap<String, Known>,
    /// Each agent's record with this manager since it started.
    records: HashMap<String, AgentRecord>,
}

/// How the jobs this manager placed on an agent ended, since the manager
/// started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentRecord {
    /// Completed.
    pub completed: u64,
    /// Failed (any kind but lost).
    pub failed: u64,
    /// Lost: no word from the agent within the lease.
    pub lost: u64,
}

impl AgentRecord {
    /// A poor record: at least 3 jobs failed or lost, and more than one in
    /// five of its ended jobs. Such an agent is asked after the others
    /// that cost no more.
    pub fn poor(&self) -> bool {
        let bad = self.failed + self.lost;
        bad >= 3 && bad * 5 > self.completed + bad
    }
}

impl Directory {
    /// Notes how a job placed on `agent` ended (cancelled jobs do not
    /// count).
    pub fn note_outcome(&mut self, agent: &str, state: JobState, failure: &str) {
        let r = self.records.entry(agent.to_string()).or_default();
        match state {
            JobState::Completed => r.completed += 1,
            JobState::Failed if failure == "lost" => r.lost += 1,
            JobState::Failed => r.failed += 1,
            _ => {}
        }
    }

    /// An agent's record with this manager.
    pub fn record(&self, agent: &str) -> AgentRecord {
        self.records.get(agent).copied().unwrap_or_default()
    }

    /// Takes an agent's advert (a newer one replaces an older; an older
    /// one is ignored). Returns false when ignored.
    pub fn update(&mut self, agent: &str, endpoint: &str, advert: Advert) -> bool {
        let (outstanding, asked_total) = match self.agents.get(agent) {
            Some(k) if k.advert.seq >= advert.seq => return false,
            Some(k) => (k.outstanding, k.asked_total),
            None => (0, 0),
        };
        self.agents.insert(
            agent.to_string(),
            Known {
                endpoint: endpoint.to_string(),
                advert,
                outstanding,
                asked_total,
            },
        );
        true
    }

    /// This manager asked `agent` for a request: until it answers, the
    /// request counts as a job there.
    pub fn note_asked(&mut self, agent: &str) {
        if let Some(k) = self.agents.get_mut(agent) {
            k.outstanding = k.outstanding.saturating_add(1);
            k.asked_total = k.asked_total.saturating_add(1);
        }
    }

    /// `agent` answered a request (an offer, which becomes a live job when
    /// taken, or a decline).
    pub fn note_answered(&mut self, agent: &str) {
        if let Some(k) = self.agents.get_mut(agent) {
            k.outstanding = k.outstanding.saturating_sub(1);
        }
    }

    /// Forgets adverts that expired.
    pub fn expire(&mut self, now_ms: u64) {
        self.agents.retain(|_, k| k.advert.expires_at_ms > now_ms);
    }

    /// Agents with a live advert.
    pub fn len(&self, now_ms: u64) -> usize {
        self.live(now_ms).count()
    }

    fn live(&self, now_ms: u64) -> impl Iterator<Item = (&String, &Known)> {
        self.agents
            .iter()
            .filter(move |(_, k)| k.advert.expires_at_ms > now_ms)
    }

    /// Why `agent`'s advert cannot serve `req` for `manager`, or `None`
    /// when it can (perhaps once it is less busy).
    fn unfit(k: &Known, req: &JobRequest, manager: &str) -> Option<String> {
        if !k.advert.serves_manager(manager) {
            return Some("does not serve this manager (--serve-managers)".into());
        }
        if let Err(why) = k.advert.serves_type(&req.job_type, &req.parameter_keys) {
            return Some(why);
        }
        if let Some(why) = req.needs.unmet(&k.advert.total, &k.advert.labels) {
            return Some(why);
        }
        let cost = Self::cost(k, req);
        match req.needs.max_price_milli {
            Some(limit) if cost > limit => Some(format!(
                "may charge up to {} credits, the step may spend {}",
                caroni_types::market::credits(cost),
                caroni_types::market::credits(limit)
            )),
            _ => None,
        }
    }

    /// The most the agent's job for `req` can cost, as it advertises.
    fn cost(k: &Known, req: &JobRequest) -> u64 {
        k.advert
            .job_types
            .iter()
            .find(|t| t.name == req.job_type)
            .map_or(0, |t| t.price.max_charge(t.max_seconds))
    }

    /// Whom to ask for `req`: the least busy fitting agent not in
    /// `exclude` and allowed by `allowed`; [`Choice::Broadcast`] when none.
    pub fn choose(
        &self,
        req: &JobRequest,
        manager: &str,
        exclude: &[String],
        allowed: &dyn Fn(&str) -> bool,
        placed: &dyn Fn(&str) -> u32,
        now_ms: u64,
    ) -> Choice {
        let best = self
            .live(now_ms)
            .filter(|(a, _)| !exclude.contains(a) && allowed(a))
            .filter(|(_, k)| Self::unfit(k, req, manager).is_none())
            .map(|(a, k)| {
                // The advert's load (every manager's jobs, a moment ago),
                // or what this manager knows it has there now (its live
                // jobs and the requests it asked that are not answered
                // yet), whichever is more.
                let load = k.advert.load;
                let busy = load
                    .slots
                    .saturating_sub(load.free_slots)
                    .saturating_add(load.queue_length)
                    .max(placed(a).saturating_add(k.outstanding));
                let per_slot = f64::from(busy) / f64::from(load.slots.max(1));
                // An agent with a free slot before a full one; then the
                // cheapest; then the least busy.
                // Then one with a good record before a poor one.
                let full = busy >= load.slots.max(1);
                let poor = self.record(a).poor();
                let key = (full, Self::cost(k, req), poor, k.asked_total, tie(req, a));
                (per_slot, key, a, k)
            })
            .min_by(|x, y| {
                (x.1 .0, x.1 .1, x.1 .2)
                    .cmp(&(y.1 .0, y.1 .1, y.1 .2))
                    .then(x.0.total_cmp(&y.0))
                    .then((x.1 .3, x.1 .4).cmp(&(y.1 .3, y.1 .4)))
            });
        match best {
            Some((_, _, a, k)) => Choice::Ask(a.clone(), k.endpoint.clone()),
            None => Choice::Broadcast,
        }
    }

    /// Why no advertised agent can ever serve `req`, when adverts are
    /// known and none fits: each distinct reason with how many agents
    /// gave it. `None` when one fits or none is known.
    pub fn none_fits(
        &self,
        req: &JobRequest,
        manager: &str,
        allowed: &dyn Fn(&str) -> bool,
        now_ms: u64,
    ) -> Option<String> {
        // Each distinct reason with the agents' own figures when it is a
        // shortfall ("needs 32 CPUs, the agents have 2 and 8").
        let mut reasons: Vec<(String, Vec<String>, usize)> = Vec::new();
        let mut seen = 0;
        for (a, k) in self.live(now_ms) {
            seen += 1;
            let why = if allowed(a) {
                // One that fits: nothing to say.
                Self::unfit(k, req, manager)?
            } else {
                "not in this manager's --use-agents".to_string()
            };
            let (head, have) = match why.split_once(", the agent has ") {
                Some((h, v)) => (h.to_string(), Some(v.to_string())),
                None => (why, None),
            };
            match reasons.iter_mut().find(|(r, _, _)| *r == head) {
                Some((_, haves, c)) => {
                    *c += 1;
                    haves.extend(have.filter(|v| !haves.contains(v)));
                }
                None => reasons.push((head, have.into_iter().collect(), 1)),
            }
        }
        if seen == 0 {
            return None;
        }
        reasons.sort();
        let listed: Vec<String> = reasons
            .into_iter()
            .map(|(r, mut haves, c)| {
                haves.sort_by(|a, b| natural(a).total_cmp(&natural(b)).then(a.cmp(b)));
                let agents = if c > 1 {
                    format!("{c} agents")
                } else {
                    "1 agent".to_string()
                };
                match haves.as_slice() {
                    [] => format!("{r} ({agents})"),
                    [one] if c == 1 => format!("{r}, the agent has {one}"),
                    [one] => format!("{r}, the agents have {one} ({agents})"),
                    [init @ .., last] => {
                        format!("{r}, the agents have {} and {last}", init.join(", "))
                    }
                }
            })
            .collect();
        Some(format!(
            "no agent that advertises to this manager can serve it: {}",
            listed.join("; ")
        ))
    }
}

/// The leading number of a figure ("8", "4096 MiB"), to list figures in
/// order.
fn natural(s: &str) -> f64 {
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// A stable pseudo-random order of agents per request: SipHash (with the
/// standard library's fixed keys) over both, so that every request draws
/// its own order.
fn tie(req: &JobRequest, agent: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.request_id.hash(&mut h);
    agent.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use caroni_types::market::{AdvertisedType, Needs, Resources};
    use caroni_types::msg::Load;
    use std::collections::BTreeMap;
    use uuid::Uuid;

    fn advert(seq: u64, busy: u32, types: &[&str]) -> Advert {
        Advert {
            seq,
            expires_at_ms: 100_000,
            load: Load {
                slots: 2,
                free_slots: 2u32.saturating_sub(busy),
                queue_length: busy.saturating_sub(2),
            },
            total: Resources {
                cpu_milli: 4000,
                memory_mib: 8192,
                gpus: 0,
                disk_mib: 0,
            },
            job_types: types
                .iter()
                .map(|t| AdvertisedType {
                    name: t.to_string(),
                    inputs: vec!["x".into()],
                    price: Default::default(),
                    max_seconds: 60,
                })
                .collect(),
            ..Advert::default()
        }
    }

    fn req(job_type: &str) -> JobRequest {
        JobRequest {
            request_id: Uuid::new_v4(),
            job_type: job_type.into(),
            parameter_keys: vec!["x".into()],
            output_keys: vec![],
            job_kvs: BTreeMap::new(),
            expires_at_ms: 50_000,
            manager_endpoint: "http://m:1".into(),
            publish_count: 1,
            workflow_id: None,
            needs: Needs::default(),
            priority: 0,
        }
    }

    #[test]
    fn the_least_busy_fitting_agent_is_asked_and_the_asked_are_skipped() {
        let mut d = Directory::default();
        d.update("a", "http://a:1", advert(1, 3, &["wc"]));
        d.update("b", "http://b:1", advert(1, 1, &["wc"]));
        d.update("c", "http://c:1", advert(1, 0, &["other"]));
        let none = |_: &str| 0;
        let all = |_: &str| true;
        let r = req("wc");
        assert_eq!(
            d.choose(&r, "m", &[], &all, &none, 10),
            Choice::Ask("b".into(), "http://b:1".into())
        );
        assert_eq!(
            d.choose(&r, "m", &["b".into()], &all, &none, 10),
            Choice::Ask("a".into(), "http://a:1".into())
        );
        assert_eq!(
            d.choose(&r, "m", &["a".into(), "b".into()], &all, &none, 10),
            Choice::Broadcast
        );
        // Live jobs this manager has on b count against it, and so do
        // requests asked of it that it has not answered.
        let placed = |a: &str| if a == "b" { 5 } else { 0 };
        assert_eq!(
            d.choose(&r, "m", &[], &all, &placed, 10),
            Choice::Ask("a".into(), "http://a:1".into())
        );
        for _ in 0..4 {
            d.note_asked("b");
        }
        assert_eq!(
            d.choose(&r, "m", &[], &all, &none, 10),
            Choice::Ask("a".into(), "http://a:1".into())
        );
        for _ in 0..4 {
            d.note_answered("b");
        }
        assert_eq!(
            d.choose(&r, "m", &[], &all, &none, 10),
            Choice::Ask("b".into(), "http://b:1".into())
        );
        // Equally busy: the one asked least often goes first.
        let mut e = Directory::default();
        e.update("x", "http://x:1", advert(1, 0, &["wc"]));
        e.update("y", "http://y:1", advert(1, 0, &["wc"]));
        let mut counts = std::collections::HashMap::new();
        for seq in 2..12 {
            let Choice::Ask(who, _) = e.choose(&req("wc"), "m", &[], &all, &none, 10) else {
                panic!("an agent fits");
            };
            e.note_asked(&who);
            // It answered, and its job ended before its next advert: idle
            // again.
            e.note_answered(&who);
            e.update(&who, "http://w:1", advert(seq, 0, &["wc"]));
            *counts.entry(who).or_insert(0u64) += 1;
        }
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![5, 5],
            "{counts:?}"
        );
        // An older advert does not replace a newer one; expired ones go.
        assert!(!d.update("b", "http://b:1", advert(0, 0, &[])));
        assert_eq!(
            d.choose(&r, "m", &[], &all, &none, 200_000),
            Choice::Broadcast
        );
    }

    #[test]
    fn when_none_fits_the_reasons_are_counted() {
        let mut d = Directory::default();
        let all = |_: &str| true;
        assert_eq!(d.none_fits(&req("wc"), "m", &all, 10), None);
        d.update("a", "http://a:1", advert(1, 0, &["other"]));
        d.update("b", "http://b:1", advert(1, 0, &["other"]));
        let mut big = req("other");
        big.needs.resources.cpu_milli = 16_000;
        assert_eq!(
            d.none_fits(&big, "m", &all, 10).as_deref(),
            Some("no agent that advertises to this manager can serve it: needs 16 CPUs, the agents have 4 (2 agents)")
        );
        assert_eq!(
            d.none_fits(&req("wc"), "m", &all, 10).as_deref(),
            Some("no agent that advertises to this manager can serve it: no job type named wc (2 agents)")
        );
        assert_eq!(d.none_fits(&req("other"), "m", &all, 10), None);
        let mut small = advert(3, 0, &["other"]);
        small.total.cpu_milli = 2000;
        d.update("b", "http://b:1", small);
        assert_eq!(
            d.none_fits(&big, "m", &all, 10).as_deref(),
            Some("no agent that advertises to this manager can serve it: needs 16 CPUs, the agents have 2 and 4")
        );
        let mut served = advert(2, 0, &["wc"]);
        served.serves = vec!["someone-else".into()];
        d.update("a", "http://a:1", served);
        let why = d.none_fits(&req("wc"), "m", &all, 10).unwrap_or_default();
        assert!(
            why.contains("does not serve this manager (--serve-managers) (1 agent)"),
            "{why}"
        );
    }
}
