//! Property tests: random orderings, duplicates and delays of protocol
//! messages fed into the workflow machine; the invariants must hold after
//! every event.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use caroni_types::msg::{JobState, Load, StatusUpdate};

const SIMPLE: &str = include_str!("../../../../examples/templates/test_simple.cwl");
const AGENTS: [&str; 3] = ["agentA", "agentB", "agentC"];

#[derive(Clone, Debug)]
enum Op {
    Offer {
        step: usize,
        agent: usize,
    },
    Accepted {
        pick: usize,
        wrong_sender: bool,
    },
    Status {
        pick: usize,
        state: usize,
        seq: u64,
        wrong_sender: bool,
    },
    Data {
        pick: usize,
    },
    Tick {
        advance_ms: u64,
    },
    Replay {
        pick: usize,
    },
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize).prop_map(|(step, agent)| Op::Offer { step, agent }),
        4 => (0..16usize, proptest::bool::weighted(0.1)).prop_map(|(pick, wrong_sender)| Op::Accepted { pick, wrong_sender }),
        6 => (0..16usize, 0..5usize, 0..6u64, proptest::bool::weighted(0.1))
            .prop_map(|(pick, state, seq, wrong_sender)| Op::Status { pick, state, seq, wrong_sender }),
        4 => (0..16usize).prop_map(|pick| Op::Data { pick }),
        3 => (0..40_000u64).prop_map(|advance_ms| Op::Tick { advance_ms }),
        3 => (0..64usize).prop_map(|pick| Op::Replay { pick }),
        1 => Just(Op::Cancel),
    ]
}

/// A concrete, replayable event.
#[derive(Clone, Debug)]
enum Event {
    Offer(String, Uuid, Uuid),
    Accepted(String, Uuid),
    Status(String, StatusUpdate),
    Data(String, Uuid, BTreeMap<String, String>),
}

const STATES: [JobState; 5] = [
    JobState::Pending,
    JobState::Queued,
    JobState::Running,
    JobState::Completed,
    JobState::Failed,
];

/// Allowed over one event (an event may pass through several states, e.g.
/// news of a job implies its acceptance): never back to `created`, never
/// back to `initializing` once running, nothing after a final state.
fn wf_allowed(a: WorkflowState, b: WorkflowState) -> bool {
    use WorkflowState::*;
    a == b
        || match a {
            Created => b == Initializing,
            Initializing => !matches!(b, Created),
            Running | Stalled => !matches!(b, Created | Initializing),
            Completed | Failed | Cancelled => false,
        }
}

/// Steps: never back to `created`; nothing after `completed` or `failed`.
fn step_allowed(a: StepState, b: StepState) -> bool {
    use StepState::*;
    a == b
        || match a {
            // A dynamic step runs its elements, or fails evaluating them.
            Created => matches!(b, Fulfilling | Running | Failed | Cancelled),
            Fulfilling | Fulfilled | Running => b != Created,
            Completed | Failed | Skipped | Cancelled => false,
        }
}

