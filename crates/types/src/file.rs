//! File values: a reference to a blob named by its SHA-256, never the
//! bytes. A File value travels and is stored as the canonical JSON text of
//! its reference, `{"class":"File","sha256":"…","size":N,"basename":"…"}`
//! (a CWL tool's output may add its `format`, which the reference
//! ignores); a `File[]` value as a JSON array of such references. CWL
//! values that hold files elsewhere (Directories, records, secondary
//! files) are JSON with references inside, see [`data_refs`].
//!
//! The text is self-describing, so every layer (the manager's routing, the
//! outbox, the agent's job records) carries File values exactly as it
//! carries strings. It is unambiguous because no string can take that form
//! by accident: the manager refuses a string input shaped like a reference
//! (declare the input `type: File`), and an agent refuses a job's string
//! output shaped like one (a job declares a File output as
//! `{"class": "File", "path": …}`). So any value that parses as a
//! reference is one.

use serde::{Deserialize, Serialize};

/// Longest basename accepted (bytes), as most filesystems allow.
pub const MAX_BASENAME: usize = 255;
/// Most files in one `File[]` value.
pub const MAX_FILES_PER_VALUE: usize = 10_000;

/// A reference to a file held in a node's blob store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileRef {
    /// SHA-256 of the content, 64 lowercase hex digits.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The file's name (no directory part).
    pub basename: String,
}

/// The wire form: `class` first, no other keys.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    class: &'a str,
    sha256: &'a str,
    size: u64,
    basename: std::borrow::Cow<'a, str>,
    /// A CWL format IRI: carried in the text for CWL tools, not part of
    /// the reference.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    format: Option<std::borrow::Cow<'a, str>>,
}

/// Why a text is not a valid File reference, or a name not a valid
/// basename.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FileError(pub String);

/// True for 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a file's name: not empty, not `.` or `..`, no `/` or NUL, at
/// most 255 bytes.
pub fn check_basename(name: &str) -> Result<(), FileError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(FileError(format!("`{name}` is not a file name")));
    }
    if name.len() > MAX_BASENAME {
        return Err(FileError(format!(
            "a file name of {} bytes is longer than {MAX_BASENAME}",
            name.len()
        )));
    }
    if name.contains(['/', '\0']) {
        return Err(FileError(format!(
            "file name `{}` holds `/` or NUL",
            name.escape_debug()
        )));
    }
    Ok(())
}

impl FileRef {
    /// A reference, checked.
    pub fn new(sha256: String, size: u64, basename: String) -> Result<Self, FileError> {
        if !is_sha256(&sha256) {
            return Err(FileError(format!(
                "`{}` is not a SHA-256 (64 lowercase hex digits)",
                sha256.escape_debug()
            )));
        }
        check_basename(&basename)?;
        Ok(Self {
            sha256,
            size,
            basename,
        })
    }

    /// The canonical text of the reference.
    pub fn to_text(&self) -> String {
        serde_json::to_string(&Wire {
            class: "File",
            sha256: &self.sha256,
            size: self.size,
            basename: std::borrow::Cow::Borrowed(&self.basename),
            format: None,
        })
        .unwrap_or_default()
    }

    /// The reference a text holds, if it is exactly one.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim_start();
        if !t.starts_with('{') {
            return None;
        }
        let w: Wire<'_> = serde_json::from_str(t).ok()?;
        if w.class != "File" {
            return None;
        }
        Self::new(w.sha256.to_string(), w.size, w.basename.into_owned()).ok()
    }

    /// The reference a File object of CWL data names (its `sha256`,
    /// `size` and `basename`; other keys are not looked at here).
    pub fn of_data(v: &serde_json::Value) -> Result<Self, FileError> {
        let text = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
        };
        let size = v
            .get("size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| FileError("a File value has no `size`; upload the file first".into()))?;
        Self::new(
            text("sha256").to_string(),
            size,
            text("basename").to_string(),
        )
    }

    /// Short form for people: `name (1.2 MB, sha256 ab12cd34…)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, sha256 {}…)",
            self.basename,
            human_bytes(self.size),
            &self.sha256[..12]
        )
    }
}

/// The text of a `File[]` value.
pub fn list_text(files: &[FileRef]) -> String {
    let mut s = String::from("[");
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&f.to_text());
    }
    s.push(']');
    s
}

/// What a value is: a string, one file, or a list of files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Files {
    /// Not a file value.
    None,
    /// One File.
    One(FileRef),
    /// A `File[]` (possibly empty).
    Many(Vec<FileRef>),
}

