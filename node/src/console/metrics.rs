//! `/metrics`: the node's metrics in the Prometheus text format.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use caroni_proto::v1 as pb;
use caroni_proto::v1::node_service_server::NodeService;

use super::{req, Console, Failure};

/// The node's metrics in the Prometheus text format: what the engines
/// record as they work (histograms, counters) and what is read at scrape
/// time (workflows, jobs, outbox queues per peer). Off loopback, scrapers
/// authenticate with `Authorization: Bearer TOKEN`.
pub(super) async fn metrics(State(c): State<Console>) -> Result<Response, Failure> {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::Ordering::Relaxed;
    type Labels = Vec<(String, String)>;
    let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let mut registry = prometheus_client::registry::Registry::with_prefix("caroni");
    caroni_metrics::register(&mut registry);

    let workflows = Family::<Labels, Gauge>::default();
    let workflows_ended = Family::<Labels, Counter>::default();
    if let Some(m) = &c.0.src.manager_handle {
        let s = m.stats();
        let live = s.live.load(Relaxed) as i64;
        let waiting = s.waiting.load(Relaxed) as i64;
        workflows.get_or_create(&l("state", "waiting")).set(waiting);
        workflows
            .get_or_create(&l("state", "running"))
            .set(live.saturating_sub(waiting));
        workflows_ended
            .get_or_create(&l("state", "completed"))
            .inc_by(s.completed.load(Relaxed));
        workflows_ended
            .get_or_create(&l("state", "failed"))
            .inc_by(s.failed.load(Relaxed));
        workflows_ended
            .get_or_create(&l("state", "cancelled"))
            .inc_by(s.cancelled.load(Relaxed));
    }
    registry.register(
        "workflows",
        "Live workflows on this manager, by state",
        workflows,
    );
    registry.register(
        "workflows_ended",
        "Workflows that ended since this node started, by final state",
        workflows_ended,
    );
    let jobs_ended = Family::<Labels, Counter>::default();
    if let Some(a) = &c.0.src.agent_handle {
        let s = a.stats();
        jobs_ended
            .get_or_create(&l("state", "completed"))
            .inc_by(s.completed.load(Relaxed));
        jobs_ended
            .get_or_create(&l("state", "failed"))
            .inc_by(s.failed.load(Relaxed));
        jobs_ended
            .get_or_create(&l("state", "cancelled"))
            .inc_by(s.cancelled.load(Relaxed));
    }
    registry.register(
        "job_runs",
        "Job runs that ended on this agent since it started, by state",
        jobs_ended,
    );

    let peers =
        c.0.src
            .node
            .list_peers(req(pb::ListPeersRequest {}))
            .await?
            .into_inner()
            .peers;
    let queued = Family::<Labels, Gauge>::default();
    let delivered = Family::<Labels, Counter>::default();
    let dropped = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    for p in &peers {
        let peer = l("peer", &p.node_id);
        if !p.endpoint.is_empty() {
            queued.get_or_create(&peer).set(p.queued as i64);
            delivered.get_or_create(&peer).inc_by(p.delivered);
            dropped.get_or_create(&peer).inc_by(p.dropped);
        }
        if p.refused > 0 {
            refused.get_or_create(&peer).inc_by(p.refused);
        }
    }
    registry.register(
        "outbox_queued_messages",
        "Direct messages waiting in the outbox, per peer",
        queued,
    );
    registry.register(
        "outbox_delivered_messages",
        "Direct messages acknowledged by the peer since this node started",
        delivered,
    );
    registry.register(
        "outbox_dropped_messages",
        "Direct messages not queued or expired (a queue bound), per peer",
        dropped,
    );
    registry.register(
        "peer_refusals",
        "What this node refused of each peer since it started",
        refused,
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
