//! `caroni workflow logs` and `caroni job logs`: jobs' stdout and stderr,
//! read on demand from the agents that ran them.
//!
//! One step (or a workflow of one step): its bytes as the job wrote them,
//! stdout to stdout and stderr to stderr, as `docker logs` does. Several
//! steps: each line prefixed with its step (`step | line`). With
//! `--follow`, the logs stream while jobs run; without `--step`, steps are
//! followed as they reach agents, until the workflow has ended. With
//! `-o json`, one JSON line per piece.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use caroni_proto::v1 as pb;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::client::{status, Context};
use crate::output::Format;

/// What one call asks.
pub struct LogsArgs {
    pub id: String,
    pub step: Option<String>,
    pub attempt: u32,
    pub follow: bool,
    pub stream: Option<String>,
}

/// A piece to print, from one step.
struct Piece {
    step: String,
    attempt: u32,
    stream: String,
    data: Vec<u8>,
}

/// Whole lines per step and stream, each printed with its step's prefix.
#[derive(Default)]
struct Lines {
    partial: HashMap<(String, String), Vec<u8>>,
}

impl Lines {
    fn push(&mut self, p: &Piece) {
        let buf = self
            .partial
            .entry((p.step.clone(), p.stream.clone()))
            .or_default();
        buf.extend_from_slice(&p.data);
        if let Some(end) = buf.iter().rposition(|b| *b == b'\n') {
            let whole: Vec<u8> = buf.drain(..=end).collect();
            emit_lines(&p.step, &p.stream, &whole);
        }
    }

    fn flush(&mut self) {
        for ((step, stream), rest) in self.partial.drain() {
            if !rest.is_empty() {
                emit_lines(&step, &stream, &rest);
            }
        }
    }
}

fn emit_lines(step: &str, stream: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(&format!("{step} | {line}\n"));
    }
    write_raw(stream, out.as_bytes());
}

fn write_raw(stream: &str, bytes: &[u8]) {
    if stream == "stdout" {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(bytes);
        let _ = o.flush();
    } else {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(bytes);
        let _ = e.flush();
    }
}

fn emit_json(p: &Piece) {
    say!(
        "{}",
        json!({
            "step": p.step,
            "attempt": p.attempt,
            "stream": p.stream,
            "text": String::from_utf8_lossy(&p.data),
        })
    );
}