impl Files {
    /// Every reference of the value.
    pub fn refs(&self) -> Vec<&FileRef> {
        match self {
            Files::None => Vec::new(),
            Files::One(f) => vec![f],
            Files::Many(v) => v.iter().collect(),
        }
    }

    /// Every reference of the value, owned.
    pub fn into_refs(self) -> Vec<FileRef> {
        match self {
            Files::None => Vec::new(),
            Files::One(f) => vec![f],
            Files::Many(v) => v,
        }
    }
}

/// The file references a value holds: one reference, or a JSON array of
/// at least one reference and nothing else. `[]` is not a file value (an
/// empty `File[]` holds no file, so nothing is transferred either way).
pub fn files_of(text: &str) -> Files {
    let t = text.trim_start();
    if t.starts_with('{') {
        return FileRef::parse(t).map_or(Files::None, Files::One);
    }
    if !t.starts_with("[{") {
        return Files::None;
    }
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(t) else {
        return Files::None;
    };
    if items.is_empty() || items.len() > MAX_FILES_PER_VALUE {
        return Files::None;
    }
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        let Some(f) = serde_json::to_string(&i)
            .ok()
            .and_then(|s| FileRef::parse(&s))
        else {
            return Files::None;
        };
        out.push(f);
    }
    Files::Many(out)
}

/// CWL values that hold files ("data"): any JSON value whose File and
/// Directory objects are references. A File is
/// `{"class":"File","sha256":…,"size":N,"basename":…}` with, optionally,
/// `format` (an IRI) and `secondaryFiles` (more Files and Directories); a
/// Directory is `{"class":"Directory","basename":…,"listing":[…]}`, its
/// listing the whole tree, with `"literal": true` when that listing is
/// part of the value (a Directory literal, which a tool sees listed
/// whatever its `loadListing`). Nothing else may sit in either object: a place
/// on some host (`path`, `location`) means nothing to another node.
///
/// Checks every File and Directory object in `v` and collects the File
/// references (secondary files and listings included) into `out`.
pub fn data_refs(v: &serde_json::Value, out: &mut Vec<FileRef>) -> Result<(), FileError> {
    use serde_json::Value as J;
    match v {
        J::Array(a) => a.iter().try_for_each(|x| data_refs(x, out)),
        J::Object(m) => match m.get("class").and_then(J::as_str) {
            Some("File") => {
                for k in m.keys() {
                    if !matches!(
                        k.as_str(),
                        "class" | "sha256" | "size" | "basename" | "format" | "secondaryFiles"
                    ) {
                        return Err(FileError(format!(
                            "a File value holds `{k}`; a File on the mesh is a reference to uploaded content (sha256, size, basename, format, secondaryFiles)"
                        )));
                    }
                }
                out.push(FileRef::of_data(v)?);
                if m.get("format").is_some_and(|f| !f.is_string()) {
                    return Err(FileError("a File's `format` is not a string".into()));
                }
                match m.get("secondaryFiles") {
                    None => Ok(()),
                    Some(J::Array(a)) => a.iter().try_for_each(|x| data_entry(x, out)),
                    Some(_) => Err(FileError("a File's `secondaryFiles` is not a list".into())),
                }
            }
            Some("Directory") => {
                for k in m.keys() {
                    if !matches!(k.as_str(), "class" | "basename" | "listing" | "literal") {
                        return Err(FileError(format!(
                            "a Directory value holds `{k}`; a Directory on the mesh is a basename and the listing of uploaded files"
                        )));
                    }
                }
                check_basename(m.get("basename").and_then(J::as_str).unwrap_or_default())?;
                match m.get("listing") {
                    Some(J::Array(a)) => a.iter().try_for_each(|x| data_entry(x, out)),
                    _ => Err(FileError("a Directory value has no `listing` list".into())),
                }
            }
            _ => m.values().try_for_each(|x| data_refs(x, out)),
        },
        _ => Ok(()),
    }
}

/// One entry of a listing or of secondary files: a File or a Directory.
fn data_entry(v: &serde_json::Value, out: &mut Vec<FileRef>) -> Result<(), FileError> {
    match v.get("class").and_then(serde_json::Value::as_str) {
        Some("File" | "Directory") => data_refs(v, out),
        _ => Err(FileError(
            "a listing or secondaryFiles entry is neither a File nor a Directory".into(),
        )),
    }
}

