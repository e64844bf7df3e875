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
        answer_timeout: std::time::Duration::from_secs(10),
        unplaceable_timeout: std::time::Duration::from_secs(300),
        node_id: "manager".into(),
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
        for (id, wf) in &out.finished {
            self.w.stored.insert(*id, wf.clone());
        }
        (a, out)
    }
    fn run(&mut self) -> (Uuid, Out) {
        self.run_with_priority(0)
    }
    fn run_with_priority(&mut self, priority: i32) -> (Uuid, Out) {
        let mut parsed = caroni_cwl::parse(SIMPLE).expect("template");
        parsed.priority = priority;
        let parsed = Arc::new(parsed);
        let (a, out) = self.input(Input::Run {
            template: "test_simple".into(),
            parsed,
            inputs: BTreeMap::from([("start_message".to_string(), "hi".to_string())]),
            request_id: None,
        });
        let Answer::Run(Ok((id, _))) = a else {
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
        price: Default::default(),
        max_charge_milli: 0,
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
fn waiting_workflows_are_admitted_highest_priority_first() {
    let mut t = T::new(manager(4, None));
    let (first, _) = t.run();
    let (low, _) = t.run_with_priority(0);
    let (high, out) = t.run_with_priority(7);
    assert!(out.publish.is_empty());
    assert_eq!(t.m.waiting(), 2);
    // The first's requests are fulfilled: room for one more workflow.
    let wf = t.m.workflow(&first, &Out::default()).expect("live").clone();
    t.w.known.insert("agentA".into());
    let mut admitted = Vec::new();
    let mut priorities = Vec::new();
    for (k, s) in wf.steps.iter().enumerate() {
        let r = s.request.as_ref().expect("request").id;
        let (_, out) = t.deliver("agentA", offer(r, 700 + k as u128));
        admitted.extend(out.publish.iter().filter_map(|p| p.workflow_id));
        priorities.extend(out.publish.iter().map(|p| p.priority));
    }
    // Its requests carry the priority to the agents.
    assert_eq!(priorities, [7, 7, 7]);
    admitted.dedup();
    assert_eq!(
        admitted,
        [high],
        "the later workflow of higher priority first"
    );
    let state = |id| t.m.workflow(&id, &Out::default()).map(|w| w.state);
    assert_eq!(state(low), Some(crate::model::WorkflowState::Created));
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

/// A template that scatters a job type over a list input, upper-cases
/// each element (the fake agent does), skips the elements the condition
/// rejects, and gathers.
const SCATTER: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
requirements:
  ScatterFeatureRequirement: {}
  InlineJavascriptRequirement: {}
inputs:
  words: string[]
outputs:
  loud:
    type: Any
    outputSource: shout/out
  picked:
    type: Any
    outputSource: [shout/out, words]
    linkMerge: merge_flattened
    pickValue: first_non_null
steps:
  shout:
    run:
      class: CommandLineTool
      inputs:
        text: string
      outputs:
        out: string
    hints:
      caroni:CaroniRequirement:
        CaroniJobName: upper
        CaroniRetryBackoff: 0
    scatter: text
    when: $(inputs.text != "skip")
    in:
      text: words
    out: [out]
"#;

impl T {
    fn run_template(&mut self, text: &str, inputs: &[(&str, &str)]) -> (Uuid, Out) {
        let parsed = Arc::new(caroni_cwl::parse(text).expect("template"));
        let (a, out) = self.input(Input::Run {
            template: "t".into(),
            parsed,
            inputs: inputs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            request_id: None,
        });
        let Answer::Run(Ok((id, _))) = a else {
            panic!("run: {a:?}");
        };
        (id, out)
    }

    /// Serves every request of `out` (and of what follows) as an agent
    /// that upper-cases its `text`, until nothing is left to serve; returns
    /// how many jobs ran.
    fn serve(&mut self, out: Out, fail: &dyn Fn(&str) -> bool) -> usize {
        let mut queue = vec![out];
        let mut jobs = 0;
        let mut inputs: HashMap<Uuid, String> = HashMap::new();
        let mut offer_n = 5_000u128;
        while let Some(out) = queue.pop() {
            for req in &out.publish {
                offer_n += 1;
                let (_, o) = self.deliver("agent", offer(req.request_id, offer_n));
                queue.push(o);
            }
            for (o, _) in &out.send {
                match &o.msg {
                    Msg::Accept {
                        offer_id, job_id, ..
                    } => {
                        let (_, o) = self.deliver(
                            "agent",
                            Msg::Accepted {
                                job_id: *job_id,
                                offer_id: *offer_id,
                            },
                        );
                        queue.push(o);
                    }
                    Msg::Data {
                        job_id,
                        items,
                        outputs: false,
                    } => {
                        let text = items.get("text").cloned().unwrap_or_default();
                        inputs.insert(*job_id, text.clone());
                        jobs += 1;
                        let (state, message) = if fail(&text) {
                            (caroni_types::msg::JobState::Failed, "boom".to_string())
                        } else {
                            let (_, o) = self.deliver(
                                "agent",
                                Msg::Data {
                                    job_id: *job_id,
                                    items: BTreeMap::from([("out".into(), text.to_uppercase())]),
                                    outputs: true,
                                },
                            );
                            queue.push(o);
                            (caroni_types::msg::JobState::Completed, String::new())
                        };
                        let (_, o) = self.deliver(
                            "agent",
                            Msg::Status(caroni_types::msg::StatusUpdate {
                                job_id: *job_id,
                                state,
                                message,
                                exit_status: Some(0),
                                stderr_tail: String::new(),
                                sequence: 1,
                                executor: String::new(),
                                external_id: String::new(),
                                queued_at_ms: None,
                                started_at_ms: None,
                                ended_at_ms: None,
                                failure: String::new(),
                                receipt: None,
                            }),
                        );
                        queue.push(o);
                    }
                    _ => {}
                }
            }
        }
        jobs
    }
}

fn ended(t: &T, id: Uuid) -> &Workflow {
    assert!(!t.m.live.contains_key(&id), "workflow {id} is still live");
    t.w.stored.get(&id).expect("the workflow ended")
}

#[test]
fn a_scatter_runs_one_child_per_element_skips_by_condition_and_gathers_in_order() {
    let mut t = T::new(manager(512, None));
    let (id, out) = t.run_template(SCATTER, &[("words", r#"["a","skip","c","d"]"#)]);
    assert_eq!(
        out.created.len(),
        4,
        "the workflow and three children (one element skipped)"
    );
    assert_eq!(
        out.publish.len(),
        3,
        "one request per child; none for the step itself"
    );
    let jobs = t.serve(out, &|_| false);
    assert_eq!(jobs, 3);
    let wf = ended(&t, id);
    assert_eq!(wf.state, WorkflowState::Completed, "{}", wf.message);
    assert_eq!(&*wf.outputs["loud"], r#"["A",null,"C","D"]"#);
    assert_eq!(&*wf.outputs["picked"], "A");
    let fan = wf.steps[0].fan.clone().expect("elements");
    assert_eq!((fan.total, fan.done, fan.skipped, fan.failed), (4, 3, 1, 0));
    assert!(t.m.live.is_empty(), "no child is left behind");
}

#[test]
fn a_failed_element_fails_the_workflow_and_stops_the_others() {
    let mut t = T::new(manager(512, None));
    let (id, out) = t.run_template(SCATTER, &[("words", r#"["a","b","bad"]"#)]);
    let jobs = t.serve(out, &|text| text == "bad");
    // "bad" is tried as often as a step may be (5), the others at most once.
    assert!((5..=7).contains(&jobs), "{jobs} jobs");
    let wf = ended(&t, id);
    assert_eq!(wf.state, WorkflowState::Failed);
    assert!(wf.message.contains("element 2 failed"), "{}", wf.message);
    assert!(t.m.live.is_empty());
}

#[test]
fn an_empty_scatter_completes_with_an_empty_list_and_no_job() {
    let mut t = T::new(manager(512, None));
    let (id, out) = t.run_template(SCATTER, &[("words", "[]")]);
    assert_eq!(t.serve(out, &|_| false), 0);
    let wf = ended(&t, id);
    // `picked` takes the first non-null of nothing: the specification's
    // error.
    assert_eq!(wf.state, WorkflowState::Failed);
    assert!(wf.message.contains("first_non_null"), "{}", wf.message);
    let fan = wf.steps[0].fan.clone().expect("elements");
    assert_eq!((fan.total, fan.done), (0, 0));
    assert_eq!(&*wf.steps[0].results["out"], "[]");
}

#[test]
fn a_large_scatter_keeps_at_most_a_window_of_elements_live() {
    let mut t = T::new(manager(100_000, None));
    let words: Vec<String> = (0..1_000).map(|k| format!("w{k}")).collect();
    let list = serde_json::to_string(&words).expect("json");
    let (id, out) = t.run_template(SCATTER, &[("words", &list)]);
    assert_eq!(out.created.len() as u64, 1 + crate::machine::FAN_WINDOW);
    assert_eq!(t.serve(out, &|_| false), 1_000);
    let wf = ended(&t, id);
    assert_eq!(wf.state, WorkflowState::Completed, "{}", wf.message);
    let loud: Vec<String> = serde_json::from_str(&wf.outputs["loud"]).expect("list");
    assert_eq!(loud.len(), 1_000);
    assert_eq!(loud[999], "W999", "element order is kept");
}

/// A workflow whose step runs a sub-workflow of two steps.
const NESTED: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
requirements:
  SubworkflowFeatureRequirement: {}
inputs:
  word: string
outputs:
  twice:
    type: string
    outputSource: inner/out
steps:
  inner:
    run:
      class: Workflow
      inputs:
        w: string
      outputs:
        out:
          type: string
          outputSource: second/out
      steps:
        first:
          run:
            class: CommandLineTool
            inputs: {text: string}
            outputs: {out: string}
          hints:
            caroni:CaroniRequirement: {CaroniJobName: upper}
          in: {text: w}
          out: [out]
        second:
          run:
            class: CommandLineTool
            inputs: {text: string}
            outputs: {out: string}
          hints:
            caroni:CaroniRequirement: {CaroniJobName: upper}
          in: {text: first/out}
          out: [out]
    in:
      w: word
    out: [out]
"#;

#[test]
fn a_subworkflow_runs_as_a_child_and_its_outputs_flow_out() {
    let mut t = T::new(manager(512, None));
    let (id, out) = t.run_template(NESTED, &[("word", "hi")]);
    assert_eq!(t.serve(out, &|_| false), 2);
    let wf = ended(&t, id);
    assert_eq!(wf.state, WorkflowState::Completed, "{}", wf.message);
    assert_eq!(&*wf.outputs["twice"], "HI");
}

#[test]
fn cancelling_a_parent_cancels_its_live_children() {
    let mut t = T::new(manager(512, None));
    let (id, _out) = t.run_template(SCATTER, &[("words", r#"["a","b"]"#)]);
    assert_eq!(t.m.live(), 3);
    let (a, _) = t.input(Input::Cancel(id));
    assert!(matches!(a, Answer::Cancel(Ok(()))));
    assert!(t.m.live.is_empty(), "every child ended with its parent");
    assert_eq!(ended(&t, id).state, WorkflowState::Cancelled);
}
