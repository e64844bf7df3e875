//! NodeService: identity and addresses.

use caroni_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

/// Serves the node API.
#[derive(Clone)]
pub struct NodeApi {
    info: pb::NodeInfo,
}

impl NodeApi {
    /// Fixed facts about this node.
    pub fn new(info: pb::NodeInfo) -> Self {
        Self { info }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}
