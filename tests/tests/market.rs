//! End-to-end, with separate `caroni-node` processes: the market (issue
//! 25, docs/market.md). Agents advertise what they serve and have; a
//! manager asks the agent it chooses instead of broadcasting, so an agent
//! that cannot serve a step hears nothing of it; steps go only to agents
//! whose labels and resources fit; a step no agent can ever serve says
//! why.

use caroni_tests::{step, NodeProc};
use std::time::Duration;

const BODY: &str = r#"printf '{"out":"%s"}' "$CARONI_ENV_x""#;

/// Three steps in parallel: one wants region=eu, one 4 CPUs (CWL's
/// ResourceRequirement), one 16 CPUs.
const NEEDS: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  msg: string
outputs:
  eu_out: {type: string, outputSource: eu/out}
  big_out: {type: string, outputSource: big/out}
  huge_out: {type: string, outputSource: huge/out}
steps:
  eu:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work, CaroniLabels: {region: eu}}}
    in: {x: msg}
    out: [out]
  big:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    requirements: {ResourceRequirement: {coresMin: 4, ramMin: 1024}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work}}
    in: {x: msg}
    out: [out]
  huge:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work, CaroniCpus: 16}}
    in: {x: msg}
    out: [out]
"#;

/// Waits until the manager has heard `n` agents advertise job type
/// `job_type`.
fn wait_adverts(m: &NodeProc, job_type: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let peers = m.json(&["peers"]);
        let serving = peers
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| {
                        p["advert"]["job_types"]
                            .as_array()
                            .is_some_and(|t| t.iter().any(|t| t["name"] == job_type))
                    })
                    .count()
            })
            .unwrap_or(0);
        if serving >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} agents did not advertise {job_type} within 30 s: {peers:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Registers template `name` on manager `m` from `cwl` (written in `dir`).
fn add_template(m: &NodeProc, dir: &std::path::Path, name: &str, cwl: &str) {
    let t = dir.join(format!("{name}.cwl"));
    std::fs::write(&t, cwl).expect("write");
    m.ok(&["template", "add", name, t.to_str().expect("utf8")]);
}

/// Why step `s` of workflow `w` is blocked.
fn blocked(w: &serde_json::Value, s: &str) -> String {
    step(w, s)["blocked"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn agent_of_attempt(w: &serde_json::Value, s: &str) -> String {
    step(w, s)["attempt_history"]
        .as_array()
        .and_then(|a| a.last())
        .map(|a| a["agent"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn steps_go_where_labels_and_resources_fit_and_one_none_can_serve_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(
        &dir.path().join("m"),
        "manager",
        &["--unplaceable-timeout", "20s"],
    )
    .expect("manager");
    let eu = NodeProc::agent_of(
        &m,
        &dir.path().join("eu"),
        &["--cpus", "2", "--memory", "2g", "--label", "region=eu"],
    )
    .expect("agent eu");
    let us = NodeProc::agent_of(
        &m,
        &dir.path().join("us"),
        &["--cpus", "8", "--memory", "8g", "--label", "region=us"],
    )
    .expect("agent us");
    for a in [&eu, &us] {
        a.put_job_type(dir.path(), "work", &["x"], &["out"], BODY, false);
    }
    wait_adverts(&m, "work", 2);
    // What the manager heard is shown by `caroni peers`.
    let shown = m.ok(&["peers"]);
    assert!(
        shown.contains("region=eu") && shown.contains("region=us"),
        "{shown}"
    );
    add_template(&m, dir.path(), "needs", NEEDS);
    let id = m.run("needs", &["msg=hi"]);
    let w = m.wait_until(
        &id,
        Duration::from_secs(60),
        "eu and big done, huge blocked",
        |w| {
            step(w, "eu")["state"] == "completed"
                && step(w, "big")["state"] == "completed"
                && blocked(w, "huge").contains("16 CPUs")
        },
    );
    assert_eq!(agent_of_attempt(&w, "eu"), eu.node_id(), "{w:#}");
    assert_eq!(agent_of_attempt(&w, "big"), us.node_id(), "{w:#}");
    let why = blocked(&w, "huge");
    assert!(
        why.contains("needs 16 CPUs, the agents have 2 and 8"),
        "{why}"
    );
    let text = m.ok(&["workflow", "show", &id]);
    assert!(text.contains("16 CPUs"), "{text}");
    // It fails with that reason after --unplaceable-timeout.
    let end = m.wait(&id, Duration::from_secs(60));
    assert_eq!(end["state"], "failed", "{end:#}");
    assert!(
        end["message"]
            .as_str()
            .is_some_and(|s| s.contains("16 CPUs")),
        "{end:#}"
    );
}

#[test]
fn requests_go_to_the_agent_chosen_and_others_hear_nothing_of_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent a");
    let b = NodeProc::agent_of(&m, &dir.path().join("b"), &[]).expect("agent b");
    // c serves another job type only.
    let c = NodeProc::agent_of(&m, &dir.path().join("c"), &[]).expect("agent c");
    for x in [&a, &b] {
        x.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    }
    c.put_job_type(dir.path(), "other", &["x"], &["out"], BODY, false);
    wait_adverts(&m, "foojob2", 2);
    wait_adverts(&m, "other", 1);
    m.add_demo_template();
    let ids: Vec<String> = (0..6)
        .map(|i| m.run("test_simple", &[&format!("start_message=hello{i}")]))
        .collect();
    for id in &ids {
        let w = m.wait(id, Duration::from_secs(60));
        assert_eq!(w["state"], "completed", "{w:#}");
    }
    let status = |n: &NodeProc| n.json(&["status"]);
    // Nothing was broadcast: every request went to an advertised agent.
    assert_eq!(status(&m)["requests_broadcast"], 0, "{:#}", status(&m));
    // c never heard of these steps, so it said nothing.
    assert_eq!(status(&c)["messages_sent"], 0, "{:#}", status(&c));
    let done: u64 = [&a, &b]
        .iter()
        .map(|x| status(x)["jobs"]["completed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(done, 18, "each of the 18 steps ran once");
    let sent: u64 = [&m, &a, &b, &c]
        .iter()
        .map(|x| status(x)["messages_sent"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "{sent} direct messages for 18 steps: {:.2} per step",
        sent as f64 / 18.0
    );
}

/// A one-step workflow whose step runs job type `job`.
fn one_step(job: &str) -> String {
    format!(
        r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  msg: string
outputs:
  out: {{type: string, outputSource: s/out}}
steps:
  s:
    run: {{class: CommandLineTool, inputs: {{x: string}}, outputs: {{out: string}}}}
    hints: {{caroni:CaroniRequirement: {{CaroniJobName: {job}}}}}
    in: {{x: msg}}
    out: [out]
"#
    )
}

fn finished_ms(w: &serde_json::Value) -> i64 {
    let t = w["finished_at"].as_str().unwrap_or_default();
    chrono_ms(t)
}

/// Milliseconds of an RFC 3339 time (to compare times of one run).
fn chrono_ms(t: &str) -> i64 {
    humantime::parse_rfc3339(t)
        .ok()
        .and_then(|s| s.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// Manager a floods a one-slot agent first (twelve jobs of 0.3 s), manager
/// b second (six): with fair share, b's jobs run between a's rather than
/// after all of them.
#[test]
fn a_manager_that_floods_an_agent_first_does_not_starve_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ma = NodeProc::start(&dir.path().join("ma"), "manager", &[]).expect("manager a");
    let agent =
        NodeProc::agent_of(&ma, &dir.path().join("agent"), &["--slots", "1"]).expect("agent");
    let boot = ma.p2p_addr();
    let mb = NodeProc::start(
        &dir.path().join("mb"),
        "manager",
        &["--bootstrap", boot.as_str()],
    )
    .expect("manager b");
    agent.put_job_type(
        dir.path(),
        "slow",
        &["x"],
        &["out"],
        &format!("sleep 0.3; {BODY}"),
        false,
    );
    wait_adverts(&ma, "slow", 1);
    wait_adverts(&mb, "slow", 1);
    for m in [&ma, &mb] {
        add_template(m, dir.path(), "one", &one_step("slow"));
    }
    // a's twelve all at once, then b's six all at once.
    let submit = |m: &NodeProc, label: &str, n: usize| -> Vec<String> {
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..n)
                .map(|i| s.spawn(move || m.run("one", &[&format!("msg={label}{i}")])))
                .collect();
            runs.into_iter()
                .map(|r| r.join().expect("a submission"))
                .collect()
        })
    };
    let a_ids = submit(&ma, "a", 12);
    let b_ids = submit(&mb, "b", 6);
    let ends = |m: &NodeProc, ids: &[String]| -> Vec<i64> {
        let mut v: Vec<i64> = ids
            .iter()
            .map(|id| {
                let w = m.wait(id, Duration::from_secs(60));
                assert_eq!(w["state"], "completed", "{w:#}");
                finished_ms(&w)
            })
            .collect();
        v.sort();
        v
    };
    let a_end = ends(&ma, &a_ids);
    let b_end = ends(&mb, &b_ids);
    let (a_last, b_last) = (a_end[11], b_end[5]);
    println!(
        "a's last ended at +{} ms, b's last at +{} ms (from a's first)",
        a_last - a_end[0],
        b_last - a_end[0]
    );
    // First come, first served would run all of a's before any of b's;
    // sharing the agent, b's six end while a's are still running.
    assert!(
        b_last < a_last,
        "b's jobs waited behind a's: b's last ended {} ms after a's last",
        b_last - a_last
    );
}

/// Two steps in parallel that any agent serving `work` can run, and one
/// that pays at most 0.1 credits.
const PRICED: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  msg: string
outputs:
  a_out: {type: string, outputSource: a/out}
  b_out: {type: string, outputSource: b/out}
  stingy_out: {type: string, outputSource: stingy/out}
steps:
  a:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work, CaroniMaxPrice: 1}}
    in: {x: msg}
    out: [out]
  b:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work}}
    in: {x: msg}
    out: [out]
  stingy:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work, CaroniMaxPrice: 0.1}}
    in: {x: msg}
    out: [out]
