//! Real CWL CommandLineTools on this host (`--cwl-tools local`): the tool
//! the job carries is run by `caroni-cwl-exec` in a fresh directory
//! `<work>/cwl/<job id>`, with File and Directory inputs staged from the
//! blob store under `inputs/` and the tool's output directory `out/`. Values arrive
//! as text and are read by the tool's declared types; outputs leave as
//! text, File outputs stored in the blob store as for every executor.
//!
//! Files and Directories anywhere in a value (records, arrays, secondary
//! files, listings) are staged and collected by `cwl_values`.
//!
//! With `--cwl-tools container` the command line runs in a container of
//! the tool's DockerRequirement image (`docker run`, the job's directory
//! bound at its own path, no network unless NetworkAccess asks for it,
//! as the agent's user), labelled so that a restart removes leftovers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use caroni_blob::Blobs;
use caroni_cwl_exec::types::{from_text, Names};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::output::{failed, failed_as, tail};
use super::RunSpec;
use crate::machine::{Failure, RunResult};

/// Runs CWL tools under `work_root`.
#[derive(Clone, Debug)]
pub struct CwlExecutor {
    work_root: PathBuf,
    blobs: Option<Blobs>,
    limits: caroni_cwl_exec::expr::Limits,
    /// Set in container mode: the node id its containers are labelled
    /// with (so that the Docker executor removes those left by a crash).
    container_of: Option<String>,
}

impl CwlExecutor {
    /// Working directories go under `work_root`.
    pub fn new(work_root: PathBuf, blobs: Option<Blobs>) -> Self {
        Self {
            work_root,
            blobs,
            limits: caroni_cwl_exec::expr::Limits::default(),
            container_of: None,
        }
    }

    /// Runs every tool in a container of its DockerRequirement's image
    /// (`--cwl-tools container`), labelled as the agent `node_id`'s.
    pub fn in_containers(mut self, node_id: String) -> Self {
        self.container_of = Some(node_id);
        self
    }

    /// Bounds of every expression a tool evaluates.
    pub fn with_limits(mut self, limits: caroni_cwl_exec::expr::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs the job's tool until it ends, its time is up or `cancel` fires.
    pub async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
        let stop = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (stop, timed_out, timeout) = (stop.clone(), timed_out.clone(), spec.timeout);
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(timeout) => timed_out.store(true, Ordering::Relaxed),
                }
                stop.store(true, Ordering::Relaxed);
            })
        };
        let dir = self.work_root.join(spec.job_id.to_string());
        let blobs = self.blobs.clone();
        let timeout = spec.timeout;
        let limits = self.limits;
        let container_of = self.container_of.clone();
        let r = tokio::task::spawn_blocking(move || {
            run_blocking(&spec, &dir, blobs, stop, limits, container_of)
        })
        .await;
        watcher.abort();
        match r {
            Ok(r) if timed_out.load(Ordering::Relaxed) => match r {
                RunResult::Failed { stderr_tail, .. } => RunResult::Failed {
                    message: format!("timed out after {} s", timeout.as_secs()),
                    exit_status: None,
                    stderr_tail,
                    kind: Failure::Timeout,
                },
                done => done,
            },
            Ok(r) => r,
            Err(e) => failed(format!("the run was lost: {e}"), None, b""),
        }
    }
}

