//! Workflows: run, list, show, watch, cancel; jobs; peers.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use caroni_proto::v1 as pb;
use clap::Subcommand;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::client::{status, Context};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// List workflows users started, newest first, filtered and paged.
    #[command(
        after_help = "Examples:\n  caroni workflow list --limit 20\n  caroni workflow list --state failed,cancelled --since 2h\n  caroni workflow list --template test_simple --page 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d"
    )]
    List {
        /// At most this many (a page).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only workflows in these states (comma-separated): created,
        /// initializing, running, stalled, completed, failed, cancelled.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Only workflows of this template.
        #[arg(long, add = crate::complete::templates())]
        template: Option<String>,
        /// Only workflows created within this long (2h, 3d) or since this
        /// instant (RFC 3339, e.g. 2026-12-03T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only workflows whose id starts with this.
        #[arg(long)]
        id: Option<String>,
        /// Go on from a page: the token the previous page printed.
        #[arg(long)]
        page: Option<String>,
    },
    /// Resume a failed or cancelled workflow from its unfinished steps;
    /// completed steps keep their outputs.
    #[command(after_help = "Example:\n  caroni workflow retry 0190f5c2 --wait")]
    Retry {
        /// Workflow id (or a unique prefix).
        #[arg(add = crate::complete::workflows())]
        id: String,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Start a new workflow with the same template and inputs, some
    /// replaced (name=value).
    #[command(
        after_help = "Example:\n  caroni workflow rerun 0190f5c2 start_message=again --wait"
    )]
    Rerun {
        /// Workflow id (or a unique prefix).
        #[arg(add = crate::complete::workflows())]
        id: String,
        /// Inputs to replace, as name=value (name=@path uploads a file).
        inputs: Vec<String>,
        /// Follow the new workflow until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Delete an ended workflow and everything kept of it.
    #[command(after_help = "Example:\n  caroni workflow delete 0190f5c2")]
    Delete {
        /// Workflow id (or a unique prefix).
        #[arg(add = crate::complete::workflows())]
        id: String,
    },
    /// Show a workflow: steps with state, attempts, job and agent; dataflows with values.
    #[command(
        after_help = "Example:\n  caroni workflow show 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d"
    )]
    Show {
        /// Workflow id.
        #[arg(add = crate::complete::workflows())]
        id: String,
    },
    /// Follow a workflow until it ends, or every workflow (--all). With
    /// -o json, one JSON line per change.
    #[command(
        after_help = "Examples:\n  caroni workflow watch 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d\n  caroni -o json workflow watch 0190f5c2 | jq -c '.steps[] | {id, state}'\n  caroni workflow watch --all            # every change of every workflow, until interrupted"
    )]
    Watch {
        /// Workflow id (or a unique prefix).
        #[arg(required_unless_present = "all", conflicts_with = "all", add = crate::complete::workflows())]
        id: Option<String>,
        /// Every change of every workflow on the manager, one line each,
        /// until interrupted.
        #[arg(long)]
        all: bool,
    },
    /// Cancel a workflow: every live job is killed.
    #[command(
        after_help = "Example:\n  caroni workflow cancel 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d"
    )]
    Cancel {
        /// Workflow id.
        #[arg(add = crate::complete::workflows())]
        id: String,
    },
    /// Print the stdout and stderr of a workflow's jobs, read from the
    /// agents that ran them (each keeps them whole up to its
    /// --job-log-bytes, 16 MiB by default).
    #[command(
        after_help = "One step (or a workflow of one step) prints its logs as the job wrote them: stdout to stdout, stderr to stderr. Several steps print each line as `step | line`. The steps of a scatter or a sub-workflow are in its element workflows: `caroni workflow show` names them.\n\nExamples:\n  caroni workflow logs 0190f5c2                      # every step's latest attempt\n  caroni workflow logs 0190f5c2 --step countwords --attempt 1\n  caroni workflow logs 0190f5c2 --step countwords -f  # follow while it runs\n  caroni workflow logs 0190f5c2 --stream stderr 2>&1 | less"
    )]
    Logs {
        /// Workflow id (or a unique prefix).
        #[arg(add = crate::complete::workflows())]
        id: String,
        /// Only this step.
        #[arg(long)]
        step: Option<String>,
        /// This attempt of the step (from 1); the latest by default.
        #[arg(long, default_value_t = 0)]
        attempt: u32,
        /// Keep streaming while jobs run; without --step, until the
        /// workflow has ended.
        #[arg(short, long)]
        follow: bool,
        /// Only stdout or only stderr.
        #[arg(long, value_parser = ["stdout", "stderr"])]
        stream: Option<String>,
    },
    /// Download a workflow's File outputs (streamed, resumed, checked).
    #[command(
        after_help = "Examples:\n  caroni workflow download 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d\n  caroni workflow download 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d counts --to counts.txt\n(-o is the output format, as everywhere: -o json prints what was written.)"
    )]
    Download {
        /// Workflow id.
        #[arg(add = crate::complete::workflows())]
        id: String,
        /// Only this output (all File outputs when not given).
        #[arg(value_name = "OUTPUT")]
        name: Option<String>,
        /// Write the file here (one file only).
        #[arg(long = "to", value_name = "PATH", conflicts_with = "outdir")]
        path: Option<std::path::PathBuf>,
        /// Write the files into this directory (created), each under its
        /// own name (a `File[]` output in a directory named after it).
        #[arg(long, default_value = ".")]
        outdir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// List the jobs this agent holds, newest first, filtered and paged.
    #[command(
        after_help = "Examples:\n  caroni job list\n  caroni job list --state failed,cancelled --type foojob1"
    )]
    List {
        /// At most this many (a page).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only jobs in these states (comma-separated): pending, queued,
        /// running, completed, failed, cancelled.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Only jobs of this job type.
        #[arg(long = "type")]
        job_type: Option<String>,
        /// Go on from a page: the token the previous page printed.
        #[arg(long)]
        page: Option<String>,
    },
    /// Print a job's stdout and stderr as this agent keeps them.
    #[command(
        after_help = "Examples:\n  caroni job logs 0190f5c2\n  caroni job logs 0190f5c2 -f --stream stderr"
    )]
    Logs {
        /// Job id (or a unique prefix).
        #[arg(add = crate::complete::jobs())]
        id: String,
        /// Keep streaming until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Only stdout or only stderr.
        #[arg(long, value_parser = ["stdout", "stderr"])]
        stream: Option<String>,
    },
    /// Show one job with its inputs, outputs, exit status and stderr.
    #[command(after_help = "Example:\n  caroni job show 0190f5c2-7d1e-7a8b-9c3d-2e4f5a6b7c8d")]
    Show {
        /// Job id.
        #[arg(add = crate::complete::jobs())]
        id: String,
    },
}