"#;

#[test]
fn the_cheaper_agent_is_asked_a_step_pays_no_more_than_its_maximum_and_the_cost_is_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let cheap = NodeProc::agent_of(&m, &dir.path().join("cheap"), &[]).expect("cheap");
    let dear = NodeProc::agent_of(&m, &dir.path().join("dear"), &[]).expect("dear");
    for (a, fixed) in [(&cheap, "0.5"), (&dear, "2")] {
        priced_work(a, dir.path(), BODY, serde_json::json!({"fixed": fixed}));
    }
    let shown = cheap.ok(&["jobtype", "show", "work"]);
    assert!(shown.contains("price:   0.5 credits"), "{shown}");
    wait_adverts(&m, "work", 2);
    add_template(&m, dir.path(), "priced", PRICED);
    let id = m.run("priced", &["msg=hi"]);
    let w = m.wait_until(
        &id,
        Duration::from_secs(60),
        "a and b done, stingy blocked",
        |w| {
            step(w, "a")["state"] == "completed"
                && step(w, "b")["state"] == "completed"
                && blocked(w, "stingy").contains("0.1")
        },
    );
    // The cheaper agent had free slots for both.
    assert_eq!(agent_of_attempt(&w, "a"), cheap.node_id(), "{w:#}");
    assert_eq!(agent_of_attempt(&w, "b"), cheap.node_id(), "{w:#}");
    let why = blocked(&w, "stingy");
    assert!(
        why.contains("may charge up to 0.5 credits, the step may spend 0.1")
            && why.contains("may charge up to 2 credits, the step may spend 0.1"),
        "{why}"
    );
    // Each attempt cost its fixed price; the workflow's cost is their sum.
    let a = &step(&w, "a")["attempt_history"][0];
    assert_eq!(a["charge"], 0.5, "{a:#}");
    assert_eq!(w["spent"], 1.0, "{w:#}");
    let text = m.ok(&["workflow", "show", &id]);
    assert!(text.contains("cost: 1 credits spent"), "{text}");
    m.ok(&["workflow", "cancel", &id]);
}

