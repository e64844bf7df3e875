//! Multi-host tests: Caroni nodes in Docker containers on a network each
//! test creates (own subnet, fixed addresses) and removes at the end,
//! whatever happens. Skipped, with a message, when no Docker engine is
//! reachable; the image `caroni:local` comes from `deploy/build-image.sh`
//! (run by `make test`).

use std::process::Command;
use std::time::{Duration, Instant};

use caroni_tests::{run_bounded, step};

const LIMIT: Duration = Duration::from_secs(120);

fn docker(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    match run_bounded(cmd, Duration::from_secs(120)) {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

fn docker_ok(args: &[&str]) -> String {
    let (ok, out, err) = docker(args);
    assert!(ok, "docker {args:?} failed: {err}");
    out
}

/// A network and its containers, removed on drop.
struct Env {
    net: String,
    prefix: String,
    containers: Vec<String>,
}

impl Env {
    /// `None` (and a visible message) when Docker is not usable here.
    fn new(test: &str) -> Option<Self> {
        if !docker(&["info"]).0 {
            eprintln!("SKIPPED {test}: no Docker engine is reachable");
            return None;
        }
        assert!(
            docker(&["image", "inspect", "caroni:local"]).0,
            "image caroni:local is missing; build it with deploy/build-image.sh (make test does)"
        );
        // A subnet of its own per test so that fixed addresses never clash;
        // tests run in parallel, so try another when one is taken.
        let mut last_err = String::new();
        for attempt in 0..40u16 {
            let id = caroni_tests::free_port();
            let net = format!("caroni-test-{id}");
            let prefix = format!("172.31.{}", 16 + (id.wrapping_add(attempt * 7) % 200));
            let (ok, _, err) = docker(&[
                "network",
                "create",
                "--subnet",
                &format!("{prefix}.0/24"),
                &net,
            ]);
            if ok {
                return Some(Self {
                    net,
                    prefix,
                    containers: Vec::new(),
                });
            }
            last_err = err;
        }
        panic!("docker network create failed 40 times; last error: {last_err}");
    }
    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    /// Starts a node container named NAME at address .HOST.
    fn node(&mut self, name: &str, host: u8, env: &[(&str, &str)]) -> String {
        let cname = format!("{}-{name}", self.net);
        let ip = self.ip(host);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            cname.clone(),
            "--hostname".into(),
            name.into(),
            "--network".into(),
            self.net.clone(),
            "--ip".into(),
            ip.clone(),
            "-e".into(),
            "CARONI_MDNS=false".into(),
            "-e".into(),
            format!("CARONI_PEER_ADVERTISE=http://{ip}:7071"),
        ];
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push("caroni:local".into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        self.containers.push(cname.clone());
        self.wait_healthy(&cname);
        cname
    }

    fn wait_healthy(&self, cname: &str) {
        let t = Instant::now();
        while !docker(&["exec", cname, "caroni", "health"]).0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{cname} never became healthy: {}",
                self.logs(cname)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self, cname: &str) -> String {
        let (_, out, err) = docker(&["logs", "--tail", "50", cname]);
        format!("{out}{err}")
    }

    fn cli(&self, cname: &str, args: &[&str]) -> String {
        let mut all = vec!["exec", cname, "caroni"];
        all.extend_from_slice(args);
        docker_ok(&all)
    }

    fn json(&self, cname: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.cli(cname, &all)).expect("json")
    }

    /// Waits until the job types are loaded by the entrypoint.
    fn wait_job_types(&self, cname: &str, n: usize) {
        let t = Instant::now();
        while self
            .json(cname, &["jobtype", "list"])
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
            < n
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "job types never loaded on {cname}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_until(
        &self,
        m: &str,
        id: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let w = self.json(m, &["workflow", "show", id]);
            if pred(&w) {
                return w;
            }
            assert!(
                t.elapsed() < LIMIT,
                "timed out waiting for {what}: {w:#}\n{}",
                self.logs(m)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_done(&self, m: &str, id: &str) -> serde_json::Value {
        self.wait_until(m, id, "the workflow to end", |w| {
            matches!(
                w["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
    }

    fn node_id(&self, cname: &str) -> String {
        self.json(cname, &["node", "info"])["node_id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    /// A manager and the bootstrap address agents use to reach it.
    fn manager(&mut self, env: &[(&str, &str)]) -> (String, String) {
        let mut all = vec![("CARONI_ROLE", "manager"), ("CARONI_TEMPLATES", "1")];
        all.extend_from_slice(env);
        let m = self.node("manager", 10, &all);
        (m, format!("/ip4/{}/tcp/7072", self.ip(10)))
    }

    /// An agent bootstrapping from `boot`, with job-type files loaded.
    fn agent(&mut self, name: &str, host: u8, boot: &str, fixtures: &[&str]) -> String {
        let files = fixtures.join(" ");
        let a = self.node(
            name,
            host,
            &[
                ("CARONI_ROLE", "agent"),
                ("CARONI_BOOTSTRAP", boot),
                ("CARONI_FIXTURES", &files),
            ],
        );
        self.wait_job_types(&a, fixtures.len());
        a
    }

    /// Runs the demo template and waits until its (slow) step 2 runs.
    fn run_until_step2_runs(&self, m: &str, text: &str) -> (String, serde_json::Value) {
        let id = self
            .cli(m, &["run", "test_simple", &format!("start_message={text}")])
            .trim()
            .to_string();
        let w = self.wait_until(m, &id, "step2 running", |w| {
            step(w, "step2")["state"] == "running"
        });
        (id, w)
    }

    fn put_job_type(&self, cname: &str, yaml: &str) {
        let script =
            format!("cat > /tmp/jt.yaml <<'EOF'\n{yaml}\nEOF\ncaroni jobtype update /tmp/jt.yaml");
        docker_ok(&["exec", cname, "bash", "-c", &script]);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

const SLOW_FOOJOB1: &str = r#"name: foojob1
inputs: [text]
outputs: [outSB]
body: |
  sleep 4
  jq -cn --arg t "$CARONI_ENV_text" '{outSB: ("prepend" + $t)}'"#;

#[test]
fn demo_across_three_containers() {
    let Some(mut env) = Env::new("demo_across_three_containers") else {
        return;
    };
    let (m, boot) = env.manager(&[]);
    let a = env.agent("agent-a", 11, &boot, &["foojob0.yaml", "foojob2.yaml"]);
    let b = env.agent("agent-b", 12, &boot, &["foojob1.yaml"]);
    let out = env.cli(
        &m,
        &["run", "test_simple", "start_message=caronirocks", "--wait"],
    );
    assert!(out.contains("prependCARONIROCKS append"), "{out}");
    let id = env.json(&m, &["workflow", "list"])[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Whole ids (a narrow table shortens its columns).
    let shown = env.cli(&m, &["-o", "wide", "workflow", "show", &id]);
    let (ida, idb) = (env.node_id(&a), env.node_id(&b));
    assert!(shown.contains(&ida) && shown.contains(&idb), "{shown}");
}

#[test]
fn an_agent_cut_off_for_20_s_loses_no_attempt() {
    let Some(mut env) = Env::new("an_agent_cut_off_for_20_s_loses_no_attempt") else {
        return;
    };
    let (m, boot) = env.manager(&[]);
    let a = env.agent(
        "agent",
        11,
        &boot,
        &["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"],
    );
    env.put_job_type(&a, SLOW_FOOJOB1);
    let (id, _) = env.run_until_step2_runs(&m, "cut");
    docker_ok(&["network", "disconnect", &env.net, &a]);
    std::thread::sleep(Duration::from_secs(20));
    docker_ok(&["network", "connect", "--ip", &env.ip(11), &env.net, &a]);
    let w = env.wait_done(&m, &id);
    assert_eq!(w["outputs"]["result"], "prependCUT append", "{w:#}");
    for s in w["steps"].as_array().expect("steps") {
        assert_eq!(s["attempts"], 1, "an attempt was lost: {s:#}");
    }
}

#[test]
fn the_manager_killed_mid_workflow_finishes_after_restart() {
    let Some(mut env) = Env::new("the_manager_killed_mid_workflow_finishes_after_restart") else {
        return;
    };
    let (m, boot) = env.manager(&[]);
    let a = env.agent(
        "agent",
        11,
        &boot,
        &["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"],
    );
    env.put_job_type(&a, SLOW_FOOJOB1);
    let (id, _) = env.run_until_step2_runs(&m, "phoenix");
    docker_ok(&["kill", &m]);
    std::thread::sleep(Duration::from_secs(2));
    docker_ok(&["start", &m]);
    env.wait_healthy(&m);
    let w = env.wait_done(&m, &id);
    assert_eq!(w["outputs"]["result"], "prependPHOENIX append", "{w:#}");
}

#[test]
fn a_capable_agent_stopped_for_good_is_replaced() {
    let Some(mut env) = Env::new("a_capable_agent_stopped_for_good_is_replaced") else {
        return;
    };
    let (m, boot) = env.manager(&[("CARONI_LEASE_SECONDS", "5")]);
    let mut agents = Vec::new();
    for (name, host) in [("agent-a", 11u8), ("agent-b", 12u8)] {
        let a = env.agent(
            name,
            host,
            &boot,
            &["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"],
        );
        env.put_job_type(&a, SLOW_FOOJOB1);
        agents.push(a);
    }
    let ids: Vec<String> = agents.iter().map(|a| env.node_id(a)).collect();
    let (id, w) = env.run_until_step2_runs(&m, "gone");
    let holder = step(&w, "step2")["agent"]
        .as_str()
        .expect("agent")
        .to_string();
    let k = ids.iter().position(|i| *i == holder).expect("one of ours");
    docker_ok(&["kill", &agents[k]]);
    let w = env.wait_done(&m, &id);
    assert_eq!(w["outputs"]["result"], "prependGONE append", "{w:#}");
    let s2 = step(&w, "step2");
    assert_eq!(s2["agent"], ids[1 - k].as_str(), "{s2:#}");
    assert!(s2["attempts"].as_u64().unwrap_or(0) >= 2);
}

/// `docker-compose -p caroni-ci-compose -f deploy/compose.yaml ARGS…`.
fn compose(args: &[&str]) -> (bool, String, String) {
    let file = caroni_tests::repo().join("deploy/compose.yaml");
    let mut cmd = Command::new("docker-compose");
    cmd.args(["-p", "caroni-ci-compose", "-f"])
        .arg(file)
        .args(args);
    match run_bounded(cmd, LIMIT) {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

/// Takes the compose deployment down (with its volumes) when dropped.
struct Compose;

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = compose(&["down", "-v", "--remove-orphans"]);
    }
}

/// The compose deployment, as its file documents it, runs the demo with
/// TLS on every link: the client API refuses plaintext, the CLI in the
/// container trusts the deployment's CA, and node links are TLS.
#[test]
fn the_compose_deployment_runs_the_demo_with_tls() {
    if !docker(&["info"]).0 {
        eprintln!(
            "SKIPPED the_compose_deployment_runs_the_demo_with_tls: no Docker engine is reachable"
        );
        return;
    }
    if caroni_tests::which("docker-compose").is_none() {
        eprintln!("SKIPPED the_compose_deployment_runs_the_demo_with_tls: docker-compose is not installed");
        return;
    }
    let _down = Compose;
    let _ = compose(&["down", "-v", "--remove-orphans"]);
    let (ok, _, err) = compose(&["up", "-d"]);
    assert!(ok, "docker-compose up failed: {err}");
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", "-T", "manager", "caroni"];
        all.extend_from_slice(args);
        compose(&all)
    };
    let t = Instant::now();
    while !exec(&["health"]).0 {
        assert!(
            t.elapsed() < LIMIT,
            "the manager never became healthy: {}",
            compose(&["logs", "--tail", "40"]).1
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let t = Instant::now();
    loop {
        let (ok, out, err) = exec(&["run", "test_simple", "start_message=caronirocks", "--wait"]);
        if ok {
            assert!(out.contains("prependCARONIROCKS append"), "{out}");
            break;
        }
        // The agent may still be loading its job types.
        assert!(t.elapsed() < LIMIT, "the demo did not complete: {out}{err}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (_, peers, _) = exec(&["-o", "json", "peers"]);
    let peers: serde_json::Value = serde_json::from_str(&peers).expect("peers JSON");
    assert!(
        peers.as_array().is_some_and(|ps| ps.iter().any(|p| {
            p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with("https://"))
                && p["delivered"].as_u64().unwrap_or(0) > 0
        })),
        "no TLS peer link carried messages: {peers:#}"
    );
    let (plain_ok, _, plain_err) = exec(&["--node", "http://127.0.0.1:7070", "node", "info"]);
    assert!(!plain_ok, "the client API answered plaintext");
    assert!(!plain_err.is_empty());
}
