//! `caroni cwl-runner [--outdir DIR] [--quiet] PROCESS.cwl [JOB]`: the
//! cwl-runner interface over a Caroni node. The process (a
//! CommandLineTool, run as a one-step workflow) goes to the manager as a
//! template; the job order's files are uploaded; an agent that runs CWL
//! tools (`--cwl-tools local`) runs it; the outputs come back into
//! `--outdir` and the output object is printed on stdout.
//!
//! The node is `--node`/`CARONI_NODE`, or else an embedded node with a
//! local agent (as `caroni demo`), on temporary storage.
//!
//! Exit status: 0 on success, 33 for a feature this runner does not have
//! (Workflows, ExpressionTools, requirements it does not know), 1 when the
//! process or its inputs are wrong or the run fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use caroni_cwl::Kind;
use caroni_cwl_exec::types::{from_text, Names};
use caroni_proto::v1 as pb;
use serde_json::{json, Map, Value};

use crate::client::{status, Context};
use crate::cwl_values;
use crate::output::Format;

/// Arguments, as cwltest and other drivers give them.
#[derive(Debug, clap::Args)]
pub struct CwlRunnerArgs {
    /// Where output files are written [default: the current directory].
    #[arg(long)]
    pub outdir: Option<PathBuf>,
    /// Print only the output object (no progress on stderr).
    #[arg(long)]
    pub quiet: bool,
    /// The CWL document (`file.cwl`, or `file.cwl#id` in a packed one).
    pub process: String,
    /// The job order (YAML or JSON): the input values.
    pub job: Option<PathBuf>,
}

/// Exit status for a feature this runner does not have.
const UNSUPPORTED: u8 = 33;

enum Outcome {
    Done(Value),
    Unsupported(String),
    Failed(String),
}

pub async fn cwl_runner(
    args: CwlRunnerArgs,
    node: Option<String>,
    token: Option<String>,
) -> anyhow::Result<ExitCode> {
    let outcome = match node {
        Some(url) => {
            let ctx = Context::new(url, token, Format::Json);
            run(&ctx, &args).await?
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("caroni-cwl-")
                .tempdir()
                .context("cannot create a temporary directory for the embedded node")?;
            let mut config = caroni_node::Config::embedded(dir.path().join("node"));
            config.cwl_tools = "local".into();
            let node = caroni_node::Node::start(config).await?;
            let ctx = Context::new(format!("http://{}", node.api_addr), None, Format::Json);
            let r = run(&ctx, &args).await;
            node.shutdown();
            let _ = node.wait().await;
            drop(dir);
            r?
        }
    };
    Ok(match outcome {
        Outcome::Done(v) => {
            println!("{}", caroni_cwl_exec::expr::output_json(&v));
            ExitCode::SUCCESS
        }
        Outcome::Unsupported(why) => {
            eprintln!("unsupported: {why}");
            ExitCode::from(UNSUPPORTED)
        }
        Outcome::Failed(why) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
    })
}

/// Each port of `process` under `key`: id, type, and what it carries
/// on the mesh.
fn ports(process: &Value, key: &str) -> Vec<(String, Value, Kind)> {
    process
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("id")?.as_str()?.to_string(),
                p.get("type").cloned().unwrap_or(json!("Any")),
                caroni_cwl::port_kind(p),
            ))
        })
        .collect()
}

