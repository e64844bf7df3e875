//! End-to-end, with a manager and an agent as separate `caroni-node`
//! processes and the real `caroni` binary: each attempt's stdout and
//! stderr are kept whole (up to the agent's bound) on the agent and read
//! on demand through the manager, followed while the job runs, refused to
//! any node but the job's manager, and deleted with the job. (And a peer
//! is found by a prefix of its node id.)

use caroni_tests::{run_bounded, step, NodeProc};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// One step of job type `chatty`.
const ONE_STEP: &str = r#"
cwlVersion: v1.2
class: Workflow
$namespaces:
  caroni: https://caroni.example/cwl#
inputs:
  n: string
outputs:
  done: {type: string, outputSource: talk/done}
steps:
  talk:
    run: {class: CommandLineTool, inputs: {n: string}, outputs: {done: string}}
    hints: {caroni:CaroniRequirement: {CaroniJobName: chatty}}
    in: {n: n}
    out: [done]
"#;

/// A manager and an agent (which keeps `log_bytes` of each log, and
/// deletes ended jobs after `retention`), with the template `one` and the
/// job type `chatty` whose body is `body`.
fn mesh(
    dir: &std::path::Path,
    log_bytes: &str,
    retention: &str,
    body: &str,
) -> (NodeProc, NodeProc) {
    let manager = NodeProc::start(&dir.join("m"), "manager", &[]).expect("manager");
    let agent = NodeProc::agent_of(
        &manager,
        &dir.join("a"),
        &["--job-log-bytes", log_bytes, "--retention", retention],
    )
    .expect("agent");
    let t = dir.join("one.cwl");
    std::fs::write(&t, ONE_STEP).expect("write");
    manager.ok(&["template", "add", "one", t.to_str().expect("utf8")]);
    agent.put_job_type(dir, "chatty", &["n"], &["done"], body, false);
    (manager, agent)
}

/// `n` numbered lines to stderr, then the answer (stdout is the answer:
/// one JSON object).
const CHATTY: &str = r#"for i in $(seq 1 "$CARONI_ENV_n"); do echo "line $i of the log" >&2; done; echo '{"done": "yes"}'"#;

#[test]
fn an_attempts_logs_are_read_whole_from_the_agent_that_ran_it_up_to_its_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (manager, agent) = mesh(dir.path(), "200000", "30d", CHATTY);
    // 20,000 lines of about 20 bytes: twice the agent's bound.
    let id = manager.run("one", &["n=20000"]);
    let w = manager.wait(&id, Duration::from_secs(60));
    assert_eq!(w["state"], "completed", "{w:#}");
    let out = manager.cli(&["workflow", "logs", &id]).expect("logs");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout, "{\"done\": \"yes\"}\n",
        "stdout as the job wrote it"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("line 1 of the log\nline 2 of the log\n"),
        "{}",
        &stderr[..100]
    );
    let written: String = (1..=20_000)
        .map(|i| format!("line {i} of the log\n"))
        .collect();
    let (kept, note) = stderr.split_at(200_000);
    assert!(kept == &written[..200_000], "the first 200000 bytes, whole");
    assert!(
        note.contains("keeps the first 200000 bytes (--job-log-bytes)")
            && note.contains("more were written and not kept"),
        "{note}"
    );
    // The status message keeps its 2 KiB tail: the real end.
    let tail = step(&w, "talk")["attempt_history"][0]["stderr_tail"]
        .as_str()
        .expect("tail")
        .to_string();
    assert!(
        tail.len() <= 2048 && tail.ends_with("line 20000 of the log\n"),
        "{tail}"
    );
    // One stream, a named attempt; the agent's own view is the same bytes.
    let only = manager
        .cli(&[
            "workflow",
            "logs",
            &id,
            "--step",
            "talk",
            "--attempt",
            "1",
            "--stream",
            "stderr",
        ])
        .expect("logs");
    assert!(
        only.stdout.is_empty() && only.stderr == out.stderr,
        "stderr only"
    );
    let job = step(&w, "talk")["attempt_history"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let on_agent = agent.cli(&["job", "logs", &job[..8]]).expect("job logs");
    assert!(on_agent.status.success(), "{on_agent:?}");
    assert_eq!(on_agent.stdout, out.stdout);
    assert_eq!(on_agent.stderr, out.stderr);
    // Clear errors for what does not exist.
    let e = manager.fails(&["workflow", "logs", &id, "--step", "nosuch"]);
    assert!(
        e.contains("has no step `nosuch`") && e.contains("talk"),
        "{e}"
    );
    let e = manager.fails(&["workflow", "logs", &id, "--step", "talk", "--attempt", "3"]);
    assert!(e.contains("has 1 attempt(s), not 3"), "{e}");
}

