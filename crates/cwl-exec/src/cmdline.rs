//! Building a CommandLineTool's command line as CWL v1.2 §"Input binding"
//! says: `arguments` and every `inputBinding` (of inputs, array items and
//! record fields, nested) become bindings with a sort key of positions and
//! names; sorted, each binding gives its words (`prefix`, `separate`,
//! `itemSeparator`, `valueFrom`), after `baseCommand`.

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::expr::{number_text, Evaluator, ExprError};
use crate::types::{matches, Names};

/// One element of a sort key: numbers sort before names (as the reference
/// runner orders them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// A position or an index.
    Int(i64),
    /// An input or field name.
    Str(String),
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Key::Int(a), Key::Int(b)) => a.cmp(b),
            (Key::Str(a), Key::Str(b)) => a.cmp(b),
            (Key::Int(_), Key::Str(_)) => Ordering::Less,
            (Key::Str(_), Key::Int(_)) => Ordering::Greater,
        }
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A binding with its sort key and the value it binds.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Sort key.
    pub key: Vec<Key>,
    /// The `inputBinding` (or argument) fields.
    pub binding: Map<String, Value>,
    /// The value bound (absent for an argument with only `valueFrom`).
    pub datum: Value,
}

/// Why a command line cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// An expression failed.
    #[error(transparent)]
    Expr(#[from] ExprError),
    /// A value fits no branch of its union type.
    #[error("input value {value} is not of type {ty}")]
    Union {
        /// The value.
        value: String,
        /// The type.
        ty: String,
    },
    /// A `position` expression gave something else than an integer.
    #[error("`position` must be an integer; `{0}` gave {1}")]
    Position(String, String),
    /// A File or Directory without a path.
    #[error("a {0} value has no `path` to put on the command line")]
    NoPath(String),
    /// `separate: false` without a prefix.
    #[error("'separate' option can not be specified without prefix")]
    SeparateWithoutPrefix,
}

fn position(
    binding: &Map<String, Value>,
    datum: &Value,
    ev: &mut Evaluator,
) -> Result<i64, BindError> {
    match binding.get("position") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => Ok(n.as_i64().unwrap_or(0)),
        Some(p @ Value::String(s)) => match ev.eval(p, datum)? {
            Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or(0)),
            Value::Null => Ok(0),
            other => Err(BindError::Position(s.clone(), other.to_string())),
        },
        Some(other) => Err(BindError::Position(
            other.to_string(),
            "not a number".into(),
        )),
    }
}

/// The bindings of `arguments`.
pub fn argument_bindings(tool: &Value, ev: &mut Evaluator) -> Result<Vec<Bound>, BindError> {
    let mut out = Vec::new();
    let Some(Value::Array(args)) = tool.get("arguments") else {
        return Ok(out);
    };
    for (i, arg) in args.iter().enumerate() {
        let i = i as i64;
        match arg {
            Value::Object(m) => {
                let p = position(m, &Value::Null, ev)?;
                let mut b = m.clone();
                b.remove("position");
                out.push(Bound {
                    key: vec![Key::Int(p), Key::Int(i)],
                    binding: b,
                    datum: Value::Null,
                });
            }
            Value::String(s) if crate::expr::has_expression(s) => {
                let mut b = Map::new();
                b.insert("valueFrom".into(), arg.clone());
                out.push(Bound {
                    key: vec![Key::Int(0), Key::Int(i)],
                    binding: b,
                    datum: Value::Null,
                });
            }
            other => out.push(Bound {
                key: vec![Key::Int(0), Key::Int(i)],
                binding: Map::new(),
                datum: other.clone(),
            }),
        }
    }
    Ok(out)
}

/// The bindings of the inputs (a record of every input).
pub fn input_bindings(
    tool: &Value,
    inputs: &Value,
    ev: &mut Evaluator,
    names: &Names,
) -> Result<Vec<Bound>, BindError> {
    let mut out = Vec::new();
    let Some(Value::Array(params)) = tool.get("inputs") else {
        return Ok(out);
    };
    for p in params {
        let Some(name) = p.get("id").and_then(Value::as_str) else {
            continue;
        };
        let datum = inputs.get(name).cloned().unwrap_or(Value::Null);
        if datum.is_null() {
            continue;
        }
        out.extend(bind_input(
            p,
            &datum,
            &[],
            &[Key::Str(name.to_string())],
            ev,
            names,
        )?);
    }
    Ok(out)
}

