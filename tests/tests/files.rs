//! Files end to end, with real `caroni-node` processes (node links on TLS,
//! as by default): a file uploaded by the CLI goes through three steps on
//! two separate agent processes by reference, and comes back whole; inputs
//! are type-checked when a workflow starts; a job cannot declare a file
//! outside its working directory; a peer reads only the files it was
//! given.

use std::path::Path;
use std::time::Duration;

use caroni_tests::{example, step, NodeProc};
use sha2::Digest;

fn sha256_hex(data: &[u8]) -> String {
    caroni_types::file::hex(&sha2::Sha256::digest(data))
}

/// Deterministic bytes that do not compress.
fn content(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A log's text without its terminal colour codes.
fn without_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `node` with the `files_chain` template.
fn with_files_chain(node: NodeProc) -> NodeProc {
    node.ok(&[
        "template",
        "add",
        "files_chain",
        &example("templates/files_chain.cwl"),
    ]);
    node
}

/// Starts `files_chain` on a 256 MiB file written under `dir`; returns the
/// workflow id, the file's SHA-256 and its size.
fn run_big_chain(manager: &NodeProc, dir: &Path) -> (String, String, usize) {
    let size = 256usize << 20;
    let input = content(size);
    let sha = sha256_hex(&input);
    let path = dir.join("big.bin");
    std::fs::write(&path, &input).expect("write");
    drop(input);
    let id = manager.run("files_chain", &[&format!("reads=@{}", path.display())]);
    (id, sha, size)
}

fn blobs_in(data_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(data_dir.join("blobs/objects")) {
        for d in dirs.flatten() {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                out.extend(
                    files
                        .flatten()
                        .map(|f| f.file_name().to_string_lossy().into_owned()),
                );
            }
        }
    }
    out
}

#[test]
fn a_file_goes_through_three_steps_on_other_processes_and_comes_back_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a1 = NodeProc::agent_of(&manager, &dir.path().join("a1"), &[]).expect("agent 1");
    let a2 = NodeProc::agent_of(&manager, &dir.path().join("a2"), &[]).expect("agent 2");
    manager.ok(&[
        "template",
        "add",
        "files_chain",
        &example("templates/files_chain.cwl"),
    ]);
    a1.add_job_types(&["appendline.yaml"]);
    a2.add_job_types(&["appendline.yaml"]);

    let input = content((3 << 20) + 17);
    let path = dir.path().join("reads.fq");
    std::fs::write(&path, &input).expect("write");
    let id = manager.run("files_chain", &[&format!("reads=@{}", path.display())]);
    let w = manager.wait(&id, Duration::from_secs(120));
    assert_eq!(
        w["state"],
        "completed",
        "{w:#}\n{}",
        manager.ok(&["workflow", "show", &id])
    );

    // The manager holds the input and every step's output; the agents
    // fetched what they ran on.
    let held = blobs_in(&dir.path().join("m"));
    assert!(held.contains(&sha256_hex(&input)), "{held:?}");
    assert_eq!(held.len(), 4, "the input and three outputs: {held:?}");
    let on_agents = blobs_in(&dir.path().join("a1")).len() + blobs_in(&dir.path().join("a2")).len();
    assert!(
        on_agents >= 4,
        "agents hold what they ran on and made: {on_agents}"
    );

    // `show` names the file by name, size and hash, not its bytes.
    let shown = manager.ok(&["workflow", "show", &id]);
    assert!(shown.contains("checked.txt (3.0 MiB, sha256 "), "{shown}");

    let out = dir.path().join("result.txt");
    manager.ok(&[
        "workflow",
        "download",
        &id,
        "checked",
        "--to",
        out.to_str().expect("utf8"),
    ]);
    let got = std::fs::read(&out).expect("downloaded");
    assert_eq!(
        &got[..input.len()],
        &input[..],
        "the input comes back first"
    );
    let added = String::from_utf8_lossy(&got[input.len()..]).into_owned();
    let lines: Vec<&str> = added.lines().collect();
    assert_eq!(lines.len(), 3, "one line per step: {added:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("checked by ")),
        "{added:?}"
    );
    // Downloading again into a directory gives the same bytes, under
    // the file's own name.
    let outdir = dir.path().join("outdir");
    manager.ok(&[
        "workflow",
        "download",
        &id,
        "--outdir",
        outdir.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::read(outdir.join("checked.txt")).expect("read"),
        got
    );
    drop((a1, a2));
}