/// Reads a CWL job file (YAML or JSON: input id → value) as inputs:
/// strings and numbers as text, a File (`class: File` with a `path` or
/// `location`) as `@path` (uploaded), a list of Files as `@a,@b`, anything
/// else as JSON.
pub fn inputs_file(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read inputs file {}", path.display()))?;
    let doc: serde_json::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a YAML or JSON job file ({e}); write `input_id: value` lines",
            path.display()
        )
    })?;
    let serde_json::Value::Object(map) = doc else {
        bail!(
            "{}: a job file is a mapping of input id to value (`name: value`)",
            path.display()
        );
    };
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let file_of = |v: &serde_json::Value| -> Option<String> {
        let o = v.as_object()?;
        if o.get("class")?.as_str()? != "File" {
            return None;
        }
        let p = o
            .get("path")
            .or_else(|| o.get("location"))?
            .as_str()?
            .trim_start_matches("file://");
        Some(format!("@{}", base.join(p).display()))
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let text = match &v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => "null".into(),
            serde_json::Value::Array(items)
                if !items.is_empty() && items.iter().all(|i| file_of(i).is_some()) =>
            {
                items
                    .iter()
                    .filter_map(file_of)
                    .collect::<Vec<_>>()
                    .join(",")
            }
            other => file_of(other).unwrap_or_else(|| other.to_string()),
        };
        out.insert(k, text);
    }
    Ok(out)
}

