//! Traces that cross nodes: the manager sends each message about a
//! workflow with the workflow's id in the envelope, agents copy it onto
//! what they send about its jobs, and each side logs while handling a
//! message inside a span that names the workflow. So one workflow's log
//! lines are found on every node by its id, with `--log-format json` and
//! `RUST_LOG=caroni=debug`.

use std::collections::BTreeSet;
use std::time::Duration;

use caroni_tests::NodeProc;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const ENV: [(&str, &str); 1] = [("RUST_LOG", "info,caroni=debug")];

/// The JSON log lines of a node.
fn lines(n: &NodeProc) -> Vec<Value> {
    n.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The workflow a line is about: its own field or one of its spans'.
fn workflow(line: &Value) -> Option<String> {
    let own = line["fields"]["workflow"].as_str();
    let spans = line["spans"].as_array().into_iter().flatten();
    own.into_iter()
        .chain(spans.filter_map(|s| s["workflow"].as_str()))
        .find(|w| !w.is_empty())
        .map(str::to_string)
}

/// Lines about `id` that are `message` events inside a span named `span`
/// whose `kind` field is `kind` (any kind when empty).
fn count(lines: &[Value], id: &str, message: &str, kind: &str) -> usize {
    lines
        .iter()
        .filter(|l| workflow(l).as_deref() == Some(id))
        .filter(|l| l["fields"]["message"] == message)
        .filter(|l| kind.is_empty() || l["span"]["kind"] == kind)
        .count()
}

#[test]
fn one_workflows_log_lines_are_followed_across_manager_and_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = ["--log-format", "json"];
    let m =
        NodeProc::start_with_env(&dir.path().join("m"), "manager", &json, &ENV).expect("manager");
    let boot = m.p2p_addr();
    let a = NodeProc::start_with_env(
        &dir.path().join("a"),
        "agent",
        &["--log-format", "json", "--bootstrap", &boot],
        &ENV,
    )
    .expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);

    let ids: Vec<String> = ["first", "second"]
        .iter()
        .map(|text| {
            let id = m.run("test_simple", &[&format!("start_message={text}")]);
            let w = m.wait(&id, LIMIT);
            assert_eq!(w["state"], "completed", "{w:#}");
            id
        })
        .collect();

    let (ml, al) = (lines(&m), lines(&a));
    assert!(!ml.is_empty() && !al.is_empty(), "no JSON log lines");
    for id in &ids {
        // The agent learned the workflow of each accept from the envelope
        // alone (an accept's payload names only the offer and the job).
        let accepts = count(&al, id, "received", "JobFulfillmentOfferAccept");
        assert_eq!(accepts, 3, "accepts traced on the agent for {id}");
        // Its jobs ran inside spans that name the workflow.
        let started = al
            .iter()
            .filter(|l| workflow(l).as_deref() == Some(id.as_str()))
            .filter(|l| l["span"]["name"] == "job" && l["fields"]["message"] == "job started")
            .count();
        assert_eq!(started, 3, "job spans of {id} on the agent");
        // What the agent sent about them came back traced to the manager.
        let updates = count(&ml, id, "received", "JobStatusUpdate")
            + count(&ml, id, "received", "JobDataAvailable")
            + count(&ml, id, "received", "JobAccepted");
        assert!(
            updates >= 6,
            "{updates} traced agent messages at the manager for {id}"
        );
        assert!(
            count(&ml, id, "sending", "") >= 3,
            "the manager's sends of {id}"
        );
        assert_eq!(count(&ml, id, "workflow finished", ""), 1);
    }
    // Every traced line on the agent belongs to one of the two workflows.
    let seen: BTreeSet<String> = al.iter().filter_map(workflow).collect();
    assert_eq!(seen, ids.iter().cloned().collect::<BTreeSet<_>>());
}
