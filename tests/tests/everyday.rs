//! End-to-end, with real `caroni-node` processes and the real `caroni`
//! binary: what people reach for every day (issue 24). A branch without
//! an agent says why and fails fast while the others run; failed
//! workflows are retried and rerun; submissions are idempotent; lists are
//! filtered and paged; ids are typed as prefixes; inputs are checked by
//! their types and read from job files; attempt times are run times.

use caroni_tests::{example, step, NodeProc};
use std::time::Duration;

/// Two branches: `a` (the demo's foojob0) and `b`, whose job type no
/// agent has.
const TWO_BRANCHES: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  start_message: string
outputs:
  a_out: {type: string, outputSource: a/jobout}
  b_out: {type: string, outputSource: b/out}
steps:
  a:
    run: {class: CommandLineTool, inputs: {message: string}, outputs: {jobout: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: foojob0}}
    in: {message: start_message}
    out: [jobout]
  b:
    run: {class: CommandLineTool, inputs: {text: string}, outputs: {out: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: longestword}}
    in: {text: start_message}
    out: [out]
"#;

/// The token a paged list printed for its next page (`--page TOKEN`).
fn next_page(out: &std::process::Output) -> String {
    let hint = String::from_utf8_lossy(&out.stderr);
    hint.split("--page ")
        .nth(1)
        .unwrap_or_else(|| panic!("no next page in {hint}"))
        .trim()
        .to_string()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn a_branch_no_agent_can_take_says_why_and_fails_fast_while_the_other_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(
        &dir.path().join("n"),
        "both",
        &["--answer-timeout", "1s", "--unplaceable-timeout", "6s"],
    )
    .expect("start");
    node.add_job_types(&["foojob0.yaml"]);
    let t = write(dir.path(), "two.cwl", TWO_BRANCHES);
    node.ok(&["template", "add", "two", &t]);
    let id = node.run("two", &["start_message=hello"]);
    // Branch a completes although b has no job.
    let w = node.wait_until(&id, Duration::from_secs(30), "a done, b blocked", |w| {
        step(w, "a")["state"] == "completed" && step(w, "b")["blocked"] != ""
    });
    assert_eq!(w["state"], "running", "{w:#}");
    let why = step(&w, "b")["blocked"].as_str().expect("text").to_string();
    assert!(why.contains("no job type named longestword"), "{why}");
    let shown = node.ok(&["workflow", "show", &id]);
    assert!(
        shown.contains("step b: no agent can take it") && shown.contains("longestword"),
        "{shown}"
    );
    // Then it fails with that reason, in seconds rather than 50 minutes.
    let end = node.wait(&id, Duration::from_secs(30));
    assert_eq!(end["state"], "failed", "{end:#}");
    let msg = end["message"].as_str().expect("message");
    assert!(
        msg.contains("step b could not be placed for 6 s") && msg.contains("longestword"),
        "{msg}"
    );
    assert_eq!(step(&end, "a")["state"], "completed");
    assert_eq!(step(&end, "b")["state"], "failed");
}

#[test]
fn retry_resumes_where_it_failed_rerun_starts_anew_delete_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    node.add_job_types(&["foojob0.yaml", "foojob2.yaml"]);
    node.put_job_type(
        dir.path(),
        "foojob1",
        &["text"],
        &["outSB"],
        "echo broken >&2; exit 1",
        false,
    );
    // One attempt per step, so that the failure is quick.
    let once = std::fs::read_to_string(example("templates/test_simple.cwl"))
        .expect("read")
        .replace(
            "CaroniJobName: foojob1",
            "CaroniJobName: foojob1\n        CaroniMaxAttempts: 1",
        );
    let t = write(dir.path(), "once.cwl", &once);
    node.ok(&["template", "add", "once", &t]);
    let id = node.run("once", &["start_message=caronirocks"]);
    let failed = node.wait(&id, Duration::from_secs(60));
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert_eq!(step(&failed, "step1")["state"], "completed");
    assert_eq!(step(&failed, "step3")["state"], "cancelled", "{failed:#}");
    let a = &step(&failed, "step2")["attempt_history"][0];
    assert_eq!(a["failure"], "exit_status");
    assert_eq!(
        a["superseded"], false,
        "a failed attempt is failed, not superseded"
    );

    // Fixed, then resumed by a unique prefix of its id.
    node.put_job_type(
        dir.path(),
        "foojob1",
        &["text"],
        &["outSB"],
        r#"jq -cn --arg t "$CARONI_ENV_text" '{outSB: ("prepend" + $t)}'"#,
        true,
    );
    let prefix = &id[..18];
    node.ok(&["workflow", "retry", prefix]);
    let done = node.wait(&id, Duration::from_secs(60));
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["outputs"]["result"], "prependCARONIROCKS append");
    assert_eq!(step(&done, "step1")["attempts"], 1, "its output was reused");
    let tries = step(&done, "step2")["attempt_history"]
        .as_array()
        .expect("attempts")
        .clone();
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[0]["superseded"], true, "replaced by the resume");
    // The second attempt was placed when the resume asked, and ran after.
    let placed = tries[1]["placed_at"].as_str().expect("placed");
    let started = tries[1]["started_at"].as_str().expect("started");
    assert!(
        !placed.is_empty() && !started.is_empty() && started >= placed,
        "{tries:#?}"
    );
    let again = node.fails(&["workflow", "retry", &id]);
    assert!(again.contains("only a failed or cancelled"), "{again}");

    let rerun = node.json(&["workflow", "rerun", &id, "start_message=other", "--wait"]);
    assert_ne!(rerun["id"], done["id"]);
    assert_eq!(rerun["outputs"]["result"], "prependOTHER append");

    let listed = node.json(&[
        "workflow",
        "list",
        "--template",
        "once",
        "--state",
        "completed",
    ]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed:#}");
    // Paged: one at a time, the token leads to the other.
    let page = node
        .cli(&["workflow", "list", "--template", "once", "--limit", "1"])
        .expect("cli");
    let token = next_page(&page);
    let second = node.json(&[
        "workflow",
        "list",
        "--template",
        "once",
        "--limit",
        "1",
        "--page",
        &token,
    ]);
    assert_eq!(second[0]["id"], done["id"], "the older one");

    let out = node.ok(&["workflow", "delete", &id]);
    assert!(out.contains("deleted 1 workflow"), "{out}");
    let gone = node.fails(&["workflow", "show", &id]);
    assert!(gone.contains("no workflow"), "{gone}");
}

