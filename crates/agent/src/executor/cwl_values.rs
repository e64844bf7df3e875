//! CWL values in and out of a tool's run: every File and Directory
//! reference in an input value (at any depth, with secondary files and
//! listings) is staged from the blob store as a real file or tree under
//! the run's `inputs/`; every File and Directory of the tool's output
//! object is stored in the blob store and replaced by its reference (the
//! data form of `caroni_types::file::data_refs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use caroni_blob::Blobs;
use caroni_types::file::FileRef;
use serde_json::{json, Map, Value};

/// Places input references under `root`, one numbered directory per
/// top-level File or Directory.
pub(crate) struct Stager<'a> {
    blobs: Option<&'a Blobs>,
    root: PathBuf,
    next: usize,
}

impl<'a> Stager<'a> {
    pub(crate) fn new(blobs: Option<&'a Blobs>, root: &Path) -> Self {
        Self {
            blobs,
            root: root.to_path_buf(),
            next: 0,
        }
    }

    /// `v`, the value of input `input`, with every reference replaced by
    /// a File or Directory object naming its staged place.
    pub(crate) fn stage(&mut self, input: &str, v: Value) -> Result<Value, String> {
        match v {
            Value::Array(a) => a.into_iter().map(|x| self.stage(input, x)).collect(),
            Value::Object(m) => match m.get("class").and_then(Value::as_str) {
                Some("File" | "Directory") => {
                    let dir = self.root.join(self.next.to_string());
                    self.next += 1;
                    mkdir(&dir)?;
                    self.place(input, &Value::Object(m), &dir)
                        .map_err(|why| format!("input `{input}`: {why}"))
                }
                _ => m
                    .into_iter()
                    .map(|(k, x)| Ok((k, self.stage(input, x)?)))
                    .collect::<Result<Map<_, _>, String>>()
                    .map(Value::Object),
            },
            other => Ok(other),
        }
    }

    /// Places one reference (and what it holds) in `dir`.
    fn place(&self, input: &str, v: &Value, dir: &Path) -> Result<Value, String> {
        let basename = v
            .get("basename")
            .and_then(Value::as_str)
            .ok_or("a File or Directory value has no basename")?;
        caroni_types::file::check_basename(basename).map_err(|e| e.0)?;
        let at = dir.join(basename);
        let mut out = Map::new();
        if v.get("class").and_then(Value::as_str) == Some("Directory") {
            mkdir(&at)?;
            let mut listing = Vec::new();
            for entry in v
                .get("listing")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                listing.push(self.place(input, entry, &at)?);
            }
            out.insert("class".into(), json!("Directory"));
            if v.get("literal") == Some(&json!(true)) {
                // A Directory literal: its listing is part of the value.
                out.insert("listing".into(), Value::Array(listing));
            }
        } else {
            let f = FileRef::of_data(v)
                .map_err(|e| format!("a File value is not a reference: {}", e.0))?;
            let blobs = self
                .blobs
                .ok_or("a File input came, but this agent has no blob store")?;
            super::files::place(blobs, input, &f, &at).map_err(|e| match e {
                // Said once, by `stage`.
                super::files::FileError::Missing { file, .. } => {
                    format!("file {file} is not in this agent's blob store")
                }
                super::files::FileError::Stage { reason, .. } => reason,
                other => other.to_string(),
            })?;
            out.insert("class".into(), json!("File"));
            if let Some(fmt) = v.get("format") {
                out.insert("format".into(), fmt.clone());
            }
            if let Some(Value::Array(sf)) = v.get("secondaryFiles") {
                let mut staged = Vec::new();
                for s in sf {
                    staged.push(self.place(input, s, dir)?);
                }
                out.insert("secondaryFiles".into(), Value::Array(staged));
            }
        }
        let p = at.display().to_string();
        out.insert("location".into(), json!(format!("file://{p}")));
        out.insert("path".into(), json!(p));
        out.insert("basename".into(), json!(basename));
        Ok(Value::Object(out))
    }
}

fn mkdir(d: &Path) -> Result<(), String> {
    std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))
}

/// Stores the files of a tool's output values in the blob store.
pub(crate) struct Collector<'a> {
    blobs: Option<&'a Blobs>,
    /// The run's directory: every output file must be under it.
    dir: PathBuf,
    /// Where literals (`contents` without a place) are written.
    scratch: PathBuf,
    /// Files already stored, by their real path (one file may be named
    /// twice; a stored file is moved away).
    done: HashMap<PathBuf, FileRef>,
    written: usize,
}

