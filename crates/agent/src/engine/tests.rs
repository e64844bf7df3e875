//! The agent machine's rules between jobs and peers, without network,
//! storage or clock: a fake `World`, fixed time and ids.

use std::collections::{BTreeMap, HashMap, HashSet};

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, JobRequest, Msg};
use caroni_types::{ExecutorSpec, JobTypeDef};
use uuid::Uuid;

use super::*;
use crate::machine::Offer;

const M: &str = "manager1";
const EP: &str = "http://manager1:1";

#[derive(Default)]
struct Fake {
    offers: HashMap<Uuid, Offer>,
    known: HashSet<String>,
}

impl World for Fake {
    fn is_applied(&self, _: &Uuid) -> caroni_store::Result<bool> {
        Ok(false)
    }
    fn job_types(&self) -> caroni_store::Result<Vec<JobTypeDef>> {
        Ok(self.job_type("work")?.into_iter().map(|(d, _)| d).collect())
    }
    fn job_type(&self, name: &str) -> caroni_store::Result<Option<(JobTypeDef, ExecutorSpec)>> {
        Ok((name == "work").then(|| {
            (
                JobTypeDef {
                    name: "work".into(),
                    inputs: vec!["x".into()],
                    outputs: vec!["y".into()],
                    body: "true".into(),
                    timeout_seconds: 60,
                    max_output_bytes: 1024,
                    updated_at_ms: 0,
                },
                ExecutorSpec::Bash,
            )
        }))
    }
    fn offer(&self, r: &Uuid) -> caroni_store::Result<Option<Offer>> {
        Ok(self.offers.get(r).cloned())
    }
    fn job(&self, _: &Uuid) -> caroni_store::Result<Option<Job>> {
        Ok(None)
    }
    fn execution(&self, _: &Uuid) -> Option<Execution> {
        None
    }
    fn workflow_of(&self, _: &Uuid) -> Option<Uuid> {
        None
    }
    fn unavailable(&self, _: &ExecutorSpec) -> Option<String> {
        None
    }
    fn external_id(&self, _: &RunSpec) -> String {
        String::new()
    }
    fn knows(&self, node: &str) -> bool {
        self.known.contains(node)
    }
}

fn agent(serve: Option<&[&str]>) -> Agent {
    Agent::new(Options {
        node_id: "agent".into(),
        slots: 1,
        serve_managers: serve.map(|l| l.iter().map(|s| s.to_string()).collect()),
        cwl_tools: Default::default(),
        resources: caroni_types::market::Resources {
            cpu_milli: 4000,
            memory_mib: 8192,
            gpus: 0,
            disk_mib: 10240,
        },
        labels: Default::default(),
        fair_half_life_ms: 600_000,
        manager_weights: Default::default(),
        dispute_limit: None,
    })
}

fn request(job_type: &str, endpoint: &str) -> JobRequest {
    JobRequest {
        request_id: Uuid::from_u128(1),
        job_type: job_type.into(),
        parameter_keys: vec!["x".into()],
        output_keys: vec!["y".into()],
        job_kvs: BTreeMap::new(),
        expires_at_ms: 100_000,
        manager_endpoint: endpoint.into(),
        publish_count: 1,
        workflow_id: None,
        needs: Default::default(),
        priority: 0,
    }
}

fn run(a: &mut Agent, w: &dyn World, input: Input) -> (Result<Delivered, DeliverError>, Out) {
    let mut n = 10u128;
    let mut ids = || {
        n += 1;
        Uuid::from_u128(n)
    };
    let mut now = Now {
        ms: 1_000,
        new_id: &mut ids,
    };
    let mut out = Out::default();
    let r = a.handle(input, &mut now, w, &mut out);
    (r, out)
}

fn gossip(req: JobRequest, endpoint: &str) -> Input {
    Input::Gossip {
        from: M.into(),
        endpoint: endpoint.into(),
        req,
    }
}

