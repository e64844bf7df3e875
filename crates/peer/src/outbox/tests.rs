use super::*;
use caroni_proto::v1::{peer_service_server::PeerServiceServer, JobStatusRequest};
use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use std::collections::BTreeSet;
use tokio::sync::watch;

use crate::{Applying, DeliverError, PeerServer};

/// Records what it receives; holds every ack until the gate opens.
struct Gated {
    got: Mutex<BTreeSet<uuid::Uuid>>,
    gate: watch::Receiver<bool>,
}

impl Inbox for Gated {
    fn submit(&self, msg: Verified) -> BoxFuture<'_, Result<Applying, DeliverError>> {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(msg.id);
        let mut gate = self.gate.clone();
        Box::pin(async move {
            let fut: Applying = Box::pin(async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(())
            });
            Ok(fut)
        })
    }
}

/// A peer service on a free loopback port, until the token is cancelled.
async fn serve(inbox: Arc<Gated>) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = PeerServer::new(inbox, Liveness::default());
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PeerServiceServer::new(server))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                c.cancelled_owned(),
            )
            .await
    });
    (addr, cancel)
}

/// A peer service of node `key` over TLS (with `mesh_key`, if any).
async fn serve_tls(
    inbox: Arc<Gated>,
    key: &Keypair,
    mesh_key: Option<crate::MeshKey>,
) -> (std::net::SocketAddr, CancellationToken, crate::PeerRefusals) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let refusals = crate::PeerRefusals::default();
    let server = PeerServer::new(inbox, Liveness::default()).guarded(
        key.public().to_peer_id().to_base58(),
        mesh_key,
        refusals.clone(),
    );
    let tls = crate::PeerTls::new(key).expect("tls");
    let incoming = crate::tls::accept(listener, tls.server_config(), "test");
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PeerServiceServer::new(server))
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await
    });
    (addr, cancel, refusals)
}

/// Sends one message from a new node with `links` to `peer` at `addr`;
/// returns the destination's status once it was delivered or failed.
async fn send_one(
    key: Keypair,
    links: crate::Links,
    peer: &str,
    addr: std::net::SocketAddr,
) -> PeerStatus {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let signer = Signer::new(key, "https://127.0.0.1:1".into()).with_links(links);
    let cancel = CancellationToken::new();
    let outbox = Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
    let mut b = Batch::default();
    let staged = outbox
        .stage(
            &mut b,
            peer,
            &format!("https://{addr}"),
            status_request(1),
            None,
        )
        .expect("stage");
    outbox.inner.store.write(b).expect("write");
    outbox.notify(vec![staged]);
    let st = || {
        outbox
            .status()
            .into_iter()
            .find(|s| s.node_id == peer)
            .expect("destination")
    };
    wait_until("delivered or failed", || {
        let s = st();
        s.delivered > 0 || !s.last_error.is_empty()
    })
    .await;
    cancel.cancel();
    st()
}

fn tls_links(key: &Keypair, mesh_key: Option<crate::MeshKey>) -> crate::Links {
    crate::Links {
        tls: Some(Arc::new(crate::PeerTls::new(key).expect("tls"))),
        mesh_key,
    }
}