/// Binds `datum` of the parameter (or item, or field) `schema`, as the
/// reference runner does: a binding's key is `lead`, its position and
/// `tail`; nested bindings (record fields, array items) are keyed under
/// their parent's key.
fn bind_input(
    schema: &Value,
    datum: &Value,
    lead: &[Key],
    tail: &[Key],
    ev: &mut Evaluator,
    names: &Names,
) -> Result<Vec<Bound>, BindError> {
    let mut bindings = Vec::new();
    let mut own: Option<Bound> = None;
    let mut value_from = false;
    if let Some(Value::Object(b)) = schema.get("inputBinding") {
        let mut key: Vec<Key> = lead.to_vec();
        // A binding copied to array items keeps its parent's key.
        if let Some(Value::Array(k)) = b.get("$key") {
            key.extend(k.iter().map(|x| match x {
                Value::String(s) => Key::Str(s.clone()),
                other => Key::Int(other.as_i64().unwrap_or(0)),
            }));
        } else {
            key.push(Key::Int(position(b, datum, ev)?));
        }
        key.extend(tail.iter().cloned());
        let mut b = b.clone();
        b.remove("position");
        b.remove("$key");
        value_from = b.contains_key("valueFrom");
        own = Some(Bound {
            key,
            binding: b,
            datum: datum.clone(),
        });
    }
    let ty = schema.get("type").cloned().unwrap_or(Value::Null);
    let ty = names.resolve(&ty).clone();
    match &ty {
        Value::Array(branches) => {
            // A union: the first branch the value is of.
            let Some(t) = branches.iter().find(|t| matches(t, datum, names)) else {
                return Err(BindError::Union {
                    value: datum.to_string(),
                    ty: crate::types::describe(&ty),
                });
            };
            let mut s = schema.clone();
            s["type"] = t.clone();
            let nested = bind_input(&s, datum, lead, tail, ev, names)?;
            // With valueFrom the union's own binding stands for the value.
            return Ok(if value_from {
                own.into_iter().collect()
            } else {
                nested
            });
        }
        Value::Object(st) => {
            // An array, record or enum type written in place: bind it as
            // a parameter of its own, under this one.
            let mut st = st.clone();
            if own
                .as_ref()
                .is_some_and(|o| !o.binding.contains_key("itemSeparator"))
                && !st.contains_key("inputBinding")
                && st.get("type").and_then(Value::as_str) == Some("array")
            {
                st.insert("inputBinding".into(), Value::Object(Map::new()));
            }
            for k in ["secondaryFiles", "format", "streamable", "loadContents"] {
                if let Some(v) = schema.get(k) {
                    st.insert(k.into(), v.clone());
                }
            }
            let nested = bind_input(&Value::Object(st), datum, lead, tail, ev, names)?;
            if !value_from {
                bindings.extend(nested);
            }
        }
        Value::String(t) if t == "record" => {
            if let (Some(Value::Array(fields)), Value::Object(m)) = (schema.get("fields"), datum) {
                for f in fields {
                    let name = f.get("name").and_then(Value::as_str).unwrap_or("");
                    if let Some(v) = m.get(name).filter(|v| !v.is_null()) {
                        bindings.extend(bind_input(
                            f,
                            v,
                            lead,
                            &[Key::Str(name.to_string())],
                            ev,
                            names,
                        )?);
                    }
                }
            }
        }
        Value::String(t) if t == "array" => {
            if let Value::Array(items) = datum {
                for (n, item) in items.iter().enumerate() {
                    let mut item_schema = Map::new();
                    item_schema.insert(
                        "type".into(),
                        schema.get("items").cloned().unwrap_or(Value::Null),
                    );
                    if let Some(o) = &own {
                        let mut b = o.binding.clone();
                        b.insert(
                            "$key".into(),
                            Value::Array(
                                o.key
                                    .iter()
                                    .map(|x| match x {
                                        Key::Int(i) => Value::from(*i),
                                        Key::Str(s) => Value::String(s.clone()),
                                    })
                                    .collect(),
                            ),
                        );
                        item_schema.insert("inputBinding".into(), Value::Object(b));
                    }
                    for k in ["secondaryFiles", "format", "streamable", "loadContents"] {
                        if let Some(v) = schema.get(k) {
                            item_schema.insert(k.into(), v.clone());
                        }
                    }
                    bindings.extend(bind_input(
                        &Value::Object(item_schema),
                        item,
                        &[Key::Int(n as i64)],
                        tail,
                        ev,
                        names,
                    )?);
                }
            }
            // The array's binding went to its items.
            own = None;
        }
        _ => {}
    }
    if let Some(own) = own {
        for b in &mut bindings {
            let mut k = own.key.clone();
            k.append(&mut b.key);
            b.key = k;
        }
        bindings.push(own);
    }
    Ok(bindings)
}

