//! Unit tests of one workflow's rules, one test per rule (over 600 lines:
//! the rules are many, and each test reads alone).

use super::*;
use caroni_types::msg::{JobState, Load, Msg, StatusUpdate};
use std::collections::BTreeMap;

const SIMPLE: &str = include_str!("../../../../examples/templates/test_simple.cwl");
const AGENT: &str = "agentA";
const AGENT_B: &str = "agentB";

/// Drives one workflow with a fake clock and sequential ids.
struct H {
    wf: Workflow,
    now: u64,
    next: u128,
    lease: u64,
    window: u64,
    peers: FakePeers,
}

/// The agents as a test wants the manager to see them.
#[derive(Default)]
struct FakePeers {
    known: usize,
    heard: BTreeMap<String, u64>,
    live: BTreeMap<String, u32>,
    /// Advertised agents that fit, best first (none: broadcast).
    adverts: Vec<String>,
}

impl Peers for FakePeers {
    fn last_heard_ms(&self, agent: &str) -> Option<u64> {
        self.heard.get(agent).copied()
    }
    fn known_agents(&self) -> usize {
        self.known
    }
    fn live_jobs(&self, agent: &str) -> u32 {
        self.live.get(agent).copied().unwrap_or(0)
    }
    fn choose(&self, _: &JobRequest, exclude: &[String]) -> crate::market::Choice {
        match self.adverts.iter().find(|a| !exclude.contains(a)) {
            Some(a) => crate::market::Choice::Ask(a.clone(), format!("http://{a}:1")),
            None => crate::market::Choice::Broadcast,
        }
    }
}

impl H {
    fn new(doc: &str) -> Self {
        let parsed = caroni_cwl::parse(doc).expect("template");
        let inputs = BTreeMap::from([("start_message".to_string(), "caronirocks".to_string())]);
        let wf = Workflow::create(Uuid::from_u128(1), "t", &parsed, inputs, 1_000).expect("create");
        Self {
            wf,
            now: 1_000,
            next: 100,
            lease: 30_000,
            window: 0,
            peers: FakePeers::default(),
        }
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut Workflow, &mut Ctx<'_>) -> R) -> R {
        let mut next = self.next;
        let mut gen = || {
            next += 1;
            Uuid::from_u128(next)
        };
        let mut ctx = Ctx {
            now_ms: self.now,
            lease_ms: self.lease,
            request_ttl_ms: 600_000,
            endpoint: "http://manager:1",
            new_id: &mut gen,
            offer_window_ms: self.window,
            peers: &self.peers,
            blobs: &NoPeers,
            answer_timeout_ms: 10_000,
            unplaceable_ms: 300_000,
        };
        let r = f(&mut self.wf, &mut ctx);
        self.next = next;
        r
    }

    fn request(&self, step: usize) -> Uuid {
        self.wf.steps[step].request.as_ref().expect("request").id
    }

    /// Offer from `agent` for step `n`; returns the job id accepted.
    fn offer(&mut self, n: usize, agent: &str) -> Option<Uuid> {
        let req = self.request(n);
        let offer = Uuid::new_v4();
        let now = self.now;
        let fx = self.with(|wf, ctx| {
            wf.on_offer(
                ctx,
                agent,
                "http://agent:1",
                req,
                offer,
                now + 60_000,
                Load::default(),
                None,
            )
        });
        fx.iter().find_map(|e| match e {
            Effect::Send(Outbound {
                msg: Msg::Accept { job_id, .. },
                ..
            }) => Some(*job_id),
            _ => None,
        })
    }

    fn fulfil(&mut self, n: usize, agent: &str) -> (Uuid, Vec<Effect>) {
        let job = self.offer(n, agent).expect("accepted");
        let fx = self
            .with(|wf, ctx| wf.on_accepted(ctx, agent, job))
            .expect("accepted");
        (job, fx)
    }

    fn status(
        &mut self,
        agent: &str,
        job: Uuid,
        state: JobState,
        seq: u64,
    ) -> Result<Vec<Effect>, Refusal> {
        let up = StatusUpdate {
            job_id: job,
            state,
            message: if state == JobState::Failed {
                "exit status 1".into()
            } else {
                String::new()
            },
            exit_status: None,
            stderr_tail: String::new(),
            sequence: seq,
            executor: String::new(),
            external_id: String::new(),
            queued_at_ms: None,
            started_at_ms: None,
            ended_at_ms: None,
            failure: String::new(),
            receipt: None,
        };
        self.with(|wf, ctx| wf.on_status(ctx, agent, &up))
    }

    fn complete(&mut self, agent: &str, job: Uuid, output: &str, value: &str) -> Vec<Effect> {
        let items = BTreeMap::from([(output.to_string(), value.to_string())]);
        self.with(|wf, ctx| wf.on_data(ctx, agent, job, &items, None))
            .expect("data");
        self.status(agent, job, JobState::Completed, 10)
            .expect("status")
    }
}

