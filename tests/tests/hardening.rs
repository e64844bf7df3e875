//! Moved nodes, hostile input, sizes and storage faults (issue 9), with
//! real `caroni-node` processes. Every wait is bounded.

use std::time::Duration;

use caroni_tests::{step, NodeProc, Ports};

const LIMIT: Duration = Duration::from_secs(120);

/// An agent killed while it holds a job and restarted on its data
/// directory at another peer address: the manager follows it there, the
/// job it held finishes without a new attempt.
#[test]
fn an_agent_that_comes_back_at_another_address_is_reached_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let mut a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_demo_job_types_with_slow_step2(dir.path(), 2);
    let id = m.run("test_simple", &["start_message=moved"]);
    m.wait_until(&id, LIMIT, "step2 running", |w| {
        step(w, "step2")["state"] == "running"
    });
    a.kill();
    let old = a.ports;
    a.ports = Ports::pick();
    assert_ne!(old.peer, a.ports.peer);
    a.spawn().expect("agent restarts at another address");
    let w = m.wait(&id, Duration::from_secs(60));
    assert_eq!(w["outputs"]["result"], "prependMOVED append", "{w:#}");
    for s in w["steps"].as_array().expect("steps") {
        assert_eq!(s["attempts"], 1, "the move cost an attempt: {s:#}");
    }
}

