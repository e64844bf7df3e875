//! File values in and out of a run, for every executor.
//!
//! In: a File input (its value a reference, see `caroni_types::file`) is
//! staged read-only in the working directory as
//! `files/<input>/<basename>` (a `File[]` as `files/<input>/<n>/<basename>`),
//! linked from the blob store (copied where a link is impossible).
//! `CARONI_FILE_<input>` names the file (the directory of a `File[]`);
//! `CARONI_ENV_<input>` holds the reference with its `path` added (a list
//! of them for `File[]`).
//!
//! Out: a job declares a File output by printing
//! `{"<output>": {"class": "File", "path": "relative/or/absolute"}}`; the
//! file must be a regular file inside the working directory. It is hashed
//! and moved into the blob store, and the output's value is its reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caroni_blob::Blobs;
use caroni_types::file::{files_of, list_text, FileRef, Files};

/// Why a run's files could not be staged or collected.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The agent has no blob store (it runs without files).
    #[error("input `{0}` is a File, but this agent has no blob store")]
    NoStore(String),
    /// A blob the job needs is not here.
    #[error("input `{input}`: file {file} is not in this agent's blob store")]
    Missing {
        /// The input.
        input: String,
        /// The file, described.
        file: String,
    },
    /// The file system refused.
    #[error("cannot stage input `{input}`: {reason}")]
    Stage {
        /// The input.
        input: String,
        /// Why.
        reason: String,
    },
    /// A declared File output is wrong.
    #[error("output `{output}`: {reason}")]
    Output {
        /// The output.
        output: String,
        /// What is wrong, and what to print instead.
        reason: String,
    },
}

/// Stages the File inputs of `inputs` under `dir`, which the job sees as
/// `seen_at` (a container's mount point; `dir` itself elsewhere). Returns,
/// per File input, the path for `CARONI_FILE_<input>` and the value for
/// `CARONI_ENV_<input>` (the reference with its path), as the job sees
/// them.
pub fn stage(
    blobs: Option<&Blobs>,
    inputs: &BTreeMap<String, String>,
    dir: &Path,
    seen_at: &Path,
) -> Result<BTreeMap<String, (PathBuf, String)>, FileError> {
    let seen = |p: &Path| match p.strip_prefix(dir) {
        Ok(rel) => seen_at.join(rel),
        Err(_) => p.to_path_buf(),
    };
    let mut staged = BTreeMap::new();
    for (name, value) in inputs {
        let files = files_of(value);
        if files == Files::None {
            continue;
        }
        let blobs = blobs.ok_or_else(|| FileError::NoStore(name.clone()))?;
        let base = dir.join("files").join(name);
        let err = |reason: String| FileError::Stage {
            input: name.clone(),
            reason,
        };
        let mut with_paths = Vec::new();
        let target = match &files {
            Files::One(f) => {
                std::fs::create_dir_all(&base).map_err(|e| err(e.to_string()))?;
                let p = base.join(&f.basename);
                place(blobs, name, f, &p)?;
                with_paths.push(with_path(f, &seen(&p)));
                seen(&p)
            }
            Files::Many(list) => {
                for (n, f) in list.iter().enumerate() {
                    let d = base.join(n.to_string());
                    std::fs::create_dir_all(&d).map_err(|e| err(e.to_string()))?;
                    let p = d.join(&f.basename);
                    place(blobs, name, f, &p)?;
                    with_paths.push(with_path(f, &seen(&p)));
                }
                seen(&base)
            }
            Files::None => continue,
        };
        let env = match files {
            Files::One(_) => with_paths.pop().map(|v| v.to_string()).unwrap_or_default(),
            _ => serde_json::Value::Array(with_paths).to_string(),
        };
        staged.insert(name.clone(), (target, env));
    }
    Ok(staged)
}

fn with_path(f: &FileRef, p: &Path) -> serde_json::Value {
    serde_json::json!({
        "class": "File",
        "path": p.display().to_string(),
        "basename": f.basename,
        "size": f.size,
        "sha256": f.sha256,
    })
}

/// Links (else copies) the blob of `f` to `to`, read-only.
pub(crate) fn place(blobs: &Blobs, input: &str, f: &FileRef, to: &Path) -> Result<(), FileError> {
    if !blobs.holds(f) {
        return Err(FileError::Missing {
            input: input.to_string(),
            file: f.describe(),
        });
    }
    let from = blobs.path(&f.sha256);
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(&from, to).is_err() {
        std::fs::copy(&from, to).map_err(|e| FileError::Stage {
            input: input.to_string(),
            reason: format!("cannot copy {} to {}: {e}", f.basename, to.display()),
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o444));
    }
    blobs.touch(&f.sha256);
    Ok(())
}