fn data_to(fx: &[Effect], job: Uuid) -> Option<BTreeMap<String, String>> {
    fx.iter().find_map(|e| match e {
        Effect::Send(Outbound {
            msg: Msg::Data { job_id, items, .. },
            ..
        }) if *job_id == job => Some(items.clone()),
        _ => None,
    })
}

fn kills(fx: &[Effect]) -> Vec<Uuid> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send(Outbound {
                msg: Msg::Kill { job_id, .. },
                ..
            }) => Some(*job_id),
            _ => None,
        })
        .collect()
}

fn publishes(fx: &[Effect]) -> usize {
    fx.iter()
        .filter(|e| matches!(e, Effect::Publish(_)))
        .count()
}

#[test]
fn start_publishes_a_request_per_step() {
    let mut h = H::new(SIMPLE);
    assert_eq!(h.wf.state, WorkflowState::Created);
    let fx = h.with(|wf, ctx| wf.start(ctx));
    assert_eq!(publishes(&fx), 3);
    assert_eq!(h.wf.state, WorkflowState::Initializing);
    assert!(h.wf.steps.iter().all(|s| s.state == StepState::Fulfilling));
    let Effect::Publish(r) = &fx[0] else {
        panic!("publish")
    };
    assert_eq!(r.job_type, "foojob0");
    assert_eq!(r.parameter_keys, ["message"]);
    assert_eq!(r.manager_endpoint, "http://manager:1");
}

#[test]
fn first_offer_wins_later_offers_are_rejected_declines_do_not_end() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let req = h.request(0);
    h.with(|wf, ctx| wf.on_decline(ctx, AGENT_B, req, "no job type foojob0"));
    assert_eq!(
        h.wf.steps[0].request.as_ref().map(|r| r.state),
        Some(RequestState::Fulfilling)
    );
    assert!(h.offer(0, AGENT).is_some());
    assert_eq!(
        h.wf.steps[0].request.as_ref().map(|r| r.state),
        Some(RequestState::Fulfilled)
    );
    let offer = Uuid::new_v4();
    let now = h.now;
    let fx = h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            AGENT_B,
            "http://b:1",
            req,
            offer,
            now + 60_000,
            Load::default(),
            None,
        )
    });
    assert!(matches!(
        &fx[..],
        [Effect::Send(Outbound {
            msg: Msg::Reject { .. },
            ..
        })]
    ));
}

#[test]
fn an_expired_offer_is_rejected() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let req = h.request(0);
    let now = h.now;
    let fx = h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            AGENT,
            "http://a:1",
            req,
            Uuid::new_v4(),
            now - 1,
            Load::default(),
            None,
        )
    });
    assert!(matches!(
        &fx[..],
        [Effect::Send(Outbound {
            msg: Msg::Reject { .. },
            ..
        })]
    ));
    assert_eq!(h.wf.steps[0].state, StepState::Fulfilling);
}

#[test]
fn a_step_gets_its_inputs_as_soon_as_it_has_a_job_then_completes() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    assert_eq!(h.wf.state, WorkflowState::Initializing);
    let (j0, fx) = h.fulfil(0, AGENT);
    // No waiting for the other steps' jobs: a branch runs when it can.
    assert_eq!(
        data_to(&fx, j0)
            .and_then(|d| d.get("message").cloned())
            .as_deref(),
        Some("caronirocks")
    );
    assert_eq!(h.wf.state, WorkflowState::Running);
    assert_eq!(h.wf.steps[1].shown_state(), "fulfilling");
    let (j1, _) = h.fulfil(1, AGENT_B);
    assert_eq!(h.wf.steps[1].shown_state(), "waiting", "for its inputs");
    let (j2, _) = h.fulfil(2, AGENT);

    h.status(AGENT, j0, JobState::Running, 1).expect("running");
    assert_eq!(h.wf.steps[0].state, StepState::Running);
    let fx = h.complete(AGENT, j0, "jobout", "CARONIROCKS");
    assert_eq!(h.wf.steps[0].state, StepState::Completed);
    assert_eq!(
        data_to(&fx, j1)
            .and_then(|d| d.get("text").cloned())
            .as_deref(),
        Some("CARONIROCKS")
    );
    let fx = h.complete(AGENT_B, j1, "outSB", "prependCARONIROCKS");
    assert!(data_to(&fx, j2).is_some());
    h.complete(AGENT, j2, "out", "prependCARONIROCKS append");
    assert_eq!(h.wf.state, WorkflowState::Completed);
    assert_eq!(
        h.wf.outputs.get("result").map(|v| &**v),
        Some("prependCARONIROCKS append")
    );
    assert!(h.wf.dataflows().iter().all(|d| d.value.is_some()));
}

#[test]
fn only_the_holder_may_report() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    let e = h
        .status(AGENT_B, j0, JobState::Completed, 1)
        .expect_err("impostor");
    assert!(e.0.contains("does not hold"), "{e}");
    let e = h
        .with(|wf, ctx| wf.on_accepted(ctx, AGENT_B, j0))
        .expect_err("impostor");
    assert!(e.0.contains("only the agent that holds a job"));
}

