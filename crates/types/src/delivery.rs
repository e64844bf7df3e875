//! Why a message was not applied: one type for every layer that hands
//! messages on (the peer service, the router, both engines), so that no
//! layer maps a twin of it by hand.

/// The sender has no right to say this, or it makes no sense here: never
/// acceptable. The sender drops the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Why a message was not applied: never (`Refused`) or not now (`Retry`:
/// storage trouble, shutting down; the sender sends it again later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// Never acceptable.
    #[error("{0}")]
    Refused(String),
    /// Try again later.
    #[error("{0}")]
    Retry(String),
}

impl From<Refusal> for DeliverError {
    fn from(r: Refusal) -> Self {
        DeliverError::Refused(r.0)
    }
}

impl DeliverError {
    /// A refusal.
    pub fn refused(why: impl Into<String>) -> Self {
        DeliverError::Refused(why.into())
    }
    /// A retry.
    pub fn retry(why: impl Into<String>) -> Self {
        DeliverError::Retry(why.into())
    }
}
