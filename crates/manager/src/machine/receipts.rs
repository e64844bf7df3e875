//! Receipts: what a manager checks before it countersigns an agent's
//! receipt for a job (docs/market.md). Anything it cannot agree with is
//! disputed with the reason.

use caroni_types::ledger::Receipt;
use caroni_types::market::credits;
use caroni_types::msg::JobState;

use crate::model::Workflow;

impl Workflow {
    /// Checks agent `agent`'s receipt for one of this workflow's jobs
    /// against this manager's (`manager`) record of it: who placed it
    /// where, the price its offer named, the charge that price gives for
    /// the time it ran, and, when this manager took the job's final
    /// status, its state and run time.
    pub fn check_receipt(&self, manager: &str, agent: &str, r: &Receipt) -> Result<(), String> {
        if r.manager != manager {
            return Err(format!(
                "the receipt names manager {}, not this one",
                r.manager
            ));
        }
        if r.agent != agent {
            return Err(format!(
                "the receipt names agent {}, not its sender",
                r.agent
            ));
        }
        let Some(a) = self
            .steps
            .iter()
            .flat_map(|s| &s.attempts)
            .find(|a| a.job_id == Some(r.job_id))
        else {
            return Err(format!("workflow {} has no job {}", self.id, r.job_id));
        };
        if a.agent != agent {
            return Err(format!("job {} was placed with another agent", r.job_id));
        }
        if a.failure == "lost" {
            return Err(
                "this manager counted the job lost (no word within its lease) and did not use its result"
                    .into(),
            );
        }
        let (price, max) = a.price.unwrap_or_default();
        if r.price != price || r.max_charge_milli != max {
            return Err(format!(
                "the receipt names the price {} (at most {} credits), the offer named {} (at most {})",
                r.price.describe(),
                credits(r.max_charge_milli),
                price.describe(),
                credits(max)
            ));
        }
        let due = price.charge(r.wall_ms, max);
        if r.charge_milli != due {
            return Err(format!(
                "the receipt charges {} credits for {} ms, the price gives {}",
                credits(r.charge_milli),
                r.wall_ms,
                credits(due)
            ));
        }
        // The job's final status came here: the receipt must say the same.
        let reported = matches!(a.state, JobState::Completed | JobState::Failed);
        if reported && a.state != r.state {
            return Err(format!(
                "the receipt says the job {}, its status said {}",
                r.state.as_str(),
                a.state.as_str()
            ));
        }
        if let (true, Some(ran), Some(ended)) = (reported, a.ran_at_ms, a.ended_at_ms) {
            let wall = ended.saturating_sub(ran);
            if wall != r.wall_ms {
                return Err(format!(
                    "the receipt says the job ran {} ms, its status said {} ms",
                    r.wall_ms, wall
                ));
            }
        }
        Ok(())
    }
}
