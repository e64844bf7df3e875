//! Trust on node links: TLS bound to node identities, and the proof of a
//! private mesh's pre-shared key.
//!
//! **Certificates.** Every node presents a self-signed X.509 certificate
//! whose key *is* its ed25519 node key (RFC 8410). Completing a TLS 1.3
//! handshake with it proves possession of the node key, so the certificate
//! binds the link to the node id (the libp2p PeerId of that key) and to
//! nothing else: its names, dates and issuer mean nothing here. libp2p-tls
//! binds a certificate to a node the same way, through an extension signed
//! by the node key, because its certificate key is a fresh one; using the
//! node key directly needs no extension.
//!
//! - The dialer knows which node it means to reach and accepts only a
//!   certificate of that node's key: a moved or impersonated address is
//!   refused in the handshake.
//! - The listener requires a client certificate, learns the dialer's node
//!   id from it, and accepts on that link only envelopes signed by that
//!   node ([`LinkInfo`]).
//! - TLS 1.3 only, ed25519 only, ALPN `h2`.
//!
//! **Private mesh.** With a pre-shared key (`--mesh-key`, the swarm.key
//! format of libp2p's `pnet`), a dialer also sends
//! `HMAC-SHA256(key, "caroni-mesh-link/1" ‖ dialer id ‖ listener id)` in the
//! `x-caroni-mesh` header of its delivery stream; the listener refuses a
//! stream without the right value. Inside TLS the value is secret, and it
//! is good only between these two nodes.
//!
//! (Over 600 lines: certificates, the verifiers on both sides, the mesh
//! key and their tests are one trust decision, read together.)

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use libp2p::identity::Keypair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const ED25519_SPKI: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an ed25519 PKCS#8 v1 private key; the 32-byte seed follows.
const ED25519_PKCS8: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once on one listener; further
/// connections are closed at once.
pub const MAX_HANDSHAKES: usize = 256;

/// Header carrying the dialer's node id on a delivery stream.
pub const NODE_HEADER: &str = "x-caroni-node";
/// Header carrying the proof of the mesh's pre-shared key.
pub const MESH_HEADER: &str = "x-caroni-mesh";

static FAILED_HANDSHAKES: crate::Refusals = crate::Refusals::new();

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node id (base58 PeerId) whose key a certificate carries.
pub fn node_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TlsError(format!("the certificate is not valid X.509: {e}")))?;
    let spki = ee.subject_public_key_info();
    let key = spki
        .as_ref()
        .strip_prefix(&ED25519_SPKI[..])
        .filter(|k| k.len() == 32)
        .ok_or_else(|| TlsError("the certificate's key is not an ed25519 node key".into()))?;
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(key).map_err(|e| {
        TlsError(format!(
            "the certificate's key is not a valid ed25519 key: {e}"
        ))
    })?;
    Ok(libp2p::identity::PublicKey::from(key)
        .to_peer_id()
        .to_base58())
}

/// A node's TLS credentials on its peer links.
pub struct PeerTls {
    node_id: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl PeerTls {
    /// Derives the certificate from the node key and builds the listener's
    /// configuration.
    pub fn new(key: &Keypair) -> Result<Self, TlsError> {
        let node_id = key.public().to_peer_id().to_base58();
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| TlsError("the node key is not an ed25519 key".into()))?;
        let mut pkcs8 = ED25519_PKCS8.to_vec();
        pkcs8.extend_from_slice(&ed.to_bytes()[..32]);
        let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8);
        let signing = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(|e| TlsError(format!("cannot use the node key for TLS: {e}")))?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("caroni node {node_id}"));
        let cert = params
            .self_signed(&signing)
            .map_err(|e| TlsError(format!("cannot make the node's certificate: {e}")))?
            .der()
            .clone();
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AnyNode {
                provider: provider(),
            }))
            .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(pkcs8.clone_key()))
            .map_err(|e| TlsError(format!("cannot use the node's certificate: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            node_id,
            cert,
            key: pkcs8,
            server: Arc::new(server),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The listener's configuration: client certificates required, any
    /// node's accepted (the envelopes on the link must then be its own).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The dialer's configuration for reaching node `expected`: only a
    /// certificate of its key completes the handshake.
    pub fn client_config(&self, expected: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectNode {
                node_id: expected.to_string(),
                provider: provider(),
            }))
            .with_client_auth_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(|e| TlsError(format!("cannot use the node's certificate: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn refuse(msg: impl std::fmt::Display) -> rustls::Error {
    #[derive(Debug)]
    struct Refused(String);
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Refused {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        msg.to_string(),
    )))))
}

