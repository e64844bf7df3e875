//! Moved nodes, hostile input, sizes and storage faults (issue 9), with
//! real `caroni-node` processes. Every wait is bounded.

use std::time::Duration;

use caroni_tests::{step, NodeProc, Ports};

const LIMIT: Duration = Duration::from_secs(120);

/// An agent killed while it holds a job and restarted on its data
/// directory at another peer address: the manager follows it there, the
/// job it held finishes without a new attempt.
#[test]
fn an_agent_that_comes_back_at_another_address_is_reached_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let mut a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob2.yaml"]);
    a.put_job_type(
        dir.path(),
        "foojob1",
        &["text"],
        &["outSB"],
        r#"sleep 2; jq -cn --arg t "$CARONI_ENV_text" '{outSB: ("prepend" + $t)}'"#,
        false,
    );
    let id = m.run("test_simple", &["start_message=moved"]);
    m.wait_until(&id, LIMIT, "step2 running", |w| {
        step(w, "step2")["state"] == "running"
    });
    a.kill();
    let old = a.ports;
    a.ports = Ports::pick();
    assert_ne!(old.peer, a.ports.peer);
    a.spawn().expect("agent restarts at another address");
    let w = m.wait(&id, Duration::from_secs(60));
    assert_eq!(w["outputs"]["result"], "prependMOVED append", "{w:#}");
    for s in w["steps"].as_array().expect("steps") {
        assert_eq!(s["attempts"], 1, "the move cost an attempt: {s:#}");
    }
}