/// A value as one word.
pub fn to_str(v: &Value) -> Result<String, BindError> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => number_text(n),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::Null => "None".into(),
        Value::Object(m) => match m.get("class").and_then(Value::as_str) {
            Some(c @ ("File" | "Directory")) => m
                .get("path")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| BindError::NoPath(c.to_string()))?,
            _ => crate::expr::python_json(v),
        },
        Value::Array(_) => crate::expr::python_json(v),
    })
}

/// The words one binding gives.
pub fn words(b: &Bound, ev: &mut Evaluator) -> Result<Vec<String>, BindError> {
    let mut value = b.datum.clone();
    if let Some(vf) = b.binding.get("valueFrom") {
        value = ev.eval(vf, &b.datum)?;
    }
    let prefix = b.binding.get("prefix").and_then(Value::as_str);
    let separate = b
        .binding
        .get("separate")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if prefix.is_none() && !separate {
        return Err(BindError::SeparateWithoutPrefix);
    }
    let args: Vec<Value> = match &value {
        Value::Array(items) => {
            if let (Some(sep), false) = (
                b.binding.get("itemSeparator").and_then(Value::as_str),
                items.is_empty(),
            ) {
                let joined: Result<Vec<String>, _> = items.iter().map(to_str).collect();
                vec![Value::String(joined?.join(sep))]
            } else if b.binding.contains_key("valueFrom") {
                let mut out: Vec<String> = prefix.map(str::to_string).into_iter().collect();
                for v in items {
                    out.push(to_str(v)?);
                }
                return Ok(out);
            } else if let (Some(p), false) = (prefix, items.is_empty()) {
                return Ok(vec![p.to_string()]);
            } else {
                return Ok(Vec::new());
            }
        }
        Value::Object(m)
            if matches!(
                m.get("class").and_then(Value::as_str),
                Some("File" | "Directory")
            ) =>
        {
            vec![value.clone()]
        }
        Value::Object(_) => return Ok(prefix.map(str::to_string).into_iter().collect()),
        Value::Bool(true) => return Ok(prefix.map(str::to_string).into_iter().collect()),
        Value::Bool(false) | Value::Null => return Ok(Vec::new()),
        other => vec![other.clone()],
    };
    let mut out = Vec::new();
    for a in args {
        let s = to_str(&a)?;
        match (separate, prefix) {
            (true, Some(p)) => {
                out.push(p.to_string());
                out.push(s);
            }
            (true, None) => out.push(s),
            (false, p) => out.push(format!("{}{s}", p.unwrap_or(""))),
        }
    }
    Ok(out)
}

