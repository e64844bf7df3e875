//! The libp2p side of a node: TCP + noise + yamux, gossipsub, identify,
//! mDNS and static bootstrap addresses.
//!
//! Shaped like rust-libp2p's file-sharing example: [`new`] returns a
//! [`Client`] (commands), a stream of [`Event`]s and an [`EventLoop`] that
//! owns the `Swarm`. No domain logic lives here: gossip payloads are opaque
//! bytes (signed Caroni envelopes, verified by the receiver).
//!
//! Topic layout: one topic, [`REQUESTS_TOPIC`], carries the job
//! fulfillment requests managers broadcast and the agents' adverts
//! (docs/market.md). Gossipsub
//! limits are explicit: 64 KiB messages, strict validation (libp2p-signed
//! messages), content-based message ids (SHA-256 of the payload), peer
//! scoring off, flood publishing on.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::{muxing::StreamMuxerBox, transport::Boxed, upgrade, Transport};
use libp2p::{
    gossipsub, identify, identity::Keypair, mdns, multiaddr::Protocol, noise,
    swarm::behaviour::toggle::Toggle, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp, yamux,
    Multiaddr, PeerId, Swarm,
};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The gossip topic of job fulfillment requests.
pub const REQUESTS_TOPIC: &str = "caroni/v1/requests";
/// Largest gossip message (a signed request is a few hundred bytes).
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// Mesh errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A multiaddr could not be parsed.
    #[error("`{0}` is not a valid libp2p multiaddr (example: /ip4/10.0.0.5/tcp/7072)")]
    BadAddr(String),
    /// The transport could not be set up or could not listen.
    #[error("libp2p: {0}")]
    Transport(String),
    /// Publishing failed (for example no peer is subscribed yet).
    #[error("gossip publish failed: {0}")]
    Publish(String),
    /// The event loop has stopped.
    #[error("the mesh has stopped")]
    Stopped,
}

/// Options of the mesh.
#[derive(Debug, Clone)]
pub struct Options {
    /// Listen multiaddr.
    pub listen: String,
    /// Multiaddrs dialled at start and re-dialled while disconnected.
    pub bootstrap: Vec<String>,
    /// mDNS discovery on the LAN.
    pub mdns: bool,
    /// A private mesh's pre-shared key: every connection starts with
    /// libp2p's `pnet` handshake, so a node without the key cannot connect.
    pub psk: Option<libp2p::pnet::PreSharedKey>,
}

/// Something the mesh heard.
#[derive(Debug)]
pub enum Event {
    /// A gossip message on the requests topic.
    Gossip {
        /// The opaque payload.
        data: Vec<u8>,
        /// The peer that forwarded it.
        from: PeerId,
    },
    /// A peer subscribed to the topic: it hears what is published from
    /// now on (an agent re-advertises for it).
    Subscribed(PeerId),
}

/// A connected peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its node id.
    pub peer_id: PeerId,
    /// Its address as seen from here.
    pub address: String,
    /// Whether it subscribed to the requests topic.
    pub subscribed: bool,
}

enum Command {
    Publish(Vec<u8>, oneshot::Sender<Result<(), Error>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Listeners(oneshot::Sender<Vec<Multiaddr>>),
}

/// Sends commands to the event loop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    tx: mpsc::Sender<Command>,
}

impl Client {
    /// Publishes on the requests topic.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Publish(data, tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Currently connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Peers(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Addresses the swarm listens on (with resolved ports).
    pub async fn listeners(&self) -> Result<Vec<Multiaddr>, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Listeners(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    topic: gossipsub::IdentTopic,
    bootstrap: Vec<Multiaddr>,
    /// Bootstrap addresses with a live connection, by peer.
    bootstrap_connected: HashMap<PeerId, Multiaddr>,
    connected: HashMap<PeerId, Multiaddr>,
    /// Peers mDNS found and has not expired: dialled again while
    /// disconnected (a first dial can fail, when both sides dial at once or
    /// one is not listening yet, and mDNS announces again only minutes
    /// later).
    discovered: HashMap<PeerId, Vec<Multiaddr>>,
    listen: Multiaddr,
    /// Gossip messages dropped because the listener was busy.
    dropped: u64,
    /// Connections that failed since start.
    failed_connections: u64,
    /// The private mesh key's fingerprint, for logs.
    psk_fingerprint: Option<String>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish()
    }
}

fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(sha2::Sha256::digest(&m.data).to_vec())
}

/// Builds the swarm. Nothing runs until [`EventLoop::run`].
pub fn new(
    key: Keypair,
    opts: Options,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), Error> {
    let listen: Multiaddr = opts
        .listen
        .parse()
        .map_err(|_| Error::BadAddr(opts.listen.clone()))?;
    let bootstrap = opts
        .bootstrap
        .iter()
        .map(|a| a.parse().map_err(|_| Error::BadAddr(a.clone())))
        .collect::<Result<Vec<Multiaddr>, _>>()?;
    let peer_id = key.public().to_peer_id();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .message_id_fn(message_id)
        .heartbeat_interval(Duration::from_millis(500))
        .flood_publish(true)
        .build()
        .map_err(|e| Error::Transport(e.to_string()))?;
    let psk = opts.psk;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| transport(key, psk).map_err(Box::from))
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_behaviour(|key| {
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let identify = identify::Behaviour::new(identify::Config::new(
                "/caroni/1.0.0".into(),
                key.public(),
            ));
            let mdns = if opts.mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                gossipsub,
                identify,
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    Ok((
        Client { tx: cmd_tx },
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            topic: gossipsub::IdentTopic::new(REQUESTS_TOPIC),
            bootstrap,
            bootstrap_connected: HashMap::new(),
            connected: HashMap::new(),
            discovered: HashMap::new(),
            listen,
            dropped: 0,
            failed_connections: 0,
            psk_fingerprint: psk.map(|k| k.fingerprint().to_string()),
        },
    ))
}

