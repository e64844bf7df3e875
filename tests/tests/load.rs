//! End-to-end: load turns into a queue, not a storm. Real `caroni-node`
//! processes on loopback, driven by the CLI and by `caroni bench`.

use std::process::Command;
use std::time::Duration;

use caroni_tests::{bin, run_bounded, NodeProc};

const LIMIT: Duration = Duration::from_secs(120);

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin("caroni"));
    cmd.args(args);
    let out = run_bounded(cmd, LIMIT).expect("caroni bench");
    assert!(
        out.status.success(),
        "caroni {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A burst submitted at once to a manager with two agents: every workflow
/// completes without a failed attempt, and both agents take a fair share.
#[test]
fn a_burst_completes_and_spreads_over_both_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a1 = NodeProc::agent_of(&m, &dir.path().join("a1"), &[]).expect("agent 1");
    let a2 = NodeProc::agent_of(&m, &dir.path().join("a2"), &[]).expect("agent 2");
    // Both agents hear the gossip before the burst (connected, and their
    // subscription known to the manager's gossip): an agent still joining
    // would hear only re-publications, after its peer took all.
    let ids = [a1.node_id(), a2.node_id()];
    let start = std::time::Instant::now();
    loop {
        let peers = m.json(&["peers"]);
        let connected = |id: &str| {
            peers.as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["node_id"] == id && p["gossip_subscribed"] == true)
            })
        };
        if ids.iter().all(|id| connected(id)) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the agents never connected to the manager's gossip: {peers:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = bench_json(&[
        "-o",
        "json",
        "--node",
        &m.url(),
        "bench",
        "--agent-api",
        &a1.url(),
        "--agent-api",
        &a2.url(),
        "--workflows",
        "150",
        "--concurrency",
        "0",
        "--timeout",
        "100",
    ]);
    assert_eq!(r["completed"], 150, "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    assert_eq!(r["failed_attempts"], 0, "{r:#}");
    let nodes = r["nodes"].as_array().expect("nodes");
    let shares: Vec<f64> = nodes[1..]
        .iter()
        .map(|n| n["steps_share"].as_f64().expect("share"))
        .collect();
    assert_eq!(shares.len(), 2);
    for s in &shares {
        assert!((0.2..=0.8).contains(s), "steps spread {shares:?}: {r:#}");
    }
    // The agents' own job lists agree.
    let jobs = |a: &NodeProc| {
        a.json(&["job", "list", "--limit", "1000"])
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    assert_eq!(
        jobs(&a1) + jobs(&a2),
        3 * 153,
        "150 workflows and 3 warm-up runs of 3 steps"
    );
}

/// With room for three open requests, a manager starts one three-step
/// workflow at a time and keeps the others waiting in `created`; they all
/// run once an agent appears.
#[test]
fn admission_keeps_extra_workflows_waiting_until_requests_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(
        &dir.path().join("m"),
        "manager",
        &["--max-open-requests", "3"],
    )
    .expect("manager");
    m.add_demo_template();
    let ids: Vec<String> = (0..5)
        .map(|i| m.run("test_simple", &[&format!("start_message=w{i}")]))
        .collect();
    let states = |m: &NodeProc| -> Vec<String> {
        m.json(&["workflow", "list"])
            .as_array()
            .expect("list")
            .iter()
            .map(|w| w["state"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let s = states(&m);
    assert_eq!(s.iter().filter(|s| *s == "created").count(), 4, "{s:?}");
    assert_eq!(
        s.iter().filter(|s| *s == "initializing").count(),
        1,
        "{s:?}"
    );
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    for id in &ids {
        let w = m.wait(id, LIMIT);
        assert_eq!(w["state"], "completed", "{w:#}");
    }
    assert_eq!(
        m.json(&["workflow", "show", &ids[4]])["outputs"]["result"],
        "prependW4 append"
    );
}

/// `caroni bench` starts its own manager and agent processes, runs its
/// chain, and reports figures that agree with what it ran.
#[test]
fn caroni_bench_starts_its_topology_and_reports_figures() {
    let r = bench_json(&[
        "-o",
        "json",
        "bench",
        "--agents",
        "1",
        "--workflows",
        "6",
        "--concurrency",
        "2",
        "--steps",
        "2",
        "--timeout",
        "60",
    ]);
    assert_eq!(r["completed"], 6, "{r:#}");
    assert_eq!(r["steps"], 2);
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "a manager and one agent: {r:#}");
    assert_eq!(nodes[1]["steps"], 12, "6 workflows of 2 steps: {r:#}");
    assert!(r["floor_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r:#}");
    let lat = &r["latency_ms"];
    assert!(lat["p50"].as_f64().unwrap_or(0.0) > 0.0, "{r:#}");
    assert!(lat["p50"].as_f64() <= lat["max"].as_f64(), "{r:#}");
    assert!(
        r["messages_per_step"].as_f64().unwrap_or(0.0) > 0.0,
        "{r:#}"
    );
    assert!(
        nodes[0]["peak_rss_mb"].as_f64().unwrap_or(0.0) > 1.0,
        "{r:#}"
    );
}
