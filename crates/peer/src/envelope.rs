//! Signed envelopes: sealing with the node key, opening with verification.

use caroni_proto::v1::{message::Payload, Envelope, Message};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use prost::Message as _;

use crate::Error;

/// A verified message: the signature checked, the sender's key matching the
/// claimed node id.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Message id.
    pub id: uuid::Uuid,
    /// Sender node id.
    pub sender: PeerId,
    /// Sender's peer endpoint.
    pub sender_endpoint: String,
    /// Milliseconds since the Unix epoch when it was sent.
    pub sent_at_ms: u64,
    /// The protocol payload.
    pub payload: Payload,
}

/// Seals messages with this node's key.
#[derive(Clone)]
pub struct Signer {
    key: Keypair,
    id: PeerId,
    endpoint: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("id", &self.id).finish()
    }
}

impl Signer {
    /// `endpoint` is this node's advertised peer endpoint.
    pub fn new(key: Keypair, endpoint: String) -> Self {
        let id = key.public().to_peer_id();
        Self { key, id, endpoint }
    }

    /// This node's id.
    pub fn node_id(&self) -> PeerId {
        self.id
    }

    /// This node's advertised endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Wraps `payload` in a new message with a fresh id and signs it.
    pub fn seal(&self, payload: Payload) -> Result<(uuid::Uuid, Envelope), Error> {
        let id = uuid::Uuid::now_v7();
        let env = self.seal_encoded(id, &encode_payload(payload))?;
        Ok((id, env))
    }

    /// Signs a message with a given id whose payload was encoded earlier
    /// by [`encode_payload`] (an outbox entry). Protobuf merges
    /// concatenated encodings, so the header fields and the stored payload
    /// field are joined without decoding the payload again.
    pub fn seal_encoded(&self, id: uuid::Uuid, payload: &[u8]) -> Result<Envelope, Error> {
        let head = Message {
            message_id: id.to_string(),
            sender: self.id.to_base58(),
            sent_at: Some(caroni_proto::timestamp(std::time::SystemTime::now())),
            sender_endpoint: self.endpoint.clone(),
            payload: None,
        };
        let mut body = Vec::with_capacity(head.encoded_len() + payload.len());
        head.encode(&mut body)
            .map_err(|e| Error::Sign(e.to_string()))?;
        body.extend_from_slice(payload);
        let signature = self
            .key
            .sign(&body)
            .map_err(|e| Error::Sign(e.to_string()))?;
        Ok(Envelope {
            body,
            signature,
            public_key: self.key.public().encode_protobuf(),
        })
    }
}

/// The protobuf encoding of a `Message` holding only `payload`: what an
/// outbox row stores, to be sealed with [`Signer::seal_encoded`].
pub fn encode_payload(payload: Payload) -> Vec<u8> {
    Message {
        payload: Some(payload),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Reads a payload stored by [`encode_payload`].
pub fn decode_payload(bytes: &[u8]) -> Result<Payload, Error> {
    Message::decode(bytes)
        .map_err(|e| Error::Refused(format!("undecodable stored message: {e}")))?
        .payload
        .ok_or_else(|| Error::Refused("stored message without payload".into()))
}

/// Verifies an envelope and decodes its message. Nothing in it is trusted
/// before this returns `Ok`.
pub fn open(env: &Envelope) -> Result<Verified, Error> {
    let key = PublicKey::try_decode_protobuf(&env.public_key)
        .map_err(|e| Error::Refused(format!("unreadable public key: {e}")))?;
    if !key.verify(&env.body, &env.signature) {
        return Err(Error::Refused("bad signature".into()));
    }
    let msg = Message::decode(env.body.as_slice())
        .map_err(|e| Error::Refused(format!("undecodable message: {e}")))?;
    let sender: PeerId = msg
        .sender
        .parse()
        .map_err(|_| Error::Refused(format!("sender `{}` is not a node id", msg.sender)))?;
    if sender != key.to_peer_id() {
        return Err(Error::Refused(
            "the signing key does not belong to the claimed sender".into(),
        ));
    }
    let id = msg
        .message_id
        .parse()
        .map_err(|_| Error::Refused(format!("message id `{}` is not a UUID", msg.message_id)))?;
    let payload = msg
        .payload
        .ok_or_else(|| Error::Refused("message without payload".into()))?;
    Ok(Verified {
        id,
        sender,
        sender_endpoint: msg.sender_endpoint,
        sent_at_ms: msg
            .sent_at
            .as_ref()
            .map(caroni_proto::timestamp_to_ms)
            .unwrap_or(0),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caroni_proto::v1::JobStatusRequest;

    fn payload() -> Payload {
        Payload::JobStatusRequest(JobStatusRequest { job_id: "j".into() })
    }

    #[test]
    fn sealed_envelopes_open() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let (id, env) = s.seal(payload()).expect("seal");
        let v = open(&env).expect("open");
        assert_eq!(v.id, id);
        assert_eq!(v.sender, s.node_id());
        assert_eq!(v.sender_endpoint, "http://127.0.0.1:1");
    }

    #[test]
    fn a_stored_payload_seals_into_an_envelope_that_opens_with_its_id() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let id = uuid::Uuid::now_v7();
        let stored = encode_payload(payload());
        assert_eq!(decode_payload(&stored).expect("decode"), payload());
        let v = open(&s.seal_encoded(id, &stored).expect("seal")).expect("open");
        assert_eq!(v.id, id);
        assert_eq!(v.payload, payload());
        assert!(v.sent_at_ms > 0);
    }

    #[test]
    fn tampering_is_refused() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://x:1".into());
        let (_, mut env) = s.seal(payload()).expect("seal");
        let last = env.body.len() - 1;
        env.body[last] ^= 1;
        assert!(open(&env)
            .expect_err("tampered")
            .to_string()
            .contains("bad signature"));

        // Signed by one key, claiming to be another node.
        let other = Keypair::generate_ed25519();
        let (_, mut env) = s.seal(payload()).expect("seal");
        let mut msg = Message::decode(env.body.as_slice()).expect("decode");
        msg.sender = other.public().to_peer_id().to_base58();
        env.body = msg.encode_to_vec();
        env.signature = Keypair::sign(&s.key, &env.body).expect("sign");
        assert!(open(&env)
            .expect_err("impostor")
            .to_string()
            .contains("does not belong"));
    }
}
