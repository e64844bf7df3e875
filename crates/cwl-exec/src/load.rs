//! Reading CWL documents as the reference runner does: YAML or JSON,
//! `$import` and `$include`, packed documents (`$graph` with `#main` or a
//! named fragment), `run:` given as a relative path or a `#fragment`, and
//! the shorthands of the syntax (`string?`, `File[]`, inputs and
//! requirements written as maps). What comes out is one normalised JSON
//! object per process, with plain ids (`x`, not `#main/x`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Why a document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It is not YAML.
    #[error("{path} is not valid YAML or JSON: {why}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        why: String,
    },
    /// It is YAML but not a CWL process.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// A loaded process and where it came from (relative paths in it and in
/// its job order resolve against `dir`).
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The normalised process object.
    pub process: Value,
    /// The directory of the document.
    pub dir: PathBuf,
}

fn read_yaml(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_yaml(&text, path)
}

/// Parses YAML (or JSON) text into JSON.
///
/// A whole number written with an exponent (`1.23e5`) is read as the
/// integer it is: the reference runner writes such a number as the
/// decimal it was written as (`123000`, not `123000.0` or `1.23e+05`),
/// and an integer is a valid `float` and `double` in CWL.
pub fn parse_yaml(text: &str, path: &Path) -> Result<Value, LoadError> {
    let mut v = serde_yaml_ng::from_str::<Value>(text).map_err(|e| LoadError::Syntax {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let wholes = whole_exponent_numbers(text);
    if !wholes.is_empty() {
        integral_floats(&mut v, &wholes);
    }
    Ok(v)
}

/// The whole numbers (below 2^53) the text writes with an exponent.
fn whole_exponent_numbers(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')))
    {
        if !token.contains(['e', 'E'])
            || !token.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '+' | '.'))
        {
            continue;
        }
        if let Ok(f) = token.parse::<f64>() {
            if f.is_finite() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                out.push(f);
            }
        }
    }
    out
}

fn integral_floats(v: &mut Value, wholes: &[f64]) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| wholes.contains(f)) {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| integral_floats(x, wholes)),
        Value::Object(m) => m.values_mut().for_each(|x| integral_floats(x, wholes)),
        _ => {}
    }
}

/// `p` made absolute against the current directory.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Strips a `file://` prefix.
pub fn uri_to_path(s: &str) -> &str {
    s.strip_prefix("file://").unwrap_or(s)
}

