//! Helpers for end-to-end tests: real `caroni-node` processes on free
//! loopback ports, driven with the real `caroni` binary. Every wait is
//! bounded and every process is killed when its guard drops.
//!
//! (Over 600 lines: the shared helpers of every end-to-end test, in one
//! place so that none is written twice.)

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Directory holding the workspace binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary; fails clearly when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing; build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// The repository root (for `examples/`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub api: u16,
    pub peer: u16,
    pub p2p: u16,
    pub console: u16,
}

impl Ports {
    pub fn pick() -> Self {
        Self {
            api: free_port(),
            peer: free_port(),
            p2p: free_port(),
            console: free_port(),
        }
    }
}

/// A `caroni-node` child process, killed (SIGKILL) on drop.
pub struct NodeProc {
    pub child: Option<Child>,
    pub ports: Ports,
    pub data_dir: PathBuf,
    pub role: String,
    pub extra: Vec<String>,
    /// API token passed to the CLI (taken from `--api-token` in `extra`).
    pub token: Option<String>,
    /// CA the CLI trusts when the API has TLS (`--api-tls-cert` in `extra`).
    pub tls_ca: Option<PathBuf>,
    /// Environment of the process beyond `RUST_LOG=info` (which it may
    /// override).
    pub env: Vec<(String, String)>,
    log: PathBuf,
}

impl NodeProc {
    /// Starts a node and waits (at most 60 s) until its API answers.
    pub fn start(data_dir: &Path, role: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_ca(data_dir, role, extra, None)
    }

    /// [`NodeProc::start`] for a node whose client API has TLS with a
    /// certificate signed by the CA in `ca` (PEM), which the CLI trusts.
    pub fn start_with_ca(
        data_dir: &Path,
        role: &str,
        extra: &[&str],
        ca: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_full(data_dir, role, extra, ca, &[])
    }

    /// [`NodeProc::start`] with environment variables (`RUST_LOG`, say).
    pub fn start_with_env(
        data_dir: &Path,
        role: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_full(data_dir, role, extra, None, env)
    }

    fn start_full(
        data_dir: &Path,
        role: &str,
        extra: &[&str],
        ca: Option<&Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut n = Self {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls_ca: ca.map(Path::to_path_buf),
            child: None,
            ports: Ports::pick(),
            data_dir: data_dir.to_path_buf(),
            role: role.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            token: extra
                .iter()
                .position(|a| *a == "--api-token")
                .and_then(|i| extra.get(i + 1))
                .map(|t| t.to_string()),
            log: data_dir.with_extension("log"),
        };
        // Free-picked ports can be taken by a parallel test between the
        // pick and the bind: pick again when the node says so.
        for _ in 0..3 {
            match n.spawn() {
                Err(e) if format!("{e:#}").contains("cannot listen") => {
                    n.kill();
                    n.ports = Ports::pick();
                }
                other => return other.map(|()| n),
            }
        }
        n.spawn()?;
        Ok(n)
    }

    /// (Re)starts the process on the same ports and data directory.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("caroni-node"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--role")
            .arg(&self.role)
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{}", self.ports.api))
            .arg("--peer-listen")
            .arg(format!("127.0.0.1:{}", self.ports.peer))
            .arg("--p2p-listen")
            .arg(format!("/ip4/127.0.0.1/tcp/{}", self.ports.p2p))
            .arg("--mdns")
            .arg("false")
            .arg("--console-listen")
            .arg(format!("127.0.0.1:{}", self.ports.console))
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn caroni-node")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "caroni-node exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if self
                .cli(&["node", "info"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "caroni-node not ready after {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Console URL.
    pub fn console_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.console)
    }

