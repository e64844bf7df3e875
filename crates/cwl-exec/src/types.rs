//! CWL types against values: whether a value is of a type (to pick the
//! branch of a union, to check a job order), with named types from
//! `SchemaDefRequirement`.

use std::collections::HashMap;

use serde_json::Value;

/// Named types of a process (`SchemaDefRequirement`), by short name.
#[derive(Clone, Debug, Default)]
pub struct Names(HashMap<String, Value>);

impl Names {
    /// The named types `process` defines.
    pub fn of(process: &Value) -> Self {
        let mut map = HashMap::new();
        if let Some(r) = crate::load::requirement(process, "SchemaDefRequirement") {
            if let Some(Value::Array(types)) = r.get("types") {
                // An `$import` of a list of types leaves a list in the list.
                let flat = types.iter().flat_map(|t| match t {
                    Value::Array(inner) => inner.iter().collect::<Vec<_>>(),
                    one => vec![one],
                });
                for t in flat {
                    if let Some(n) = t.get("name").and_then(Value::as_str) {
                        map.insert(crate::load::short_id(n), t.clone());
                    }
                }
            }
        }
        Self(map)
    }

    /// `t` with a named type replaced by its definition.
    pub fn resolve<'a>(&'a self, t: &'a Value) -> &'a Value {
        if let Value::String(s) = t {
            if let Some(d) = self.0.get(s) {
                return d;
            }
        }
        t
    }
}

/// The `class` of a File or Directory object.
pub fn class_of(v: &Value) -> Option<&str> {
    v.get("class").and_then(Value::as_str)
}

/// True when `v` is of type `t`.
pub fn matches(t: &Value, v: &Value, names: &Names) -> bool {
    let t = names.resolve(t);
    match t {
        Value::String(s) => match s.as_str() {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "int" | "long" => v.is_i64() || v.is_u64(),
            "float" | "double" => v.is_number(),
            "string" => v.is_string(),
            "File" => class_of(v) == Some("File"),
            "Directory" => class_of(v) == Some("Directory"),
            "Any" => !v.is_null(),
            "stdout" | "stderr" | "stdin" => class_of(v) == Some("File"),
            _ => false,
        },
        Value::Array(ts) => ts.iter().any(|t| matches(t, v, names)),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("array") => match v {
                Value::Array(items) => {
                    let it = o.get("items").unwrap_or(&Value::Null);
                    items.iter().all(|x| matches(it, x, names))
                }
                _ => false,
            },
            Some("record") => match v {
                Value::Object(m) if class_of(v).is_none() => o
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|fields| {
                        fields.iter().all(|f| {
                            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
                            let ft = f.get("type").unwrap_or(&Value::Null);
                            matches(ft, m.get(name).unwrap_or(&Value::Null), names)
                        })
                    })
                    .unwrap_or(true),
                _ => false,
            },
            Some("enum") => match v {
                Value::String(s) => o
                    .get("symbols")
                    .and_then(Value::as_array)
                    .is_some_and(|syms| syms.iter().any(|x| x.as_str() == Some(s))),
                _ => false,
            },
            _ => o.get("type").is_some_and(|inner| matches(inner, v, names)),
        },
        _ => false,
    }
}

/// The typed value of a text as Caroni carries values: a string type
/// takes the text as it is; any other type reads it as JSON (a File
/// reference is JSON too). Text that is not JSON is a string where the
/// type admits one.
pub fn from_text(t: &Value, text: &str, names: &Names) -> Result<Value, String> {
    let as_string = Value::String(text.to_string());
    let string_first = matches(t, &as_string, names)
        && !matches!(names.resolve(t), Value::String(s) if s == "Any");
    if string_first && !is_union_with_non_string(t, names) {
        return Ok(as_string);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v) if matches(t, &v, names) => Ok(v),
        _ if matches(t, &as_string, names) => Ok(as_string),
        Ok(v) => Err(format!("{} is not of type {}", v, describe(t))),
        Err(_) => Err(format!("`{text}` is not of type {}", describe(t))),
    }
}

fn is_union_with_non_string(t: &Value, names: &Names) -> bool {
    match names.resolve(t) {
        Value::Array(branches) => branches
            .iter()
            .any(|b| !matches!(b, Value::String(s) if s == "string" || s == "null")),
        _ => false,
    }
}

/// True when `null` is a value of `t` (an optional type).
pub fn optional(t: &Value, names: &Names) -> bool {
    matches(t, &Value::Null, names)
}

/// A short text of a type, for messages.
pub fn describe(t: &Value) -> String {
    match t {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(describe).collect::<Vec<_>>().join(" | "),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("array") => format!("{}[]", describe(o.get("items").unwrap_or(&Value::Null))),
            Some(other) => other.to_string(),
            None => "?".into(),
        },
        _ => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::normalize_type;
    use serde_json::json;

    #[test]
    fn values_match_their_types() {
        let n = Names::default();
        let t = |s: Value| normalize_type(&s);
        assert!(matches(&t(json!("int?")), &json!(null), &n));
        assert!(matches(&t(json!("int?")), &json!(3), &n));
        assert!(!matches(&t(json!("int")), &json!(3.5), &n));
        assert!(matches(&t(json!("float")), &json!(3), &n));
        assert!(matches(&t(json!("string[]")), &json!(["a", "b"]), &n));
        assert!(!matches(&t(json!("string[]")), &json!(["a", 1]), &n));
        assert!(matches(
            &t(json!("File")),
            &json!({"class": "File", "path": "/x"}),
            &n
        ));
        let e = t(json!({"type": "enum", "symbols": ["#main/x/a", "b"]}));
        assert!(matches(&e, &json!("a"), &n));
        assert!(!matches(&e, &json!("c"), &n));
        let r = t(json!({"type": "record", "fields": {"a": "int", "b": "string?"}}));
        assert!(matches(&r, &json!({"a": 1}), &n));
        assert!(!matches(&r, &json!({"b": "x"}), &n));
    }

    #[test]
    fn values_from_caroni_text() {
        let n = Names::default();
        let t = |s: Value| normalize_type(&s);
        assert_eq!(from_text(&t(json!("string")), "3", &n), Ok(json!("3")));
        assert_eq!(from_text(&t(json!("int")), "3", &n), Ok(json!(3)));
        assert_eq!(from_text(&t(json!("int?")), "null", &n), Ok(json!(null)));
        assert_eq!(
            from_text(&t(json!("string[]")), r#"["a"]"#, &n),
            Ok(json!(["a"]))
        );
        assert_eq!(
            from_text(&t(json!(["null", "string", "int"])), "7", &n),
            Ok(json!(7))
        );
        assert_eq!(
            from_text(&t(json!(["null", "string", "int"])), "x", &n),
            Ok(json!("x"))
        );
        assert!(from_text(&t(json!("int")), "seven", &n).is_err());
    }
}