/// Replaces `$import` and `$include` objects by what they name.
fn resolve_directives(v: &mut Value, dir: &Path, depth: usize) -> Result<(), LoadError> {
    if depth > 32 {
        return Err(LoadError::Invalid {
            path: dir.to_path_buf(),
            why: "$import nested more than 32 deep (a cycle?)".into(),
        });
    }
    match v {
        Value::Object(m) => {
            if let Some(Value::String(target)) = m.get("$import").cloned() {
                let path = dir.join(uri_to_path(target.split('#').next().unwrap_or("")));
                let mut inner = read_yaml(&path)?;
                let idir = path.parent().unwrap_or(dir).to_path_buf();
                resolve_directives(&mut inner, &idir, depth + 1)?;
                *v = inner;
                return Ok(());
            }
            if let Some(Value::String(target)) = m.get("$include").cloned() {
                let path = dir.join(uri_to_path(&target));
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| LoadError::Read { path, source })?;
                *v = Value::String(text);
                return Ok(());
            }
            for (_, x) in m.iter_mut() {
                resolve_directives(x, dir, depth + 1)?;
            }
        }
        Value::Array(a) => {
            for x in a {
                resolve_directives(x, dir, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The last segment of an id: `#main/x` and `file.cwl#x` → `x`.
pub fn short_id(id: &str) -> String {
    let after_hash = id.rsplit_once('#').map_or(id, |(_, f)| f);
    after_hash
        .rsplit_once('/')
        .map_or(after_hash, |(_, l)| l)
        .to_string()
}

/// Loads the process at `reference` (a path, with an optional
/// `#fragment` naming a process of a packed document).
pub fn load(reference: &str) -> Result<Loaded, LoadError> {
    let (file, fragment) = match reference.split_once('#') {
        Some((f, frag)) => (f, Some(frag)),
        None => (reference, None),
    };
    let path = absolute(Path::new(uri_to_path(file)));
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut doc = read_yaml(&path)?;
    resolve_directives(&mut doc, &dir, 0)?;
    let graph = doc.get("$graph").and_then(Value::as_array).cloned();
    let version = doc
        .get("cwlVersion")
        .cloned()
        .unwrap_or(Value::String("v1.2".into()));
    let mut process = match (&graph, fragment) {
        (Some(g), _) => {
            let want = fragment.unwrap_or("main");
            let found = g
                .iter()
                .find(|p| {
                    p.get("id").and_then(Value::as_str).map(short_id).as_deref() == Some(want)
                })
                .or_else(|| (fragment.is_none() && g.len() == 1).then(|| &g[0]))
                .cloned();
            found.ok_or_else(|| LoadError::Invalid {
                path: path.clone(),
                why: format!("the packed document has no process `#{want}`"),
            })?
        }
        (None, _) => doc,
    };
    if let Value::Object(m) = &mut process {
        m.entry("cwlVersion").or_insert(version);
    }
    let mut ctx = Ctx {
        path: path.clone(),
        dir: dir.clone(),
        graph: graph.unwrap_or_default(),
        depth: 0,
    };
    normalize_process(&mut process, &mut ctx)?;
    Ok(Loaded { process, dir })
}

struct Ctx {
    path: PathBuf,
    dir: PathBuf,
    graph: Vec<Value>,
    depth: usize,
}

impl Ctx {
    fn invalid(&self, why: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            path: self.path.clone(),
            why: why.into(),
        }
    }
}

/// A list of parameters written as a map (`name: type` or `name: {…}`) or
/// a list, as a list of objects with `id`.
fn param_list(v: Option<&Value>, key: &str) -> Vec<Value> {
    match v {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                let mut o = match x {
                    Value::Object(o) => o.clone(),
                    // `name: type`
                    other => {
                        let mut o = Map::new();
                        o.insert("type".into(), other.clone());
                        o
                    }
                };
                o.insert(key.into(), Value::String(k.clone()));
                Value::Object(o)
            })
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::Object(o) => {
                    let mut o = o.clone();
                    if let Some(Value::String(id)) = o.get(key) {
                        let id = short_id(id);
                        o.insert(key.into(), Value::String(id));
                    }
                    Value::Object(o)
                }
                Value::String(s) => {
                    let mut o = Map::new();
                    o.insert(key.into(), Value::String(short_id(s)));
                    Value::Object(o)
                }
                other => other.clone(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Requirements or hints written as a map (`Class: {…}`) or a list.
fn requirement_list(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                let mut o = x.as_object().cloned().unwrap_or_default();
                o.insert("class".into(), Value::String(k.clone()));
                Value::Object(o)
            })
            .collect(),
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    }
}

/// A type expression with its shorthands spelt out.
pub fn normalize_type(t: &Value) -> Value {
    match t {
        Value::String(s) => {
            if let Some(inner) = s.strip_suffix('?') {
                let inner = normalize_type(&Value::String(inner.to_string()));
                return Value::Array(vec![Value::String("null".into()), inner]);
            }
            if let Some(inner) = s.strip_suffix("[]") {
                let mut o = Map::new();
                o.insert("type".into(), Value::String("array".into()));
                o.insert(
                    "items".into(),
                    normalize_type(&Value::String(inner.to_string())),
                );
                return Value::Object(o);
            }
            let plain = s
                .strip_prefix("https://w3id.org/cwl/salad#")
                .or_else(|| s.strip_prefix("https://w3id.org/cwl/cwl#"))
                .or_else(|| s.strip_prefix("http://www.w3.org/2001/XMLSchema#"))
                .unwrap_or(s);
            match plain {
                "null" | "boolean" | "int" | "long" | "float" | "double" | "string" | "File"
                | "Directory" | "Any" | "stdout" | "stderr" | "stdin" => {
                    Value::String(plain.to_string())
                }
                // A named type (SchemaDefRequirement): by its last segment.
                other => Value::String(short_id(other)),
            }
        }
        Value::Array(a) => {
            let mut out: Vec<Value> = Vec::new();
            for x in a {
                match normalize_type(x) {
                    Value::Array(inner) => out.extend(inner),
                    n => out.push(n),
                }
            }
            Value::Array(out)
        }
        Value::Object(m) => {
            let mut o = m.clone();
            match m.get("type").and_then(Value::as_str) {
                Some("array") => {
                    if let Some(items) = m.get("items") {
                        o.insert("items".into(), normalize_type(items));
                    }
                }
                Some("record") => {
                    let fields = param_list(m.get("fields"), "name")
                        .into_iter()
                        .map(|mut f| {
                            if let Some(t) = f.get("type").cloned() {
                                f["type"] = normalize_type(&t);
                            }
                            f
                        })
                        .collect();
                    o.insert("fields".into(), Value::Array(fields));
                    if let Some(Value::String(n)) = m.get("name") {
                        o.insert("name".into(), Value::String(short_id(n)));
                    }
                }
                Some("enum") => {
                    if let Some(Value::Array(symbols)) = m.get("symbols") {
                        let s = symbols
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .map(short_id)
                                    .map(Value::String)
                                    .unwrap_or(x.clone())
                            })
                            .collect();
                        o.insert("symbols".into(), Value::Array(s));
                    }
                    if let Some(Value::String(n)) = m.get("name") {
                        o.insert("name".into(), Value::String(short_id(n)));
                    }
                }
                _ => {
                    if let Some(inner) = m.get("type") {
                        if !inner.is_string() {
                            o.insert("type".into(), normalize_type(inner));
                        }
                    }
                }
            }
            Value::Object(o)
        }
        other => other.clone(),
    }
}