#[test]
fn a_submission_id_makes_one_workflow_and_inputs_are_checked_by_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let first = node.ok(&[
        "run",
        "test_simple",
        "start_message=x",
        "--request-id",
        "abc-1",
    ]);
    let second = node.ok(&[
        "run",
        "test_simple",
        "start_message=x",
        "--request-id",
        "abc-1",
    ]);
    assert_eq!(first.trim(), second.trim(), "the same submission");
    let all = node.json(&["workflow", "list"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all:#}");

    // Typed inputs, from the command line and from a job file.
    let typed = std::fs::read_to_string(example("templates/test_simple.cwl"))
        .expect("read")
        .replace(
            "  start_message: string\n",
            "  start_message: string\n  limit: int\n  mode: {type: enum, symbols: [fast, slow]}\n",
        );
    let t = write(dir.path(), "typed.cwl", &typed);
    node.ok(&["template", "add", "typed", &t]);
    let e = node.fails(&[
        "run",
        "typed",
        "start_message=x",
        "limit=notanumber",
        "mode=fast",
    ]);
    assert!(e.contains("`limit`") && e.contains("whole number"), "{e}");
    let e = node.fails(&["run", "typed", "start_message=x", "limit=3", "mode=medium"]);
    assert!(e.contains("one of fast, slow"), "{e}");
    let job = write(
        dir.path(),
        "job.yml",
        "start_message: fromfile\nlimit: 7\nmode: slow\n",
    );
    let w = node.json(&["run", "typed", "--inputs", &job, "--wait"]);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["inputs"]["limit"], "7");
    assert_eq!(w["outputs"]["result"], "prependFROMFILE append");
}

#[test]
fn ambiguous_prefixes_are_refused_with_the_ids_they_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    node.add_demo_template();
    let a = node.run("test_simple", &["start_message=1"]);
    let b = node.run("test_simple", &["start_message=2"]);
    // Ids of a burst share their first characters.
    let common: String = a
        .chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    assert!(common.len() >= 4, "{a} {b}");
    let e = node.fails(&["workflow", "show", &common]);
    assert!(e.contains("ambiguous") && e.contains(&a[..8]), "{e}");
    let e = node.fails(&["workflow", "show", "ffff"]);
    assert!(e.contains("no workflow id starts with"), "{e}");
    // Every id of a burst is found by its shortest unique prefix, odd
    // lengths included (a prefix that ends in half a byte).
    let mut ids = vec![a, b];
    for k in 0..18 {
        ids.push(node.run("test_simple", &[&format!("start_message={k}")]));
    }
    let mut odd = 0;
    for id in &ids {
        let shared = ids
            .iter()
            .filter(|o| *o != id)
            .map(|o| {
                o.chars()
                    .zip(id.chars())
                    .take_while(|(x, y)| x == y)
                    .count()
            })
            .max()
            .unwrap_or(0);
        let prefix: String = id.chars().take((shared + 1).max(4)).collect();
        odd += usize::from(prefix.replace('-', "").len() % 2 == 1);
        let w = node.json(&["workflow", "show", &prefix]);
        assert_eq!(w["id"], id.as_str(), "{prefix}");
    }
    assert!(odd > 0, "no odd-length prefix was tried");
}