#[test]
fn a_failure_stalls_refulfils_and_resends_inputs() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.fulfil(1, AGENT);
    h.fulfil(2, AGENT);
    let old_req = h.request(0);
    let fx = h.status(AGENT, j0, JobState::Failed, 1).expect("failed");
    assert_eq!(h.wf.state, WorkflowState::Stalled);
    assert_eq!(h.wf.steps[0].state, StepState::Fulfilling);
    assert_eq!(h.wf.steps[0].shown_state(), "retrying");
    assert_ne!(h.request(0), old_req, "a new request");
    assert_eq!(publishes(&fx), 0, "published after its back-off");
    assert!(
        !h.wf.steps[0].attempts[0].superseded,
        "failed, not replaced"
    );
    h.now += DEFAULT_BACKOFF_INITIAL_MS;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(publishes(&fx), 1);
    let (j0b, fx) = h.fulfil(0, AGENT_B);
    assert_eq!(h.wf.state, WorkflowState::Running);
    assert_eq!(
        data_to(&fx, j0b)
            .and_then(|d| d.get("message").cloned())
            .as_deref(),
        Some("caronirocks")
    );
    // The superseded job's late result is ignored and it is told to stop.
    let fx = h.status(AGENT, j0, JobState::Running, 2).expect("late");
    assert_eq!(kills(&fx), [j0]);
    assert_eq!(h.wf.steps[0].attempts.len(), 2);
}

#[test]
fn max_attempts_fail_the_workflow_and_kill_live_jobs() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (_, _) = h.fulfil(1, AGENT_B);
    let mut last = Vec::new();
    for _ in 0..DEFAULT_MAX_ATTEMPTS {
        let (j, _) = h.fulfil(0, AGENT);
        last = h.status(AGENT, j, JobState::Failed, 1).expect("failed");
    }
    assert_eq!(h.wf.state, WorkflowState::Failed);
    assert_eq!(h.wf.steps[0].state, StepState::Failed);
    assert!(
        h.wf.message.contains("step step1 failed 5 time(s)"),
        "{}",
        h.wf.message
    );
    let step1_job = h.wf.steps[1].attempts[0].job_id.expect("job");
    assert_eq!(kills(&last), [step1_job]);
    assert_eq!(h.wf.live_jobs().count(), 0);
}

#[test]
fn completed_without_outputs_is_a_failed_attempt() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.status(AGENT, j0, JobState::Completed, 1).expect("status");
    assert!(h.wf.steps[0].attempts[0]
        .message
        .contains("without output(s) jobout"));
    assert_eq!(h.wf.steps[0].attempts[0].failure, "output");
    // Retried by default (its job type may be fixed meanwhile).
    assert_eq!(h.wf.steps[0].shown_state(), "retrying");
}

#[test]
fn a_kind_the_policy_does_not_retry_fails_the_step_at_once() {
    let doc = SIMPLE.replace(
        "CaroniJobName: foojob0",
        "CaroniJobName: foojob0\n        CaroniNoRetry: [output]",
    );
    let mut h = H::new(&doc);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.status(AGENT, j0, JobState::Completed, 1).expect("status");
    assert_eq!(h.wf.steps[0].state, StepState::Failed);
    assert_eq!(h.wf.state, WorkflowState::Failed);
    assert!(h.wf.message.contains("not retried"), "{}", h.wf.message);
    assert_eq!(h.wf.steps[1].state, StepState::Cancelled);
}

#[test]
fn outputs_that_cannot_be_fetched_fail_the_attempt_and_its_late_completion_is_ignored() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    let items = BTreeMap::from([("jobout".to_string(), "x".to_string())]);
    let fx = h
        .with(|wf, ctx| wf.on_data(ctx, AGENT, j0, &items, Some("the hash did not match")))
        .expect("data");
    assert_eq!(kills(&fx), [j0], "the agent is told to let the job go");
    assert_eq!(
        h.wf.steps[0].shown_state(),
        "retrying",
        "asked for again after its back-off"
    );
    let a = &h.wf.steps[0].attempts[0];
    assert_eq!(a.state, JobState::Failed);
    assert!(
        a.message.contains("cannot be fetched from agent")
            && a.message.contains("hash did not match"),
        "{}",
        a.message
    );
    assert!(h.wf.steps[0].results.is_empty(), "nothing of it is kept");
    // The agent's completion that follows changes nothing.
    h.status(AGENT, j0, JobState::Completed, 5).expect("late");
    assert_eq!(h.wf.steps[0].state, StepState::Fulfilling);
}

#[test]
fn stale_status_sequences_are_ignored() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.status(AGENT, j0, JobState::Running, 5).expect("running");
    h.status(AGENT, j0, JobState::Queued, 4).expect("stale");
    assert_eq!(h.wf.steps[0].attempts[0].state, JobState::Running);
}