#[test]
fn a_transfer_killed_midway_resumes_from_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let mut agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &[]).expect("agent");
    manager.ok(&[
        "template",
        "add",
        "files_chain",
        &example("templates/files_chain.cwl"),
    ]);
    agent.add_job_types(&["appendline.yaml"]);
    let (id, sha, size) = run_big_chain(&manager, dir.path());
    // SIGKILL the agent while it is fetching the input.
    let partial = dir.path().join("a/blobs/partial").join(&sha);
    let start = std::time::Instant::now();
    loop {
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if have > (size as u64) / 5 {
            agent.kill();
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent never fetched a fifth of the file: {have} bytes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let kept = std::fs::metadata(&partial)
        .map(|m| m.len())
        .expect("the partial file stays");
    assert!(kept < size as u64, "the kill came before the end: {kept}");
    agent.spawn().expect("restart");
    let w = manager.wait(&id, Duration::from_secs(180));
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(step(&w, "step1")["attempts"], 1, "{w:#}");
    // The restarted agent asked for the bytes from where it stopped: the
    // transfer resumed at the kept length and received only the rest.
    let log = without_colours(&agent.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("resuming a broken transfer"))
        .unwrap_or_else(|| panic!("no resumed transfer in the log:\n{log}"));
    assert!(
        line.contains(&format!("resumed_from={kept}")),
        "kept {kept}: {line}"
    );
    assert!(
        line.contains(&format!("received={}", size as u64 - kept)),
        "{line}"
    );
}

#[test]
fn a_manager_killed_while_it_fetches_an_output_resumes_and_runs_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut manager =
        with_files_chain(NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager"));
    let agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &[]).expect("agent");
    agent.add_job_types(&["appendline.yaml"]);
    let (id, input_sha, size) = run_big_chain(&manager, dir.path());
    // SIGKILL the manager while it fetches step 1's output (a partial file
    // that is not the uploaded input).
    let partials = dir.path().join("m/blobs/partial");
    let start = std::time::Instant::now();
    let kept = loop {
        let fetching = std::fs::read_dir(&partials)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy() != input_sha)
            .filter_map(|e| e.metadata().ok().map(|m| (e.file_name(), m.len())))
            .find(|(_, n)| *n > (size as u64) / 5);
        if let Some((name, _)) = fetching {
            manager.kill();
            break std::fs::metadata(partials.join(&name))
                .map(|m| m.len())
                .expect("the partial file stays");
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the manager never fetched a fifth of an output"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    manager.spawn().expect("restart");
    let w = manager.wait(&id, Duration::from_secs(180));
    assert_eq!(w["state"], "completed", "{w:#}");
    for s in ["step1", "step2", "step3"] {
        assert_eq!(step(&w, s)["attempts"], 1, "{s} ran once: {w:#}");
    }
    let log = without_colours(&manager.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("resuming a broken transfer"))
        .unwrap_or_else(|| panic!("no resumed transfer in the manager's log:\n{log}"));
    assert!(
        line.contains(&format!("resumed_from={kept}")),
        "kept {kept}: {line}"
    );
}

#[test]
fn file_inputs_are_checked_when_a_workflow_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = with_files_chain(NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node"));
    node.add_demo_template();
    // Text where a File is declared.
    let e = node.fails(&["run", "files_chain", "reads=hello"]);
    assert!(
        e.contains("workflow input `reads` is declared `File`") && e.contains("=@path"),
        "{e}"
    );
    // A reference to a file this manager does not hold.
    let missing = format!(
        r#"reads={{"class":"File","sha256":"{}","size":3,"basename":"x.fq"}}"#,
        "ab".repeat(32)
    );
    let e = node.fails(&["run", "files_chain", &missing]);
    assert!(
        e.contains("workflow input `reads`") && e.contains("is not on this manager"),
        "{e}"
    );
    // A file where text is declared: uploaded, then refused by type.
    let path = dir.path().join("msg.txt");
    std::fs::write(&path, "hello").expect("write");
    let e = node.fails(&[
        "run",
        "test_simple",
        &format!("start_message=@{}", path.display()),
    ]);
    assert!(
        e.contains("start_message") && e.contains("is a File reference"),
        "{e}"
    );
    // A missing local file is named before anything is sent.
    let e = node.fails(&["run", "files_chain", "reads=@/nonexistent/reads.fq"]);
    assert!(e.contains("/nonexistent/reads.fq"), "{e}");
    assert!(
        node.json(&["workflow", "list"])
            .as_array()
            .expect("list")
            .is_empty(),
        "no workflow was created"
    );
}

#[test]
fn a_job_cannot_declare_a_file_outside_its_working_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = with_files_chain(NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node"));
    node.put_job_type(
        dir.path(),
        "appendline",
        &["data"],
        &["out"],
        r#"echo '{"out": {"class": "File", "path": "/etc/hostname"}}'"#,
        false,
    );
    let path = dir.path().join("in.txt");
    std::fs::write(&path, "x").expect("write");
    let id = node.run("files_chain", &[&format!("reads=@{}", path.display())]);
    let w = node.wait(&id, Duration::from_secs(120));
    assert_eq!(w["state"], "failed", "{w:#}");
    let attempts = step(&w, "step1")["attempt_history"].to_string();
    assert!(
        attempts.contains("/etc/hostname") && attempts.contains("outside the working directory"),
        "{attempts}"
    );
}

#[test]
fn a_peer_reads_only_the_files_it_was_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = with_files_chain(NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node"));
    node.add_job_types(&["appendline.yaml"]);
    let input = content(100_000);
    let path = dir.path().join("secret.bin");
    std::fs::write(&path, &input).expect("write");
    let id = node.run("files_chain", &[&format!("reads=@{}", path.display())]);
    assert_eq!(
        node.wait(&id, Duration::from_secs(120))["state"],
        "completed"
    );
    let node_id = node.node_id();
    let sha = sha256_hex(&input);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let signer = caroni_peer::Signer::new(key.clone(), "http://127.0.0.1:1".into());
        let mut client = caroni_tests::peer_client(node.ports.peer, &node_id, &key)
            .await
            .expect("connect");
        // Signed correctly, but never given the file.
        let read = signer.sign_blob_read(&sha, 0, &node_id).expect("sign");
        let denied = client.read_blob(read).await.expect_err("refused");
        // Signed by one key, sent over another key's link.
        let other = caroni_peer::Signer::new(
            libp2p::identity::Keypair::generate_ed25519(),
            "http://127.0.0.1:1".into(),
        );
        let read = other.sign_blob_read(&sha, 0, &node_id).expect("sign");
        let forged = client.read_blob(read).await.expect_err("refused");
        // Meant for another node.
        let read = signer
            .sign_blob_read(&sha, 0, "someone-else")
            .expect("sign");
        let elsewhere = client.read_blob(read).await.expect_err("refused");
        (denied, forged, elsewhere)
    });
    assert_eq!(
        status.0.code(),
        tonic::Code::PermissionDenied,
        "{:?}",
        status.0
    );
    assert!(status.0.message().contains("never given"), "{:?}", status.0);
    assert_eq!(
        status.1.code(),
        tonic::Code::PermissionDenied,
        "{:?}",
        status.1
    );
    assert_eq!(
        status.2.code(),
        tonic::Code::PermissionDenied,
        "{:?}",
        status.2
    );
    assert!(
        status.2.message().contains("meant for node"),
        "{:?}",
        status.2
    );
    // The node goes on.
    node.ok(&["node", "info"]);
}

