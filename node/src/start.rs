//! Starting a node, part by part: storage (identity and database), the
//! transport (listeners, outbox, mesh, the engines' port), the engines of
//! its role, the peer service, and the client API with the console.
//! `Node::start` composes them in that order.

use std::sync::Arc;

use anyhow::Context;
use caroni_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::*;

/// The node's identity and its database.
pub(super) struct Storage {
    pub(super) key: libp2p::identity::Keypair,
    pub(super) node_id: String,
    pub(super) store: caroni_store::Store,
    pub(super) blobs: caroni_blob::Blobs,
}

/// Opens the private data directory, the node key and the database, and
/// checks that the database is this key's.
pub(super) fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    private_dir(&config.data_dir)?;
    let key = identity::load_or_create(&config.data_dir)?;
    let node_id = key.public().to_peer_id().to_string();
    let store = caroni_store::Store::open(&config.data_dir.join("db"))?;
    identity::check_owner(&store, &node_id, &config.data_dir, config.new_identity)?;
    let blobs = caroni_blob::Blobs::open(&config.data_dir, store.clone(), config.blob_disk_bytes)
        .context("cannot open the blob store under --data-dir")?;
    Ok(Storage {
        key,
        node_id,
        store,
        blobs,
    })
}

/// The transport: listeners, the outbox, the mesh and the engines' port.
pub(super) struct Transport {
    pub(super) api_listener: tokio::net::TcpListener,
    pub(super) peer_listener: tokio::net::TcpListener,
    pub(super) advertise: String,
    pub(super) links: caroni_peer::Links,
    pub(super) liveness: caroni_peer::Liveness,
    pub(super) refusals: caroni_peer::PeerRefusals,
    pub(super) outbox: caroni_peer::Outbox,
    pub(super) mesh: caroni_mesh::Client,
    pub(super) mesh_events: Option<tokio::sync::mpsc::Receiver<caroni_mesh::Event>>,
    pub(super) wire: Arc<wire::NodeWire>,
    pub(super) fetcher: caroni_peer::blobs::Fetcher,
}

/// Binds the listeners and starts the outbox and the mesh.
pub(super) fn start_transport(
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
        signer.clone(),
        liveness.clone(),
        cancel.clone(),
    )?;
    let fetcher = caroni_peer::blobs::Fetcher::new(signer, outbox.clone(), storage.blobs.clone())
        .with_stall_timeout(config.transfer_stall_timeout()?);
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
        local_manager: std::sync::OnceLock::new(),
        last_advert: Default::default(),
        adverts: Default::default(),
        liveness: liveness.clone(),
        published: Default::default(),
        refusals: refusals.clone(),
        blobs: storage.blobs.clone(),
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
        fetcher,
    })
}

/// The engines this node's role runs.
pub(super) struct Engines {
    pub(super) manager: Option<caroni_manager::service::Handle>,
    pub(super) agent: Option<caroni_agent::service::Handle>,
    /// The agent's jobs' logs.
    pub(super) logs: crate::logs::SharedLogs,
}