/// Moves the File and Directory objects that `tool`'s
/// InitialWorkDirRequirement names by place (relative to its document)
/// into hidden inputs `caroni_doc_N` that the entries refer to; returns
/// each input with the object it stands for.
fn hoist_doc_files(tool: &mut Value, n: &mut usize) -> Vec<(String, Value)> {
    let placed = |v: &Value| {
        let mut found = false;
        let mut probe = v.clone();
        let _ = caroni_cwl_exec::files::visit_mut(&mut probe, &mut |f| {
            found |= f.get("location").is_some() || f.get("path").is_some();
            Ok(())
        });
        found
            && matches!(
                v.get("class").and_then(Value::as_str),
                Some("File" | "Directory")
            )
    };
    let mut hoisted = Vec::new();
    let Some(reqs) = tool.get_mut("requirements").and_then(Value::as_array_mut) else {
        return hoisted;
    };
    for r in reqs.iter_mut() {
        if r.get("class").and_then(Value::as_str) != Some("InitialWorkDirRequirement") {
            continue;
        }
        let Some(Value::Array(listing)) = r.get_mut("listing") else {
            continue;
        };
        // Entries, and the items of entries that are lists.
        let items = listing.iter_mut().flat_map(|e| match e {
            Value::Array(inner) => inner.iter_mut().collect::<Vec<_>>(),
            other => vec![other],
        });
        for e in items {
            let id = format!("caroni_doc_{n}");
            let reference = json!(format!("$(inputs.{id})"));
            let obj = if e.get("entry").is_some_and(&placed) {
                std::mem::replace(&mut e["entry"], reference)
            } else if placed(e) {
                std::mem::replace(e, json!({ "entry": reference }))
            } else {
                continue;
            };
            *n += 1;
            hoisted.push((id, obj));
        }
    }
    if let Some(Value::Array(inputs)) = tool.get_mut("inputs") {
        for (id, obj) in &hoisted {
            let class = obj.get("class").cloned().unwrap_or(json!("File"));
            inputs.push(json!({"id": id, "type": class}));
        }
    }
    hoisted
}

/// A placeholder for an upload.
fn upload_key(n: usize) -> String {
    format!("@@caroni-upload-{n}@@")
}

/// Finds, in `wf`'s steps at any depth, the values with files that the
/// documents name (a tool's File defaults, File and Directory entries of
/// InitialWorkDirRequirement, File defaults of step inputs): each becomes
/// a step input default holding a placeholder, listed in `uploads` with
/// the directory its places are relative to.
fn mark_uploads(
    wf: &mut Value,
    dir: &Path,
    hidden: &mut usize,
    uploads: &mut Vec<(String, Value, PathBuf)>,
) {
    let Some(Value::Array(steps)) = wf.get_mut("steps") else {
        return;
    };
    for s in steps.iter_mut() {
        let mut feeds = Vec::new();
        if let Some(run) = s.get_mut("run") {
            let doc_dir = run
                .get("$dir")
                .and_then(Value::as_str)
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.to_path_buf());
            if run.get("class").and_then(Value::as_str) == Some("Workflow") {
                mark_uploads(run, &doc_dir, hidden, uploads);
            } else {
                for (id, obj) in hoist_doc_files(run, hidden) {
                    feeds.push((id, obj, doc_dir.clone()));
                }
                for (id, d) in caroni_cwl_exec::load::defaults(run) {
                    if cwl_values::holds_files(&d) {
                        feeds.push((id, d, doc_dir.clone()));
                    }
                }
            }
        }
        let ins = s
            .as_object_mut()
            .map(|m| m.entry("in").or_insert_with(|| json!([])));
        let Some(Value::Array(ins)) = ins else {
            continue;
        };
        for (id, v, d) in feeds {
            let key = upload_key(uploads.len());
            match ins
                .iter_mut()
                .find(|i| i.get("id").and_then(Value::as_str) == Some(&id))
            {
                Some(i) if i.get("default").is_none() => i["default"] = json!(key),
                Some(_) => continue,
                None => ins.push(json!({"id": id, "default": key})),
            }
            uploads.push((key, v, d));
        }
        // File defaults of step inputs: the manager holds every file a
        // workflow reads.
        for i in ins.iter_mut() {
            let Some(d) = i.get("default").cloned() else {
                continue;
            };
            if !cwl_values::holds_files(&d) {
                continue;
            }
            let key = upload_key(uploads.len());
            i["default"] = json!(key);
            uploads.push((key, d, dir.to_path_buf()));
        }
    }
}

