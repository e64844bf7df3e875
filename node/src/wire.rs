//! The node's transport as the engines see it ([`caroni_store::wire::Wire`]),
//! the inbox that routes verified peer messages to the engines, and the
//! gossip listener.

use std::sync::{Arc, OnceLock};

use caroni_peer::{Applying, Inbox, InboxError, Liveness, Outbox, Verified};
use caroni_proto::v1::{message::Payload, Envelope};
use caroni_store::{wire::Staged, Batch};
use caroni_types::msg::{Inbound, JobRequest, Msg, Outbound};
use futures::future::BoxFuture;
use prost::Message as _;
use tokio::sync::mpsc;

/// Stages through the outbox; publishes on gossip and to the local agent.
pub struct NodeWire {
    pub outbox: Outbox,
    pub mesh: caroni_mesh::Client,
    pub local_agent: OnceLock<caroni_agent::service::Handle>,
    pub liveness: Liveness,
    /// Job requests published on gossip.
    pub published: std::sync::atomic::AtomicU64,
}

impl caroni_store::wire::Wire for NodeWire {
    fn stage(&self, batch: &mut Batch, out: &Outbound) -> Result<Staged, String> {
        self.outbox
            .stage(
                batch,
                &out.to,
                &out.endpoint,
                Payload::from(out.msg.clone()),
            )
            .map_err(|e| e.to_string())
    }

    fn notify(&self, staged: Vec<Staged>) {
        self.outbox.notify(staged);
    }

    fn unstage(&self, batch: &mut Batch, staged: &Staged) {
        self.outbox.unstage(batch, staged);
    }

    fn last_heard_ms(&self, node: &str) -> Option<u64> {
        self.liveness.last_heard_ms(node)
    }

    fn publish(&self, req: JobRequest) {
        let signer = self.outbox.signer().clone();
        let me = signer.node_name().to_string();
        if let Some(agent) = self.local_agent.get() {
            // Gossip never comes back to its sender: serve our own agent
            // directly (dropped when it is busy, like gossip).
            agent.gossip(me.clone(), req.clone());
        }
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let request_id = req.request_id;
            let data = match signer.seal(Payload::from(Msg::Request(req))) {
                Ok((_, env)) => env.encode_to_vec(),
                Err(e) => return tracing::error!(error = %e, "cannot sign a request"),
            };
            if let Err(e) = mesh.publish(data).await {
                // Retried by the manager's re-publication schedule.
                tracing::debug!(request = %request_id, error = %e, "publish failed; will re-publish");
            }
        });
    }
}

/// Routes verified direct messages to the manager or the agent engine.
pub struct PeerInbox {
    pub manager: Option<caroni_manager::service::Handle>,
    pub agent: Option<caroni_agent::service::Handle>,
}

fn inbound(msg: Verified) -> Result<Inbound, InboxError> {
    let m = Msg::try_from(msg.payload).map_err(|e| InboxError::Refused(e.to_string()))?;
    Ok(Inbound {
        id: msg.id,
        from: msg.sender_name,
        endpoint: msg.sender_endpoint,
        msg: m,
    })
}

fn agent_err(e: caroni_agent::service::DeliverError) -> InboxError {
    use caroni_agent::service::DeliverError;
    match e {
        DeliverError::Refused(e) => InboxError::Refused(e),
        DeliverError::Retry(e) => InboxError::Retry(e),
    }
}

fn manager_err(e: caroni_manager::service::DeliverError) -> InboxError {
    use caroni_manager::service::DeliverError;
    match e {
        DeliverError::Refused(e) => InboxError::Refused(e),
        DeliverError::Retry(e) => InboxError::Retry(e),
    }
}

const GONE: &str = "the engine stopped before answering";

impl Inbox for PeerInbox {
    fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, InboxError>> {
        Box::pin(async move {
            let msg = inbound(msg)?;
            if matches!(msg.msg, Msg::Request(_)) {
                return Err(InboxError::Refused(
                    "job requests travel on gossip, not direct".into(),
                ));
            }
            if msg.msg.for_agent() {
                let Some(agent) = &self.agent else {
                    return Err(InboxError::Refused(format!(
                        "this node is not an agent; it does not take {}",
                        msg.msg.name()
                    )));
                };
                let rx = agent.submit(msg).await.map_err(agent_err)?;
                let fut: Applying = Box::pin(async move {
                    use caroni_agent::service::Delivered;
                    match rx.await {
                        Ok(Ok(Delivered::Applied)) => Ok(()),
                        Ok(Ok(Delivered::NotMine)) => {
                            Err(InboxError::Refused("not a message for an agent".into()))
                        }
                        Ok(Err(e)) => Err(agent_err(e)),
                        Err(_) => Err(InboxError::Retry(GONE.into())),
                    }
                });
                return Ok(fut);
            }
            let Some(manager) = &self.manager else {
                return Err(InboxError::Refused(format!(
                    "this node is not a manager; it does not take {}",
                    msg.msg.name()
                )));
            };
            let rx = manager.submit(msg).await.map_err(manager_err)?;
            let fut: Applying = Box::pin(async move {
                match rx.await {
                    Ok(r) => r.map_err(manager_err),
                    Err(_) => Err(InboxError::Retry(GONE.into())),
                }
            });
            Ok(fut)
        })
    }
}

/// Hands verified gossip requests to the agent.
pub async fn gossip_loop(
    mut events: mpsc::Receiver<caroni_mesh::Event>,
    agent: Option<caroni_agent::service::Handle>,
) {
    while let Some(caroni_mesh::Event::Gossip { data, from }) = events.recv().await {
        let Some(agent) = &agent else { continue };
        let env = match Envelope::decode(data.as_slice()) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "undecodable gossip");
                continue;
            }
        };
        let verified = match caroni_peer::open(&env) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "refused gossip");
                continue;
            }
        };
        match inbound(verified) {
            Ok(Inbound {
                from,
                msg: Msg::Request(req),
                ..
            }) => {
                if !agent.gossip(from, req) {
                    tracing::debug!("agent busy; dropped a gossip request (it is re-published)");
                }
            }
            Ok(other) => tracing::warn!(
                kind = other.msg.name(),
                "only job requests travel on gossip"
            ),
            Err(e) => tracing::warn!(error = %e, "refused gossip"),
        }
    }
}

/// Shared handles of a running node.
pub type SharedWire = Arc<NodeWire>;