/// TCP, then (in a private mesh) the `pnet` handshake, then noise and
/// yamux.
fn transport(
    key: &Keypair,
    psk: Option<libp2p::pnet::PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

impl EventLoop {
    /// Starts listening and subscribing; fails fast if the address cannot
    /// be bound.
    pub fn listen(&mut self) -> Result<(), Error> {
        self.swarm
            .listen_on(self.listen.clone())
            .map_err(|e| Error::Transport(format!("cannot listen on {}: {e}", self.listen)))?;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&self.topic)
            .map_err(|e| Error::Transport(format!("cannot subscribe: {e:?}")))?;
        Ok(())
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut redial = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = redial.tick() => self.dial_bootstrap(),
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.swarm_event(ev).await,
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        let live: HashSet<&Multiaddr> = self.bootstrap_connected.values().collect();
        let todo: Vec<Multiaddr> = self
            .bootstrap
            .iter()
            .filter(|a| !live.contains(a))
            .cloned()
            .collect();
        for addr in todo {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
        let lost: Vec<(PeerId, Vec<Multiaddr>)> = self
            .discovered
            .iter()
            .filter(|(p, _)| !self.connected.contains_key(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addrs) in lost {
            self.dial_discovered(peer, addrs);
        }
    }

    /// Dials a peer mDNS found, unless a connection or a dial to it is
    /// already under way.
    fn dial_discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial of a discovered peer failed");
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(data, reply) => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), data)
                    .map(|_| ())
                    .map_err(|e| Error::Publish(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Peers(reply) => {
                let subscribed: HashSet<PeerId> = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.iter().any(|t| **t == self.topic.hash()))
                    .map(|(p, _)| *p)
                    .collect();
                let mut peers: Vec<PeerInfo> = self
                    .connected
                    .iter()
                    .map(|(p, a)| PeerInfo {
                        peer_id: *p,
                        address: a.to_string(),
                        subscribed: subscribed.contains(p),
                    })
                    .collect();
                peers.sort_by_key(|p| p.peer_id.to_base58());
                let _ = reply.send(peers);
            }
            Command::Listeners(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
        }
    }

    /// Logs a connection that failed (the 1st, 2nd, 4th, … at WARN): in a
    /// private mesh, most likely a node without the mesh's key.
    fn failed_connection(&mut self, with: &str, error: &str) {
        self.failed_connections += 1;
        let n = self.failed_connections;
        let hint = match &self.psk_fingerprint {
            Some(f) => format!("this mesh is private (--mesh-key fingerprint {f}): a node without this key cannot join its gossip"),
            None => "this mesh is open (no --mesh-key); a private mesh's node cannot connect to it".to_string(),
        };
        if n.is_power_of_two() {
            tracing::warn!(peer = %with, failed_so_far = n, error = %error, "a gossip connection failed its handshake or could not be made; {hint}");
        } else {
            tracing::debug!(peer = %with, error = %error, "a gossip connection failed");
        }
    }

    async fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
                peer_id,
                topic,
            })) if topic == self.topic.hash() => {
                let _ = self.events.try_send(Event::Subscribed(peer_id));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                // Never block the swarm on a busy listener: a dropped
                // request is re-published by its manager.
                if let Err(mpsc::error::TrySendError::Full(_)) =
                    self.events.try_send(Event::Gossip {
                        data: message.data,
                        from: propagation_source,
                    })
                {
                    self.dropped += 1;
                    if self.dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped = self.dropped,
                            "gossip listener busy; dropping gossip messages (requests are re-published)"
                        );
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    let known = self.discovered.entry(peer).or_default();
                    if !known.contains(&addr) {
                        known.push(addr.clone());
                    }
                    if !self.connected.contains_key(&peer) {
                        tracing::debug!(%peer, %addr, "mDNS discovered a peer");
                        self.dial_discovered(peer, vec![addr]);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    if let Some(known) = self.discovered.get_mut(&peer) {
                        known.retain(|a| *a != addr);
                        if known.is_empty() {
                            self.discovered.remove(&peer);
                        }
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %addr, "connected");
                if endpoint.is_dialer() {
                    let bare: Multiaddr = addr
                        .iter()
                        .filter(|p| !matches!(p, Protocol::P2p(_)))
                        .collect();
                    if self.bootstrap.contains(&bare) || self.bootstrap.contains(&addr) {
                        self.bootstrap_connected.insert(peer_id, bare);
                    }
                }
                self.connected.insert(peer_id, addr);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "disconnected");
                self.connected.remove(&peer_id);
                self.bootstrap_connected.remove(&peer_id);
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "libp2p listening");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => self.failed_connection(&send_back_addr.to_string(), &error.to_string()),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let to = peer_id.map(|p| p.to_base58()).unwrap_or_default();
                self.failed_connection(&to, &error.to_string());
            }
            _ => {}
        }
    }
}