/// Starts the engines of the node's role, the applied-id pruning and the
/// gossip listener.
pub(super) async fn start_engines(
    config: &Config,
    storage: &Storage,
    net: &Transport,
    gossip: Option<tokio::sync::mpsc::Receiver<caroni_mesh::Event>>,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Engines> {
    let (store, node_id) = (&storage.store, storage.node_id.as_str());
    let (agent, logs) = match start_agent(config, storage, &net.wire, tasks, cancel).await? {
        Some((agent, logs)) => (Some(agent), Some(logs)),
        None => (None, None),
    };
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
    let gossip_manager = manager.clone();
    let gossip_wire = net.wire.clone();
    tasks.spawn("gossip listener", async move {
        let Some(events) = gossip else {
            return Ok(());
        };
        tokio::select! {
            _ = wire::gossip_loop(events, gossip_agent, gossip_manager, gossip_wire) => {}
            _ = c.cancelled() => {}
        }
        Ok(())
    });
    Ok(Engines {
        manager,
        agent,
        logs,
    })
}

/// What the client API and the console need of the transport.
pub(super) struct NetParts {
    pub(super) api_listener: tokio::net::TcpListener,
    pub(super) advertise: String,
    pub(super) mesh: caroni_mesh::Client,
    pub(super) outbox: caroni_peer::Outbox,
    pub(super) wire: Arc<wire::NodeWire>,
    pub(super) fetcher: caroni_peer::blobs::Fetcher,
}

/// The client API, the console and the storage health probe. Returns the
/// API's address, the console's and the node's health.
pub(super) async fn start_api(
    config: &Config,
    storage: Storage,
    net: NetParts,
    engines: Engines,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, Option<std::net::SocketAddr>, Health)> {
    let Storage {
        node_id,
        store,
        blobs,
        ..
    } = storage;
    let Engines {
        manager,
        agent,
        logs,
    } = engines;
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
        manager: api::ManagerApi::new(store.clone(), manager.clone()).with_logs(api::LogAccess {
            me: node_id.clone(),
            fetcher: net.fetcher,
            local: logs.clone(),
        }),
        agent: api::AgentApi::new(store.clone(), agent.clone()).with_logs(logs.clone()),
        files: api::FileApi::new(blobs.clone()),
    };
    tasks.spawn(
        "blob sweep",
        sweep_blobs(
            blobs.clone(),
            store.clone(),
            BlobRoles {
                manager: config.role.is_manager(),
                agent: config.role.is_agent(),
            },
            caroni_blob::SweepRules {
                retention_ms: config.blob_retention()?.as_millis() as u64,
                // The cache bound is an agent's: a manager keeps its
                // workflows' files for the retention.
                cache_bytes: if config.role.is_manager() {
                    0
                } else {
                    config.blob_cache_bytes
                },
                min_age_ms: 10 * 60 * 1000,
            },
            cancel.clone(),
        ),
    );
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
                    blobs: blobs.clone(),
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

/// The agent engine with its executors and its jobs' logs, when the node
/// has the role.
pub(super) async fn start_agent(
    config: &Config,
    storage: &Storage,
    wire: &Arc<wire::NodeWire>,
    tasks: &mut supervise::Tasks,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<(caroni_agent::service::Handle, Arc<crate::logs::AgentLogs>)>> {
    if !config.role.is_agent() {
        return Ok(None);
    }
    let logs = caroni_agent::logs::JobLogs::open(
        config.data_dir.join("logs"),
        config.job_log_bytes,
        Some(storage.store.clone()),
    )
    .context("cannot create the jobs' log directory under --data-dir")?;
    let (node_id, store) = (storage.node_id.as_str(), &storage.store);
    let executors = caroni_agent::executor::Executors::new(
        node_id.to_string(),
        config.data_dir.join("work"),
        store.clone(),
        Some(storage.blobs.clone()),
    )
    .with_cwl_limits(caroni_cwl_exec::expr::Limits {
        time: config.cwl_expression_timeout()?,
        memory_bytes: config.cwl_expression_memory_bytes as usize,
    });
    let executors =
        if config.agent_options(node_id).cwl_tools == caroni_agent::cwl::CwlTools::Container {
            executors.with_cwl_containers(node_id.to_string())
        } else {
            executors
        };
    let executors = if config.job_log_bytes > 0 {
        executors.with_logs(logs.clone())
    } else {
        executors
    };
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
    // Retention: jobs that ended more than --retention ago go, with their
    // logs, checked each minute. Logs whose job is gone (deleted while
    // the node was down) go at the first round.
    let retention = config.retention()?;
    let sweeper = handle.clone();
    let log_files = logs.clone();
    let c = cancel.clone();
    tasks.spawn("job retention", async move {
        let mut every = tokio::time::interval(retention.map_or(
            std::time::Duration::from_secs(60),
            sweep_every,
        ));
        let mut first = true;
        loop {
            tokio::select! {
                _ = c.cancelled() => return Ok(()),
                _ = every.tick() => {}
            }
            let deleted = match retention {
                Some(keep) => match sweeper.sweep(keep).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed; tried again in a minute");
                        0
                    }
                },
                None => 0,
            };
            if deleted > 0 {
                tracing::info!(jobs = deleted, "deleted jobs past --retention");
            }
            if deleted > 0 || first {
                first = false;
                let (files, jobs) = (log_files.clone(), sweeper.clone());
                let swept = tokio::task::spawn_blocking(move || {
                    files.sweep(&|id| !matches!(jobs.get_job(id), Ok(None)))
                })
                .await;
                if let Ok(Err(e)) = swept {
                    tracing::warn!(error = %e, "cannot sweep the jobs' logs");
                }
            }
        }
    });
    let logs = Arc::new(crate::logs::AgentLogs {
        agent: handle.clone(),
        logs,
    });
    Ok(Some((handle, logs)))
}