/// Adds job type `work` with a price (credits, as the job-type file
/// takes them) to agent `a`.
fn priced_work(a: &NodeProc, dir: &std::path::Path, body: &str, price: serde_json::Value) {
    let f = dir.join(format!("work-{}.json", a.node_id()));
    let doc = serde_json::json!({
        "name": "work", "inputs": ["x"], "outputs": ["out"], "body": body,
        "timeout": 60, "price": price,
    });
    std::fs::write(&f, doc.to_string()).expect("write");
    a.ok(&["jobtype", "add", f.to_str().expect("utf8")]);
}

/// Three steps one after the other under a budget of 2.5 credits that
/// fails the workflow once a step cannot be placed within it.
const BUDGETED: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
hints:
  caroni:CaroniRequirement: {CaroniBudget: {credits: 2.5, exhausted: fail}}
inputs:
  msg: string
outputs:
  c_out: {type: string, outputSource: c/out}
steps:
  a:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work}}
    in: {x: msg}
    out: [out]
  b:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work}}
    in: {x: a/out}
    out: [out]
  c:
    run: {class: CommandLineTool, inputs: {x: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: work}}
    in: {x: b/out}
    out: [out]
"#;

#[test]
fn a_workflow_spends_no_more_than_its_budget_and_fails_with_the_reason_when_it_runs_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    priced_work(&a, dir.path(), BODY, serde_json::json!({"fixed": 1}));
    wait_adverts(&m, "work", 1);
    add_template(&m, dir.path(), "budgeted", BUDGETED);
    let id = m.run("budgeted", &["msg=hi"]);
    let w = m.wait(&id, Duration::from_secs(60));
    assert_eq!(w["state"], "failed", "{w:#}");
    assert_eq!(step(&w, "a")["state"], "completed", "{w:#}");
    assert_eq!(step(&w, "b")["state"], "completed", "{w:#}");
    let why = w["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("step c cannot be placed within the workflow's budget")
            && why.contains("budget of 2.5 credits has 0.5 left (2 spent"),
        "{why}"
    );
    // Step c never ran: the workflow spent two jobs' price, no more.
    assert_eq!(w["spent"], 2.0, "{w:#}");
    assert_eq!(w["budget"], 2.5, "{w:#}");
    assert!(step(&w, "c")["attempt_history"]
        .as_array()
        .is_none_or(|h| h.iter().all(|a| a["state"] != "completed")));
    let text = m.ok(&["workflow", "show", &id]);
    assert!(
        text.contains("budget: 2.5 credits, 0.5 left for new jobs"),
        "{text}"
    );
}

