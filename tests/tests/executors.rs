//! Executors with real engines: job types that run in Docker containers
//! (through the Engine API), next to bash ones, on real `caroni-node`
//! processes. Skipped, with a message, when no Docker engine is reachable
//! or the image `caroni:local` (deploy/build-image.sh, run by `make test`)
//! is missing.
//!
//! (Over 600 lines: one file per subject, as every file under `tests/`.)

use std::process::Command;
use std::time::{Duration, Instant};

use caroni_tests::{run_bounded, step, NodeProc};

const LIMIT: Duration = Duration::from_secs(90);

fn docker(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    match run_bounded(cmd, Duration::from_secs(60)) {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// True when the engine and the image are here; says why not otherwise.
fn docker_usable(test: &str) -> bool {
    if !docker(&["info"]).0 {
        eprintln!("SKIPPED {test}: no Docker engine is reachable");
        return false;
    }
    if !docker(&["image", "inspect", "caroni:local"]).0 {
        eprintln!("SKIPPED {test}: image caroni:local is missing; deploy/build-image.sh builds it (make test does)");
        return false;
    }
    true
}

/// Containers (running or not) labelled with this job.
fn containers_of(job: &str) -> Vec<String> {
    let (ok, out) = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=org.caroni.job={job}"),
    ]);
    assert!(ok, "docker ps failed: {out}");
    out.lines().map(str::to_string).collect()
}

/// Adds the job type `nap` (from `job_type`, a job-type file's text) to
/// `agent` and the one-step template `nap` to `manager`; returns the
/// template file.
fn nap(dir: &std::path::Path, agent: &NodeProc, manager: &NodeProc, job_type: &str) -> String {
    let jt = write(dir, "nap.yaml", job_type);
    agent.ok(&["jobtype", "add", &jt]);
    let cwl = write(dir, "nap.cwl", NAP_CWL);
    manager.ok(&["template", "add", "nap", &cwl]);
    cwl
}

/// Removes, when dropped, the containers that the agents added to it
/// started: a test that ends with a job in a container SIGKILLs its node,
/// which leaves the container (a restarted agent would reap it). Declared
/// before the nodes, so that it drops after them.
#[derive(Default)]
struct Reap(std::cell::RefCell<Vec<String>>);

impl Reap {
    fn add(&self, agent: &NodeProc) {
        self.0.borrow_mut().push(agent.node_id());
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        for id in self.0.borrow().iter() {
            let (_, ids) = docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=org.caroni.agent={id}"),
            ]);
            for c in ids.lines() {
                let _ = docker(&["rm", "-f", c]);
            }
        }
    }
}

/// A node with both roles for a Docker test; its containers are removed
/// after it is killed (fields drop in this order).
struct DockerNode {
    n: NodeProc,
    _reap: Reap,
    dir: tempfile::TempDir,
}