fn msg(from: &str, m: Msg) -> Input {
    Input::Deliver(Inbound {
        id: Uuid::new_v4(),
        from: from.into(),
        endpoint: format!("http://{from}:1"),
        trace: None,
        msg: m,
        unfetched: None,
    })
}

fn sent(out: &Out) -> Vec<&Msg> {
    out.send.iter().flatten().map(|(o, _)| &o.msg).collect()
}

#[test]
fn a_request_whose_reply_endpoint_is_not_its_signers_is_dropped_unanswered() {
    let mut a = agent(None);
    let (_, out) = run(
        &mut a,
        &Fake::default(),
        gossip(request("work", "http://elsewhere:1"), EP),
    );
    assert!(sent(&out).is_empty());
    assert_eq!(out.dropped.len(), 1);
    let (_, out) = run(&mut a, &Fake::default(), gossip(request("work", EP), EP));
    assert!(matches!(sent(&out)[..], [Msg::Offer { .. }]));
}

#[test]
fn a_request_is_declined_once() {
    let mut a = agent(None);
    let w = Fake::default();
    let (_, out) = run(&mut a, &w, msg(M, Msg::Request(request("nosuch", EP))));
    assert!(matches!(sent(&out)[..], [Msg::Decline { .. }]));
    let (_, out) = run(&mut a, &w, msg(M, Msg::Request(request("nosuch", EP))));
    assert!(
        sent(&out).is_empty(),
        "asking again draws no second decline"
    );
    let (_, out) = run(&mut a, &w, gossip(request("nosuch", EP), EP));
    assert!(sent(&out).is_empty(), "nor does a re-publication");
}

#[test]
fn an_unserved_manager_is_declined_and_may_not_accept() {
    let mut a = agent(Some(&["other"]));
    let w = Fake::default();
    let (_, out) = run(&mut a, &w, gossip(request("work", EP), EP));
    assert!(matches!(sent(&out)[..], [Msg::Decline { .. }]));
    assert_eq!(out.refused.len(), 1);
    let (r, _) = run(
        &mut a,
        &w,
        msg(
            M,
            Msg::Accept {
                offer_id: Uuid::from_u128(11),
                request_id: Uuid::from_u128(1),
                job_id: Uuid::from_u128(99),
            },
        ),
    );
    assert!(matches!(r, Err(DeliverError::Refused(_))));
}

#[test]
fn only_the_manager_an_offer_was_made_to_may_reject_it_even_once_it_left_memory() {
    let mut a = agent(None);
    let mut w = Fake::default();
    let (_, out) = run(&mut a, &w, gossip(request("work", EP), EP));
    let Msg::Offer { offer_id, .. } = sent(&out)[0].clone() else {
        panic!("an offer");
    };
    // Accepted: the used offer is stored; after a restart it is not in
    // memory.
    let mut used = out.offers[0].clone();
    used.job_id = Some(Uuid::from_u128(99));
    w.offers.insert(used.request_id, used.clone());
    let mut a = agent(None);
    let reject = |from: &str| {
        msg(
            from,
            Msg::Reject {
                offer_id,
                request_id: Uuid::from_u128(1),
            },
        )
    };
    let (r, out) = run(&mut a, &w, reject("mallory"));
    assert!(matches!(r, Err(DeliverError::Refused(_))), "{r:?}");
    assert!(out.forget_offers.is_empty());
    // Its own manager's late reject of an accepted offer keeps the record
    // (it answers a re-sent accept).
    let (r, out) = run(&mut a, &w, reject(M));
    assert!(r.is_ok());
    assert!(out.forget_offers.is_empty());
}

#[test]
fn news_of_an_unknown_job_from_a_stranger_is_answered_in_the_ack() {
    let mut a = agent(None);
    let mut w = Fake::default();
    let ask = |from: &str| {
        msg(
            from,
            Msg::StatusRequest {
                job_id: Uuid::from_u128(5),
            },
        )
    };
    let (r, out) = run(&mut a, &w, ask("stranger"));
    assert!(matches!(r, Err(DeliverError::Refused(_))));
    assert!(sent(&out).is_empty(), "nothing sent to an address it chose");
    w.known.insert(M.into());
    let (r, out) = run(&mut a, &w, ask(M));
    assert!(r.is_ok());
    assert!(matches!(sent(&out)[..], [Msg::Status(_)]));
}