/// The chain of `role` in a node's `ledger -o json`.
fn chain(n: &NodeProc, role: &str) -> serde_json::Value {
    let l = n.json(&["ledger", "--role", role, "--limit", "1000"]);
    l["chains"][0].clone()
}

#[test]
fn receipts_balance_on_both_sides_after_either_side_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let mut a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "3"]).expect("agent");
    let body = format!("sleep 1; {BODY}");
    priced_work(
        &a,
        dir.path(),
        &body,
        serde_json::json!({"fixed": 0.5, "per_second": 0.1}),
    );
    wait_adverts(&m, "work", 1);
    add_template(&m, dir.path(), "slow", &one_step("work"));
    let ids: Vec<String> = (0..9)
        .map(|k| m.run("slow", &[&format!("msg=m{k}")]))
        .collect();
    // SIGKILL the agent while jobs run, then the manager.
    std::thread::sleep(Duration::from_millis(1500));
    a.kill();
    a.spawn().expect("agent restarts");
    std::thread::sleep(Duration::from_millis(1500));
    m.kill();
    m.spawn().expect("manager restarts");
    let mut spent_milli = 0i64;
    let mut jobs = Vec::new();
    for id in &ids {
        let w = m.wait(id, Duration::from_secs(120));
        assert_eq!(w["state"], "completed", "{w:#}");
        spent_milli += (w["spent"].as_f64().unwrap_or(0.0) * 1000.0).round() as i64;
        for at in step(&w, "s")["attempt_history"]
            .as_array()
            .expect("attempts")
        {
            if at["state"] == "completed" {
                jobs.push(at["job_id"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    assert_eq!(jobs.len(), 9, "one completed attempt per workflow");
    // Every verdict reached the agent: nothing open on either side.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (ac, mc) = loop {
        let (ac, mc) = (chain(&a, "agent"), chain(&m, "manager"));
        let open = |c: &serde_json::Value| {
            c["balances"].as_array().map_or(1, |b| {
                b.iter().map(|b| b["open"].as_u64().unwrap_or(1)).sum()
            })
        };
        if open(&ac) == 0 && open(&mc) == 0 {
            break (ac, mc);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receipts still open after 60 s: agent {ac:#} manager {mc:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for c in [&ac, &mc] {
        assert_eq!(c["holds"], true, "{c:#}");
    }
    let ab = &ac["balances"][0];
    let mb = &mc["balances"][0];
    assert_eq!(ab["peer"].as_str(), Some(m.node_id().as_str()), "{ac:#}");
    assert_eq!(mb["peer"].as_str(), Some(a.node_id().as_str()), "{mc:#}");
    // One receipt per job that ran to its end, none twice, all agreed.
    assert_eq!(ab["countersigned"], 9, "{ac:#}");
    assert_eq!(ab["disputed"], 0, "{ac:#}");
    assert_eq!(mb["countersigned"], 9, "{mc:#}");
    assert_eq!(ab["countersigned_milli"], mb["countersigned_milli"]);
    // What the ledgers say is owed is what the workflows say they spent.
    assert_eq!(
        mb["countersigned_milli"].as_i64(),
        Some(spent_milli),
        "{mc:#}"
    );
    let receipts: std::collections::BTreeSet<String> = ac["recent"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "receipt")
        .map(|e| e["job_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let placed: std::collections::BTreeSet<String> = jobs.into_iter().collect();
    assert_eq!(receipts, placed);
    // Each charge is the price for the time the job ran: at least 1 s.
    for e in ac["recent"].as_array().expect("entries") {
        if e["kind"] == "receipt" {
            assert!(e["receipt"]["charge_milli"].as_u64() >= Some(600), "{e:#}");
            // A bash job's receipt carries its CPU time (a sleep uses
            // next to none of it).
            assert!(
                e["receipt"]["cpu_ms"].as_u64().is_some_and(|c| c < 1000),
                "{e:#}"
            );
        }
    }
    let text = m.ok(&["ledger"]);
    assert!(
        text.contains("the chain holds") && text.contains("9 ("),
        "{text}"
    );
}
