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
use tracing::Instrument;

pub mod api;
pub mod attempts;
pub mod config;
pub mod console;
pub mod identity;
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
            },
            wire::PeerInbox {
                manager: engines.manager.clone(),
                agent: engines.agent.clone(),
                outbox: net.outbox.clone(),
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

/// The node's identity and its database.
struct Storage {
    key: libp2p::identity::Keypair,
    node_id: String,
    store: caroni_store::Store,
}

/// Opens the private data directory, the node key and the database, and
/// checks that the database is this key's.
fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    private_dir(&config.data_dir)?;
    let key = identity::load_or_create(&config.data_dir)?;
    let node_id = key.public().to_peer_id().to_string();
    let store = caroni_store::Store::open(&config.data_dir.join("db"))?;
    identity::check_owner(&store, &node_id, &config.data_dir, config.new_identity)?;
    Ok(Storage {
        key,
        node_id,
        store,
    })
}

/// The transport: listeners, the outbox, the mesh and the engines' port.
struct Transport {
    api_listener: tokio::net::TcpListener,
    peer_listener: tokio::net::TcpListener,
    advertise: String,
    links: caroni_peer::Links,
    liveness: caroni_peer::Liveness,
    refusals: caroni_peer::PeerRefusals,
    outbox: caroni_peer::Outbox,
    mesh: caroni_mesh::Client,
    mesh_events: Option<tokio::sync::mpsc::Receiver<caroni_mesh::Event>>,
    wire: Arc<wire::NodeWire>,
}

