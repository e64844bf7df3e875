//! The service with a fake transport and executor: what runs first, and
//! what the manager hears.

use super::*;
use caroni_types::msg::{JobState, Msg};
use std::collections::BTreeMap;
use std::time::Duration;

fn now_ms() -> u64 {
    caroni_types::now_ms()
}
use caroni_types::msg::Outbound;
use caroni_types::JobTypeDef;
use std::sync::Mutex;

/// Records what the service sends (what it announces once written).
#[derive(Default)]
struct FakeWire(Mutex<Vec<Outbound>>);

impl Wire for FakeWire {
    fn stage(
        &self,
        _: &mut Batch,
        out: &Outbound,
        _: Option<Uuid>,
    ) -> Result<Staged, caroni_engine::StageError> {
        Ok(Staged {
            to: out.to.clone(),
            endpoint: out.endpoint.clone(),
            item: Some(Arc::new(out.clone())),
        })
    }
    fn notify(&self, staged: Vec<Staged>) {
        let mut sent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in staged {
            if let Some(out) = s.item.and_then(|i| i.downcast::<Outbound>().ok()) {
                sent.push((*out).clone());
            }
        }
    }
    fn publish(&self, _: Vec<JobRequest>) {}
}

/// Records which jobs start, and never finishes them.
struct FakeExec(mpsc::UnboundedSender<Uuid>);

impl Executor for FakeExec {
    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
        let _ = self.0.send(spec.job_id);
        cancel.cancelled().await;
        RunResult::Failed {
            message: "killed".into(),
            exit_status: None,
            stderr_tail: String::new(),
            kind: crate::machine::Failure::Killed,
        }
    }
}

fn inbound(from: &str, msg: Msg) -> Inbound {
    Inbound {
        id: Uuid::new_v4(),
        from: from.into(),
        endpoint: format!("http://{from}"),
        trace: None,
        msg,
        unfetched: None,
    }
}

/// With one slot, a job of manager B whose inputs are all there runs
/// before an older job of manager A that still waits for data.
#[tokio::test]
async fn a_ready_job_runs_before_an_older_one_that_waits_for_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    job_types::put(
        &store,
        JobTypeDef {
            name: "work".into(),
            inputs: vec!["x".into()],
            outputs: vec!["y".into()],
            body: "true".into(),
            timeout_seconds: 60,
            max_output_bytes: 0,
            updated_at_ms: 0,
        },
        false,
    )
    .expect("job type");
    let wire = Arc::new(FakeWire::default());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (svc, handle) = Service::new(
        Options {
            node_id: "me".into(),
            slots: 1,
            serve_managers: None,
            cwl_tools: Default::default(),
            resources: caroni_types::market::Resources {
                cpu_milli: 4000,
                memory_mib: 8192,
                gpus: 0,
                disk_mib: 10240,
            },
            labels: Default::default(),
            fair_half_life_ms: 600_000,
            manager_weights: Default::default(),
            dispute_limit: None,
        },
        store,
        wire.clone(),
        FakeExec(started_tx),
    )
    .expect("service");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(svc.run(cancel.clone()));

    let mut jobs = Vec::new();
    for manager in ["managerA", "managerB"] {
        let req = JobRequest {
            request_id: Uuid::new_v4(),
            job_type: "work".into(),
            parameter_keys: vec!["x".into()],
            output_keys: vec!["y".into()],
            job_kvs: BTreeMap::new(),
            expires_at_ms: now_ms() + 60_000,
            manager_endpoint: format!("http://{manager}"),
            publish_count: 1,
            workflow_id: None,
            needs: Default::default(),
            priority: 0,
        };
        assert!(handle.gossip(manager.into(), format!("http://{manager}"), req.clone()));
        // The offer is staged once the gossip is handled; read it back.
        let offer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let found = wire
                    .0
                    .lock()
                    .expect("lock")
                    .iter()
                    .find_map(|o| match o.msg {
                        Msg::Offer {
                            offer_id,
                            request_id,
                            ..
                        } if request_id == req.request_id => Some(offer_id),
                        _ => None,
                    });
                if let Some(f) = found {
                    return f;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("offer in time");
        let job_id = Uuid::new_v4();
        handle
            .deliver(inbound(
                manager,
                Msg::Accept {
                    offer_id: offer,
                    request_id: req.request_id,
                    job_id,
                },
            ))
            .await
            .expect("accept");
        jobs.push(job_id);
    }
    // Only manager B's job gets its input.
    let items = BTreeMap::from([("x".to_string(), "1".to_string())]);
    handle
        .deliver(inbound(
            "managerB",
            Msg::Data {
                job_id: jobs[1],
                items,
                outputs: false,
            },
        ))
        .await
        .expect("data");
    let first = tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .expect("a job starts")
        .expect("id");
    assert_eq!(first, jobs[1], "the ready job of manager B runs first");
    // Queued and started in one group: the manager hears `running`
    // only (the newer status replaces the older one in the batch).
    let statuses = || -> Vec<JobState> {
        wire.0
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|o| match &o.msg {
                Msg::Status(s) if s.job_id == jobs[1] => Some(s.state),
                _ => None,
            })
            .collect()
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        while statuses().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a status in time");
    assert_eq!(statuses(), [JobState::Running]);
    assert_eq!(
        handle.get_job(jobs[0]).expect("read").map(|j| j.state),
        Some(JobState::Pending)
    );
    cancel.cancel();
    let _ = task.await;
}