/// Puts each upload in the place of its placeholder.
fn fill_uploads(v: &mut Value, sent: &std::collections::HashMap<String, Value>) {
    match v {
        Value::String(s) => {
            if let Some(x) = sent.get(s.as_str()) {
                *v = x.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| fill_uploads(x, sent)),
        Value::Object(m) => m.values_mut().for_each(|x| fill_uploads(x, sent)),
        _ => {}
    }
}

/// The text a value travels as: a string as it is where its type reads
/// it back (`string`; not the string "null"), anything else as JSON.
fn value_text(ty: &Value, v: &Value, names: &Names) -> String {
    match v {
        // The text `null` is an absent value on the mesh: the string
        // "null" travels as JSON.
        Value::String(s) if s != "null" && from_text(ty, s, names).ok().as_ref() == Some(v) => {
            s.clone()
        }
        other => other.to_string(),
    }
}

async fn run(ctx: &Context, args: &CwlRunnerArgs) -> anyhow::Result<Outcome> {
    let loaded = match caroni_cwl_exec::load(&args.process) {
        Ok(l) => l,
        Err(e) => return Ok(Outcome::Failed(e.to_string())),
    };
    let (job, job_dir) = match caroni_cwl_exec::load::load_job(args.job.as_deref()) {
        Ok(j) => j,
        Err(e) => return Ok(Outcome::Failed(e.to_string())),
    };
    let tool = caroni_cwl_exec::run::with_job_requirements(&loaded.process, &job);
    match tool.get("class").and_then(Value::as_str) {
        Some("CommandLineTool" | "ExpressionTool") => {}
        Some("Workflow") => {}
        Some(other) => {
            return Ok(Outcome::Unsupported(format!(
            "running a {other} (only CommandLineTools and Workflows of them run on the mesh yet)"
        )))
        }
        None => return Ok(Outcome::Failed("the document has no `class`".into())),
    }
    let is_workflow = tool.get("class").and_then(Value::as_str) == Some("Workflow");
    if !is_workflow {
        if let Err(e) = caroni_cwl_exec::run::check_requirements(&tool) {
            return Ok(Outcome::Unsupported(e.to_string()));
        }
    }
    let names = Names::of(&tool);
    let scratch = tempfile::tempdir()?;

    // Inputs: files uploaded, other values as text (JSON unless a string).
    let mut inputs = std::collections::HashMap::new();
    let mut wf_inputs = Map::new();
    let mut step_in = Map::new();
    // The values given, for the output formats the runner computes.
    let mut given = Map::new();
    let defaults = caroni_cwl_exec::load::defaults(&tool);
    let secondary = caroni_cwl_exec::load::input_fields(&tool, "secondaryFiles");
    let mut sec_ev =
        caroni_cwl_exec::run::evaluator(&tool, caroni_cwl_exec::expr::Limits::default());
    sec_ev.set_inputs(job.clone());
    for (id, ty, kind) in ports(&tool, "inputs") {
        // A value of the job order, or a default of the tool that holds
        // files (their place is relative to the tool, which the agent
        // does not have).
        let (v, base) = match job.get(&id).filter(|v| !v.is_null()) {
            Some(v) => (v, job_dir.as_path()),
            None => match defaults.get(&id) {
                Some(d) if cwl_values::holds_files(d) || is_workflow => (d, loaded.dir.as_path()),
                _ if is_workflow => (&Value::Null, job_dir.as_path()),
                _ => continue,
            },
        };
        if v.is_null() {
            // An absent workflow input: null, which its steps' tools
            // read as "not given".
            // (`Any`: it may feed a port of any type.)
            wf_inputs.insert(id.clone(), json!({"type": "Any", "default": "null"}));
            continue;
        }
        // Secondary files the port's patterns name are found here, beside
        // their primary, as the reference runner does before a run.
        let mut local = v.clone();
        if cwl_values::holds_files(&local) {
            let _ = caroni_cwl_exec::files::visit_top_mut(&mut local, &mut |f| {
                caroni_cwl_exec::files::fill(f, base, false, None)
            });
            if let Some(Value::Array(patterns)) = secondary.get(&id) {
                let _ =
                    caroni_cwl_exec::run::add_secondary(&mut local, patterns, &mut sec_ev, false);
            }
            let _ = caroni_cwl_exec::run::add_field_secondary(
                &mut local,
                &ty,
                &names,
                &mut sec_ev,
                false,
            );
        }
        let sent = cwl_values::upload(ctx, &local, base, scratch.path(), &tool).await?;
        let text = value_text(&ty, &sent, &names);
        let wf_type = template_type(kind);
        // Workflow inputs get a prefix: a tool may name an input and an
        // output alike, a workflow may not.
        let wf_id = if is_workflow {
            id.clone()
        } else {
            format!("in_{id}")
        };
        wf_inputs.insert(wf_id.clone(), json!({ "type": wf_type }));
        step_in.insert(id.clone(), json!(wf_id));
        inputs.insert(wf_id, text);
        given.insert(id, v.clone());
    }
    let outputs = ports(&tool, "outputs");
    let mut wf_outputs = Map::new();
    for (id, _, kind) in &outputs {
        let t = template_type(*kind);
        wf_outputs.insert(
            id.clone(),
            json!({"type": t, "outputSource": format!("tool/{id}")}),
        );
    }
    let mut run_tool = tool.clone();
    if let Value::Object(m) = &mut run_tool {
        m.remove("cwlVersion");
        m.remove("$schemas");
    }
    if is_workflow
        && tool
            .get("steps")
            .and_then(Value::as_array)
            .is_none_or(|s| s.is_empty())
    {
        // Nothing to run: each output is a workflow input.
        return passthrough(&tool, &job, &job_dir, &loaded.dir, args);
    }
    // Files the documents name (a step tool's defaults, File and
    // Directory entries of InitialWorkDirRequirement) are uploaded and
    // given to the tool by its step: its agent has none of the documents'
    // directories.
    let doc_tool = tool.clone();
    let mut tool = tool;
    let mut hidden = 0;
    if is_workflow {
        // At any depth of sub-workflows: each placeholder stands for a
        // value with files that is uploaded, then put in its place.
        let mut uploads = Vec::new();
        mark_uploads(&mut tool, &loaded.dir, &mut hidden, &mut uploads);
        let mut sent = std::collections::HashMap::new();
        for (key, v, dir) in uploads {
            let up = cwl_values::upload(ctx, &v, &dir, scratch.path(), &doc_tool).await?;
            sent.insert(key, Value::String(up.to_string()));
        }
        fill_uploads(&mut tool, &sent);
    } else {
        for (id, v) in hoist_doc_files(&mut run_tool, &mut hidden) {
            let sent = cwl_values::upload(ctx, &v, &loaded.dir, scratch.path(), &doc_tool).await?;
            step_in.insert(id, json!({"default": sent.to_string()}));
        }
    }
    let template = if is_workflow {
        match workflow_template(&tool, wf_inputs) {
            Ok(mut t) => {
                run_once(&mut t);
                serde_yaml_ng::to_string(&t).context("cannot write the template")?
            }
            Err(why) => return Ok(Outcome::Unsupported(why)),
        }
    } else {
        let mut t = json!({
            "cwlVersion": "v1.2",
            "class": "Workflow",
            "inputs": wf_inputs,
            "outputs": wf_outputs,
            "steps": {
                "tool": {
                    "run": run_tool,
                    "in": step_in,
                    "out": outputs.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>(),
                }
            }
        });
        run_once(&mut t);
        serde_yaml_ng::to_string(&t).context("cannot write the template")?
    };
    let name = format!(
        "cwl_{}",
        &caroni_types::file::hex(&<sha2::Sha256 as sha2::Digest>::digest(template.as_bytes()))
            [..16]
    );
    let mut manager = ctx.manager().await?;
    match manager
        .put_template(ctx.request(pb::PutTemplateRequest {
            name: name.clone(),
            cwl: template,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            let why = s.message().to_string();
            return Ok(
                if why.contains("not supported") || why.contains("unsupported") {
                    Outcome::Unsupported(why)
                } else {
                    Outcome::Failed(why)
                },
            );
        }
        Err(s) => return Err(status(s)),
    }
    let id = match manager
        .run_workflow(ctx.request(pb::RunWorkflowRequest {
            template: name,
            inputs,
            request_id: String::new(),
            ..Default::default()
        }))
        .await
    {
        Ok(r) => r.into_inner().workflow_id,
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            return Ok(Outcome::Failed(s.message().to_string()))
        }
        Err(s) => return Err(status(s)),
    };
    let w = crate::workflow::follow(ctx, &id, args.quiet).await?;
    if w.state != "completed" {
        return Ok(Outcome::Failed(format!(
            "workflow {} {}: {}",
            w.id, w.state, w.message
        )));
    }

    // Outputs: files downloaded into --outdir, values read by their type.
    let outdir = outdir_of(args)?;
    // A File's `format` does not travel with it: the runner computes the
    // declared one from the inputs, as the tool would.
    let mut ev = caroni_cwl_exec::run::evaluator(&tool, caroni_cwl_exec::expr::Limits::default());
    let mut with_defaults = given.clone();
    for (k, d) in &defaults {
        with_defaults.entry(k.clone()).or_insert_with(|| d.clone());
    }
    ev.set_inputs(Value::Object(with_defaults));
    let formats: Map<String, Value> = tool
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get("id")?.as_str()?.to_string(), p.get("format")?.clone())))
        .collect();
    let mut result = Map::new();
    for (id, ty, _) in &outputs {
        let text = w.outputs.get(id).cloned().unwrap_or_else(|| "null".into());
        let v = if text == "null" {
            Value::Null
        } else {
            let read = from_text(ty, &text, &names).unwrap_or(Value::String(text));
            cwl_values::download(ctx, &read, &outdir).await?
        };
        let mut v = v;
        if let Some(f) = formats.get(id) {
            if let Ok(Value::String(f)) = ev.eval(f, &v) {
                let f = caroni_cwl_exec::run::expand_format(&tool, &f);
                let _ = caroni_cwl_exec::files::visit_mut(&mut v, &mut |file| {
                    file["format"] = Value::String(f.clone());
                    Ok(())
                });
            }
        }
        result.insert(id.clone(), v);
    }
    Ok(Outcome::Done(Value::Object(result)))
}