impl<'a> Collector<'a> {
    pub(crate) fn new(blobs: Option<&'a Blobs>, dir: &Path, scratch: &Path) -> Self {
        Self {
            blobs,
            dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
            scratch: scratch.to_path_buf(),
            done: HashMap::new(),
            written: 0,
        }
    }

    /// `v` with every File and Directory replaced by its reference.
    pub(crate) fn collect(&mut self, v: &Value) -> Result<Value, String> {
        match v {
            Value::Array(a) => a.iter().map(|x| self.collect(x)).collect(),
            Value::Object(m) => match m.get("class").and_then(Value::as_str) {
                Some("File") => self.file(v),
                Some("Directory") => self.directory(v),
                _ => m
                    .iter()
                    .map(|(k, x)| Ok((k.clone(), self.collect(x)?)))
                    .collect::<Result<Map<_, _>, String>>()
                    .map(Value::Object),
            },
            other => Ok(other.clone()),
        }
    }

    fn file(&mut self, v: &Value) -> Result<Value, String> {
        let path = match caroni_cwl_exec::files::path_of(v, &self.dir) {
            Some(p) => p,
            None => {
                let contents = v
                    .get("contents")
                    .and_then(Value::as_str)
                    .ok_or("an output File has neither a path nor contents")?;
                let name = v.get("basename").and_then(Value::as_str).unwrap_or("file");
                let d = self.scratch.join(format!("literal-{}", self.written));
                self.written += 1;
                mkdir(&d)?;
                let p = d.join(name);
                std::fs::write(&p, contents)
                    .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
                p
            }
        };
        let basename = v
            .get("basename")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| format!("{} has no file name", path.display()))?;
        let r = self.store(&path, &basename)?;
        let mut out = Map::new();
        out.insert("class".into(), json!("File"));
        out.insert("sha256".into(), json!(r.sha256));
        out.insert("size".into(), json!(r.size));
        out.insert("basename".into(), json!(basename));
        if let Some(f @ Value::String(_)) = v.get("format") {
            out.insert("format".into(), f.clone());
        }
        if let Some(Value::Array(sf)) = v.get("secondaryFiles") {
            let mut refs = Vec::new();
            for s in sf {
                refs.push(self.collect(s)?);
            }
            out.insert("secondaryFiles".into(), Value::Array(refs));
        }
        Ok(Value::Object(out))
    }

    fn directory(&mut self, v: &Value) -> Result<Value, String> {
        let basename = v.get("basename").and_then(Value::as_str);
        let listing = match caroni_cwl_exec::files::path_of(v, &self.dir) {
            Some(p) => {
                let real = self.inside(&p)?;
                let mut names: Vec<PathBuf> = std::fs::read_dir(&real)
                    .map_err(|e| format!("cannot list output directory {}: {e}", p.display()))?
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                names.sort();
                let mut list = Vec::new();
                for n in names {
                    let loc = json!(format!("file://{}", n.display()));
                    let class = if n.is_dir() { "Directory" } else { "File" };
                    list.push(self.collect(&json!({"class": class, "location": loc}))?);
                }
                let name = basename
                    .map(str::to_string)
                    .or_else(|| real.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "dir".into());
                return Ok(json!({"class": "Directory", "basename": name, "listing": list}));
            }
            None => v
                .get("listing")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        };
        let mut list = Vec::new();
        for e in &listing {
            list.push(self.collect(e)?);
        }
        Ok(json!({
            "class": "Directory",
            "basename": basename.unwrap_or("dir"),
            "listing": list,
            "literal": true,
        }))
    }

    /// The real path of `p`, which must be under the run's directory.
    fn inside(&self, p: &Path) -> Result<PathBuf, String> {
        let real = p
            .canonicalize()
            .map_err(|_| format!("output {} does not exist", p.display()))?;
        if !real.starts_with(&self.dir) {
            return Err(format!(
                "output {} is outside the tool's working directory",
                p.display()
            ));
        }
        Ok(real)
    }

    fn store(&mut self, p: &Path, basename: &str) -> Result<FileRef, String> {
        let real = self.inside(p)?;
        if let Some(r) = self.done.get(&real) {
            let mut r = r.clone();
            r.basename = basename.to_string();
            return Ok(r);
        }
        if !real.is_file() {
            return Err(format!("output {} is not a regular file", p.display()));
        }
        let blobs = self
            .blobs
            .ok_or("the tool has File outputs, but this agent has no blob store")?;
        // Staged inputs are in the store already; the tool's own files
        // are moved there.
        let take = !real.starts_with(self.dir.join("inputs"));
        let r = blobs
            .ingest(&real, basename, take)
            .map_err(|e| format!("cannot store output {}: {e}", p.display()))?;
        self.done.insert(real, r.clone());
        Ok(r)
    }
}
