//! The receiving side: `PeerService.Deliver`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use caroni_proto::v1::{peer_service_server::PeerService, Ack, Envelope};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{open, Verified};

/// Why a message was not applied.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// Never acceptable (no right to say it, malformed); acknowledged as
    /// refused so the sender drops it.
    #[error("{0}")]
    Refused(String),
    /// Could not be applied now (storage trouble, shutting down); the
    /// stream is closed so the sender retries later.
    #[error("{0}")]
    Retry(String),
}

/// Where verified messages go. `deliver` returns once the message and its
/// effects are durably written (or it was a duplicate).
pub trait Inbox: Send + Sync + 'static {
    /// Applies one verified message.
    fn deliver(&self, msg: Verified) -> impl Future<Output = Result<(), InboxError>> + Send;
}

/// The peer gRPC service.
pub struct PeerServer<I> {
    inbox: Arc<I>,
}

impl<I> PeerServer<I> {
    /// Serves `inbox`.
    pub fn new(inbox: Arc<I>) -> Self {
        Self { inbox }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl<I: Inbox> PeerService for PeerServer<I> {
    type DeliverStream = AckStream;

    async fn deliver(
        &self,
        req: Request<Streaming<Envelope>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let mut incoming = req.into_inner();
        let inbox = self.inbox.clone();
        let (tx, rx) = mpsc::channel::<Result<Ack, Status>>(256);
        tokio::spawn(async move {
            while let Some(item) = incoming.next().await {
                let env = match item {
                    Ok(e) => e,
                    Err(_) => return,
                };
                let ack = match open(&env) {
                    Err(e) => {
                        tracing::warn!(error = %e, "refused an envelope");
                        // The id is read unverified, only so that the
                        // sender can drop the message from its outbox.
                        let message_id = <caroni_proto::v1::Message as prost::Message>::decode(
                            env.body.as_slice(),
                        )
                        .map(|m| m.message_id)
                        .unwrap_or_default();
                        Ack {
                            message_id,
                            accepted: false,
                            error: e.to_string(),
                        }
                    }
                    Ok(msg) => {
                        let id = msg.id.to_string();
                        match inbox.deliver(msg).await {
                            Ok(()) => Ack {
                                message_id: id,
                                accepted: true,
                                error: String::new(),
                            },
                            Err(InboxError::Refused(e)) => {
                                tracing::warn!(message = %id, error = %e, "refused a message");
                                Ack {
                                    message_id: id,
                                    accepted: false,
                                    error: e,
                                }
                            }
                            Err(InboxError::Retry(e)) => {
                                let _ = tx.send(Err(Status::unavailable(e))).await;
                                return;
                            }
                        }
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
