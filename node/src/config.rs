//! Node configuration: defaults < TOML file (`--config`) < `CARONI_*`
//! environment < command-line flags, merged into one [`Config`].
//!
//! clap reads flags and their `CARONI_*` environment variables (a flag wins
//! over its variable); the TOML file fills what neither gave; built-in
//! defaults fill the rest.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use caroni_types::Role;
use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting of a node, declared once: the field's name is its TOML
/// key, its `#[arg]` gives its flag, its `CARONI_*` variable and its
/// default (the engines' tuning defaults are the engines' own constants).
/// [`Config::load`] merges defaults < TOML file < environment < flags:
/// clap reads flags and variables and says where each value came from; the
/// file fills only what came from a default.
#[derive(Clone, Debug, Serialize, clap::Parser)]
#[command(
    name = "caroni-node",
    version,
    about = "Caroni node: a manager, an agent or both, in one daemon",
    after_help = "Example:\n  caroni-node --data-dir /var/lib/caroni --role both \\\n    --peer-listen 0.0.0.0:7071 --peer-advertise http://10.0.0.5:7071 \\\n    --bootstrap /ip4/10.0.0.6/tcp/7072\n\nPrecedence: defaults < --config FILE (TOML, same keys with underscores) < CARONI_* environment < flags."
)]
pub struct Config {
    /// TOML configuration file.
    #[arg(long, env = "CARONI_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory holding the node key and the RocksDB database.
    #[arg(long, env = "CARONI_DATA_DIR", default_value = "caroni-data")]
    pub data_dir: PathBuf,
    /// Role: manager, agent or both.
    #[arg(long, env = "CARONI_ROLE", default_value = "both")]
    pub role: Role,
    /// Client API address (gRPC). Loopback by default.
    #[arg(long, env = "CARONI_API_LISTEN", default_value = "127.0.0.1:7070")]
    pub api_listen: SocketAddr,
    /// Token clients must present (required when --api-listen is not loopback).
    #[arg(long, env = "CARONI_API_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing)]
    pub api_token: Option<String>,
    /// Node-to-node gRPC address.
    #[arg(long, env = "CARONI_PEER_LISTEN", default_value = "0.0.0.0:7071")]
    pub peer_listen: SocketAddr,
    /// Endpoint other nodes dial to reach this one, e.g.
    /// http://10.0.0.5:7071 [default: --peer-listen when it is not a
    /// wildcard, else this host's address].
    #[arg(
        long,
        env = "CARONI_PEER_ADVERTISE",
        default_value = "",
        hide_default_value = true
    )]
    pub peer_advertise: String,
    /// libp2p listen multiaddr.
    #[arg(
        long,
        env = "CARONI_P2P_LISTEN",
        default_value = "/ip4/0.0.0.0/tcp/7072"
    )]
    pub p2p_listen: String,
    /// libp2p multiaddr of a peer to dial at start; repeat for several
    /// (environment: comma-separated).
    #[arg(long, env = "CARONI_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Turn mDNS discovery on or off.
    #[arg(long, env = "CARONI_MDNS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mdns: bool,
    /// Concurrent jobs on an agent.
    #[arg(long, env = "CARONI_SLOTS", default_value_t = caroni_agent::engine::DEFAULT_SLOTS)]
    pub slots: usize,
    /// CPUs this agent offers (1.5 allowed) [default: the host's CPU count].
    /// Advertised to managers; a step that needs more is never sent here.
    #[arg(long, env = "CARONI_CPUS")]
    pub cpus: Option<f64>,
    /// Memory this agent offers, as a size (512m, 16g) [default: the
    /// host's physical memory].
    #[arg(long, env = "CARONI_MEMORY")]
    pub memory: Option<String>,
    /// GPUs this agent offers (label their kind with --label gpu=a100).
    #[arg(long, env = "CARONI_GPUS", default_value_t = 0)]
    pub gpus: u32,
    /// Scratch disk this agent offers, as a size [default: the free space
    /// of the data directory's file system at start].
    #[arg(long, env = "CARONI_DISK")]
    pub disk: Option<String>,
    /// A label of this agent, key=value (region=eu, gpu=a100); repeat for
    /// several (environment: comma-separated). Steps may require labels.
    #[arg(long = "label", env = "CARONI_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Fair share: how fast a manager's past use of this agent is
    /// forgotten (its run time halves every this long), e.g. 10m or 1h.
    #[arg(long, env = "CARONI_FAIR_SHARE_HALF_LIFE", default_value = "10m")]
    pub fair_share_half_life: String,
    /// Fair share: a manager's weight, NODE_ID=W (default 1 for every
    /// manager); a manager of weight 2 gets twice the run time of one of
    /// weight 1 when both have work here. Repeat for several.
    #[arg(
        long = "manager-weight",
        env = "CARONI_MANAGER_WEIGHTS",
        value_delimiter = ','
    )]
    pub manager_weights: Vec<String>,
    /// Receipts: decline the requests of a manager that disputed, or left
    /// unanswered for over a minute, more than this many of this agent's
    /// receipts (none: no limit). See `caroni ledger`.
    #[arg(long, env = "CARONI_DISPUTE_LIMIT")]
    pub dispute_limit: Option<u64>,
    /// Lease on live jobs, in seconds: a manager counts a job as lost after
    /// its agent was silent this long.
    #[arg(long, env = "CARONI_LEASE_SECONDS", default_value_t = caroni_manager::engine::DEFAULT_LEASE_SECONDS)]
    pub lease_seconds: u64,
    /// Lifetime of an unanswered job request, in seconds; then it counts as
    /// a failed attempt and is replaced.
    #[arg(long, env = "CARONI_REQUEST_TTL_SECONDS", default_value_t = caroni_manager::engine::DEFAULT_REQUEST_TTL_SECONDS)]
    pub request_ttl_seconds: u64,
    /// Job requests a manager keeps out at once; more workflows wait, in
    /// order, in `created` (admission control).
    #[arg(long, env = "CARONI_MAX_OPEN_REQUESTS", default_value_t = caroni_manager::engine::DEFAULT_MAX_OPEN_REQUESTS)]
    pub max_open_requests: usize,
    /// Most bytes of files (whole and partly received) the node keeps in
    /// its blob store under --data-dir; a transfer or upload that would go
    /// over is refused with a clear error. 0: no limit but the disk's.
    #[arg(long, env = "CARONI_BLOB_DISK_BYTES", default_value_t = 0)]
    pub blob_disk_bytes: u64,
    /// How long a file nothing live refers to is kept after its last use
    /// (an ended workflow's files, an upload no workflow took): a duration
    /// such as 7d, 12h or 30m.
    #[arg(long, env = "CARONI_BLOB_RETENTION", default_value = "7d")]
    pub blob_retention: String,
    /// Which real CWL CommandLineTools this agent runs when managers send
    /// them (running a tool is running the manager's code): `off` declines
    /// them with the reason; `local` runs them on this host as this node's
    /// user, each in a fresh directory (a DockerRequirement is a hint);
    /// `container` runs only tools with a DockerRequirement, each in a
    /// container of its image, which must be on this host's Docker engine.
    #[arg(long, env = "CARONI_CWL_TOOLS", default_value = "off")]
    pub cwl_tools: String,
    /// Longest one CWL expression (JavaScript) may run before it is
    /// stopped and its job fails: a duration such as 10s.
    #[arg(long, env = "CARONI_CWL_EXPRESSION_TIMEOUT", default_value = "10s")]
    pub cwl_expression_timeout: String,
    /// Most memory one CWL tool's JavaScript may use, in bytes.
    #[arg(long, env = "CARONI_CWL_EXPRESSION_MEMORY_BYTES", default_value_t = 256 << 20)]
    pub cwl_expression_memory_bytes: u64,
    /// A file transfer that receives nothing for this long fails and is
    /// tried again later from where it stopped: a duration such as 30s or
    /// 2m (at least 1s).
    #[arg(long, env = "CARONI_TRANSFER_STALL_TIMEOUT", default_value = "30s")]
    pub transfer_stall_timeout: String,
    /// On a node that is an agent only: the most bytes of files it keeps
    /// as a cache; past it, the least recently used files no live job needs
    /// (unused for 10 minutes) are deleted. 0: no bound.
    #[arg(long, env = "CARONI_BLOB_CACHE_BYTES", default_value_t = 10 << 30)]
    pub blob_cache_bytes: u64,
    /// Agent: the most bytes kept of each job's stdout and of its stderr
    /// (whole up to this, then a line saying what was left out), for
    /// `caroni workflow logs` and `caroni job logs`; deleted with the job
    /// (`--retention`). 0 keeps no logs (the 2 KiB stderr tail in status
    /// messages stays).
    #[arg(long, env = "CARONI_JOB_LOG_BYTES", default_value_t = caroni_agent::logs::DEFAULT_LOG_BYTES)]
    pub job_log_bytes: u64,
    /// Milliseconds to gather offers before taking the least busy agent;
    /// 0 takes the first offer. A manager decides at once when every agent
    /// it knows has answered.
    #[arg(long, env = "CARONI_OFFER_WINDOW_MS", default_value_t = caroni_manager::engine::DEFAULT_OFFER_WINDOW_MS)]
    pub offer_window_ms: u64,
    /// Manager: how long agents have to answer a job request before it is
    /// shown as blocked, with the declines' reasons (a duration such as
    /// 10s). A request every known agent declined is blocked at once.
    #[arg(long, env = "CARONI_ANSWER_TIMEOUT", default_value = "10s")]
    pub answer_timeout: String,
    /// Manager: how long a request may stay blocked (no agent will or can
    /// take it) before its step and workflow fail with the reason, unless
    /// an agent that can take it appears (a duration such as 5m).
    #[arg(long, env = "CARONI_UNPLACEABLE_TIMEOUT", default_value = "5m")]
    pub unplaceable_timeout: String,
    /// Ended workflows (manager: with their steps, values and elements'
    /// workflows) and ended jobs (agent) are deleted this long after they
    /// ended: a duration such as 30d or 12h, or `off` to keep them.
    #[arg(long, env = "CARONI_RETENTION", default_value = "30d")]
    pub retention: String,
    /// Manager: how long a submission's client request id is remembered
    /// (a retried RunWorkflow with the same id within it creates nothing).
    #[arg(long, env = "CARONI_SUBMISSION_RETENTION", default_value = "24h")]
    pub submission_retention: String,
    /// Log format. Filter with RUST_LOG.
    #[arg(long, env = "CARONI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Start although the data directory holds the state of another node
    /// id (its `node.key` was lost or replaced). Peers know the old id:
    /// jobs and workflows they hold for it are not this node's.
    #[arg(long)]
    pub new_identity: bool,
    /// TLS on node links: each node's certificate is derived from its node
    /// key and checked against the node id it claims. Every node of a mesh
    /// must have the same setting.
    #[arg(long, env = "CARONI_PEER_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub peer_tls: bool,
    /// Pre-shared key file of a private mesh (libp2p swarm.key format,
    /// written by `caroni mesh-key`): nodes without it can neither join
    /// the gossip nor deliver a message.
    #[arg(long, env = "CARONI_MESH_KEY")]
    pub mesh_key: Option<PathBuf>,
    /// Agent: serve only these managers (node ids, comma-separated);
    /// others' requests are declined with the reason.
    #[arg(long, env = "CARONI_SERVE_MANAGERS", value_delimiter = ',')]
    pub serve_managers: Vec<String>,
    /// Manager: take offers only from these agents (node ids,
    /// comma-separated); others' offers are refused.
    #[arg(long, env = "CARONI_USE_AGENTS", value_delimiter = ',')]
    pub use_agents: Vec<String>,
    /// PEM certificate (chain) for TLS on the client API; needs
    /// --api-tls-key. `caroni tls-cert` makes one.
    #[arg(long, env = "CARONI_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of --api-tls-cert.
    #[arg(long, env = "CARONI_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Web console address, or `off`. Off loopback it needs --api-token,
    /// which its login page asks for.
    #[arg(long, env = "CARONI_CONSOLE_LISTEN", default_value = "127.0.0.1:7073")]
    pub console_listen: Listen,
    /// A host name the console is opened by (besides IP addresses and
    /// localhost, which always work); repeat for several (environment:
    /// comma-separated).
    #[arg(
        long = "console-host",
        env = "CARONI_CONSOLE_HOSTS",
        value_delimiter = ','
    )]
    pub console_hosts: Vec<String>,
}