#[test]
fn requests_are_republished_with_backoff_until_answered() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let mut times = Vec::new();
    for _ in 0..400 {
        h.now += 50;
        let fx = h.with(|wf, ctx| wf.tick(ctx));
        if fx
            .iter()
            .any(|e| matches!(e, Effect::Publish(r) if r.job_type == "foojob0"))
        {
            times.push(h.now - 1_000);
        }
    }
    assert!(times.len() >= 4, "{times:?}");
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] >= g[0]),
        "backoff grows: {gaps:?}"
    );
    assert!(gaps.iter().all(|g| *g <= REPUBLISH_MAX_MS + 50));
    h.offer(0, AGENT);
    h.now += 10_000;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Publish(r) if r.job_type == "foojob0")),
        "answered requests stay quiet"
    );
}

#[test]
fn a_silent_agent_is_probed_then_counted_lost() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.now += h.lease / 3 + 1;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert!(fx.iter().any(|e| matches!(e, Effect::Send(Outbound { msg: Msg::StatusRequest { job_id }, .. }) if *job_id == j0)));
    // An answer renews the lease.
    h.status(AGENT, j0, JobState::Pending, 1).expect("status");
    h.now += h.lease - 1;
    h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(h.wf.steps[0].attempts.len(), 1);
    h.now += h.lease;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(kills(&fx), [j0]);
    assert_eq!(h.wf.steps[0].state, StepState::Fulfilling);
    assert!(h.wf.steps[0].attempts[0].message.contains("silent"));
}

#[test]
fn cancel_kills_live_jobs_and_ignores_later_news() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    let fx = h.with(|wf, ctx| wf.cancel(ctx, "cancelled by user"));
    assert_eq!(kills(&fx), [j0]);
    assert_eq!(h.wf.state, WorkflowState::Cancelled);
    // Cancelled everywhere: every step not ended, and the live job.
    assert!(h.wf.steps.iter().all(|s| s.state == StepState::Cancelled));
    assert_eq!(h.wf.steps[0].attempts[0].state, JobState::Cancelled);
    assert!(h.with(|wf, ctx| wf.tick(ctx)).is_empty());
    assert_eq!(
        h.wf.next_deadline(h.lease, &NoPeers, (10_000, 300_000)),
        None
    );
}

#[test]
fn a_resent_offer_is_not_accepted_twice() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let req = h.request(0);
    let offer = Uuid::new_v4();
    let now = h.now;
    let fx1 = h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            AGENT,
            "e",
            req,
            offer,
            now + 60_000,
            Load::default(),
            None,
        )
    });
    let fx2 = h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            AGENT,
            "e",
            req,
            offer,
            now + 60_000,
            Load::default(),
            None,
        )
    });
    assert_eq!(fx1.len(), 1);
    assert!(fx2.is_empty());
    assert_eq!(h.wf.steps[0].attempts.len(), 1);
}

#[test]
fn missing_and_unknown_inputs_are_refused() {
    let parsed = caroni_cwl::parse(SIMPLE).expect("template");
    let e = Workflow::create(Uuid::nil(), "t", &parsed, BTreeMap::new(), 0).expect_err("missing");
    assert!(e
        .to_string()
        .contains("missing workflow input `start_message`"));
    let given = BTreeMap::from([
        ("start_message".into(), "x".into()),
        ("bogus".into(), "y".into()),
    ]);
    let e = Workflow::create(Uuid::nil(), "t", &parsed, given, 0).expect_err("unknown");
    assert!(e.to_string().contains("unknown workflow input `bogus`"));
}

#[test]
fn values_must_be_what_their_inputs_carry() {
    let files = caroni_cwl::parse(include_str!(
        "../../../../examples/templates/files_chain.cwl"
    ))
    .expect("template");
    let file = caroni_types::file::FileRef::new("ab".repeat(32), 3, "r.fq".into()).expect("ref");
    let given = |v: &str| BTreeMap::from([("reads".to_string(), v.to_string())]);
    let e = Workflow::create(Uuid::nil(), "t", &files, given("r.fq"), 0).expect_err("text");
    assert!(
        e.to_string()
            .contains("workflow input `reads` is declared `File`"),
        "{e}"
    );
    Workflow::create(Uuid::nil(), "t", &files, given(&file.to_text()), 0).expect("a reference");
    // No string passes for a file.
    let parsed = caroni_cwl::parse(SIMPLE).expect("template");
    let given = BTreeMap::from([("start_message".to_string(), file.to_text())]);
    let e = Workflow::create(Uuid::nil(), "t", &parsed, given, 0).expect_err("forged");
    assert!(e.to_string().contains("is a File reference"), "{e}");
}

#[test]
fn an_expired_request_is_a_failed_attempt_and_is_replaced() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let first = h.request(0);
    h.now += 600_001;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    let step = &h.wf.steps[0];
    assert_eq!(step.attempts.len(), 1);
    assert!(step.attempts[0].message.contains("no agent offered"));
    assert_ne!(
        h.request(0),
        first,
        "a new request replaces the expired one"
    );
    assert_eq!(step.attempts[0].failure, "unplaceable");
    assert_eq!(publishes(&fx), 0, "after its back-off");
    h.now += DEFAULT_BACKOFF_INITIAL_MS;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::Publish(r) if r.request_id == h.request(0))));
    assert_eq!(h.wf.steps[0].state, StepState::Fulfilling);
}

