//! The client API's messages as JSON: what `caroni -o json` prints and the
//! console's data endpoints serve, in one shape for both.

use caroni_proto::v1 as pb;
use serde_json::{json, Value};

/// A timestamp as RFC 3339 text; empty when absent.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    time(t.as_ref())
}

/// A workflow (attempts, declines and dataflows when shown whole).
pub fn workflow(w: &pb::Workflow) -> Value {
    json!({
        "id": w.id,
        "template": w.template,
        "state": w.state,
        "message": w.message,
        "created_at": ts(&w.created_at),
        "updated_at": ts(&w.updated_at),
        "finished_at": ts(&w.finished_at),
        "inputs": w.inputs,
        "outputs": w.outputs,
        "steps": w.steps.iter().map(|s| json!({
            "id": s.id, "job_type": s.job_type, "state": s.state, "attempts": s.attempts,
            "job_id": s.job_id, "agent": s.agent, "request_id": s.request_id, "request_state": s.request_state,
            "attempt_history": s.attempt_history.iter().map(|a| json!({
                "job_id": a.job_id, "agent": a.agent, "state": a.state, "exit_status": a.exit_status,
                "message": a.message, "stderr_tail": a.stderr_tail, "superseded": a.superseded,
                "executor": a.executor, "external_id": a.external_id,
                "placed_at": ts(&a.placed_at), "queued_at": ts(&a.queued_at),
                "started_at": ts(&a.started_at), "ended_at": ts(&a.ended_at),
                "failure": a.failure,
                "price": a.price.map(price),
                "max_charge": a.max_charge_milli as f64 / 1000.0,
                "charge": a.charge_milli.map(|c| c as f64 / 1000.0),
            })).collect::<Vec<_>>(),
            "blocked": s.blocked, "blocked_since": ts(&s.blocked_since),
            "retry_at": ts(&s.retry_at),
            "declines": s.declines.iter().map(|d| json!({
                "agent": d.agent, "reason": d.reason,
            })).collect::<Vec<_>>(),
            "subworkflow": s.subworkflow,
            "elements": s.elements.as_ref().map(|e| json!({
                "total": e.total, "waiting": e.waiting, "live": e.live, "completed": e.completed,
                "skipped": e.skipped, "failed": e.failed, "scatter": e.scatter,
            })),
            "children": s.children.iter().map(|c| json!({
                "index": c.index, "workflow_id": c.workflow_id, "state": c.state,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "parent_id": w.parent_id, "parent_step": w.parent_step, "parent_index": w.parent_index,
        "spent": w.spent_milli as f64 / 1000.0, "reserved": w.reserved_milli as f64 / 1000.0,
        "budget": w.budget_milli.map(|b| b as f64 / 1000.0),
        "budget_left": w.budget_milli.map(|_| w.budget_left_milli as f64 / 1000.0),
        "budget_allotted": w.budget_allotted_milli as f64 / 1000.0,
        "priority": w.priority,
        "dataflows": w.dataflows.iter().map(|d| json!({
            "source": d.source, "destination": d.destination, "value": d.value,
        })).collect::<Vec<_>>(),
    })
}

/// A template (with its CWL when shown whole).
pub fn template(t: &pb::Template) -> Value {
    json!({
        "name": t.name,
        "inputs": t.inputs,
        "outputs": t.outputs,
        "steps": t.steps.iter().map(|s| json!({
            "id": s.id, "job_type": s.job_type, "inputs": s.inputs, "outputs": s.outputs,
        })).collect::<Vec<_>>(),
        "updated_at": ts(&t.updated_at),
        "input_details": t.input_details.iter().map(|i| json!({
            "id": i.id,
            "type": serde_json::from_str::<Value>(&i.r#type).unwrap_or(Value::Null),
            "default": i.default,
        })).collect::<Vec<_>>(),
        "cwl": if t.cwl.is_empty() { Value::Null } else { json!(t.cwl) },
    })
}

/// A job type.
pub fn job_type(j: &pb::JobType) -> Value {
    json!({
        "name": j.name,
        "inputs": j.inputs,
        "outputs": j.outputs,
        "body": j.body,
        "timeout_seconds": j.timeout_seconds,
        "max_output_bytes": j.max_output_bytes,
        "executor": if j.executor.is_empty() { "bash" } else { j.executor.as_str() },
        "docker": j.docker.as_ref().map(|d| json!({
            "image": d.image, "cpus": d.cpus, "memory": d.memory, "network": d.network, "env": d.env,
        })),
        "slurm": j.slurm.as_ref().map(|s| json!({
            "partition": s.partition, "time_limit": s.time_limit, "cpus": s.cpus,
            "memory": s.memory, "sbatch": s.sbatch, "max_in_flight": s.max_in_flight,
        })),
        "updated_at": ts(&j.updated_at),
        "price": j.price.map(price),
    })
}

/// A price in credits (the wire carries thousandths).
pub fn price(p: pb::Price) -> Value {
    json!({
        "fixed": p.fixed_milli as f64 / 1000.0,
        "per_second": p.per_second_milli as f64 / 1000.0,
    })
}

/// A price as text: `0.5 + 0.01/s`, or `free`.
pub fn price_text(p: Option<pb::Price>) -> String {
    caroni_proto::convert::price_from_pb(p).describe()
}

/// A job on an agent.
pub fn job(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "manager": j.manager, "workflow_id": j.workflow_id, "job_type": j.job_type,
        "state": j.state, "inputs": j.inputs, "outputs": j.outputs, "exit_status": j.exit_status,
        "message": j.message, "stderr_tail": j.stderr_tail,
        "executor": j.executor, "external_id": j.external_id,
        "created_at": ts(&j.created_at), "started_at": ts(&j.started_at), "ended_at": ts(&j.ended_at),
    })
}

/// A peer as `caroni peers` shows it.
pub fn peer(p: &pb::Peer) -> Value {
    json!({
        "node_id": p.node_id, "p2p_address": p.p2p_address, "p2p_connected": p.p2p_connected, "gossip_subscribed": p.gossip_subscribed,
        "endpoint": p.endpoint, "queued": p.queued, "delivered": p.delivered,
        "stream_open": p.stream_open, "last_error": p.last_error,
        "dropped": p.dropped, "confirmed": p.confirmed,
        "refused": p.refused, "last_refusal": p.last_refusal,
        "advert": p.advert.as_ref().map(advert),
    })
}

/// An agent's advert as heard: what it serves and has.
pub fn advert(a: &pb::AgentAdvert) -> Value {
    let res = |r: &Option<pb::Resources>| {
        let r = r.unwrap_or_default();
        json!({"cpus": r.cpu_milli as f64 / 1000.0, "memory_mib": r.memory_mib, "gpus": r.gpus, "disk_mib": r.disk_mib})
    };
    json!({
        "job_types": a.job_types.iter().map(|t| json!({
            "name": t.name, "inputs": t.inputs, "price": t.price.map(price), "max_seconds": t.max_seconds,
        })).collect::<Vec<_>>(),
        "cwl_tools": a.cwl_tools, "serves": a.serves, "labels": a.labels,
        "total": res(&a.total), "free": res(&a.free),
        "slots": a.slots, "free_slots": a.free_slots, "queue_length": a.queue_length,
    })
}

/// A short text of what an advert says: job types, resources, labels.
pub fn advert_text(a: &pb::AgentAdvert) -> String {
    let r = a.total.unwrap_or_default();
    let mut types: Vec<String> = a
        .job_types
        .iter()
        .map(|t| match t.price {
            Some(p) => format!("{} ({})", t.name, price_text(Some(p))),
            None => t.name.clone(),
        })
        .collect();
    if a.cwl_tools {
        types.push("CWL tools".into());
    }
    let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let mut out = format!(
        "{} | {} CPUs, {} MiB, {} GPUs | {}/{} slots free",
        if types.is_empty() {
            "no job types".to_string()
        } else {
            types.join(", ")
        },
        caroni_types::market::cpus(r.cpu_milli),
        r.memory_mib,
        r.gpus,
        a.free_slots,
        a.slots
    );
    if !labels.is_empty() {
        out.push_str(" | ");
        out.push_str(&labels.join(" "));
    }
    if !a.serves.is_empty() {
        // Node ids as their first 16 characters, as tables print them.
        let ids: Vec<&str> = a.serves.iter().map(|s| s.get(..16).unwrap_or(s)).collect();
        out.push_str(" | serves only ");
        out.push_str(&ids.join(", "));
    }
    out
}

/// A node's identity and addresses.
pub fn node_info(i: &pb::NodeInfo) -> Value {
    json!({
        "node_id": i.node_id, "roles": i.roles, "api_listen": i.api_listen,
        "peer_endpoint": i.peer_endpoint, "p2p_listen": i.p2p_listen,
        "version": i.version, "data_dir": i.data_dir,
    })
}

/// A node's ledger (`caroni -o json ledger`, the console): credits as
/// thousandths and as text.
pub fn ledger(l: &pb::Ledger) -> Value {
    let credits = caroni_types::market::credits;
    json!({"chains": l.chains.iter().map(|c| json!({
        "role": c.role, "entries": c.entries, "head_hash": c.head_hash,
        "holds": c.broken.is_empty(), "broken": c.broken,
        "balances": c.balances.iter().map(|b| json!({
            "peer": b.peer,
            "countersigned": b.agreed, "countersigned_milli": b.agreed_milli,
            "countersigned_credits": credits(b.agreed_milli),
            "disputed": b.disputed, "disputed_milli": b.disputed_milli,
            "disputed_credits": credits(b.disputed_milli),
            "open": b.open, "open_milli": b.open_milli, "open_credits": credits(b.open_milli),
        })).collect::<Vec<_>>(),
        "recent": c.recent.iter().map(|e| json!({
            "seq": e.seq, "at_ms": e.at_ms, "peer": e.peer, "kind": e.kind,
            "job_id": e.job_id, "reason": e.reason, "hash": e.hash, "prev": e.prev,
            "receipt": e.receipt.as_ref().map(|r| json!({
                "job_id": r.job_id, "workflow_id": r.workflow_id, "manager": r.manager,
                "agent": r.agent, "job_type": r.job_type,
                "state": pb::JobState::try_from(r.state).map(|s| s.as_str_name().to_lowercase()).unwrap_or_default(),
                "inputs_sha256": r.inputs_sha256, "outputs_sha256": r.outputs_sha256,
                "wall_ms": r.wall_ms, "cpu_ms": r.cpu_ms,
                "price": r.price.map(price),
                "max_charge_milli": r.max_charge_milli, "charge_milli": r.charge_milli,
                "charge_credits": credits(r.charge_milli), "ended_at_ms": r.ended_at_ms,
            })),
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}
