//! The manager machine's rules between workflows and peers, without
//! network, storage or clock: a fake `World`, fixed time and ids.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use caroni_types::delivery::DeliverError;
use caroni_types::msg::{Inbound, Load, Msg};
use uuid::Uuid;

use super::*;

const SIMPLE: &str = include_str!("../../../../examples/templates/test_simple.cwl");

#[derive(Default)]
struct Fake {
    stored: HashMap<Uuid, Workflow>,
    applied: HashSet<Uuid>,
    known: HashSet<String>,
}

impl World for Fake {
    fn is_applied(&self, id: &Uuid) -> caroni_store::Result<bool> {
        Ok(self.applied.contains(id))
    }
    fn stored(&self, id: &Uuid) -> caroni_store::Result<Option<Workflow>> {
        Ok(self.stored.get(id).cloned())
    }
    fn knows(&self, node: &str) -> bool {
        self.known.contains(node)
    }
    fn last_heard_ms(&self, _: &str) -> Option<u64> {
        None
    }
    fn holds_file(&self, _: &caroni_types::file::FileRef) -> bool {
        false
    }
}

fn manager(max_open: usize, use_agents: Option<&[&str]>) -> Manager {
    Manager::new(Options {
        endpoint: "http://me:1".into(),
        lease: Duration::from_secs(30),
        request_ttl: Duration::from_secs(600),
        max_open_requests: max_open,
        offer_window: Duration::ZERO,
        use_agents: use_agents.map(|l| l.iter().map(|s| s.to_string()).collect()),
    })
}

struct T {
    m: Manager,
    w: Fake,
    n: u128,
    now: u64,
}

impl T {
    fn new(m: Manager) -> Self {
        T {
            m,
            w: Fake::default(),
            n: 100,
            now: 1_000_000,
        }
    }
    fn input(&mut self, input: Input) -> (Answer, Out) {
        let mut n = self.n;
        let mut ids = || {
            n += 1;
            Uuid::from_u128(n)
        };
        let mut now = Now {
            ms: self.now,
            new_id: &mut ids,
        };
        let mut out = Out::default();
        let a = self.m.handle(input, &mut now, &self.w, &mut out);
        self.m.settle(&mut now, &self.w, &mut out);
        self.n = n;
        for id in &out.applied {
            self.w.applied.insert(*id);
        }
        (a, out)
    }
    fn run(&mut self) -> (Uuid, Out) {
        let parsed = Arc::new(caroni_cwl::parse(SIMPLE).expect("template"));
        let (a, out) = self.input(Input::Run {
            template: "test_simple".into(),
            parsed,
            inputs: BTreeMap::from([("start_message".to_string(), "hi".to_string())]),
        });
        let Answer::Run(Ok(id)) = a else {
            panic!("run: {a:?}");
        };
        (id, out)
    }
    fn deliver(&mut self, from: &str, msg: Msg) -> (Result<(), DeliverError>, Out) {
        self.deliver_id(Uuid::new_v4(), from, msg)
    }
    fn deliver_id(&mut self, id: Uuid, from: &str, msg: Msg) -> (Result<(), DeliverError>, Out) {
        let (a, out) = self.input(Input::Deliver(Inbound {
            id,
            from: from.into(),
            endpoint: format!("http://{from}:1"),
            trace: None,
            msg,
            unfetched: None,
        }));
        let Answer::Deliver(r) = a else {
            panic!("deliver: {a:?}");
        };
        (r, out)
    }
}

fn offer(request_id: Uuid, offer_id: u128) -> Msg {
    Msg::Offer {
        offer_id: Uuid::from_u128(offer_id),
        request_id,
        expires_at_ms: 2_000_000,
        load: Load::default(),
    }
}

fn sent(out: &Out) -> Vec<&Msg> {
    out.send.iter().map(|(o, _)| &o.msg).collect()
}

#[test]
fn workflows_wait_for_admission_in_order_while_requests_are_out() {
    // Each workflow puts three requests out; with room for four, the
    // second waits until the first's requests are fulfilled.
    let mut t = T::new(manager(4, None));
    let (first, out) = t.run();
    assert_eq!(out.publish.len(), 3);
    let (_, out) = t.run();
    assert!(out.publish.is_empty(), "the second workflow waits");
    assert_eq!(t.m.waiting(), 1);
    // Offers for the first's requests fulfil them; the second is admitted.
    let wf = t.m.workflow(&first, &Out::default()).expect("live").clone();
    let mut published = 0;
    for (k, s) in wf.steps.iter().enumerate() {
        let r = s.request.as_ref().expect("request").id;
        t.w.known.insert("agentA".into());
        let (res, out) = t.deliver("agentA", offer(r, 500 + k as u128));
        assert!(res.is_ok());
        published += out.publish.len();
    }
    assert_eq!(published, 3, "the waiting workflow was admitted");
    assert_eq!(t.m.waiting(), 0);
}