/// Over TLS, a node reaches the node it means to reach, and no other
/// node's certificate passes for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_links_reach_only_the_node_named() {
    let (_open, gate) = watch::channel(true);
    let inbox = Arc::new(Gated {
        got: Mutex::default(),
        gate,
    });
    let server_key = Keypair::generate_ed25519();
    let server_id = server_key.public().to_peer_id().to_base58();
    let (addr, cancel, _) = serve_tls(inbox.clone(), &server_key, None).await;

    let key = Keypair::generate_ed25519();
    let ok = send_one(key.clone(), tls_links(&key, None), &server_id, addr).await;
    assert_eq!(ok.delivered, 1, "{ok:?}");
    assert_eq!(inbox.got.lock().map(|g| g.len()).unwrap_or(0), 1);

    // The same address, taken for another node: refused in the handshake.
    let other = Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_base58();
    let key = Keypair::generate_ed25519();
    let wrong = send_one(key.clone(), tls_links(&key, None), &other, addr).await;
    assert_eq!(wrong.delivered, 0);
    assert!(
        wrong
            .last_error
            .contains(&format!("is {server_id}, not {other}")),
        "{wrong:?}"
    );
    // A plaintext sender does not get through.
    let plain = send_one(
        Keypair::generate_ed25519(),
        crate::Links::default(),
        &server_id,
        addr,
    )
    .await;
    assert_eq!(plain.delivered, 0, "{plain:?}");
    cancel.cancel();
}

/// A private mesh's listener takes streams only from nodes that prove
/// its key, and counts the others' refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_mesh_refuses_streams_without_its_key() {
    let (_open, gate) = watch::channel(true);
    let inbox = Arc::new(Gated {
        got: Mutex::default(),
        gate,
    });
    let mesh = crate::MeshKey::generate().expect("key");
    let server_key = Keypair::generate_ed25519();
    let server_id = server_key.public().to_peer_id().to_base58();
    let (addr, cancel, refusals) = serve_tls(inbox.clone(), &server_key, Some(mesh.clone())).await;

    let stranger = Keypair::generate_ed25519();
    let st = send_one(
        stranger.clone(),
        tls_links(&stranger, None),
        &server_id,
        addr,
    )
    .await;
    assert_eq!(st.delivered, 0);
    assert!(st.last_error.contains("did not prove"), "{st:?}");
    let other = Keypair::generate_ed25519();
    let another = crate::MeshKey::generate().expect("key");
    let st = send_one(
        other.clone(),
        tls_links(&other, Some(another)),
        &server_id,
        addr,
    )
    .await;
    assert!(st.last_error.contains("is wrong"), "{st:?}");
    let member = Keypair::generate_ed25519();
    let st = send_one(
        member.clone(),
        tls_links(&member, Some(mesh)),
        &server_id,
        addr,
    )
    .await;
    assert_eq!(st.delivered, 1, "{st:?}");
    let refused: Vec<String> = refusals.all().into_iter().map(|(n, _, _)| n).collect();
    assert!(refused.contains(&stranger.public().to_peer_id().to_base58()));
    assert!(refused.contains(&other.public().to_peer_id().to_base58()));
    assert!(!refused.contains(&member.public().to_peer_id().to_base58()));
    cancel.cancel();
}