/// Parses `key=value` arguments.
pub fn parse_inputs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            bail!(
                "`{a}` is not an input; write inputs as name=value, e.g. start_message=caronirocks"
            );
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `--since`: a duration back from now (2h, 3d) or an RFC 3339 instant.
fn since_timestamp(s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let at = match humantime::parse_duration(s.trim()) {
        Ok(d) => std::time::SystemTime::now()
            .checked_sub(d)
            .context("--since reaches before 1970")?,
        Err(_) => humantime::parse_rfc3339_weak(s.trim()).map_err(|_| {
            anyhow::anyhow!(
                "--since `{s}` is neither a duration (2h, 3d) nor an instant (2026-12-03T10:00:00Z)"
            )
        })?,
    };
    Ok(prost_types::Timestamp::from(at))
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    output::time(t.as_ref())
}

pub fn workflow_json(w: &pb::Workflow) -> serde_json::Value {
    caroni_node::api::json::workflow(w)
}

/// A node id as tables print it: its first 16 characters (node ids share
/// their first 8, `12D3KooW`), a prefix that can be typed back.
fn short(id: &str) -> String {
    output::unique_prefixes(&[id], 16).remove(0)
}

fn print_workflow(w: &pb::Workflow) {
    say!(
        "workflow {}  template {}  state {}",
        w.id,
        w.template,
        w.state
    );
    if !w.message.is_empty() {
        say!("message: {}", w.message);
    }
    let mut t = output::table(&[
        "step", "job type", "state", "attempts", "job", "agent", "runs on",
    ]);
    let jobs: Vec<&str> = w.steps.iter().map(|s| s.job_id.as_str()).collect();
    let jobs = output::unique_prefixes(&jobs, 8);
    let agents: Vec<&str> = w.steps.iter().map(|s| s.agent.as_str()).collect();
    let agents = output::unique_prefixes(&agents, 12);
    for (n, s) in w.steps.iter().enumerate() {
        // Where the current attempt runs, as its agent reported.
        let runs_on = s
            .attempt_history
            .last()
            .map(|a| match (a.executor.as_str(), a.external_id.as_str()) {
                ("slurm", id) if !id.is_empty() => format!("slurm job {id}"),
                ("docker", id) if !id.is_empty() => format!("docker {id}"),
                (e, _) => e.to_string(),
            })
            .unwrap_or_default();
        t.add_row(vec![
            s.id.clone(),
            s.job_type.clone(),
            s.state.clone(),
            s.attempts.to_string(),
            jobs[n].clone(),
            agents[n].clone(),
            runs_on,
        ]);
    }
    say!("{t}");
    let mut d = output::table(&["source", "destination", "value"]);
    for f in &w.dataflows {
        d.add_row(vec![
            f.source.clone(),
            f.destination.clone(),
            f.value
                .as_deref()
                .map(crate::files::show_value)
                .unwrap_or_else(|| "—".into()),
        ]);
    }
    say!("{d}");
    let failed: Vec<_> = w
        .steps
        .iter()
        .flat_map(|s| s.attempt_history.iter().map(move |a| (s, a)))
        .filter(|(_, a)| a.state == "failed")
        .collect();
    if !failed.is_empty() {
        let mut a = output::table(&["step", "job", "agent", "exit", "error", "stderr (tail)"]);
        for (s, at) in failed {
            let tail: String = at
                .stderr_tail
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            a.add_row(vec![
                s.id.clone(),
                output::unique_prefixes(&[&at.job_id], 13).remove(0),
                short(&at.agent),
                at.exit_status
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "—".into()),
                at.message.clone(),
                tail,
            ]);
        }
        say!("failed attempts:\n{a}");
    }
    for s in &w.steps {
        if let Some(line) = blocked_line(s) {
            say!("step {}: {line}", s.id);
        }
    }
    let declines: Vec<_> = w
        .steps
        .iter()
        .flat_map(|s| s.declines.iter().map(move |d| (s, d)))
        .collect();
    if !declines.is_empty() {
        let mut t = output::table(&["step", "agent", "declined because"]);
        for (s, d) in declines {
            t.add_row(vec![s.id.clone(), d.agent.clone(), d.reason.clone()]);
        }
        say!("declines:\n{t}");
    }
    print_outputs(w);
}