#[test]
fn a_file_over_the_nodes_budget_is_refused_and_health_says_how_full_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(
        &dir.path().join("n"),
        "both",
        &["--blob-disk-bytes", "100000"],
    )
    .expect("node");
    node.ok(&[
        "template",
        "add",
        "files_chain",
        &example("templates/files_chain.cwl"),
    ]);
    let small = dir.path().join("small.bin");
    std::fs::write(&small, content(30_000)).expect("write");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, content(200_000)).expect("write");
    let e = node.fails(&["run", "files_chain", &format!("reads=@{}", big.display())]);
    assert!(
        e.contains("--blob-disk-bytes") && e.contains("big.bin"),
        "{e}"
    );
    // What fits is taken; health says how full the store is.
    let out = node
        .cli(&["run", "files_chain", &format!("reads=@{}", small.display())])
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health = node.cli(&["health"]).expect("health");
    let said = String::from_utf8_lossy(&health.stderr).into_owned();
    assert!(
        said.contains("files: 29.3 KiB of 97.7 KiB (30 % of --blob-disk-bytes)"),
        "{said}"
    );
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");
}

/// The path of a blob in a node's store.
fn object_path(data_dir: &Path, sha: &str) -> std::path::PathBuf {
    data_dir.join("blobs/objects").join(&sha[..2]).join(sha)
}

/// Replaces a stored blob's bytes (the store keeps it read-only).
fn overwrite(path: &Path, bytes: &[u8]) {
    let mut perms = std::fs::metadata(path).expect("stored").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).expect("chmod");
    std::fs::write(path, bytes).expect("overwrite");
}

