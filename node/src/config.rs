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

/// The effective configuration of a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// Directory holding the node key and the RocksDB database.
    pub data_dir: PathBuf,
    /// manager, agent or both.
    pub role: Role,
    /// Client API address (gRPC). Loopback by default.
    pub api_listen: SocketAddr,
    /// Bearer token required on the client API; needed when it is not on loopback.
    #[serde(skip_serializing)]
    pub api_token: Option<String>,
    /// Node-to-node gRPC address.
    pub peer_listen: SocketAddr,
    /// Endpoint other nodes are told to dial (`http://host:port`); derived
    /// from `peer_listen` when it is not a wildcard, else from the host name.
    pub peer_advertise: String,
    /// libp2p listen multiaddr.
    pub p2p_listen: String,
    /// libp2p multiaddrs of peers to dial at start (repeatable).
    pub bootstrap: Vec<String>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Concurrent jobs an agent runs.
    pub slots: usize,
    /// Seconds a manager waits for news of a live job before it counts the
    /// job as lost.
    pub lease_seconds: u64,
    /// Seconds a job request stays open without an offer before it counts as
    /// a failed attempt and is replaced.
    pub request_ttl_seconds: u64,
    /// Job requests a manager keeps out at once; further workflows wait,
    /// in order, in `created` (admission control).
    pub max_open_requests: usize,
    /// Milliseconds a manager gathers offers for a request before it takes
    /// the least busy agent (0: the first offer). It decides at once when
    /// every agent it knows has answered.
    pub offer_window_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Start with this key even though the data directory holds the state
    /// of another node id (a lost or replaced `node.key`).
    pub new_identity: bool,
    /// TLS on node links, with certificates derived from node keys.
    pub peer_tls: bool,
    /// The private mesh's pre-shared key file (swarm.key format).
    pub mesh_key: Option<PathBuf>,
    /// An agent serves only these managers (node ids); empty: every one.
    pub serve_managers: Vec<String>,
    /// A manager takes offers only from these agents; empty: every one.
    pub use_agents: Vec<String>,
    /// PEM certificate chain of the client API (TLS when set).
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of the client API's certificate.
    pub api_tls_key: Option<PathBuf>,
    /// The web console's address; `None` (`off`) disables it.
    pub console_listen: Option<SocketAddr>,
    /// Host names the console answers to besides IP addresses and
    /// `localhost` (requests naming any other host are refused: DNS
    /// rebinding).
    pub console_hosts: Vec<String>,
}

/// Defaults of the tuning settings, shared with embedded nodes.
pub const DEFAULT_MAX_OPEN_REQUESTS: usize = 512;
/// See [`Config::offer_window_ms`].
pub const DEFAULT_OFFER_WINDOW_MS: u64 = 20;

