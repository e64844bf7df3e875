//! `caroni-node`: one process that is a manager, an agent or both.
//!
//! [`Node::start`] opens the data directory (node key + RocksDB), binds the
//! client API and serves it until [`NodeHandle::shutdown`]. The binary in
//! `main.rs` is a thin wrapper that adds configuration, logging and signals;
//! tests start nodes through the same function or as real processes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use caroni_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod api;
pub mod attempts;
pub mod config;
pub mod console;
pub mod identity;
pub mod logs;
mod start;
mod supervise;
pub mod wire;

pub use config::{Config, Listen, LogFormat};

/// A running node.
pub struct NodeHandle {
    /// Node id (libp2p PeerId, base58).
    pub node_id: String,
    /// Bound client API address.
    pub api_addr: SocketAddr,
    /// Bound console address, when the console is on.
    pub console_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: supervise::Tasks,
    health: Health,
}

/// The node's health as `grpc.health.v1` reports it.
#[derive(Clone)]
struct Health {
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    async fn set(&self, status: tonic_health::ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for name in &self.services {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Reports NOT_SERVING while storage fails and SERVING once it works
/// again, probing it every second meanwhile (a probe also reopens a
/// database that a failed write left unusable).
async fn storage_health(
    store: caroni_store::Store,
    health: Health,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    use tonic_health::ServingStatus;
    let mut changes = store.health();
    loop {
        let failing = changes.borrow_and_update().clone();
        match &failing {
            Some(e) => {
                tracing::warn!(error = %e, "storage fails; reporting NOT_SERVING");
                health.set(ServingStatus::NotServing).await;
            }
            None => health.set(ServingStatus::Serving).await,
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = changes.changed() => {
                    r.context("the store is gone")?;
                    break;
                }
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)), if failing.is_some() => {
                    let s = store.clone();
                    if let Ok(Ok(())) = tokio::task::spawn_blocking(move || s.probe()).await {
                        tracing::info!("storage works again; reporting SERVING");
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("node_id", &self.node_id)
            .field("api_addr", &self.api_addr)
            .finish()
    }
}

impl NodeHandle {
    /// Asks every task to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Runs `task` under the node's supervision, like its own tasks: if it
    /// fails, panics or returns before the node is shut down, the node
    /// reports NOT_SERVING and [`NodeHandle::stopped`] returns the error.
    pub fn supervise(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.tasks.spawn(name, task);
    }

    /// Returns when a task of the node stops on its own (an error, a panic,
    /// or an early return): health turns NOT_SERVING and the error says
    /// which task and why; the caller then shuts the node down (as
    /// `caroni-node` does, exiting with the error). Returns `Ok` once every
    /// task has ended after a shutdown. Cancel-safe.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        while let Some(res) = self.tasks.next().await {
            if let Err(e) = res {
                tracing::error!(
                    error = format!("{e:#}"),
                    "a task of the node stopped; the node stops"
                );
                self.not_serving().await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn not_serving(&self) {
        self.health
            .set(tonic_health::ServingStatus::NotServing)
            .await;
    }

    /// Waits until every task has stopped; the first error wins.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first = Ok(());
        while let Some(res) = self.tasks.next().await {
            if let Err(e) = res {
                self.cancel.cancel();
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// How long applied-message ids are remembered.
const APPLIED_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most concurrent streams on one peer connection.
const PEER_STREAMS_PER_CONNECTION: u32 = 16;

/// Namespace for starting nodes.
#[derive(Debug)]
pub struct Node;

use start::{
    open_storage, serve_peers, start_api, start_engines, start_transport, NetParts, PeerParts,
};

impl Node {
    /// Opens storage, binds every listener and starts every task.
    pub async fn start(config: Config) -> anyhow::Result<NodeHandle> {
        let cancel = CancellationToken::new();
        let mut tasks = supervise::Tasks::new(cancel.clone());
        let storage = open_storage(&config)?;
        let mut net = start_transport(&config, &storage, &mut tasks, &cancel)?;
        let gossip = net.mesh_events.take();
        let engines = start_engines(&config, &storage, &net, gossip, &mut tasks, &cancel).await?;
        serve_peers(
            PeerParts {
                listener: net.peer_listener,
                node_id: &storage.node_id,
                links: &net.links,
                liveness: &net.liveness,
                refusals: &net.refusals,
                outbox: &net.outbox,
                blobs: &storage.blobs,
                logs: engines.logs.clone(),
            },
            wire::PeerInbox {
                manager: engines.manager.clone(),
                agent: engines.agent.clone(),
                outbox: net.outbox.clone(),
                fetcher: net.fetcher.clone(),
            },
            &mut tasks,
            &cancel,
        );
        let node_id = storage.node_id.clone();
        let (api_addr, console_addr, health) = start_api(
            &config,
            storage,
            NetParts {
                api_listener: net.api_listener,
                advertise: net.advertise.clone(),
                mesh: net.mesh,
                outbox: net.outbox,
                wire: net.wire,
                fetcher: net.fetcher,
            },
            engines,
            &mut tasks,
            &cancel,
        )
        .await?;
        tracing::info!(node_id = %node_id, api = %api_addr, peer = %net.advertise, console = ?console_addr, role = ?config.role, "node started");
        Ok(NodeHandle {
            node_id,
            api_addr,
            console_addr,
            cancel,
            tasks,
            health,
        })
    }
}

async fn serve_api(
    listener: TcpListener,
    config: &Config,
    apis: api::Apis,
    cancel: CancellationToken,
) -> anyhow::Result<(
    impl std::future::Future<Output = anyhow::Result<()>>,
    Health,
)> {
    use pb::{
        agent_service_server::AgentServiceServer, file_service_server::FileServiceServer,
        manager_service_server::ManagerServiceServer, node_service_server::NodeServiceServer,
    };
    let token = api::TokenCheck::new(config.api_token.as_deref());
    use tonic::server::NamedService;
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut services = vec![
        <NodeServiceServer<api::NodeApi> as NamedService>::NAME,
        <FileServiceServer<api::FileApi> as NamedService>::NAME,
    ];
    health
        .set_serving::<NodeServiceServer<api::NodeApi>>()
        .await;
    health
        .set_serving::<FileServiceServer<api::FileApi>>()
        .await;
    if config.role.is_manager() {
        health
            .set_serving::<ManagerServiceServer<api::ManagerApi>>()
            .await;
        services.push(<ManagerServiceServer<api::ManagerApi> as NamedService>::NAME);
    }
    if config.role.is_agent() {
        health
            .set_serving::<AgentServiceServer<api::AgentApi>>()
            .await;
        services.push(<AgentServiceServer<api::AgentApi> as NamedService>::NAME);
    }
    let reporter = health.clone();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caroni_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caroni_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Pings keep live streams (watches) from counting as idle at the gate.
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(API_KEEPALIVE))
        .http2_keepalive_timeout(Some(API_KEEPALIVE))
        .layer(tower::util::MapResponseLayer::new(
            undecodable_is_invalid_argument::<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(NodeServiceServer::with_interceptor(
            apis.node,
            token.clone(),
        ))
        .add_service(ManagerServiceServer::with_interceptor(
            apis.manager,
            token.clone(),
        ))
        .add_service(AgentServiceServer::with_interceptor(
            apis.agent,
            token.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            FileServiceServer::new(apis.files)
                .max_decoding_message_size(caroni_blob::CHUNK + 64 * 1024),
            token,
        ));
    let tls = match (&config.api_tls_cert, &config.api_tls_key) {
        (Some(cert), Some(key)) => Some(api_tls(cert, key)?),
        _ => None,
    };
    let listener =
        caroni_peer::GatedListener::new(listener, "client API", caroni_peer::GateLimits::default());
    let serve: futures::future::BoxFuture<'static, anyhow::Result<()>> = match tls {
        Some(tls) => {
            let incoming = caroni_peer::tls::accept(listener, tls, "client API");
            Box::pin(async move {
                router
                    .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                    .await
                    .context("client API server failed")
            })
        }
        None => {
            let incoming = listener.incoming();
            Box::pin(async move {
                router
                    .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                    .await
                    .context("client API server failed")
            })
        }
    };
    Ok((serve, Health { reporter, services }))
}

/// Creates the data directory readable by its owner only (0700), or warns
/// when an existing one is open to other users: it holds the node key,
/// every workflow's values and the jobs' inputs.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read the data directory {}", dir.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            data_dir = %dir.display(),
            mode = format!("{mode:o}"),
            "the data directory is open to other users; it holds the node key and every value: run `chmod 700 {}`",
            dir.display()
        );
    }
    Ok(())
}

/// Connections the kernel queues for a listener before it accepts them:
/// a burst of connects (a flood, a load test) waits there instead of
/// having its SYNs dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`LISTEN_BACKLOG`].
pub(crate) fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Interval of HTTP/2 pings on client API connections, well inside the
/// gate's idle timeout.
const API_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Raises the soft limit of open files to the hard limit, so that the
/// connection bounds of the listeners, not the default 1024, decide.
pub fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            } else {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// The client API's TLS configuration from PEM files.
fn api_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "--api-tls-cert {}: cannot read a PEM certificate from it",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("--api-tls-cert {} holds no PEM certificate", cert.display());
    }
    let private = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "--api-tls-key {}: cannot read a PEM private key from it",
            key.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup")?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .with_context(|| {
        format!(
            "--api-tls-cert {} and --api-tls-key {} do not make a usable pair",
            cert.display(),
            key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The node's link security from its configuration: TLS credentials
/// derived from the node key, and the private mesh's key if any.
fn links(config: &Config, key: &libp2p::identity::Keypair) -> anyhow::Result<caroni_peer::Links> {
    let tls = if config.peer_tls {
        Some(Arc::new(caroni_peer::PeerTls::new(key)?))
    } else {
        None
    };
    let mesh_key = match &config.mesh_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --mesh-key {}", path.display()))?;
            let k = caroni_peer::MeshKey::parse(&text)
                .with_context(|| format!("--mesh-key {}", path.display()))?;
            tracing::info!(fingerprint = %k.fingerprint(), "this mesh is private");
            Some(k)
        }
        None => None,
    };
    Ok(caroni_peer::Links { tls, mesh_key })
}

/// A request that does not decode (a `string` field that is not UTF-8, a
/// malformed message) is the caller's fault: tonic answers it INTERNAL;
/// this says INVALID_ARGUMENT, keeping tonic's message.
fn undecodable_is_invalid_argument<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers_mut();
    let decode_error = h.get("grpc-status").is_some_and(|v| v == "13")
        && h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("decode"));
    if decode_error {
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    resp
}

/// Accepted connections with Nagle's algorithm off: tonic sets TCP_NODELAY
/// only on connections it accepts itself, and small protocol messages must
/// not wait for delayed ACKs (about 40 ms a hop).
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
