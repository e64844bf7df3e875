//! The subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use caroni_proto::v1 as pb;
use clap::Subcommand;
use serde_json::json;

use crate::client::{status, Context};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Register (or replace) a template from a CWL file.
    #[command(
        after_help = "Example:\n  caroni template add test_simple examples/templates/test_simple.cwl"
    )]
    Add {
        /// Template name.
        name: String,
        /// CWL workflow file (YAML or JSON).
        file: PathBuf,
    },
    /// List templates.
    #[command(after_help = "Example:\n  caroni template list -o json")]
    List,
    /// Show one template: inputs, outputs, steps and its CWL.
    #[command(after_help = "Example:\n  caroni template show test_simple")]
    Show {
        /// Template name.
        #[arg(add = crate::complete::templates())]
        name: String,
    },
    /// Remove a template.
    #[command(after_help = "Example:\n  caroni template rm test_simple")]
    Rm {
        /// Template name.
        #[arg(add = crate::complete::templates())]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobTypeCmd {
    /// Define new job types from a YAML or TOML file.
    #[command(
        after_help = "Example:\n  caroni jobtype add examples/jobtypes/foojob0.yaml\n\nFile format (YAML):\n  name: foojob0\n  inputs: [message]\n  outputs: [jobout]\n  timeout: 60\n  body: |\n    jq -cn --arg m \"$CARONI_ENV_message\" '{jobout: ($m | ascii_upcase)}'"
    )]
    Add {
        /// Job-type file (.yaml, .yml or .toml).
        file: PathBuf,
    },
    /// Replace existing job types with the definitions in a file.
    #[command(after_help = "Example:\n  caroni jobtype update examples/jobtypes/foojob2.yaml")]
    Update {
        /// Job-type file (.yaml, .yml or .toml).
        file: PathBuf,
    },
    /// List job types.
    #[command(after_help = "Example:\n  caroni jobtype list")]
    List,
    /// Show one job type with its body.
    #[command(after_help = "Example:\n  caroni jobtype show foojob0")]
    Show {
        /// Job type name.
        #[arg(add = crate::complete::job_types())]
        name: String,
    },
    /// Remove a job type.
    #[command(after_help = "Example:\n  caroni jobtype rm foojob0")]
    Rm {
        /// Job type name.
        #[arg(add = crate::complete::job_types())]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Node id, roles and addresses.
    #[command(after_help = "Example:\n  caroni --node http://127.0.0.1:7070 node info")]
    Info,
}

fn template_json(t: &pb::Template) -> serde_json::Value {
    caroni_node::api::json::template(t)
}

fn print_template(ctx: &Context, t: &pb::Template) {
    if ctx.format == Format::Json {
        return output::json(&template_json(t));
    }
    say!("template {}", t.name);
    say!("inputs:  {}", t.inputs.join(", "));
    say!("outputs: {}", t.outputs.join(", "));
    let mut table = output::table(&["step", "job type", "inputs", "outputs"]);
    for s in &t.steps {
        table.add_row(vec![
            s.id.clone(),
            s.job_type.clone(),
            s.inputs.join(", "),
            s.outputs.join(", "),
        ]);
    }
    say!("{table}");
    if !t.cwl.is_empty() {
        say!("--- CWL ---\n{}", t.cwl.trim_end());
    }
}

/// The template as one document: a workflow whose steps `run:` other
/// files, or a packed (`$graph`) document, or one with `$import` /
/// `$include`, is loaded as the cwl-runner loads it (relative to its
/// file) and stored with those tools inline. Any other text is stored as
/// written.
fn self_contained(file: &std::path::Path, text: String) -> anyhow::Result<String> {
    let refers = text.contains("$graph")
        || text.contains("$import")
        || text.contains("$include")
        || text.lines().any(|l| {
            l.trim_start()
                .strip_prefix("run:")
                .is_some_and(|r| !r.trim().is_empty() && !r.trim().starts_with('{'))
        });
    if !refers {
        return Ok(text);
    }
    let loaded =
        caroni_cwl_exec::load(&file.to_string_lossy()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut process = loaded.process;
    strip_dirs(&mut process);
    serde_yaml_ng::to_string(&process).context("cannot write the template with its tools inline")
}

/// Removes the loader's `$dir` notes (where each tool's file was).
fn strip_dirs(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("$dir");
            m.values_mut().for_each(strip_dirs);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_dirs),
        _ => {}
    }
}