#[test]
fn a_request_every_agent_declines_is_blocked_and_fails_after_the_unplaceable_time() {
    let mut h = H::new(SIMPLE);
    h.peers.known = 2;
    h.with(|wf, ctx| wf.start(ctx));
    let req = h.request(1);
    // Step 0 runs meanwhile: the blocked branch holds nothing else.
    let (j0, fx) = h.fulfil(0, AGENT);
    assert!(data_to(&fx, j0).is_some());
    for a in [AGENT, AGENT_B] {
        h.with(|wf, ctx| wf.on_decline(ctx, a, req, "no job type named foojob1"));
    }
    let b = h.wf.steps[1]
        .request
        .as_ref()
        .and_then(|r| r.blocked.clone())
        .expect("blocked at once: every known agent declined");
    assert!(
        b.reason
            .contains("declined by 2 agent(s): no job type named foojob1 (2 agents)"),
        "{}",
        b.reason
    );
    h.now += 299_000;
    h.with(|wf, ctx| wf.tick(ctx));
    assert_ne!(h.wf.state, WorkflowState::Failed);
    assert_ne!(h.wf.steps[1].state, StepState::Failed);
    h.now += 1_000;
    h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(h.wf.state, WorkflowState::Failed);
    assert!(
        h.wf.message
            .contains("step step2 could not be placed for 300 s")
            && h.wf.message.contains("no job type named foojob1"),
        "{}",
        h.wf.message
    );
    assert_eq!(h.wf.steps[1].state, StepState::Failed);
}

#[test]
fn a_request_nobody_answers_is_blocked_after_the_answer_timeout_until_an_offer() {
    let mut h = H::new(SIMPLE);
    h.peers.known = 1;
    h.with(|wf, ctx| wf.start(ctx));
    h.now += 9_999;
    h.with(|wf, ctx| wf.tick(ctx));
    assert!(h.wf.steps[0]
        .request
        .as_ref()
        .is_some_and(|r| r.blocked.is_none()));
    h.now += 1;
    h.with(|wf, ctx| wf.tick(ctx));
    let why = h.wf.steps[0]
        .request
        .as_ref()
        .and_then(|r| r.blocked.clone())
        .expect("blocked")
        .reason;
    assert!(why.contains("no agent answered within 10 s"), "{why}");
    h.fulfil(0, AGENT);
    assert!(h.wf.steps[0]
        .request
        .as_ref()
        .is_some_and(|r| r.blocked.is_none()));
}

#[test]
fn a_step_policy_sets_its_attempts_and_back_off() {
    let doc = SIMPLE.replace(
        "CaroniJobName: foojob0",
        "CaroniJobName: foojob0\n        CaroniMaxAttempts: 2\n        CaroniRetryBackoff: {initial: 3s, max: 4s}",
    );
    let mut h = H::new(&doc);
    assert_eq!(h.wf.steps[0].policy.max_attempts, Some(2));
    h.with(|wf, ctx| wf.start(ctx));
    let (j, _) = h.fulfil(0, AGENT);
    h.status(AGENT, j, JobState::Failed, 1).expect("failed");
    let r = h.wf.steps[0].request.as_ref().expect("request");
    assert_eq!(r.next_publish_at_ms, h.now + 3_000);
    let (j, _) = h.fulfil(0, AGENT);
    h.status(AGENT, j, JobState::Failed, 1).expect("failed");
    assert_eq!(h.wf.state, WorkflowState::Failed);
    assert!(
        h.wf.message.contains("failed 2 time(s)"),
        "{}",
        h.wf.message
    );
}

#[test]
fn resume_reruns_only_unfinished_steps_and_keeps_outputs() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    h.complete(AGENT, j0, "jobout", "CARONIROCKS");
    let (j1, _) = h.fulfil(1, AGENT);
    h.with(|wf, ctx| wf.cancel(ctx, "by a user"));
    assert_eq!(h.wf.state, WorkflowState::Cancelled);
    let e = h.with(|wf, ctx| wf.tick(ctx));
    assert!(e.is_empty());
    let fx = h.with(|wf, ctx| wf.resume(ctx)).expect("resumes");
    assert_eq!(h.wf.steps[0].state, StepState::Completed, "kept");
    assert_eq!(h.wf.steps[0].attempts.len(), 1, "not run again");
    assert_eq!(h.wf.steps[1].state, StepState::Fulfilling);
    assert!(
        h.wf.steps[1].attempts[0].superseded,
        "replaced by the resume"
    );
    assert_eq!(h.wf.steps[1].failures(), 0);
    assert_eq!(publishes(&fx), 2, "steps 2 and 3 ask again");
    let (j1b, fx) = h.fulfil(1, AGENT_B);
    assert_ne!(j1b, j1);
    assert_eq!(
        data_to(&fx, j1b)
            .and_then(|d| d.get("text").cloned())
            .as_deref(),
        Some("CARONIROCKS"),
        "the completed step's output is reused"
    );
    let err = h.with(|wf, ctx| wf.resume(ctx)).expect_err("live");
    assert!(err.contains("only a failed or cancelled"), "{err}");
}

