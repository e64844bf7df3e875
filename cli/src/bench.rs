//! `caroni bench`: measures a Caroni mesh the way it is deployed, like
//! `pgbench` for a database.
//!
//! It starts the topology itself (one manager and `--agents N` agents as
//! separate `caroni-node` processes on loopback, or `--in-process`), or
//! uses running nodes (`--node URL` for the manager, `--agent-api URL`
//! for each agent). It registers a K-step chain template and its job type,
//! runs `--workflows W` with `--concurrency C` (0: all at once), and prints
//! end-to-end latency from the manager's own timestamps (created → ended),
//! steps per second, messages and synced writes per step, CPU and memory
//! per node, how the steps spread over the agents, and the floor measured
//! in the same run: K sequential spawns of the same job body.
//!
//! (Over 600 lines: topology, load, measurement and report of one
//! command; the report's figures are read against the code that takes
//! them.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use caroni_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient,
    manager_service_client::ManagerServiceClient, node_service_client::NodeServiceClient,
};
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::output::Format;

const JOB_TYPE: &str = "bench_step";
const TEMPLATE: &str = "bench_chain";
/// RunWorkflow calls in flight at once while submitting.
const SUBMIT_CALLS: usize = 256;

/// Options of `caroni bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Agents to start, each a separate caroni-node process.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Managers to start; the workflows are submitted to them in turn,
    /// all at the same time (see --stagger).
    #[arg(long, default_value_t = 1)]
    pub managers: usize,
    /// Seconds between the managers' starts: manager k submits its share
    /// k × this later (a flood from one, then another). With several
    /// managers the report gives each one's share of the steps that ended
    /// while every manager had work.
    #[arg(long, default_value_t = 0.0)]
    pub stagger: f64,
    /// Workflows to run (after a warm-up of 3).
    #[arg(long, default_value_t = 100)]
    pub workflows: usize,
    /// Workflows in flight at once; 0 submits them all at once (a burst).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Steps in the chain template.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Seconds each job sleeps before it prints its output.
    #[arg(long)]
    pub sleep: Option<f64>,
    /// Job slots of each agent started by the bench.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Start the nodes inside this process instead of as separate
    /// processes (CPU and memory are then those of the whole process).
    #[arg(long)]
    pub in_process: bool,
    /// A running manager (the global --node), instead of starting nodes.
    #[arg(skip)]
    pub target: Option<String>,
    /// Client API URL of a running agent (with --node; repeatable). The
    /// bench job type is registered there and its counters are read.
    #[arg(long = "agent-api")]
    pub agent_api: Vec<String>,
    /// The caroni-node binary [default: next to this caroni binary].
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Give up waiting for the workflows after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Extra flags for every caroni-node started (e.g.
    /// "--max-open-requests 256"), split on spaces.
    #[arg(long, default_value = "")]
    pub node_flags: String,
    /// The file workload: each workflow passes its own file of this size
    /// (512k, 10m, 1g…) through the chain of `cat`-like steps, instead of a
    /// string. Prints MB/s per hop beside `cp` + `sha256sum` of the same
    /// file measured in the same run.
    #[arg(long, value_parser = parse_size)]
    pub file_size: Option<u64>,
    /// After the workflows, on the same nodes: one workflow whose one
    /// step scatters the same job over this many elements. Prints its
    /// steps/s beside the workflows' and the manager's RSS sampled while it
    /// runs (compare with `--steps 1 --workflows N --concurrency 0`).
    #[arg(long)]
    pub scatter: Option<usize>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    caroni_types::parse_memory(s).map_err(|e| e.to_string())
}

/// Nodes the bench started; killed when dropped.
struct Topology {
    children: Vec<(String, Child)>,
    embedded: Vec<caroni_node::NodeHandle>,
    /// Data directories and logs; removed after the nodes are killed.
    dir: tempfile::TempDir,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.embedded {
            n.shutdown();
        }
    }
}

/// One node as the bench sees it.
struct NodeRef {
    name: String,
    url: String,
    is_agent: bool,
}

/// A loopback port that was free a moment ago and that this bench has not
/// handed out before: every port is picked before the nodes bind them, and
/// the kernel may offer a closed probe's port again.
fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

fn node_bin(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.node_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("caroni-node");
    if !p.exists() {
        bail!(
            "caroni-node is not next to {}; build it (cargo build --workspace --bins) or pass --node-bin PATH",
            me.display()
        );
    }
    Ok(p)
}

struct Ports {
    api: u16,
    peer: u16,
    p2p: u16,
}

impl Ports {
    fn pick() -> anyhow::Result<Self> {
        Ok(Self {
            api: free_port()?,
            peer: free_port()?,
            p2p: free_port()?,
        })
    }
}