/// A [`DockerNode`], or `None` (with a message) where Docker is not usable.
fn docker_node(test: &str) -> Option<DockerNode> {
    if !docker_usable(test) {
        return None;
    }
    let reap = Reap::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    reap.add(&n);
    Some(DockerNode {
        n,
        _reap: reap,
        dir,
    })
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

const SLEEPER: &str = "name: nap
executor: docker
image: caroni:local
inputs: [seconds]
outputs: [done]
timeout: 120
body: |
  sleep \"$CARONI_ENV_seconds\"; echo '{\"done\": \"yes\"}'
";

const NAP_CWL: &str = "cwlVersion: v1.2
class: Workflow
inputs:
  seconds: string
outputs:
  done:
    type: string
    outputSource: nap/done
steps:
  nap:
    run:
      class: CommandLineTool
      inputs:
        seconds: string
      outputs:
        done: string
    hints:
      CaroniRequirement:
        CaroniJobName: nap
    in:
      seconds: seconds
    out: [done]
";

#[test]
fn the_demo_runs_with_one_step_in_a_container() {
    let Some(t) = docker_node("the_demo_runs_with_one_step_in_a_container") else {
        return;
    };
    let n = &t.n;
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1_docker.yaml", "foojob2.yaml"]);
    let shown = n.json(&["jobtype", "show", "foojob1"]);
    assert_eq!(shown["executor"], "docker", "{shown:#}");
    assert_eq!(shown["docker"]["image"], "caroni:local");
    assert_eq!(shown["docker"]["network"], "none");

    let id = n.run("test_simple", &["start_message=caronirocks"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append");
    // Step 2 ran in a container that is gone now; steps 1 and 3 under bash.
    let job = step(&w, "step2")["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let j = n.json(&["job", "show", &job]);
    assert_eq!(j["executor"], "docker", "{j:#}");
    assert_eq!(j["external_id"], format!("caroni-{job}"));
    assert!(
        containers_of(&job).is_empty(),
        "the container was not removed"
    );
    let first = step(&w, "step1")["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    assert_eq!(n.json(&["job", "show", &first])["executor"], "bash");
}

#[test]
fn a_cancelled_container_is_gone_within_seconds() {
    let Some(t) = docker_node("a_cancelled_container_is_gone_within_seconds") else {
        return;
    };
    let (n, dir) = (&t.n, &t.dir);
    nap(dir.path(), n, n, SLEEPER);

    let id = n.run("nap", &["seconds=100"]);
    let w = n.wait_until(&id, LIMIT, "the container to run", |w| {
        step(w, "nap")["state"] == "running"
    });
    let job = step(&w, "nap")["job_id"].as_str().expect("job").to_string();
    let start = Instant::now();
    while containers_of(&job).is_empty() {
        assert!(start.elapsed() < LIMIT, "no container for job {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
    n.ok(&["workflow", "cancel", &id]);
    let cancelled = Instant::now();
    while !containers_of(&job).is_empty() {
        assert!(
            cancelled.elapsed() < Duration::from_secs(5),
            "the container of job {job} is still there 5 s after the cancel"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let j = n.json(&["job", "show", &job]);
    assert_eq!(j["state"], "cancelled", "cancelled, not failed: {j:#}");
    assert!(
        j["message"]
            .as_str()
            .is_some_and(|m| m.contains("cancelled by the manager")),
        "{j:#}"
    );
}

#[test]
fn a_missing_image_fails_the_job_with_its_name_and_a_down_daemon_is_declined() {
    let Some(t) =
        docker_node("a_missing_image_fails_the_job_with_its_name_and_a_down_daemon_is_declined")
    else {
        return;
    };
    let (n, dir) = (&t.n, &t.dir);
    let cwl = nap(
        dir.path(),
        n,
        n,
        &SLEEPER.replace("caroni:local", "caroni-no-such-image:7"),
    );
    let id = n.run("nap", &["seconds=1"]);
    let w = n.wait_until(&id, LIMIT, "a failed attempt", |w| {
        step(w, "nap")["attempt_history"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "failed"))
    });
    let attempt = &step(&w, "nap")["attempt_history"][0];
    let msg = attempt["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("caroni-no-such-image:7") && msg.contains("cannot be pulled"),
        "{attempt:#}"
    );
    // It may have failed for good already (no agent can run the step).
    let _ = n.cli(&["workflow", "cancel", &id]);

    // An agent whose Docker daemon is unreachable declines, saying why.
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let boot = m.p2p_addr();
    let a = NodeProc::start_with_env(
        &dir.path().join("a"),
        "agent",
        &["--bootstrap", &boot],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .expect("agent");
    let jt = write(dir.path(), "nap2.yaml", SLEEPER);
    a.ok(&["jobtype", "add", &jt]);
    m.ok(&["template", "add", "nap", &cwl]);
    let id = m.run("nap", &["seconds=1"]);
    let w = m.wait_until(&id, LIMIT, "a decline", |w| {
        step(w, "nap")["declines"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    });
    let reason = step(&w, "nap")["declines"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("cannot run here now") && reason.contains("Docker daemon"),
        "{reason}"
    );
}

// ---- Slurm: a real single-node cluster (scripts/slurm-up.sh, run by
// `make test`, which sets SLURM_CONF for the tests and the nodes).

/// True when a Slurm controller answers; says why not otherwise.
fn slurm_usable(test: &str) -> bool {
    let mut cmd = Command::new("sinfo");
    cmd.arg("-h");
    match run_bounded(cmd, Duration::from_secs(20)) {
        Ok(o) if o.status.success() => true,
        _ => {
            eprintln!("SKIPPED {test}: no Slurm cluster answers; scripts/slurm-up.sh starts one (make test does) and prints the SLURM_CONF to set");
            false
        }
    }
}

/// `squeue` lines (`id|state`) of the Slurm jobs named for a Caroni job.
fn slurm_jobs_of(job: &str, states: &str) -> Vec<String> {
    let mut cmd = Command::new("squeue");
    cmd.args(["-h", "-t", states, "-o", "%i|%T", "--name"])
        .arg(format!("caroni-{job}"));
    let o = run_bounded(cmd, Duration::from_secs(20)).expect("squeue");
    assert!(
        o.status.success(),
        "squeue: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

const SLURM_NAP: &str = "name: nap
executor: slurm
time_limit: \"10\"
max_in_flight: 4
inputs: [seconds]
outputs: [done]
timeout: 600
body: |
  sleep \"$CARONI_ENV_seconds\"; echo '{\"done\": \"yes\"}'
";

/// Waits until the step's current job runs as a Slurm job; returns the
/// Caroni job id and the Slurm job id.
fn running_on_slurm(n: &NodeProc, id: &str) -> (String, String) {
    let w = n.wait_until(id, LIMIT, "the step to run", |w| {
        step(w, "nap")["state"] == "running"
    });
    let job = step(&w, "nap")["job_id"].as_str().expect("job").to_string();
    let start = Instant::now();
    loop {
        let running = slurm_jobs_of(&job, "RUNNING");
        if let Some(line) = running.first() {
            let slurm = line.split('|').next().unwrap_or_default().to_string();
            return (job, slurm);
        }
        assert!(start.elapsed() < LIMIT, "job {job} never ran on Slurm");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_demo_runs_on_bash_a_container_and_slurm() {
    if !slurm_usable("the_demo_runs_on_bash_a_container_and_slurm") {
        return;
    }
    let reap = Reap::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    reap.add(&n);
    n.add_demo_template();
    let middle =
        if docker_usable("the_demo_runs_on_bash_a_container_and_slurm (its container step)") {
            "foojob1_docker.yaml"
        } else {
            "foojob1.yaml"
        };
    n.add_job_types(&["foojob0.yaml", middle, "foojob2_slurm.yaml"]);
    let id = n.run("test_simple", &["start_message=caronirocks"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append");
    let job = step(&w, "step3")["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let j = n.json(&["job", "show", &job]);
    assert_eq!(j["executor"], "slurm", "{j:#}");
    let slurm = j["external_id"].as_str().unwrap_or_default().to_string();
    assert!(!slurm.is_empty(), "{j:#}");
    // Slurm ran it once, under the recorded id, and it completed.
    assert_eq!(slurm_jobs_of(&job, "all"), [format!("{slurm}|COMPLETED")]);
    let text = n.ok(&["job", "show", &job]);
    assert!(text.contains(&format!("Slurm job {slurm}")), "{text}");
    // The manager names the executor and the Slurm job too.
    let attempt = &step(&w, "step3")["attempt_history"][0];
    assert_eq!(attempt["executor"], "slurm", "{attempt:#}");
    assert_eq!(attempt["external_id"], slurm.as_str());
    let shown = n.ok(&["workflow", "show", &id]);
    assert!(shown.contains(&format!("slurm job {slurm}")), "{shown}");
    assert_eq!(step(&w, "step1")["attempt_history"][0]["executor"], "bash");
    // Each executor kept the job's stdout as its log: bash and Docker as
    // it was written, Slurm's file when the job ended.
    let logs = n.ok(&["workflow", "logs", &id, "--stream", "stdout"]);
    for (s, text) in [
        ("step1", "CARONIROCKS"),
        ("step2", "prependCARONIROCKS"),
        ("step3", "prependCARONIROCKS append"),
    ] {
        assert!(
            logs.lines()
                .any(|l| l.starts_with(&format!("{s} | ")) && l.contains(text)),
            "no stdout of {s} in {logs}"
        );
    }
}

#[test]
fn a_slurm_time_limit_is_a_timeout_attempt_and_the_fixed_type_completes() {
    if !slurm_usable("a_slurm_time_limit_is_a_timeout_attempt_and_the_fixed_type_completes") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    // One minute of Slurm time for a job that would sleep ten.
    let slow = SLURM_NAP.replace("time_limit: \"10\"", "time_limit: \"1\"");
    nap(dir.path(), &n, &n, &slow);
    let id = n.run("nap", &["seconds=600"]);
    let (_, first) = running_on_slurm(&n, &id);
    // Fixed while attempt 1 runs: it keeps its body, the next one is quick.
    let fixed = write(
        dir.path(),
        "nap-fixed.yaml",
        &SLURM_NAP.replace("sleep \"$CARONI_ENV_seconds\"; ", ""),
    );
    n.ok(&["jobtype", "update", &fixed]);
    let w = n.wait(&id, Duration::from_secs(240));
    assert_eq!(w["state"], "completed", "{w:#}");
    let attempts = step(&w, "nap")["attempt_history"]
        .as_array()
        .expect("attempts")
        .clone();
    assert!(attempts.len() >= 2, "{w:#}");
    let msg = attempts[0]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("TIMEOUT") && msg.contains(&first),
        "attempt 1 should be Slurm's timeout of job {first}: {:#}",
        attempts[0]
    );
}

#[test]
fn cancelling_a_running_slurm_job_scancels_it_within_seconds() {
    if !slurm_usable("cancelling_a_running_slurm_job_scancels_it_within_seconds") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    nap(dir.path(), &n, &n, SLURM_NAP);
    let id = n.run("nap", &["seconds=300"]);
    let (job, slurm) = running_on_slurm(&n, &id);
    n.ok(&["workflow", "cancel", &id]);
    let cancelled = Instant::now();
    while !slurm_jobs_of(&job, "PENDING,RUNNING,COMPLETING").is_empty() {
        assert!(
            cancelled.elapsed() < Duration::from_secs(5),
            "Slurm job {slurm} still queued or running 5 s after the cancel"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_killed_during_a_slurm_job_reattaches_to_it_after_a_restart() {
    if !slurm_usable("an_agent_killed_during_a_slurm_job_reattaches_to_it_after_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let boot = m.p2p_addr();
    let mut a =
        NodeProc::start(&dir.path().join("a"), "agent", &["--bootstrap", &boot]).expect("agent");
    nap(dir.path(), &a, &m, SLURM_NAP);
    let id = m.run("nap", &["seconds=6"]);
    let (job, slurm) = running_on_slurm(&m, &id);
    a.kill(); // SIGKILL while Slurm runs the job
    a.spawn().expect("restart the agent");
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["done"], "yes");
    // Not submitted again: one Slurm job for it, the same id.
    assert_eq!(slurm_jobs_of(&job, "all"), [format!("{slurm}|COMPLETED")]);
    let j = a.json(&["job", "show", &job]);
    assert_eq!(j["external_id"], slurm.as_str(), "{j:#}");
}

#[test]
fn an_agent_killed_during_a_container_job_reaps_it_and_runs_the_job_again() {
    if !docker_usable("an_agent_killed_during_a_container_job_reaps_it_and_runs_the_job_again") {
        return;
    }
    let reap = Reap::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let boot = m.p2p_addr();
    let mut a =
        NodeProc::start(&dir.path().join("a"), "agent", &["--bootstrap", &boot]).expect("agent");
    reap.add(&a);
    nap(dir.path(), &a, &m, SLEEPER);
    let id = m.run("nap", &["seconds=4"]);
    let w = m.wait_until(&id, LIMIT, "the container to run", |w| {
        step(w, "nap")["state"] == "running"
    });
    let job = step(&w, "nap")["job_id"].as_str().expect("job").to_string();
    let start = Instant::now();
    let before = loop {
        if let Some(c) = containers_of(&job).first() {
            break c.clone();
        }
        assert!(start.elapsed() < LIMIT, "no container for job {job}");
        std::thread::sleep(Duration::from_millis(100));
    };
    a.kill(); // SIGKILL: the container outlives the agent
    assert_eq!(
        containers_of(&job),
        [before],
        "the container should outlive the agent"
    );
    a.spawn().expect("restart the agent");
    // The restarted agent removed the orphan and ran the job again.
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["done"], "yes");
    assert!(
        containers_of(&job).is_empty(),
        "a container of job {job} is left"
    );
    assert!(
        a.log_text()
            .contains("removed containers left by an earlier run"),
        "the agent did not say it reaped the container"
    );
}

#[test]
fn a_container_past_its_timeout_is_killed_and_removed() {
    let Some(t) = docker_node("a_container_past_its_timeout_is_killed_and_removed") else {
        return;
    };
    let (n, dir) = (&t.n, &t.dir);
    nap(
        dir.path(),
        n,
        n,
        &SLEEPER.replace("timeout: 120", "timeout: 2"),
    );
    let id = n.run("nap", &["seconds=100"]);
    let w = n.wait_until(&id, LIMIT, "a failed attempt", |w| {
        step(w, "nap")["attempt_history"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "failed"))
    });
    let attempt = step(&w, "nap")["attempt_history"][0].clone();
    assert_eq!(attempt["message"], "timed out after 2 s", "{attempt:#}");
    let job = attempt["job_id"].as_str().expect("job").to_string();
    assert!(
        containers_of(&job).is_empty(),
        "the timed-out container is left"
    );
    let _ = n.cli(&["workflow", "cancel", &id]);
}

/// Peak and current resident memory of a process (kB), from /proc.
fn memory_kb(pid: u32) -> (u64, u64) {
    (
        caroni_tests::proc_field(pid, "status", "VmHWM:"),
        caroni_tests::proc_field(pid, "status", "VmRSS:"),
    )
}

/// Issue 19, item 9: a Slurm job that writes 300 MB to stderr, and one
/// that writes 300 MB to stdout, do not enter the agent's memory: only
/// stderr's tail is read, and an over-long stdout is refused unread.
#[test]
fn safety_09_slurm_output_is_read_bounded() {
    if !slurm_usable("safety_09_slurm_output_is_read_bounded") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    let noisy = SLURM_NAP.replace(
        "sleep \"$CARONI_ENV_seconds\"; echo '{\"done\": \"yes\"}'",
        "head -c 300000000 /dev/zero | tr '\\0' e >&2; echo tail-of-stderr >&2\n  if [ \"$CARONI_ENV_seconds\" = out ]; then head -c 300000000 /dev/zero | tr '\\0' o; fi\n  echo '{\"done\": \"yes\"}'",
    );
    assert!(noisy.contains("300000000"), "{noisy}");
    nap(dir.path(), &n, &n, &noisy);
    let (peak_before, _) = memory_kb(n.pid());
    let id = n.run("nap", &["seconds=err"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    let job = step(&w, "nap")["job_id"].as_str().expect("job").to_string();
    let j = n.json(&["job", "show", &job]);
    assert!(
        j["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("tail-of-stderr"),
        "{j:#}"
    );
    let id = n.run("nap", &["seconds=out"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "failed", "{w:#}");
    assert!(
        w.to_string()
            .contains("stdout is larger than the job type's limit"),
        "{w:#}"
    );
    let (peak_after, rss) = memory_kb(n.pid());
    eprintln!(
        "agent peak RSS {} MB before, {} MB after Slurm jobs wrote 600 MB to stderr and 300 MB to stdout (now {} MB)",
        peak_before / 1024,
        peak_after / 1024,
        rss / 1024
    );
    assert!(
        peak_after < peak_before + 100 * 1024,
        "the agent's peak memory grew from {peak_before} kB to {peak_after} kB"
    );
}

/// Issue 19, item 10: a Slurm job sees the documented environment (and
/// its allocation's SLURM_* variables), never the agent's: no token, no
/// secret of the agent's environment.
#[test]
fn safety_10_slurm_jobs_see_only_the_documented_environment() {
    if !slurm_usable("safety_10_slurm_jobs_see_only_the_documented_environment") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start_with_env(
        &dir.path().join("n"),
        "both",
        &["--api-token", "agent-token-1234"],
        &[
            ("CARONI_API_TOKEN_COPY", "agent-token-1234"),
            ("SECRET_SAUCE", "ketchup-9876"),
        ],
    )
    .expect("node");
    let env_job = SLURM_NAP.replace(
        "sleep \"$CARONI_ENV_seconds\"; echo '{\"done\": \"yes\"}'",
        "jq -cn --arg e \"$(env -0 | tr '\\0' '\\n' | cut -d= -f1 | sort | tr '\\n' ' ')\" --arg v \"$(env)\" '{done: ($e + \"|\" + $v)}'",
    );
    nap(dir.path(), &n, &n, &env_job);
    let id = n.run("nap", &["seconds=1"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    let done = w["outputs"]["done"].as_str().expect("done");
    assert!(!done.contains("agent-token-1234"), "{done}");
    assert!(!done.contains("ketchup-9876"), "{done}");
    let (names, _) = done.split_once('|').expect("names|values");
    for name in names.split_whitespace() {
        let documented = matches!(
            name,
            "PATH" | "HOME" | "TMPDIR" | "LANG" | "PWD" | "SHLVL" | "_" | "OLDPWD"
        ) || name.starts_with("CARONI_ENV_")
            || name.starts_with("CARONI_FILE_")
            || name.starts_with("CARONI_KV_")
            || name == "CARONI_JOB_ID"
            || name.starts_with("SLURM_");
        assert!(
            documented,
            "undocumented variable {name} in a Slurm job: {names}"
        );
    }
    assert!(
        names.contains("CARONI_ENV_seconds") && names.contains("CARONI_JOB_ID"),
        "{names}"
    );
}

/// Files through every executor: a bash step, a container step and a
/// Slurm step each get the previous step's File as a path, append a line
/// and declare the copy as their File output.
#[test]
fn files_go_through_bash_a_container_and_slurm() {
    if !slurm_usable("files_go_through_bash_a_container_and_slurm") {
        return;
    }
    let docker_ok =
        docker_usable("files_go_through_bash_a_container_and_slurm (its container step)");
    let reap = Reap::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    reap.add(&n);
    let body = |tag: &str| {
        format!(
            "cat \"$CARONI_FILE_data\" > out.txt && echo {tag} >> out.txt && echo '{{\"out\": {{\"class\": \"File\", \"path\": \"out.txt\"}}}}'"
        )
    };
    let write = |name: &str, executor: &str, tag: &str| {
        let extra = match executor {
            "docker" => "executor: docker\nimage: caroni:local\nnetwork: none\n",
            "slurm" => "executor: slurm\npartition: debug\ntime_limit: \"5\"\n",
            _ => "",
        };
        let yaml = format!(
            "name: {name}\n{extra}inputs: [data]\noutputs: [out]\ntimeout: 120\nbody: |\n  {}\n",
            body(tag)
        );
        let f = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).expect("write");
        n.ok(&["jobtype", "add", f.to_str().expect("utf8")]);
    };
    write("on_bash", "bash", "bash");
    if docker_ok {
        write("on_docker", "docker", "docker");
    } else {
        write("on_docker", "bash", "docker");
    }
    write("on_slurm", "slurm", "slurm");
    let cwl_step = |id: &str, job: &str, source: &str| {
        format!("  {id}:\n    run:\n      class: CommandLineTool\n      inputs: {{data: File}}\n      outputs: {{out: File}}\n    hints:\n      CaroniRequirement: {{CaroniJobName: {job}}}\n    in: {{data: {source}}}\n    out: [out]\n")
    };
    let cwl = format!(
        "cwlVersion: v1.2\nclass: Workflow\ninputs:\n  reads: File\noutputs:\n  result:\n    type: File\n    outputSource: s3/out\nsteps:\n{}{}{}",
        cwl_step("s1", "on_bash", "reads"),
        cwl_step("s2", "on_docker", "s1/out"),
        cwl_step("s3", "on_slurm", "s2/out"),
    );
    let t = dir.path().join("three.cwl");
    std::fs::write(&t, cwl).expect("write");
    n.ok(&["template", "add", "three", t.to_str().expect("utf8")]);
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "first line\n").expect("write");
    let id = n.run("three", &[&format!("reads=@{}", input.display())]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    let out = dir.path().join("out.txt");
    n.ok(&[
        "workflow",
        "download",
        &id,
        "--to",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::read_to_string(&out).expect("read"),
        "first line\nbash\ndocker\nslurm\n"
    );
    let s2 = &step(&w, "s2")["attempt_history"][0];
    if docker_ok {
        assert_eq!(s2["executor"], "docker", "{s2:#}");
    }
    assert_eq!(step(&w, "s3")["attempt_history"][0]["executor"], "slurm");
}
