//! Benchmark: end-to-end latency of the three-step demo workflow on one
//! embedded node (manager + agent), with the demo's jq bodies and with
//! trivial printf bodies, plus the direct messages one workflow costs and
//! the throughput of a concurrent batch. Prints figures; asserts nothing.
//!
//! Run: `cargo run -p caroni-tests --bin caroni-bench [-- RUNS]`

use std::time::{Duration, Instant};

use caroni_node::{Config, LogFormat, Node};
use caroni_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient,
    manager_service_client::ManagerServiceClient, node_service_client::NodeServiceClient,
};
use tonic::transport::Channel;

const TEMPLATE: &str = include_str!("../../../examples/templates/test_simple.cwl");

fn job(name: &str, input: &str, output: &str, body: &str) -> pb::JobType {
    pb::JobType {
        name: name.into(),
        inputs: vec![input.into()],
        outputs: vec![output.into()],
        body: body.into(),
        timeout_seconds: 60,
        max_output_bytes: 0,
        updated_at: None,
    }
}

fn jq_types() -> Vec<pb::JobType> {
    vec![
        job(
            "foojob0",
            "message",
            "jobout",
            r#"jq -cn --arg m "$CARONI_ENV_message" '{jobout: ($m | ascii_upcase)}'"#,
        ),
        job(
            "foojob1",
            "text",
            "outSB",
            r#"jq -cn --arg t "$CARONI_ENV_text" '{outSB: ("prepend" + $t)}'"#,
        ),
        job(
            "foojob2",
            "final_text",
            "out",
            r#"jq -cn --arg t "$CARONI_ENV_final_text" '{out: ($t + " append")}'"#,
        ),
    ]
}

fn trivial_types() -> Vec<pb::JobType> {
    vec![
        job(
            "foojob0",
            "message",
            "jobout",
            r#"printf '{"jobout":"%s"}' "${CARONI_ENV_message^^}""#,
        ),
        job(
            "foojob1",
            "text",
            "outSB",
            r#"printf '{"outSB":"prepend%s"}' "$CARONI_ENV_text""#,
        ),
        job(
            "foojob2",
            "final_text",
            "out",
            r#"printf '{"out":"%s append"}' "$CARONI_ENV_final_text""#,
        ),
    ]
}

struct Bench {
    manager: ManagerServiceClient<Channel>,
    agent: AgentServiceClient<Channel>,
    node: NodeServiceClient<Channel>,
}

impl Bench {
    async fn set_types(&mut self, types: Vec<pb::JobType>) -> anyhow::Result<()> {
        for t in types {
            let exists = self
                .agent
                .get_job_type(pb::GetJobTypeRequest {
                    name: t.name.clone(),
                })
                .await
                .is_ok();
            self.agent
                .put_job_type(pb::PutJobTypeRequest {
                    job_type: Some(t),
                    replace: exists,
                })
                .await?;
        }
        Ok(())
    }

    async fn run_one(&mut self, text: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let id = self
            .manager
            .run_workflow(pb::RunWorkflowRequest {
                template: "test_simple".into(),
                inputs: [("start_message".to_string(), text.to_string())]
                    .into_iter()
                    .collect(),
            })
            .await?
            .into_inner()
            .workflow_id;
        self.wait(&id).await?;
        Ok(start.elapsed())
    }

    async fn wait(&mut self, id: &str) -> anyhow::Result<pb::Workflow> {
        let mut s = self
            .manager
            .watch_workflow(pb::GetWorkflowRequest {
                workflow_id: id.into(),
            })
            .await?
            .into_inner();
        while let Some(w) = tokio::time::timeout(Duration::from_secs(60), s.message()).await?? {
            match w.state.as_str() {
                "completed" => return Ok(w),
                "failed" | "cancelled" => anyhow::bail!("workflow {id} {}: {}", w.state, w.message),
                _ => {}
            }
        }
        anyhow::bail!("watch ended early")
    }

    async fn delivered(&mut self) -> anyhow::Result<u64> {
        let peers = self
            .node
            .list_peers(pb::ListPeersRequest {})
            .await?
            .into_inner()
            .peers;
        Ok(peers.iter().map(|p| p.delivered).sum())
    }
}

fn report(label: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    println!(
        "{label:<34} runs {:>3}  min {:>7.1} ms  median {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms",
        v.len(),
        ms(v[0]),
        p(0.5),
        p(0.9),
        ms(v[v.len() - 1])
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let node = Node::start(Config {
        data_dir: dir.path().join("node"),
        role: caroni_types_role(),
        api_listen: "127.0.0.1:0".parse()?,
        api_token: None,
        peer_listen: "127.0.0.1:0".parse()?,
        peer_advertise: "http://127.0.0.1:0".into(),
        p2p_listen: "/ip4/127.0.0.1/tcp/0".into(),
        bootstrap: vec![],
        mdns: false,
        slots: 2,
        lease_seconds: 30,
        request_ttl_seconds: 600,
        max_open_requests: caroni_node::config::DEFAULT_MAX_OPEN_REQUESTS,
        offer_window_ms: caroni_node::config::DEFAULT_OFFER_WINDOW_MS,
        log_format: LogFormat::Text,
    })
    .await?;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", node.api_addr))?
        .connect()
        .await?;
    let mut b = Bench {
        manager: ManagerServiceClient::new(ch.clone()),
        agent: AgentServiceClient::new(ch.clone()),
        node: NodeServiceClient::new(ch),
    };
    b.manager
        .put_template(pb::PutTemplateRequest {
            name: "test_simple".into(),
            cwl: TEMPLATE.into(),
        })
        .await?;

    println!("caroni-bench: one node (manager + agent, 2 slots), 3-step test_simple, dev profile");
    for (label, types) in [
        ("demo bodies (jq)", jq_types()),
        ("trivial bodies (bash printf)", trivial_types()),
    ] {
        b.set_types(types).await?;
        b.run_one("warmup").await?;
        let before = b.delivered().await?;
        let mut times = Vec::new();
        for i in 0..runs {
            times.push(b.run_one(&format!("run{i}")).await?);
        }
        let after = b.delivered().await?;
        report(label, times);
        println!(
            "{:<34} direct messages per workflow: {:.1} (+ 3 gossip requests)",
            "",
            (after - before) as f64 / runs as f64
        );
    }

    let batch = 50;
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 0..batch {
        ids.push(
            b.manager
                .run_workflow(pb::RunWorkflowRequest {
                    template: "test_simple".into(),
                    inputs: [("start_message".to_string(), format!("b{i}"))]
                        .into_iter()
                        .collect(),
                })
                .await?
                .into_inner()
                .workflow_id,
        );
    }
    for id in &ids {
        b.wait(id).await?;
    }
    let t = start.elapsed();
    println!(
        "batch of {batch} concurrent workflows (trivial bodies): {:.0} ms, {:.1} workflows/s, {:.1} jobs/s",
        t.as_secs_f64() * 1000.0,
        batch as f64 / t.as_secs_f64(),
        3.0 * batch as f64 / t.as_secs_f64()
    );
    node.shutdown();
    node.wait().await?;
    Ok(())
}

fn caroni_types_role() -> caroni_types::Role {
    caroni_types::Role::Both
}
