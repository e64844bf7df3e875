//! Shell completion that knows the node: subcommands and flags from the
//! command's definitions, and template names, job type names, workflow
//! ids and job ids asked of the node at completion time.
//!
//! `caroni completions bash|zsh|fish|elvish|powershell` prints a small
//! registration script; at each TAB the shell runs `caroni` again with
//! `COMPLETE=<shell>` and the words typed so far (clap_complete's dynamic
//! completion). The node is `CARONI_NODE` (or the default, as for every
//! command) with `CARONI_TOKEN`; a node that does not answer within a
//! second gives no candidates, never an error on the terminal.

use std::ffi::OsStr;
use std::time::Duration;

use caroni_proto::v1 as pb;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};

use crate::client::Context;
use crate::output::Format;

/// Longest a completion waits for the node.
const ASK_LIMIT: Duration = Duration::from_secs(1);

/// What to complete.
#[derive(Clone, Copy)]
enum Kind {
    Template,
    JobType,
    Workflow,
    Job,
}

fn ask(kind: Kind, current: &OsStr) -> Vec<CompletionCandidate> {
    let typed = current.to_string_lossy().to_string();
    let node = std::env::var("CARONI_NODE").unwrap_or_else(|_| crate::DEFAULT_NODE.to_string());
    let token = std::env::var("CARONI_TOKEN").ok().filter(|t| !t.is_empty());
    let ctx = Context::new(node, token, Format::Table)
        .with_tls_ca(std::env::var_os("CARONI_TLS_CA").map(Into::into));
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let found = rt.block_on(async {
        tokio::time::timeout(ASK_LIMIT, candidates(&ctx, kind, &typed))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    });
    found
        .into_iter()
        .filter(|(value, _)| value.starts_with(&typed))
        .map(|(value, help)| CompletionCandidate::new(value).help(Some(help.into())))
        .collect()
}

/// Values with a word of help each.
async fn candidates(
    ctx: &Context,
    kind: Kind,
    typed: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    Ok(match kind {
        Kind::Template => {
            let mut c = ctx.manager().await?;
            c.list_templates(ctx.request(pb::ListTemplatesRequest {}))
                .await?
                .into_inner()
                .templates
                .into_iter()
                .map(|t| (t.name, format!("{} step(s)", t.steps.len())))
                .collect()
        }
        Kind::JobType => {
            let mut c = ctx.agent().await?;
            c.list_job_types(ctx.request(pb::ListJobTypesRequest {}))
                .await?
                .into_inner()
                .job_types
                .into_iter()
                .map(|j| (j.name, format!("{} input(s)", j.inputs.len())))
                .collect()
        }
        Kind::Workflow => {
            let mut c = ctx.manager().await?;
            // Whole hex digits only: the API takes a prefix of an even or
            // odd length; anything else lists the newest.
            let prefix = if typed.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                typed.to_string()
            } else {
                String::new()
            };
            c.list_workflows(ctx.request(pb::ListWorkflowsRequest {
                limit: 50,
                id_prefix: prefix,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .workflows
            .into_iter()
            .map(|w| (w.id, format!("{} {}", w.template, w.state)))
            .collect()
        }
        Kind::Job => {
            let mut c = ctx.agent().await?;
            c.list_jobs(ctx.request(pb::ListJobsRequest {
                limit: 100,
                ..Default::default()
            }))
            .await?
            .into_inner()
            .jobs
            .into_iter()
            .map(|j| (j.id, format!("{} {}", j.job_type, j.state)))
            .collect()
        }
    })
}

/// Completes template names.
pub fn templates() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| ask(Kind::Template, c))
}

/// Completes job type names.
pub fn job_types() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| ask(Kind::JobType, c))
}

/// Completes workflow ids.
pub fn workflows() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| ask(Kind::Workflow, c))
}

/// Completes job ids.
pub fn jobs() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| ask(Kind::Job, c))
}

/// Prints the registration script of `shell`.
pub fn registration(shell: &str) -> anyhow::Result<()> {
    let shells = clap_complete::env::Shells::builtins();
    let Some(completer) = shells.completer(shell) else {
        anyhow::bail!(
            "no completion for shell `{shell}`; choose one of: {}",
            shells.names().collect::<Vec<_>>().join(", ")
        );
    };
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
        .unwrap_or_else(|| "caroni".into());
    completer.write_registration("COMPLETE", "caroni", "caroni", &me, &mut std::io::stdout())?;
    Ok(())
}
