//! CWL values between this host and the mesh, for `caroni cwl-runner`:
//! every File and Directory of a job order (at any depth, with secondary
//! files and listings) is uploaded and replaced by its reference; every
//! reference of an output is downloaded into `--outdir` and described as
//! a CWL File or Directory there.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use caroni_types::file::FileRef;
use serde_json::{json, Map, Value};

use crate::client::Context;

/// Key of a planned upload's index in a File object, replaced by the
/// reference once uploaded.
const UPLOAD: &str = "caroni:upload";

/// `v` with every File and Directory uploaded and replaced by its
/// reference. Places are read against `base`; literals (`contents`, a
/// listing without a place) are written under `scratch` first. `process`
/// expands namespaced formats.
pub async fn upload(
    ctx: &Context,
    v: &Value,
    base: &Path,
    scratch: &Path,
    process: &Value,
) -> anyhow::Result<Value> {
    let mut files = Vec::new();
    let mut planned = plan(v, base, scratch, process, &mut files)?;
    let mut refs = Vec::with_capacity(files.len());
    for p in &files {
        if !p.is_file() {
            anyhow::bail!(
                "{} is not a file: the job order or the document names it as a File",
                p.display()
            );
        }
        refs.push(crate::files::upload(ctx, p).await?);
    }
    finish(&mut planned, &refs);
    Ok(planned)
}

/// True when `v` holds a File or Directory anywhere.
pub fn holds_files(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.iter().any(holds_files),
        Value::Object(m) => {
            matches!(
                m.get("class").and_then(Value::as_str),
                Some("File" | "Directory")
            ) || m.values().any(holds_files)
        }
        _ => false,
    }
}

fn name_of(v: &Value, p: Option<&Path>) -> Option<String> {
    v.get("basename")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| p?.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn plan(
    v: &Value,
    base: &Path,
    scratch: &Path,
    process: &Value,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<Value> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| plan(x, base, scratch, process, files))
            .collect(),
        Value::Object(m) => match m.get("class").and_then(Value::as_str) {
            Some("File") => {
                let p = local_file(v, base, scratch)?;
                let mut o = Map::new();
                o.insert("class".into(), json!("File"));
                o.insert(
                    "basename".into(),
                    json!(name_of(v, Some(&p)).unwrap_or_else(|| "file".into())),
                );
                o.insert(UPLOAD.into(), json!(files.len()));
                files.push(p);
                if let Some(Value::String(f)) = m.get("format") {
                    o.insert(
                        "format".into(),
                        json!(caroni_cwl_exec::run::expand_format(process, f)),
                    );
                }
                if let Some(Value::Array(sf)) = m.get("secondaryFiles") {
                    let planned = sf
                        .iter()
                        .map(|x| plan(x, base, scratch, process, files))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    o.insert("secondaryFiles".into(), Value::Array(planned));
                }
                Ok(Value::Object(o))
            }
            Some("Directory") => {
                let place = caroni_cwl_exec::files::path_of(v, base);
                let listing: Vec<Value> = match (m.get("listing"), &place) {
                    (Some(Value::Array(l)), _) => l.clone(),
                    (_, Some(p)) => caroni_cwl_exec::files::list_dir(p, false, false)
                        .with_context(|| format!("cannot list directory {}", p.display()))?,
                    (_, None) => Vec::new(),
                };
                let planned = listing
                    .iter()
                    .map(|x| plan(x, base, scratch, process, files))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut d = json!({
                    "class": "Directory",
                    "basename": name_of(v, place.as_deref()).unwrap_or_else(|| "dir".into()),
                    "listing": planned,
                });
                if m.contains_key("listing") {
                    // Given listed: a tool sees that listing.
                    d["literal"] = json!(true);
                }
                Ok(d)
            }
            _ => m
                .iter()
                .map(|(k, x)| Ok((k.clone(), plan(x, base, scratch, process, files)?)))
                .collect::<anyhow::Result<Map<_, _>>>()
                .map(Value::Object),
        },
        other => Ok(other.clone()),
    }
}