fn normalize_params(list: Vec<Value>) -> Vec<Value> {
    list.into_iter()
        .map(|mut p| {
            if let Some(t) = p.get("type").cloned() {
                p["type"] = normalize_type(&t);
            }
            if let Value::Object(o) = &mut p {
                // `secondaryFiles: ".bai"` → a list of {pattern, required}.
                if let Some(sf) = o.get("secondaryFiles").cloned() {
                    o.insert("secondaryFiles".into(), normalize_secondary(&sf));
                }
            }
            p
        })
        .collect()
}

/// `secondaryFiles` as a list of `{pattern, required}`.
pub fn normalize_secondary(v: &Value) -> Value {
    let one = |x: &Value| -> Value {
        match x {
            Value::String(s) => {
                let (pattern, required) = match s.strip_suffix('?') {
                    Some(p) => (p.to_string(), Value::Bool(false)),
                    None => (s.clone(), Value::Null),
                };
                let mut o = Map::new();
                o.insert("pattern".into(), Value::String(pattern));
                o.insert("required".into(), required);
                Value::Object(o)
            }
            other => other.clone(),
        }
    };
    match v {
        Value::Array(a) => Value::Array(a.iter().map(one).collect()),
        other => Value::Array(vec![one(other)]),
    }
}

fn normalize_process(p: &mut Value, ctx: &mut Ctx) -> Result<(), LoadError> {
    ctx.depth += 1;
    if ctx.depth > 64 {
        return Err(ctx.invalid("processes nested more than 64 deep (a cycle in `run`?)"));
    }
    let Value::Object(m) = p else {
        return Err(ctx.invalid("a CWL process is an object with a `class`"));
    };
    let class = m
        .get("class")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ctx.invalid("the document has no `class` (CommandLineTool, ExpressionTool, Workflow, Operation)"))?;
    let inputs = normalize_params(param_list(m.get("inputs"), "id"));
    let outputs = normalize_params(param_list(m.get("outputs"), "id"));
    m.insert("inputs".into(), Value::Array(inputs));
    m.insert("outputs".into(), Value::Array(outputs));
    for k in ["requirements", "hints"] {
        let mut list = requirement_list(m.get(k));
        for r in &mut list {
            if let Some(Value::String(c)) = r.get("class").cloned() {
                r["class"] = Value::String(short_id(&c));
            }
            if r.get("class").and_then(Value::as_str) == Some("SchemaDefRequirement") {
                if let Some(Value::Array(types)) = r.get("types").cloned() {
                    r["types"] = Value::Array(types.iter().map(normalize_type).collect());
                }
            }
        }
        m.insert(k.into(), Value::Array(list));
    }
    if let Some(Value::String(id)) = m.get("id").cloned() {
        m.insert("id".into(), Value::String(short_id(&id)));
    }
    if class == "Workflow" {
        let mut steps = param_list(m.get("steps"), "id");
        for s in &mut steps {
            {
                let k = "in";
                let list = param_list(s.get(k), "id");
                let list: Vec<Value> = list
                    .into_iter()
                    .map(|mut x| {
                        // `name: source` shorthand
                        if x.get("source").is_none() && x.get("type").is_some() {
                            if let Some(src) = x.get("type").cloned() {
                                x["source"] = src;
                                if let Value::Object(o) = &mut x {
                                    o.remove("type");
                                }
                            }
                        }
                        x
                    })
                    .collect();
                s[k] = Value::Array(list);
            }
            let outs: Vec<Value> = match s.get("out") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| match x {
                        Value::String(id) => Value::String(short_id(id)),
                        Value::Object(o) => Value::String(
                            o.get("id")
                                .and_then(Value::as_str)
                                .map(short_id)
                                .unwrap_or_default(),
                        ),
                        other => other.clone(),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            s["out"] = Value::Array(outs);
            for k in ["requirements", "hints"] {
                let list = requirement_list(s.get(k));
                s[k] = Value::Array(list);
            }
            let run = s.get("run").cloned();
            let mut sub = match run {
                Some(Value::String(r)) => {
                    if let Some(frag) = r.strip_prefix('#') {
                        ctx.graph
                            .iter()
                            .find(|p| {
                                p.get("id").and_then(Value::as_str).map(short_id).as_deref()
                                    == Some(frag)
                            })
                            .cloned()
                            .ok_or_else(|| {
                                ctx.invalid(format!(
                                    "step `run: {r}` names no process of the packed document"
                                ))
                            })?
                    } else {
                        let loaded = load(&ctx.dir.join(uri_to_path(&r)).to_string_lossy())?;
                        let mut v = loaded.process;
                        v["$dir"] = Value::String(loaded.dir.to_string_lossy().into_owned());
                        s["run"] = v;
                        continue;
                    }
                }
                Some(v @ Value::Object(_)) => v,
                _ => return Err(ctx.invalid("a step needs `run`")),
            };
            normalize_process(&mut sub, ctx)?;
            s["run"] = sub;
        }
        m.insert("steps".into(), Value::Array(steps));
    }
    ctx.depth -= 1;
    Ok(())
}