    /// Client API URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.ports.api)
    }

    /// `caroni --node URL` with the token and the CA, if any.
    pub fn cli_command(&self) -> Command {
        let mut cmd = Command::new(bin("caroni"));
        cmd.arg("--node").arg(self.url());
        if let Some(t) = &self.token {
            cmd.arg("--token").arg(t);
        }
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        cmd
    }

    /// Runs `caroni --node URL ARGS…` (bounded to 60 s).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.cli_command();
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(60))
    }

    /// Runs the CLI, requires success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).expect("run caroni");
        assert!(
            out.status.success(),
            "caroni {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, requires failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args).expect("run caroni");
        assert!(
            !out.status.success(),
            "caroni {args:?} should fail but printed {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `caroni -o json ARGS` parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("json output")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client of a node's peer port, dialled as the node with `key` would:
/// over TLS, presenting `key`'s certificate and accepting only node
/// `node_id`'s.
pub async fn peer_client(
    port: u16,
    node_id: &str,
    key: &libp2p::identity::Keypair,
) -> anyhow::Result<
    caroni_proto::v1::peer_service_client::PeerServiceClient<tonic::transport::Channel>,
> {
    let config = caroni_peer::PeerTls::new(key)?.client_config(node_id)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(caroni_peer::tls::connector(
            config,
            Some("caroni-node".into()),
        ))
        .await
        .map_err(|e| anyhow::anyhow!(caroni_peer::error_chain(&e)))?;
    Ok(caroni_proto::v1::peer_service_client::PeerServiceClient::new(channel))
}

/// Runs the `caroni` binary against `node`, killed after 60 s.
pub fn caroni(node: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin("caroni"));
    cmd.arg("--node").arg(node).args(args);
    run_bounded(cmd, Duration::from_secs(60))
}

/// Runs a command with a time limit; kills it when the limit passes.
/// Output is drained by threads so a chatty child never blocks on a pipe.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> anyhow::Result<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Path of an example file.
pub fn example(p: &str) -> String {
    repo().join("examples").join(p).display().to_string()
}

impl NodeProc {
    /// libp2p multiaddr other nodes can bootstrap from.
    pub fn p2p_addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.ports.p2p)
    }

    /// Loads the demo template on a manager.
    pub fn add_demo_template(&self) {
        self.ok(&[
            "template",
            "add",
            "test_simple",
            &example("templates/test_simple.cwl"),
        ]);
    }

    /// Loads job-type files (names under `examples/jobtypes/`) on an agent.
    pub fn add_job_types(&self, files: &[&str]) {
        for f in files {
            self.ok(&["jobtype", "add", &example(&format!("jobtypes/{f}"))]);
        }
    }

    /// Starts a workflow; returns its id.
    pub fn run(&self, template: &str, inputs: &[&str]) -> String {
        let mut args = vec!["run", template];
        args.extend_from_slice(inputs);
        self.ok(&args).trim().to_string()
    }

    /// Follows a workflow until it ends (bounded by `limit`); returns it as JSON.
    pub fn wait(&self, id: &str, limit: Duration) -> serde_json::Value {
        let mut cmd = self.cli_command();
        cmd.args(["-o", "json", "workflow", "watch", id]);
        let out = run_bounded(cmd, limit).unwrap_or_else(|e| {
            panic!(
                "workflow {id} did not end: {e}\nnow: {}\nlog:\n{}",
                self.ok(&["workflow", "show", id]),
                self.log_text()
            )
        });
        // One JSON line per change: the last is the ended workflow.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!(
                "bad JSON from watch ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Node id.
    pub fn node_id(&self) -> String {
        self.json(&["node", "info"])["node_id"]
            .as_str()
            .expect("node id")
            .to_string()
    }
}

impl NodeProc {
    /// Process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// Sends a signal by name (STOP, CONT, …) with `kill`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Writes a job-type file into `dir` and adds (or updates) it.
    pub fn put_job_type(
        &self,
        dir: &Path,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        body: &str,
        update: bool,
    ) {
        let file = dir.join(format!("{name}-{}.yaml", free_port()));
        let doc = serde_json::json!({
            "name": name, "inputs": inputs, "outputs": outputs, "body": body, "timeout": 120,
        });
        std::fs::write(&file, serde_json::to_string(&doc).expect("json")).expect("write");
        self.ok(&[
            "jobtype",
            if update { "update" } else { "add" },
            file.to_str().expect("utf8"),
        ]);
    }