fn status_request(n: u64) -> Payload {
    Payload::JobStatusRequest(JobStatusRequest {
        job_id: n.to_string(),
    })
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A peer that withholds its acks fills the window; messages staged
/// meanwhile (and one staged after the acks came) are all delivered:
/// no wake-up is lost, and the outbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_withholds_acks_loses_no_message() {
    let (open, gate) = watch::channel(false);
    let inbox = Arc::new(Gated {
        got: Mutex::default(),
        gate,
    });
    let (addr, cancel) = serve(inbox.clone()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let signer = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
    let outbox = Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
    let peer = Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_base58();
    let endpoint = format!("http://{addr}");
    let stage = |from: u64, to: u64| {
        let mut b = Batch::default();
        let staged: Vec<_> = (from..to)
            .map(|n| {
                outbox
                    .stage(&mut b, &peer, &endpoint, status_request(n), None)
                    .expect("stage")
            })
            .collect();
        outbox.inner.store.write(b).expect("write");
        outbox.notify(staged);
    };
    let total = (WINDOW + WINDOW / 2) as u64;
    for chunk in 0..total / 64 {
        stage(chunk * 64, (chunk + 1) * 64);
    }
    let got = |n: usize| inbox.got.lock().map(|g| g.len() >= n).unwrap_or(false);
    wait_until("the window fills", || got(WINDOW)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        inbox.got.lock().map(|g| g.len()).unwrap_or(0),
        WINDOW,
        "no more than a window is sent before acks"
    );
    open.send_replace(true);
    wait_until("everything staged arrives", || got(total as usize)).await;
    stage(total, total + 1);
    wait_until("a message staged later arrives", || got(total as usize + 1)).await;
    wait_until("the outbox drains", || {
        outbox.status().iter().all(|s| s.queued == 0)
            && outbox
                .inner
                .store
                .scan(OUTBOX, &[])
                .map(|r| r.is_empty())
                .unwrap_or(false)
    })
    .await;
    let st = outbox.status();
    assert_eq!(st[0].delivered, total + 1);
    cancel.cancel();
}

/// After a restart the sender reads its queue back from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_left_by_a_restart_are_delivered() {
    let (_open, gate) = watch::channel(true);
    let inbox = Arc::new(Gated {
        got: Mutex::default(),
        gate,
    });
    let (addr, cancel) = serve(inbox.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = Keypair::generate_ed25519();
    let peer = Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_base58();
    {
        // Staged and written, never announced: as if the node died.
        let store = Store::open(dir.path()).expect("store");
        let signer = Signer::new(key.clone(), "http://127.0.0.1:1".into());
        let quiet = CancellationToken::new();
        let outbox = Outbox::start(store.clone(), signer, Liveness::default(), quiet.clone())
            .expect("outbox");
        let mut b = Batch::default();
        for n in 0..10 {
            outbox
                .stage(
                    &mut b,
                    &peer,
                    &format!("http://{addr}"),
                    status_request(n),
                    None,
                )
                .expect("stage");
        }
        store.write(b).expect("write");
        quiet.cancel();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store = Store::open(dir.path()).expect("reopen");
    let signer = Signer::new(key, "http://127.0.0.1:1".into());
    let _outbox =
        Outbox::start(store, signer, Liveness::default(), cancel.clone()).expect("outbox");
    wait_until("the queued rows arrive", || {
        inbox.got.lock().map(|g| g.len() == 10).unwrap_or(false)
    })
    .await;
    cancel.cancel();
}

/// An outbox on a fresh store, with a fresh key.
fn test_outbox(limits: Limits) -> (tempfile::TempDir, Outbox, CancellationToken) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let signer = Signer::new(Keypair::generate_ed25519(), "http://127.0.0.1:1".into());
    let cancel = CancellationToken::new();
    let outbox = Outbox::start_with(store, signer, Liveness::default(), cancel.clone(), limits)
        .expect("outbox");
    (dir, outbox, cancel)
}

fn closed_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

fn new_peer() -> String {
    Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_base58()
}

fn stage_one(outbox: &Outbox, to: &str, endpoint: &str, n: u64) {
    let mut b = Batch::default();
    let staged = outbox
        .stage(&mut b, to, endpoint, status_request(n), None)
        .expect("stage");
    outbox.inner.store.write(b).expect("write");
    outbox.notify(vec![staged]);
}

fn rows_for(outbox: &Outbox, to: &str) -> usize {
    outbox
        .inner
        .store
        .scan(OUTBOX, &Key::new().str(to).finish())
        .map(|r| r.len())
        .unwrap_or(usize::MAX)
}

/// Messages queued for a peer at an address where nothing answers go
/// to the address the peer gives next, at once, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_follow_a_peer_to_its_new_address() {
    let (_dir, outbox, cancel) = test_outbox(Limits::default());
    let peer = new_peer();
    for n in 0..5 {
        stage_one(&outbox, &peer, &closed_endpoint(), n);
    }
    wait_until("the old address fails", || {
        outbox.status().iter().any(|s| !s.last_error.is_empty())
    })
    .await;
    let (_open, gate) = watch::channel(true);
    let inbox = Arc::new(Gated {
        got: Mutex::default(),
        gate,
    });
    let (addr, server) = serve(inbox.clone()).await;
    let moved_to = format!("http://{addr}");
    // An older word does not move it; the newer one does.
    outbox.learn(&peer, "http://127.0.0.1:2", 10);
    outbox.learn(&peer, &moved_to, caroni_types::now_ms());
    outbox.learn(&peer, "http://127.0.0.1:3", 20);
    wait_until("the queue arrives at the new address", || {
        inbox.got.lock().map(|g| g.len() == 5).unwrap_or(false)
    })
    .await;
    wait_until("the outbox drains", || rows_for(&outbox, &peer) == 0).await;
    let st = outbox.status();
    assert_eq!(st[0].endpoint, moved_to);
    assert!(st[0].confirmed, "it acknowledged, so it is confirmed");
    // A message staged with the stale address goes to the new one too.
    stage_one(&outbox, &peer, "http://127.0.0.1:2", 99);
    wait_until("a message staged with a stale address arrives", || {
        inbox.got.lock().map(|g| g.len() == 6).unwrap_or(false)
    })
    .await;
    cancel.cancel();
    server.cancel();
}