/// Binds the listeners and starts the outbox and the mesh.
fn start_transport(
    config: &Config,
    storage: &Storage,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Transport> {
    let api_listener = listen(config.api_listen).with_context(|| {
        format!(
            "cannot listen on --api-listen {}; is another node using this port?",
            config.api_listen
        )
    })?;
    let peer_listener = listen(config.peer_listen).with_context(|| {
        format!(
            "cannot listen on --peer-listen {}; is another node using this port?",
            config.peer_listen
        )
    })?;
    let peer_addr = peer_listener.local_addr()?;
    let advertise = match config.peer_advertise.strip_suffix(":0") {
        Some(host) => format!("{host}:{}", peer_addr.port()),
        None => config.peer_advertise.clone(),
    };
    let key = storage.key.clone();
    let links = links(config, &key)?;
    let signer = caroni_peer::Signer::new(key.clone(), advertise.clone()).with_links(links.clone());
    let refusals = caroni_peer::PeerRefusals::default();
    let liveness = caroni_peer::Liveness::default();
    let outbox = caroni_peer::Outbox::start(
        storage.store.clone(),
        signer,
        liveness.clone(),
        cancel.clone(),
    )?;
    let (mesh, mesh_events, mut mesh_loop) = caroni_mesh::new(
        key,
        caroni_mesh::Options {
            listen: config.p2p_listen.clone(),
            bootstrap: config.bootstrap.clone(),
            mdns: config.mdns,
            psk: links.mesh_key.as_ref().map(|k| k.psk()),
        },
    )?;
    mesh_loop.listen()?;
    let span = tracing::info_span!("mesh", node = %storage.node_id);
    let c = cancel.clone();
    tasks.spawn("mesh", async move {
        mesh_loop.run(c).instrument(span).await;
        Ok(())
    });
    let wire = Arc::new(wire::NodeWire {
        outbox: outbox.clone(),
        mesh: mesh.clone(),
        local_agent: std::sync::OnceLock::new(),
        liveness: liveness.clone(),
        published: Default::default(),
        refusals: refusals.clone(),
    });
    Ok(Transport {
        api_listener,
        peer_listener,
        advertise,
        links,
        liveness,
        refusals,
        outbox,
        mesh,
        mesh_events: Some(mesh_events),
        wire,
    })
}

/// The engines this node's role runs.
struct Engines {
    manager: Option<caroni_manager::service::Handle>,
    agent: Option<caroni_agent::service::Handle>,
}

/// Starts the engines of the node's role, the applied-id pruning and the
/// gossip listener.
async fn start_engines(
    config: &Config,
    storage: &Storage,
    net: &Transport,
    gossip: Option<tokio::sync::mpsc::Receiver<caroni_mesh::Event>>,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Engines> {
    let (store, node_id) = (&storage.store, storage.node_id.as_str());
    let agent = start_agent(config, node_id, store, &net.wire, tasks, cancel).await?;
    let manager = start_manager(
        config,
        node_id,
        &net.advertise,
        store,
        &net.wire,
        tasks,
        cancel,
    )?;
    spawn_pruning(store, tasks, cancel);
    // The gossip listener runs in the node's task set like every other
    // long-running task: if it dies, the node says so and stops.
    let c = cancel.clone();
    let gossip_agent = agent.clone();
    let gossip_outbox = net.outbox.clone();
    tasks.spawn("gossip listener", async move {
        let Some(events) = gossip else {
            return Ok(());
        };
        tokio::select! {
            _ = wire::gossip_loop(events, gossip_agent, gossip_outbox) => {}
            _ = c.cancelled() => {}
        }
        Ok(())
    });
    Ok(Engines { manager, agent })
}

/// What the client API and the console need of the transport.
struct NetParts {
    api_listener: tokio::net::TcpListener,
    advertise: String,
    mesh: caroni_mesh::Client,
    outbox: caroni_peer::Outbox,
    wire: Arc<wire::NodeWire>,
}

/// The client API, the console and the storage health probe. Returns the
/// API's address, the console's and the node's health.
async fn start_api(
    config: &Config,
    storage: Storage,
    net: NetParts,
    engines: Engines,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, Option<std::net::SocketAddr>, Health)> {
    let Storage { node_id, store, .. } = storage;
    let Engines { manager, agent } = engines;
    let api_addr = net.api_listener.local_addr()?;
    let info = pb::NodeInfo {
        node_id: node_id.clone(),
        roles: config.role.names().into_iter().map(String::from).collect(),
        api_listen: api_addr.to_string(),
        peer_endpoint: net.advertise.clone(),
        p2p_listen: vec![],
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: config.data_dir.display().to_string(),
    };
    let apis = api::Apis {
        node: api::NodeApi::new(
            info,
            net.mesh,
            net.outbox,
            api::node::StatsSource {
                store: store.clone(),
                wire: net.wire.clone(),
                manager: manager.clone(),
                agent: agent.clone(),
            },
        ),
        manager: api::ManagerApi::new(store.clone(), manager.clone()),
        agent: api::AgentApi::new(store.clone(), agent.clone()),
    };
    let console_addr = match config.console_listen.0 {
        Some(addr) => {
            let (bound, serve) = console::serve(
                addr,
                console::Sources {
                    node: apis.node.clone(),
                    manager: apis.manager.clone(),
                    agent: apis.agent.clone(),
                    manager_handle: manager,
                    agent_handle: agent,
                    token: config.api_token.clone(),
                    hosts: config.console_hosts.clone(),
                },
                cancel.clone(),
            )
            .await?;
            tasks.spawn("console", serve);
            Some(bound)
        }
        None => None,
    };
    let (api, health) = serve_api(net.api_listener, config, apis, cancel.clone()).await?;
    tasks.spawn("client API", api);
    tasks.spawn(
        "storage health",
        storage_health(store, health.clone(), cancel.clone()),
    );
    Ok((api_addr, console_addr, health))
}

/// The agent engine with its executors, when the node has the role.
async fn start_agent(
    config: &Config,
    node_id: &str,
    store: &caroni_store::Store,
    wire: &Arc<wire::NodeWire>,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<caroni_agent::service::Handle>> {
    if !config.role.is_agent() {
        return Ok(None);
    }
    let executors = caroni_agent::executor::Executors::new(
        node_id.to_string(),
        config.data_dir.join("work"),
        store.clone(),
    );
    executors.start().await;
    let (svc, handle) = caroni_agent::service::Service::new(
        config.agent_options(node_id),
        store.clone(),
        wire.clone(),
        executors,
    )?;
    let c = cancel.clone();
    let span = tracing::info_span!("agent", node = %node_id);
    tasks.spawn("agent", async move {
        svc.run(c).instrument(span).await;
        Ok(())
    });
    let _ = wire.local_agent.set(handle.clone());
    Ok(Some(handle))
}

/// The manager engine, when the node has the role.
fn start_manager(
    config: &Config,
    node_id: &str,
    advertise: &str,
    store: &caroni_store::Store,
    wire: &Arc<wire::NodeWire>,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<caroni_manager::service::Handle>> {
    if !config.role.is_manager() {
        return Ok(None);
    }
    let (svc, handle) = caroni_manager::service::Service::new(
        config.manager_options(advertise),
        store.clone(),
        wire.clone(),
    )?;
    let c = cancel.clone();
    let span = tracing::info_span!("manager", node = %node_id);
    tasks.spawn("manager", async move {
        svc.run(c).instrument(span).await;
        Ok(())
    });
    Ok(Some(handle))
}

/// Applied-message ids are kept 30 days, far beyond any outage an outbox
/// is expected to bridge, then forgotten (checked hourly).
fn spawn_pruning(
    store: &caroni_store::Store,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) {
    let prune_store = store.clone();
    let c = cancel.clone();
    tasks.spawn("applied-id pruning", async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = c.cancelled() => return Ok(()),
                _ = every.tick() => {}
            }
            let s = prune_store.clone();
            let horizon = caroni_types::now_ms().saturating_sub(APPLIED_RETENTION_MS);
            match tokio::task::spawn_blocking(move || {
                caroni_store::applied::prune_applied(&s, horizon)
            })
            .await
            {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(forgotten = n, "pruned old applied-message ids")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune applied-message ids"),
                _ => {}
            }
        }
    });
}

/// What the peer service needs of the transport.
struct PeerParts<'a> {
    listener: TcpListener,
    node_id: &'a str,
    links: &'a caroni_peer::Links,
    liveness: &'a caroni_peer::Liveness,
    refusals: &'a caroni_peer::PeerRefusals,
    outbox: &'a caroni_peer::Outbox,
}

