//! Connection to a node's client API, with the token attached to every call.

use anyhow::Context as _;
use caroni_proto::v1::{
    agent_service_client::AgentServiceClient, manager_service_client::ManagerServiceClient,
    node_service_client::NodeServiceClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::output::Format;

/// Largest response the CLI reads: a workflow shown whole carries every
/// value of its steps (each output up to 4 MiB).
const MAX_RESPONSE: usize = 64 << 20;

/// What every command needs.
#[derive(Clone)]
pub struct Context {
    pub node: String,
    token: Option<String>,
    pub format: Format,
    /// CA certificate (PEM) that signed the node's API certificate.
    tls_ca: Option<std::path::PathBuf>,
}

impl Context {
    pub fn new(node: String, token: Option<String>, format: Format) -> Self {
        Self {
            node,
            token,
            format,
            tls_ca: None,
        }
    }

    /// Trusts the CA in the PEM file `ca` for `https://` node URLs.
    pub fn with_tls_ca(mut self, ca: Option<std::path::PathBuf>) -> Self {
        self.tls_ca = ca;
        self
    }

    /// A TLS client configuration trusting the CA file.
    fn tls_config(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let Some(ca) = &self.tls_ca else {
            anyhow::bail!(
                "{} is an https:// URL: give the CA that signed the node's certificate with --tls-ca FILE (or CARONI_TLS_CA)",
                self.node
            );
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .with_context(|| {
                format!(
                    "--tls-ca {}: cannot read a PEM certificate from it",
                    ca.display()
                )
            })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            anyhow::bail!("--tls-ca {} holds no usable CA certificate", ca.display());
        }
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let tls = self.node.starts_with("https://");
        let uri = caroni_peer::tls::plain_uri(&self.node);
        let endpoint = Endpoint::from_shared(uri)
            .with_context(|| {
                format!(
                    "`{}` is not a valid node URL; use e.g. http://127.0.0.1:7070",
                    self.node
                )
            })?
            .connect_timeout(std::time::Duration::from_secs(5));
        let connected = if tls {
            let config = self.tls_config()?;
            endpoint
                .connect_with_connector(caroni_peer::tls::connector(config, None))
                .await
        } else {
            endpoint.connect().await
        };
        connected.map_err(|e| anyhow::anyhow!(caroni_peer::error_chain(&e))).with_context(|| {
            format!("cannot reach the node at {}; is caroni-node running there? (set --node or CARONI_NODE)", self.node)
        })
    }

    /// Wraps a message into a request carrying the token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        with_token(msg, self.token.as_deref())
    }

    /// The API token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub async fn manager(&self) -> anyhow::Result<ManagerServiceClient<Channel>> {
        Ok(
            ManagerServiceClient::new(self.channel().await?)
                .max_decoding_message_size(MAX_RESPONSE),
        )
    }

    pub async fn agent(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(self.channel().await?).max_decoding_message_size(MAX_RESPONSE))
    }

    /// True when `grpc.health.v1.Health/Check` says SERVING.
    pub async fn serving(&self) -> anyhow::Result<bool> {
        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let resp = HealthClient::new(self.channel().await?)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok(resp.status == ServingStatus::Serving as i32)
    }

    /// The node URL this context talks to.
    pub fn url(&self) -> &str {
        &self.node
    }

    /// Asks `grpc.health.v1.Health/Check` for the whole server.
    pub async fn health(&self) -> anyhow::Result<std::process::ExitCode> {
        let serving = self.serving().await?;
        println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
        // The file store against its budget (on stderr: stdout stays the
        // one word scripts read): a node past it refuses transfers.
        if let Ok(stats) = NodeServiceClient::new(self.channel().await?)
            .get_stats(self.request(caroni_proto::v1::GetStatsRequest {}))
            .await
        {
            let s = stats.into_inner();
            let used = caroni_types::file::human_bytes(s.blob_bytes);
            match s.blob_budget_bytes {
                0 => eprintln!("files: {used} (no --blob-disk-bytes budget)"),
                b => {
                    let pct = s.blob_bytes as f64 * 100.0 / b as f64;
                    eprintln!(
                        "files: {used} of {} ({pct:.0} % of --blob-disk-bytes){}",
                        caroni_types::file::human_bytes(b),
                        if pct >= 90.0 {
                            "; transfers and uploads that do not fit are refused"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Ok(if serving {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        })
    }

    pub async fn node_api(&self) -> anyhow::Result<NodeServiceClient<Channel>> {
        Ok(NodeServiceClient::new(self.channel().await?))
    }
}

/// A request carrying `token` as its bearer credential.
pub fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

/// Turns a gRPC error into the server's message for the user.
pub fn status(e: tonic::Status) -> anyhow::Error {
    let code = match e.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "not possible here",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "node unavailable",
        _ => "error",
    };
    anyhow::anyhow!("{code}: {}", e.message())
}