/// Quotes a word for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// The command line: `baseCommand`, then every binding in key order.
/// With `shell` (ShellCommandRequirement) the words are quoted unless
/// their binding says `shellQuote: false`, and joined into one script.
pub fn command_line(
    tool: &Value,
    inputs: &Value,
    ev: &mut Evaluator,
    names: &Names,
    shell: bool,
) -> Result<Vec<String>, BindError> {
    let mut bound = argument_bindings(tool, ev)?;
    bound.extend(input_bindings(tool, inputs, ev, names)?);
    bound.sort_by(|a, b| a.key.cmp(&b.key));
    let mut words_out: Vec<(String, bool)> = Vec::new();
    match tool.get("baseCommand") {
        Some(Value::String(s)) => words_out.push((s.clone(), true)),
        Some(Value::Array(a)) => {
            for w in a {
                words_out.push((to_str(w)?, true));
            }
        }
        _ => {}
    }
    for b in &bound {
        let quote = b
            .binding
            .get("shellQuote")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        for w in words(b, ev)? {
            words_out.push((w, quote));
        }
    }
    if shell {
        let script = words_out
            .iter()
            .map(|(w, q)| if *q { shell_quote(w) } else { w.clone() })
            .collect::<Vec<_>>()
            .join(" ");
        return Ok(vec!["/bin/sh".into(), "-c".into(), script]);
    }
    Ok(words_out.into_iter().map(|(w, _)| w).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::Limits;
    use serde_json::json;

    fn line(tool: Value, inputs: Value) -> Vec<String> {
        let mut tool = tool;
        if let Some(Value::Array(list)) = tool.get_mut("inputs") {
            for p in list {
                if let Some(t) = p.get("type").cloned() {
                    p["type"] = crate::load::normalize_type(&t);
                }
            }
        }
        let mut ev = Evaluator::new(true, Vec::new(), Limits::default());
        ev.set_inputs(inputs.clone());
        command_line(&tool, &inputs, &mut ev, &Names::default(), false).expect("command line")
    }

    #[test]
    fn positions_prefixes_and_arrays_as_the_specification_orders_them() {
        let tool = json!({
            "baseCommand": ["tool"],
            "arguments": [{"valueFrom": "arg", "position": 2}, "-v"],
            "inputs": [
                {"id": "b", "type": "int", "inputBinding": {"position": 1, "prefix": "-b"}},
                {"id": "a", "type": "string", "inputBinding": {"position": 1, "prefix": "-a=", "separate": false}},
                {"id": "flag", "type": "boolean", "inputBinding": {"prefix": "-f"}},
                {"id": "off", "type": "boolean", "inputBinding": {"prefix": "-o"}},
                {"id": "list", "type": "string[]", "inputBinding": {"position": 3, "prefix": "-l"}},
                {"id": "joined", "type": "int[]", "inputBinding": {"position": 4, "itemSeparator": ","}},
                {"id": "each", "type": {"type": "array", "items": "string", "inputBinding": {"prefix": "-e"}}, "inputBinding": {"position": 5}},
                {"id": "none", "type": "string?", "inputBinding": {"prefix": "-n"}},
                {"id": "unbound", "type": "string"}
            ]
        });
        let inputs = json!({
            "a": "x", "b": 7, "flag": true, "off": false,
            "list": ["p", "q"], "joined": [1, 2, 3], "each": ["u", "v"], "unbound": "z"
        });
        assert_eq!(
            line(tool, inputs),
            [
                "tool", "-v", "-f", "-a=x", "-b", "7", "arg", "-l", "p", "q", "1,2,3", "-e", "u",
                "-e", "v"
            ]
        );
    }

    #[test]
    fn value_from_and_records() {
        let tool = json!({
            "baseCommand": "echo",
            "inputs": [
                {"id": "n", "type": "int", "inputBinding": {"valueFrom": "$(self * 2)", "prefix": "-n"}},
                {"id": "r", "type": {"type": "record", "fields": [
                    {"name": "y", "type": "string", "inputBinding": {"position": 2}},
                    {"name": "x", "type": "string", "inputBinding": {"position": 1, "prefix": "-x"}}
                ]}, "inputBinding": {"position": 3, "prefix": "-r"}}
            ]
        });
        assert_eq!(
            line(tool, json!({"n": 3, "r": {"x": "X", "y": "Y"}})),
            ["echo", "-n", "6", "-r", "-x", "X", "Y"]
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\"'\"'s'");
        assert_eq!(shell_quote("plain-1.txt"), "plain-1.txt");
    }
}