/// How a template declares a port that carries `kind`.
fn template_type(kind: Kind) -> Value {
    match kind {
        Kind::File => json!("File"),
        Kind::Files => json!({"type": "array", "items": "File"}),
        Kind::Data => json!("Any"),
        Kind::Value => json!("string"),
    }
}

/// `--outdir` (the current directory by default), created, absolute.
fn outdir_of(args: &CwlRunnerArgs) -> anyhow::Result<PathBuf> {
    let outdir = match &args.outdir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&outdir)
        .with_context(|| format!("cannot create --outdir {}", outdir.display()))?;
    Ok(std::path::absolute(&outdir)?)
}

/// A workflow without steps: its outputs are its inputs (files copied
/// into `--outdir`).
fn passthrough(
    wf: &Value,
    job: &Value,
    job_dir: &Path,
    doc_dir: &Path,
    args: &CwlRunnerArgs,
) -> anyhow::Result<Outcome> {
    let outdir = outdir_of(args)?;
    let defaults = caroni_cwl_exec::load::defaults(wf);
    let mut result = Map::new();
    for o in wf
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = o.get("id").and_then(Value::as_str) else {
            continue;
        };
        let src = match o.get("outputSource") {
            Some(Value::String(s)) => caroni_cwl_exec::load::short_id(s),
            Some(Value::Array(l)) if l.len() == 1 => {
                caroni_cwl_exec::load::short_id(l[0].as_str().unwrap_or(""))
            }
            _ => {
                return Ok(Outcome::Unsupported(format!(
                    "workflow output `{id}` without one outputSource"
                )))
            }
        };
        let (mut v, base) = match job.get(&src).filter(|v| !v.is_null()) {
            Some(v) => (v.clone(), job_dir),
            None => (defaults.get(&src).cloned().unwrap_or(Value::Null), doc_dir),
        };
        let mut failed = None;
        let _ = caroni_cwl_exec::files::visit_mut(&mut v, &mut |f| {
            if f.get("class").and_then(Value::as_str) != Some("File") {
                return Ok(());
            }
            let Some(from) = caroni_cwl_exec::files::path_of(f, base) else {
                return Ok(());
            };
            let name = from
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let to = outdir.join(&name);
            if let Err(e) = std::fs::copy(&from, &to) {
                failed = Some(format!("cannot copy {}: {e}", from.display()));
                return Ok(());
            }
            *f = json!({"class": "File", "location": format!("file://{}", to.display())});
            caroni_cwl_exec::files::fill(f, &outdir, true, None)
        });
        if let Some(why) = failed {
            return Ok(Outcome::Failed(why));
        }
        result.insert(id.to_string(), v);
    }
    Ok(Outcome::Done(Value::Object(result)))
}

