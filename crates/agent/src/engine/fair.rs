//! Fair share across managers (docs/market.md): when a slot is free, the
//! agent runs the queued job of the manager that used it least, by run
//! time decayed with a half-life (`--fair-share-half-life`, HTCondor's
//! `usage(t) = usage(t0) · 0.5^((t - t0) / half-life)`), divided by the
//! manager's weight (`--manager-weight NODE=W`, 1 by default), counting the
//! time its running jobs have run so far. Among one manager's jobs, and
//! among managers of equal usage, the queue's order holds. So a manager
//! that floods an agent cannot starve the others: two flooding managers of
//! equal weight each get half of its run time.

use std::collections::HashMap;

use uuid::Uuid;

use super::{Agent, LOOK_PAST};

/// Default half-life of a manager's usage.
pub const DEFAULT_HALF_LIFE_MS: u64 = 10 * 60 * 1000;

/// Run time per manager, decayed.
#[derive(Debug, Default)]
pub(super) struct Usage {
    /// Manager → (seconds of run time, as of this instant in ms).
    by_manager: HashMap<String, (f64, u64)>,
}

fn decay(value: f64, from_ms: u64, to_ms: u64, half_life_ms: u64) -> f64 {
    if half_life_ms == 0 {
        return 0.0;
    }
    let dt = to_ms.saturating_sub(from_ms) as f64;
    value * 0.5f64.powf(dt / half_life_ms as f64)
}

impl Usage {
    /// Manager `m`'s usage at `now_ms`.
    pub(super) fn at(&self, m: &str, now_ms: u64, half_life_ms: u64) -> f64 {
        self.by_manager
            .get(m)
            .map_or(0.0, |(v, t)| decay(*v, *t, now_ms, half_life_ms))
    }

    /// Adds `seconds` of run time to manager `m`.
    pub(super) fn add(&mut self, m: &str, seconds: f64, now_ms: u64, half_life_ms: u64) {
        let v = self.at(m, now_ms, half_life_ms) + seconds.max(0.0);
        self.by_manager.insert(m.to_string(), (v, now_ms));
        // Forget managers whose usage has decayed to nothing.
        if self.by_manager.len() > 1024 {
            self.by_manager
                .retain(|_, (v, t)| decay(*v, *t, now_ms, half_life_ms) > 1e-3);
        }
    }
}

impl Agent {
    fn weight(&self, m: &str) -> f64 {
        self.opts
            .manager_weights
            .get(m)
            .copied()
            .filter(|w| *w > 0.0)
            .unwrap_or(1.0)
    }

    /// Manager `m`'s usage per weight now: its decayed run time and the
    /// time its running jobs have run so far.
    fn share(&self, m: &str, now_ms: u64) -> f64 {
        let running: f64 = self
            .running
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.manager == m)
            .map(|j| now_ms.saturating_sub(j.started_at_ms.unwrap_or(now_ms)) as f64 / 1000.0)
            .sum();
        (self.usage.at(m, now_ms, self.opts.fair_half_life_ms) + running) / self.weight(m)
    }

    /// Takes the next queued job to try: of the manager with the least
    /// usage per weight among the first [`LOOK_PAST`] queued, its job of
    /// the highest workflow priority, the first queued among equals.
    pub(super) fn pop_fair(&mut self, now_ms: u64) -> Option<(u64, Uuid)> {
        // Each manager's best queued job: (seq, priority, manager).
        let mut best: Vec<(u64, i32, &str)> = Vec::new();
        for (seq, id) in self.queue.iter().take(LOOK_PAST) {
            let Some(j) = self.jobs.get(id) else { continue };
            let p = self.priorities.get(&j.request_id).copied().unwrap_or(0);
            match best.iter_mut().find(|(_, _, m)| *m == j.manager) {
                Some(b) if p > b.1 => *b = (*seq, p, j.manager.as_str()),
                Some(_) => {}
                None => best.push((*seq, p, j.manager.as_str())),
            }
        }
        let pick = if best.len() <= 1 {
            best.first().map(|b| b.0)
        } else {
            best.iter()
                .map(|(seq, _, m)| (self.share(m, now_ms), *seq))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, seq)| seq)
        };
        match pick {
            Some(seq) => self.queue.remove(&seq).map(|id| (seq, id)),
            None => self.queue.pop_first(),
        }
    }

    /// A run of manager `m`'s job ended after `seconds`.
    pub(super) fn used(&mut self, m: &str, seconds: f64, now_ms: u64) {
        self.usage
            .add(m, seconds, now_ms, self.opts.fair_half_life_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_halves_every_half_life_and_adds_up() {
        let mut u = Usage::default();
        u.add("m", 10.0, 0, 1000);
        assert!((u.at("m", 1000, 1000) - 5.0).abs() < 1e-9);
        assert!((u.at("m", 2000, 1000) - 2.5).abs() < 1e-9);
        u.add("m", 1.0, 2000, 1000);
        assert!((u.at("m", 2000, 1000) - 3.5).abs() < 1e-9);
        assert_eq!(u.at("other", 2000, 1000), 0.0);
    }
}
