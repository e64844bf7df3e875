//! NodeService: identity, addresses and peers.

use std::collections::BTreeMap;

use caroni_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

/// Where the node's counters come from.
#[derive(Clone)]
pub struct StatsSource {
    /// The database (synced writes).
    pub store: caroni_store::Store,
    /// The transport (requests published).
    pub wire: crate::wire::SharedWire,
    /// The manager engine, if this node is one.
    pub manager: Option<caroni_manager::service::Handle>,
    /// The agent engine, if this node is one.
    pub agent: Option<caroni_agent::service::Handle>,
}

/// Serves the node API.
#[derive(Clone)]
pub struct NodeApi {
    info: pb::NodeInfo,
    mesh: caroni_mesh::Client,
    outbox: caroni_peer::Outbox,
    stats: StatsSource,
}

impl NodeApi {
    /// Fixed facts about this node, and where to ask for live ones.
    pub fn new(
        info: pb::NodeInfo,
        mesh: caroni_mesh::Client,
        outbox: caroni_peer::Outbox,
        stats: StatsSource,
    ) -> Self {
        Self {
            info,
            mesh,
            outbox,
            stats,
        }
    }
}

/// CPU seconds (user + system) and peak RSS (bytes) of this process.
fn rusage() -> (f64, u64) {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            (
                secs(u.user_time()) + secs(u.system_time()),
                u64::try_from(u.max_rss()).unwrap_or(0) * 1024,
            )
        }
        Err(_) => (0.0, 0),
    }
}

/// Resident memory of this process now, in bytes (Linux; 0 elsewhere).
fn rss_now() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let store = self.stats.store.stats();
        let (cpu_seconds, peak_rss_bytes) = rusage();
        let mut out = pb::NodeStats {
            synced_writes: store.synced_writes,
            synced_ops: store.synced_ops,
            messages_delivered: self.outbox.status().iter().map(|p| p.delivered).sum(),
            requests_published: self.stats.wire.published.load(Relaxed),
            cpu_seconds,
            rss_bytes: rss_now(),
            peak_rss_bytes,
            blob_fetched_bytes: caroni_metrics::METRICS.blob_fetched_bytes.get(),
            blob_fetch_seconds: caroni_metrics::METRICS.blob_fetch_seconds.get(),
            blob_bytes: self.stats.wire.blobs.used(),
            blob_budget_bytes: self.stats.wire.blobs.budget(),
            ..Default::default()
        };
        if let Some(a) = &self.stats.agent {
            out.jobs_completed = a.stats().completed.load(Relaxed);
            out.jobs_failed = a.stats().failed.load(Relaxed);
            out.jobs_cancelled = a.stats().cancelled.load(Relaxed);
        }
        if let Some(m) = &self.stats.manager {
            let s = m.stats();
            out.workflows_completed = s.completed.load(Relaxed);
            out.workflows_failed = s.failed.load(Relaxed);
            out.workflows_cancelled = s.cancelled.load(Relaxed);
            out.workflows_live = s.live.load(Relaxed);
            out.workflows_waiting = s.waiting.load(Relaxed);
        }
        Ok(Response::new(out))
    }

    async fn get_ledger(
        &self,
        req: Request<pb::GetLedgerRequest>,
    ) -> Result<Response<pb::Ledger>, Status> {
        use caroni_types::ledger::{Record, Role};
        let req = req.into_inner();
        let roles: Vec<Role> = match req.role.as_str() {
            "" => [
                self.stats.agent.is_some().then_some(Role::Agent),
                self.stats.manager.is_some().then_some(Role::Manager),
            ]
            .into_iter()
            .flatten()
            .collect(),
            "agent" => vec![Role::Agent],
            "manager" => vec![Role::Manager],
            other => {
                return Err(Status::invalid_argument(format!(
                    "role `{other}` is not a ledger's: give agent or manager, or none for both"
                )))
            }
        };
        let limit = match req.limit {
            0 => 50,
            n => n.min(1000) as usize,
        };
        let store = self.stats.store.clone();
        let peer = req.peer;
        let chains = tokio::task::spawn_blocking(move || {
            let mut chains = Vec::new();
            for role in roles {
                use caroni_store::ledger;
                let last = ledger::last_entry(&store, role)?;
                let broken = match ledger::verify(&store, role)? {
                    Ok(_) => String::new(),
                    Err(why) => why,
                };
                let balances = ledger::balances(&store, role)?
                    .into_iter()
                    .filter(|b| peer.is_empty() || b.peer == peer)
                    .map(|b| pb::PeerBalance {
                        peer: b.peer,
                        agreed: b.agreed,
                        agreed_milli: b.agreed_milli,
                        disputed: b.disputed,
                        disputed_milli: b.disputed_milli,
                        open: b.open,
                        open_milli: b.open_milli,
                    })
                    .collect();
                // Newest first, this peer's only when asked (read in pages).
                let mut recent = Vec::new();
                let mut before = None;
                'pages: loop {
                    let page = ledger::entries(&store, role, before, 256)?;
                    let Some(oldest) = page.last().map(|e| e.seq) else {
                        break;
                    };
                    for e in page {
                        if !peer.is_empty() && e.peer != peer {
                            continue;
                        }
                        let (kind, job_id, receipt, reason) = match e.record {
                            Record::Receipt(r) => (
                                "receipt",
                                r.receipt.job_id,
                                Some(caroni_proto::convert::receipt_to_pb(r)),
                                String::new(),
                            ),
                            Record::Verdict(v) if v.agreed => {
                                ("countersigned", v.job_id, None, String::new())
                            }
                            Record::Verdict(v) => ("disputed", v.job_id, None, v.reason),
                        };
                        recent.push(pb::LedgerEntry {
                            seq: e.seq,
                            at_ms: e.at_ms,
                            peer: e.peer,
                            kind: kind.into(),
                            job_id: job_id.to_string(),
                            receipt,
                            reason,
                            hash: e.hash,
                            prev: e.prev,
                        });
                        if recent.len() >= limit {
                            break 'pages;
                        }
                    }
                    if oldest <= 1 {
                        break;
                    }
                    before = Some(oldest);
                }
                chains.push(pb::LedgerChain {
                    role: role.as_str().into(),
                    entries: last.as_ref().map_or(0, |e| e.seq),
                    head_hash: last.map(|e| e.hash).unwrap_or_default(),
                    broken,
                    balances,
                    recent,
                });
            }
            Ok::<_, caroni_store::Error>(chains)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("cannot read the ledger: {e}")))?;
        Ok(Response::new(pb::Ledger { chains }))
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
                    gossip_subscribed: p.subscribed,
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
            e.dropped = s.dropped;
            e.confirmed = s.confirmed;
        }
        for (node, advert) in self.stats.wire.adverts() {
            let e = peers.entry(node.clone()).or_insert_with(|| pb::Peer {
                node_id: node,
                ..Default::default()
            });
            use caroni_proto::v1::message::Payload;
            if let Payload::AgentAdvert(a) = Payload::from(caroni_types::msg::Msg::Advert(advert)) {
                e.advert = Some(a);
            }
        }
        for (node, count, reason) in self.stats.wire.refusals.all() {
            let e = peers.entry(node.clone()).or_insert_with(|| pb::Peer {
                node_id: node,
                ..Default::default()
            });
            e.refused = count;
            e.last_refusal = reason;
        }
        Ok(Response::new(pb::ListPeersResponse {
            peers: peers.into_values().collect(),
        }))
    }
}