#[test]
fn watch_streams_json_lines_and_watch_all_sees_every_workflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    // --all, started first, as a child process of its own.
    let mut all = node.cli_command();
    all.args(["-o", "json", "workflow", "watch", "--all"])
        .stdout(std::process::Stdio::piped());
    let mut all = all.spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    let a = node.run("test_simple", &["start_message=one"]);
    let b = node.run("test_simple", &["start_message=two"]);
    let mut watch = node.cli_command();
    watch.args(["-o", "json", "workflow", "watch", &a]);
    let out = caroni_tests::run_bounded(watch, Duration::from_secs(60)).expect("watch");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    assert!(!lines.is_empty());
    assert_eq!(lines.last().expect("last")["state"], "completed");
    node.wait(&b, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let _ = all.kill();
    let out = all.wait_with_output().expect("output");
    let seen: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for id in [&a, &b] {
        assert!(
            seen.iter()
                .any(|c| c["workflow_id"] == id.as_str() && c["state"] == "completed"),
            "{seen:#?}"
        );
    }
}

#[test]
fn version_status_headers_and_widths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("start");
    let v = node.json(&["version"]);
    assert_eq!(v["cli"], v["node"], "{v:#}");
    let s = node.ok(&["status"]);
    assert!(
        s.contains("health: serving") && s.contains("workflows: 0 live"),
        "{s}"
    );
    node.add_demo_template();
    let id = node.run("test_simple", &["start_message=x"]);
    let with = node.ok(&["workflow", "list"]);
    let without = node.ok(&["--no-headers", "workflow", "list"]);
    assert!(
        with.contains("template") && !without.contains("template"),
        "{without}"
    );
    // Ids print as prefixes that can be typed back; -o wide prints them whole.
    assert!(!with.contains(&id), "{with}");
    let wide = node.ok(&["-o", "wide", "workflow", "list"]);
    assert!(wide.contains(&id), "{wide}");
    let down = caroni_tests::caroni("http://127.0.0.1:1", &["version"]).expect("run");
    let text = String::from_utf8_lossy(&down.stdout);
    assert!(text.contains("not reachable"), "{text}");
}

#[test]
fn config_errors_name_the_file_and_line_and_the_example_file_starts_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("bad.toml");
    std::fs::write(&conf, "role = \"both\"\n\nretention = \"soon\"\n").expect("write");
    let out = std::process::Command::new(caroni_tests::bin("caroni-node"))
        .args(["--config", conf.to_str().expect("utf8"), "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("line 3") && err.contains("retention"),
        "{err}"
    );
    std::fs::write(&conf, "role = \"both\"\nretentoin = \"1d\"\n").expect("write");
    let out = std::process::Command::new(caroni_tests::bin("caroni-node"))
        .args(["--config", conf.to_str().expect("utf8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("unknown field `retentoin`"),
        "{err}"
    );

    // The example configuration starts a node (its ports moved to free
    // loopback ones by flags, which win over the file).
    let example = example("../deploy/caroni-node.toml");
    let node = NodeProc::start(&dir.path().join("n"), "both", &["--config", &example])
        .expect("a node from the example configuration");
    assert!(node.ok(&["status"]).contains("serving"));
}

#[test]
fn the_systemd_unit_is_valid() {
    let Some(analyze) = caroni_tests::which("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed here: nothing to check");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let unit =
        std::fs::read_to_string(example("../deploy/systemd/caroni-node.service")).expect("unit");
    // Verified as installed, with the binary where this build put it.
    let node = caroni_tests::bin("caroni-node");
    let good = unit.replace("/usr/local/bin/caroni-node", node.to_str().expect("utf8"));
    let path = dir.path().join("caroni-node.service");
    std::fs::write(&path, &good).expect("write");
    let out = std::process::Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // And it would see a broken one.
    std::fs::write(&path, good.replace("ExecStart=", "ExecStrat=")).expect("write");
    let out = std::process::Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        said.contains("ExecStrat") || !out.status.success(),
        "{said}"
    );
}

#[test]
fn jobs_on_an_agent_are_filtered_paged_and_deleted_after_the_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node =
        NodeProc::start(&dir.path().join("n"), "both", &["--retention", "2s"]).expect("start");
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let id = node.run("test_simple", &["start_message=x"]);
    node.wait(&id, Duration::from_secs(60));
    let done = node.json(&["job", "list", "--state", "completed", "--type", "foojob1"]);
    assert_eq!(done.as_array().map(Vec::len), Some(1), "{done:#}");
    let page = node.cli(&["job", "list", "--limit", "1"]).expect("cli");
    let token = next_page(&page);
    let next = node.json(&["job", "list", "--limit", "2", "--page", &token]);
    assert_eq!(next.as_array().map(Vec::len), Some(2), "{next:#}");
    // The retention sweep (each second with a 2 s retention) deletes the
    // ended workflow and its jobs: bounded wait.
    let start = std::time::Instant::now();
    loop {
        let jobs = node.json(&["job", "list"]);
        let wfs = node.json(&["workflow", "list"]);
        if jobs.as_array().is_some_and(Vec::is_empty) && wfs.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "still there after 90 s: {jobs:#} {wfs:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