/// Normalises a process written inline (in a template): the same
/// shorthands as [`load`], with no file to read (a `run:` that names a
/// file is refused).
pub fn normalize(mut process: Value) -> Result<Value, LoadError> {
    let mut ctx = Ctx {
        path: PathBuf::from("(inline)"),
        dir: PathBuf::from("/nonexistent-inline-dir"),
        graph: Vec::new(),
        depth: 0,
    };
    normalize_process(&mut process, &mut ctx)?;
    Ok(process)
}

/// The `(id, type)` of a normalised process's `inputs` or `outputs`.
pub fn params(process: &Value, key: &str) -> Vec<(String, Value)> {
    process
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some((
                        x.get("id")?.as_str()?.to_string(),
                        x.get("type")
                            .cloned()
                            .unwrap_or(Value::String("Any".into())),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The declared `default` of each input that has one.
pub fn defaults(process: &Value) -> Map<String, Value> {
    input_fields(process, "default")
}

/// The field `field` (`default`, `secondaryFiles`, …) of each input that
/// has one, by input id.
pub fn input_fields(process: &Value, field: &str) -> Map<String, Value> {
    process
        .get("inputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get("id")?.as_str()?.to_string(), p.get(field)?.clone())))
        .collect()
}

/// Finds a requirement of `class` (requirements first, then hints).
pub fn requirement<'a>(process: &'a Value, class: &str) -> Option<&'a Value> {
    for k in ["requirements", "hints"] {
        if let Some(Value::Array(list)) = process.get(k) {
            if let Some(r) = list
                .iter()
                .find(|r| r.get("class").and_then(Value::as_str) == Some(class))
            {
                return Some(r);
            }
        }
    }
    None
}

/// Reads a job order (YAML or JSON); an absent one is `{}`.
pub fn load_job(path: Option<&Path>) -> Result<(Value, PathBuf), LoadError> {
    let Some(path) = path else {
        return Ok((Value::Object(Map::new()), absolute(Path::new("."))));
    };
    let path = &absolute(path);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = read_yaml(path)?;
    resolve_directives(&mut v, &dir, 0)?;
    if v.is_null() {
        v = Value::Object(Map::new());
    }
    if !v.is_object() {
        return Err(LoadError::Invalid {
            path: path.to_path_buf(),
            why: "a job order is an object of input values".into(),
        });
    }
    Ok((v, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_written_with_an_exponent_read_as_integers() {
        let v = parse_yaml(
            "a: 1.23e5\nb: 0.00001\nc: 2.0\nd: 1.23e-05\ne: [1E3, x1e5]\n",
            Path::new("t.yml"),
        )
        .expect("parses");
        assert_eq!(v["a"], serde_json::json!(123000));
        assert!(v["a"].is_i64());
        assert_eq!(v["b"].as_f64(), Some(0.00001));
        assert!(v["c"].is_f64(), "2.0 stays a float: {v}");
        assert!(v["d"].is_f64());
        assert_eq!(v["e"], serde_json::json!([1000, "x1e5"]));
    }
}