/// One line per dynamic step: its elements by state.
fn elements_line(s: &pb::WorkflowStep) -> Option<String> {
    let e = s.elements.as_ref()?;
    let what = if s.subworkflow { "sub-workflow" } else { "job" };
    Some(if e.scatter {
        format!(
            "scatter of {} {what}s: {} completed, {} running, {} waiting, {} skipped, {} failed",
            e.total, e.completed, e.live, e.waiting, e.skipped, e.failed
        )
    } else if e.skipped > 0 {
        "skipped: its condition was false".into()
    } else {
        format!(
            "one {what}: {}",
            if e.completed > 0 {
                "completed"
            } else if e.failed > 0 {
                "failed"
            } else {
                "running"
            }
        )
    })
}

/// The steps of each sub-workflow a step runs, under it (one level per
/// `depth`), and the first elements of each scatter.
async fn print_subworkflows(ctx: &Context, w: &pb::Workflow, depth: usize) -> anyhow::Result<()> {
    if depth > 8 {
        return Ok(());
    }
    let pad = "  ".repeat(depth);
    let mut client = ctx.manager().await?;
    for s in &w.steps {
        let Some(line) = elements_line(s) else {
            continue;
        };
        say!("{pad}step {}: {line}", s.id);
        let scatter = s.elements.as_ref().is_some_and(|e| e.scatter);
        if scatter {
            for c in s.children.iter().take(5) {
                say!(
                    "{pad}  element {}: workflow {} {}",
                    c.index,
                    c.workflow_id,
                    c.state
                );
            }
            if s.children.len() > 5 {
                say!("{pad}  … `caroni workflow show ID` shows any element's workflow");
            }
        }
        if !s.subworkflow || scatter {
            continue;
        }
        let Some(c) = s.children.first() else {
            continue;
        };
        let child = client
            .get_workflow(ctx.request(pb::GetWorkflowRequest {
                workflow_id: c.workflow_id.clone(),
            }))
            .await
            .map_err(status)?
            .into_inner();
        for cs in &child.steps {
            say!(
                "{pad}  {}/{:<12} {:<10} {}",
                s.id,
                cs.id,
                cs.state,
                elements_line(cs).unwrap_or_else(|| cs.job_type.clone())
            );
        }
        Box::pin(print_subworkflows(ctx, &child, depth + 1)).await?;
    }
    Ok(())
}

fn print_outputs(w: &pb::Workflow) {
    let c = caroni_types::market::credits;
    if w.spent_milli > 0 || w.reserved_milli > 0 || w.budget_milli.is_some() {
        say!(
            "cost: {} credits spent, up to {} more reserved by running jobs",
            c(w.spent_milli),
            c(w.reserved_milli)
        );
    }
    if w.priority != 0 {
        say!("priority: {}", w.priority);
    }
    if let Some(b) = w.budget_milli {
        let allotted = if w.budget_allotted_milli > 0 {
            format!(
                ", {} given to element workflows",
                c(w.budget_allotted_milli)
            )
        } else {
            String::new()
        };
        say!(
            "budget: {} credits, {} left for new jobs{allotted}",
            c(b),
            c(w.budget_left_milli)
        );
    }
    if !w.outputs.is_empty() {
        say!("outputs:");
        let mut keys: Vec<_> = w.outputs.keys().collect();
        keys.sort();
        for k in keys {
            say!("  {k}: {}", crate::files::show_value(&w.outputs[k]));
        }
    }
}

fn progress_lines(w: &pb::Workflow) -> Vec<String> {
    let mut lines = vec![format!("workflow {} {}", w.id, w.state)];
    for s in &w.steps {
        let why = blocked_line(s);
        let agent = if s.agent.is_empty() {
            String::new()
        } else {
            format!(" on {}", short(&s.agent))
        };
        let tries = if s.attempts > 1 {
            format!(" (attempt {})", s.attempts)
        } else {
            String::new()
        };
        let what = elements_line(s).unwrap_or_else(|| s.job_type.clone());
        lines.push(format!(
            "  {:<12} {:<10} {what}{agent}{tries}",
            s.id, s.state
        ));
        if let Some(why) = why {
            lines.push(format!("    {why}"));
        }
    }
    lines
}

/// Why a step waits for an agent, or when it is tried again.
fn blocked_line(s: &pb::WorkflowStep) -> Option<String> {
    if !s.blocked.is_empty() {
        return Some(format!(
            "no agent can take it (since {}): {}",
            ts(&s.blocked_since),
            s.blocked
        ));
    }
    s.retry_at
        .as_ref()
        .map(|t| format!("tried again at {}", output::time(Some(t))))
}