#[test]
fn a_request_asked_directly_is_always_answered_and_a_broadcast_only_when_it_fits() {
    let mut a = agent(None);
    let w = Fake::default();
    // Asked directly (the manager chose this agent from its advert).
    let (r, out) = run(&mut a, &w, msg(M, Msg::Request(request("work", EP))));
    assert!(r.is_ok());
    assert!(matches!(sent(&out)[..], [Msg::Offer { .. }]));
    assert_eq!(
        out.applied.len(),
        1,
        "applied once, like any direct message"
    );
    let mut other = request("nothere", EP);
    other.request_id = Uuid::from_u128(2);
    let (r, out) = run(&mut a, &w, msg(M, Msg::Request(other.clone())));
    assert!(r.is_ok());
    assert!(
        matches!(sent(&out)[..], [Msg::Decline { reason, .. }] if reason.contains("no job type named nothere")),
        "{:?}",
        sent(&out)
    );
    // Broadcast: a job type it lacks is not answered.
    let mut third = request("nothere", EP);
    third.request_id = Uuid::from_u128(3);
    let (_, out) = run(
        &mut a,
        &w,
        Input::Gossip {
            from: M.into(),
            endpoint: EP.into(),
            req: third,
        },
    );
    assert!(sent(&out).is_empty(), "{:?}", sent(&out));
    // A direct request cannot name another reply address: the answer goes
    // to its signer's endpoint.
    let mut forged = request("work", "http://elsewhere:1");
    forged.request_id = Uuid::from_u128(4);
    let (r, out) = run(&mut a, &w, msg(M, Msg::Request(forged)));
    assert!(r.is_ok(), "{r:?}");
    let to: Vec<&str> = out
        .send
        .iter()
        .flatten()
        .map(|(o, _)| o.endpoint.as_str())
        .collect();
    assert_eq!(to, [EP], "answered at the signer's endpoint only");
}

/// Handles `input`, then settles (the scheduling decision), at `ms`.
fn run_settle(a: &mut Agent, w: &Fake, input: Input, ms: u64) -> Out {
    let mut n = ms as u128 * 1000;
    let mut ids = || {
        n += 1;
        Uuid::from_u128(n)
    };
    let mut now = Now {
        ms,
        new_id: &mut ids,
    };
    let mut out = Out::default();
    let _ = a.handle(input, &mut now, w, &mut out);
    a.settle(&mut now, w, &mut out);
    out
}

/// Takes request `k` with `priority` through offer, accept and inputs;
/// returns its job id and what the last step started.
fn queue_job(a: &mut Agent, w: &mut Fake, k: u128, priority: i32) -> (Uuid, Vec<Uuid>) {
    let mut req = request("work", EP);
    req.request_id = Uuid::from_u128(k);
    req.priority = priority;
    let out = run_settle(a, w, gossip(req.clone(), EP), 1_000 + k as u64);
    let offer_id = sent(&out)
        .iter()
        .find_map(|m| match m {
            Msg::Offer { offer_id, .. } => Some(*offer_id),
            _ => None,
        })
        .expect("offer");
    for o in out.offers {
        w.offers.insert(o.request_id, o);
    }
    let job_id = Uuid::from_u128(100 + k);
    let accept = Msg::Accept {
        offer_id,
        request_id: req.request_id,
        job_id,
    };
    run_settle(a, w, msg(M, accept), 1_100 + k as u64);
    let data = Msg::Data {
        job_id,
        items: BTreeMap::from([("x".to_string(), "v".to_string())]),
        outputs: false,
    };
    let out = run_settle(a, w, msg(M, data), 1_200 + k as u64);
    (job_id, out.start.iter().map(|s| s.spec.job_id).collect())
}