/// A source as a template names it: `x` (a workflow input) or
/// `step/output`, whatever prefix the document gave it.
fn short_source(s: &str, steps: &[String]) -> String {
    let s = s.rsplit_once('#').map_or(s, |(_, f)| f);
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() >= 2 && steps.iter().any(|st| st == parts[parts.len() - 2]) {
        format!("{}/{}", parts[parts.len() - 2], parts[parts.len() - 1])
    } else {
        parts.last().map(|p| p.to_string()).unwrap_or_default()
    }
}

/// A loaded Workflow as a template: inputs and outputs by what they carry,
/// tools inline with the requirements they inherit, sub-workflows nested
/// the same way.
fn workflow_template(wf: &Value, inputs: Map<String, Value>) -> Result<Value, String> {
    template_of(wf, Some(inputs), &[])
}

/// The type a nested workflow's input is declared with in a template:
/// its own when it is made of CWL's types alone, else what it carries.
fn port_type(p: &Value) -> Value {
    fn plain(t: &Value) -> bool {
        match t {
            Value::String(s) => matches!(
                s.as_str(),
                "null"
                    | "boolean"
                    | "int"
                    | "long"
                    | "float"
                    | "double"
                    | "string"
                    | "File"
                    | "Directory"
                    | "Any"
            ),
            Value::Array(a) => a.iter().all(plain),
            Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                Some("array") => o.get("items").is_some_and(plain),
                Some("enum") => true,
                Some("record") => o
                    .get("fields")
                    .and_then(Value::as_array)
                    .is_some_and(|f| f.iter().all(|x| x.get("type").is_some_and(plain))),
                _ => false,
            },
            _ => false,
        }
    }
    let t = caroni_cwl_exec::load::normalize_type(&p.get("type").cloned().unwrap_or(json!("Any")));
    if plain(&t) && p.get("secondaryFiles").is_none() {
        t
    } else {
        template_type(caroni_cwl::port_kind(p))
    }
}