/// A duration such as `10s`, `5m` or `500ms`.
fn parse_duration(v: &str) -> Option<std::time::Duration> {
    humantime::parse_duration(v.trim()).ok()
}

/// An address to listen on, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(Listen(None)),
            a => a
                .parse()
                .map(|a| Listen(Some(a)))
                .map_err(|_| format!("`{a}` is not an address such as 127.0.0.1:7073, nor `off`")),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.collect_str(&a),
            None => s.serialize_str("off"),
        }
    }
}

/// Settings given only as flags, never in the file.
const FLAG_ONLY: [&str; 2] = ["config", "new_identity"];

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid TOML or has unknown keys.
    #[error("the configuration file {0} is invalid: {1}")]
    Parse(PathBuf, String),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// A node in both roles on `data_dir`, every listener on a free
    /// loopback port, no mDNS, no console, default tuning: what an
    /// embedded node (`caroni demo`, `caroni bench --in-process`, tests)
    /// starts from.
    pub fn embedded(data_dir: PathBuf) -> Self {
        use clap::Parser;
        let mut c = Self::parse_from(["caroni-node"]);
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        c.data_dir = data_dir;
        c.role = Role::Both;
        c.api_listen = loopback;
        c.api_token = None;
        c.peer_listen = loopback;
        c.peer_advertise = "http://127.0.0.1:0".into();
        c.p2p_listen = "/ip4/127.0.0.1/tcp/0".into();
        c.mdns = false;
        c.console_listen = Listen(None);
        c
    }

    /// Reads the command line `args` (and the `CARONI_*` environment) and
    /// the TOML file it names, merges them over the defaults and checks
    /// the result. `--help`, `--version` and malformed flags print and
    /// exit, as clap does.
    pub fn load<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let matches = match Self::command().try_get_matches_from(args.clone()) {
            Ok(m) => m,
            Err(e) if e.use_stderr() => return Err(ConfigError::Invalid(e.to_string())),
            // --help, --version.
            Err(e) => e.exit(),
        };
        let mut config =
            Self::from_arg_matches(&matches).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut file_flags = Vec::new();
        if let Some(path) = config.config.clone() {
            (config, file_flags) = Self::with_file(&path, &args, &matches)?;
        }
        config.api_token = config.api_token.filter(|t| !t.is_empty());
        if config.peer_advertise.trim().is_empty() {
            config.peer_advertise = default_advertise(config.peer_listen, config.peer_tls);
        }
        for ids in [
            &mut config.bootstrap,
            &mut config.serve_managers,
            &mut config.use_agents,
        ] {
            *ids = ids
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
        }
        // Values are checked after merging; a bad one from the file says
        // where it is.
        config.check().map_err(|e| match &config.config {
            Some(path) => locate(e, path, &file_flags),
            None => e,
        })?;
        Ok(config)
    }

    /// The file fills what neither a flag nor a variable gave: its
    /// settings become flags placed before the command line's, and the
    /// whole is parsed once more by the same declaration (so a value in
    /// the file is checked exactly as the flag's).
    fn with_file(
        path: &Path,
        args: &[std::ffi::OsString],
        matches: &clap::ArgMatches,
    ) -> Result<(Self, Vec<FileFlag>), ConfigError> {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let invalid = |e: String| ConfigError::Parse(path.into(), e);
        let (file, lines) = read_file(path)?;
        let line_of = |key: &str| lines.get(key).copied().unwrap_or(0);
        let cmd = Self::command();
        let mut file_flags = Vec::new();
        let mut merged = vec![args
            .first()
            .cloned()
            .unwrap_or_else(|| "caroni-node".into())];
        for (key, value) in &file {
            let long = cmd
                .get_arguments()
                .filter(|a| !FLAG_ONLY.contains(&a.get_id().as_str()))
                .find(|a| a.get_id() == key.as_str())
                .and_then(|a| a.get_long());
            let Some(long) = long else {
                return Err(invalid(format!(
                    "line {}: unknown field `{key}`; the keys are the flags' names with underscores (`caroni-node --help`)",
                    line_of(key)
                )));
            };
            let given = matches!(
                matches.value_source(key.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if !given {
                let text = file_value(key, value)
                    .map_err(|e| invalid(format!("line {}: {e}", line_of(key))))?;
                merged.push(format!("--{long}={text}").into());
                file_flags.push((long.to_string(), key.clone(), line_of(key)));
            }
        }
        merged.extend(args.iter().skip(1).cloned());
        let matches = Self::command()
            .try_get_matches_from(merged)
            .map_err(|e| locate(ConfigError::Invalid(e.to_string()), path, &file_flags))?;
        let config = Self::from_arg_matches(&matches)
            .map_err(|e| locate(ConfigError::Invalid(e.to_string()), path, &file_flags))?;
        Ok((config, file_flags))
    }

    /// `--blob-retention` read as a duration.
    pub fn blob_retention(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(self.blob_retention.trim()).map_err(|e| {
            ConfigError::Invalid(format!(
                "--blob-retention `{}` is not a duration ({e}); write e.g. 7d, 12h or 30m",
                self.blob_retention
            ))
        })
    }

    /// `--cwl-expression-timeout` read as a duration.
    pub fn cwl_expression_timeout(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(self.cwl_expression_timeout.trim()).map_err(|e| {
            ConfigError::Invalid(format!(
                "--cwl-expression-timeout `{}` is not a duration ({e}); write e.g. 10s or 500ms",
                self.cwl_expression_timeout
            ))
        })
    }

    /// `--retention` read: `None` for `off`.
    pub fn retention(&self) -> Result<Option<std::time::Duration>, ConfigError> {
        if self.retention.trim() == "off" {
            return Ok(None);
        }
        parse_duration(&self.retention)
            .filter(|d| d.as_secs() >= 1)
            .map(Some)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "--retention `{}` is not a duration of at least 1s nor `off`; write e.g. 30d or 12h",
                    self.retention
                ))
            })
    }

    /// `--submission-retention` read.
    pub fn submission_retention(&self) -> Result<std::time::Duration, ConfigError> {
        parse_duration(&self.submission_retention)
            .filter(|d| d.as_secs() >= 1)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "--submission-retention `{}` is not a duration of at least 1s; write e.g. 24h",
                    self.submission_retention
                ))
            })
    }

    /// `--transfer-stall-timeout` read as a duration.
    pub fn transfer_stall_timeout(&self) -> Result<std::time::Duration, ConfigError> {
        humantime::parse_duration(self.transfer_stall_timeout.trim()).map_err(|e| {
            ConfigError::Invalid(format!(
                "--transfer-stall-timeout `{}` is not a duration ({e}); write e.g. 30s or 2m",
                self.transfer_stall_timeout
            ))
        })
    }

    /// The manager engine's options, composed from this configuration.
    pub fn manager_options(
        &self,
        node_id: &str,
        endpoint: &str,
    ) -> caroni_manager::engine::Options {
        caroni_manager::engine::Options {
            node_id: node_id.to_string(),
            endpoint: endpoint.to_string(),
            lease: std::time::Duration::from_secs(self.lease_seconds),
            request_ttl: std::time::Duration::from_secs(self.request_ttl_seconds),
            max_open_requests: self.max_open_requests,
            offer_window: std::time::Duration::from_millis(self.offer_window_ms),
            use_agents: allowlist(&self.use_agents),
            answer_timeout: parse_duration(&self.answer_timeout).unwrap_or_default(),
            unplaceable_timeout: parse_duration(&self.unplaceable_timeout).unwrap_or_default(),
        }
    }

    /// The agent engine's options, composed from this configuration.
    pub fn agent_options(&self, node_id: &str) -> caroni_agent::engine::Options {
        caroni_agent::engine::Options {
            node_id: node_id.to_string(),
            slots: self.slots,
            serve_managers: allowlist(&self.serve_managers),
            cwl_tools: self.cwl_tools.trim().parse().unwrap_or_default(),
            resources: self.resources().unwrap_or_default(),
            labels: self.labels().unwrap_or_default(),
            fair_half_life_ms: parse_duration(&self.fair_share_half_life)
                .map_or(caroni_agent::engine::DEFAULT_HALF_LIFE_MS, |d| {
                    d.as_millis() as u64
                }),
            manager_weights: self.manager_weights().unwrap_or_default(),
            dispute_limit: self.dispute_limit,
        }
    }

    /// `--manager-weight` as a map.
    pub fn manager_weights(&self) -> Result<std::collections::HashMap<String, f64>, ConfigError> {
        self.manager_weights
            .iter()
            .filter(|w| !w.trim().is_empty())
            .map(|w| {
                let bad = || {
                    ConfigError::Invalid(format!(
                        "--manager-weight `{w}` is not NODE_ID=WEIGHT with a weight above 0 (example: 12D3KooW…=2)"
                    ))
                };
                let (node, weight) = w.trim().split_once('=').ok_or_else(bad)?;
                let weight: f64 = weight.trim().parse().map_err(|_| bad())?;
                if !weight.is_finite() || weight <= 0.0 || node.trim().is_empty() {
                    return Err(bad());
                }
                Ok((node.trim().to_string(), weight))
            })
            .collect()
    }

    /// What this agent offers: `--cpus`, `--memory`, `--gpus`, `--disk`,
    /// with the host's figures where they are not given.
    pub fn resources(&self) -> Result<caroni_types::market::Resources, ConfigError> {
        let cpus = match self.cpus {
            Some(c) if c.is_finite() && c > 0.0 && c <= 65_536.0 => (c * 1000.0).round() as u64,
            Some(c) => {
                return Err(ConfigError::Invalid(format!(
                    "--cpus {c} is not a number of CPUs above 0"
                )))
            }
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000,
        };
        let size = |flag: &str, v: &Option<String>, host: fn(&std::path::Path) -> u64| match v {
            Some(s) => caroni_types::parse_memory(s)
                .map(|b| b >> 20)
                .map_err(|e| ConfigError::Invalid(format!("{flag}: {e}"))),
            None => Ok(host(&self.data_dir)),
        };
        Ok(caroni_types::market::Resources {
            cpu_milli: cpus,
            memory_mib: size("--memory", &self.memory, |_| host_memory_mib())?,
            gpus: self.gpus,
            disk_mib: size("--disk", &self.disk, free_disk_mib)?,
        })
    }

    /// `--label` as a map.
    pub fn labels(&self) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
        self.labels
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                caroni_types::market::parse_label(l.trim())
                    .map_err(|e| ConfigError::Invalid(format!("--label: {e}")))
            })
            .collect()
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !self.api_listen.ip().is_loopback() && self.api_token.is_none() {
            return Err(ConfigError::Invalid(format!(
                "--api-listen {} is not a loopback address; exposing the client API needs a token: set --api-token or CARONI_API_TOKEN",
                self.api_listen
            )));
        }
        if self.slots == 0 {
            return Err(ConfigError::Invalid("--slots must be at least 1".into()));
        }
        self.resources()?;
        self.labels()?;
        self.manager_weights()?;
        if parse_duration(&self.fair_share_half_life).is_none() {
            return Err(ConfigError::Invalid(format!(
                "--fair-share-half-life `{}` is not a duration; write e.g. 10m or 1h",
                self.fair_share_half_life
            )));
        }
        self.blob_retention()?;
        self.retention()?;
        self.submission_retention()?;
        self.transfer_stall_timeout()?;
        for (flag, v) in [
            ("--answer-timeout", &self.answer_timeout),
            ("--unplaceable-timeout", &self.unplaceable_timeout),
        ] {
            match parse_duration(v) {
                Some(d) if d.as_millis() >= 1 => {}
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{flag} `{v}` is not a duration of at least 1ms; write e.g. 10s or 5m"
                    )))
                }
            }
        }
        self.cwl_expression_timeout()?;
        if self.cwl_expression_memory_bytes < 1 << 20 {
            return Err(ConfigError::Invalid(
                "--cwl-expression-memory-bytes must be at least 1048576 (1 MiB)".into(),
            ));
        }
        self.cwl_tools
            .trim()
            .parse::<caroni_agent::cwl::CwlTools>()
            .map_err(ConfigError::Invalid)?;
        if self.request_ttl_seconds == 0 {
            return Err(ConfigError::Invalid(
                "--request-ttl-seconds must be at least 1".into(),
            ));
        }
        if self.max_open_requests == 0 {
            return Err(ConfigError::Invalid(
                "--max-open-requests must be at least 1".into(),
            ));
        }
        if self.offer_window_ms > 10_000 {
            return Err(ConfigError::Invalid(format!(
                "--offer-window-ms {} is more than 10000; the window delays every request, keep it to a few milliseconds",
                self.offer_window_ms
            )));
        }
        if self.lease_seconds == 0 {
            return Err(ConfigError::Invalid(
                "--lease-seconds must be at least 1".into(),
            ));
        }
        if !(self.peer_advertise.starts_with("http://")
            || self.peer_advertise.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "--peer-advertise `{}` must be a URL such as http://10.0.0.5:7071",
                self.peer_advertise
            )));
        }
        if let Some(c) = self.console_listen.0 {
            if !c.ip().is_loopback() && self.api_token.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "--console-listen {c} is not a loopback address; exposing the console needs a token (its login page asks for it): set --api-token or CARONI_API_TOKEN, or --console-listen off"
                )));
            }
        }
        if self.api_tls_cert.is_some() != self.api_tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "TLS on the client API needs both --api-tls-cert and --api-tls-key".into(),
            ));
        }
        for (flag, ids, role_ok, role) in [
            (
                "--serve-managers",
                &self.serve_managers,
                self.role.is_agent(),
                "an agent",
            ),
            (
                "--use-agents",
                &self.use_agents,
                self.role.is_manager(),
                "a manager",
            ),
        ] {
            if !ids.is_empty() && !role_ok {
                return Err(ConfigError::Invalid(format!(
                    "{flag} applies to {role}; this node's role is {:?}",
                    self.role
                )));
            }
            for id in ids {
                if id.parse::<libp2p::PeerId>().is_err() {
                    return Err(ConfigError::Invalid(format!(
                        "{flag}: `{id}` is not a node id (a base58 PeerId such as `caroni node info` shows)"
                    )));
                }
            }
        }
        if advertise_is_wildcard(&self.peer_advertise) {
            return Err(ConfigError::Invalid(format!(
                "--peer-advertise `{}` is a wildcard address other nodes cannot dial; give this node's reachable address",
                self.peer_advertise
            )));
        }
        Ok(())
    }

    /// The configuration as one line of JSON, without secrets.
    pub fn summary(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The file's settings, and the line each key is set on.
fn read_file(
    path: &Path,
) -> Result<(toml::Table, std::collections::BTreeMap<String, usize>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))?;
    let mut lines = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim().trim_matches('"');
            if table.contains_key(key) {
                lines.entry(key.to_string()).or_insert(n + 1);
            }
        }
    }
    Ok((table, lines))
}