/// The manager engine, when the node has the role.
pub(super) fn start_manager(
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
        config.manager_options(node_id, advertise),
        store.clone(),
        wire.clone(),
    )?;
    let c = cancel.clone();
    let span = tracing::info_span!("manager", node = %node_id);
    tasks.spawn("manager", async move {
        svc.run(c).instrument(span).await;
        Ok(())
    });
    wire.set_local_manager(handle.clone());
    // Retention: ended workflows older than --retention go, checked each
    // minute or sooner (1,000 at most a round, so a large backlog goes
    // gradually).
    let (retention, submissions) = (config.retention()?, config.submission_retention()?);
    let sweeper = handle.clone();
    let c = cancel.clone();
    tasks.spawn("workflow retention", async move {
        let mut every = tokio::time::interval(retention.map_or(
            std::time::Duration::from_secs(60),
            sweep_every,
        ));
        loop {
            tokio::select! {
                _ = c.cancelled() => return Ok(()),
                _ = every.tick() => {}
            }
            if let Some(keep) = retention {
                match sweeper.sweep(keep, submissions).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(workflows = n, "deleted workflows past --retention"),
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed; tried again in a minute"),
                }
            }
        }
    });
    Ok(Some(handle))
}

/// How often retention is checked: each minute, or twice per retention
/// when that is shorter (at least each second).
fn sweep_every(retention: std::time::Duration) -> std::time::Duration {
    (retention / 2).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

/// Applied-message ids are kept 30 days, far beyond any outage an outbox
/// is expected to bridge, then forgotten (checked hourly).
pub(super) fn spawn_pruning(
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
pub(super) struct PeerParts<'a> {
    pub(super) listener: TcpListener,
    pub(super) node_id: &'a str,
    pub(super) links: &'a caroni_peer::Links,
    pub(super) liveness: &'a caroni_peer::Liveness,
    pub(super) refusals: &'a caroni_peer::PeerRefusals,
    pub(super) outbox: &'a caroni_peer::Outbox,
    pub(super) blobs: &'a caroni_blob::Blobs,
    pub(super) logs: crate::logs::SharedLogs,
}

/// The peer service: what other nodes deliver, into the engines (and the
/// node's own messages between its roles, in process).
pub(super) fn serve_peers(
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
        blobs,
        logs,
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
                caroni_peer::PeerServer::new(inbox, liveness.clone())
                    .guarded(
                        node_id.to_string(),
                        links.mesh_key.clone(),
                        refusals.clone(),
                    )
                    .with_blobs(Some(blobs.clone()))
                    .with_logs(logs.map(|l| l as Arc<dyn caroni_peer::LogSource>)),
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

/// Which engines' live work pins files.
struct BlobRoles {
    manager: bool,
    agent: bool,
}

/// How often the blob store is swept.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes, once a minute, the files nothing live refers to once the rules
/// say so (`caroni_blob::Blobs::sweep`).
async fn sweep_blobs(
    blobs: caroni_blob::Blobs,
    store: caroni_store::Store,
    roles: BlobRoles,
    rules: caroni_blob::SweepRules,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let (b, s) = (blobs.clone(), store.clone());
        let swept = tokio::task::spawn_blocking(move || -> anyhow::Result<caroni_blob::Swept> {
            let now = caroni_types::now_ms();
            let mut keep = std::collections::HashSet::new();
            if roles.manager {
                keep.extend(caroni_manager::records::live_files(&s)?);
            }
            if roles.agent {
                keep.extend(caroni_agent::records::live_files(&s, now)?);
            }
            Ok(b.sweep(&keep, now, rules)?)
        })
        .await;
        match swept {
            Ok(Ok(s)) if s.blobs > 0 || s.partials > 0 => {
                tracing::info!(
                    files = s.blobs,
                    bytes = s.bytes,
                    partials = s.partials,
                    "deleted files nothing live needs"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep the blob store; will try again"),
            Err(e) => tracing::warn!(error = %e, "the blob sweep failed; will try again"),
        }
    }
}