/// A destination that never acknowledged anything gets a bounded
/// queue; so does the number of such destinations; its messages expire
/// and its sender stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_queue_is_bounded_expires_and_its_sender_stops() {
    let limits = Limits {
        max_queued_unconfirmed: 10,
        max_unconfirmed_peers: 2,
        unconfirmed_ttl: Duration::from_millis(1500),
        idle: Duration::from_millis(300),
        ..Limits::default()
    };
    let (_dir, outbox, cancel) = test_outbox(limits);
    let (p1, p2, p3) = (new_peer(), new_peer(), new_peer());
    let nowhere = closed_endpoint();
    for n in 0..15 {
        stage_one(&outbox, &p1, &nowhere, n);
    }
    stage_one(&outbox, &p2, &nowhere, 0);
    stage_one(&outbox, &p3, &nowhere, 0);
    let st = outbox.status();
    let s1 = st.iter().find(|s| s.node_id == p1).expect("p1");
    assert_eq!((s1.queued, s1.dropped), (10, 5), "{s1:?}");
    assert_eq!(rows_for(&outbox, &p1), 10);
    assert!(
        st.iter().all(|s| s.node_id != p3),
        "a third stranger gets no queue"
    );
    assert_eq!(rows_for(&outbox, &p3), 0);
    assert!(
        outbox.endpoint_of(&p3).is_none(),
        "a dropped stranger is not remembered"
    );
    wait_until(
        "the strangers' messages expire and their senders stop",
        || outbox.status().is_empty() && rows_for(&outbox, &p1) == 0 && rows_for(&outbox, &p2) == 0,
    )
    .await;
    // Room again for a new stranger.
    stage_one(&outbox, &p3, &nowhere, 1);
    assert_eq!(rows_for(&outbox, &p3), 1);
    cancel.cancel();
}

/// A message larger than any peer accepts is refused when staged and
/// counted; it never reaches a queue where it would block the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_at_staging() {
    let (_dir, outbox, cancel) = test_outbox(Limits::default());
    let peer = new_peer();
    let nowhere = closed_endpoint();
    stage_one(&outbox, &peer, &nowhere, 1);
    let huge = Payload::JobKill(caroni_proto::v1::JobKill {
        job_id: "j".into(),
        reason: "x".repeat(MAX_MESSAGE + 1),
    });
    let mut b = Batch::default();
    let staged = outbox
        .stage(&mut b, &peer, &nowhere, huge, None)
        .expect("stage");
    assert!(staged.item.is_none(), "not staged");
    assert!(b.is_empty(), "nothing written for it");
    outbox.notify(vec![staged]);
    let st = outbox.status();
    assert_eq!((st[0].queued, st[0].dropped), (1, 1), "{st:?}");
    cancel.cancel();
}
