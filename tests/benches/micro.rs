//! Criterion micro-benchmarks of the hot path's parts: sealing and opening
//! envelopes, a synced store commit (one record, and a group of 100), and
//! each engine's handling of one workflow's events without I/O.
//!
//! Run: `make bench` (or `cargo bench --profile dev -p caroni-tests`).

use std::collections::BTreeMap;

use caroni_agent::machine::{self as agent, Answering, RunResult};
use caroni_manager::machine::{Ctx, Effect, NoPeers};
use caroni_manager::model::Workflow;
use caroni_proto::v1::{message::Payload, JobStatusRequest};
use caroni_store::{Batch, Store, Table};
use caroni_types::msg::{JobRequest, JobState, Load, Msg, StatusUpdate};
use caroni_types::JobTypeDef;
use criterion::{criterion_group, criterion_main, Criterion};
use uuid::Uuid;

const SIMPLE: &str = include_str!("../../examples/templates/test_simple.cwl");

fn envelopes(c: &mut Criterion) {
    let signer = caroni_peer::Signer::new(
        libp2p::identity::Keypair::generate_ed25519(),
        "http://127.0.0.1:7071".into(),
    );
    let payload = caroni_peer::envelope::encode_payload(
        Payload::JobStatusRequest(JobStatusRequest {
            job_id: Uuid::now_v7().to_string(),
        }),
        Some(Uuid::now_v7()),
    );
    let id = Uuid::now_v7();
    c.bench_function("envelope/seal (sign)", |b| {
        b.iter(|| signer.seal_encoded(id, &payload))
    });
    let env = signer.seal_encoded(id, &payload).expect("seal");
    c.bench_function("envelope/open (verify)", |b| {
        b.iter(|| caroni_peer::open(&env))
    });
}

fn store(c: &mut Criterion) {
    const T: Table<Vec<u8>> = Table::new(0x7e, "bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let value = vec![7u8; 600];
    let mut n = 0u64;
    c.bench_function("store/synced commit of 1 record", |b| {
        b.iter(|| {
            n += 1;
            let mut batch = Batch::default();
            batch.put(T, &n.to_be_bytes(), &value);
            store.write(batch).expect("write")
        })
    });
    c.bench_function("store/synced commit of 100 records", |b| {
        b.iter(|| {
            let mut batch = Batch::default();
            for _ in 0..100 {
                n += 1;
                batch.put(T, &n.to_be_bytes(), &value);
            }
            store.write(batch).expect("write")
        })
    });
}

/// One three-step workflow through the manager machine: create, start,
/// an offer, JobAccepted and the statuses and outputs of every step.
fn manager_workflow(parsed: &caroni_cwl::Workflow) -> Workflow {
    let inputs = BTreeMap::from([("start_message".to_string(), "x".to_string())]);
    let mut wf = Workflow::create(Uuid::now_v7(), "t", parsed, inputs, 1).expect("create");
    let mut gen = Uuid::now_v7;
    let mut ctx = Ctx {
        now_ms: 10,
        lease_ms: 30_000,
        request_ttl_ms: 600_000,
        endpoint: "http://m:1",
        new_id: &mut gen,
        offer_window_ms: 0,
        peers: &NoPeers,
        blobs: &NoPeers,
        answer_timeout_ms: 10_000,
        unplaceable_ms: 300_000,
    };
    wf.start(&mut ctx);
    let mut jobs = Vec::new();
    for n in 0..wf.steps.len() {
        let req = wf.steps[n]
            .request
            .as_ref()
            .map(|r| r.id)
            .unwrap_or_default();
        let fx = wf.on_offer(
            &mut ctx,
            "a",
            "http://a:1",
            req,
            Uuid::now_v7(),
            60_000,
            Load::default(),
            None,
        );
        for e in fx {
            if let Effect::Send(o) = e {
                if let Msg::Accept { job_id, .. } = o.msg {
                    jobs.push(job_id);
                }
            }
        }
    }
    for j in &jobs {
        let _ = wf.on_accepted(&mut ctx, "a", *j);
    }
    for (n, j) in jobs.iter().enumerate() {
        let out = wf.steps[n].outputs[0].clone();
        let _ = wf.on_data(
            &mut ctx,
            "a",
            *j,
            &BTreeMap::from([(out, "v".to_string())]),
            None,
        );
        let _ = wf.on_status(
            &mut ctx,
            "a",
            &StatusUpdate {
                job_id: *j,
                state: JobState::Completed,
                message: String::new(),
                exit_status: Some(0),
                stderr_tail: String::new(),
                sequence: 5,
                executor: String::new(),
                external_id: String::new(),
                queued_at_ms: None,
                started_at_ms: None,
                ended_at_ms: None,
                failure: String::new(),
                receipt: None,
            },
        );
    }
    wf
}

fn engines(c: &mut Criterion) {
    let parsed = caroni_cwl::parse(SIMPLE).expect("template");
    assert_eq!(
        manager_workflow(&parsed).state.as_str(),
        "completed",
        "the benchmark drives a whole workflow"
    );
    c.bench_function("manager machine/one 3-step workflow, every event", |b| {
        b.iter(|| manager_workflow(&parsed))
    });
    let def = JobTypeDef {
        name: "foojob1".into(),
        inputs: vec!["text".into()],
        outputs: vec!["outSB".into()],
        body: "true".into(),
        timeout_seconds: 60,
        max_output_bytes: 0,
        updated_at_ms: 0,
    };
    c.bench_function("agent machine/one job, every event", |b| {
        b.iter(|| {
            let req = JobRequest {
                request_id: Uuid::now_v7(),
                job_type: "foojob1".into(),
                parameter_keys: vec!["text".into()],
                output_keys: vec!["outSB".into()],
                job_kvs: BTreeMap::new(),
                expires_at_ms: 1_000_000,
                manager_endpoint: "http://m:1".into(),
                publish_count: 1,
                workflow_id: None,
                needs: Default::default(),
                priority: 0,
            };
            let (offer, _) = agent::answer_request(
                Some(&def),
                None,
                "m",
                &req,
                10,
                Uuid::now_v7,
                Answering::default(),
            )
            .expect("answer");
            let offer = offer.expect("offer");
            let job_id = Uuid::now_v7();
            let agent::AcceptOutcome::Created(mut job, _, _) = agent::accept(
                Some(&offer),
                Some(&def),
                "m",
                "http://m:1",
                offer.offer_id,
                job_id,
                11,
            )
            .expect("accept") else {
                panic!("the offer was accepted")
            };
            let _ = job.on_data(
                "m",
                &BTreeMap::from([("text".to_string(), "x".to_string())]),
                None,
                0,
            );
            let _ = job.on_started(12);
            job.on_finished(
                RunResult::Completed {
                    outputs: BTreeMap::from([("outSB".to_string(), "y".to_string())]),
                    stderr_tail: String::new(),
                },
                13,
            )
        })
    });
}

criterion_group!(benches, envelopes, store, engines);
criterion_main!(benches);