fn all_jobs(wf: &Workflow) -> Vec<(usize, Attempt)> {
    wf.steps
        .iter()
        .enumerate()
        .flat_map(|(n, s)| {
            s.attempts
                .iter()
                .filter(|a| a.job_id.is_some())
                .map(move |a| (n, a.clone()))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_any_ordering(ops in proptest::collection::vec(op(), 1..120)) {
        let parsed = caroni_cwl::parse(SIMPLE).expect("template");
        let inputs = BTreeMap::from([("start_message".to_string(), "x".to_string())]);
        let mut wf = Workflow::create(Uuid::from_u128(1), "t", &parsed, inputs, 0).expect("create");
        let mut now = 0u64;
        let mut next = 1000u128;
        let mut log: Vec<Event> = Vec::new();
        let mut completed_results: BTreeMap<usize, BTreeMap<String, crate::model::Value>> = BTreeMap::new();
        macro_rules! ctx {
            ($gen:ident) => {
                Ctx { now_ms: now, lease_ms: 30_000, request_ttl_ms: 600_000, endpoint: "http://m", new_id: &mut $gen, offer_window_ms: 0, peers: &NoPeers, blobs: &NoPeers, answer_timeout_ms: 10_000, unplaceable_ms: 300_000 }
            };
        }
        {
            let mut gen = || { next += 1; Uuid::from_u128(next) };
            wf.start(&mut ctx!(gen));
        }
        for op in ops {
            let before = wf.clone();
            let jobs = all_jobs(&wf);
            let event = match op {
                Op::Offer { step, agent } => wf.steps[step].request.as_ref().map(|r| {
                    next += 1;
                    Event::Offer(AGENTS[agent].to_string(), r.id, Uuid::from_u128(next))
                }),
                Op::Accepted { pick, wrong_sender } => (!jobs.is_empty()).then(|| {
                    let (_, a) = &jobs[pick % jobs.len()];
                    let from = if wrong_sender { "intruder".to_string() } else { a.agent.clone() };
                    Event::Accepted(from, a.job_id.unwrap_or_default())
                }),
                Op::Status { pick, state, seq, wrong_sender } => (!jobs.is_empty()).then(|| {
                    let (_, a) = &jobs[pick % jobs.len()];
                    let from = if wrong_sender { "intruder".to_string() } else { a.agent.clone() };
                    Event::Status(from, StatusUpdate {
                        job_id: a.job_id.unwrap_or_default(),
                        state: STATES[state],
                        message: String::new(),
                        exit_status: None,
                        stderr_tail: String::new(),
                        sequence: seq + 1,
                        executor: String::new(),
                        external_id: String::new(),
                        queued_at_ms: None,
                        started_at_ms: None,
                        ended_at_ms: None,
                        failure: String::new(),
                        receipt: None,
                    })
                }),
                Op::Data { pick } => (!jobs.is_empty()).then(|| {
                    let (n, a) = &jobs[pick % jobs.len()];
                    let items = wf.steps[*n].outputs.iter().map(|o| (o.clone(), format!("v{}", a.job_id.unwrap_or_default()))).collect();
                    Event::Data(a.agent.clone(), a.job_id.unwrap_or_default(), items)
                }),
                Op::Replay { pick } => (!log.is_empty()).then(|| log[pick % log.len()].clone()),
                Op::Tick { advance_ms } => {
                    now += advance_ms;
                    let mut gen = || { next += 1; Uuid::from_u128(next) };
                    wf.tick(&mut ctx!(gen));
                    None
                }
                Op::Cancel => {
                    let mut gen = || { next += 1; Uuid::from_u128(next) };
                    wf.cancel(&mut ctx!(gen), "test");
                    None
                }
            };
            if let Some(ev) = event {
                log.push(ev.clone());
                let mut gen = || { next += 1; Uuid::from_u128(next) };
                let mut c = ctx!(gen);
                match &ev {
                    Event::Offer(agent, req, offer) => { wf.on_offer(&mut c, agent, "http://a", *req, *offer, now + 60_000, Load::default(), None); }
                    Event::Accepted(from, job) => {
                        let r = wf.on_accepted(&mut c, from, *job);
                        if from == "intruder" { prop_assert!(r.is_err()); }
                    }
                    Event::Status(from, up) => {
                        let r = wf.on_status(&mut c, from, up);
                        if from == "intruder" { prop_assert!(r.is_err()); }
                    }
                    Event::Data(from, job, items) => {
                        let superseded = before.find_job(*job).map(|(n, k)| !before.steps[n].attempts[k].is_live() || before.steps[n].state == StepState::Completed).unwrap_or(true);
                        let _ = wf.on_data(&mut c, from, *job, items, None);
                        if superseded {
                            if let Some((n, _)) = before.find_job(*job) {
                                prop_assert_eq!(&wf.steps[n].results, &before.steps[n].results, "data of a superseded job changed results");
                            }
                        }
                    }
                }
            }
            // No transition outside the state machines.
            prop_assert!(wf_allowed(before.state, wf.state), "workflow {:?} -> {:?}", before.state, wf.state);
            for (b, a) in before.steps.iter().zip(&wf.steps) {
                prop_assert!(step_allowed(b.state, a.state), "step {} {:?} -> {:?}", a.id, b.state, a.state);
            }
            for (n, s) in wf.steps.iter().enumerate() {
                // At most one live attempt per step.
                prop_assert!(s.attempts.iter().filter(|a| a.is_live()).count() <= 1);
                // A completed step completes once, with one successful job,
                // and its results never change afterwards.
                if s.state == StepState::Completed {
                    prop_assert_eq!(s.attempts.iter().filter(|a| a.state == JobState::Completed).count(), 1);
                    let first = completed_results.entry(n).or_insert_with(|| s.results.clone());
                    prop_assert_eq!(&*first, &s.results);
                }
            }
            if wf.state == WorkflowState::Completed {
                prop_assert!(wf.steps.iter().all(|s| s.state == StepState::Completed));
                prop_assert!(wf.outputs.contains_key("result"));
            }
            if wf.state.is_final() {
                prop_assert_eq!(wf.live_jobs().count(), 0);
            }
        }
    }
}
