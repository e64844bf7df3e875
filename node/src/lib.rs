//! `caroni-node`: one process that is a manager, an agent or both.
//!
//! [`Node::start`] opens the data directory (node key + RocksDB), binds the
//! client API and serves it until [`NodeHandle::shutdown`]. The binary in
//! `main.rs` is a thin wrapper that adds configuration, logging and signals;
//! tests start nodes through the same function or as real processes.

use std::net::SocketAddr;

use anyhow::Context;
use caroni_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod api;
pub mod config;
pub mod identity;

pub use config::{Config, Flags, LogFormat};

/// A running node.
pub struct NodeHandle {
    /// Node id (libp2p PeerId, base58).
    pub node_id: String,
    /// Bound client API address.
    pub api_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
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

    /// Waits until every task has stopped; the first error wins.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first = Ok(());
        while let Some(res) = self.tasks.join_next().await {
            let res = res.map_err(anyhow::Error::from).and_then(|r| r);
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

/// Namespace for starting nodes.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Opens storage, binds the API and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<NodeHandle> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data directory {}",
                config.data_dir.display()
            )
        })?;
        let key = identity::load_or_create(&config.data_dir)?;
        let node_id = key.public().to_peer_id().to_string();
        let store = caroni_store::Store::open(&config.data_dir.join("db"))?;

        let api_listener = TcpListener::bind(config.api_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on --api-listen {}; is another node using this port?",
                    config.api_listen
                )
            })?;
        let api_addr = api_listener.local_addr()?;

        let info = pb::NodeInfo {
            node_id: node_id.clone(),
            roles: config.role.names().into_iter().map(String::from).collect(),
            api_listen: api_addr.to_string(),
            peer_endpoint: config.peer_advertise.clone(),
            p2p_listen: vec![config.p2p_listen.clone()],
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: config.data_dir.display().to_string(),
        };

        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let api = serve_api(api_listener, &config, store, info, cancel.clone()).await?;
        tasks.spawn(api);
        tracing::info!(node_id = %node_id, api = %api_addr, role = ?config.role, "node started");
        Ok(NodeHandle {
            node_id,
            api_addr,
            cancel,
            tasks,
        })
    }
}

async fn serve_api(
    listener: TcpListener,
    config: &Config,
    store: caroni_store::Store,
    info: pb::NodeInfo,
    cancel: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    use pb::{
        agent_service_server::AgentServiceServer, manager_service_server::ManagerServiceServer,
        node_service_server::NodeServiceServer,
    };
    let token = api::TokenCheck::new(config.api_token.as_deref());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeServiceServer<api::NodeApi>>()
        .await;
    if config.role.is_manager() {
        health
            .set_serving::<ManagerServiceServer<api::ManagerApi>>()
            .await;
    }
    if config.role.is_agent() {
        health
            .set_serving::<AgentServiceServer<api::AgentApi>>()
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caroni_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caroni_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(NodeServiceServer::with_interceptor(
            api::NodeApi::new(info),
            token.clone(),
        ))
        .add_service(ManagerServiceServer::with_interceptor(
            api::ManagerApi::new(store.clone(), config.role.is_manager()),
            token.clone(),
        ))
        .add_service(AgentServiceServer::with_interceptor(
            api::AgentApi::new(store, config.role.is_agent()),
            token,
        ));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Ok(async move {
        router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await
            .context("client API server failed")
    })
}
