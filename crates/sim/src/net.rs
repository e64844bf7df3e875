//! The network: in-order streams per node pair that lose, duplicate and
//! delay transmissions; the outbox re-sending what is unacknowledged.

use caroni_agent::engine as agent;

use caroni_manager::engine as manager;

use caroni_types::delivery::DeliverError;
use caroni_types::msg::Inbound;

use crate::*;

impl Sim {
    /// A transmission arrives: applied (or refused) and acknowledged, or
    /// lost when the node is down or the address is no longer its own.
    pub(crate) fn arrive(
        &mut self,
        from: String,
        to: String,
        at_endpoint: String,
        msg: Staged,
        sender_endpoint: String,
    ) {
        let Some(node) = self.nodes.get_mut(&to) else {
            return;
        };
        if !node.up || node.endpoint != at_endpoint {
            self.broken.insert((from, to));
            return;
        }
        // Learnt from what the sender signed.
        node.book.insert(from.clone(), sender_endpoint.clone());
        node.heard.insert(from.clone(), self.now);
        let inbound = Inbound {
            id: msg.id,
            from: from.clone(),
            endpoint: sender_endpoint,
            trace: msg.trace,
            msg: msg.out.msg.clone(),
            unfetched: None,
        };
        let r = if inbound.msg.for_agent() {
            match self
                .nodes
                .get(&to)
                .map(|n| matches!(n.role, Role::Agent(..)))
            {
                Some(true) => match self.agent_input(&to, agent::Input::Deliver(inbound)) {
                    Some(Ok(agent::Delivered::Applied)) => Ok(()),
                    Some(Ok(agent::Delivered::NotMine)) => {
                        Err(DeliverError::Refused("not for an agent".into()))
                    }
                    Some(Err(e)) => Err(e),
                    None => return,
                },
                _ => Err(DeliverError::Refused("not an agent".into())),
            }
        } else {
            match self
                .nodes
                .get(&to)
                .map(|n| matches!(n.role, Role::Manager(..)))
            {
                Some(true) => match self.manager_input(&to, manager::Input::Deliver(inbound)) {
                    Some(manager::Answer::Deliver(r)) => r,
                    _ => return,
                },
                _ => Err(DeliverError::Refused("not a manager".into())),
            }
        };
        let refused = match r {
            Ok(()) => None,
            Err(DeliverError::Retry(_)) => {
                self.broken.insert((from, to));
                return;
            }
            Err(DeliverError::Refused(why)) => {
                let known = self
                    .nodes
                    .get(&to)
                    .is_some_and(|n| n.confirmed.contains(&from));
                if from == MALLORY {
                    self.counts.forgeries_refused += 1;
                } else if !known {
                    // The stranger rule: news about something the node
                    // does not know, from a peer that never acknowledged
                    // one of its messages, is answered in the ack.
                    self.counts.answered_in_ack += 1;
                } else {
                    self.findings.violations.push(format!(
                        "{to} refused {} from honest {from}: {why}",
                        msg.out.msg.name()
                    ));
                }
                Some(why)
            }
        };
        if from == MALLORY {
            return;
        }
        let at = self.now + 1 + self.dice.below(20);
        if !self.dice.chance(self.cfg.drop) || !self.faults() {
            self.push(
                at,
                Event::Ack {
                    to: from,
                    id: msg.id,
                    refused,
                },
            );
        }
    }

    /// Sends every unacknowledged message of a node again (the outbox
    /// sender), to the address it knows.
    pub(crate) fn resend(&mut self, name: &str) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        if !node.up {
            return;
        }
        let confirmed = &node.confirmed;
        node.outbox.retain(|s| {
            confirmed.contains(&s.out.to) || now.saturating_sub(s.at) < UNCONFIRMED_TTL_MS
        });
        let node = &*node;
        let mine: Vec<(String, String)> = self
            .broken
            .iter()
            .filter(|(f, _)| f == name)
            .cloned()
            .collect();
        for p in mine {
            self.broken.remove(&p);
        }
        let sends: Vec<(String, String, Staged)> = node
            .outbox
            .iter()
            // The stranger takes nothing it is sent.
            .filter(|s| s.out.to != MALLORY)
            .map(|s| {
                let endpoint = node
                    .book
                    .get(&s.out.to)
                    .cloned()
                    .unwrap_or_else(|| s.out.endpoint.clone());
                (s.out.to.clone(), endpoint, s.clone())
            })
            .collect();
        let me = node.endpoint.clone();
        for (to, endpoint, s) in sends {
            self.transmit(name, &to, &endpoint, s, &me);
        }
        let at = self.now + 200 + self.dice.below(300);
        self.push(
            at,
            Event::Resend {
                node: name.to_string(),
            },
        );
    }

    pub(crate) fn transmit(&mut self, from: &str, to: &str, endpoint: &str, s: Staged, me: &str) {
        let faults = self.faults();
        let pair = (from.to_string(), to.to_string());
        if self.broken.contains(&pair) {
            return;
        }
        if faults && self.dice.chance(self.cfg.drop) {
            self.broken.insert(pair);
            return;
        }
        let copies = if faults && self.dice.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + 1 + self.dice.below(if faults { 50 } else { 5 });
            let at = at.max(self.pair_at.get(&pair).copied().unwrap_or(0));
            self.pair_at.insert(pair.clone(), at);
            self.push(
                at,
                Event::Arrive {
                    from: from.to_string(),
                    to: to.to_string(),
                    at_endpoint: endpoint.to_string(),
                    msg: s.clone(),
                    sender_endpoint: me.to_string(),
                },
            );
        }
    }
}
