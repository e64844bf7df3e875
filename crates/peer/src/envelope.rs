//! Signed envelopes: sealing with the node key, opening with verification.

use caroni_proto::v1::{message::Payload, Envelope, Message};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use prost::Message as _;

use crate::Error;

/// Longest endpoint accepted from a peer (a wire bound, checked when an
/// envelope is opened).
pub const MAX_ENDPOINT: usize = 256;

/// A verified message: the signature checked, the sender's key matching the
/// claimed node id.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Message id.
    pub id: uuid::Uuid,
    /// Sender node id.
    pub sender: PeerId,
    /// The same, in its text form.
    pub sender_name: String,
    /// Sender's peer endpoint.
    pub sender_endpoint: String,
    /// Milliseconds since the Unix epoch when it was sent.
    pub sent_at_ms: u64,
    /// The workflow the sender says the message is about (for logs; a
    /// value that is not a UUID is ignored).
    pub trace: Option<uuid::Uuid>,
    /// The protocol payload.
    pub payload: Payload,
    /// Set by the receiving node's preparation: why the files this message
    /// names cannot be fetched for good. Never read from the wire.
    pub unfetched: Option<String>,
}

/// Seals messages with this node's key.
#[derive(Clone)]
pub struct Signer {
    key: Keypair,
    id: PeerId,
    name: String,
    endpoint: String,
    links: crate::tls::Links,
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
        Self {
            key,
            id,
            name: id.to_base58(),
            endpoint,
            links: crate::tls::Links::default(),
        }
    }

    /// The same, securing its links with `links` (TLS, the mesh key).
    pub fn with_links(mut self, links: crate::tls::Links) -> Self {
        self.links = links;
        self
    }

    /// How this node's links are secured.
    pub fn links(&self) -> &crate::tls::Links {
        &self.links
    }

    /// This node's id.
    pub fn node_id(&self) -> PeerId {
        self.id
    }

    /// This node's id, in its text form.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// This node's advertised endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Wraps `payload` in a new message with a fresh id and signs it.
    pub fn seal(&self, payload: Payload) -> Result<(uuid::Uuid, Envelope), Error> {
        let id = uuid::Uuid::now_v7();
        let env = self.seal_encoded(id, &encode_payload(payload, None))?;
        Ok((id, env))
    }

    /// Signs a message with a given id whose payload was encoded earlier
    /// by [`encode_payload`] (an outbox entry). Protobuf merges
    /// concatenated encodings, so the header fields and the stored payload
    /// field are joined without decoding the payload again.
    pub fn seal_encoded(&self, id: uuid::Uuid, payload: &[u8]) -> Result<Envelope, Error> {
        let body = self.message_bytes(id, payload);
        self.sign_body(body, false)
    }

    /// Seals several messages (ids and payloads as stored) in one envelope
    /// under one signature; a single message is sealed on its own.
    pub fn seal_batch(&self, messages: &[(uuid::Uuid, &[u8])]) -> Result<Envelope, Error> {
        if let [(id, payload)] = messages {
            return self.seal_encoded(*id, payload);
        }
        let mut body = Vec::new();
        for (id, payload) in messages {
            let m = self.message_bytes(*id, payload);
            prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut body);
            prost::encoding::encode_varint(m.len() as u64, &mut body);
            body.extend_from_slice(&m);
        }
        self.sign_body(body, true)
    }

    fn message_bytes(&self, id: uuid::Uuid, payload: &[u8]) -> Vec<u8> {
        let head = Message {
            message_id: id.to_string(),
            sender: self.name.clone(),
            sent_at: Some(caroni_proto::timestamp(std::time::SystemTime::now())),
            sender_endpoint: self.endpoint.clone(),
            trace_id: String::new(),
            payload: None,
        };
        let mut body = Vec::with_capacity(head.encoded_len() + payload.len());
        // Encoding into a Vec cannot run out of space.
        let _ = head.encode(&mut body);
        body.extend_from_slice(payload);
        body
    }

    /// Signs a request to read blob `sha256` from `offset` of node
    /// `holder`.
    pub fn sign_blob_read(
        &self,
        sha256: &str,
        offset: u64,
        holder: &str,
    ) -> Result<Envelope, Error> {
        let read = caroni_proto::v1::BlobRead {
            purpose: BLOB_READ_PURPOSE.into(),
            sha256: sha256.into(),
            offset,
            reader: self.name.clone(),
            holder: holder.into(),
            issued_at_ms: caroni_types::now_ms(),
        };
        self.sign_body(read.encode_to_vec(), false)
    }

    /// Signs a request to read a log of job `job_id` from `offset` of
    /// node `holder`.
    pub fn sign_log_read(
        &self,
        job_id: uuid::Uuid,
        stream: &str,
        offset: u64,
        follow: bool,
        holder: &str,
    ) -> Result<Envelope, Error> {
        let read = caroni_proto::v1::LogRead {
            purpose: LOG_READ_PURPOSE.into(),
            job_id: job_id.to_string(),
            stream: stream.into(),
            offset,
            follow,
            reader: self.name.clone(),
            holder: holder.into(),
            issued_at_ms: caroni_types::now_ms(),
        };
        self.sign_body(read.encode_to_vec(), false)
    }

    /// Signs `bytes` that carry their own purpose (a receipt, a verdict:
    /// `caroni_types::ledger`) with the node key.
    pub fn sign_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        self.key.sign(bytes).map_err(|e| Error::Sign(e.to_string()))
    }

    fn sign_body(&self, body: Vec<u8>, batch: bool) -> Result<Envelope, Error> {
        let signature = self
            .key
            .sign(&body)
            .map_err(|e| Error::Sign(e.to_string()))?;
        Ok(Envelope {
            body,
            signature,
            public_key: self.key.public().encode_protobuf(),
            batch,
        })
    }
}