fn run_blocking(
    spec: &RunSpec,
    dir: &std::path::Path,
    blobs: Option<Blobs>,
    stop: Arc<AtomicBool>,
    limits: caroni_cwl_exec::expr::Limits,
    container_of: Option<String>,
) -> RunResult {
    let tool: Value = match spec.cwl_tool.as_deref().map(serde_json::from_str) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return failed(format!("the job's CWL tool is not JSON: {e}"), None, b""),
        None => return failed("the job carries no CWL tool".into(), None, b""),
    };
    let _ = std::fs::remove_dir_all(dir);
    let (inputs_dir, outdir, tmpdir) = (dir.join("inputs"), dir.join("out"), dir.join("tmp"));
    for d in [&inputs_dir, &outdir, &tmpdir] {
        if let Err(e) = std::fs::create_dir_all(d) {
            return failed(format!("cannot create {}: {e}", d.display()), None, b"");
        }
    }
    let names = Names::of(&tool);
    let mut stager = super::cwl_values::Stager::new(blobs.as_ref(), &inputs_dir);
    let mut order = serde_json::Map::new();
    for (id, ty) in caroni_cwl_exec::load::params(&tool, "inputs") {
        let v = match spec.inputs.get(id.as_str()) {
            None => Value::Null,
            Some(text) if text == "null" => Value::Null,
            // The string "null", which travels as JSON (`null` is absent).
            Some(text) if text == "\"null\"" => Value::String("null".into()),
            Some(text) => match from_text(&ty, text, &names) {
                Ok(v) => v,
                Err(why) => return failed(format!("input `{id}`: {why}"), None, b""),
            },
        };
        match stager.stage(&id, v) {
            Ok(v) => order.insert(id, v),
            Err(why) => return failed(why, None, b""),
        };
    }
    let container = match container_of {
        None => None,
        Some(node_id) => {
            let Some(image) = caroni_cwl_exec::run::docker_image(&tool) else {
                return failed(
                    "this agent runs only CWL tools with a DockerRequirement (--cwl-tools container)"
                        .into(),
                    None,
                    b"",
                );
            };
            // The container writes as the agent's user, who made `dir`.
            use std::os::unix::fs::MetadataExt;
            let user = std::fs::metadata(dir)
                .ok()
                .map(|m| format!("{}:{}", m.uid(), m.gid()));
            Some(caroni_cwl_exec::run::Container {
                docker: "docker".into(),
                image,
                name: super::docker::container_name(spec.job_id),
                mounts: vec![dir.to_path_buf()],
                user,
                labels: vec![(super::docker::AGENT_LABEL.to_string(), node_id)],
            })
        }
    };
    // The tool's stderr goes straight to the job's log when logs are
    // kept (followed live, bounded when the tool ends).
    let stderr_log = match &spec.logs {
        Some(l) => {
            let _ = std::fs::remove_file(&l.stdout);
            l.stderr.clone()
        }
        None => tmpdir.join("caroni-stderr.log"),
    };
    let opts = caroni_cwl_exec::Options {
        outdir: outdir.clone(),
        tmpdir: tmpdir.clone(),
        limits,
        // A local tool finds its programs as the agent's user does (as the
        // reference runner passes its own PATH on); bash job types keep
        // their fixed PATH.
        path_env: std::env::var("PATH")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| super::output::JOB_PATH.to_string()),
        checksums: false,
        cancel: Some(stop),
        stderr_to: Some(stderr_log.clone()),
        container,
    };
    let order = Value::Object(order);
    let result = caroni_cwl_exec::run(
        &caroni_cwl_exec::Job {
            process: &tool,
            process_dir: dir,
            inputs: &order,
            inputs_dir: &inputs_dir,
        },
        &opts,
    );
    let stderr = read_end(&stderr_log, crate::machine::STDERR_TAIL_BYTES as u64);
    if let Some(l) = &spec.logs {
        l.bound(crate::logs::Stream::Stderr);
    }
    let out = match result {
        Ok(out) => out,
        Err(caroni_cwl_exec::ToolError::Exit { code, .. }) => {
            return failed(
                format!("the tool exited with status {code}"),
                Some(code),
                &stderr,
            )
        }
        Err(caroni_cwl_exec::ToolError::Cancelled) => {
            return failed_as(Failure::Killed, "stopped".into(), None, &stderr)
        }
        Err(e) => return failed(e.to_string(), None, &stderr),
    };
    let output_types: BTreeMap<String, Value> = caroni_cwl_exec::load::params(&tool, "outputs")
        .into_iter()
        .collect();
    let mut outputs = BTreeMap::new();
    let mut collector = super::cwl_values::Collector::new(blobs.as_ref(), dir, &tmpdir);
    for name in &spec.outputs {
        let v = out.get(name).cloned().unwrap_or(Value::Null);
        let v = match collector.collect(&v) {
            Ok(v) => v,
            Err(why) => {
                return failed_as(
                    Failure::Output,
                    format!("output `{name}`: {why}"),
                    Some(0),
                    &stderr,
                )
            }
        };
        let text = match &v {
            Value::String(s) if !caroni_types::file::refs_in(s).is_empty() => {
                return failed(
                    format!("output `{name}`: a string shaped like a file reference is not a file"),
                    Some(0),
                    &stderr,
                )
            }
            // A string travels as it is where its type reads it back as
            // that string (`string`); elsewhere (`Any`, unions) as JSON.
            // (The text `null` is an absent value: the string "null"
            // travels as JSON.)
            Value::String(s) => {
                let ty = output_types.get(name).cloned().unwrap_or(Value::Null);
                if s != "null" && from_text(&ty, s, &names).as_ref() == Ok(&v) {
                    s.clone()
                } else {
                    v.to_string()
                }
            }
            other => other.to_string(),
        };
        outputs.insert(name.clone(), text);
    }
    RunResult::Completed {
        outputs,
        stderr_tail: tail(&stderr),
    }
}

/// The last `bytes` of a file (nothing when it cannot be read).
fn read_end(path: &std::path::Path, bytes: u64) -> Vec<u8> {
    use std::io::{Read, Seek};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    if f.seek(std::io::SeekFrom::Start(len.saturating_sub(bytes)))
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = f.take(bytes).read_to_end(&mut out);
    out
}