fn finish(v: &mut Value, refs: &[FileRef]) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| finish(x, refs)),
        Value::Object(m) => {
            if let Some(r) = m
                .remove(UPLOAD)
                .and_then(|i| i.as_u64())
                .and_then(|i| refs.get(i as usize))
            {
                m.insert("sha256".into(), json!(r.sha256));
                m.insert("size".into(), json!(r.size));
            }
            m.values_mut().for_each(|x| finish(x, refs));
        }
        _ => {}
    }
}

/// The local file a File value of the job order names (a literal with
/// `contents` is written to `scratch` first).
pub fn local_file(v: &Value, base: &Path, scratch: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = caroni_cwl_exec::files::path_of(v, base) {
        return Ok(p);
    }
    let contents = v
        .get("contents")
        .and_then(Value::as_str)
        .context("a File in the job order has neither `location`, `path` nor `contents`")?;
    let name = v
        .get("basename")
        .and_then(Value::as_str)
        .unwrap_or("literal");
    let dir = tempfile::Builder::new()
        .prefix("literal-")
        .tempdir_in(scratch)
        .with_context(|| format!("cannot create a directory in {}", scratch.display()))?
        .keep();
    let p = dir.join(name);
    std::fs::write(&p, contents)?;
    Ok(p)
}

/// `v` with every reference downloaded into `outdir` and described as a
/// File or Directory there (checksums, sizes and listings filled in).
pub async fn download(ctx: &Context, v: &Value, outdir: &Path) -> anyhow::Result<Value> {
    let mut jobs = Vec::new();
    let mut placed = lay_out(v, outdir, &mut jobs)?;
    for (f, to) in &jobs {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::files::download(ctx, f, to).await?;
    }
    caroni_cwl_exec::files::visit_top_mut(&mut placed, &mut |x| {
        let listing =
            (x.get("class").and_then(Value::as_str) == Some("Directory")).then_some("deep_listing");
        caroni_cwl_exec::files::fill(x, outdir, true, listing)
    })?;
    Ok(placed)
}

/// A free place for `name` in `dir` (numbered subdirectories when taken,
/// also by a download still to come).
fn free_place(dir: &Path, name: &str, jobs: &[(FileRef, PathBuf)]) -> PathBuf {
    let taken = |p: &Path| p.exists() || jobs.iter().any(|(_, j)| j.starts_with(p));
    let mut to = dir.join(name);
    let mut n = 1;
    while taken(&to) {
        to = dir.join(n.to_string()).join(name);
        n += 1;
    }
    to
}

/// Decides where each reference of `v` goes (files to download in
/// `jobs`, directories created) and describes them by place.
fn lay_out(v: &Value, dir: &Path, jobs: &mut Vec<(FileRef, PathBuf)>) -> anyhow::Result<Value> {
    match v {
        Value::Array(a) => a.iter().map(|x| lay_out(x, dir, jobs)).collect(),
        Value::Object(m) => match m.get("class").and_then(Value::as_str) {
            Some("File") => {
                let f = FileRef::of_data(v)
                    .map_err(|e| anyhow::anyhow!("an output File is not a reference: {}", e.0))?;
                let to = free_place(dir, &f.basename, jobs);
                let here = to.parent().map(Path::to_path_buf).unwrap_or_default();
                jobs.push((f, to.clone()));
                let mut o =
                    json!({"class": "File", "location": format!("file://{}", to.display())});
                if let Some(fmt) = m.get("format") {
                    o["format"] = fmt.clone();
                }
                if let Some(Value::Array(sf)) = m.get("secondaryFiles") {
                    let placed = sf
                        .iter()
                        .map(|x| lay_out(x, &here, jobs))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    o["secondaryFiles"] = Value::Array(placed);
                }
                Ok(o)
            }
            Some("Directory") => {
                let name = m.get("basename").and_then(Value::as_str).unwrap_or("dir");
                let to = free_place(dir, name, jobs);
                std::fs::create_dir_all(&to)
                    .with_context(|| format!("cannot create {}", to.display()))?;
                for e in m
                    .get("listing")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    lay_out(e, &to, jobs)?;
                }
                Ok(json!({"class": "Directory", "location": format!("file://{}", to.display())}))
            }
            _ => m
                .iter()
                .map(|(k, x)| Ok((k.clone(), lay_out(x, dir, jobs)?)))
                .collect::<anyhow::Result<Map<_, _>>>()
                .map(Value::Object),
        },
        other => Ok(other.clone()),
    }
}