async fn start_topology(args: &BenchArgs) -> anyhow::Result<(Topology, Vec<NodeRef>)> {
    let dir = tempfile::Builder::new()
        .prefix("caroni-bench-")
        .tempdir()
        .context("cannot create a temporary directory for the bench")?;
    let mut topo = Topology {
        children: Vec::new(),
        embedded: Vec::new(),
        dir,
    };
    let root = topo.dir.path().to_path_buf();
    let mut nodes = Vec::new();
    let mut manager_p2p = 0;
    let managers = args.managers.max(1);
    for i in 0..managers + args.agents {
        let (name, role) = if i < managers {
            let name = if managers == 1 {
                "manager".to_string()
            } else {
                format!("manager{}", i + 1)
            };
            (name, "manager")
        } else {
            (format!("agent{}", i + 1 - managers), "agent")
        };
        let ports = Ports::pick()?;
        if i == 0 {
            manager_p2p = ports.p2p;
        }
        let data_dir = root.join(&name);
        let bootstrap = (i > 0).then(|| format!("/ip4/127.0.0.1/tcp/{manager_p2p}"));
        if args.in_process {
            let config = caroni_node::Config {
                role: role.parse().map_err(anyhow::Error::msg)?,
                api_listen: format!("127.0.0.1:{}", ports.api).parse()?,
                peer_listen: format!("127.0.0.1:{}", ports.peer).parse()?,
                peer_advertise: format!("http://127.0.0.1:{}", ports.peer),
                p2p_listen: format!("/ip4/127.0.0.1/tcp/{}", ports.p2p),
                bootstrap: bootstrap.into_iter().collect(),
                slots: args.slots,
                ..caroni_node::Config::embedded(data_dir)
            };
            topo.embedded.push(caroni_node::Node::start(config).await?);
        } else {
            let bin = node_bin(args)?;
            let log = std::fs::File::create(root.join(format!("{name}.log")))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--data-dir")
                .arg(&data_dir)
                .args(["--role", role])
                .args(["--api-listen", &format!("127.0.0.1:{}", ports.api)])
                .args(["--peer-listen", &format!("127.0.0.1:{}", ports.peer)])
                .args([
                    "--peer-advertise",
                    &format!("http://127.0.0.1:{}", ports.peer),
                ])
                .args(["--p2p-listen", &format!("/ip4/127.0.0.1/tcp/{}", ports.p2p)])
                .args(["--mdns", "false"])
                .args(["--console-listen", "off"])
                .args(["--slots", &args.slots.to_string()])
                .args(args.node_flags.split_whitespace())
                .stdout(Stdio::null())
                .stderr(log);
            if let Some(b) = &bootstrap {
                cmd.args(["--bootstrap", b]);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            topo.children.push((name.clone(), child));
        }
        nodes.push(NodeRef {
            name,
            url: format!("http://127.0.0.1:{}", ports.api),
            is_agent: i >= managers,
        });
    }
    for n in &nodes {
        wait_ready(&n.url, &n.name, &mut topo).await?;
    }
    // The agents' gossip links to the manager.
    let mut node = NodeServiceClient::new(connect(&nodes[0].url).await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = node
            .list_peers(pb::ListPeersRequest {})
            .await?
            .into_inner()
            .peers;
        // Subscribed, not only connected: until the manager's gossip knows
        // an agent's subscription, that agent hears nothing it publishes.
        if peers.iter().filter(|p| p.gossip_subscribed).count() >= args.agents + managers - 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agents did not join the manager's gossip within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every other manager hears the gossip through the first.
    for m in nodes.iter().take(managers).skip(1) {
        let mut node = NodeServiceClient::new(connect(&m.url).await?);
        loop {
            let peers = node
                .list_peers(pb::ListPeersRequest {})
                .await?
                .into_inner()
                .peers;
            if peers.iter().any(|p| p.gossip_subscribed) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not join the gossip within 30 s", m.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((topo, nodes))
}

async fn wait_ready(url: &str, name: &str, topo: &mut Topology) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = connect(url).await {
            if NodeServiceClient::new(ch)
                .get_info(pb::GetInfoRequest {})
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        for (n, c) in &mut topo.children {
            if let Ok(Some(status)) = c.try_wait() {
                let log = std::fs::read_to_string(topo.dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the {n} node exited at start ({status}); the end of its log:\n{}",
                    tail.join("\n")
                );
            }
        }
        if Instant::now() > deadline {
            bail!("the {name} node did not answer at {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

fn body(args: &BenchArgs) -> String {
    let print = r#"printf '{"out":"%s"}' "$CARONI_ENV_x""#;
    match args.sleep {
        Some(s) => format!("sleep {s}; {print}"),
        None => print.to_string(),
    }
}

/// The K-step chain: msg → s1 → s2 → … → sK → result.
fn template(steps: usize) -> String {
    let mut cwl = format!(
        "cwlVersion: v1.2\nclass: Workflow\ninputs:\n  msg: string\noutputs:\n  result:\n    type: string\n    outputSource: s{steps}/out\nsteps:\n"
    );
    for k in 1..=steps {
        let source = if k == 1 {
            "msg".to_string()
        } else {
            format!("s{}/out", k - 1)
        };
        cwl.push_str(&format!(
            "  s{k}:\n    run:\n      class: CommandLineTool\n      inputs:\n        x: string\n      outputs:\n        out: string\n    hints:\n      CaroniRequirement:\n        CaroniJobName: {JOB_TYPE}\n    in:\n      x: {source}\n    out: [out]\n"
        ));
    }
    cwl
}

const SCATTER_TEMPLATE: &str = "bench_scatter";

/// One step scattered over the list `xs`.
fn scatter_template() -> String {
    format!(
        "cwlVersion: v1.2\nclass: Workflow\nrequirements:\n  ScatterFeatureRequirement: {{}}\ninputs:\n  xs: string[]\noutputs:\n  result:\n    type: Any\n    outputSource: s/out\nsteps:\n  s:\n    run:\n      class: CommandLineTool\n      inputs:\n        x: string\n      outputs:\n        out: string\n    hints:\n      CaroniRequirement:\n        CaroniJobName: {JOB_TYPE}\n    scatter: x\n    in:\n      x: xs\n    out: [out]\n"
    )
}

/// What the scatter run measured.
#[derive(Debug, Serialize)]
pub struct ScatterReport {
    pub elements: usize,
    pub state: String,
    /// Created → ended, manager timestamps.
    pub seconds: f64,
    pub steps_per_second: f64,
    /// The manager's RSS, highest of the samples taken every 200 ms while
    /// the scatter ran.
    pub manager_rss_mb_max: f64,
    /// The manager's RSS before the scatter started.
    pub manager_rss_mb_before: f64,
    /// Its elements' outputs gathered, in order.
    pub gathered: usize,
}

/// Runs one workflow that scatters over `n` elements.
async fn run_scatter(
    manager: &ManagerServiceClient<Channel>,
    nodes: &[NodeRef],
    n: usize,
    timeout: Duration,
) -> anyhow::Result<ScatterReport> {
    let mut m = manager.clone();
    m.put_template(pb::PutTemplateRequest {
        name: SCATTER_TEMPLATE.into(),
        cwl: scatter_template(),
    })
    .await
    .map_err(crate::client::status)?;
    let rss = |s: &pb::NodeStats| s.rss_bytes as f64 / 1048576.0;
    let mut node_api = NodeServiceClient::new(connect(&nodes[0].url).await?);
    let before = rss(&node_api
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(crate::client::status)?
        .into_inner());
    let xs: Vec<String> = (0..n).map(|k| format!("e{k}")).collect();
    let id = m
        .run_workflow(pb::RunWorkflowRequest {
            template: SCATTER_TEMPLATE.into(),
            inputs: std::collections::HashMap::from([(
                "xs".to_string(),
                serde_json::to_string(&xs)?,
            )]),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .map_err(crate::client::status)?
        .into_inner()
        .workflow_id;
    let started = Instant::now();
    let mut peak = before;
    loop {
        let st = node_api
            .get_stats(pb::GetStatsRequest {})
            .await
            .map_err(crate::client::status)?
            .into_inner();
        peak = peak.max(rss(&st));
        let w = m
            .get_workflow(pb::GetWorkflowRequest {
                workflow_id: id.clone(),
            })
            .await
            .map_err(crate::client::status)?
            .into_inner();
        if matches!(w.state.as_str(), "completed" | "failed" | "cancelled") {
            let secs = match (ms(&w.created_at), ms(&w.finished_at)) {
                (Some(a), Some(b)) => (b - a) / 1000.0,
                _ => started.elapsed().as_secs_f64(),
            };
            let gathered = w
                .outputs
                .get("result")
                .and_then(|v| serde_json::from_str::<Vec<serde_json::Value>>(v).ok())
                .map_or(0, |l| l.len());
            return Ok(ScatterReport {
                elements: n,
                state: w.state,
                seconds: secs,
                steps_per_second: if secs > 0.0 { n as f64 / secs } else { 0.0 },
                manager_rss_mb_max: peak,
                manager_rss_mb_before: before,
                gathered,
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "the scatter of {n} elements did not end within {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The floor: `steps` sequential spawns of the job body, as the agent
/// runs it (bash -c, the same minimal environment and locale, a fresh
/// directory), median of `runs`.
fn floor_ms(body: &str, steps: usize, runs: usize) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(runs);
    let dir = tempfile::tempdir().context("cannot create a directory for the floor measurement")?;
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..steps {
            let out = Command::new("bash")
                .arg("-c")
                .arg(body)
                .current_dir(dir.path())
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", dir.path())
                .env("TMPDIR", dir.path())
                .env("LANG", "C.UTF-8")
                .env("CARONI_ENV_x", "bench")
                .stdin(Stdio::null())
                .output()
                .context("cannot run bash for the floor measurement")?;
            if !out.status.success() {
                bail!(
                    "the job body failed when run directly: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentile(&mut times, 0.5))
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn ms(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.as_ref()
        .map(|t| t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6)
}

/// Ended workflows, by id: (state, created ms, ended ms).
type Ended = HashMap<String, (String, f64, f64)>;

#[derive(Default)]
struct Tracker {
    /// Submitted, not ended: the permit that frees a concurrency slot.
    open: HashMap<String, Option<tokio::sync::OwnedSemaphorePermit>>,
    ended: Ended,
    missed: u64,
}

async fn run_workflows(
    manager: &ManagerServiceClient<Channel>,
    template: &str,
    inputs: Vec<std::collections::BTreeMap<String, String>>,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<(Ended, f64)> {
    let count = inputs.len();
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let open_count = |t: &Arc<Mutex<Tracker>>| {
        t.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open
            .len()
    };
    // Subscribe before submitting, so that no end is missed.
    let mut changes = manager
        .clone()
        .watch_workflows(pb::WatchWorkflowsRequest {})
        .await
        .map_err(crate::client::status)?
        .into_inner();
    let t = tracker.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(c)) = changes.message().await {
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            t.missed += c.missed;
            if matches!(c.state.as_str(), "completed" | "failed" | "cancelled") {
                t.open.remove(&c.workflow_id);
                t.ended.insert(
                    c.workflow_id,
                    (
                        c.state,
                        ms(&c.created_at).unwrap_or(0.0),
                        ms(&c.finished_at).unwrap_or(0.0),
                    ),
                );
            }
        }
    });
    let permits = Arc::new(Semaphore::new(if concurrency == 0 {
        count.max(1)
    } else {
        concurrency
    }));
    let start = Instant::now();
    let deadline = start + timeout;
    let mut submitters = tokio::task::JoinSet::new();
    // Calls in flight at once: a burst is submitted as fast as the manager
    // takes it, without opening thousands of HTTP/2 streams at once.
    let calls = Arc::new(Semaphore::new(SUBMIT_CALLS));
    for input in inputs {
        let permit = permits.clone().acquire_owned().await?;
        let call = calls.clone().acquire_owned().await?;
        let mut m = manager.clone();
        let t = tracker.clone();
        let template = template.to_string();
        submitters.spawn(async move {
            let _call = call;
            let id = m
                .run_workflow(pb::RunWorkflowRequest {
                    template,
                    inputs: input.into_iter().collect(),
                    request_id: String::new(),
                    ..Default::default()
                })
                .await
                .map_err(crate::client::status)
                .context("cannot submit a workflow")?
                .into_inner()
                .workflow_id;
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !t.ended.contains_key(&id) {
                t.open.insert(id, Some(permit));
            }
            anyhow::Ok(())
        });
        if Instant::now() > deadline {
            bail!("timed out while submitting workflows");
        }
    }
    while let Some(r) = submitters.join_next().await {
        r??;
    }
    // Wait for every end; when the stream skipped changes or went quiet,
    // ask for the workflows still open.
    let mut last_progress = (Instant::now(), open_count(&tracker));
    loop {
        let open = open_count(&tracker);
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{open} workflow(s) had not ended after {} s",
                timeout.as_secs()
            );
        }
        if open != last_progress.1 {
            last_progress = (Instant::now(), open);
        } else if last_progress.0.elapsed() > Duration::from_secs(3) {
            let ids: Vec<String> = tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .open
                .keys()
                .cloned()
                .collect();
            for id in ids {
                let w = manager
                    .clone()
                    .get_workflow(pb::GetWorkflowRequest {
                        workflow_id: id.clone(),
                    })
                    .await
                    .map_err(crate::client::status)?
                    .into_inner();
                if matches!(w.state.as_str(), "completed" | "failed" | "cancelled") {
                    let mut t = tracker
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    t.open.remove(&id);
                    t.ended.insert(
                        id,
                        (
                            w.state,
                            ms(&w.created_at).unwrap_or(0.0),
                            ms(&w.finished_at).unwrap_or(0.0),
                        ),
                    );
                }
            }
            last_progress = (Instant::now(), open_count(&tracker));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    watcher.abort();
    let ended = std::mem::take(
        &mut tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ended,
    );
    Ok((ended, wall))
}

async fn stats(nodes: &[NodeRef]) -> anyhow::Result<Vec<pb::NodeStats>> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(
            NodeServiceClient::new(connect(&n.url).await?)
                .get_stats(pb::GetStatsRequest {})
                .await
                .map_err(crate::client::status)
                .with_context(|| format!("cannot read the counters of {}", n.name))?
                .into_inner(),
        );
    }
    Ok(out)
}

/// What `caroni bench` reports (`-o json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The scatter run's figures, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scatter: Option<ScatterReport>,
    /// The file workload's figures, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileReport>,
    pub topology: String,
    pub managers: usize,
    pub agents: usize,
    /// The agents' steps, least and most, over an even share (1.0 = even).
    pub spread_min: f64,
    pub spread_max: f64,
    /// With several managers: each one's share of the workflows that
    /// ended while every manager had work (from the last manager's first
    /// submission to the first manager's last end).
    pub overlap_shares: Vec<f64>,
    pub slots: usize,
    pub steps: usize,
    pub workflows: usize,
    pub concurrency: usize,
    pub body: String,
    pub completed: usize,
    pub failed: usize,
    pub failed_attempts: u64,
    pub latency_ms: Latency,
    pub steps_per_second: f64,
    pub wall_seconds: f64,
    pub messages_per_step: f64,
    pub requests_published_per_step: f64,
    pub synced_writes_per_step: f64,
    pub floor_ms: f64,
    pub p50_over_floor: f64,
    pub nodes: Vec<NodeReport>,
}

/// What the file workload measured.
#[derive(Debug, Serialize)]
pub struct FileReport {
    pub size_bytes: u64,
    /// One transfer between nodes (request to file synced in place, hash
    /// checked): all bytes fetched / all seconds fetching, every node.
    pub transfer_mb_s: f64,
    pub transfer_over_cp_sha: f64,
    /// MB fetched by all nodes during the run.
    pub fetched_mb: f64,
    /// The CLI's uploads to the manager, all files together.
    pub upload_mb_s: f64,
    /// One hop (a step: input fetched, copied, output stored and fetched
    /// back), median workflow: file size / (latency / steps).
    pub hop_mb_s: f64,
    /// `cp` + `sha256sum` of the same file on the same disk.
    pub cp_sha_mb_s: f64,
    pub hop_over_cp_sha: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
    pub rss_mb: f64,
    pub steps: u64,
    pub steps_share: f64,
}

pub async fn bench(args: BenchArgs, format: Format) -> anyhow::Result<ExitCode> {
    if args.steps == 0 || args.workflows == 0 {
        bail!("--steps and --workflows must be at least 1");
    }
    let (topo, nodes, topology) = match &args.target {
        Some(url) => {
            let mut nodes = vec![NodeRef {
                name: "manager".into(),
                url: url.clone(),
                is_agent: args.agent_api.is_empty(),
            }];
            for (i, a) in args.agent_api.iter().enumerate() {
                nodes.push(NodeRef {
                    name: format!("agent{}", i + 1),
                    url: a.clone(),
                    is_agent: true,
                });
            }
            (None, nodes, format!("running nodes at {url}"))
        }
        None => {
            let (t, n) = start_topology(&args).await?;
            let how = if args.in_process {
                "in one process"
            } else {
                "separate caroni-node processes"
            };
            (
                Some(t),
                n,
                format!(
                    "{} manager(s) + {} agent(s), {how}, loopback",
                    args.managers.max(1),
                    args.agents
                ),
            )
        }
    };
    let (body, template_name, job_type, cwl) = match args.file_size {
        Some(_) => (
            crate::bench_files::body(),
            crate::bench_files::TEMPLATE,
            crate::bench_files::JOB_TYPE,
            crate::bench_files::template(args.steps),
        ),
        None => (body(&args), TEMPLATE, JOB_TYPE, template(args.steps)),
    };
    let manager = ManagerServiceClient::new(connect(&nodes[0].url).await?);
    let mut managers = Vec::new();
    for n in nodes.iter().filter(|n| n.name.starts_with("manager")) {
        let m = ManagerServiceClient::new(connect(&n.url).await?);
        m.clone()
            .put_template(pb::PutTemplateRequest {
                name: template_name.into(),
                cwl: cwl.clone(),
            })
            .await
            .map_err(crate::client::status)?;
        managers.push(m);
    }
    for n in nodes.iter().filter(|n| n.is_agent) {
        let mut agent = AgentServiceClient::new(connect(&n.url).await?);
        let exists = agent
            .get_job_type(pb::GetJobTypeRequest {
                name: job_type.into(),
            })
            .await
            .is_ok();
        agent
            .put_job_type(pb::PutJobTypeRequest {
                job_type: Some(pb::JobType {
                    name: job_type.into(),
                    inputs: vec!["x".into()],
                    outputs: vec!["out".into()],
                    body: body.clone(),
                    timeout_seconds: 600,
                    max_output_bytes: 0,
                    ..Default::default()
                }),
                replace: exists,
            })
            .await
            .map_err(crate::client::status)
            .with_context(|| format!("cannot register the bench job type on {}", n.name))?;
    }
    // Every manager has heard every agent advertise the job type (or ten
    // seconds passed): the measured run starts in the steady state.
    let agents = nodes.iter().filter(|n| n.is_agent).count();
    for n in nodes.iter().filter(|n| n.name.starts_with("manager")) {
        let mut api = NodeServiceClient::new(connect(&n.url).await?);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let heard = api
                .list_peers(pb::ListPeersRequest {})
                .await
                .map_err(crate::client::status)?
                .into_inner()
                .peers
                .iter()
                .filter(|p| {
                    p.advert
                        .as_ref()
                        .is_some_and(|a| a.job_types.iter().any(|t| t.name == job_type))
                })
                .count();
            if heard >= agents || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let timeout = Duration::from_secs(args.timeout);
    let strings = |label: &str, n: usize| {
        (0..n)
            .map(|i| std::collections::BTreeMap::from([("msg".to_string(), format!("{label}{i}"))]))
            .collect::<Vec<_>>()
    };
    // Files are made where the bench keeps its nodes, or in a directory of
    // its own for running nodes.
    let scratch = tempfile::Builder::new()
        .prefix("caroni-bench-files-")
        .tempdir()
        .context("cannot create a directory for the bench's files")?;
    let (warmup, inputs, prepared) = match args.file_size {
        Some(size) => {
            let ch = connect(&nodes[0].url).await?;
            let w = crate::bench_files::prepare(scratch.path(), 1024, 3, 1, ch.clone()).await?;
            let p =
                crate::bench_files::prepare(scratch.path(), size, args.workflows, 2, ch).await?;
            let inputs = p.inputs.clone();
            (w.inputs, inputs, Some(p))
        }
        None => (strings("warmup", 3), strings("bench", args.workflows), None),
    };
    for m in &managers {
        run_workflows(m, template_name, warmup.clone(), 1, timeout).await?;
    }
    let before = stats(&nodes).await?;
    // The workflows go to the managers in turn, all managers at once.
    let mut shares: Vec<Vec<_>> = vec![Vec::new(); managers.len()];
    for (i, input) in inputs.into_iter().enumerate() {
        shares[i % managers.len()].push(input);
    }
    let mut runs = tokio::task::JoinSet::new();
    for (k, (m, share)) in managers.iter().zip(shares).enumerate() {
        let m = m.clone();
        let concurrency = args.concurrency;
        let delay = Duration::from_secs_f64(args.stagger.max(0.0) * k as f64);
        runs.spawn(async move {
            tokio::time::sleep(delay).await;
            let r = run_workflows(&m, template_name, share, concurrency, timeout).await;
            (k, r)
        });
    }
    let mut ended = HashMap::new();
    let mut by_manager: Vec<Ended> = vec![HashMap::new(); managers.len()];
    let mut wall: f64 = 0.0;
    while let Some(r) = runs.join_next().await {
        let (k, r) = r?;
        let (e, w) = r?;
        by_manager[k] = e.clone();
        ended.extend(e);
        wall = wall.max(w);
    }
    let overlap = overlap_shares(&by_manager);
    let after = stats(&nodes).await?;
    let scatter = match args.scatter {
        Some(n) if args.file_size.is_none() => {
            Some(run_scatter(&manager, &nodes, n, timeout).await?)
        }
        _ => None,
    };
    let b = body.clone();
    let steps = args.steps;
    let floor = match &prepared {
        Some(p) => {
            let first = p.first.clone();
            tokio::task::spawn_blocking(move || crate::bench_files::cp_sha_seconds(&first))
                .await??
                * 1000.0
        }
        None => tokio::task::spawn_blocking(move || floor_ms(&b, steps, 20)).await??,
    };
    drop(topo);

    let mut lat: Vec<f64> = ended.values().map(|(_, c, f)| f - c).collect();
    let first = ended.values().map(|v| v.1).fold(f64::MAX, f64::min);
    let last = ended.values().map(|v| v.2).fold(0.0, f64::max);
    let completed = ended.values().filter(|v| v.0 == "completed").count();
    let total_steps = (completed * args.steps) as f64;
    let d = |f: fn(&pb::NodeStats) -> u64| -> u64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| f(a).saturating_sub(f(b)))
            .sum()
    };
    let agent_steps: u64 = nodes
        .iter()
        .zip(after.iter().zip(&before))
        .filter(|(n, _)| n.is_agent)
        .map(|(_, (a, b))| a.jobs_completed.saturating_sub(b.jobs_completed))
        .sum();
    let per_step = |n: u64| {
        if total_steps > 0.0 {
            n as f64 / total_steps
        } else {
            0.0
        }
    };
    let p50 = percentile(&mut lat, 0.5);
    let file = match (args.file_size, &prepared) {
        (Some(size), Some(p)) => {
            let mb = size as f64 / 1e6;
            let hop_s = p50 / 1000.0 / args.steps as f64;
            let fetched = d(|s| s.blob_fetched_bytes) as f64 / 1e6;
            let fetch_s: f64 = after
                .iter()
                .zip(&before)
                .map(|(a, b)| a.blob_fetch_seconds - b.blob_fetch_seconds)
                .sum();
            Some(FileReport {
                size_bytes: size,
                transfer_mb_s: if fetch_s > 0.0 {
                    fetched / fetch_s
                } else {
                    0.0
                },
                transfer_over_cp_sha: if fetch_s > 0.0 && floor > 0.0 {
                    (fetched / fetch_s) / (mb / (floor / 1000.0))
                } else {
                    0.0
                },
                fetched_mb: fetched,
                upload_mb_s: mb * args.workflows as f64 / p.upload_seconds.max(1e-9),
                hop_mb_s: mb / hop_s.max(1e-9),
                cp_sha_mb_s: mb / (floor / 1000.0).max(1e-9),
                hop_over_cp_sha: if floor > 0.0 {
                    (mb / hop_s.max(1e-9)) / (mb / (floor / 1000.0))
                } else {
                    0.0
                },
            })
        }
        _ => None,
    };
    let agent_counts: Vec<u64> = nodes
        .iter()
        .zip(after.iter().zip(&before))
        .filter(|(n, _)| n.is_agent)
        .map(|(_, (a, b))| a.jobs_completed.saturating_sub(b.jobs_completed))
        .collect();
    let even = agent_steps as f64 / agent_counts.len().max(1) as f64;
    let spread = |f: fn(u64, u64) -> u64, start: u64| {
        if even > 0.0 {
            agent_counts.iter().copied().fold(start, f) as f64 / even
        } else {
            0.0
        }
    };
    let report = Report {
        scatter,
        file,
        topology,
        managers: nodes
            .iter()
            .filter(|n| n.name.starts_with("manager"))
            .count(),
        spread_min: spread(u64::min, u64::MAX),
        overlap_shares: overlap,
        spread_max: spread(u64::max, 0),
        agents: nodes.iter().filter(|n| n.is_agent).count(),
        slots: args.slots,
        steps: args.steps,
        workflows: args.workflows,
        concurrency: args.concurrency,
        body: body.clone(),
        completed,
        failed: ended.len() - completed,
        failed_attempts: d(|s| s.jobs_failed),
        latency_ms: Latency {
            p50,
            p90: percentile(&mut lat, 0.9),
            p99: percentile(&mut lat, 0.99),
            max: percentile(&mut lat, 1.0),
        },
        steps_per_second: if last > first {
            total_steps / ((last - first) / 1000.0)
        } else {
            0.0
        },
        wall_seconds: wall,
        messages_per_step: per_step(d(|s| s.messages_delivered)),
        requests_published_per_step: per_step(d(|s| s.requests_published)),
        synced_writes_per_step: per_step(d(|s| s.synced_writes)),
        floor_ms: floor,
        p50_over_floor: if floor > 0.0 { p50 / floor } else { 0.0 },
        nodes: nodes
            .iter()
            .zip(after.iter().zip(&before))
            .map(|(n, (a, b))| {
                let steps = a.jobs_completed.saturating_sub(b.jobs_completed);
                NodeReport {
                    name: n.name.clone(),
                    cpu_seconds: a.cpu_seconds - b.cpu_seconds,
                    peak_rss_mb: a.peak_rss_bytes as f64 / 1048576.0,
                    rss_mb: a.rss_bytes as f64 / 1048576.0,
                    steps,
                    steps_share: if agent_steps > 0 {
                        steps as f64 / agent_steps as f64
                    } else {
                        0.0
                    },
                }
            })
            .collect(),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print_report(&report),
    }
    Ok(
        if report.failed == 0 && report.completed == args.workflows {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Each manager's share of the workflows that ended while every manager
/// had work: from the latest first creation to the earliest last end.
fn overlap_shares(by_manager: &[Ended]) -> Vec<f64> {
    if by_manager.len() < 2 || by_manager.iter().any(|e| e.is_empty()) {
        return Vec::new();
    }
    let start = by_manager
        .iter()
        .map(|e| e.values().map(|v| v.1).fold(f64::MAX, f64::min))
        .fold(f64::MIN, f64::max);
    let end = by_manager
        .iter()
        .map(|e| e.values().map(|v| v.2).fold(f64::MIN, f64::max))
        .fold(f64::MAX, f64::min);
    let counts: Vec<usize> = by_manager
        .iter()
        .map(|e| e.values().filter(|v| v.2 >= start && v.2 <= end).count())
        .collect();
    let total: usize = counts.iter().sum();
    counts
        .iter()
        .map(|c| {
            if total > 0 {
                *c as f64 / total as f64
            } else {
                0.0
            }
        })
        .collect()
}

fn print_report(r: &Report) {
    let conc = if r.concurrency == 0 {
        "all at once".to_string()
    } else {
        r.concurrency.to_string()
    };
    println!("caroni bench: {}", r.topology);
    println!(
        "  {} workflows of {} steps, concurrency {conc}, {} slot(s) per agent",
        r.workflows, r.steps, r.slots
    );
    println!("  job body: {}", r.body);
    println!(
        "  completed {}  failed {}  failed attempts {}",
        r.completed, r.failed, r.failed_attempts
    );
    println!(
        "  end-to-end latency (manager timestamps): p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.max
    );
    match &r.file {
        Some(f) => {
            println!(
                "  files: {} each; uploads {:.1} MB/s; one hop (fetch in, copy, store, fetch out) {:.1} MB/s",
                caroni_types::file::human_bytes(f.size_bytes),
                f.upload_mb_s,
                f.hop_mb_s
            );
            println!(
                "  transfers between nodes (TLS, hash checked, synced): {:.1} MB/s ({:.0} MB fetched in all)",
                f.transfer_mb_s, f.fetched_mb
            );
            println!(
                "  floor (cp + sha256sum of the same file, this disk): {:.1} ms = {:.1} MB/s; hop / floor = {:.2}, transfer / floor = {:.2}",
                r.floor_ms, f.cp_sha_mb_s, f.hop_over_cp_sha, f.transfer_over_cp_sha
            );
        }
        None => println!(
            "  floor ({} sequential spawns of the body): {:.1} ms; p50 / floor = {:.2}",
            r.steps, r.floor_ms, r.p50_over_floor
        ),
    }
    println!(
        "  throughput: {:.1} steps/s ({:.2} s wall for the client)",
        r.steps_per_second, r.wall_seconds
    );
    println!(
        "  per step: {:.2} direct messages, {:.2} gossip publications, {:.2} synced writes",
        r.messages_per_step, r.requests_published_per_step, r.synced_writes_per_step
    );
    println!(
        "  spread over the agents: {:.0} % to {:.0} % of an even share",
        r.spread_min * 100.0,
        r.spread_max * 100.0
    );
    if r.overlap_shares.len() > 1 {
        let shares: Vec<String> = r
            .overlap_shares
            .iter()
            .enumerate()
            .map(|(k, s)| format!("manager{} {:.0} %", k + 1, s * 100.0))
            .collect();
        println!(
            "  while every manager had work, workflows ended: {}",
            shares.join(", ")
        );
    }
    if let Some(sc) = &r.scatter {
        println!(
            "  scatter of {} elements in one workflow: {} in {:.2} s = {:.1} steps/s ({:.2}× the workflows' steps/s); {} outputs gathered",
            sc.elements,
            sc.state,
            sc.seconds,
            sc.steps_per_second,
            if r.steps_per_second > 0.0 { sc.steps_per_second / r.steps_per_second } else { 0.0 },
            sc.gathered
        );
        println!(
            "  manager RSS while it ran: {:.1} MB at most (sampled every 200 ms; {:.1} MB before)",
            sc.manager_rss_mb_max, sc.manager_rss_mb_before
        );
    }
    let mut t = crate::output::table(&["node", "CPU s", "peak RSS MB", "RSS MB", "steps", "share"]);
    for n in &r.nodes {
        t.add_row(vec![
            n.name.clone(),
            format!("{:.2}", n.cpu_seconds),
            format!("{:.1}", n.peak_rss_mb),
            format!("{:.1}", n.rss_mb),
            n.steps.to_string(),
            format!("{:.0} %", n.steps_share * 100.0),
        ]);
    }
    println!("{t}");
}
