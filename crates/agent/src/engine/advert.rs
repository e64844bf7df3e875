//! The agent's advert (docs/market.md): what it serves, for whom, what it
//! has and how busy it is, published on gossip every
//! [`ADVERT_EVERY_MS`] and, after a change (a job taken or ended, a job
//! type put or deleted), at most every [`ADVERT_MIN_GAP_MS`]. Managers ask
//! advertised agents directly instead of broadcasting.

use caroni_types::market::{Advert, AdvertisedType};

use super::{Agent, Out, World};
use crate::cwl::CwlTools;

/// Longest time between two adverts.
pub const ADVERT_EVERY_MS: u64 = 5_000;
/// Shortest time between two adverts (a change waits this long).
pub const ADVERT_MIN_GAP_MS: u64 = 200;
/// How long an advert is valid: a manager forgets an agent this long
/// after its last advert (several adverts may be lost meanwhile).
pub const ADVERT_LIFETIME_MS: u64 = 30_000;

/// What the agent last advertised, and when it next must.
#[derive(Debug, Default)]
pub(super) struct AdvertState {
    /// When the last advert went out (0: never).
    last_at: u64,
    /// Its sequence number.
    last_seq: u64,
    /// What it said that changes with the work (load, free resources).
    last_said: Option<(caroni_types::msg::Load, caroni_types::market::Resources)>,
    /// Something it says otherwise changed (job types).
    pub(super) dirty: bool,
}

impl Agent {
    /// What running jobs do not hold.
    pub(super) fn free_resources(&self) -> caroni_types::market::Resources {
        self.held
            .values()
            .fold(self.opts.resources.clone(), |free, h| free.minus(h))
    }

    fn said_now(&self) -> (caroni_types::msg::Load, caroni_types::market::Resources) {
        (self.load_now(), self.free_resources())
    }

    fn advert_changed(&self) -> bool {
        self.advert.dirty || self.advert.last_said.as_ref() != Some(&self.said_now())
    }

    /// When the next advert is due.
    pub(super) fn advert_due(&self) -> u64 {
        if self.advert.last_at == 0 {
            return 0;
        }
        let periodic = self.advert.last_at + ADVERT_EVERY_MS;
        if self.advert_changed() {
            periodic.min(self.advert.last_at + ADVERT_MIN_GAP_MS)
        } else {
            periodic
        }
    }

    /// Publishes an advert when one is due.
    pub(super) fn advertise(&mut self, now_ms: u64, world: &dyn World, out: &mut Out) {
        if now_ms < self.advert_due() {
            return;
        }
        let types = match world.job_types() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read job types for the advert; trying again");
                self.advert.last_at = now_ms;
                return;
            }
        };
        let (load, free) = self.said_now();
        let seq = now_ms.max(self.advert.last_seq + 1);
        let mut serves: Vec<String> = match &self.opts.serve_managers {
            None => Vec::new(),
            // An empty list serves nobody; an empty advert list would say
            // "every manager", so it names a node id no key can have.
            Some(list) if list.is_empty() => vec!["-".into()],
            Some(list) => list.iter().cloned().collect(),
        };
        serves.sort();
        out.advert = Some(Advert {
            seq,
            expires_at_ms: now_ms + ADVERT_LIFETIME_MS,
            load,
            total: self.opts.resources.clone(),
            free: free.clone(),
            labels: self.opts.labels.clone(),
            job_types: types
                .into_iter()
                .map(|t| {
                    let mut inputs = t.inputs;
                    inputs.sort();
                    AdvertisedType {
                        price: world.price(&t.name),
                        max_seconds: t.timeout_seconds,
                        name: t.name,
                        inputs,
                    }
                })
                .collect(),
            cwl_tools: self.opts.cwl_tools != CwlTools::Off,
            serves,
        });
        self.advert = AdvertState {
            last_at: now_ms,
            last_seq: seq,
            last_said: Some((load, free)),
            dirty: false,
        };
    }
}
