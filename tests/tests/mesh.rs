//! End-to-end: several real `caroni-node` processes on loopback, found
//! through `--bootstrap` (mDNS off so that parallel tests never meet).

use std::time::Duration;

use caroni_tests::NodeProc;
use prost::Message as _;

const LIMIT: Duration = Duration::from_secs(60);

/// Node id of the agent that ran step `id`.
fn agent_of_step(w: &serde_json::Value, id: &str) -> String {
    caroni_tests::step(w, id)["agent"]
        .as_str()
        .expect("agent")
        .to_string()
}

#[test]
fn manager_and_agent_run_the_demo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let id = m.run("test_simple", &["start_message=caronirocks"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append");
    let agent = a.node_id();
    for s in ["step1", "step2", "step3"] {
        assert_eq!(agent_of_step(&w, s), agent);
    }
    // Every dataflow carries its value, as the original's admin pages showed.
    let flows = w["dataflows"].as_array().expect("dataflows");
    assert_eq!(flows.len(), 4);
    assert!(flows
        .iter()
        .any(|d| d["destination"] == "step2/text" && d["value"] == "CARONIROCKS"));
    // Lists are newest first.
    let id2 = m.run("test_simple", &["start_message=second"]);
    m.wait(&id2, LIMIT);
    let list = m.json(&["workflow", "list"]);
    let ids: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(ids, [id2.as_str(), id.as_str()]);
    // The agent's own view of its jobs.
    let jobs = a.json(&["job", "list"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(6));
    // Newest first: the three jobs of the second workflow come before the
    // first workflow's (within a workflow, jobs are ordered by acceptance).
    for j in &jobs.as_array().expect("jobs")[..3] {
        let input = j["inputs"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or("");
        assert!(
            input.to_lowercase().contains("second"),
            "newest jobs first: {jobs:#}"
        );
    }
    assert!(jobs
        .as_array()
        .expect("jobs")
        .iter()
        .all(|j| j["state"] == "completed"));
}

#[test]
fn two_agents_with_complementary_job_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent A");
    let b = NodeProc::agent_of(&m, &dir.path().join("b"), &[]).expect("agent B");
    m.add_demo_template();
    a.add_job_types(&["foojob0.yaml", "foojob2.yaml"]);
    b.add_job_types(&["foojob1.yaml"]);
    let id = m.run("test_simple", &["start_message=caronirocks"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependCARONIROCKS append", "{w:#}");
    let (ida, idb) = (a.node_id(), b.node_id());
    assert_eq!(agent_of_step(&w, "step1"), ida);
    assert_eq!(agent_of_step(&w, "step2"), idb);
    assert_eq!(agent_of_step(&w, "step3"), ida);
    // `workflow show -o wide` names both agents whole (a narrow table
    // shortens the columns).
    let shown = m.ok(&["-o", "wide", "workflow", "show", &id]);
    assert!(shown.contains(&ida) && shown.contains(&idb), "{shown}");
}

#[test]
fn two_managers_share_one_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m1 = NodeProc::start(&dir.path().join("m1"), "manager", &[]).expect("m1");
    let m2 = NodeProc::start(&dir.path().join("m2"), "manager", &[]).expect("m2");
    let a = NodeProc::start(
        &dir.path().join("a"),
        "agent",
        &["--bootstrap", &m1.p2p_addr(), "--bootstrap", &m2.p2p_addr()],
    )
    .expect("agent");
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    m1.add_demo_template();
    m2.add_demo_template();
    let w1 = m1.run("test_simple", &["start_message=one"]);
    let w2 = m2.run("test_simple", &["start_message=two"]);
    assert_eq!(
        m1.wait(&w1, LIMIT)["outputs"]["result"],
        "prependONE append"
    );
    assert_eq!(
        m2.wait(&w2, LIMIT)["outputs"]["result"],
        "prependTWO append"
    );
    let managers: std::collections::BTreeSet<String> = a
        .json(&["job", "list"])
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["manager"].as_str().expect("manager").to_string())
        .collect();
    assert_eq!(managers.len(), 2, "the agent served both managers");
}

#[test]
fn an_agent_that_starts_late_still_gets_the_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    m.add_demo_template();
    let id = m.run("test_simple", &["start_message=late"]);
    std::thread::sleep(Duration::from_secs(2));
    let w = m.json(&["workflow", "show", &id]);
    assert_eq!(w["state"], "initializing", "nobody can serve it yet: {w:#}");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &[]).expect("agent");
    a.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["outputs"]["result"], "prependLATE append", "{w:#}");
}

#[test]
fn the_diamond_runs_both_branches_and_joins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = NodeProc::start(&dir.path().join("m"), "manager", &[]).expect("manager");
    let a = NodeProc::agent_of(&m, &dir.path().join("a"), &["--slots", "2"]).expect("agent");
    m.ok(&[
        "template",
        "add",
        "diamond",
        &caroni_tests::example("templates/diamond.cwl"),
    ]);
    a.add_job_types(&["diamond.toml"]);
    let id = m.run("diamond", &["text=hello"]);
    let w = m.wait(&id, LIMIT);
    assert_eq!(w["state"], "completed", "{w:#}");
    assert_eq!(w["outputs"]["final"], "[HELLO+olleh]");
    let steps: Vec<_> = w["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["state"].clone())
        .collect();
    assert!(steps.iter().all(|s| s == "completed"), "{steps:?}");
}

#[test]
fn an_envelope_with_a_bad_signature_is_refused_and_the_node_goes_on() {
    use caroni_proto::v1::{self as pb, message::Payload};
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(&dir.path().join("n"), "both", &[]).expect("node");
    node.add_demo_template();
    node.add_job_types(&["foojob0.yaml", "foojob1.yaml", "foojob2.yaml"]);
    let node_id = node.node_id();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let acks = rt.block_on(async {
        let key = ed25519_key();
        let msg = pb::Message {
            message_id: "0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d".into(),
            sender: key.1.clone(),
            sent_at: None,
            sender_endpoint: "http://127.0.0.1:1".into(),
            trace_id: String::new(),
            payload: Some(Payload::JobKill(pb::JobKill {
                job_id: "0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d".into(),
                reason: "forged".into(),
            })),
        };
        let env = pb::Envelope {
            body: msg.encode_to_vec(),
            signature: vec![7; 64],
            public_key: key.0,
            batch: false,
        };
        let stranger = libp2p::identity::Keypair::generate_ed25519();
        let mut client = tokio::time::timeout(
            Duration::from_secs(10),
            caroni_tests::peer_client(node.ports.peer, &node_id, &stranger),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let stream = tokio_stream::iter(vec![env]);
        let mut acks = client.deliver(stream).await.expect("deliver").into_inner();
        let mut out = Vec::new();
        while let Ok(Some(Ok(ack))) = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .map(|r| r.transpose())
        {
            out.push(ack);
        }
        out
    });
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].accepted);
    assert!(acks[0].error.contains("bad signature"), "{:?}", acks[0]);
    assert!(node.log_text().contains("refused an envelope"));
    // And it keeps working.
    let id = node.run("test_simple", &["start_message=still"]);
    assert_eq!(
        node.wait(&id, LIMIT)["outputs"]["result"],
        "prependSTILL append"
    );
}

/// A real ed25519 public key (libp2p protobuf encoding) and its node id, so
/// that only the signature is wrong.
fn ed25519_key() -> (Vec<u8>, String) {
    let k = libp2p::identity::Keypair::generate_ed25519();
    (
        k.public().encode_protobuf(),
        k.public().to_peer_id().to_base58(),
    )
}