/// Command-line flags of `caroni-node`; each also reads `CARONI_<NAME>`.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "caroni-node",
    version,
    about = "Caroni node: a manager, an agent or both, in one daemon",
    after_help = "Example:\n  caroni-node --data-dir /var/lib/caroni --role both \\\n    --peer-listen 0.0.0.0:7071 --peer-advertise http://10.0.0.5:7071 \\\n    --bootstrap /ip4/10.0.0.6/tcp/7072\n\nPrecedence: defaults < --config FILE (TOML, same keys with underscores) < CARONI_* environment < flags."
)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, env = "CARONI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./caroni-data].
    #[arg(long, env = "CARONI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Role: manager, agent or both [default: both].
    #[arg(long, env = "CARONI_ROLE")]
    pub role: Option<Role>,
    /// Client API address [default: 127.0.0.1:7070].
    #[arg(long, env = "CARONI_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Token clients must present (required when --api-listen is not loopback).
    #[arg(long, env = "CARONI_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Node-to-node gRPC address [default: 0.0.0.0:7071].
    #[arg(long, env = "CARONI_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Endpoint other nodes dial to reach this one, e.g. http://10.0.0.5:7071.
    #[arg(long, env = "CARONI_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// libp2p listen multiaddr [default: /ip4/0.0.0.0/tcp/7072].
    #[arg(long, env = "CARONI_P2P_LISTEN")]
    pub p2p_listen: Option<String>,
    /// libp2p multiaddr of a peer to dial at start; repeat for several
    /// (environment: comma-separated).
    #[arg(long, env = "CARONI_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Turn mDNS discovery on or off [default: true].
    #[arg(long, env = "CARONI_MDNS")]
    pub mdns: Option<bool>,
    /// Concurrent jobs on an agent [default: 2].
    #[arg(long, env = "CARONI_SLOTS")]
    pub slots: Option<usize>,
    /// Lease on live jobs, in seconds [default: 30].
    #[arg(long, env = "CARONI_LEASE_SECONDS")]
    pub lease_seconds: Option<u64>,
    /// Lifetime of an unanswered job request, in seconds [default: 600].
    #[arg(long, env = "CARONI_REQUEST_TTL_SECONDS")]
    pub request_ttl_seconds: Option<u64>,
    /// Job requests a manager keeps out at once; more workflows wait in
    /// `created` [default: 512].
    #[arg(long, env = "CARONI_MAX_OPEN_REQUESTS")]
    pub max_open_requests: Option<usize>,
    /// Milliseconds to gather offers before taking the least busy agent;
    /// 0 takes the first offer [default: 20].
    #[arg(long, env = "CARONI_OFFER_WINDOW_MS")]
    pub offer_window_ms: Option<u64>,
    /// Log format [default: text]. Filter with RUST_LOG.
    #[arg(long, env = "CARONI_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Start although the data directory holds the state of another node
    /// id (its `node.key` was lost or replaced). Peers know the old id:
    /// jobs and workflows they hold for it are not this node's.
    #[arg(long)]
    pub new_identity: bool,
    /// TLS on node links: each node's certificate is derived from its node
    /// key and checked against the node id it claims [default: true]. Every
    /// node of a mesh must have the same setting.
    #[arg(long, env = "CARONI_PEER_TLS")]
    pub peer_tls: Option<bool>,
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
    /// Web console address, or `off` [default: 127.0.0.1:7073]. Off
    /// loopback it needs --api-token, which its login page asks for.
    #[arg(long, env = "CARONI_CONSOLE_LISTEN")]
    pub console_listen: Option<String>,
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

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    role: Option<Role>,
    api_listen: Option<SocketAddr>,
    api_token: Option<String>,
    peer_listen: Option<SocketAddr>,
    peer_advertise: Option<String>,
    p2p_listen: Option<String>,
    bootstrap: Option<Vec<String>>,
    mdns: Option<bool>,
    slots: Option<usize>,
    lease_seconds: Option<u64>,
    request_ttl_seconds: Option<u64>,
    max_open_requests: Option<usize>,
    offer_window_ms: Option<u64>,
    log_format: Option<LogFormat>,
    peer_tls: Option<bool>,
    mesh_key: Option<PathBuf>,
    serve_managers: Option<Vec<String>>,
    use_agents: Option<Vec<String>>,
    api_tls_cert: Option<PathBuf>,
    api_tls_key: Option<PathBuf>,
    console_listen: Option<String>,
    console_hosts: Option<Vec<String>>,
}

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
    /// loopback port, no mDNS, default tuning: what an embedded node
    /// (`caroni demo`, `caroni bench --in-process`, tests) starts from.
    pub fn embedded(data_dir: PathBuf) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            data_dir,
            role: Role::Both,
            api_listen: loopback,
            api_token: None,
            peer_listen: loopback,
            peer_advertise: "http://127.0.0.1:0".into(),
            p2p_listen: "/ip4/127.0.0.1/tcp/0".into(),
            bootstrap: Vec::new(),
            mdns: false,
            slots: 2,
            lease_seconds: 30,
            request_ttl_seconds: 600,
            max_open_requests: DEFAULT_MAX_OPEN_REQUESTS,
            offer_window_ms: DEFAULT_OFFER_WINDOW_MS,
            log_format: LogFormat::Text,
            new_identity: false,
            peer_tls: true,
            mesh_key: None,
            serve_managers: Vec::new(),
            use_agents: Vec::new(),
            api_tls_cert: None,
            api_tls_key: None,
            console_listen: None,
            console_hosts: Vec::new(),
        }
    }

    /// Merges flags (with their environment variables) over the TOML file
    /// over the defaults, and checks the result.
    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let peer_listen = flags
            .peer_listen
            .or(file.peer_listen)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 7071)));
        let peer_tls = flags.peer_tls.or(file.peer_tls).unwrap_or(true);
        let ids = |flag: Vec<String>, file: Option<Vec<String>>| -> Vec<String> {
            if flag.is_empty() {
                file.unwrap_or_default()
            } else {
                flag
            }
            .into_iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect()
        };
        let config = Config {
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("caroni-data")),
            role: flags.role.or(file.role).unwrap_or_default(),
            api_listen: flags
                .api_listen
                .or(file.api_listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7070))),
            api_token: flags.api_token.or(file.api_token).filter(|t| !t.is_empty()),
            peer_advertise: match flags.peer_advertise.or(file.peer_advertise) {
                Some(a) => a,
                None => default_advertise(peer_listen, peer_tls),
            },
            peer_listen,
            p2p_listen: flags
                .p2p_listen
                .or(file.p2p_listen)
                .unwrap_or_else(|| "/ip4/0.0.0.0/tcp/7072".into()),
            bootstrap: if flags.bootstrap.is_empty() {
                file.bootstrap.unwrap_or_default()
            } else {
                flags.bootstrap
            }
            .into_iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
            mdns: flags.mdns.or(file.mdns).unwrap_or(true),
            slots: flags.slots.or(file.slots).unwrap_or(2),
            lease_seconds: flags.lease_seconds.or(file.lease_seconds).unwrap_or(30),
            request_ttl_seconds: flags
                .request_ttl_seconds
                .or(file.request_ttl_seconds)
                .unwrap_or(600),
            max_open_requests: flags
                .max_open_requests
                .or(file.max_open_requests)
                .unwrap_or(DEFAULT_MAX_OPEN_REQUESTS),
            offer_window_ms: flags
                .offer_window_ms
                .or(file.offer_window_ms)
                .unwrap_or(DEFAULT_OFFER_WINDOW_MS),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            new_identity: flags.new_identity,
            peer_tls,
            mesh_key: flags.mesh_key.or(file.mesh_key),
            serve_managers: ids(flags.serve_managers, file.serve_managers),
            use_agents: ids(flags.use_agents, file.use_agents),
            api_tls_cert: flags.api_tls_cert.or(file.api_tls_cert),
            api_tls_key: flags.api_tls_key.or(file.api_tls_key),
            console_listen: match flags
                .console_listen
                .or(file.console_listen)
                .as_deref()
                .map(str::trim)
            {
                None | Some("") => Some(SocketAddr::from(([127, 0, 0, 1], 7073))),
                Some("off") => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "--console-listen `{a}` is not an address such as 127.0.0.1:7073, nor `off`"
                    ))
                })?),
            },
            console_hosts: if flags.console_hosts.is_empty() {
                file.console_hosts.unwrap_or_default()
            } else {
                flags.console_hosts
            },
        };
        config.check()?;
        Ok(config)
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
        if let Some(c) = self.console_listen {
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

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e.to_string()))
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
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "role = \"agent\"\nslots = 7\napi_listen = \"127.0.0.1:9000\"\n",
        )
        .expect("write");
        let flags = Flags::parse_from([
            "caroni-node",
            "--config",
            file.to_str().expect("utf8"),
            "--slots",
            "3",
        ]);
        let c = Config::load(flags).expect("valid");
        assert_eq!(c.role, Role::Agent); // from the file
        assert_eq!(c.slots, 3); // flag beats file
        assert_eq!(c.api_listen.port(), 9000); // file beats default
        assert_eq!(c.lease_seconds, 30); // default
    }

    #[test]
    fn exposed_api_without_token_is_refused() {
        let flags = Flags::parse_from(["caroni-node", "--api-listen", "0.0.0.0:7070"]);
        let e = Config::load(flags).expect_err("needs token");
        assert!(e.to_string().contains("needs a token"), "{e}");
        let flags = Flags::parse_from(["caroni-node", "--peer-advertise", "http://0.0.0.0:7071"]);
        assert!(Config::load(flags)
            .expect_err("wildcard")
            .to_string()
            .contains("wildcard"));
    }

    #[test]
    fn the_console_is_on_loopback_by_default_and_needs_a_token_elsewhere() {
        let c = Config::load(Flags::parse_from(["caroni-node"])).expect("defaults");
        assert_eq!(
            c.console_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7073)))
        );
        let c = Config::load(Flags::parse_from([
            "caroni-node",
            "--console-listen",
            "off",
        ]))
        .expect("off");
        assert_eq!(c.console_listen, None);
        let e = Config::load(Flags::parse_from([
            "caroni-node",
            "--console-listen",
            "0.0.0.0:7073",
        ]))
        .expect_err("needs a token");
        assert!(e.to_string().contains("needs a token"), "{e}");
        let e = Config::load(Flags::parse_from([
            "caroni-node",
            "--console-listen",
            "nowhere",
        ]))
        .expect_err("bad address");
        assert!(e.to_string().contains("`nowhere`"), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "slot = 3\n").expect("write");
        let flags = Flags::parse_from(["caroni-node", "--config", file.to_str().expect("utf8")]);
        let e = Config::load(flags).expect_err("typo");
        assert!(e.to_string().contains("unknown field `slot`"), "{e}");
    }

    /// Any configuration file text gives a configuration or an error,
    /// never a panic (`make fuzz` runs 100,000 cases).
    #[test]
    fn configuration_files_never_panic() {
        use proptest::prelude::*;
        let cases = std::env::var("CARONI_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("caroni.toml");
        let start = std::time::Instant::now();
        let keys = prop_oneof![
            Just("role"),
            Just("api_listen"),
            Just("peer_listen"),
            Just("peer_advertise"),
            Just("p2p_listen"),
            Just("bootstrap"),
            Just("mdns"),
            Just("slots"),
            Just("lease_seconds"),
            Just("request_ttl_seconds"),
            Just("api_token"),
            Just("max_open_requests"),
            Just("offer_window_ms"),
            Just("log_format"),
            Just("data_dir"),
            Just("peer_tls"),
            Just("mesh_key"),
            Just("serve_managers"),
            Just("use_agents"),
            Just("api_tls_cert"),
            Just("api_tls_key"),
            Just("console_listen"),
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            ".{0,40}".prop_map(|s| format!("{s:?}")),
            Just("[\"a\", 1]".to_string()),
            ".{0,20}",
        ];
        proptest!(
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() },
            |(lines in proptest::collection::vec((keys, value), 0..6), raw in ".{0,200}")| {
                let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                for t in [text, raw] {
                    std::fs::write(&path, t).expect("write");
                    let _ = Config::load(Flags { config: Some(path.clone()), ..Flags::default() });
                }
            }
        );
        println!(
            "configuration files: {cases} cases in {:.1} s, no panic",
            start.elapsed().as_secs_f64()
        );
    }
}