#[test]
fn a_managers_queued_jobs_run_by_their_workflows_priority() {
    let mut a = agent(None);
    let mut w = Fake::default();
    let (first, started) = queue_job(&mut a, &mut w, 1, 0);
    assert_eq!(started, [first], "the one slot takes the first job");
    let (low, started) = queue_job(&mut a, &mut w, 2, 0);
    assert!(started.is_empty());
    let (high, _) = queue_job(&mut a, &mut w, 3, 5);
    // The first ends: the later job of higher priority goes first.
    let done = RunResult::Completed {
        outputs: BTreeMap::from([("y".to_string(), "1".to_string())]),
        stderr_tail: String::new(),
    };
    let out = run_settle(&mut a, &w, Input::Finished(first, done.clone()), 5_000);
    let next: Vec<Uuid> = out.start.iter().map(|s| s.spec.job_id).collect();
    assert_eq!(next, [high]);
    // Its final status carries the receipt of the job that ended.
    let receipt = sent(&out).iter().find_map(|m| match m {
        Msg::Status(s) if s.job_id == first => s.receipt.clone(),
        _ => None,
    });
    let receipt = receipt.expect("a receipt with the final status");
    assert_eq!(receipt.receipt.agent, "agent");
    assert_eq!(receipt.receipt.manager, M);
    assert_eq!(
        receipt.receipt.state,
        caroni_types::msg::JobState::Completed
    );
    let out = run_settle(&mut a, &w, Input::Finished(high, done), 6_000);
    let next: Vec<Uuid> = out.start.iter().map(|s| s.spec.job_id).collect();
    assert_eq!(next, [low]);
}

#[test]
fn a_manager_over_the_dispute_limit_is_declined_with_the_reason() {
    struct Disputed(Fake);
    impl World for Disputed {
        fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
            self.0.is_applied(id)
        }
        fn job_types(&self) -> caroni_store::Result<Vec<JobTypeDef>> {
            self.0.job_types()
        }
        fn job_type(&self, n: &str) -> caroni_store::Result<Option<(JobTypeDef, ExecutorSpec)>> {
            self.0.job_type(n)
        }
        fn offer(&self, r: &Uuid) -> caroni_store::Result<Option<Offer>> {
            self.0.offer(r)
        }
        fn job(&self, j: &Uuid) -> caroni_store::Result<Option<Job>> {
            self.0.job(j)
        }
        fn execution(&self, j: &Uuid) -> Option<Execution> {
            self.0.execution(j)
        }
        fn workflow_of(&self, r: &Uuid) -> Option<Uuid> {
            self.0.workflow_of(r)
        }
        fn unavailable(&self, e: &ExecutorSpec) -> Option<String> {
            self.0.unavailable(e)
        }
        fn external_id(&self, s: &RunSpec) -> String {
            self.0.external_id(s)
        }
        fn knows(&self, n: &str) -> bool {
            self.0.knows(n)
        }
        fn receipts_standing(&self, manager: &str, _: u64) -> (u64, u64) {
            if manager == M {
                (1, 1)
            } else {
                (0, 0)
            }
        }
    }
    let w = Disputed(Fake::default());
    let mut limited = agent(None);
    limited.opts.dispute_limit = Some(1);
    let (_, out) = run(&mut limited, &w, msg(M, Msg::Request(request("work", EP))));
    assert!(
        matches!(sent(&out)[..], [Msg::Decline { reason, .. }] if reason.contains("1 of its receipts were disputed and 1 not answered") && reason.contains("--dispute-limit 1")),
        "{:?}",
        sent(&out)
    );
    // Within the limit, the same manager is served.
    let mut lenient = agent(None);
    lenient.opts.dispute_limit = Some(2);
    let (_, out) = run(&mut lenient, &w, msg(M, Msg::Request(request("work", EP))));
    assert!(
        matches!(sent(&out)[..], [Msg::Offer { .. }]),
        "{:?}",
        sent(&out)
    );
}