/// A tmpfs the test mounts for itself (root only) on a directory of a
/// temporary directory, unmounted on drop.
struct Tmpfs {
    _parent: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(mb: u32) -> Option<Self> {
        let parent = tempfile::tempdir().ok()?;
        let path = parent.path().join("n");
        std::fs::create_dir(&path).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Self {
            _parent: parent,
            path,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Keeps a file system full (whatever the node frees, it takes) until
/// dropped; then deletes its file.
struct Filler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: std::path::PathBuf,
}

impl Filler {
    fn start(dir: &std::path::Path) -> Self {
        use std::io::Write;
        let path = dir.join("filler");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut f = std::fs::File::create(&path).expect("filler");
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let chunk = vec![7u8; 4096];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if f.write_all(&chunk).is_err() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
            path,
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn health(node: &NodeProc) -> String {
    let mut cmd = std::process::Command::new("grpcurl");
    cmd.args([
        "-plaintext",
        &format!("127.0.0.1:{}", node.ports.api),
        "grpc.health.v1.Health/Check",
    ]);
    let out = caroni_tests::run_bounded(cmd, Duration::from_secs(30)).expect("grpcurl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The data directory's disk fills up while a job runs: `caroni run` fails
/// with the reason and health says NOT_SERVING; once space is freed the
/// node recovers by itself (no restart): health says SERVING, the job that
/// ended meanwhile counts (no new attempt) and new workflows complete.
#[test]
fn a_full_disk_is_reported_and_the_node_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount(64) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let files = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&fs.path, "both", &[]).expect("node");
    n.add_demo_template();
    n.add_demo_job_types_with_slow_step2(files.path(), 3);
    assert!(health(&n).contains("\"SERVING\""), "{}", health(&n));
    // A job that ends while the disk is full: its result is kept and
    // written once the disk has room again.
    let during = n.run("test_simple", &["start_message=during"]);
    n.wait_until(&during, LIMIT, "step2 running", |w| {
        step(w, "step2")["state"] == "running"
    });
    let filler = Filler::start(&fs.path);
    // Writes fail until the node notices; then it says why, and health
    // turns NOT_SERVING.
    wait_for("a refused run", LIMIT, || {
        !n.cli(&["run", "test_simple", "start_message=full"])
            .expect("cli")
            .status
            .success()
    });
    let err = n.fails(&["run", "test_simple", "start_message=full"]);
    assert!(err.contains("No space left"), "{err}");
    wait_for("NOT_SERVING", LIMIT, || health(&n).contains("NOT_SERVING"));
    drop(filler);
    wait_for("SERVING again", LIMIT, || {
        let h = health(&n);
        h.contains("\"SERVING\"") && !h.contains("NOT_SERVING")
    });
    let w = n.wait(&during, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependDURING append", "{w:#}");
    assert_eq!(step(&w, "step2")["attempts"], 1, "{w:#}");
    let id = n.run("test_simple", &["start_message=freed"]);
    let w = n.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependFREED append", "{w:#}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Status codes, not only texts: what cannot be done now is
/// FAILED_PRECONDITION, what is absent NOT_FOUND, bad input
/// INVALID_ARGUMENT; inputs that no job could be given are refused at the
/// API, and large values never break `workflow list`.
#[test]
fn the_api_answers_bad_requests_with_the_right_code_and_stays_usable() {
    use caroni_proto::v1::{self as pb, manager_service_client::ManagerServiceClient};
    use tonic::Code;
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    n.add_demo_template();
    n.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let done = n.run("test_simple", &["start_message=codes"]);
    n.wait(&done, LIMIT);
    runtime().block_on(async {
        let mut m = ManagerServiceClient::connect(n.url())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20);
        let code = |r: Result<tonic::Response<_>, tonic::Status>| match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let cancel = |id: &str| pb::GetWorkflowRequest {
            workflow_id: id.to_string(),
        };
        assert_eq!(
            code(
                m.cancel_workflow(cancel(&done))
                    .await
                    .map(|_| tonic::Response::new(()))
            ),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(
                m.cancel_workflow(cancel(&uuid_like()))
                    .await
                    .map(|_| tonic::Response::new(()))
            ),
            Code::NotFound
        );
        for name in [".", ".."] {
            let r = m
                .put_template(pb::PutTemplateRequest {
                    name: name.into(),
                    cwl: "class: Workflow".into(),
                })
                .await;
            assert_eq!(
                code(r.map(|_| tonic::Response::new(()))),
                Code::InvalidArgument,
                "{name}"
            );
        }
        let run = |v: String| pb::RunWorkflowRequest {
            template: "test_simple".into(),
            inputs: [("start_message".to_string(), v)].into_iter().collect(),
            request_id: String::new(),
            ..Default::default()
        };
        for (what, v) in [
            ("a NUL", "a\0b".to_string()),
            ("2 MiB", "x".repeat(2 << 20)),
        ] {
            let e = m.run_workflow(run(v)).await.expect_err(what);
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
            assert!(
                e.message().contains("start_message"),
                "{what}: {}",
                e.message()
            );
        }
        // Values as large as accepted: four workflows of 1 MiB of input.
        for _ in 0..4 {
            m.run_workflow(run("y".repeat(1 << 20)))
                .await
                .expect("a 1 MiB input is accepted");
        }
    });
    // The list stays under the message limit and shows the values short.
    let list = n.json(&["workflow", "list", "--limit", "100000"]);
    let list = list.as_array().expect("list");
    assert_eq!(list.len(), 5, "{list:?}");
    let text = serde_json::to_string(list).expect("json");
    assert!(
        text.len() < 100_000,
        "the list carries {} bytes",
        text.len()
    );
}

fn uuid_like() -> String {
    "01900000-0000-7000-8000-000000000000".into()
}

/// Output piped into a reader that stops early ends the CLI quietly.
#[test]
fn the_cli_piped_into_a_closed_reader_does_not_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    let mut child = std::process::Command::new(caroni_tests::bin("caroni"))
        .args(["--node", &n.url(), "node", "info"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

/// A node whose key file was deleted while it was stopped refuses to start
/// on its old state as somebody else, and says what to do; with
/// `--new-identity` it starts.
#[test]
fn a_lost_key_is_refused_loudly_unless_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n");
    let mut n = NodeProc::start(&data, "both", &[]).expect("node");
    let old = n.node_id();
    n.kill();
    std::fs::remove_file(data.join("node.key")).expect("lose the key");
    let e = format!("{:#}", n.spawn().expect_err("refused"));
    assert!(e.contains(&old) && e.contains("--new-identity"), "{e}");
    n.kill();
    n.extra.push("--new-identity".into());
    n.spawn().expect("starts when told");
    assert_ne!(n.node_id(), old);
}

/// `PutTemplateRequest` with the document as raw bytes, to send what a
/// `string` field must never hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPutTemplate {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bytes = "vec", tag = "2")]
    cwl: Vec<u8>,
}

/// A template that is not UTF-8, sent over raw gRPC, is INVALID_ARGUMENT
/// (the caller's fault), not INTERNAL.
#[test]
fn an_undecodable_request_is_invalid_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "manager", &[]).expect("node");
    let status = runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(n.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/caroni.v1.ManagerService/PutTemplate",
        );
        let codec =
            tonic_prost::ProstCodec::<RawPutTemplate, caroni_proto::v1::Template>::default();
        let req = RawPutTemplate {
            name: "latin1".into(),
            cwl: b"class: Workflow\nlabel: caf\xe9\n".to_vec(),
        };
        grpc.unary(tonic::Request::new(req), path, codec)
            .await
            .expect_err("refused")
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());
    // The node goes on.
    n.add_demo_template();
}

/// An envelope over the peer port's size limit ends the stream with an
/// error that says so (it used to close silently); the node goes on.
#[test]
fn an_oversized_envelope_is_answered_with_an_error() {
    use caroni_proto::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    let node_id = n.node_id();
    let status = runtime().block_on(async {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mut client = caroni_tests::peer_client(n.ports.peer, &node_id, &key)
            .await
            .expect("connect");
        let env = pb::Envelope {
            body: vec![0; 50 << 20],
            ..Default::default()
        };
        let stream = tokio_stream::iter(vec![env]);
        match client.deliver(stream).await {
            Err(s) => s,
            Ok(resp) => {
                let mut acks = resp.into_inner();
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), acks.message())
                        .await
                        .expect("an answer in time")
                    {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("the stream closed without an error"),
                        Err(s) => break s,
                    }
                }
            }
        }
    });
    assert!(
        status.message().contains("too large") || status.message().contains("length"),
        "{status:?}"
    );
    n.add_demo_template();
}