/// A setting the file gave: its flag, its key and its line.
type FileFlag = (String, String, usize);

/// A configuration error that names a flag set by the file says where in
/// the file.
fn locate(e: ConfigError, path: &Path, file_flags: &[FileFlag]) -> ConfigError {
    let text = e.to_string();
    match file_flags
        .iter()
        .find(|(flag, _, _)| text.contains(&format!("--{flag}")))
    {
        Some((_, key, line)) => {
            ConfigError::Parse(path.into(), format!("line {line} (`{key}`): {text}"))
        }
        None => e,
    }
}

/// A TOML value as the flag's text: scalars as they are, arrays joined by
/// commas (the lists' delimiter).
fn file_value(key: &str, v: &toml::Value) -> Result<String, String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "`{key}` must be a list of strings, not one holding {other}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        other => return Err(format!("`{key}` cannot be a {}", other.type_str())),
    })
}

/// A list of node ids as an allowlist; empty: everyone.
fn allowlist(ids: &[String]) -> Option<std::collections::HashSet<String>> {
    (!ids.is_empty()).then(|| ids.iter().cloned().collect())
}

fn advertise_is_wildcard(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or("");
    matches!(host, "0.0.0.0" | "[::]" | "::")
}

/// The endpoint to advertise for a listen address: the address itself when
/// it is specific, else this host's name resolved to an address (the
/// container's address in Docker), else loopback.
fn default_advertise(listen: SocketAddr, tls: bool) -> String {
    let port = listen.port();
    let scheme = if tls { "https" } else { "http" };
    if !listen.ip().is_unspecified() {
        return format!("{scheme}://{listen}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let resolved: Option<IpAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.find(|a| a.is_ipv4() && !a.ip().is_loopback()))
        .map(|a| a.ip());
    match resolved {
        Some(ip) => format!("{scheme}://{ip}:{port}"),
        None => format!("{scheme}://127.0.0.1:{port}"),
    }
}

#[cfg(test)]
mod tests;

/// The host's physical memory in MiB (Linux: `MemTotal` of
/// /proc/meminfo); 0 when it cannot be read.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Free space of the file system holding `dir` (or its nearest existing
/// parent), in MiB; 0 when it cannot be read.
fn free_disk_mib(dir: &std::path::Path) -> u64 {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    nix::sys::statvfs::statvfs(existing).map_or(0, |s| {
        s.blocks_available().saturating_mul(s.fragment_size()) >> 20
    })
}
