//! NodeService: identity, addresses and peers.

use std::collections::BTreeMap;

use caroni_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

/// Serves the node API.
#[derive(Clone)]
pub struct NodeApi {
    info: pb::NodeInfo,
    mesh: caroni_mesh::Client,
    outbox: caroni_peer::Outbox,
}

impl NodeApi {
    /// Fixed facts about this node, and where to ask for live ones.
    pub fn new(info: pb::NodeInfo, mesh: caroni_mesh::Client, outbox: caroni_peer::Outbox) -> Self {
        Self { info, mesh, outbox }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let mut info = self.info.clone();
        info.p2p_listen = self
            .mesh
            .listeners()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.to_string())
            .collect();
        Ok(Response::new(info))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        let mut peers: BTreeMap<String, pb::Peer> = BTreeMap::new();
        for p in self.mesh.peers().await.unwrap_or_default() {
            let id = p.peer_id.to_base58();
            peers.insert(
                id.clone(),
                pb::Peer {
                    node_id: id,
                    p2p_address: p.address,
                    p2p_connected: true,
                    ..Default::default()
                },
            );
        }
        for s in self.outbox.status() {
            let e = peers.entry(s.node_id.clone()).or_insert_with(|| pb::Peer {
                node_id: s.node_id.clone(),
                ..Default::default()
            });
            e.endpoint = s.endpoint;
            e.queued = s.queued;
            e.delivered = s.delivered;
            e.stream_open = s.connected;
            e.last_error = s.last_error;
        }
        Ok(Response::new(pb::ListPeersResponse {
            peers: peers.into_values().collect(),
        }))
    }
}