/// Streams one attempt's logs into `tx`.
async fn pump(
    ctx: &Context,
    workflow: String,
    step: String,
    attempt: u32,
    follow: bool,
    stream: String,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Piece>>,
) {
    let run = async {
        let mut client = ctx.manager().await?;
        let mut chunks = client
            .get_logs(ctx.request(pb::GetLogsRequest {
                workflow_id: workflow,
                step,
                attempt,
                stream,
                follow,
            }))
            .await
            .map_err(status)?
            .into_inner();
        while let Some(c) = chunks.next().await {
            let c = c.map_err(status)?;
            let piece = Piece {
                step: c.step,
                attempt: c.attempt,
                stream: c.stream,
                data: c.data,
            };
            if tx.send(Ok(piece)).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    };
    if let Err(e) = run.await {
        let _ = tx.send(Err(e)).await;
    }
}

/// `caroni workflow logs`.
pub async fn workflow_logs(ctx: &Context, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut client = ctx.manager().await?;
    let w = client
        .get_workflow(ctx.request(pb::GetWorkflowRequest {
            workflow_id: a.id.clone(),
        }))
        .await
        .map_err(status)?
        .into_inner();
    let stream = a.stream.clone().unwrap_or_default();
    let json = ctx.format == Format::Json;
    let one = a.step.clone().or_else(|| match w.steps.as_slice() {
        [only] => Some(only.id.clone()),
        _ => None,
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Piece>>(64);
    if let Some(step) = one {
        // One step: its bytes as they were written.
        let t = tx.clone();
        let (id, follow) = (w.id.clone(), a.follow);
        let reading = pump(ctx, id, step, a.attempt, follow, stream, t);
        drop(tx);
        let printing = async {
            while let Some(p) = rx.recv().await {
                let p = p?;
                if json {
                    emit_json(&p);
                } else {
                    write_raw(&p.stream, &p.data);
                }
            }
            anyhow::Ok(())
        };
        let ((), printed) = tokio::join!(reading, printing);
        printed?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.attempt != 0 {
        anyhow::bail!(
            "--attempt needs --step: workflow {} has {} steps",
            w.id,
            w.steps.len()
        );
    }
    // Several steps: each line with its step; followed, new steps join as
    // they reach agents until the workflow has ended.
    let mut lines = Lines::default();
    let mut started: BTreeSet<String> = BTreeSet::new();
    let mut readers = tokio::task::JoinSet::new();
    let mut current = w;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut failures = Vec::new();
    let mut take = |p: anyhow::Result<Piece>, lines: &mut Lines| match p {
        Ok(p) if json => emit_json(&p),
        Ok(p) => lines.push(&p),
        Err(e) => failures.push(e),
    };
    if !a.follow {
        // Read once, step after step in the workflow's order.
        for s in &current.steps {
            if !s.attempt_history.iter().any(|x| !x.job_id.is_empty()) {
                continue;
            }
            started.insert(s.id.clone());
            let (t, mut r) = tokio::sync::mpsc::channel(64);
            let reading = pump(
                ctx,
                current.id.clone(),
                s.id.clone(),
                0,
                false,
                stream.clone(),
                t,
            );
            let printing = async {
                while let Some(p) = r.recv().await {
                    take(p, &mut lines);
                }
            };
            tokio::join!(reading, printing);
            lines.flush();
        }
    }
    if a.follow {
        loop {
            for s in &current.steps {
                let placed = s.attempt_history.iter().any(|x| !x.job_id.is_empty());
                if placed && started.insert(s.id.clone()) {
                    let (c, t) = (ctx.clone(), tx.clone());
                    let (id, step, follow, st) =
                        (current.id.clone(), s.id.clone(), a.follow, stream.clone());
                    readers.spawn(async move { pump(&c, id, step, 0, follow, st, t).await });
                }
            }
            let ended = matches!(current.state.as_str(), "completed" | "failed" | "cancelled");
            let waiting = a.follow && !ended;
            if readers.is_empty() && !waiting {
                // Every reader sent all it read before it ended.
                while let Ok(p) = rx.try_recv() {
                    take(p, &mut lines);
                }
                break;
            }
            tokio::select! {
                Some(p) = rx.recv() => take(p, &mut lines),
                _ = tick.tick(), if waiting => {
                    current = client
                        .get_workflow(ctx.request(pb::GetWorkflowRequest {
                            workflow_id: current.id.clone(),
                        }))
                        .await
                        .map_err(status)?
                        .into_inner();
                },
                Some(_) = readers.join_next() => {},
            }
        }
    }
    lines.flush();
    if started.is_empty() && !json {
        tell!(
            "caroni: no step of workflow {} has had a job yet: no logs (the steps of a scatter or a sub-workflow run in element workflows, which `caroni workflow show` names)",
            current.id
        );
    }
    for e in &failures {
        tell!("caroni: {e:#}");
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `caroni job logs` (on the agent that holds the job).
pub async fn job_logs(
    ctx: &Context,
    id: String,
    follow: bool,
    stream: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut client = ctx.agent().await?;
    let mut chunks = client
        .get_job_logs(ctx.request(pb::GetJobLogsRequest {
            job_id: id,
            stream: stream.unwrap_or_default(),
            follow,
        }))
        .await
        .map_err(status)?
        .into_inner();
    while let Some(c) = chunks.next().await {
        let c = c.map_err(status)?;
        if ctx.format == Format::Json {
            say!(
                "{}",
                json!({"stream": c.stream, "text": String::from_utf8_lossy(&c.data)})
            );
        } else {
            write_raw(&c.stream, &c.data);
        }
    }
    Ok(ExitCode::SUCCESS)
}
