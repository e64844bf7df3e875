//! Running one CommandLineTool or ExpressionTool on this host: inputs
//! checked and completed, `InitialWorkDirRequirement` staged, the command
//! line built, the process run in a fresh output directory within its time
//! limit, and outputs collected (`glob`, `loadContents`, `outputEval`,
//! `cwl.output.json`, `secondaryFiles`, `format`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::cmdline::{self, BindError};
use crate::expr::{Evaluator, ExprError, Limits};
use crate::files::{self, FileError};
use crate::load::requirement;
use crate::types::{matches, optional, Names};

/// Requirements of a tool this runner understands (a Workflow's steps
/// inherit them). Any other one in `requirements` makes the process
/// unsupported; in `hints` it is ignored.
pub const TOOL_REQUIREMENTS: &[&str] = &[
    "InlineJavascriptRequirement",
    "SchemaDefRequirement",
    "ShellCommandRequirement",
    "InitialWorkDirRequirement",
    "EnvVarRequirement",
    "ResourceRequirement",
    "ToolTimeLimit",
    "NetworkAccess",
    "DockerRequirement",
    "SoftwareRequirement",
    "LoadListingRequirement",
    "WorkReuse",
    "InplaceUpdateRequirement",
];

/// Requirements that name features of a Workflow; a tool may carry them
/// (inherited) without effect.
pub const WORKFLOW_FEATURES: &[&str] = &[
    "SubworkflowFeatureRequirement",
    "ScatterFeatureRequirement",
    "MultipleInputFeatureRequirement",
    "StepInputExpressionRequirement",
];

/// Why a process did not give outputs.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A feature this runner does not have.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The inputs do not fit the process.
    #[error("invalid input: {0}")]
    Input(String),
    /// The document is wrong.
    #[error("invalid process: {0}")]
    Process(String),
    /// An expression failed.
    #[error(transparent)]
    Expr(#[from] ExprError),
    /// The command line could not be built.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A file could not be read or staged.
    #[error(transparent)]
    File(#[from] FileError),
    /// The process could not start.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The program.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It exited with a code that is not a success.
    #[error("the tool exited with status {code}{}", if *.permanent { " (a permanent failure)" } else { "" })]
    Exit {
        /// Its exit status.
        code: i32,
        /// `permanentFailCodes` named it.
        permanent: bool,
    },
    /// It was stopped from outside (`Options::cancel`).
    #[error("the tool was stopped")]
    Cancelled,
    /// It ran past `ToolTimeLimit`.
    #[error("the tool ran longer than its time limit of {0} s and was stopped")]
    TimeLimit(u64),
    /// An output could not be collected.
    #[error("output `{0}`: {1}")]
    Output(String, String),
}

/// Where and how to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The fresh output (working) directory.
    pub outdir: PathBuf,
    /// A fresh scratch directory.
    pub tmpdir: PathBuf,
    /// Bounds of expressions.
    pub limits: Limits,
    /// `PATH` of the tool's environment.
    pub path_env: String,
    /// Compute `checksum` of output files.
    pub checksums: bool,
    /// Where the tool's stderr goes when it does not name a file for it
    /// (inherited when `None`).
    pub stderr_to: Option<PathBuf>,
    /// Set to stop the tool (its whole process group) at once.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Run the command line in a Docker container instead of on this
    /// host.
    pub container: Option<Container>,
}

/// How a tool runs in Docker: `docker run` of `image` with each of
/// `mounts` bound at its own path (so every path the command line names
/// is the same inside), the output directory as the working directory,
/// and the tool's environment (not this host's `PATH`).
#[derive(Clone, Debug)]
pub struct Container {
    /// The Docker CLI.
    pub docker: String,
    /// The image (the tool's `dockerPull` or `dockerImageId`).
    pub image: String,
    /// The container's name (stopped by it when the run is cancelled).
    pub name: String,
    /// Host directories bound at the same path, read-write.
    pub mounts: Vec<PathBuf>,
    /// `--user` (uid:gid), so that the files it writes are the caller's.
    pub user: Option<String>,
    /// `--label`s (key, value): who started it, to find it after a crash.
    pub labels: Vec<(String, String)>,
}

