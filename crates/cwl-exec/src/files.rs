//! File and Directory objects: filling in what the specification says a
//! runner computes (`path`, `basename`, `nameroot`, `nameext`, `dirname`,
//! `size`, `checksum`, `listing`), secondary files by pattern, and
//! `loadContents`.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha1::Digest;

/// Most bytes `loadContents` reads (the specification's limit).
pub const CONTENTS_LIMIT: u64 = 64 * 1024;

/// Why a file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It does not exist or cannot be read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Over the `loadContents` limit.
    #[error("loadContents: {0} is larger than 64 KiB")]
    TooLarge(PathBuf),
    /// A File or Directory object without a place.
    #[error("a {0} object has neither `location`, `path` nor `contents`")]
    Nowhere(String),
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |source| FileError::Io { what, path, source }
}

/// The path a File or Directory object names, made absolute against
/// `base`.
pub fn path_of(v: &Value, base: &Path) -> Option<PathBuf> {
    let raw = v
        .get("path")
        .and_then(Value::as_str)
        .or_else(|| v.get("location").and_then(Value::as_str))?;
    let raw = crate::load::uri_to_path(raw);
    let decoded = percent_decode(raw);
    let p = Path::new(&decoded);
    Some(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    })
}

/// Decodes `%xx` escapes of a file URI.
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `nameroot` and `nameext` of a basename.
pub fn split_name(basename: &str) -> (String, String) {
    match basename.rfind('.') {
        Some(i) if i > 0 => (basename[..i].to_string(), basename[i..].to_string()),
        _ => (basename.to_string(), String::new()),
    }
}

