//! Dynamic workflows end to end, with real `caroni-node` processes: a
//! scatter, a condition and a sub-workflow in one template; SIGKILL of the
//! manager in the middle of a scatter; cancelling a scatter kills every
//! live element. Every wait is bounded; every node is killed on drop.

use std::time::{Duration, Instant};

use caroni_tests::{example, processes_with, step, NodeProc};

const LIMIT: Duration = Duration::from_secs(120);

fn list(v: &serde_json::Value) -> Vec<serde_json::Value> {
    serde_json::from_str(v.as_str().expect("a value")).expect("a JSON list")
}

#[test]
fn scatter_condition_and_subworkflow_run_and_show_under_their_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "4"]).expect("agent");
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    m.ok(&[
        "template",
        "add",
        "fanout",
        &example("templates/fanout.cwl"),
    ]);
    let id = m.run("fanout", &[r#"words=["caroni","rocks","far"]"#]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(
        list(&w["outputs"]["loud"]),
        vec!["CARONI", "ROCKS", "FAR"],
        "one job per word, gathered in order"
    );
    assert_eq!(w["outputs"]["extra"], "null", "the skipped step gives null");
    assert_eq!(w["outputs"]["framed"], "prependCARONI append");
    assert_eq!(step(&w, "maybe")["state"], "skipped");
    let shown = m.json(&["workflow", "show", &id]);
    let shout = step(&shown, "shout");
    assert_eq!(shout["elements"]["total"], 3);
    assert_eq!(shout["elements"]["completed"], 3);
    assert_eq!(shout["children"].as_array().map(Vec::len), Some(3));
    let frame = step(&shown, "frame");
    assert_eq!(frame["subworkflow"], true);
    // The table view prints the sub-workflow's steps under its step.
    let text = m.ok(&["workflow", "show", &id]);
    assert!(text.contains("frame/open"), "{text}");
    assert!(text.contains("scatter of 3 jobs: 3 completed"), "{text}");
    // Children run elements; `workflow list` shows what users started.
    let all = m.json(&["workflow", "list"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all:#}");
    // With also=true the condition holds.
    let id = m.run("fanout", &[r#"words=["x"]"#, "also=true"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["extra"], "X", "{w:#}");
}

/// SIGKILL of the manager three times during a scatter of 40 elements:
/// the workflow completes with every element's output in order, and no
/// element that completed ran again.
#[test]
fn sigkills_of_the_manager_mid_scatter_lose_nothing_and_rerun_no_completed_element() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = NodeProc::start(&dir.path().join("m"), "manager", &["--lease-seconds", "60"])
        .expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "4"]).expect("agent");
    a.put_job_type(
        dir.path(),
        "foojob0",
        &["message"],
        &["jobout"],
        r#"sleep 0.1; jq -cn --arg m "$CARONI_ENV_message" '{jobout: ($m | ascii_upcase)}'"#,
        false,
    );
    a.add_job_types(&["foojob1.yaml", "foojob2.yaml"]);
    m.ok(&[
        "template",
        "add",
        "fanout",
        &example("templates/fanout.cwl"),
    ]);
    let words: Vec<String> = (0..40).map(|k| format!("w{k}")).collect();
    let id = m.run(
        "fanout",
        &[&format!(
            "words={}",
            serde_json::to_string(&words).expect("json")
        )],
    );
    for pause in [300, 700, 500] {
        std::thread::sleep(Duration::from_millis(pause));
        m.kill();
        m.spawn().expect("restart after SIGKILL");
    }
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    let expected: Vec<String> = words.iter().map(|w| w.to_uppercase()).collect();
    assert_eq!(list(&w["outputs"]["loud"]), expected);
    let completed = a.completed_once();
    assert_eq!(
        completed,
        40 + 2,
        "40 elements and the sub-workflow's 2 steps"
    );
}

/// Cancelling a workflow while its scatter's elements run kills every
/// element's process.
#[test]
fn cancelling_a_scatter_kills_every_live_element() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "3"]).expect("agent");
    let marker = format!("30.{}", caroni_tests::free_port());
    a.put_job_type(
        dir.path(),
        "foojob0",
        &["message"],
        &["jobout"],
        &format!("sleep {marker} & wait; echo '{{}}'"),
        false,
    );
    a.add_job_types(&["foojob1.yaml", "foojob2.yaml"]);
    m.ok(&[
        "template",
        "add",
        "fanout",
        &example("templates/fanout.cwl"),
    ]);
    let id = m.run("fanout", &[r#"words=["a","b","c","d","e"]"#]);
    let t0 = Instant::now();
    while processes_with(&format!("sleep {marker}")) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "three elements never ran at once"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = m.json(&["workflow", "cancel", &id]);
    assert_eq!(out["state"], "cancelled");
    let t = Instant::now();
    while processes_with(&format!("sleep {marker}")) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "an element's process outlived the cancel"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shown = m.json(&["workflow", "show", &id]);
    for c in step(&shown, "shout")["children"]
        .as_array()
        .expect("children")
    {
        assert_eq!(c["state"], "cancelled", "{shown:#}");
    }
}