/// The image a tool's DockerRequirement (requirement or hint) names.
pub fn docker_image(process: &Value) -> Option<String> {
    let r = requirement(process, "DockerRequirement").or_else(|| {
        process
            .get("hints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|h| h.get("class").and_then(Value::as_str) == Some("DockerRequirement"))
    })?;
    r.get("dockerImageId")
        .or_else(|| r.get("dockerPull"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The command that runs `argv` in `c` with `env`, from `outdir`.
fn in_container(
    c: &Container,
    process: &Value,
    argv: &[String],
    env: &BTreeMap<String, String>,
    outdir: &Path,
) -> Vec<String> {
    let mut full: Vec<String> = vec![
        c.docker.clone(),
        "run".into(),
        "--rm".into(),
        "--interactive".into(),
        "--name".into(),
        c.name.clone(),
    ];
    let network = requirement(process, "NetworkAccess")
        .and_then(|r| r.get("networkAccess"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !network {
        full.extend(["--network".into(), "none".into()]);
    }
    if let Some(u) = &c.user {
        full.extend(["--user".into(), u.clone()]);
    }
    for (k, v) in &c.labels {
        full.extend(["--label".into(), format!("{k}={v}")]);
    }
    for m in &c.mounts {
        full.extend(["--volume".into(), format!("{0}:{0}", m.display())]);
    }
    let mut workdir = outdir.display().to_string();
    if let Some(d) = requirement(process, "DockerRequirement")
        .and_then(|r| r.get("dockerOutputDirectory"))
        .and_then(Value::as_str)
    {
        full.extend(["--volume".into(), format!("{}:{d}", outdir.display())]);
        workdir = d.to_string();
    }
    full.extend(["--workdir".into(), workdir]);
    for (k, v) in env {
        if k != "PATH" {
            full.extend(["--env".into(), format!("{k}={v}")]);
        }
    }
    full.push(c.image.clone());
    full.extend(argv.iter().cloned());
    full
}

/// The loaded process and the job order to run it on.
pub struct Job<'a> {
    /// The normalised process.
    pub process: &'a Value,
    /// Its document's directory (defaults' relative locations).
    pub process_dir: &'a Path,
    /// Input values; File and Directory objects name places on this host.
    pub inputs: &'a Value,
    /// Where relative locations in the inputs resolve.
    pub inputs_dir: &'a Path,
}

fn class(p: &Value) -> &str {
    p.get("class").and_then(Value::as_str).unwrap_or("")
}

/// Refuses a process with a requirement this runner lacks.
pub fn check_requirements(process: &Value) -> Result<(), ToolError> {
    if let Some(Value::Array(list)) = process.get("requirements") {
        for r in list {
            let c = class(r);
            if !TOOL_REQUIREMENTS.contains(&c) && !WORKFLOW_FEATURES.contains(&c) {
                return Err(ToolError::Unsupported(format!("requirement {c}")));
            }
        }
    }
    if let Some(v) = process.get("cwlVersion").and_then(Value::as_str) {
        if !matches!(
            v,
            "v1.0"
                | "v1.1"
                | "v1.2"
                | "v1.1.0-dev1"
                | "v1.2.0-dev1"
                | "v1.2.0-dev2"
                | "v1.2.0-dev3"
                | "v1.2.0-dev4"
                | "v1.2.0-dev5"
        ) {
            return Err(ToolError::Unsupported(format!("cwlVersion {v}")));
        }
    }
    Ok(())
}

/// `loadListing` in force for a parameter.
fn load_listing(process: &Value, param: &Value) -> Option<String> {
    param
        .get("loadListing")
        .and_then(Value::as_str)
        .or_else(|| {
            requirement(process, "LoadListingRequirement")
                .and_then(|r| r.get("loadListing"))
                .and_then(Value::as_str)
        })
        .map(str::to_string)
}

/// Completes and checks the input object: defaults, types, File fields,
/// secondary files, `loadContents`.
pub fn complete_inputs(
    job: &Job<'_>,
    ev: &mut Evaluator,
    names: &Names,
) -> Result<Value, ToolError> {
    let mut out = Map::new();
    let params = job
        .process
        .get("inputs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for p in &params {
        let Some(id) = p.get("id").and_then(Value::as_str) else {
            continue;
        };
        let ty = p
            .get("type")
            .cloned()
            .unwrap_or(Value::String("Any".into()));
        let (mut v, base) = match job.inputs.get(id) {
            Some(v) if !v.is_null() => (v.clone(), job.inputs_dir),
            _ => match p.get("default") {
                Some(d) => (d.clone(), job.process_dir),
                None => (Value::Null, job.inputs_dir),
            },
        };
        if v.is_null() && !optional(&ty, names) {
            return Err(ToolError::Input(format!(
                "missing required input `{id}` (of type {})",
                crate::types::describe(&ty)
            )));
        }
        let listing = load_listing(job.process, p);
        files::visit_top_mut(&mut v, &mut |f| {
            files::fill(f, base, false, listing.as_deref())
        })?;
        if !matches(&ty, &v, names) {
            return Err(ToolError::Input(format!(
                "input `{id}` is {} where {} is declared",
                short_json(&v),
                crate::types::describe(&ty)
            )));
        }
        let load = p
            .get("loadContents")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            || p.get("inputBinding")
                .and_then(|b| b.get("loadContents"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        if load {
            files::visit_mut(&mut v, &mut |f| {
                if f.get("class").and_then(Value::as_str) == Some("File")
                    && f.get("contents").is_none()
                {
                    if let Some(path) = f.get("path").and_then(Value::as_str).map(PathBuf::from) {
                        f["contents"] = Value::String(files::read_contents(&path)?);
                    }
                }
                Ok(())
            })?;
        }
        out.insert(id.to_string(), v);
    }
    // Secondary files, once every input is known (patterns may refer to
    // other inputs).
    let mut inputs = Value::Object(out);
    ev.set_inputs(inputs.clone());
    for p in &params {
        let (Some(id), Some(Value::Array(patterns))) =
            (p.get("id").and_then(Value::as_str), p.get("secondaryFiles"))
        else {
            continue;
        };
        let mut v = inputs[id].clone();
        add_secondary(&mut v, patterns, ev, true)?;
        inputs[id] = v;
    }
    Ok(inputs)
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s
                .char_indices()
                .take(77)
                .last()
                .map_or(0, |(i, c)| i + c.len_utf8())]
        )
    } else {
        s
    }
}

/// Adds the secondary files a parameter's type names inside records
/// (`secondaryFiles` of record fields, at any depth of records and
/// arrays) to the Files of `v`, as [`add_secondary`] does for a
/// parameter's own patterns.
pub fn add_field_secondary(
    v: &mut Value,
    t: &Value,
    names: &Names,
    ev: &mut Evaluator,
    required_check: bool,
) -> Result<(), ToolError> {
    let t = names.resolve(t).clone();
    match (&t, v) {
        (Value::Array(branches), v) => {
            // A union: the first branch the value is.
            if let Some(b) = branches.iter().find(|b| matches(b, v, names)) {
                add_field_secondary(v, b, names, ev, required_check)?;
            }
            Ok(())
        }
        (Value::Object(o), Value::Array(items))
            if o.get("type").and_then(Value::as_str) == Some("array") =>
        {
            let it = o.get("items").cloned().unwrap_or(Value::Null);
            for x in items {
                add_field_secondary(x, &it, names, ev, required_check)?;
            }
            Ok(())
        }
        (Value::Object(o), Value::Object(rec))
            if o.get("type").and_then(Value::as_str) == Some("record") =>
        {
            for f in o
                .get("fields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(name) = f.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let name = crate::load::short_id(name);
                let Some(fv) = rec.get_mut(&name) else {
                    continue;
                };
                if let Some(sf) = f.get("secondaryFiles") {
                    let patterns = crate::load::normalize_secondary(sf);
                    add_secondary(
                        fv,
                        patterns.as_array().map(Vec::as_slice).unwrap_or(&[]),
                        ev,
                        required_check,
                    )?;
                }
                if let Some(ft) = f.get("type") {
                    add_field_secondary(fv, ft, names, ev, required_check)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Adds the secondary files `patterns` name to every File in `v` (those
/// that exist; a missing required one is an error when `required_check`).
pub fn add_secondary(
    v: &mut Value,
    patterns: &[Value],
    ev: &mut Evaluator,
    required_check: bool,
) -> Result<(), ToolError> {
    match v {
        Value::Array(items) => {
            for x in items {
                add_secondary(x, patterns, ev, required_check)?;
            }
            Ok(())
        }
        Value::Object(m) if m.get("class").and_then(Value::as_str) == Some("File") => {
            let Some(path) = m.get("path").and_then(Value::as_str).map(PathBuf::from) else {
                return Ok(());
            };
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let basename = m
                .get("basename")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let this = Value::Object(m.clone());
            let mut found: Vec<Value> = m
                .get("secondaryFiles")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for pat in patterns {
                let pattern = pat.get("pattern").cloned().unwrap_or(Value::Null);
                let required = match pat.get("required") {
                    None | Some(Value::Null) => true,
                    // An expression that gives null requires nothing (as
                    // the reference runner reads it: falsy).
                    Some(r) => match ev.eval(r, &this)? {
                        Value::Bool(b) => b,
                        Value::Null => false,
                        _ => true,
                    },
                };
                let names: Vec<Value> = match &pattern {
                    Value::String(s) if crate::expr::has_expression(s) => {
                        match ev.eval(&pattern, &this)? {
                            Value::Array(a) => a,
                            Value::Null => Vec::new(),
                            other => vec![other],
                        }
                    }
                    Value::String(s) => vec![Value::String(files::substitute(&basename, s))],
                    _ => Vec::new(),
                };
                for n in names {
                    let mut entry = match n {
                        Value::String(name) => {
                            let p = dir.join(&name);
                            let class = if p.is_dir() { "Directory" } else { "File" };
                            serde_json::json!({"class": class, "location": format!("file://{}", p.display()), "basename": name})
                        }
                        obj @ Value::Object(_) => obj,
                        _ => continue,
                    };
                    let bn = entry
                        .get("basename")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    if found
                        .iter()
                        .any(|f| f.get("basename").and_then(Value::as_str) == bn.as_deref())
                    {
                        continue;
                    }
                    let exists = files::path_of(&entry, &dir).is_some_and(|p| p.exists());
                    if !exists {
                        if required && required_check {
                            return Err(ToolError::Input(format!(
                                "missing required secondary file `{}` of {}",
                                bn.unwrap_or_default(),
                                path.display()
                            )));
                        }
                        continue;
                    }
                    files::fill(&mut entry, &dir, false, None)?;
                    found.push(entry);
                }
            }
            m.insert("secondaryFiles".into(), Value::Array(found));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `runtime` for a process: directories and `ResourceRequirement`.
fn runtime_of(process: &Value, ev: &mut Evaluator, opts: &Options) -> Result<Value, ToolError> {
    let mut cores = 1f64;
    let mut ram = 256f64;
    let mut outdir_size = 1024f64;
    let mut tmpdir_size = 1024f64;
    if let Some(r) = requirement(process, "ResourceRequirement") {
        let mut get = |min: &str, max: &str, dflt: f64| -> Result<f64, ToolError> {
            let v = match r.get(min).or_else(|| r.get(max)) {
                Some(x) => ev.eval(x, &Value::Null)?,
                None => return Ok(dflt),
            };
            Ok(v.as_f64().unwrap_or(dflt))
        };
        cores = get("coresMin", "coresMax", 1.0)?;
        ram = get("ramMin", "ramMax", 256.0)?;
        outdir_size = get("outdirMin", "outdirMax", 1024.0)?;
        tmpdir_size = get("tmpdirMin", "tmpdirMax", 1024.0)?;
    }
    Ok(serde_json::json!({
        "outdir": opts.outdir.to_string_lossy(),
        "tmpdir": opts.tmpdir.to_string_lossy(),
        "cores": cores.ceil() as i64,
        "ram": ram.ceil() as i64,
        "outdirSize": outdir_size.ceil() as i64,
        "tmpdirSize": tmpdir_size.ceil() as i64,
    }))
}

/// An evaluator for `process`: JavaScript and its `expressionLib` when it
/// has InlineJavascriptRequirement.
pub fn evaluator(process: &Value, limits: Limits) -> Evaluator {
    let js = requirement(process, "InlineJavascriptRequirement");
    let lib: Vec<String> = js
        .and_then(|r| r.get("expressionLib"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Evaluator::new(js.is_some(), lib, limits)
}

/// The process with the requirements a job order gives under
/// `cwl:requirements` (they override the process's own of the same class).
pub fn with_job_requirements(process: &Value, inputs: &Value) -> Value {
    let Some(Value::Array(extra)) = inputs.get("cwl:requirements") else {
        return process.clone();
    };
    let mut p = process.clone();
    let mut reqs: Vec<Value> = p
        .get("requirements")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for r in extra {
        let c = class(r).to_string();
        reqs.retain(|x| class(x) != c);
        if let Some(Value::Array(h)) = p.get_mut("hints") {
            h.retain(|x| class(x) != c);
        }
        reqs.push(r.clone());
    }
    p["requirements"] = Value::Array(reqs);
    p
}

/// Runs the process and returns its output object.
pub fn run(job: &Job<'_>, opts: &Options) -> Result<Value, ToolError> {
    let overridden = with_job_requirements(job.process, job.inputs);
    let job = &Job {
        process: &overridden,
        process_dir: job.process_dir,
        inputs: job.inputs,
        inputs_dir: job.inputs_dir,
    };
    check_requirements(job.process)?;
    let names = Names::of(job.process);
    let mut ev = evaluator(job.process, opts.limits);
    for d in [&opts.outdir, &opts.tmpdir] {
        std::fs::create_dir_all(d).map_err(|source| FileError::Io {
            what: "cannot create".into(),
            path: d.clone(),
            source,
        })?;
    }
    // `runtime` first without resources (secondary-file patterns may read
    // it), then with them: resource expressions read the inputs.
    ev.set_runtime(serde_json::json!({
        "outdir": opts.outdir.to_string_lossy(),
        "tmpdir": opts.tmpdir.to_string_lossy(),
    }));
    let inputs = complete_inputs(job, &mut ev, &names)?;
    ev.set_inputs(inputs.clone());
    let rt = runtime_of(job.process, &mut ev, opts)?;
    ev.set_runtime(rt);
    match class(job.process) {
        "CommandLineTool" => run_tool(job, &inputs, &mut ev, &names, opts),
        "ExpressionTool" => {
            let expr = job
                .process
                .get("expression")
                .ok_or_else(|| ToolError::Process("an ExpressionTool needs `expression`".into()))?;
            let mut out = ev.eval(expr, &Value::Null)?;
            if !out.is_object() {
                return Err(ToolError::Process(format!(
                    "the expression gave {} where an object of outputs is needed",
                    short_json(&out)
                )));
            }
            files::visit_mut(&mut out, &mut |f| {
                if f.get("path").is_some() || f.get("location").is_some() {
                    files::fill(f, &opts.outdir, opts.checksums, None)?;
                }
                Ok(())
            })?;
            shape_outputs(job.process, out, &names)
        }
        other => Err(ToolError::Unsupported(format!(
            "running a {other} as a single tool"
        ))),
    }
}

/// Keeps only the declared outputs (absent ones as null) and checks them.
fn shape_outputs(process: &Value, out: Value, names: &Names) -> Result<Value, ToolError> {
    let mut shaped = Map::new();
    for p in process
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = p.get("id").and_then(Value::as_str) else {
            continue;
        };
        let v = out.get(id).cloned().unwrap_or(Value::Null);
        let ty = p
            .get("type")
            .cloned()
            .unwrap_or(Value::String("Any".into()));
        if !matches(&ty, &v, names) && !(v.is_null() && (optional(&ty, names) || ty == "Any")) {
            return Err(ToolError::Output(
                id.to_string(),
                format!(
                    "{} is not of type {}",
                    short_json(&v),
                    crate::types::describe(&ty)
                ),
            ));
        }
        shaped.insert(id.to_string(), v);
    }
    Ok(Value::Object(shaped))
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> ToolError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |source| ToolError::File(FileError::Io { what, path, source })
}

/// Copies (or links) a file or directory to `to`.
fn stage(from: &Path, to: &Path, writable: bool) -> Result<(), ToolError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(io_err("cannot create", to))?;
        for e in std::fs::read_dir(from)
            .map_err(io_err("cannot list", from))?
            .flatten()
        {
            stage(&e.path(), &to.join(e.file_name()), writable)?;
        }
        return Ok(());
    }
    if !writable && std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(io_err("cannot copy to", to))?;
    Ok(())
}

/// Writes a File or Directory literal (`contents`, `listing`) under `dir`
/// and points the object there.
fn materialize(v: &mut Value, dir: &Path) -> Result<(), ToolError> {
    let class = v
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if v.get("path").is_some()
        || v.get("location")
            .is_some_and(|l| !l.as_str().unwrap_or("").starts_with("_:"))
    {
        return Ok(());
    }
    let name = v
        .get("basename")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("literal-{}", std::process::id()));
    let place = dir.join(&name);
    if class == "File" {
        let contents = v.get("contents").and_then(Value::as_str).unwrap_or("");
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        std::fs::write(&place, contents).map_err(io_err("cannot write", &place))?;
    } else {
        std::fs::create_dir_all(&place).map_err(io_err("cannot create", &place))?;
        if let Some(Value::Array(list)) = v.get_mut("listing") {
            // A File's secondary files go into the directory beside it.
            let mut entries: Vec<Value> = Vec::new();
            for e in list.iter() {
                entries.push(e.clone());
                if let Some(Value::Array(sf)) = e.get("secondaryFiles") {
                    entries.extend(sf.iter().cloned());
                }
            }
            *list = entries;
            for e in list {
                materialize(e, &place)?;
                if let Some(from) = files::path_of(e, &place) {
                    let bn = e
                        .get("basename")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    let to = place.join(bn.unwrap_or_else(|| {
                        from.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    }));
                    if from != to {
                        stage(&from, &to, true)?;
                    }
                }
            }
        }
    }
    v["location"] = Value::String(format!("file://{}", place.display()));
    if let Some(m) = v.as_object_mut() {
        m.remove("listing");
    }
    files::fill(
        v,
        dir,
        false,
        if class == "Directory" {
            Some("deep_listing")
        } else {
            None
        },
    )?;
    Ok(())
}

/// Checksums of Files found as secondary files of outputs (when the
/// runner computes checksums).
fn secondary_checksums(v: &mut Value, opts: &Options) -> Result<(), ToolError> {
    if !opts.checksums {
        return Ok(());
    }
    files::visit_mut(v, &mut |f| {
        if f.get("class").and_then(Value::as_str) == Some("File") && f.get("checksum").is_none() {
            if let Some(path) = f.get("path").and_then(Value::as_str).map(PathBuf::from) {
                f["checksum"] = Value::String(files::checksum(&path)?);
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Stages `InitialWorkDirRequirement.listing` into the output directory.
fn initial_workdir(
    process: &Value,
    doc_dir: &Path,
    ev: &mut Evaluator,
    opts: &Options,
    inputs: &mut Value,
) -> Result<(), ToolError> {
    let Some(r) = requirement(process, "InitialWorkDirRequirement") else {
        return Ok(());
    };
    let listing = match r.get("listing") {
        Some(l @ Value::String(_)) => ev.eval(l, &Value::Null)?,
        Some(l) => l.clone(),
        None => return Ok(()),
    };
    let mut entries: Vec<Value> = Vec::new();
    let push = |v: Value, entries: &mut Vec<Value>| match v {
        Value::Array(a) => entries.extend(a.into_iter().flat_map(|x| match x {
            Value::Array(inner) => inner,
            other => vec![other],
        })),
        Value::Null => {}
        other => entries.push(other),
    };
    for e in listing
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![listing.clone()])
    {
        match &e {
            Value::String(_) => {
                let v = ev.eval(&e, &Value::Null)?;
                push(v, &mut entries);
            }
            other => {
                // Files and Directories written in the tool are where the
                // document says, relative to it.
                let mut e = other.clone();
                let target = match e.get_mut("entry") {
                    Some(inner @ Value::Object(_)) => inner,
                    _ => &mut e,
                };
                files::visit_top_mut(target, &mut |f| {
                    if let Some(p) = files::path_of(f, doc_dir) {
                        if let Some(m) = f.as_object_mut() {
                            m.remove("path");
                            m.insert(
                                "location".into(),
                                Value::String(format!("file://{}", p.display())),
                            );
                        }
                    }
                    Ok(())
                })?;
                push(e, &mut entries)
            }
        }
    }
    let scratch = opts.tmpdir.join("iwd-literals");
    for e in entries {
        let (name, value, writable) = if e.get("entry").is_some() || e.get("entryname").is_some() {
            let name = match e.get("entryname") {
                Some(n) => Some(cmdline::to_str(&ev.eval(n, &Value::Null)?)?),
                None => None,
            };
            let raw = e.get("entry").cloned().unwrap_or(Value::Null);
            let value = match &raw {
                Value::String(s) if crate::expr::has_expression(s) => {
                    let v = ev.eval_exact(&raw, &Value::Null)?;
                    // An entry that gives neither text nor files is written
                    // as JSON (CWL v1.2).
                    let files = |x: &Value| x.get("class").is_some();
                    match v {
                        Value::String(_) | Value::Null => v,
                        ref o if files(o) => v,
                        Value::Array(ref a) if !a.is_empty() && a.iter().all(files) => v,
                        other => Value::String(crate::expr::python_json(&other)),
                    }
                }
                other => other.clone(),
            };
            (
                name,
                value,
                e.get("writable").and_then(Value::as_bool).unwrap_or(false),
            )
        } else {
            (
                None,
                e.clone(),
                e.get("writable").and_then(Value::as_bool).unwrap_or(false),
            )
        };
        match value {
            Value::Null => {}
            Value::String(text) => {
                let name = name.ok_or_else(|| {
                    ToolError::Process(
                        "an InitialWorkDirRequirement entry of text needs `entryname`".into(),
                    )
                })?;
                let place = resolve_entry(&opts.outdir, &name)?;
                if let Some(parent) = place.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
                }
                std::fs::write(&place, text).map_err(io_err("cannot write", &place))?;
            }
            Value::Array(items) => {
                for mut it in items {
                    materialize(&mut it, &scratch)?;
                    stage_object(&it, None, &opts.outdir, writable, inputs)?;
                }
            }
            mut obj @ Value::Object(_) => {
                materialize(&mut obj, &scratch)?;
                stage_object(&obj, name.as_deref(), &opts.outdir, writable, inputs)?;
            }
            other => {
                let name =
                    name.ok_or_else(|| ToolError::Process("an entry needs `entryname`".into()))?;
                let place = resolve_entry(&opts.outdir, &name)?;
                std::fs::write(&place, crate::expr::to_text(&other))
                    .map_err(io_err("cannot write", &place))?;
            }
        }
    }
    Ok(())
}

fn resolve_entry(outdir: &Path, name: &str) -> Result<PathBuf, ToolError> {
    let p = Path::new(name);
    if p.is_absolute() {
        if p.starts_with(outdir) {
            return Ok(p.to_path_buf());
        }
        // Only a tool that requires a container may place files at
        // absolute paths (inside it); none runs in one here.
        return Err(ToolError::Process(format!(
            "entryname `{name}` is an absolute path outside the output directory; only a tool that requires a container (DockerRequirement under `requirements`) may use one"
        )));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ToolError::Process(format!(
            "entryname `{name}` leaves the output directory"
        )));
    }
    Ok(outdir.join(p))
}

/// Stages a File or Directory object into the output directory, and
/// points inputs that name the same file at the staged copy.
fn stage_object(
    obj: &Value,
    name: Option<&str>,
    outdir: &Path,
    writable: bool,
    inputs: &mut Value,
) -> Result<(), ToolError> {
    let Some(from) = files::path_of(obj, outdir) else {
        return Ok(());
    };
    let bn = name
        .map(str::to_string)
        .or_else(|| {
            obj.get("basename")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            from.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let to = resolve_entry(outdir, &bn)?;
    if to != from {
        stage(&from, &to, writable)?;
    }
    let from_s = from.to_string_lossy().into_owned();
    let to_s = to.to_string_lossy().into_owned();
    let _ = files::visit_mut(inputs, &mut |f| {
        if f.get("path").and_then(Value::as_str) == Some(from_s.as_str()) {
            f["path"] = Value::String(to_s.clone());
            f["location"] = Value::String(format!("file://{to_s}"));
            if let Some(d) = to.parent() {
                f["dirname"] = Value::String(d.to_string_lossy().into_owned());
            }
        }
        Ok(())
    });
    if let Some(Value::Array(sf)) = obj.get("secondaryFiles") {
        for s in sf {
            stage_object(s, None, to.parent().unwrap_or(outdir), writable, inputs)?;
        }
    }
    Ok(())
}

fn run_tool(
    job: &Job<'_>,
    inputs: &Value,
    ev: &mut Evaluator,
    names: &Names,
    opts: &Options,
) -> Result<Value, ToolError> {
    let mut inputs = inputs.clone();
    // File literals in the inputs become real files first.
    let lit = opts.tmpdir.join("input-literals");
    let mut failed: Option<ToolError> = None;
    let _ = files::visit_mut(&mut inputs, &mut |f| {
        if f.get("path").is_none() && f.get("location").is_none() {
            if let Err(e) = materialize(f, &lit) {
                failed = Some(e);
            }
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    ev.set_inputs(inputs.clone());
    let process = job.process;
    initial_workdir(process, job.process_dir, ev, opts, &mut inputs)?;
    ev.set_inputs(inputs.clone());

    let shell = requirement(process, "ShellCommandRequirement").is_some();
    let argv = cmdline::command_line(process, &inputs, ev, names, shell)?;
    if argv.is_empty() {
        return Err(ToolError::Process(
            "the command line is empty (no baseCommand nor arguments)".into(),
        ));
    }

    // Environment.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("HOME".into(), opts.outdir.to_string_lossy().into_owned());
    env.insert("TMPDIR".into(), opts.tmpdir.to_string_lossy().into_owned());
    env.insert("PATH".into(), opts.path_env.clone());
    if let Some(r) = requirement(process, "EnvVarRequirement") {
        let defs: Vec<(String, Value)> = match r.get("envDef") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|d| {
                    Some((
                        d.get("envName")?.as_str()?.to_string(),
                        d.get("envValue").cloned().unwrap_or(Value::Null),
                    ))
                })
                .collect(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    let val = v.get("envValue").cloned().unwrap_or_else(|| v.clone());
                    (k.clone(), val)
                })
                .collect(),
            _ => Vec::new(),
        };
        for (k, v) in defs {
            let v = ev.eval(&v, &Value::Null)?;
            env.insert(k, crate::expr::to_text(&v));
        }
    }

    // Standard streams.
    let stream_name = |key: &str, ev: &mut Evaluator| -> Result<Option<String>, ToolError> {
        match process.get(key) {
            Some(v) => Ok(Some(cmdline::to_str(&ev.eval(v, &Value::Null)?)?)),
            None => Ok(None),
        }
    };
    let outputs = process
        .get("outputs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let wants = |t: &str| {
        outputs
            .iter()
            .any(|o| o.get("type").and_then(Value::as_str) == Some(t))
    };
    let mut stdout_name = stream_name("stdout", ev)?;
    if stdout_name.is_none() && wants("stdout") {
        stdout_name = Some(format!("{}.stdout", random_name()));
    }
    let mut stderr_name = stream_name("stderr", ev)?;
    if stderr_name.is_none() && wants("stderr") {
        stderr_name = Some(format!("{}.stderr", random_name()));
    }
    // An input of type `stdin` is the tool's standard input.
    let stdin_input = process
        .get("inputs")
        .and_then(Value::as_array)
        .and_then(|l| {
            l.iter()
                .find(|p| p.get("type").and_then(Value::as_str) == Some("stdin"))
        })
        .and_then(|p| p.get("id").and_then(Value::as_str))
        .and_then(|id| inputs.get(id))
        .and_then(|f| f.get("path"))
        .and_then(Value::as_str)
        .map(PathBuf::from);
    let stdin_path = match process.get("stdin") {
        Some(v) => match ev.eval(v, &Value::Null)? {
            Value::Null => None,
            Value::Object(o) => o.get("path").and_then(Value::as_str).map(PathBuf::from),
            other => Some(PathBuf::from(cmdline::to_str(&other)?)),
        },
        None => stdin_input,
    };

    let argv = match &opts.container {
        Some(c) => in_container(c, process, &argv, &env, &opts.outdir),
        None => argv,
    };
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(&opts.outdir)
        .env_clear()
        .envs(&env);
    if opts.container.is_some() {
        // The Docker CLI finds its engine as the caller does.
        cmd.envs(std::env::vars().filter(|(k, _)| k.starts_with("DOCKER_")));
    }
    cmd.stdin(match &stdin_path {
        Some(p) => Stdio::from(std::fs::File::open(p).map_err(io_err("cannot open stdin", p))?),
        None => Stdio::null(),
    });
    for (name, is_out) in [(&stdout_name, true), (&stderr_name, false)] {
        if let Some(n) = name {
            let p = resolve_entry(&opts.outdir, n)?;
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
            }
            let f = std::fs::File::create(&p).map_err(io_err("cannot create", &p))?;
            if is_out {
                cmd.stdout(f);
            } else {
                cmd.stderr(f);
            }
        } else if is_out {
            cmd.stdout(Stdio::null());
        } else if let Some(p) = &opts.stderr_to {
            let f = std::fs::File::create(p).map_err(io_err("cannot create", p))?;
            cmd.stderr(f);
        } else {
            cmd.stderr(Stdio::inherit());
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let limit = match requirement(process, "ToolTimeLimit").and_then(|r| r.get("timelimit")) {
        Some(t) => {
            let v = ev.eval(t, &Value::Null)?;
            let n = v.as_i64().ok_or_else(|| {
                ToolError::Process(format!("ToolTimeLimit.timelimit must be a number, not {v}"))
            })?;
            if n < 0 {
                return Err(ToolError::Process(
                    "ToolTimeLimit.timelimit must not be negative".into(),
                ));
            }
            (n > 0).then(|| Duration::from_secs(n as u64))
        }
        None => None,
    };
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        command: argv[0].clone(),
        source,
    })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(source) => {
                return Err(ToolError::Spawn {
                    command: argv[0].clone(),
                    source,
                })
            }
        }
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            kill_group(&child, opts.container.as_ref());
            let _ = child.wait();
            return Err(ToolError::Cancelled);
        }
        if let Some(l) = limit {
            if started.elapsed() > l {
                kill_group(&child, opts.container.as_ref());
                let _ = child.wait();
                return Err(ToolError::TimeLimit(l.as_secs()));
            }
        }
        std::thread::sleep(Duration::from_millis(5).max(Duration::from_millis(
            (started.elapsed().as_millis() as u64 / 20).min(50),
        )));
    };
    let code = exit_code(&status);
    let codes = |k: &str| -> Vec<i64> {
        process
            .get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    let success = {
        let s = codes("successCodes");
        if s.is_empty() {
            vec![0]
        } else {
            s
        }
    };
    if !success.contains(&(code as i64)) {
        let permanent = codes("permanentFailCodes").contains(&(code as i64));
        return Err(ToolError::Exit { code, permanent });
    }

    let mut rt = ev.runtime().clone();
    rt["exitCode"] = Value::from(code);
    ev.set_runtime(rt);
    collect_outputs(
        process,
        ev,
        names,
        opts,
        stdout_name.as_deref(),
        stderr_name.as_deref(),
    )
}

fn exit_code(status: &std::process::ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    status.code().unwrap_or(-1)
}

fn kill_group(child: &std::process::Child, container: Option<&Container>) {
    // A container outlives its CLI: stop it by name first.
    if let Some(c) = container {
        let _ = std::process::Command::new(&c.docker)
            .args(["kill", &c.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // The tool runs in a process group of its own: end all of it.
    let pid = child.id() as i32;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
}

fn random_name() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", t, std::process::id())
}

/// Expands `prefix:name` with the document's `$namespaces`.
pub fn expand_format(process: &Value, f: &str) -> String {
    if let Some((prefix, rest)) = f.split_once(':') {
        if let Some(ns) = process
            .get("$namespaces")
            .and_then(|n| n.get(prefix))
            .and_then(Value::as_str)
        {
            return format!("{ns}{rest}");
        }
    }
    f.to_string()
}

fn collect_outputs(
    process: &Value,
    ev: &mut Evaluator,
    names: &Names,
    opts: &Options,
    stdout_name: Option<&str>,
    stderr_name: Option<&str>,
) -> Result<Value, ToolError> {
    let outdir = &opts.outdir;
    let custom = outdir.join("cwl.output.json");
    if custom.is_file() {
        let text = std::fs::read_to_string(&custom).map_err(io_err("cannot read", &custom))?;
        let mut v: Value = serde_json::from_str(&text)
            .map_err(|e| ToolError::Output("cwl.output.json".into(), format!("not JSON: {e}")))?;
        files::visit_mut(&mut v, &mut |f| {
            let class = f
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if f.get("path").is_none() && f.get("location").is_none() {
                return Ok(());
            }
            files::fill(
                f,
                outdir,
                opts.checksums,
                if class == "Directory" {
                    Some("deep_listing")
                } else {
                    None
                },
            )
        })?;
        return shape_outputs(process, v, names);
    }
    let mut out = Map::new();
    for p in process
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = p.get("id").and_then(Value::as_str) else {
            continue;
        };
        let ty = p.get("type").cloned().unwrap_or(Value::Null);
        let oerr = |why: String| ToolError::Output(id.to_string(), why);
        let mut v = match ty.as_str() {
            Some("stdout") => file_at(outdir, stdout_name.unwrap_or(""), opts)?,
            Some("stderr") => file_at(outdir, stderr_name.unwrap_or(""), opts)?,
            _ if p.get("outputBinding").is_none() && record_fields(&ty, names).is_some() => {
                let mut rec = Map::new();
                for f in record_fields(&ty, names).unwrap_or_default() {
                    let name = f
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let fty = f.get("type").cloned().unwrap_or(Value::Null);
                    let binding = f.get("outputBinding").cloned().unwrap_or(Value::Null);
                    let mut fv = collect_binding(process, &f, &binding, &fty, ev, names, opts)?;
                    if let Some(sf) = f.get("secondaryFiles") {
                        let patterns = crate::load::normalize_secondary(sf);
                        add_secondary(
                            &mut fv,
                            patterns.as_array().map(Vec::as_slice).unwrap_or(&[]),
                            ev,
                            false,
                        )?;
                        secondary_checksums(&mut fv, opts)?;
                    }
                    if let Some(fmt) = f.get("format") {
                        if let Some(fs) = ev.eval(fmt, &fv)?.as_str() {
                            let fs = expand_format(process, fs);
                            files::visit_mut(&mut fv, &mut |file| {
                                file["format"] = Value::String(fs.clone());
                                Ok(())
                            })?;
                        }
                    }
                    rec.insert(name, fv);
                }
                Value::Object(rec)
            }
            _ => {
                let binding = p.get("outputBinding").cloned().unwrap_or(Value::Null);
                collect_binding(process, p, &binding, &ty, ev, names, opts).map_err(
                    |e| match e {
                        ToolError::Output(..) => e,
                        ToolError::Expr(x) => oerr(x.to_string()),
                        other => other,
                    },
                )?
            }
        };
        if let Some(Value::Array(patterns)) = p.get("secondaryFiles") {
            add_secondary(&mut v, patterns, ev, false)?;
            secondary_checksums(&mut v, opts)?;
        }
        if let Some(fmt) = p.get("format") {
            let fv = ev.eval(fmt, &v)?;
            if let Some(f) = fv.as_str() {
                let f = expand_format(process, f);
                files::visit_mut(&mut v, &mut |file| {
                    if file.get("class").and_then(Value::as_str) == Some("File") {
                        file["format"] = Value::String(f.clone());
                    }
                    Ok(())
                })?;
            }
        }
        if !matches(&ty, &v, names) && !(v.is_null() && (optional(&ty, names) || ty == "Any")) {
            return Err(oerr(format!(
                "{} is not of type {}",
                short_json(&v),
                crate::types::describe(&ty)
            )));
        }
        out.insert(id.to_string(), v);
    }
    Ok(Value::Object(out))
}

fn file_at(outdir: &Path, name: &str, opts: &Options) -> Result<Value, ToolError> {
    let mut v = serde_json::json!({"class": "File", "location": format!("file://{}", outdir.join(name).display())});
    files::fill(&mut v, outdir, opts.checksums, None)?;
    Ok(v)
}

fn collect_binding(
    process: &Value,
    param: &Value,
    binding: &Value,
    ty: &Value,
    ev: &mut Evaluator,
    names: &Names,
    opts: &Options,
) -> Result<Value, ToolError> {
    let outdir = &opts.outdir;
    let mut found: Vec<Value> = Vec::new();
    if let Some(g) = binding.get("glob") {
        let patterns: Vec<String> = match ev.eval(g, &Value::Null)? {
            Value::Array(a) => a.iter().map(cmdline::to_str).collect::<Result<_, _>>()?,
            Value::Null => Vec::new(),
            other => vec![cmdline::to_str(&other)?],
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        for pat in patterns {
            let full = if Path::new(&pat).is_absolute() {
                PathBuf::from(&pat)
            } else {
                outdir.join(&pat)
            };
            if pat == "." || pat == "./" {
                paths.push(outdir.clone());
                continue;
            }
            let mut hits: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
                .map_err(|e| ToolError::Output(param_id(param), format!("bad glob `{pat}`: {e}")))?
                .flatten()
                .collect();
            hits.sort();
            for h in hits {
                if !h.starts_with(outdir) && !Path::new(&pat).is_absolute() {
                    continue;
                }
                if !paths.contains(&h) {
                    paths.push(h);
                }
            }
        }
        let want_dirs = type_mentions(ty, "Directory", names);
        let want_files = type_mentions(ty, "File", names) || !want_dirs;
        let load = binding
            .get("loadContents")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            || param
                .get("loadContents")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let listing = binding
            .get("loadListing")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| load_listing(process, param))
            .or_else(|| want_dirs.then(|| "deep_listing".to_string()));
        for p in paths {
            let is_dir = p.is_dir();
            if (is_dir && !want_dirs && want_files && binding.get("outputEval").is_none())
                || (!is_dir && !want_files)
            {
                continue;
            }
            let class = if is_dir { "Directory" } else { "File" };
            let mut v =
                serde_json::json!({"class": class, "location": format!("file://{}", p.display())});
            files::fill(
                &mut v,
                outdir,
                opts.checksums,
                if is_dir { listing.as_deref() } else { None },
            )?;
            if load && !is_dir {
                v["contents"] = Value::String(files::read_contents(&p)?);
            }
            found.push(v);
        }
    }
    let mut v = Value::Array(found);
    if let Some(e) = binding.get("outputEval") {
        v = ev.eval(e, &v)?;
        files::visit_mut(&mut v, &mut |f| {
            if f.get("path").is_some() || f.get("location").is_some() {
                files::fill(f, outdir, opts.checksums, None)?;
            }
            Ok(())
        })?;
        return Ok(v);
    }
    if binding.get("glob").is_none() {
        return Ok(Value::Null);
    }
    // A single File or Directory wanted: the one match (none is null).
    let single = !type_is_array(ty, names);
    if single {
        if let Value::Array(a) = &v {
            return match a.len() {
                0 => Ok(Value::Null),
                1 => Ok(a[0].clone()),
                n => Err(ToolError::Output(
                    param_id(param),
                    format!("glob matched {n} files where one is declared"),
                )),
            };
        }
    }
    Ok(v)
}

/// The fields of a record type (named or in place).
fn record_fields(t: &Value, names: &Names) -> Option<Vec<Value>> {
    let t = names.resolve(t);
    match t {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("record") => {
            o.get("fields").and_then(Value::as_array).cloned()
        }
        _ => None,
    }
}

fn param_id(p: &Value) -> String {
    p.get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn type_mentions(t: &Value, what: &str, names: &Names) -> bool {
    let t = names.resolve(t);
    match t {
        Value::String(s) => s == what || s == "Any",
        Value::Array(a) => a.iter().any(|x| type_mentions(x, what, names)),
        Value::Object(o) => {
            o.get("items")
                .is_some_and(|i| type_mentions(i, what, names))
                || o.get("type")
                    .is_some_and(|i| !i.is_string() && type_mentions(i, what, names))
        }
        _ => false,
    }
}

fn type_is_array(t: &Value, names: &Names) -> bool {
    let t = names.resolve(t);
    match t {
        Value::Array(a) => a.iter().any(|x| type_is_array(x, names)),
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("array"),
        Value::String(s) => s == "Any",
        _ => false,
    }
}