/// Reads at most 64 KiB of a file for `contents`.
pub fn read_contents(path: &Path) -> Result<String, FileError> {
    let f = std::fs::File::open(path).map_err(io("cannot open", path))?;
    let mut buf = Vec::new();
    f.take(CONTENTS_LIMIT + 1)
        .read_to_end(&mut buf)
        .map_err(io("cannot read", path))?;
    if buf.len() as u64 > CONTENTS_LIMIT {
        return Err(FileError::TooLarge(path.to_path_buf()));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `sha1$…` of a file.
pub fn checksum(path: &Path) -> Result<String, FileError> {
    let mut f = std::fs::File::open(path).map_err(io("cannot open", path))?;
    let mut h = sha1::Sha1::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io("cannot read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    let mut out = String::from("sha1$");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

/// Fills a File or Directory object that names a place on this host:
/// absolute `path` and `location`, names, `size` (and, with `checksums`,
/// `checksum`); a Directory's `listing` when `listing` says so ("shallow"
/// or "deep"). Nested secondary files too.
pub fn fill(
    v: &mut Value,
    base: &Path,
    checksums: bool,
    listing: Option<&str>,
) -> Result<(), FileError> {
    let class = v
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if class != "File" && class != "Directory" {
        return Ok(());
    }
    let Some(path) = path_of(v, base) else {
        if v.get("contents").is_some() || v.get("listing").is_some() {
            // A literal: made real later, where it is staged.
            return Ok(());
        }
        return Err(FileError::Nowhere(class));
    };
    let m = match v.as_object_mut() {
        Some(m) => m,
        None => return Ok(()),
    };
    let basename = m
        .get("basename")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let p = path.to_string_lossy().into_owned();
    m.insert("path".into(), Value::String(p.clone()));
    m.insert("location".into(), Value::String(format!("file://{p}")));
    m.insert("basename".into(), Value::String(basename.clone()));
    if let Some(d) = path.parent() {
        m.insert(
            "dirname".into(),
            Value::String(d.to_string_lossy().into_owned()),
        );
    }
    if class == "File" {
        let (root, ext) = split_name(&basename);
        m.insert("nameroot".into(), Value::String(root));
        m.insert("nameext".into(), Value::String(ext));
        let meta = std::fs::metadata(&path).map_err(io("cannot find input file", &path))?;
        m.insert("size".into(), Value::from(meta.len()));
        if checksums {
            m.insert("checksum".into(), Value::String(checksum(&path)?));
        }
        if let Some(Value::Array(sf)) = m.get_mut("secondaryFiles") {
            for s in sf {
                fill(s, base, checksums, listing)?;
            }
        }
    } else {
        if !path.is_dir() {
            return Err(FileError::Io {
                what: "not a directory:".into(),
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        match listing {
            Some(kind @ ("shallow_listing" | "deep_listing")) => {
                let list = list_dir(&path, kind == "deep_listing", checksums)?;
                m.insert("listing".into(), Value::Array(list));
            }
            _ => {
                if let Some(Value::Array(l)) = m.get_mut("listing") {
                    for s in l {
                        fill(s, base, checksums, listing)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The entries of a directory as File and Directory objects, by name.
pub fn list_dir(dir: &Path, deep: bool, checksums: bool) -> Result<Vec<Value>, FileError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io("cannot list", dir))?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for p in names {
        let mut o = Map::new();
        let is_dir = p.is_dir();
        o.insert(
            "class".into(),
            Value::String(if is_dir { "Directory" } else { "File" }.into()),
        );
        o.insert(
            "location".into(),
            Value::String(format!("file://{}", p.display())),
        );
        let mut v = Value::Object(o);
        let sub = if is_dir && deep {
            Some("deep_listing")
        } else {
            None
        };
        fill(&mut v, dir, checksums, sub)?;
        out.push(v);
    }
    Ok(out)
}

/// The name a secondary-file pattern gives for a primary basename: each
/// leading `^` strips one extension, the rest is appended.
pub fn substitute(basename: &str, pattern: &str) -> String {
    let mut base = basename.to_string();
    let mut p = pattern;
    while let Some(rest) = p.strip_prefix('^') {
        if let Some(i) = base.rfind('.') {
            base.truncate(i);
        }
        p = rest;
    }
    base + p
}

/// Visits every File and Directory object in `v` (arrays, records,
/// secondary files, listings).
pub fn visit_mut(
    v: &mut Value,
    f: &mut dyn FnMut(&mut Value) -> Result<(), FileError>,
) -> Result<(), FileError> {
    match v {
        Value::Object(m) => {
            let class = m.get("class").and_then(Value::as_str).map(str::to_string);
            if matches!(class.as_deref(), Some("File" | "Directory")) {
                f(v)?;
                if let Some(m) = v.as_object_mut() {
                    for k in ["secondaryFiles", "listing"] {
                        if let Some(Value::Array(a)) = m.get_mut(k) {
                            for x in a {
                                visit_mut(x, f)?;
                            }
                        }
                    }
                }
            } else {
                for (_, x) in m.iter_mut() {
                    visit_mut(x, f)?;
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                visit_mut(x, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Visits the outermost File and Directory objects of `v` (in arrays and
/// records), not what they hold: for work such as [`fill`] that treats
/// an object's secondary files and listing itself.
pub fn visit_top_mut(
    v: &mut Value,
    f: &mut dyn FnMut(&mut Value) -> Result<(), FileError>,
) -> Result<(), FileError> {
    match v {
        Value::Object(m) => {
            if matches!(
                m.get("class").and_then(Value::as_str),
                Some("File" | "Directory")
            ) {
                f(v)
            } else {
                m.values_mut().try_for_each(|x| visit_top_mut(x, f))
            }
        }
        Value::Array(a) => a.iter_mut().try_for_each(|x| visit_top_mut(x, f)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_patterns() {
        assert_eq!(split_name("a.tar.gz"), ("a.tar".into(), ".gz".into()));
        assert_eq!(split_name(".bashrc"), (".bashrc".into(), String::new()));
        assert_eq!(substitute("x.bam", ".bai"), "x.bam.bai");
        assert_eq!(substitute("x.bam", "^.bai"), "x.bai");
        assert_eq!(substitute("x.tar.gz", "^^.idx"), "x.idx");
        assert_eq!(percent_decode("a%20b"), "a b");
    }
}