/// Every file reference a value holds, at any depth: a File, a `File[]`,
/// or CWL data (see [`data_refs`]; objects that are not valid references
/// are passed over here, and refused where values enter).
pub fn refs_in(text: &str) -> Vec<FileRef> {
    match files_of(text) {
        Files::None => {}
        f => return f.into_refs(),
    }
    let t = text.trim_start();
    if !(t.starts_with('{') || t.starts_with('[')) {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(t) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    collect_valid(&v, &mut out);
    out
}

fn collect_valid(v: &serde_json::Value, out: &mut Vec<FileRef>) {
    use serde_json::Value as J;
    match v {
        J::Array(a) => a.iter().for_each(|x| collect_valid(x, out)),
        J::Object(m)
            if matches!(
                m.get("class").and_then(J::as_str),
                Some("File" | "Directory")
            ) =>
        {
            let mut found = Vec::new();
            if data_refs(v, &mut found).is_ok() {
                out.append(&mut found);
            }
        }
        J::Object(m) => m.values().for_each(|x| collect_valid(x, out)),
        _ => {}
    }
}

/// Lowercase hex of bytes (a digest).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Bytes for people: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FileRef {
        FileRef::new("ab".repeat(32), 1234, "reads.fq".into()).expect("valid")
    }

    #[test]
    fn a_reference_round_trips_through_its_text() {
        let f = sample();
        let t = f.to_text();
        assert_eq!(
            t,
            format!(
                r#"{{"class":"File","sha256":"{}","size":1234,"basename":"reads.fq"}}"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(FileRef::parse(&t), Some(f.clone()));
        assert_eq!(files_of(&t), Files::One(f.clone()));
        let l = list_text(&[f.clone(), f.clone()]);
        assert_eq!(files_of(&l), Files::Many(vec![f.clone(), f]));
    }

    #[test]
    fn only_exact_references_are_files() {
        let sha = "ab".repeat(32);
        for text in [
            "reads.fq".to_string(),
            "{}".into(),
            "[]".into(),
            r#"{"class":"Directory"}"#.into(),
            format!(r#"{{"class":"File","sha256":"{sha}","size":1,"basename":"x","path":"/etc"}}"#),
            format!(
                r#"{{"class":"File","sha256":"{}","size":1,"basename":"x"}}"#,
                "AB".repeat(32)
            ),
            format!(r#"{{"class":"File","sha256":"{sha}","size":-1,"basename":"x"}}"#),
            format!(r#"{{"class":"File","sha256":"{sha}","size":1,"basename":"../x"}}"#),
            format!(r#"{{"class":"File","sha256":"{sha}","size":1,"basename":".."}}"#),
            format!(r#"[{{"class":"File","sha256":"{sha}","size":1,"basename":"x"}}, "y"]"#),
        ] {
            assert_eq!(files_of(&text), Files::None, "{text}");
        }
    }

    #[test]
    fn data_values_hold_references_at_any_depth() {
        let f = sample().to_text();
        let data = format!(
            r#"{{"reads": [{{"class":"File","sha256":"{sha}","size":3,"basename":"a.bam","format":"http://edamontology.org/format_2572","secondaryFiles":[{{"class":"File","sha256":"{sha}","size":3,"basename":"a.bai"}}]}}], "ref": {{"class":"Directory","basename":"genome","listing":[{f}, {{"class":"Directory","basename":"sub","listing":[]}}]}}, "n": 3}}"#,
            sha = "cd".repeat(32)
        );
        let v: serde_json::Value = serde_json::from_str(&data).expect("json");
        let mut refs = Vec::new();
        data_refs(&v, &mut refs).expect("valid data");
        assert_eq!(refs.len(), 3);
        assert_eq!(refs_in(&data).len(), 3);
        assert_eq!(refs_in(&f), vec![sample()]);
        assert!(refs_in("plain text").is_empty());
        for bad in [
            r#"{"class":"File","location":"file:///etc/passwd"}"#.to_string(),
            r#"{"class":"Directory","basename":"d"}"#.into(),
            r#"{"class":"Directory","basename":"..","listing":[]}"#.into(),
            r#"{"class":"Directory","basename":"d","listing":["x"]}"#.into(),
            format!(
                r#"{{"class":"File","sha256":"{}","size":1,"basename":"x","path":"/etc"}}"#,
                "ab".repeat(32)
            ),
        ] {
            let v: serde_json::Value = serde_json::from_str(&bad).expect("json");
            assert!(data_refs(&v, &mut Vec::new()).is_err(), "{bad}");
            assert!(refs_in(&bad).is_empty(), "{bad}");
        }
    }

    #[test]
    fn basenames_are_checked() {
        assert!(check_basename("a.txt").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_basename(bad).is_err(), "{bad:?}");
        }
        assert!(check_basename(&"x".repeat(256)).is_err());
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