#[test]
fn a_holder_that_sends_wrong_bytes_fails_the_job_with_the_reason_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager =
        with_files_chain(NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager"));
    let agent = NodeProc::agent_of(&manager, &dir.path().join("a"), &[]).expect("agent");
    // Two inputs, started while no agent serves the job type.
    let flipped = content(300_000);
    let shorter = content(200_000);
    let (p1, p2) = (
        dir.path().join("flipped.bin"),
        dir.path().join("shorter.bin"),
    );
    std::fs::write(&p1, &flipped).expect("write");
    std::fs::write(&p2, &shorter).expect("write");
    let w1 = manager.run("files_chain", &[&format!("reads=@{}", p1.display())]);
    let w2 = manager.run("files_chain", &[&format!("reads=@{}", p2.display())]);
    // The manager's copies go bad on its disk: one byte changed in one,
    // the other cut short.
    let mut bad = flipped.clone();
    bad[150_000] ^= 0xff;
    overwrite(
        &object_path(&dir.path().join("m"), &sha256_hex(&flipped)),
        &bad,
    );
    overwrite(
        &object_path(&dir.path().join("m"), &sha256_hex(&shorter)),
        &shorter[..120_000],
    );
    agent.add_job_types(&["appendline.yaml"]);

    for (id, said) in [(&w1, "hashes to"), (&w2, "ended at byte 120000 of 200000")] {
        let w = manager.wait(id, Duration::from_secs(120));
        assert_eq!(w["state"], "failed", "{w:#}");
        let attempts = step(&w, "step1")["attempt_history"].to_string();
        assert!(
            attempts.contains("input files cannot be fetched from the manager")
                && attempts.contains(said),
            "{attempts}"
        );
        assert!(
            w["message"].as_str().unwrap_or("").contains("step1"),
            "{w:#}"
        );
    }
    // The agent ran nothing, keeps no part of either file, and goes on.
    let a = dir.path().join("a");
    let held = blobs_in(&a);
    assert!(
        !held.contains(&sha256_hex(&flipped)) && !held.contains(&sha256_hex(&shorter)),
        "{held:?}"
    );
    let partial: Vec<_> = std::fs::read_dir(a.join("blobs/partial"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "partial files left: {partial:?}");
    // No job ran: each attempt of step 1 failed with the reason, the
    // other steps' jobs were cancelled when their workflow failed.
    let jobs = agent.json(&["job", "list"]);
    let jobs = jobs.as_array().expect("jobs");
    assert!(
        jobs.iter()
            .all(|j| (j["state"] == "failed" || j["state"] == "cancelled")
                && j["started_at"].as_str().unwrap_or("").is_empty()),
        "{jobs:#?}"
    );
    let said = |what: &str| {
        jobs.iter()
            .filter(|j| {
                let m = j["message"].as_str().unwrap_or("");
                m.contains("cannot be fetched from the manager") && m.contains(what)
            })
            .count()
    };
    assert_eq!(said("flipped.bin"), 5, "one per attempt: {jobs:#?}");
    assert_eq!(said("shorter.bin"), 5, "one per attempt: {jobs:#?}");
    // A good file goes through the same nodes.
    let good = dir.path().join("good.bin");
    std::fs::write(&good, content(1000)).expect("write");
    let id = manager.run("files_chain", &[&format!("reads=@{}", good.display())]);
    assert_eq!(
        manager.wait(&id, Duration::from_secs(120))["state"],
        "completed"
    );
}

#[test]
fn a_transfer_that_stalls_fails_after_the_timeout_and_resumes_when_the_holder_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager =
        with_files_chain(NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager"));
    let agent = NodeProc::agent_of(
        &manager,
        &dir.path().join("a"),
        &["--transfer-stall-timeout", "2s"],
    )
    .expect("agent");
    agent.add_job_types(&["appendline.yaml"]);
    let (id, sha, size) = run_big_chain(&manager, dir.path());
    // Freeze the manager (SIGSTOP) while the agent is fetching from it:
    // its connection stays open but sends nothing.
    let partial = dir.path().join("a/blobs/partial").join(&sha);
    let start = std::time::Instant::now();
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent never started to fetch"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    manager.signal("STOP");
    let start = std::time::Instant::now();
    let stalled = loop {
        let log = without_colours(&agent.log_text());
        if let Some(l) = log.lines().find(|l| l.contains("stalled for 2 s")) {
            break l.to_string();
        }
        if start.elapsed() > Duration::from_secs(30) {
            manager.signal("CONT");
            panic!("no stall reported:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    manager.signal("CONT");
    assert!(stalled.contains("big.bin"), "{stalled}");
    assert!(kept < size as u64, "the stall came before the end: {kept}");
    let w = manager.wait(&id, Duration::from_secs(180));
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(step(&w, "step1")["attempts"], 1, "{w:#}");
    let log = without_colours(&agent.log_text());
    assert!(
        log.lines()
            .any(|l| l.contains("resuming a broken transfer")),
        "the transfer went on from where it stopped:\n{log}"
    );
}
