//! The inbox: where verified messages go, and the delivery pipeline that
//! both the peer service (messages from other nodes) and the outbox's
//! in-process delivery (a node in both roles) feed.
//!
//! A stream's messages are handed to the engines in arrival order without
//! waiting for each one to be written: the engines gather whatever is
//! queued into one synced batch (group commit), and the acks follow in
//! order as the batches land. At most [`WINDOW`] messages of one stream
//! are in the engines at once.

use std::sync::Arc;

use caroni_proto::v1::Ack;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::Verified;

/// Largest number of messages of one stream handed to the engines and not
/// yet acknowledged.
pub const WINDOW: usize = 1024;

static REFUSED_MESSAGES: crate::Refusals = crate::Refusals::new();

/// Longest error text in an ack.
const MAX_ACK_ERROR: usize = 512;

pub use caroni_types::delivery::DeliverError;

/// Resolves once a submitted message and its effects are durably written
/// (or it was a duplicate).
pub type Applying = BoxFuture<'static, Result<(), DeliverError>>;

/// Resolves once what a message needs before it is submitted is done:
/// `Ok(None)` when it is ready, `Ok(Some(why))` when the files it names
/// cannot be had for good (the message is submitted with that reason, so
/// its engine fails the job), an error to answer the message with.
pub type Preparing = BoxFuture<'static, Result<Option<String>, DeliverError>>;

/// Where verified messages go.
pub trait Inbox: Send + Sync + 'static {
    /// Queues one verified message for its engine, in order with the
    /// messages submitted before it, and returns what resolves once it is
    /// applied. Returns only after the message is queued.
    fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, DeliverError>>;

    /// What must be done before `msg` is submitted, if anything: fetching
    /// the files it refers to. The preparations of a stream's messages run
    /// at once, but the messages are still submitted in order, each once
    /// its own is done; a failed one answers the message with its error.
    fn prepare(&self, msg: &Verified) -> Option<Preparing> {
        let _ = msg;
        None
    }
}

/// A message whose preparation ended.
enum Prepared {
    Ready(Box<Verified>, Result<Option<String>, DeliverError>),
    Refused { message_id: String, error: String },
}

/// One message read from a stream: verified, or refused with the id the
/// sender knows it by.
pub(crate) enum Incoming {
    Verified(Box<Verified>),
    Refused {
        message_id: String,
        error: String,
    },
    /// The stream broke (an envelope over the size limit, a bad frame):
    /// what was read before is answered, then the stream ends with this.
    Broken(Status),
}

/// Feeds `incoming` to `inbox` and yields an ack per message, in order.
/// The stream of acks ends with an `unavailable` status when the inbox asks
/// for a retry (the sender reconnects and re-sends).
pub(crate) fn pipeline<S>(inbox: Arc<dyn Inbox>, incoming: S) -> mpsc::Receiver<Result<Ack, Status>>
where
    S: Stream<Item = Incoming> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Ack, Status>>(WINDOW);
    tokio::spawn(async move {
        let mut incoming = incoming;
        let mut preparing = FuturesOrdered::<BoxFuture<'static, Prepared>>::new();
        let mut applying =
            FuturesOrdered::<BoxFuture<'static, (String, Result<(), DeliverError>)>>::new();
        let mut open = true;
        let mut broken: Option<Status> = None;
        loop {
            tokio::select! {
                biased;
                Some((id, result)) = applying.next(), if !applying.is_empty() => {
                    let ack = match result {
                        Ok(()) => Ack { message_id: id, accepted: true, error: String::new() },
                        Err(DeliverError::Refused(mut e)) => {
                            crate::refusal!(REFUSED_MESSAGES, message_id = %id, error = %e, "refused a message");
                            if e.len() > MAX_ACK_ERROR {
                                let mut end = MAX_ACK_ERROR;
                                while !e.is_char_boundary(end) {
                                    end -= 1;
                                }
                                e.truncate(end);
                            }
                            Ack { message_id: id, accepted: false, error: e }
                        }
                        Err(DeliverError::Retry(e)) => {
                            let _ = tx.send(Err(Status::unavailable(e))).await;
                            return;
                        }
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                Some(prepared) = preparing.next(), if !preparing.is_empty() => match prepared {
                    Prepared::Refused { message_id, error } => {
                        applying.push_back(Box::pin(async move {
                            (message_id, Err(DeliverError::Refused(error)))
                        }));
                    }
                    Prepared::Ready(msg, Err(e)) => {
                        let id = msg.id.to_string();
                        applying.push_back(Box::pin(async move { (id, Err(e)) }));
                    }
                    Prepared::Ready(mut msg, Ok(unfetched)) => {
                        msg.unfetched = unfetched;
                        let id = msg.id.to_string();
                        match inbox.submit(*msg).await {
                            Ok(fut) => applying.push_back(Box::pin(async move { (id, fut.await) })),
                            Err(e) => applying.push_back(Box::pin(async move { (id, Err(e)) })),
                        }
                    }
                },
                item = incoming.next(), if open && applying.len() + preparing.len() < WINDOW => match item {
                    None => open = false,
                    Some(Incoming::Broken(status)) => {
                        open = false;
                        broken = Some(status);
                    }
                    Some(Incoming::Refused { message_id, error }) => {
                        preparing.push_back(Box::pin(futures::future::ready(Prepared::Refused {
                            message_id,
                            error,
                        })));
                    }
                    Some(Incoming::Verified(msg)) => match inbox.prepare(&msg) {
                        None => preparing.push_back(Box::pin(futures::future::ready(
                            Prepared::Ready(msg, Ok(None)),
                        ))),
                        Some(work) => preparing.push_back(Box::pin(async move {
                            let r = work.await;
                            Prepared::Ready(msg, r)
                        })),
                    },
                },
                else => {
                    if let Some(status) = broken {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
            }
        }
    });
    rx
}
