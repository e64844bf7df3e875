//! End-to-end faults: failed jobs and retries, SIGKILL and restart,
//! SIGSTOP, lost agents, cancellation. Every wait is bounded.

use std::time::{Duration, Instant};

use caroni_tests::{processes_with, step, NodeProc};

const LIMIT: Duration = Duration::from_secs(120);
const FIXED_FOOJOB2: &str = r#"jq -cn --arg t "$CARONI_ENV_final_text" '{out: ($t + " append")}'"#;
const BROKEN_FOOJOB2: &str = "sleep 2; echo 'this is not JSON'";

fn failed_attempts(s: &serde_json::Value) -> usize {
    s["attempt_history"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter(|a| a["state"] == "failed")
        .count()
}

/// The original's failure drill, fixed in time: the workflow completes.
#[test]
fn failure_drill_fixed_in_time_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    n.put_job_type(
        dir.path(),
        "foojob2",
        &["final_text"],
        &["out"],
        BROKEN_FOOJOB2,
        true,
    );
    let id = n.run("test_simple", &["start_message=caronirocks"]);
    let w = n.wait_until(&id, LIMIT, "the first failure of step3", |w| {
        failed_attempts(step(w, "step3")) >= 1
    });
    let first = &step(&w, "step3")["attempt_history"][0];
    assert!(
        first["message"]
            .as_str()
            .unwrap_or("")
            .contains("stdout is not a JSON object"),
        "{first:#}"
    );
    n.put_job_type(
        dir.path(),
        "foojob2",
        &["final_text"],
        &["out"],
        FIXED_FOOJOB2,
        true,
    );
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append");
    assert!(step(&w, "step3")["attempts"].as_u64().unwrap_or(0) >= 2);
}

/// Never fixed: the workflow fails after the fifth attempt, attempts visible.
#[test]
fn failure_drill_never_fixed_fails_after_five_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml"]);
    n.put_job_type(
        dir.path(),
        "foojob2",
        &["final_text"],
        &["out"],
        "echo 'broken' >&2; sleep 1; echo 'this is not JSON'",
        false,
    );
    let id = n.run("test_simple", &["start_message=caronirocks"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "failed", "{w:#}");
    let s3 = step(&w, "step3");
    assert_eq!(s3["state"], "failed");
    assert_eq!(failed_attempts(s3), 5);
    for a in s3["attempt_history"].as_array().expect("attempts") {
        assert_eq!(a["exit_status"], 0);
        assert!(
            a["stderr_tail"].as_str().unwrap_or("").contains("broken"),
            "{a:#}"
        );
        assert!(!a["agent"].as_str().unwrap_or("").is_empty());
    }
    assert!(w["message"]
        .as_str()
        .unwrap_or("")
        .contains("step step3 failed 5 time(s)"));
    let shown = n.ok(&["workflow", "show", &id]);
    assert!(
        shown.contains("failed attempts") && shown.contains("stdout is not a JSON object"),
        "{shown}"
    );
}

/// SIGKILL of the manager or the agent at random moments, 20 times, during
/// a batch of workflows: every workflow completes and each completed step
/// has exactly one successful job.
#[test]
fn twenty_sigkills_lose_nothing_and_do_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = NodeProc::start(&dir.path().join("m"), "manager", &["--lease-seconds", "60"])
        .expect("manager");
    let mut a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "2"]).expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml"]);
    a.put_job_type(
        dir.path(),
        "foojob2",
        &["final_text"],
        &["out"],
        &format!("sleep 0.2; {FIXED_FOOJOB2}"),
        false,
    );
    let ids: Vec<String> = (0..8)
        .map(|i| m.run("test_simple", &[&format!("start_message=w{i}")]))
        .collect();
    // A deterministic pseudo-random schedule (no extra dependency needed).
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for kill in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        let victim = if kill % 2 == 0 { &mut m } else { &mut a };
        victim.kill();
        victim.spawn().expect("restart after SIGKILL");
        if kill == 10 {
            // More work arrives in the middle of the chaos.
            for i in 8..12 {
                let _ = m.run("test_simple", &[&format!("start_message=w{i}")]);
            }
        }
    }
    let all = m.json(&["workflow", "list", "--limit", "100"]);
    let all_ids: Vec<String> = all
        .as_array()
        .expect("list")
        .iter()
        .map(|w| w["id"].as_str().expect("id").to_string())
        .collect();
    assert!(all_ids.len() >= ids.len());
    let start = Instant::now();
    for id in &all_ids {
        let w = m.wait(
            id,
            LIMIT
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5)),
        );
        assert_eq!(w["state"], "completed", "{w:#}");
        let input = w["inputs"]["start_message"]
            .as_str()
            .expect("input")
            .to_uppercase();
        assert_eq!(w["outputs"]["result"], format!("prepend{input} append"));
        for s in w["steps"].as_array().expect("steps") {
            let ok = s["attempt_history"]
                .as_array()
                .expect("attempts")
                .iter()
                .filter(|a| a["state"] == "completed")
                .count();
            assert_eq!(
                ok, 1,
                "step {} of {id} has {ok} successful jobs: {s:#}",
                s["id"]
            );
        }
    }
    // The agent ran each completed job once: no completed job is listed twice
    // for the same step and input.
    a.completed_once();
}

