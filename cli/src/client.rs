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
pub struct Context {
    pub node: String,
    token: Option<String>,
    pub format: Format,
}

impl Context {
    pub fn new(node: String, token: Option<String>, format: Format) -> Self {
        Self {
            node,
            token,
            format,
        }
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(self.node.clone())
            .with_context(|| {
                format!(
                    "`{}` is not a valid node URL; use e.g. http://127.0.0.1:7070",
                    self.node
                )
            })?
            .connect_timeout(std::time::Duration::from_secs(5));
        endpoint.connect().await.with_context(|| {
            format!("cannot reach the node at {}; is caroni-node running there? (set --node or CARONI_NODE)", self.node)
        })
    }

    /// Wraps a message into a request carrying the token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
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

    /// Asks `grpc.health.v1.Health/Check` for the whole server.
    pub async fn health(&self) -> anyhow::Result<std::process::ExitCode> {
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
        let serving = resp.status == ServingStatus::Serving as i32;
        println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
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