#[test]
fn offers_of_agents_not_in_use_are_rejected_or_refused_to_strangers() {
    let mut t = T::new(manager(512, Some(&["agentA"])));
    let (id, _) = t.run();
    let r = t.m.workflow(&id, &Out::default()).expect("live").steps[0]
        .request
        .as_ref()
        .expect("request")
        .id;
    let (res, out) = t.deliver("agentB", offer(r, 1));
    assert!(
        matches!(res, Err(DeliverError::Refused(_))),
        "a stranger is answered in the ack"
    );
    assert!(sent(&out).is_empty());
    assert_eq!(out.refused.len(), 1);
    t.w.known.insert("agentB".into());
    let (res, out) = t.deliver("agentB", offer(r, 2));
    assert!(res.is_ok());
    assert!(
        matches!(sent(&out)[..], [Msg::Reject { .. }]),
        "a known agent lets go"
    );
    let (res, out) = t.deliver("agentA", offer(r, 3));
    assert!(res.is_ok());
    assert!(matches!(sent(&out)[..], [Msg::Accept { .. }]));
}

#[test]
fn news_of_work_no_live_workflow_needs_is_rejected_or_killed_and_strangers_are_refused() {
    let mut t = T::new(manager(512, None));
    let job = Uuid::from_u128(77);
    let (res, out) = t.deliver(
        "agentA",
        Msg::Accepted {
            job_id: job,
            offer_id: Uuid::from_u128(1),
        },
    );
    assert!(matches!(res, Err(DeliverError::Refused(_))));
    assert!(sent(&out).is_empty());
    t.w.known.insert("agentA".into());
    let (res, out) = t.deliver(
        "agentA",
        Msg::Accepted {
            job_id: job,
            offer_id: Uuid::from_u128(1),
        },
    );
    assert!(res.is_ok());
    assert!(matches!(sent(&out)[..], [Msg::Kill { .. }]));
    let (res, out) = t.deliver("agentA", offer(Uuid::from_u128(5), 9));
    assert!(res.is_ok());
    assert!(matches!(sent(&out)[..], [Msg::Reject { .. }]));
}

#[test]
fn a_message_is_applied_once() {
    let mut t = T::new(manager(512, None));
    t.w.known.insert("agentA".into());
    let id = Uuid::from_u128(4242);
    let (_, out) = t.deliver_id(id, "agentA", offer(Uuid::from_u128(5), 9));
    assert_eq!(out.send.len(), 1);
    let (res, out) = t.deliver_id(id, "agentA", offer(Uuid::from_u128(5), 9));
    assert!(res.is_ok(), "a duplicate is acknowledged");
    assert!(
        out.send.is_empty() && out.applied.is_empty(),
        "and has no effect"
    );
}

#[test]
fn only_a_live_workflow_can_be_cancelled() {
    let mut t = T::new(manager(512, None));
    let (id, _) = t.run();
    let (a, out) = t.input(Input::Cancel(id));
    assert!(matches!(a, Answer::Cancel(Ok(()))));
    let ended = out.finished.get(&id).expect("ended").clone();
    assert_eq!(ended.state, WorkflowState::Cancelled);
    t.w.stored.insert(id, ended);
    let (a, _) = t.input(Input::Cancel(id));
    assert!(
        matches!(a, Answer::Cancel(Err(Error::Finished(_)))),
        "{a:?}"
    );
    let (a, _) = t.input(Input::Cancel(Uuid::from_u128(1)));
    assert!(matches!(a, Answer::Cancel(Err(Error::NotFound(_)))));
}

#[test]
fn the_next_timer_is_the_earliest_of_the_live_workflows() {
    let mut t = T::new(manager(512, None));
    assert_eq!(t.m.next_timer(), None);
    t.run();
    // Published now: the next publication is a second later.
    assert_eq!(t.m.next_timer(), Some(t.now + 1_000));
}