/// Follows a workflow to its end: a live view on a terminal, one line per
/// change otherwise. Progress goes to stderr; returns the final workflow.
pub async fn follow(ctx: &Context, id: &str, quiet: bool) -> anyhow::Result<pb::Workflow> {
    follow_lines(ctx, id, quiet, false).await
}

/// [`follow`], printing each version as one JSON line on stdout when
/// `lines`.
async fn follow_lines(
    ctx: &Context,
    id: &str,
    quiet: bool,
    lines: bool,
) -> anyhow::Result<pb::Workflow> {
    let mut client = ctx.manager().await?;
    let mut stream = client
        .watch_workflow(ctx.request(pb::GetWorkflowRequest {
            workflow_id: id.to_string(),
        }))
        .await
        .map_err(status)?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut drawn = 0usize;
    let mut last_lines: Vec<String> = Vec::new();
    let mut last = None;
    while let Some(item) = stream.next().await {
        let w = item.map_err(status)?;
        if lines {
            println!("{}", workflow_json(&w));
        }
        if !quiet {
            let lines = progress_lines(&w);
            let mut err = std::io::stderr().lock();
            if tty {
                if drawn > 0 {
                    let _ = write!(err, "\x1b[{drawn}A\x1b[J");
                }
                for l in &lines {
                    let _ = writeln!(err, "{}", crate::output::clean(l));
                }
                drawn = lines.len();
            } else {
                for l in lines.iter().filter(|l| !last_lines.contains(l)) {
                    let _ = writeln!(err, "{}", crate::output::clean(l.trim_start()));
                }
            }
            last_lines = lines;
        }
        let done = matches!(w.state.as_str(), "completed" | "failed" | "cancelled");
        last = Some(w);
        if done {
            break;
        }
    }
    last.context("the node closed the watch before the workflow ended")
}