/// A default as a template carries it: a string as it is, else JSON.
fn default_text(d: &Value) -> Value {
    match d {
        Value::String(_) => d.clone(),
        other => json!(other.to_string()),
    }
}

/// A cwl-runner run is one run of the document, as the reference runner
/// does it: a tool that fails is not tried again (a workflow a manager
/// runs retries by its own policy; this says one attempt).
fn run_once(doc: &mut Value) {
    let hint = json!({"class": "CaroniRequirement", "CaroniMaxAttempts": 1});
    let Some(map) = doc.as_object_mut() else {
        return;
    };
    match map.get_mut("hints") {
        Some(Value::Array(list)) => list.push(hint),
        Some(Value::Object(m)) => {
            m.insert("CaroniRequirement".into(), json!({"CaroniMaxAttempts": 1}));
        }
        _ => {
            map.insert("hints".into(), Value::Array(vec![hint]));
        }
    }
}

fn template_of(
    wf: &Value,
    inputs: Option<Map<String, Value>>,
    from_above: &[Value],
) -> Result<Value, String> {
    let steps = wf
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let step_ids: Vec<String> = steps
        .iter()
        .filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_string))
        .collect();
    // Tool requirements reach every tool below, nearest first.
    let mut inherited: Vec<Value> = Vec::new();
    let mut kept = Map::new();
    for k in ["requirements", "hints"] {
        let mut stay = Vec::new();
        for r in wf.get(k).and_then(Value::as_array).into_iter().flatten() {
            let class = r.get("class").and_then(Value::as_str).unwrap_or("");
            if caroni_cwl_exec::run::TOOL_REQUIREMENTS.contains(&class) {
                inherited.push(r.clone());
                // Step expressions read these too.
                if k == "requirements"
                    && matches!(
                        class,
                        "InlineJavascriptRequirement" | "SchemaDefRequirement"
                    )
                {
                    stay.push(r.clone());
                }
            } else {
                stay.push(r.clone());
            }
        }
        if !stay.is_empty() {
            kept.insert(k.to_string(), Value::Array(stay));
        }
    }
    for r in from_above {
        let class = r.get("class");
        if !inherited.iter().any(|x| x.get("class") == class) {
            inherited.push(r.clone());
        }
    }
    // Workflow inputs whose contents are loaded: every step reading one
    // loads them (the manager does, before the step's expressions).
    let loaded: Vec<String> = wf
        .get("inputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| {
            p.get("loadContents") == Some(&json!(true))
                || p.pointer("/inputBinding/loadContents") == Some(&json!(true))
        })
        .filter_map(|p| p.get("id").and_then(Value::as_str).map(str::to_string))
        .collect();
    let mut out_steps = Map::new();
    for s in &steps {
        let id = s
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let step_reqs = s
            .get("requirements")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut below: Vec<Value> = step_reqs
            .iter()
            .filter(|r| {
                caroni_cwl_exec::run::TOOL_REQUIREMENTS
                    .contains(&r.get("class").and_then(Value::as_str).unwrap_or(""))
            })
            .cloned()
            .collect();
        for r in &inherited {
            if !below.iter().any(|x| x.get("class") == r.get("class")) {
                below.push(r.clone());
            }
        }
        let mut run = s.get("run").cloned().unwrap_or(Value::Null);
        if run.get("class").and_then(Value::as_str) == Some("Workflow") {
            run = template_of(&run, None, &below).map_err(|e| format!("step `{id}`: {e}"))?;
        } else if let Value::Object(m) = &mut run {
            m.remove("cwlVersion");
            m.remove("$dir");
            // The step's and the workflow's requirements reach its tool,
            // nearest first; the tool's own win.
            let mut reqs: Vec<Value> = m
                .get("requirements")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for r in &below {
                let class = r.get("class").and_then(Value::as_str).unwrap_or("");
                if !reqs
                    .iter()
                    .any(|x| x.get("class").and_then(Value::as_str) == Some(class))
                {
                    reqs.push(r.clone());
                }
            }
            m.insert("requirements".into(), Value::Array(reqs));
            if let Some(ns) = wf.get("$namespaces") {
                m.entry("$namespaces").or_insert(ns.clone());
            }
        }
        let mut ins = Map::new();
        for i in s.get("in").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = i.get("id").and_then(Value::as_str) else {
                continue;
            };
            let mut b = Map::new();
            match i.get("source") {
                Some(Value::String(src)) => {
                    b.insert("source".into(), json!(short_source(src, &step_ids)));
                }
                Some(Value::Array(list)) => {
                    let l: Vec<Value> = list
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|src| json!(short_source(src, &step_ids)))
                        .collect();
                    b.insert("source".into(), Value::Array(l));
                }
                _ => {}
            }
            if let Some(d) = i.get("default") {
                b.insert("default".into(), default_text(d));
            }
            for k in ["valueFrom", "linkMerge", "pickValue", "loadContents"] {
                if let Some(v) = i.get(k) {
                    b.insert(k.into(), v.clone());
                }
            }
            let reads_loaded = b.get("source").is_some_and(|src| match src {
                Value::String(x) => loaded.contains(x),
                Value::Array(l) => l
                    .iter()
                    .any(|x| x.as_str().is_some_and(|x| loaded.iter().any(|l| l == x))),
                _ => false,
            });
            if reads_loaded && b.contains_key("valueFrom") {
                b.insert("loadContents".into(), json!(true));
            }
            ins.insert(name.to_string(), Value::Object(b));
        }
        let mut step = Map::new();
        step.insert("run".into(), run);
        step.insert("in".into(), Value::Object(ins));
        step.insert("out".into(), s.get("out").cloned().unwrap_or(json!([])));
        for k in ["scatter", "scatterMethod", "when"] {
            if let Some(v) = s.get(k) {
                let v = match (k, v) {
                    ("scatter", Value::String(x)) => json!(caroni_cwl_exec::load::short_id(x)),
                    ("scatter", Value::Array(l)) => Value::Array(
                        l.iter()
                            .filter_map(Value::as_str)
                            .map(|x| json!(caroni_cwl_exec::load::short_id(x)))
                            .collect(),
                    ),
                    _ => v.clone(),
                };
                step.insert(k.into(), v);
            }
        }
        let features: Vec<Value> = step_reqs
            .iter()
            .filter(|x| {
                let c = x.get("class").and_then(Value::as_str).unwrap_or("");
                !caroni_cwl_exec::run::TOOL_REQUIREMENTS.contains(&c)
                    || matches!(c, "InlineJavascriptRequirement" | "SchemaDefRequirement")
            })
            .cloned()
            .collect();
        if !features.is_empty() {
            step.insert("requirements".into(), Value::Array(features));
        }
        out_steps.insert(id, Value::Object(step));
    }
    let mut outs = Map::new();
    for o in wf
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = o.get("id").and_then(Value::as_str) else {
            continue;
        };
        let t = port_type(o);
        let source = match o.get("outputSource") {
            Some(Value::String(s)) => json!(short_source(s, &step_ids)),
            Some(Value::Array(l)) => Value::Array(
                l.iter()
                    .filter_map(Value::as_str)
                    .map(|x| json!(short_source(x, &step_ids)))
                    .collect(),
            ),
            Some(other) => other.clone(),
            None => return Err(format!("workflow output `{id}` has no outputSource")),
        };
        let mut body = Map::new();
        body.insert("type".into(), t);
        body.insert("outputSource".into(), source);
        for k in ["linkMerge", "pickValue"] {
            if let Some(v) = o.get(k) {
                body.insert(k.into(), v.clone());
            }
        }
        outs.insert(id.to_string(), Value::Object(body));
    }
    let inputs = match inputs {
        Some(i) => i,
        None => {
            let mut m = Map::new();
            for p in wf
                .get("inputs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = p.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let mut b = Map::new();
                b.insert("type".into(), port_type(p));
                if let Some(d) = p.get("default") {
                    b.insert("default".into(), default_text(d));
                }
                m.insert(id.to_string(), Value::Object(b));
            }
            m
        }
    };
    let mut t = Map::new();
    t.insert("cwlVersion".into(), json!("v1.2"));
    t.insert("class".into(), json!("Workflow"));
    t.insert("inputs".into(), Value::Object(inputs));
    t.insert("outputs".into(), Value::Object(outs));
    t.insert("steps".into(), Value::Object(out_steps));
    for (k, v) in kept {
        t.insert(k, v);
    }
    Ok(Value::Object(t))
}