#[test]
fn a_workflow_of_several_steps_prints_each_line_with_its_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &[]).expect("agent");
    manager.add_demo_template();
    agent.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let id = manager.run("test_simple", &["start_message=hello"]);
    assert_eq!(
        manager.wait(&id, Duration::from_secs(60))["state"],
        "completed"
    );
    let out = manager.ok(&["workflow", "logs", &id, "--stream", "stdout"]);
    for (s, expect) in [
        ("step1", "HELLO"),
        ("step2", "prependHELLO"),
        ("step3", "append"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{s} | ")))
            .unwrap_or_else(|| panic!("no line of {s} in {out}"));
        assert!(line.contains(expect), "{line}");
    }
    let json = manager.ok(&["-o", "json", "workflow", "logs", &id]);
    let pieces: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(pieces.len(), 3, "one stdout piece per step: {json}");
    assert!(pieces
        .iter()
        .all(|p| p["stream"] == "stdout" && p["attempt"] == 1));
    // The agent's node id, as tables print it (16 characters), finds it.
    let agent_id = agent.node_id();
    let one = manager.json(&["peers", &agent_id[..16]]);
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one:#}");
    assert_eq!(one[0]["node_id"], agent_id.as_str());
    let e = manager.fails(&["peers", "zzz"]);
    assert!(e.contains("no peer's node id starts with `zzz`"), "{e}");
}

#[test]
fn following_a_running_step_prints_lines_as_they_come_and_ends_with_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body =
        r#"for i in 1 2 3 4 5 6; do echo "tick $i"; sleep 0.5; done >&2; echo '{"done": "yes"}'"#;
    let (manager, _agent) = mesh(dir.path(), "1000000", "30d", body);
    let id = manager.run("one", &["n=0"]);
    manager.wait_until(&id, Duration::from_secs(30), "the step running", |w| {
        step(w, "talk")["state"] == "running"
    });
    let mut cmd = manager.cli_command();
    cmd.args(["workflow", "logs", &id, "-f", "--stream", "stderr"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("caroni workflow logs -f");
    let started = Instant::now();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let reader = {
        let (err, lines, manager_url) = (
            child.stderr.take().expect("stderr"),
            lines.clone(),
            manager.url(),
        );
        let id = id.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                // The workflow's state when each line arrived.
                let state =
                    caroni_tests::caroni(&manager_url, &["-o", "json", "workflow", "show", &id])
                        .ok()
                        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                        .map(|w| w["state"].as_str().unwrap_or_default().to_string())
                        .unwrap_or_default();
                lines.lock().expect("lock").push((line, state));
            }
        })
    };
    // It ends by itself once the job has ended.
    let ended = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if ended.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = reader.join();
    assert!(
        ended.is_some_and(|s| s.success()),
        "logs -f did not end with the job"
    );
    let lines = lines.lock().expect("lock").clone();
    let ticks: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        ticks,
        ["tick 1", "tick 2", "tick 3", "tick 4", "tick 5", "tick 6"]
    );
    assert_eq!(
        lines[0].1, "running",
        "the first line arrived while the job ran: {lines:?}"
    );
    assert_eq!(
        manager.wait(&id, Duration::from_secs(30))["state"],
        "completed"
    );
}

#[test]
fn only_the_jobs_manager_reads_its_logs_and_they_go_with_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (manager, agent) = mesh(dir.path(), "1000000", "6s", CHATTY);
    // stderr (about 100 KB) outgrows memory: a file; stdout (its answer)
    // is short: a row of the agent's database.
    let id = manager.run("one", &["n=5000"]);
    let w = manager.wait(&id, Duration::from_secs(60));
    assert_eq!(w["state"], "completed", "{w:#}");
    let job = step(&w, "talk")["attempt_history"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let logs = dir.path().join("a").join("logs");
    let files = || {
        std::fs::read_dir(&logs)
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };
    // Another node, however correctly it signs, is not the job's manager.
    let agent_id = agent.node_id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refused = rt.block_on(async {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let signer = caroni_peer::Signer::new(key.clone(), "http://127.0.0.1:1".into());
        let mut client = caroni_tests::peer_client(agent.ports.peer, &agent_id, &key)
            .await
            .expect("connect");
        let read = signer
            .sign_log_read(job.parse().expect("uuid"), "stderr", 0, false, &agent_id)
            .expect("sign");
        client.read_log(read).await.expect_err("refused")
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("only its own manager"),
        "{refused:?}"
    );
    assert_eq!(files(), 1, "the long stderr is a file");
    // Both read back whole: stdout from the database, stderr from its file.
    let both = manager.cli(&["workflow", "logs", &id]).expect("logs");
    assert_eq!(both.stdout, b"{\"done\": \"yes\"}\n");
    assert!(both.stderr.ends_with(b"line 5000 of the log\n"));
    // --retention 6s: the job goes, and its logs with it.
    let start = Instant::now();
    while files() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the logs outlived the job: {} file(s)",
            files()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run_bounded(
        {
            let mut c = manager.cli_command();
            c.args(["workflow", "logs", &id]);
            c
        },
        Duration::from_secs(60),
    )
    .expect("logs");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("no job") && e.contains("--retention"), "{e}");
}