/// Every change of every workflow, one line each, until interrupted or
/// the node closes the stream.
async fn watch_all(ctx: &Context) -> anyhow::Result<ExitCode> {
    let mut client = ctx.manager().await?;
    let mut stream = client
        .watch_workflows(ctx.request(pb::WatchWorkflowsRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    while let Some(item) = stream.next().await {
        let c = item.map_err(status)?;
        if ctx.format == Format::Json {
            println!(
                "{}",
                json!({
                    "workflow_id": c.workflow_id, "state": c.state,
                    "created_at": ts(&c.created_at), "finished_at": ts(&c.finished_at),
                    "missed": c.missed,
                })
            );
        } else {
            if c.missed > 0 {
                say!("… {} change(s) missed (this reader was slow)", c.missed);
            }
            say!(
                "{}  {}  {}",
                output::time(Some(&prost_types::Timestamp::from(
                    std::time::SystemTime::now()
                ))),
                c.workflow_id,
                c.state
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(w: &pb::Workflow) -> ExitCode {
    if w.state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Tries of a submission: a lost answer is asked for again within about
/// 2 s (0.25 s, 0.5 s, 1 s apart); a manager that stays unavailable (a
/// full disk, say) is reported, not waited for.
const SUBMIT_TRIES: u32 = 4;

/// Submits a workflow with a request id of its own, trying again (the
/// same id: nothing is made twice) while the manager is unreachable or
/// slow to answer.
async fn submit(ctx: &Context, req: pb::RunWorkflowRequest) -> anyhow::Result<String> {
    let mut delay = std::time::Duration::from_millis(250);
    let mut tries = 0;
    loop {
        tries += 1;
        let answer = match ctx.manager().await {
            Ok(mut c) => c.run_workflow(ctx.request(req.clone())).await,
            Err(e) if tries < SUBMIT_TRIES => {
                tell!("caroni: {e:#}; trying again in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
                delay *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        match answer {
            Ok(r) => return Ok(r.into_inner().workflow_id),
            Err(e)
                if tries < SUBMIT_TRIES
                    && matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
            {
                tell!(
                    "caroni: {} ({}); trying again in {} ms with the same request id",
                    e.message(),
                    e.code(),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(status(e)),
        }
    }
}

/// What `caroni run` says of a workflow's priority and budget.
#[derive(Debug, Default)]
pub struct Spend {
    /// `--priority`.
    pub priority: Option<i32>,
    /// `--budget`, in thousandths of a credit.
    pub budget_milli: Option<u64>,
    /// `--fail-when-exhausted`.
    pub fail_when_exhausted: bool,
}

pub async fn run(
    ctx: &Context,
    template: String,
    inputs: Vec<String>,
    file: Option<std::path::PathBuf>,
    request_id: Option<String>,
    wait: bool,
    spend: Spend,
) -> anyhow::Result<ExitCode> {
    let mut all = match &file {
        Some(f) => inputs_file(f)?,
        None => BTreeMap::new(),
    };
    // name=value arguments win over the file.
    all.extend(parse_inputs(&inputs)?);
    crate::files::upload_inputs(ctx, &mut all).await?;
    let id = submit(
        ctx,
        pb::RunWorkflowRequest {
            template,
            inputs: all.into_iter().collect(),
            request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            priority: spend.priority,
            budget_milli: spend.budget_milli,
            fail_when_exhausted: spend.fail_when_exhausted,
        },
    )
    .await?;
    started(ctx, id, wait).await
}

/// Prints a started workflow's id, or follows it to its end.
async fn started(ctx: &Context, id: String, wait: bool) -> anyhow::Result<ExitCode> {
    if !wait {
        if ctx.format == Format::Json {
            output::json(&json!({"workflow_id": id}));
        } else {
            say!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.format == Format::Table {
        tell!("workflow {id} started");
    }
    let w = follow(ctx, &id, ctx.format == Format::Json).await?;
    if ctx.format == Format::Json {
        output::json(&workflow_json(&w));
    } else {
        if w.state != "completed" {
            tell!("workflow {} {}: {}", w.id, w.state, w.message);
        }
        print_outputs(&w);
    }
    Ok(exit_for(&w))
}

pub async fn workflow(ctx: &Context, cmd: WorkflowCmd) -> anyhow::Result<ExitCode> {
    let mut client = ctx.manager().await?;
    match cmd {
        WorkflowCmd::List {
            limit,
            state,
            template,
            since,
            id,
            page,
        } => {
            let created_after = since.as_deref().map(since_timestamp).transpose()?;
            let resp = client
                .list_workflows(ctx.request(pb::ListWorkflowsRequest {
                    limit,
                    states: state,
                    template: template.unwrap_or_default(),
                    created_after,
                    created_before: None,
                    page_token: page.unwrap_or_default(),
                    id_prefix: id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            if !resp.next_page_token.is_empty() && ctx.format == Format::Table {
                tell!(
                    "caroni: more match; the next page: --page {}",
                    resp.next_page_token
                );
            }
            let all = resp.workflows;
            if ctx.format == Format::Json {
                output::json(&json!(all.iter().map(workflow_json).collect::<Vec<_>>()));
            } else {
                let mut t = output::table(&[
                    "id",
                    "template",
                    "state",
                    "steps done",
                    "created",
                    "outputs",
                ]);
                let ids: Vec<&str> = all.iter().map(|w| w.id.as_str()).collect();
                let ids = output::unique_prefixes(&ids, 8);
                for (w, id) in all.iter().zip(ids) {
                    let done = w.steps.iter().filter(|s| s.state == "completed").count();
                    t.add_row(vec![
                        id,
                        w.template.clone(),
                        w.state.clone(),
                        format!("{done}/{}", w.steps.len()),
                        ts(&w.created_at),
                        w.outputs
                            .iter()
                            .map(|(k, v)| format!("{k}={}", crate::files::show_value(v)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]);
                }
                say!("{t}");
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Logs {
            id,
            step,
            attempt,
            follow,
            stream,
        } => {
            crate::logs::workflow_logs(
                ctx,
                crate::logs::LogsArgs {
                    id,
                    step,
                    attempt,
                    follow,
                    stream,
                },
            )
            .await
        }
        WorkflowCmd::Retry { id, wait } => {
            let w = client
                .retry_workflow(ctx.request(pb::GetWorkflowRequest { workflow_id: id }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Table {
                tell!("workflow {} resumed", w.id);
            }
            started(ctx, w.id, wait).await
        }
        WorkflowCmd::Rerun { id, inputs, wait } => {
            let mut inputs = parse_inputs(&inputs)?;
            crate::files::upload_inputs(ctx, &mut inputs).await?;
            let r = client
                .rerun_workflow(ctx.request(pb::RerunWorkflowRequest {
                    workflow_id: id,
                    inputs: inputs.into_iter().collect(),
                    request_id: uuid::Uuid::new_v4().to_string(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            started(ctx, r.workflow_id, wait).await
        }
        WorkflowCmd::Delete { id } => {
            let r = client
                .delete_workflow(ctx.request(pb::GetWorkflowRequest {
                    workflow_id: id.clone(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&json!({"deleted": r.deleted}));
            } else {
                say!("deleted {} workflow(s)", r.deleted);
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Show { id } => {
            let w = client
                .get_workflow(ctx.request(pb::GetWorkflowRequest { workflow_id: id }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&workflow_json(&w));
            } else {
                print_workflow(&w);
                print_subworkflows(ctx, &w, 1).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Watch { id: None, .. } => watch_all(ctx).await,
        WorkflowCmd::Watch { id: Some(id), .. } => {
            let json = ctx.format == Format::Json;
            let w = follow_lines(ctx, &id, json, json).await?;
            if !json {
                print_outputs(&w);
            }
            Ok(exit_for(&w))
        }
        WorkflowCmd::Download {
            id,
            name: output,
            path,
            outdir,
        } => {
            let w = client
                .get_workflow(ctx.request(pb::GetWorkflowRequest { workflow_id: id }))
                .await
                .map_err(status)?
                .into_inner();
            let mut files = crate::files::file_outputs(&w);
            if let Some(o) = &output {
                if !w.outputs.contains_key(o) {
                    bail!(
                        "workflow {} has no output `{o}` (yet); its outputs: {}",
                        w.id,
                        w.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                files.retain(|(k, _)| k == o);
                if files.is_empty() {
                    bail!("output `{o}` is not a File; `caroni workflow show` prints its value");
                }
            }
            if files.is_empty() {
                bail!(
                    "workflow {} has no File outputs (yet; it is {})",
                    w.id,
                    w.state
                );
            }
            let total: usize = files.iter().map(|(_, f)| f.len()).sum();
            if path.is_some() && total != 1 {
                bail!("--to names one file, but {total} are to be downloaded; use --outdir");
            }
            let mut written = Vec::new();
            for (name, refs) in &files {
                for f in refs {
                    let to = match &path {
                        Some(p) => p.clone(),
                        None if refs.len() > 1 => {
                            let d = outdir.join(name);
                            std::fs::create_dir_all(&d)
                                .with_context(|| format!("cannot create {}", d.display()))?;
                            d.join(&f.basename)
                        }
                        None => {
                            std::fs::create_dir_all(&outdir)
                                .with_context(|| format!("cannot create {}", outdir.display()))?;
                            outdir.join(&f.basename)
                        }
                    };
                    crate::files::download(ctx, f, &to).await.with_context(|| {
                        format!("output {name}: cannot download {}", f.basename)
                    })?;
                    written.push(json!({"output": name, "path": to.display().to_string(), "sha256": f.sha256, "size": f.size}));
                    if ctx.format == Format::Table {
                        say!(
                            "{name}: {} ({})",
                            to.display(),
                            caroni_types::file::human_bytes(f.size)
                        );
                    }
                }
            }
            if ctx.format == Format::Json {
                output::json(&json!(written));
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Cancel { id } => {
            let w = client
                .cancel_workflow(ctx.request(pb::GetWorkflowRequest { workflow_id: id }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&workflow_json(&w));
            } else {
                say!("workflow {} {}", w.id, w.state);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    caroni_node::api::json::job(j)
}

pub async fn job(ctx: &Context, cmd: JobCmd) -> anyhow::Result<ExitCode> {
    let mut client = ctx.agent().await?;
    match cmd {
        JobCmd::List {
            limit,
            state,
            job_type,
            page,
        } => {
            let resp = client
                .list_jobs(ctx.request(pb::ListJobsRequest {
                    limit,
                    states: state,
                    job_type: job_type.unwrap_or_default(),
                    page_token: page.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            if !resp.next_page_token.is_empty() && ctx.format == Format::Table {
                tell!(
                    "caroni: more may match; the next page: --page {}",
                    resp.next_page_token
                );
            }
            if resp.truncated {
                tell!("caroni: older jobs were left out to keep the answer under 3 MiB; ask for fewer with --limit");
            }
            let jobs = resp.jobs;
            if ctx.format == Format::Json {
                output::json(&json!(jobs.iter().map(job_json).collect::<Vec<_>>()));
            } else {
                let mut t =
                    output::table(&["id", "job type", "state", "manager", "created", "message"]);
                let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                let ids = output::unique_prefixes(&ids, 8);
                for (j, id) in jobs.iter().zip(ids) {
                    t.add_row(vec![
                        id,
                        j.job_type.clone(),
                        j.state.clone(),
                        short(&j.manager),
                        ts(&j.created_at),
                        j.message.clone(),
                    ]);
                }
                say!("{t}");
            }
        }
        JobCmd::Logs { id, follow, stream } => {
            return crate::logs::job_logs(ctx, id, follow, stream).await;
        }
        JobCmd::Show { id } => {
            let j = client
                .get_job(ctx.request(pb::GetJobRequest { job_id: id }))
                .await
                .map_err(status)?
                .into_inner();
            if ctx.format == Format::Json {
                output::json(&job_json(&j));
            } else {
                say!("job {}  type {}  state {}", j.id, j.job_type, j.state);
                say!("manager: {}", j.manager);
                match (j.executor.as_str(), j.external_id.as_str()) {
                    ("", _) => {}
                    ("slurm", id) if !id.is_empty() => say!("executor: slurm (Slurm job {id})"),
                    ("docker", id) if !id.is_empty() => {
                        say!("executor: docker (container {id})")
                    }
                    (e, _) => say!("executor: {e}"),
                }
                if let Some(c) = j.exit_status {
                    say!("exit status: {c}");
                }
                if !j.message.is_empty() {
                    say!("message: {}", j.message);
                }
                for (k, v) in &j.inputs {
                    say!("input  {k} = {v}");
                }
                for (k, v) in &j.outputs {
                    say!("output {k} = {v}");
                }
                if !j.stderr_tail.is_empty() {
                    say!("--- stderr (tail) ---\n{}", j.stderr_tail.trim_end());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn peers(ctx: &Context, node: Option<String>) -> anyhow::Result<ExitCode> {
    let mut peers = ctx
        .node_api()
        .await?
        .list_peers(ctx.request(pb::ListPeersRequest {}))
        .await
        .map_err(status)?
        .into_inner()
        .peers;
    if let Some(prefix) = node {
        peers.retain(|p| p.node_id.starts_with(&prefix));
        match peers.as_slice() {
            [] => bail!("no peer's node id starts with `{prefix}`; `caroni peers` lists them"),
            [_] => {}
            [a, b, ..] => bail!(
                "`{prefix}` is the start of {} node ids ({}, {}, …): give more of it",
                peers.len(),
                a.node_id,
                b.node_id
            ),
        }
    }
    if ctx.format == Format::Json {
        output::json(&json!(peers
            .iter()
            .map(caroni_node::api::json::peer)
            .collect::<Vec<_>>()));
    } else {
        let mut t = output::table(&[
            "node id",
            "p2p",
            "endpoint",
            "queued",
            "delivered",
            "dropped",
            "refused",
            "stream",
            "last error / refusal",
            "advertises",
        ]);
        for p in &peers {
            t.add_row(vec![
                p.node_id.clone(),
                if p.p2p_connected {
                    p.p2p_address.clone()
                } else {
                    "—".into()
                },
                p.endpoint.clone(),
                p.queued.to_string(),
                p.delivered.to_string(),
                p.dropped.to_string(),
                p.refused.to_string(),
                if p.stream_open {
                    "open".into()
                } else {
                    "closed".into()
                },
                if p.last_error.is_empty() {
                    p.last_refusal.clone()
                } else {
                    p.last_error.clone()
                },
                p.advert
                    .as_ref()
                    .map(caroni_node::api::json::advert_text)
                    .unwrap_or_else(|| "—".into()),
            ]);
        }
        say!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}