/// The peer service: what other nodes deliver, into the engines (and the
/// node's own messages between its roles, in process).
fn serve_peers(
    p: PeerParts<'_>,
    inbox: wire::PeerInbox,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) {
    let PeerParts {
        listener,
        node_id,
        links,
        liveness,
        refusals,
        outbox,
    } = p;
    let inbox: Arc<dyn caroni_peer::Inbox> = Arc::new(inbox);
    // Messages between the manager and the agent of this node go in
    // process, through the same outbox and inbox.
    outbox.set_local(inbox.clone());
    // A sender uses one stream per destination: a connection with more
    // open streams than this is not a well-behaved peer.
    let peer_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(PEER_STREAMS_PER_CONNECTION)
        .add_service(
            caroni_proto::v1::peer_service_server::PeerServiceServer::new(
                caroni_peer::PeerServer::new(inbox, liveness.clone()).guarded(
                    node_id.to_string(),
                    links.mesh_key.clone(),
                    refusals.clone(),
                ),
            )
            .max_decoding_message_size(caroni_peer::outbox::MAX_ENVELOPE),
        );
    let c = cancel.clone();
    match &links.tls {
        Some(tls) => {
            let incoming = caroni_peer::tls::accept(listener, tls.server_config(), "peer");
            tasks.spawn("peer server", async move {
                peer_server
                    .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
                    .await
                    .context("peer server failed")
            });
        }
        None => {
            tracing::warn!(
                "node links are plaintext (--peer-tls false): anyone on the path can read them"
            );
            let incoming = nodelay(listener);
            tasks.spawn("peer server", async move {
                peer_server
                    .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
                    .await
                    .context("peer server failed")
            });
        }
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
        agent_service_server::AgentServiceServer, manager_service_server::ManagerServiceServer,
        node_service_server::NodeServiceServer,
    };
    let token = api::TokenCheck::new(config.api_token.as_deref());
    use tonic::server::NamedService;
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut services = vec![<NodeServiceServer<api::NodeApi> as NamedService>::NAME];
    health
        .set_serving::<NodeServiceServer<api::NodeApi>>()
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
        .add_service(AgentServiceServer::with_interceptor(apis.agent, token));
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

/// An allowlist of node ids; empty means everyone.
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