/// True when `signature` is node `node`'s signature of `bytes`. The key
/// is read from the node id itself (ed25519 ids inline their key), so no
/// earlier message of the node is needed.
pub fn verify_by_node(node: &str, bytes: &[u8], signature: &[u8]) -> bool {
    let Ok(id) = node.parse::<PeerId>() else {
        return false;
    };
    let mh = id.as_ref();
    if mh.code() != 0 {
        return false;
    }
    match PublicKey::try_decode_protobuf(mh.digest()) {
        Ok(key) => key.to_peer_id() == id && key.verify(bytes, signature),
        Err(_) => false,
    }
}

/// The protobuf encoding of a `Message` holding only `payload` and the
/// workflow it is about (`trace`): what an outbox row stores, to be sealed
/// with [`Signer::seal_encoded`].
pub fn encode_payload(payload: Payload, trace: Option<uuid::Uuid>) -> Vec<u8> {
    Message {
        payload: Some(payload),
        trace_id: trace.map(|t| t.to_string()).unwrap_or_default(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Reads a payload and its trace stored by [`encode_payload`].
pub fn decode_payload(bytes: &[u8]) -> Result<(Payload, Option<uuid::Uuid>), Error> {
    let m = Message::decode(bytes)
        .map_err(|e| Error::Refused(format!("undecodable stored message: {e}")))?;
    let trace = trace_of(&m.trace_id);
    let payload = m
        .payload
        .ok_or_else(|| Error::Refused("stored message without payload".into()))?;
    Ok((payload, trace))
}

/// A trace id as a peer wrote it: a UUID, or nothing.
fn trace_of(s: &str) -> Option<uuid::Uuid> {
    if s.is_empty() || s.len() > MAX_ID {
        return None;
    }
    s.parse().ok()
}

/// A sender's key as decoded once: decoding an ed25519 key decompresses a
/// curve point, which costs about as much as half a verification.
#[derive(Clone)]
struct KnownKey {
    key: PublicKey,
    id: PeerId,
    name: String,
}

/// Keys seen recently, by their encoding. Bounded: cleared when full.
fn known_key(encoded: &[u8]) -> Result<KnownKey, Error> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    const MAX_KEYS: usize = 4096;
    static KEYS: OnceLock<Mutex<HashMap<Vec<u8>, KnownKey>>> = OnceLock::new();
    let keys = KEYS.get_or_init(Mutex::default);
    if let Some(k) = keys
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(encoded)
    {
        return Ok(k.clone());
    }
    let key = PublicKey::try_decode_protobuf(encoded)
        .map_err(|e| Error::Refused(format!("unreadable public key: {e}")))?;
    let id = key.to_peer_id();
    let known = KnownKey {
        key,
        id,
        name: id.to_base58(),
    };
    let mut map = keys
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.len() >= MAX_KEYS {
        map.clear();
    }
    map.insert(encoded.to_vec(), known.clone());
    Ok(known)
}

/// What a signed blob read says it is for.
pub const BLOB_READ_PURPOSE: &str = "caroni/v1/blob-read";
/// How far a blob read's signing time may be from the holder's clock.
const BLOB_READ_SKEW_MS: u64 = 5 * 60 * 1000;

/// A read request signed by its reader (a blob read, a log read).
pub trait SignedRead: prost::Message + Default {
    /// What it is called in messages.
    const WHAT: &'static str;
    /// The purpose it must state.
    const PURPOSE: &'static str;
    /// (purpose, reader, holder, signed at).
    fn parts(&self) -> (&str, &str, &str, u64);
}

impl SignedRead for caroni_proto::v1::BlobRead {
    const WHAT: &'static str = "blob read";
    const PURPOSE: &'static str = BLOB_READ_PURPOSE;
    fn parts(&self) -> (&str, &str, &str, u64) {
        (&self.purpose, &self.reader, &self.holder, self.issued_at_ms)
    }
}

impl SignedRead for caroni_proto::v1::LogRead {
    const WHAT: &'static str = "log read";
    const PURPOSE: &'static str = LOG_READ_PURPOSE;
    fn parts(&self) -> (&str, &str, &str, u64) {
        (&self.purpose, &self.reader, &self.holder, self.issued_at_ms)
    }
}

/// Verifies a signed blob read meant for node `me`; returns it with the
/// reader's node id (its signer's).
pub fn open_blob_read(
    env: &Envelope,
    me: &str,
) -> Result<(String, caroni_proto::v1::BlobRead), Error> {
    open_read(env, me)
}

/// What a signed log read says it is for.
pub const LOG_READ_PURPOSE: &str = "caroni/v1/log-read";

/// Verifies a signed log read meant for node `me`; returns it with the
/// reader's node id (its signer's).
pub fn open_log_read(
    env: &Envelope,
    me: &str,
) -> Result<(String, caroni_proto::v1::LogRead), Error> {
    open_read(env, me)
}

/// A read request meant for node `me`, its signature verified, with its
/// signer.
fn open_read<T: SignedRead>(env: &Envelope, me: &str) -> Result<(String, T), Error> {
    let what = T::WHAT;
    if env.batch {
        return Err(Error::Refused(format!("a batch envelope is not a {what}")));
    }
    let signer = verified_signer(env)?.name;
    let read = T::decode(env.body.as_slice())
        .map_err(|e| Error::Refused(format!("undecodable {what}: {e}")))?;
    let (purpose, reader, holder, issued_at_ms) = read.parts();
    if purpose != T::PURPOSE {
        return Err(Error::Refused(format!("the envelope is not a {what}")));
    }
    check_read(what, &signer, reader, holder, issued_at_ms, me)?;
    Ok((signer, read))
}

/// A read is signed by its reader, meant for this node and recent.
fn check_read(
    what: &str,
    signer: &str,
    reader: &str,
    holder: &str,
    issued_at_ms: u64,
    me: &str,
) -> Result<(), Error> {
    if reader != signer {
        return Err(Error::Refused(format!(
            "the {what} is not signed by its reader"
        )));
    }
    if holder != me {
        return Err(Error::Refused(format!(
            "the {what} is meant for node {}, not this one",
            holder.chars().take(64).collect::<String>()
        )));
    }
    if issued_at_ms.abs_diff(caroni_types::now_ms()) > BLOB_READ_SKEW_MS {
        return Err(Error::Refused(format!(
            "the {what} was signed more than 5 minutes from this node's clock; check both clocks"
        )));
    }
    Ok(())
}

/// Verifies an envelope holding one message and decodes it. Nothing in it
/// is trusted before this returns `Ok`. Batches are refused here (gossip
/// never carries them); [`open_all`] takes both forms.
pub fn open(env: &Envelope) -> Result<Verified, Error> {
    if env.batch {
        return Err(Error::Refused(
            "a batch envelope where one message was expected".into(),
        ));
    }
    let signer = verified_signer(env)?;
    let msg = Message::decode(env.body.as_slice())
        .map_err(|e| Error::Refused(format!("undecodable message: {e}")))?;
    checked(&signer, msg)
}

/// Verifies an envelope (one message or a batch) and decodes every message
/// in it; one bad message refuses the whole envelope.
pub fn open_all(env: &Envelope) -> Result<Vec<Verified>, Error> {
    if !env.batch {
        return open(env).map(|v| vec![v]);
    }
    let signer = verified_signer(env)?;
    let batch = caroni_proto::v1::MessageBatch::decode(env.body.as_slice())
        .map_err(|e| Error::Refused(format!("undecodable message batch: {e}")))?;
    batch
        .messages
        .into_iter()
        .map(|m| checked(&signer, m))
        .collect()
}

/// The ids an envelope claims, read without trusting it: only so that a
/// sender can drop what was refused.
///
/// Ids longer than a UUID are left out: an ack never echoes more than a
/// UUID's worth of what a stranger wrote.
pub fn claimed_ids(env: &Envelope) -> Vec<String> {
    let ids = if env.batch {
        caroni_proto::v1::MessageBatch::decode(env.body.as_slice())
            .map(|b| b.messages.into_iter().map(|m| m.message_id).collect())
            .unwrap_or_default()
    } else {
        Message::decode(env.body.as_slice())
            .map(|m| vec![m.message_id])
            .unwrap_or_default()
    };
    ids.into_iter().filter(|id| id.len() <= MAX_ID).collect()
}

fn verified_signer(env: &Envelope) -> Result<KnownKey, Error> {
    let signer = known_key(&env.public_key)?;
    if !signer.key.verify(&env.body, &env.signature) {
        return Err(Error::Refused("bad signature".into()));
    }
    Ok(signer)
}

/// Longest message id accepted: a UUID in its text form.
const MAX_ID: usize = 36;

/// At most `n` characters of what a peer sent, for an error message.
fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn checked(signer: &KnownKey, msg: Message) -> Result<Verified, Error> {
    // Compared, never parsed: a sender field is only ever the signer's own
    // node id, so no work grows with what a stranger wrote there.
    if msg.sender != signer.name {
        return Err(Error::Refused(format!(
            "the signing key ({}) does not belong to the claimed sender `{}`",
            signer.name,
            clip(&msg.sender, 64)
        )));
    }
    if msg.message_id.len() > MAX_ID {
        return Err(Error::Refused(format!(
            "message id `{}` is not a UUID",
            clip(&msg.message_id, MAX_ID)
        )));
    }
    let id = msg
        .message_id
        .parse()
        .map_err(|_| Error::Refused(format!("message id `{}` is not a UUID", msg.message_id)))?;
    if msg.sender_endpoint.len() > MAX_ENDPOINT {
        return Err(Error::Refused(format!(
            "sender endpoint is {} bytes long; at most {} are accepted",
            msg.sender_endpoint.len(),
            MAX_ENDPOINT
        )));
    }
    let payload = msg
        .payload
        .ok_or_else(|| Error::Refused("message without payload".into()))?;
    Ok(Verified {
        id,
        sender: signer.id,
        sender_name: signer.name.clone(),
        sender_endpoint: msg.sender_endpoint,
        sent_at_ms: msg
            .sent_at
            .as_ref()
            .map(caroni_proto::timestamp_to_ms)
            .unwrap_or(0),
        trace: trace_of(&msg.trace_id),
        payload,
        unfetched: None,
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
    fn a_stored_payload_seals_into_an_envelope_that_opens_with_its_id_and_trace() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let id = uuid::Uuid::now_v7();
        let workflow = uuid::Uuid::now_v7();
        let stored = encode_payload(payload(), Some(workflow));
        assert_eq!(
            decode_payload(&stored).expect("decode"),
            (payload(), Some(workflow))
        );
        let v = open(&s.seal_encoded(id, &stored).expect("seal")).expect("open");
        assert_eq!(v.id, id);
        assert_eq!(v.payload, payload());
        assert_eq!(v.trace, Some(workflow), "the trace travels in the envelope");
        assert!(v.sent_at_ms > 0);
        // No trace, or one that is not a UUID, is none (never refused).
        let untraced = open(
            &s.seal_encoded(id, &encode_payload(payload(), None))
                .expect("seal"),
        );
        assert_eq!(untraced.expect("open").trace, None);
        let odd = Message {
            trace_id: "not-a-uuid".into(),
            payload: Some(payload()),
            ..Default::default()
        }
        .encode_to_vec();
        let v = open(&s.seal_encoded(id, &odd).expect("seal")).expect("open");
        assert_eq!((v.trace, v.payload), (None, payload()));
    }

    #[test]
    fn a_batch_opens_into_its_messages_under_one_signature() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
        let stored = encode_payload(payload(), None);
        let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
        let parts: Vec<(uuid::Uuid, &[u8])> = ids.iter().map(|i| (*i, &stored[..])).collect();
        let env = s.seal_batch(&parts).expect("seal");
        assert!(env.batch);
        let got: Vec<uuid::Uuid> = open_all(&env).expect("open").iter().map(|v| v.id).collect();
        assert_eq!(got, ids);
        assert_eq!(claimed_ids(&env).len(), 3);
        assert!(open(&env).is_err(), "a batch is not a single message");
        let mut bad = env.clone();
        let last = bad.body.len() - 1;
        bad.body[last] ^= 1;
        assert!(open_all(&bad).is_err());
        // One message is sealed on its own.
        assert!(!s.seal_batch(&parts[..1]).expect("seal").batch);
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

    /// Absurdly long fields are refused without being parsed (a 4 MiB
    /// sender parsed as a node id took minutes), and refusals never echo
    /// them in full.
    #[test]
    fn long_fields_are_refused_quickly_and_not_echoed() {
        let s = Signer::new(Keypair::generate_ed25519(), "http://x:1".into());
        let long = "1".repeat(4 << 20);
        let sign = |msg: Message| {
            let body = msg.encode_to_vec();
            Envelope {
                signature: Keypair::sign(&s.key, &body).expect("sign"),
                public_key: s.key.public().encode_protobuf(),
                body,
                batch: false,
            }
        };
        let good =
            || Message::decode(s.seal(payload()).expect("seal").1.body.as_slice()).expect("decode");
        for (what, msg) in [
            (
                "sender",
                Message {
                    sender: long.clone(),
                    ..good()
                },
            ),
            (
                "message id",
                Message {
                    message_id: long.clone(),
                    ..good()
                },
            ),
            (
                "endpoint",
                Message {
                    sender_endpoint: long.clone(),
                    ..good()
                },
            ),
        ] {
            let env = sign(msg);
            let err = open(&env).expect_err(what).to_string();
            assert!(
                err.len() < 300,
                "{what}: the refusal echoes {} bytes",
                err.len()
            );
            assert!(claimed_ids(&env).iter().all(|id| id.len() <= 36), "{what}");
        }
    }
}