fn load(slots: u32, free_slots: u32, queue_length: u32) -> Load {
    Load {
        slots,
        free_slots,
        queue_length,
    }
}

fn offer_with(h: &mut H, n: usize, agent: &str, l: Load) -> Vec<Effect> {
    let req = h.request(n);
    let now = h.now;
    h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            agent,
            &format!("http://{agent}"),
            req,
            Uuid::new_v4(),
            now + 60_000,
            l,
            None,
        )
    })
}

fn accepted_agent(fx: &[Effect]) -> Option<String> {
    fx.iter().find_map(|e| match e {
        Effect::Send(Outbound {
            to,
            msg: Msg::Accept { .. },
            ..
        }) => Some(to.clone()),
        _ => None,
    })
}

#[test]
fn offers_are_gathered_and_the_least_busy_agent_is_taken() {
    let mut h = H::new(SIMPLE);
    h.window = 5;
    h.peers.known = 2;
    h.with(|wf, ctx| wf.start(ctx));
    // The busy agent answers first: nothing is decided yet.
    let fx = offer_with(&mut h, 0, AGENT, load(2, 0, 4));
    assert!(fx.is_empty(), "{fx:?}");
    // Every known agent has answered: decided at once, no waiting.
    let fx = offer_with(&mut h, 0, AGENT_B, load(2, 2, 0));
    assert_eq!(accepted_agent(&fx).as_deref(), Some(AGENT_B));
    assert!(fx.iter().any(|e| matches!(e,
        Effect::Send(Outbound { to, msg: Msg::Reject { .. }, .. }) if to == AGENT)));
    // The manager's own count of jobs it placed counts when it is larger
    // than what the offer says.
    h.peers.live.insert(AGENT_B.into(), 10);
    offer_with(&mut h, 1, AGENT_B, load(2, 2, 0));
    let fx = offer_with(&mut h, 1, AGENT, load(2, 1, 0));
    assert_eq!(accepted_agent(&fx).as_deref(), Some(AGENT));
}

#[test]
fn the_window_closes_on_time_when_an_agent_stays_silent() {
    let mut h = H::new(SIMPLE);
    h.window = 5;
    h.peers.known = 2;
    h.with(|wf, ctx| wf.start(ctx));
    assert!(offer_with(&mut h, 0, AGENT, load(2, 0, 9)).is_empty());
    let due =
        h.wf.next_deadline(h.lease, &h.peers, (10_000, 300_000))
            .expect("a deadline");
    assert_eq!(due, h.now + 5, "the window is a timer");
    h.now += 5;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(accepted_agent(&fx).as_deref(), Some(AGENT));
}

#[test]
fn a_request_only_one_agent_answers_is_not_delayed() {
    let mut h = H::new(SIMPLE);
    h.window = 5;
    h.peers.known = 2;
    h.with(|wf, ctx| wf.start(ctx));
    // The other agent declines: that closes the window too.
    let req = h.request(0);
    h.with(|wf, ctx| wf.on_decline(ctx, AGENT_B, req, "no job type foojob0"));
    let fx = offer_with(&mut h, 0, AGENT, load(1, 0, 3));
    assert_eq!(accepted_agent(&fx).as_deref(), Some(AGENT));
    // With one known agent, its offer is taken at once.
    h.peers.known = 1;
    let fx = offer_with(&mut h, 1, AGENT, load(1, 0, 3));
    assert_eq!(accepted_agent(&fx).as_deref(), Some(AGENT));
}

#[test]
fn an_agent_that_is_heard_from_keeps_its_jobs_past_the_lease() {
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let (j0, _) = h.fulfil(0, AGENT);
    // The job's own news is queued behind a long backlog, but the agent
    // acks our messages: two leases pass without a failed attempt.
    for _ in 0..6 {
        h.now += h.lease / 3;
        h.peers.heard.insert(AGENT.into(), h.now);
        h.with(|wf, ctx| wf.tick(ctx));
    }
    assert_eq!(h.wf.steps[0].attempts.len(), 1);
    assert!(h.wf.steps[0].attempts[0].is_live(), "job {j0} is kept");
    // Once the agent itself falls silent for a lease, the job is lost.
    h.now += h.lease;
    h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(h.wf.steps[0].attempts[0].state, JobState::Failed);
    assert!(h.wf.steps[0].attempts[0].message.contains("silent"));
}