/// The path a File output names: `{"class": "File", "path": …}`, or
/// `None` for any other value.
pub(crate) fn declared_path(v: &serde_json::Value) -> Option<Result<String, String>> {
    let m = v.as_object()?;
    if m.get("class").and_then(|c| c.as_str()) != Some("File") {
        return None;
    }
    Some(match m.get("path").or_else(|| m.get("location")) {
        Some(serde_json::Value::String(p)) if !p.is_empty() => Ok(p.clone()),
        _ => Err("a File needs a `path` (the file's path in the working directory)".into()),
    })
}

/// Stores the files the outputs declare (values `{"class": "File", "path":
/// …}` as text, from `parse_outputs`) and replaces each with its reference.
/// `dir` is the working directory; `seen_from` maps a path the job printed
/// to where it is on this host (a container's working directory).
pub fn collect(
    blobs: Option<&Blobs>,
    outputs: &mut BTreeMap<String, String>,
    dir: &Path,
    seen_from: Option<&Path>,
) -> Result<(), FileError> {
    for (name, value) in outputs.iter_mut() {
        let parsed: serde_json::Value = match serde_json::from_str(value) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(v @ serde_json::Value::Array(_)) => v,
            _ => continue,
        };
        let err = |reason: String| FileError::Output {
            output: name.clone(),
            reason,
        };
        let items: Vec<&serde_json::Value> = match &parsed {
            serde_json::Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        let paths: Vec<Option<Result<String, String>>> =
            items.iter().map(|v| declared_path(v)).collect();
        if paths.iter().all(Option::is_none) {
            continue;
        }
        let blobs = blobs.ok_or_else(|| err("this agent has no blob store for files".into()))?;
        let mut refs = Vec::new();
        for p in paths {
            let p = p
                .ok_or_else(|| err("a list mixes files with other values".into()))?
                .map_err(err)?;
            refs.push(ingest(blobs, &p, dir, seen_from).map_err(err)?);
        }
        *value = match parsed {
            serde_json::Value::Array(_) => list_text(&refs),
            _ => refs.pop().map(|r| r.to_text()).unwrap_or_default(),
        };
    }
    Ok(())
}

/// What a run that exited 0 yields: its stdout's outputs with the files
/// they declare stored (on the blocking pool), or the failure that says
/// what was wrong. `dir` and `seen_from` as for [`collect`].
pub(crate) async fn completed(
    blobs: Option<Blobs>,
    stdout: &[u8],
    spec: &crate::executor::RunSpec,
    dir: PathBuf,
    seen_from: Option<&'static Path>,
    stderr: &[u8],
) -> crate::machine::RunResult {
    use super::output::{failed, failed_as, parse_outputs, tail};
    let mut outputs = match parse_outputs(stdout, &spec.outputs) {
        Ok(o) => o,
        Err(msg) => return failed(msg.to_string(), Some(0), stderr),
    };
    let collected = tokio::task::spawn_blocking(move || {
        collect(blobs.as_ref(), &mut outputs, &dir, seen_from).map(|()| outputs)
    })
    .await;
    match collected {
        Ok(Ok(outputs)) => crate::machine::RunResult::Completed {
            outputs,
            stderr_tail: tail(stderr),
        },
        Ok(Err(e)) => failed_as(
            crate::machine::Failure::Output,
            e.to_string(),
            Some(0),
            stderr,
        ),
        Err(e) => failed(e.to_string(), Some(0), stderr),
    }
}

fn ingest(
    blobs: &Blobs,
    printed: &str,
    dir: &Path,
    seen_from: Option<&Path>,
) -> Result<FileRef, String> {
    let printed_path = Path::new(printed);
    let on_host = match (printed_path.is_absolute(), seen_from) {
        (true, Some(inside)) => match printed_path.strip_prefix(inside) {
            Ok(rel) => dir.join(rel),
            Err(_) => {
                return Err(format!(
                    "`{printed}` is outside the working directory {}; write outputs there",
                    inside.display()
                ))
            }
        },
        (true, None) => printed_path.to_path_buf(),
        (false, _) => dir.join(printed_path),
    };
    let real_dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot read the working directory: {e}"))?;
    let real = on_host
        .canonicalize()
        .map_err(|_| format!("`{printed}` does not exist (the job printed it as a File output)"))?;
    if !real.starts_with(&real_dir) {
        return Err(format!(
            "`{printed}` is outside the working directory; a File output must be written under it"
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("cannot read `{printed}`: {e}"))?;
    if meta.is_dir() {
        return Err(format!(
            "`{printed}` is a directory, but a File was declared"
        ));
    }
    if !meta.is_file() {
        return Err(format!("`{printed}` is not a regular file"));
    }
    let basename = real
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("`{printed}` has no usable file name"))?
        .to_string();
    // A staged input printed back as an output is in the store already.
    blobs
        .ingest(&real, &basename, !real.starts_with(real_dir.join("files")))
        .map_err(|e| e.to_string())
}