    /// Adds the demo's job types with step 2 (`foojob1`) slowed down by
    /// `sleep_s` seconds, so that a test can act while it runs.
    pub fn add_demo_job_types_with_slow_step2(&self, dir: &Path, sleep_s: u32) {
        self.add_job_types(&["foojob0.yaml", "foojob2.yaml"]);
        self.put_job_type(
            dir,
            "foojob1",
            &["text"],
            &["outSB"],
            &format!(
                r#"sleep {sleep_s}; jq -cn --arg t "$CARONI_ENV_text" '{{outSB: ("prepend" + $t)}}'"#
            ),
            false,
        );
    }

    /// Polls `workflow show` until `pred` holds (bounded by `limit`).
    pub fn wait_until(
        &self,
        id: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let w = self.json(&["workflow", "show", id]);
            if pred(&w) {
                return w;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}: {w:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The step named `id` of a workflow JSON.
pub fn step<'a>(w: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    w["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == id)
        .expect("step")
}

impl NodeProc {
    /// An agent that bootstraps from `manager` (extra flags appended).
    pub fn agent_of(manager: &NodeProc, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let boot = manager.p2p_addr();
        let mut args = vec!["--bootstrap", boot.as_str()];
        args.extend_from_slice(extra);
        Self::start(data_dir, "agent", &args)
    }
}

/// A plain HTTP/1.1 answer: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request to `addr` (`Connection: close`, bounded by
/// 10 s) with `headers` (the `Host` header defaults to `addr`) and reads
/// the whole answer.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<HttpAnswer> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        unchunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl NodeProc {
    /// `host:port` of the console.
    pub fn console_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.console)
    }

    /// Starts a workflow through the console's API (which takes values too
    /// large for a command line); returns its id.
    pub fn console_run(&self, template: &str, inputs: serde_json::Value) -> String {
        let body = serde_json::json!({ "template": template, "inputs": inputs }).to_string();
        let a = http(
            &self.console_addr(),
            "POST",
            "/api/workflows",
            &[
                ("content-type", "application/json"),
                ("x-caroni-console", "1"),
            ],
            &body,
        )
        .expect("start through the console");
        assert_eq!(a.status, 200, "{}", a.body);
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
        v["workflow_id"].as_str().expect("id").to_string()
    }

    /// Logs in to the console with `token` and returns the session id.
    pub fn console_login(&self, token: &str) -> anyhow::Result<String> {
        let a = http(
            &self.console_addr(),
            "POST",
            "/login",
            &[
                ("content-type", "application/json"),
                ("x-caroni-console", "1"),
            ],
            &serde_json::json!({ "token": token }).to_string(),
        )?;
        if a.status != 200 {
            bail!("login answered {}: {}", a.status, a.body);
        }
        let v: serde_json::Value = serde_json::from_str(&a.body)?;
        v["session"]
            .as_str()
            .map(String::from)
            .context("no session in the login answer")
    }
}

/// A number field of `/proc/<pid>/<file>` (`status`: `VmRSS:` in kB;
/// `io`: `write_bytes:`), 0 when the process or field is gone.
pub fn proc_field(pid: u32, file: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of a process, in MB.
pub fn rss_mb(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:") / 1024
}

/// How many processes on this machine have `marker` in their command line.
pub fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .filter(|c| {
                    String::from_utf8_lossy(c)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .count()
        })
        .unwrap_or(0)
}

impl NodeProc {
    /// The jobs this agent ran to completion, one per (job type, inputs);
    /// panics naming the job if one ran to completion twice.
    pub fn completed_once(&self) -> usize {
        let jobs = self.json(&["job", "list", "--limit", "1000"]);
        let mut seen = std::collections::BTreeSet::new();
        for j in jobs
            .as_array()
            .expect("jobs")
            .iter()
            .filter(|j| j["state"] == "completed")
        {
            let key = (j["job_type"].to_string(), j["inputs"].to_string());
            assert!(
                seen.insert(key.clone()),
                "a job ran to completion twice: {key:?}"
            );
        }
        seen.len()
    }
}