#[test]
fn a_join_gets_each_value_once() {
    const DIAMOND: &str = include_str!("../../../../examples/templates/diamond.cwl");
    let parsed = caroni_cwl::parse(DIAMOND).expect("template");
    let inputs = BTreeMap::from([("text".to_string(), "ab".to_string())]);
    let mut h = H::new(SIMPLE);
    h.wf = Workflow::create(Uuid::from_u128(2), "d", &parsed, inputs, 1_000).expect("create");
    h.with(|wf, ctx| wf.start(ctx));
    let idx = |h: &H, id: &str| h.wf.steps.iter().position(|s| s.id == id).expect("step");
    let mut jobs = BTreeMap::new();
    for id in ["split", "upper", "reverse", "join", "finalize"] {
        let n = idx(&h, id);
        jobs.insert(id, h.fulfil(n, AGENT).0);
    }
    let both = BTreeMap::from([
        ("left".to_string(), "a".to_string()),
        ("right".to_string(), "b".to_string()),
    ]);
    let split = jobs["split"];
    h.with(|wf, ctx| wf.on_data(ctx, AGENT, split, &both, None))
        .expect("data");
    h.status(AGENT, split, JobState::Completed, 10)
        .expect("split");
    assert_eq!(h.wf.steps[idx(&h, "split")].state, StepState::Completed);
    let fx = h.complete(AGENT, jobs["upper"], "upper", "A");
    assert_eq!(
        data_to(&fx, jobs["join"]),
        Some(BTreeMap::from([("a".to_string(), "A".to_string())]))
    );
    let fx = h.complete(AGENT, jobs["reverse"], "reversed", "b");
    assert_eq!(
        data_to(&fx, jobs["join"]),
        Some(BTreeMap::from([("b".to_string(), "b".to_string())])),
        "only the new value goes to the join"
    );
}

/// The agents a request was sent to directly, in order.
fn asked(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send(Outbound {
                to,
                msg: Msg::Request(_),
                ..
            }) => Some(to.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_request_goes_to_the_advertised_agent_then_the_next_then_to_gossip() {
    let mut h = H::new(SIMPLE);
    h.peers.adverts = vec!["a1".into(), "a2".into()];
    h.peers.known = 2;
    let fx = h.with(|wf, ctx| wf.start(ctx));
    assert_eq!(
        asked(&fx),
        ["a1", "a1", "a1"],
        "each step asks the best agent"
    );
    assert_eq!(publishes(&fx), 0, "nothing broadcast");
    // A decline asks the next agent at once.
    let req = h.request(0);
    let fx = h.with(|wf, ctx| wf.on_decline(ctx, "a1", req, "busy elsewhere"));
    assert_eq!(asked(&fx), ["a2"]);
    // Silence from an agent never heard from: after the wait, broadcast.
    h.now += ASK_WAIT_MS;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Publish(r) if r.request_id == req)),
        "every fitting agent was asked: the request goes on gossip"
    );
    // An offer from an agent asked is taken at once (no offer window).
    h.window = 5_000;
    let req1 = h.request(1);
    assert!(h.offer(1, "a1").is_some(), "accepted without waiting");
    assert_ne!(req1, h.request(0));
}

#[test]
fn an_asked_agent_that_is_heard_from_is_waited_for() {
    let mut h = H::new(SIMPLE);
    h.peers.adverts = vec!["a1".into(), "a2".into()];
    h.with(|wf, ctx| wf.start(ctx));
    // a1 is alive (its acks and other news arrive) but its answer waits.
    h.now += ASK_WAIT_MS;
    h.peers.heard.insert("a1".into(), h.now - 1);
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert!(asked(&fx).is_empty() && publishes(&fx) == 0, "{fx:?}");
    // Silent for a whole wait: the next agent is asked.
    h.now += ASK_WAIT_MS;
    let fx = h.with(|wf, ctx| wf.tick(ctx));
    assert_eq!(asked(&fx), ["a2", "a2", "a2"]);
}

#[test]
fn an_offer_over_the_steps_maximum_is_let_go_with_the_reason() {
    let mut h = H::new(SIMPLE);
    h.wf.steps[0].needs.max_price_milli = Some(100);
    h.with(|wf, ctx| wf.start(ctx));
    let req = h.request(0);
    let price = caroni_types::market::Price {
        fixed_milli: 500,
        per_second_milli: 0,
    };
    let now = h.now;
    let fx = h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            "dear",
            "http://dear:1",
            req,
            Uuid::new_v4(),
            now + 60_000,
            Load::default(),
            Some((price, 500)),
        )
    });
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Send(Outbound {
            msg: Msg::Reject { .. },
            ..
        })
    )));
    assert!(h.wf.steps[0].attempts.is_empty(), "no attempt for it");
    let declines = &h.wf.steps[0].request.as_ref().expect("request").declines;
    assert!(
        declines.iter().any(|(a, why)| a == "dear"
            && why.contains("may cost up to 0.5 credits, the step pays at most 0.1")),
        "{declines:?}"
    );
}

/// An offer from `agent` for step `n` at a fixed price (thousandths);
/// returns the effects.
fn priced_offer(h: &mut H, n: usize, agent: &str, fixed: u64) -> Vec<Effect> {
    let req = h.request(n);
    let now = h.now;
    let price = caroni_types::market::Price {
        fixed_milli: fixed,
        per_second_milli: 0,
    };
    h.with(|wf, ctx| {
        wf.on_offer(
            ctx,
            agent,
            "http://agent:1",
            req,
            Uuid::new_v4(),
            now + 60_000,
            Load::default(),
            Some((price, fixed)),
        )
    })
}

