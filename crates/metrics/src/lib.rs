//! Metrics of this process that the engines, the store and the transport
//! record as they work, exposed in the Prometheus text format by the node
//! (`/metrics` on the console listener). Labels are bounded: states,
//! reasons and outcomes, never workflow or job ids.
//!
//! One set per process: several nodes embedded in one process (`caroni
//! bench --in-process`) share it.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric recorded as work happens.
#[derive(Debug)]
pub struct Metrics {
    /// Operations per synced write batch.
    pub store_batch_ops: Histogram,
    /// Seconds one synced write (with its fsync) took.
    pub store_sync_seconds: Histogram,
    /// Seconds from staging a direct message to its acknowledgement.
    pub delivery_seconds: Histogram,
    /// Seconds from a workflow's creation to its end, by final state.
    pub workflow_seconds: Family<Vec<(String, String)>, Histogram>,
    /// Seconds from the moment a step had all its inputs to its completion
    /// at the manager.
    pub step_seconds: Histogram,
    /// Job requests published on gossip: first publication or re-publication.
    pub gossip_published: Family<Vec<(String, String)>, Counter>,
    /// Job requests received on gossip.
    pub gossip_received: Counter,
    /// Offers made, declines sent (agent) and offers accepted (manager).
    pub offers: Family<Vec<(String, String)>, Counter>,
    /// Job runs that ended failed on an agent, by reason.
    pub job_failures: Family<Vec<(String, String)>, Counter>,
    /// Bytes of files received from peers (fetched).
    pub blob_fetched_bytes: Counter,
    /// Seconds spent fetching those bytes (from the read request to the
    /// file synced in place), summed over transfers.
    pub blob_fetch_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    store_batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
    store_sync_seconds: seconds(),
    delivery_seconds: seconds(),
    workflow_seconds: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.001, 2.0, 20))
    }),
    step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
    gossip_published: Family::default(),
    gossip_received: Counter::default(),
    offers: Family::default(),
    job_failures: Family::default(),
    blob_fetched_bytes: Counter::default(),
    blob_fetch_seconds: Counter::default(),
});

/// One label.
pub fn label(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_string(), value.to_string())]
}

/// Adds the process's metrics to `registry` (names get the registry's
/// prefix, `caroni_` for the node's).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "store_write_batch_ops",
        "Operations per synced RocksDB write batch",
        m.store_batch_ops.clone(),
    );
    registry.register(
        "store_sync_duration_seconds",
        "Duration of one synced RocksDB write, fsync included",
        m.store_sync_seconds.clone(),
    );
    registry.register(
        "message_delivery_seconds",
        "Time from staging a direct message in the outbox to the peer's acknowledgement",
        m.delivery_seconds.clone(),
    );
    registry.register(
        "workflow_duration_seconds",
        "Time from a workflow's creation to its end, by final state",
        m.workflow_seconds.clone(),
    );
    registry.register(
        "step_duration_seconds",
        "Time from the moment a step has all its inputs to its completion at the manager: data to the agent, queue, run, results, and any retries",
        m.step_seconds.clone(),
    );
    registry.register(
        "gossip_requests_published",
        "Job requests published on gossip (kind: first or republished)",
        m.gossip_published.clone(),
    );
    registry.register(
        "gossip_requests_received",
        "Job requests received on gossip",
        m.gossip_received.clone(),
    );
    registry.register(
        "offers",
        "Offers made and declines sent by this agent, offers accepted by this manager (outcome)",
        m.offers.clone(),
    );
    registry.register(
        "job_failures",
        "Job runs that ended failed on this agent, by reason",
        m.job_failures.clone(),
    );
    registry.register(
        "blob_fetched_bytes",
        "Bytes of files fetched from peers",
        m.blob_fetched_bytes.clone(),
    );
    registry.register(
        "blob_fetch_seconds",
        "Seconds spent fetching files from peers, request to synced file, summed",
        m.blob_fetch_seconds.clone(),
    );
}