pub async fn template(ctx: &Context, cmd: TemplateCmd) -> anyhow::Result<ExitCode> {
    let mut client = ctx.manager().await?;
    match cmd {
        TemplateCmd::Add { name, file } => {
            let cwl = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the CWL file {}", file.display()))?;
            let cwl = self_contained(&file, cwl)?;
            let t = client
                .put_template(ctx.request(pb::PutTemplateRequest { name, cwl }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&template_json(&pb::Template {
                    cwl: String::new(),
                    ..t
                }));
            } else {
                say!("template {} registered ({} steps)", t.name, t.steps.len());
            }
        }
        TemplateCmd::List => {
            let all = client
                .list_templates(ctx.request(pb::ListTemplatesRequest {}))
                .await
                .map_err(status)?
                .into_inner()
                .templates;
            if ctx.format == Format::Json {
                output::json(&json!(all.iter().map(template_json).collect::<Vec<_>>()));
            } else {
                let mut table = output::table(&["name", "steps", "inputs", "outputs", "updated"]);
                for t in &all {
                    table.add_row(vec![
                        t.name.clone(),
                        t.steps.len().to_string(),
                        t.inputs.join(", "),
                        t.outputs.join(", "),
                        output::time(t.updated_at.as_ref()),
                    ]);
                }
                say!("{table}");
            }
        }
        TemplateCmd::Show { name } => {
            let t = client
                .get_template(ctx.request(pb::GetTemplateRequest { name }))
                .await
                .map_err(status)?
                .into_inner();
            print_template(ctx, &t);
        }
        TemplateCmd::Rm { name } => {
            client
                .delete_template(ctx.request(pb::DeleteTemplateRequest { name: name.clone() }))
                .await
                .map_err(status)?;
            if ctx.format == Format::Json {
                output::json(&json!({"removed": name}));
            } else {
                say!("template {name} removed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn job_type_json(j: &pb::JobType) -> serde_json::Value {
    caroni_node::api::json::job_type(j)
}

pub async fn job_type(ctx: &Context, cmd: JobTypeCmd) -> anyhow::Result<ExitCode> {
    let mut client = ctx.agent().await?;
    match cmd {
        JobTypeCmd::Add { file } => put_job_types(ctx, &mut client, &file, false).await?,
        JobTypeCmd::Update { file } => put_job_types(ctx, &mut client, &file, true).await?,
        JobTypeCmd::List => {
            let all = client
                .list_job_types(ctx.request(pb::ListJobTypesRequest {}))
                .await
                .map_err(status)?
                .into_inner()
                .job_types;
            if ctx.format == Format::Json {
                output::json(&json!(all.iter().map(job_type_json).collect::<Vec<_>>()));
            } else {
                let mut table =
                    output::table(&["name", "inputs", "outputs", "timeout", "price", "updated"]);
                for j in &all {
                    table.add_row(vec![
                        j.name.clone(),
                        j.inputs.join(", "),
                        j.outputs.join(", "),
                        format!("{} s", j.timeout_seconds),
                        caroni_node::api::json::price_text(j.price),
                        output::time(j.updated_at.as_ref()),
                    ]);
                }
                say!("{table}");
            }
        }
        JobTypeCmd::Show { name } => {
            let j = client
                .get_job_type(ctx.request(pb::GetJobTypeRequest { name }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&job_type_json(&j));
            } else {
                say!("job type {}", j.name);
                say!("inputs:  {}", j.inputs.join(", "));
                say!("outputs: {}", j.outputs.join(", "));
                say!("timeout: {} s", j.timeout_seconds);
                say!(
                    "price:   {} credits",
                    caroni_node::api::json::price_text(j.price)
                );
                if let Some(d) = &j.docker {
                    say!("executor: docker, image {} network {}", d.image, d.network);
                } else if let Some(s) = &j.slurm {
                    say!(
                        "executor: slurm, partition {} time limit {} in flight {}",
                        if s.partition.is_empty() {
                            "(default)"
                        } else {
                            &s.partition
                        },
                        if s.time_limit.is_empty() {
                            "(default)"
                        } else {
                            &s.time_limit
                        },
                        s.max_in_flight
                    );
                } else {
                    say!("executor: bash");
                }
                say!("max output: {} bytes", j.max_output_bytes);
                say!("updated: {}", output::time(j.updated_at.as_ref()));
                say!("--- body ---\n{}", j.body.trim_end());
            }
        }
        JobTypeCmd::Rm { name } => {
            client
                .delete_job_type(ctx.request(pb::DeleteJobTypeRequest { name: name.clone() }))
                .await
                .map_err(status)?;
            if ctx.format == Format::Json {
                output::json(&json!({"removed": name}));
            } else {
                say!("job type {name} removed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn put_job_types(
    ctx: &Context,
    client: &mut caroni_proto::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    file: &std::path::Path,
    replace: bool,
) -> anyhow::Result<()> {
    let defs = crate::jobtype_file::read(file)?;
    let mut stored = Vec::new();
    for def in defs {
        let name = def.name.clone();
        let j = client
            .put_job_type(ctx.request(pb::PutJobTypeRequest {
                job_type: Some(def),
                replace,
            }))
            .await
            .map_err(|e| status(e).context(format!("job type `{name}`")))?
            .into_inner();
        if ctx.format == Format::Table {
            say!(
                "job type {} {}",
                j.name,
                if replace { "updated" } else { "added" }
            );
        }
        stored.push(job_type_json(&j));
    }
    if ctx.format == Format::Json {
        output::json(&json!(stored));
    }
    Ok(())
}

/// `caroni version`: this CLI's version, and the node's when it answers.
pub async fn version(ctx: &Context) -> anyhow::Result<ExitCode> {
    let cli = env!("CARGO_PKG_VERSION");
    let node = match ctx.node_api().await {
        Ok(mut c) => c
            .get_info(ctx.request(pb::GetInfoRequest {}))
            .await
            .map(|i| i.into_inner().version)
            .map_err(|e| e.message().to_string()),
        Err(e) => Err(format!("{e:#}")),
    };
    if ctx.format == Format::Json {
        output::json(&serde_json::json!({
            "cli": cli,
            "node": node.as_ref().ok(),
            "node_error": node.as_ref().err(),
        }));
    } else {
        say!("caroni {cli}");
        match node {
            Ok(v) => say!("node {} {v}", ctx.url()),
            Err(e) => say!("node {}: not reachable ({e})", ctx.url()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `caroni status`: who the node is, whether it serves, its peers, its
/// workflows and jobs.
pub async fn node_status(ctx: &Context) -> anyhow::Result<ExitCode> {
    let mut api = ctx.node_api().await?;
    let info = api
        .get_info(ctx.request(pb::GetInfoRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    let stats = api
        .get_stats(ctx.request(pb::GetStatsRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    let peers = api
        .list_peers(ctx.request(pb::ListPeersRequest {}))
        .await
        .map_err(status)?
        .into_inner()
        .peers;
    let serving = ctx.serving().await.unwrap_or(false);
    let queued: u64 = peers.iter().map(|p| p.queued).sum();
    if ctx.format == Format::Json {
        output::json(&serde_json::json!({
            "node_id": info.node_id, "roles": info.roles, "version": info.version,
            "serving": serving, "peers": peers.len(), "outbox_queued": queued,
            "messages_sent": stats.messages_delivered, "requests_broadcast": stats.requests_published,
            "workflows": {"live": stats.workflows_live, "waiting": stats.workflows_waiting,
                "completed": stats.workflows_completed, "failed": stats.workflows_failed,
                "cancelled": stats.workflows_cancelled},
            "jobs": {"completed": stats.jobs_completed, "failed": stats.jobs_failed,
                "cancelled": stats.jobs_cancelled},
        }));
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "node {}  ({}; version {})",
        info.node_id,
        info.roles.join(", "),
        info.version
    );
    say!(
        "health: {}  peers: {}  messages queued for peers: {queued}",
        if serving { "serving" } else { "NOT serving" },
        peers.len()
    );
    if info.roles.iter().any(|r| r == "manager") {
        say!(
            "workflows: {} live ({} waiting for admission); since start {} completed, {} failed, {} cancelled",
            stats.workflows_live,
            stats.workflows_waiting,
            stats.workflows_completed,
            stats.workflows_failed,
            stats.workflows_cancelled
        );
    }
    if info.roles.iter().any(|r| r == "agent") {
        say!(
            "jobs since start: {} completed, {} failed, {} cancelled",
            stats.jobs_completed,
            stats.jobs_failed,
            stats.jobs_cancelled
        );
    }
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn node(ctx: &Context, cmd: NodeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCmd::Info => {
            let info = ctx
                .node_api()
                .await?
                .get_info(ctx.request(pb::GetInfoRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&caroni_node::api::json::node_info(&info));
            } else {
                let mut t = output::table(&["field", "value"]);
                t.add_row(vec!["node id".to_string(), info.node_id]);
                t.add_row(vec!["roles".to_string(), info.roles.join(", ")]);
                t.add_row(vec!["client API".to_string(), info.api_listen]);
                t.add_row(vec!["peer endpoint".to_string(), info.peer_endpoint]);
                t.add_row(vec!["p2p listen".to_string(), info.p2p_listen.join(", ")]);
                t.add_row(vec!["version".to_string(), info.version]);
                t.add_row(vec!["data dir".to_string(), info.data_dir]);
                say!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `caroni ledger`: balances per peer and the newest entries of each
/// chain.
pub async fn ledger(
    ctx: &Context,
    role: Option<String>,
    peer: Option<String>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let api = ctx.node_api().await?;
    let role = role.unwrap_or_default();
    let ask = |peer: String, limit: u32| {
        let req = ctx.request(pb::GetLedgerRequest {
            role: role.clone(),
            peer,
            limit,
        });
        let mut api = api.clone();
        async move {
            api.get_ledger(req)
                .await
                .map_err(status)
                .map(|r| r.into_inner())
        }
    };
    // A peer given by a prefix: resolved among the peers with receipts.
    let peer = match peer {
        None => String::new(),
        Some(p) => {
            let all = ask(String::new(), 1).await?;
            let mut ids: Vec<String> = all
                .chains
                .iter()
                .flat_map(|c| c.balances.iter().map(|b| b.peer.clone()))
                .filter(|id| id.starts_with(&p))
                .collect();
            ids.sort();
            ids.dedup();
            match ids.len() {
                1 => ids.remove(0),
                0 => anyhow::bail!("no peer whose node id starts with {p} has receipts in this node's ledger; `caroni ledger` lists those that have"),
                n => anyhow::bail!("{n} peers' node ids start with {p}; give more of it"),
            }
        }
    };
    let ledger = ask(peer, limit).await?;
    let credits = caroni_types::market::credits;
    if ctx.format == Format::Json {
        output::json(&caroni_node::api::json::ledger(&ledger));
        return Ok(ExitCode::SUCCESS);
    }
    let mut broken = false;
    for c in &ledger.chains {
        let holds = if c.broken.is_empty() {
            "the chain holds".to_string()
        } else {
            broken = true;
            format!("THE CHAIN IS BROKEN: {}", c.broken)
        };
        let owed = if c.role == "agent" {
            "receipts this node issued for jobs it ran (owed to it)"
        } else {
            "receipts this node received for jobs it placed (owed by it)"
        };
        say!("{} ledger: {owed}", c.role);
        say!(
            "  {} entries; {holds}{}",
            c.entries,
            if c.head_hash.is_empty() {
                String::new()
            } else {
                format!(" (head {})", &c.head_hash[..c.head_hash.len().min(16)])
            }
        );
        if c.balances.is_empty() {
            say!("  no receipts yet");
            continue;
        }
        let mut t = output::table(&["peer", "countersigned", "disputed", "open"]);
        let ids: Vec<&str> = c.balances.iter().map(|b| b.peer.as_str()).collect();
        let short = output::unique_prefixes(&ids, 16);
        for (b, id) in c.balances.iter().zip(short) {
            t.add_row(vec![
                id,
                format!("{} ({} credits)", b.agreed, credits(b.agreed_milli)),
                format!("{} ({} credits)", b.disputed, credits(b.disputed_milli)),
                format!("{} ({} credits)", b.open, credits(b.open_milli)),
            ]);
        }
        say!("{t}");
        let mut t = output::table(&["seq", "peer", "entry", "job", "charge", "detail"]);
        let ids: Vec<&str> = c.recent.iter().map(|e| e.peer.as_str()).collect();
        let short = output::unique_prefixes(&ids, 16);
        let jobs: Vec<&str> = c.recent.iter().map(|e| e.job_id.as_str()).collect();
        let jobs = output::unique_prefixes(&jobs, 8);
        for ((e, id), job) in c.recent.iter().zip(short).zip(jobs) {
            let (charge, detail) = match &e.receipt {
                Some(r) => (
                    credits(r.charge_milli),
                    format!(
                        "{} {}, ran {:.1} s{}",
                        r.job_type,
                        match pb::JobState::try_from(r.state) {
                            Ok(pb::JobState::Completed) => "completed",
                            Ok(pb::JobState::Failed) => "failed",
                            _ => "cancelled",
                        },
                        r.wall_ms as f64 / 1000.0,
                        r.cpu_ms
                            .map(|c| format!(", CPU {:.2} s", c as f64 / 1000.0))
                            .unwrap_or_default()
                    ),
                ),
                None => (String::new(), output::clean(&e.reason).to_string()),
            };
            t.add_row(vec![
                e.seq.to_string(),
                id,
                e.kind.clone(),
                job,
                charge,
                detail,
            ]);
        }
        say!("{t}");
    }
    if ledger.chains.is_empty() {
        say!("this node keeps no ledger: it is neither a manager nor an agent");
    }
    Ok(if broken {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