fn accepted(fx: &[Effect]) -> Option<Uuid> {
    fx.iter().find_map(|e| match e {
        Effect::Send(Outbound {
            msg: Msg::Accept { job_id, .. },
            ..
        }) => Some(*job_id),
        _ => None,
    })
}

#[test]
fn a_budget_is_never_exceeded_by_offers_taken_together() {
    let mut h = H::new(SIMPLE);
    h.wf.budget = Some(crate::model::WorkflowBudget {
        limit: caroni_types::market::Budget {
            limit_milli: 1_500,
            fail_when_exhausted: false,
        },
        allotted_milli: 0,
    });
    h.with(|wf, ctx| wf.start(ctx));
    // Every request went out with the whole budget as its maximum.
    let jr = h.with(|wf, ctx| wf.job_request(1, ctx)).expect("request");
    assert_eq!(jr.needs.max_price_milli, Some(1_500));
    // The first offer reserves 1 credit of 1.5.
    assert!(accepted(&priced_offer(&mut h, 0, AGENT, 1_000)).is_some());
    assert_eq!(h.wf.reserved_milli(), 1_000);
    assert_eq!(h.wf.budget_left_milli(), Some(500));
    // A second offer of 1 credit for another step no longer fits: let go,
    // and the step's request says why.
    let fx = priced_offer(&mut h, 1, AGENT_B, 1_000);
    assert!(accepted(&fx).is_none());
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Send(Outbound {
            msg: Msg::Reject { .. },
            ..
        })
    )));
    let req = h.wf.steps[1].request.as_ref().expect("request");
    assert!(
        req.declines[0]
            .1
            .contains("budget of 1.5 credits has 0.5 left"),
        "{:?}",
        req.declines
    );
    // What is left is the new maximum; a cheaper offer is taken.
    let jr = h.with(|wf, ctx| wf.job_request(1, ctx)).expect("request");
    assert_eq!(jr.needs.max_price_milli, Some(500));
    assert!(accepted(&priced_offer(&mut h, 1, AGENT_B, 500)).is_some());
    assert!(h.wf.spent_milli() + h.wf.reserved_milli() <= 1_500);
    assert_eq!(h.wf.budget_left_milli(), Some(0));
}

#[test]
fn a_receipt_is_countersigned_only_when_it_matches_the_managers_record() {
    use caroni_types::ledger::{values_sha256, Receipt};
    let mut h = H::new(SIMPLE);
    h.with(|wf, ctx| wf.start(ctx));
    let job = accepted(&priced_offer(&mut h, 0, AGENT, 700)).expect("accepted");
    let up = StatusUpdate {
        job_id: job,
        state: JobState::Completed,
        message: String::new(),
        exit_status: Some(0),
        stderr_tail: String::new(),
        sequence: 5,
        executor: String::new(),
        external_id: String::new(),
        queued_at_ms: Some(1_000),
        started_at_ms: Some(2_000),
        ended_at_ms: Some(4_500),
        failure: String::new(),
        receipt: None,
    };
    let items = BTreeMap::from([("jobout".to_string(), "X".to_string())]);
    h.with(|wf, ctx| wf.on_data(ctx, AGENT, job, &items, None))
        .expect("data");
    h.with(|wf, ctx| wf.on_status(ctx, AGENT, &up))
        .expect("status");
    let good = Receipt {
        job_id: job,
        workflow_id: Some(h.wf.id),
        manager: "m".into(),
        agent: AGENT.into(),
        job_type: "foojob0".into(),
        state: JobState::Completed,
        inputs_sha256: values_sha256(&BTreeMap::new()),
        outputs_sha256: values_sha256(&BTreeMap::new()),
        wall_ms: 2_500,
        cpu_ms: None,
        price: caroni_types::market::Price {
            fixed_milli: 700,
            per_second_milli: 0,
        },
        max_charge_milli: 700,
        charge_milli: 700,
        ended_at_ms: 4_500,
    };
    assert_eq!(h.wf.check_receipt("m", AGENT, &good), Ok(()));
    let dispute =
        |r: Receipt, sender: &str| h.wf.check_receipt("m", sender, &r).expect_err("disputed");
    assert!(dispute(good.clone(), AGENT_B).contains("not its sender"));
    let over = Receipt {
        charge_milli: 701,
        max_charge_milli: 900,
        ..good.clone()
    };
    assert!(dispute(over, AGENT).contains("the offer named"));
    let longer = Receipt {
        wall_ms: 9_000,
        ..good.clone()
    };
    assert!(dispute(longer, AGENT).contains("its status said 2500 ms"));
    let failed = Receipt {
        state: JobState::Failed,
        ..good.clone()
    };
    assert!(dispute(failed, AGENT).contains("its status said completed"));
    let other = Receipt {
        job_id: Uuid::from_u128(999),
        agent: AGENT.into(),
        ..good.clone()
    };
    assert!(dispute(other, AGENT).contains("has no job"));
    let elsewhere = Receipt {
        manager: "m2".into(),
        ..good
    };
    assert!(dispute(elsewhere, AGENT).contains("names manager m2"));
}