/// SIGSTOP of the agent for 20 s mid-workflow, then SIGCONT: the workflow
/// completes with no attempt lost.
#[test]
fn a_stopped_agent_resumes_without_losing_an_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_demo_job_types_with_slow_step2(dir.path(), 1);
    let id = m.run("test_simple", &["start_message=paused"]);
    m.wait_until(&id, LIMIT, "step2 running", |w| {
        step(w, "step2")["state"] == "running"
    });
    a.signal("STOP");
    std::thread::sleep(Duration::from_secs(20));
    a.signal("CONT");
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependPAUSED append", "{w:#}");
    for s in w["steps"].as_array().expect("steps") {
        assert_eq!(s["attempts"], 1, "an attempt was lost: {s:#}");
    }
}

/// Two capable agents; the one running the job dies for good: after the
/// lease the step is re-fulfilled on the other and the workflow completes.
#[test]
fn a_lost_agent_costs_one_attempt_and_the_other_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &["--lease-seconds", "3"])
        .expect("manager");
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        let a = NodeProc::agent_of(&m, &dir.path().join(name), &[]).expect("agent");
        a.add_demo_job_types_with_slow_step2(dir.path(), 4);
        agents.push(a);
    }
    m.add_demo_template();
    let id = m.run("test_simple", &["start_message=lost"]);
    let w = m.wait_until(&id, LIMIT, "step2 running", |w| {
        step(w, "step2")["state"] == "running"
    });
    let holder = step(&w, "step2")["agent"]
        .as_str()
        .expect("agent")
        .to_string();
    let ids: Vec<String> = agents.iter().map(|a| a.node_id()).collect();
    let k = ids
        .iter()
        .position(|i| *i == holder)
        .expect("holder is one of ours");
    agents[k].kill();
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependLOST append", "{w:#}");
    let s2 = step(&w, "step2");
    let hist = s2["attempt_history"].as_array().expect("attempts");
    assert_eq!(hist.len(), 2, "{s2:#}");
    assert!(
        hist[0]["message"].as_str().unwrap_or("").contains("silent"),
        "{s2:#}"
    );
    assert_eq!(hist[1]["agent"], ids[1 - k]);
}

/// Cancel during a `sleep 30` job: the process is gone within seconds and
/// the (single) slot runs the next job.
#[test]
fn cancel_kills_the_process_and_frees_the_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &["--slots", "1"]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob1.yaml", "foojob2.yaml"]);
    // A unique duration marks this test's processes among parallel tests.
    let marker = format!("30.{}", caroni_tests::free_port());
    n.put_job_type(
        dir.path(),
        "foojob0",
        &["message"],
        &["jobout"],
        &format!("sleep {marker} & wait; echo '{{}}'"),
        false,
    );
    let id = n.run("test_simple", &["start_message=x"]);
    n.wait_until(&id, LIMIT, "step1 running", |w| {
        step(w, "step1")["state"] == "running"
    });
    let t0 = Instant::now();
    while processes_with(&format!("sleep {marker}")) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the job's sleep never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = n.json(&["workflow", "cancel", &id]);
    assert_eq!(out["state"], "cancelled");
    let again = n.fails(&["workflow", "cancel", &id]);
    assert!(again.contains("is already cancelled"), "{again}");
    let t = Instant::now();
    while processes_with(&format!("sleep {marker}")) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the job's process outlived the cancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("process gone {:?} after cancel", t.elapsed());
    // The slot is free: a quick workflow runs to the end.
    n.put_job_type(
        dir.path(),
        "foojob0",
        &["message"],
        &["jobout"],
        r#"jq -cn --arg m "$CARONI_ENV_message" '{jobout: ($m | ascii_upcase)}'"#,
        true,
    );
    let id2 = n.run("test_simple", &["start_message=next"]);
    assert_eq!(
        n.wait(&id2, LIMIT)["outputs"]["result"],
        "prependNEXT append"
    );
    let job = n.json(&["job", "list"]);
    assert!(job
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["state"] == "cancelled"
            && j["message"]
                .as_str()
                .unwrap_or("")
                .contains("cancelled by the manager")));
}