fn tls13_only() -> rustls::Error {
    rustls::Error::General("node links use TLS 1.3 only".into())
}

/// The handshake signatures both verifiers accept: TLS 1.3 with ed25519
/// (node keys) only.
macro_rules! node_link_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(tls13_only())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

/// Accepts the certificate of one node only.
#[derive(Debug)]
struct ExpectNode {
    node_id: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = node_of(end_entity).map_err(refuse)?;
        if got != self.node_id {
            return Err(refuse(format!(
                "the node at this address is {got}, not {}",
                self.node_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    node_link_signatures!();
}

/// Requires a client certificate carrying some node's ed25519 key.
#[derive(Debug)]
struct AnyNode {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyNode {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        node_of(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    node_link_signatures!();
}

/// A private mesh's pre-shared key (libp2p `pnet` swarm.key format).
#[derive(Clone)]
pub struct MeshKey {
    psk: libp2p::pnet::PreSharedKey,
    /// HMAC key: the key file's canonical text.
    material: Vec<u8>,
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshKey({})", self.psk.fingerprint())
    }
}

impl MeshKey {
    /// Parses a key file's text: `/key/swarm/psk/1.0.0/`, `/base16/`, then
    /// 64 hex digits.
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        // libp2p's parser slices the hex line by bytes: only ASCII reaches it.
        if !text.is_ascii() {
            return Err(TlsError(
                "not a mesh key file: it holds characters other than ASCII; it holds three lines: /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits (`caroni mesh-key` writes one)".into(),
            ));
        }
        let psk: libp2p::pnet::PreSharedKey = text.trim().parse().map_err(|e| {
            TlsError(format!(
                "not a mesh key file ({e}); it holds three lines: /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits (`caroni mesh-key` writes one)"
            ))
        })?;
        Ok(Self {
            material: psk.to_string().into_bytes(),
            psk,
        })
    }

    /// A new random key.
    pub fn generate() -> Result<Self, TlsError> {
        let mut bytes = [0u8; 32];
        provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| TlsError("the system has no randomness to make a key from".into()))?;
        let psk = libp2p::pnet::PreSharedKey::new(bytes);
        Ok(Self {
            material: psk.to_string().into_bytes(),
            psk,
        })
    }

    /// The key for libp2p's private-network handshake.
    pub fn psk(&self) -> libp2p::pnet::PreSharedKey {
        self.psk
    }

    /// A public fingerprint, for logs: equal fingerprints, equal keys.
    pub fn fingerprint(&self) -> String {
        self.psk.fingerprint().to_string()
    }

    /// The key file's text.
    pub fn file_text(&self) -> String {
        self.psk.to_key_file()
    }

    /// The proof that `from` knows the key, for a link to `to`.
    pub fn proof(&self, from: &str, to: &str) -> String {
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.material)
            .expect("HMAC takes keys of any length");
        mac.update(b"caroni-mesh-link/1\0");
        mac.update(from.as_bytes());
        mac.update(b"\0");
        mac.update(to.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Checks a proof in constant time.
    pub fn check(&self, from: &str, to: &str, proof: &str) -> bool {
        let want = self.proof(from, to);
        want.len() == proof.len()
            && want
                .bytes()
                .zip(proof.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// How this node's links are secured. The default (no TLS, no mesh key) is
/// for in-process tests.
#[derive(Clone, Debug, Default)]
pub struct Links {
    /// TLS credentials; `None` speaks plaintext gRPC.
    pub tls: Option<Arc<PeerTls>>,
    /// The private mesh's key, when the mesh is private.
    pub mesh_key: Option<MeshKey>,
}

/// What the listener learnt of a connection, in every request's extensions.
#[derive(Clone, Debug)]
pub struct LinkInfo {
    /// The remote socket address.
    pub remote: SocketAddr,
    /// The node whose certificate completed the handshake (peer links).
    pub node: Option<String>,
}

/// A connection accepted over TLS.
pub struct TlsConn<S = TcpStream> {
    inner: tokio_rustls::server::TlsStream<S>,
    info: LinkInfo,
}

/// What TLS connections are accepted from: a TCP listener, or one behind
/// a [`crate::gate::GatedListener`].
pub trait Listener: Send + Sync + 'static {
    /// The connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and its remote address.
    fn next_conn(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn next_conn(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (tcp, remote) = self.accept().await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, remote))
    }
}

impl Listener for crate::gate::GatedListener {
    type Io = crate::gate::Gated<TcpStream>;
    async fn next_conn(&self) -> std::io::Result<(Self::Io, SocketAddr)> {
        Ok(self.accept().await)
    }
}

impl<S> tonic::transport::server::Connected for TlsConn<S> {
    type ConnectInfo = LinkInfo;

    fn connect_info(&self) -> LinkInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and completes their TLS
/// handshakes concurrently (each within [`HANDSHAKE_TIMEOUT`], at most
/// [`MAX_HANDSHAKES`] at once), yielding the connections that complete
/// one. A failed handshake (a plaintext client, a refused certificate) is
/// logged and dropped. `what` names the listener in logs.
pub fn accept<L: Listener>(
    listener: L,
    config: Arc<ServerConfig>,
    what: &'static str,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsConn<L::Io>>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<TlsConn<L::Io>>>(64);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.next_conn() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                crate::refusal!(FAILED_HANDSHAKES, listener = what, remote = %remote, "closed a connection: {MAX_HANDSHAKES} TLS handshakes are already in progress");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let node = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| node_of(c).ok());
                        let conn = TlsConn {
                            inner: tls,
                            info: LinkInfo { remote, node },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        crate::refusal!(FAILED_HANDSHAKES, listener = what, remote = %remote, error = %e, "a connection failed the TLS handshake (a plaintext client, or a certificate this node refuses)");
                    }
                    Err(_) => {
                        crate::refusal!(FAILED_HANDSHAKES, listener = what, remote = %remote, "a connection did not complete the TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The connector tonic dials through: TCP, then TLS with `config`,
/// naming the server `server_name` (which a node link's verifier ignores).
pub fn connector(
    config: Arc<ClientConfig>,
    server_name: Option<String>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        async move {
            let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| bad(format!("{uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server_name.unwrap_or(host))
                .map_err(|e| bad(format!("not a server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// `endpoint` with an `http://` scheme: tonic is handed a connector that
/// does TLS itself and must not try to.
pub fn plain_uri(endpoint: &str) -> String {
    match endpoint.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_the_node_id_of_its_key() {
        let key = Keypair::generate_ed25519();
        let tls = PeerTls::new(&key).expect("tls");
        assert_eq!(
            node_of(&tls.cert).expect("node"),
            key.public().to_peer_id().to_base58()
        );
        assert!(node_of(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    #[test]
    fn mesh_proofs_bind_the_key_and_both_nodes() {
        let a = MeshKey::generate().expect("key");
        let b = MeshKey::generate().expect("key");
        let p = a.proof("n1", "n2");
        assert!(a.check("n1", "n2", &p));
        assert!(!a.check("n2", "n1", &p));
        assert!(!b.check("n1", "n2", &p));
        assert!(!a.check("n1", "n2", ""));
        let again = MeshKey::parse(&a.file_text()).expect("parse");
        assert!(again.check("n1", "n2", &p));
        assert_eq!(again.fingerprint(), a.fingerprint());
        assert!(MeshKey::parse("/key/swarm/psk/1.0.0/\n/base16/\nzz").is_err());
    }

    /// Any key file text gives a key or an error, never a panic (`make
    /// fuzz` runs 100,000 cases).
    #[test]
    fn mesh_key_files_never_panic() {
        use proptest::prelude::*;
        let cases = std::env::var("CARONI_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let start = std::time::Instant::now();
        let line = prop_oneof![
            Just("/key/swarm/psk/1.0.0/".to_string()),
            Just("/base16/".to_string()),
            "[0-9a-fA-F]{60,68}",
            ".{0,70}",
        ];
        proptest!(
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() },
            |(lines in proptest::collection::vec(line, 0..5), raw in ".{0,200}")| {
                let _ = MeshKey::parse(&lines.join("\n"));
                let _ = MeshKey::parse(&raw);
            }
        );
        println!(
            "mesh key files: {cases} cases in {:.1} s, no panic",
            start.elapsed().as_secs_f64()
        );
    }
}
