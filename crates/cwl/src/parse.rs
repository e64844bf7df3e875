//! Walks the YAML value tree of a CWL document and builds a [`Workflow`].
//!
//! (Over 600 lines: one walk over the document, each part of CWL a
//! function; the next issues split it by CWL class as they grow it.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_yaml_ng::{Mapping, Value};

use crate::{
    get, invalid, unsupported, Dynamic, Error, Kind, LinkMerge, PickValue, Retry, ScatterMethod,
    Source, Step, StepInput, Workflow, WorkflowInput, WorkflowOutput,
};

const REQUIREMENT: &str = "CaroniRequirement";

mod needs;

/// An id/body pair from either the map form or the list form of a section.
struct Entry<'a> {
    id: String,
    body: &'a Value,
    at: String,
}

/// Reads a section that CWL allows as a map (`id: body`) or a list of
/// mappings with `id` (or strings, when `strings_ok`).
fn entries<'a>(v: &'a Value, at: &str, strings_ok: bool) -> Result<Vec<Entry<'a>>, Error> {
    let mut out = Vec::new();
    match v {
        Value::Null => {}
        Value::Mapping(m) => {
            for (k, body) in m {
                let id =
                    scalar_string(k).ok_or_else(|| invalid(at, "keys must be plain strings"))?;
                let id = strip_hash(&id).to_string();
                out.push(Entry {
                    at: format!("{at}.{id}"),
                    id,
                    body,
                });
            }
        }
        Value::Sequence(items) => {
            for (n, item) in items.iter().enumerate() {
                let here = format!("{at}[{n}]");
                let id = match item {
                    Value::String(s) if strings_ok => s.clone(),
                    Value::Mapping(m) => match get(m, "id") {
                        Some(v) => scalar_string(v)
                            .ok_or_else(|| invalid(&here, "`id` must be a string"))?,
                        None => {
                            return Err(invalid(&here, "entry has no `id`; give every entry an id"))
                        }
                    },
                    _ => return Err(invalid(&here, "expected a mapping with an `id`")),
                };
                let id = strip_hash(&id).to_string();
                if id.is_empty() {
                    return Err(invalid(&here, "`id` is empty"));
                }
                out.push(Entry {
                    at: format!("{at}.{id}"),
                    id,
                    body: item,
                });
            }
        }
        _ => return Err(invalid(at, "expected a map or a list")),
    }
    let mut seen = BTreeSet::new();
    for e in &out {
        if !seen.insert(e.id.as_str()) {
            return Err(invalid(
                &e.at,
                format!("duplicate id `{}`; ids must be unique", e.id),
            ));
        }
    }
    Ok(out)
}

fn strip_hash(s: &str) -> &str {
    s.strip_prefix('#').unwrap_or(s)
}

/// A scalar as CWL passes it: strings as they are, other scalars in their
/// string form.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn mapping<'a>(v: &'a Value, at: &str) -> Result<&'a Mapping, Error> {
    v.as_mapping()
        .ok_or_else(|| invalid(at, "expected a mapping"))
}

/// Reads a port's type: any CWL type written in the template (scalars,
/// `File`, `Directory`, arrays, records, enums, unions, `Any`, each
/// optionally with `?` or `[]`), classified by what it carries on the
/// mesh (see [`classify`]). `None` when no type is declared.
fn check_type(ty: Option<&Value>, at: &str) -> Result<Option<Kind>, Error> {
    let Some(ty) = ty else { return Ok(None) };
    let json = serde_json::to_value(ty)
        .map_err(|e| invalid(format!("{at}.type"), format!("unreadable type: {e}")))?;
    let norm = caroni_cwl_exec::load::normalize_type(&json);
    classify(&norm, false).map(Some).ok_or_else(|| {
        unsupported(
            format!("{at}.type"),
            format!("the type `{}`", caroni_cwl_exec::types::describe(&norm)),
            "use a CWL type: a scalar (`string`, `int`, `long`, `float`, `double`, `boolean`), `File`, `Directory`, an array, record, enum or union of them, or `Any`",
        )
    })
}

/// What a port of a (normalised) CWL type carries on the mesh: one File
/// (`File`, `File?`, `stdin`/`stdout`/`stderr`), a list of Files
/// (`File[]`, optional or not), a value with files anywhere (Directories,
/// records or nested arrays holding files, `Any`), or a plain value.
/// `None` for a type name that is not CWL's unless `named_ok` (a named
/// type of a real tool's SchemaDefRequirement counts as a value with
/// files: its definition is not looked into here).
fn classify(t: &serde_json::Value, named_ok: bool) -> Option<Kind> {
    use serde_json::Value as J;
    let branches: Vec<&J> = match t {
        J::Array(a) => a.iter().filter(|b| b.as_str() != Some("null")).collect(),
        other => vec![other],
    };
    match branches.as_slice() {
        [J::String(s)] if matches!(s.as_str(), "File" | "stdin" | "stdout" | "stderr") => {
            return Some(Kind::File)
        }
        [J::Object(o)]
            if o.get("type").and_then(J::as_str) == Some("array")
                && o.get("items").and_then(J::as_str) == Some("File") =>
        {
            return Some(Kind::Files)
        }
        _ => {}
    }
    let mut holds_files = false;
    let known = walk_type(t, &mut |name| match name {
        "File" | "Directory" | "stdin" | "stdout" | "stderr" => {
            holds_files = true;
            true
        }
        "Any" => {
            holds_files = true;
            true
        }
        "null" | "boolean" | "int" | "long" | "float" | "double" | "string" => true,
        _ => {
            holds_files |= named_ok;
            named_ok
        }
    });
    match (known, holds_files) {
        (false, _) => None,
        (true, true) => Some(Kind::Data),
        (true, false) => Some(Kind::Value),
    }
}

/// Calls `leaf` on every type name in a normalised type (array items,
/// record fields, union branches; an enum is a value); false as soon as a
/// call does or the type cannot be read.
fn walk_type(t: &serde_json::Value, leaf: &mut dyn FnMut(&str) -> bool) -> bool {
    use serde_json::Value as J;
    match t {
        J::String(s) => leaf(s),
        J::Array(a) => a.iter().all(|b| walk_type(b, leaf)),
        J::Object(o) => match o.get("type").and_then(J::as_str) {
            Some("array") => o.get("items").is_some_and(|i| walk_type(i, leaf)),
            Some("record") => o.get("fields").and_then(J::as_array).is_some_and(|fs| {
                fs.iter()
                    .all(|f| f.get("type").is_some_and(|ft| walk_type(ft, leaf)))
            }),
            Some("enum") => true,
            Some(other) => leaf(other),
            None => match o.get("type") {
                Some(inner) => walk_type(inner, leaf),
                None => false,
            },
        },
        _ => false,
    }
}

/// A port's declared type and default; a File port has no default.
fn port(body: &Value, at: &str) -> Result<(Option<Kind>, Option<String>), Error> {
    let (kind, default) = match body {
        Value::Mapping(b) => {
            // `{type: array, items: File}` written on the port itself.
            let ty = match get(b, "type") {
                Some(Value::String(t)) if t == "array" || t == "enum" || t == "record" => {
                    Some(body)
                }
                t => t,
            };
            let kind = check_type(ty, at)?;
            // A port with secondary files carries them with its File.
            let kind = match kind {
                Some(Kind::File | Kind::Files) if get(b, "secondaryFiles").is_some() => {
                    Some(Kind::Data)
                }
                k => k,
            };
            (kind, get(b, "default").and_then(scalar_string))
        }
        ty @ Value::String(_) => (check_type(Some(ty), at)?, None),
        _ => (None, None),
    };
    if default.is_some() && matches!(kind, Some(Kind::File | Kind::Files)) {
        return Err(unsupported(
            format!("{at}.default"),
            "a default File",
            "give the file when the workflow runs (caroni run … NAME=@path uploads it)",
        ));
    }
    Ok((kind, default))
}

fn requirement_entries<'a>(
    m: &'a Mapping,
    at: &str,
) -> Result<Vec<(String, &'a Mapping, String)>, Error> {
    let mut out = Vec::new();
    for section in ["hints", "requirements"] {
        let Some(v) = get(m, section) else { continue };
        let here = format!("{at}.{section}");
        match v {
            Value::Mapping(map) => {
                for (k, body) in map {
                    let class = scalar_string(k).unwrap_or_default();
                    if let Value::Mapping(b) = body {
                        out.push((class.clone(), b, format!("{here}.{class}")));
                    } else if body.is_null() {
                        continue;
                    } else {
                        return Err(invalid(format!("{here}.{class}"), "expected a mapping"));
                    }
                }
            }
            Value::Sequence(items) => {
                for (n, item) in items.iter().enumerate() {
                    let b = mapping(item, &format!("{here}[{n}]"))?;
                    let class = get(b, "class").and_then(scalar_string).ok_or_else(|| {
                        invalid(format!("{here}[{n}]"), "requirement without `class`")
                    })?;
                    out.push((class.clone(), b, format!("{here}[{n}]")));
                }
            }
            Value::Null => {}
            _ => return Err(invalid(here, "expected a map or a list")),
        }
    }
    Ok(out)
}

fn is_caroni(class: &str) -> bool {
    class == REQUIREMENT
        || class
            .strip_suffix(REQUIREMENT)
            .is_some_and(|prefix| prefix.ends_with(':') || prefix.ends_with('#'))
}

/// Requirements that step expressions read (`valueFrom`, `when`).
const EXPRESSION_REQUIREMENTS: [&str; 2] = ["InlineJavascriptRequirement", "SchemaDefRequirement"];

fn short_class(class: &str) -> &str {
    class.rsplit([':', '#']).next().unwrap_or(class)
}

/// `inherited` with the expression requirements of `holder` (its own win).
fn expression_reqs(
    holder: &Mapping,
    at: &str,
    inherited: &[serde_json::Value],
) -> Result<Vec<serde_json::Value>, Error> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    for (class, body, rat) in requirement_entries(holder, at)? {
        let short = short_class(&class);
        if EXPRESSION_REQUIREMENTS.contains(&short) {
            let mut json = serde_json::to_value(body)
                .map_err(|e| invalid(&rat, format!("unreadable requirement: {e}")))?;
            json["class"] = serde_json::Value::String(short.to_string());
            out.retain(|r| r.get("class") != json.get("class"));
            out.push(json);
        }
    }
    for r in inherited {
        if !out.iter().any(|x| x.get("class") == r.get("class")) {
            out.push(r.clone());
        }
    }
    Ok(out)
}

/// Prefixes the place of an error found in a sub-workflow.
fn within(prefix: &str, e: Error) -> Error {
    match e {
        Error::Invalid { at, what } => Error::Invalid {
            at: format!("{prefix}.{at}"),
            what,
        },
        Error::Unsupported { at, feature, hint } => Error::Unsupported {
            at: format!("{prefix}.{at}"),
            feature,
            hint,
        },
        other => other,
    }
}

/// What a workflow passes down to its steps and sub-workflows.
#[derive(Clone, Default)]
struct Inherited {
    expressions: Vec<serde_json::Value>,
    max_attempts: Option<u32>,
    retry: Retry,
    needs: needs::Partial,
}

/// The keys a CaroniRequirement may have on a workflow.
const WORKFLOW_KEYS: [&str; 11] = [
    "CaroniMaxAttempts",
    "CaroniBudget",
    "CaroniPriority",
    "CaroniRetryBackoff",
    "CaroniNoRetry",
    needs::KEYS[0],
    needs::KEYS[1],
    needs::KEYS[2],
    needs::KEYS[3],
    needs::KEYS[4],
    needs::KEYS[5],
];
/// The keys a CaroniRequirement may have on a step or a tool.
const STEP_KEYS: [&str; 11] = [
    "CaroniJobName",
    "CaroniJobKVs",
    "CaroniMaxAttempts",
    "CaroniRetryBackoff",
    "CaroniNoRetry",
    needs::KEYS[0],
    needs::KEYS[1],
    needs::KEYS[2],
    needs::KEYS[3],
    needs::KEYS[4],
    needs::KEYS[5],
];

/// Refuses a key a CaroniRequirement does not have (a misspelt
/// `CaroniJobKV` must not pass unseen).
fn known_keys(body: &Mapping, rat: &str, allowed: &[&str], place: &str) -> Result<(), Error> {
    for k in body.keys() {
        let k = scalar_string(k).unwrap_or_default();
        if k == "class" || allowed.contains(&k.as_str()) {
            continue;
        }
        let hint = if STEP_KEYS.contains(&k.as_str()) {
            format!("it belongs on a step or a tool, not on {place}")
        } else {
            format!("the keys on {place} are: {}", allowed.join(", "))
        };
        return Err(invalid(
            format!("{rat}.{k}"),
            format!("unknown key `{k}` in CaroniRequirement; {hint}"),
        ));
    }
    Ok(())
}

/// A duration: a number of seconds or text such as `500ms`, `2s`, `1m`.
fn duration_ms(v: &Value, at: &str) -> Result<u64, Error> {
    let bad = || {
        invalid(
            at,
            "must be a duration: seconds as a number, or text such as 500ms, 2s, 1m (at most 1 day)",
        )
    };
    let ms = match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| (f * 1000.0).round() as u64)
            .ok_or_else(bad)?,
        Value::String(t) => match t.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f >= 0.0 => (f * 1000.0).round() as u64,
            _ => humantime::parse_duration(t.trim())
                .map_err(|_| bad())?
                .as_millis()
                .try_into()
                .map_err(|_| bad())?,
        },
        _ => return Err(bad()),
    };
    if ms > 24 * 3600 * 1000 {
        return Err(bad());
    }
    Ok(ms)
}

/// The retry policy one CaroniRequirement states.
fn retry_of(body: &Mapping, rat: &str) -> Result<Retry, Error> {
    let mut r = Retry::default();
    if let Some(v) = get(body, "CaroniMaxAttempts") {
        let n = scalar_string(v)
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| {
                invalid(
                    format!("{rat}.CaroniMaxAttempts"),
                    "must be a whole number from 1 to 100",
                )
            })?;
        r.max_attempts = Some(n);
    }
    match get(body, "CaroniRetryBackoff") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            let at = format!("{rat}.CaroniRetryBackoff");
            for k in m.keys() {
                let k = scalar_string(k).unwrap_or_default();
                if k != "initial" && k != "max" {
                    return Err(invalid(
                        format!("{at}.{k}"),
                        format!("unknown key `{k}`; the keys are initial and max"),
                    ));
                }
            }
            if let Some(v) = get(m, "initial") {
                r.backoff_initial_ms = Some(duration_ms(v, &format!("{at}.initial"))?);
            }
            if let Some(v) = get(m, "max") {
                r.backoff_max_ms = Some(duration_ms(v, &format!("{at}.max"))?);
            }
        }
        Some(v) => {
            r.backoff_initial_ms = Some(duration_ms(v, &format!("{rat}.CaroniRetryBackoff"))?)
        }
    }
    match get(body, "CaroniNoRetry") {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(items)) => {
            let mut kinds = Vec::new();
            for (n, item) in items.iter().enumerate() {
                let k = scalar_string(item).unwrap_or_default();
                if !crate::FAILURE_KINDS.contains(&k.as_str()) {
                    return Err(invalid(
                        format!("{rat}.CaroniNoRetry[{n}]"),
                        format!(
                            "unknown failure kind `{k}`; the kinds are: {}",
                            crate::FAILURE_KINDS.join(", ")
                        ),
                    ));
                }
                kinds.push(k);
            }
            r.no_retry = Some(kinds);
        }
        Some(_) => {
            return Err(invalid(
                format!("{rat}.CaroniNoRetry"),
                format!(
                    "must be a list of failure kinds ({})",
                    crate::FAILURE_KINDS.join(", ")
                ),
            ))
        }
    }
    Ok(r)
}

pub(crate) fn workflow(m: &Mapping) -> Result<Workflow, Error> {
    workflow_in(m, &Inherited::default())
}

fn workflow_in(m: &Mapping, inherited: &Inherited) -> Result<Workflow, Error> {
    match get(m, "class").and_then(Value::as_str) {
        Some("Workflow") => {}
        Some(other) => {
            return Err(invalid(
                "class",
                format!("`{other}` is not a workflow; Caroni templates are `class: Workflow`"),
            ))
        }
        None => {
            return Err(invalid(
                "class",
                "missing; Caroni templates are `class: Workflow`",
            ))
        }
    }
    if let Some(v) = get(m, "cwlVersion").and_then(Value::as_str) {
        if !v.starts_with("v1.") {
            return Err(unsupported(
                "cwlVersion",
                format!("CWL version `{v}`"),
                "use cwlVersion v1.0, v1.1 or v1.2",
            ));
        }
    }
    let mut retry = inherited.retry.clone();
    let mut budget = None;
    let mut priority = 0;
    for (class, body, at) in requirement_entries(m, "workflow")? {
        if is_caroni(&class) {
            known_keys(body, &at, &WORKFLOW_KEYS, "a workflow")?;
            retry = retry_of(body, &at)?.over(&retry);
            if let Some(v) = get(body, "CaroniBudget") {
                budget = Some(needs::budget(v, &format!("{at}.CaroniBudget"))?);
            }
            if let Some(v) = get(body, "CaroniPriority") {
                priority = scalar_string(v)
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|p| (-1000..=1000).contains(p))
                    .ok_or_else(|| {
                        invalid(
                            format!("{at}.CaroniPriority"),
                            "must be a whole number from -1000 to 1000 (higher runs first)",
                        )
                    })?;
            }
        }
    }
    let max_attempts = retry.max_attempts;
    let needs = needs::of(m, "workflow")?.over(&inherited.needs);

    let mut all_ids: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |id: &str, at: &str| -> Result<(), Error> {
        if let Some(prev) = all_ids.insert(id.to_string(), at.to_string()) {
            return Err(invalid(
                at,
                format!("duplicate id `{id}` (also used at {prev}); ids must be unique"),
            ));
        }
        Ok(())
    };

    let mut inputs = Vec::new();
    for e in entries(get(m, "inputs").unwrap_or(&Value::Null), "inputs", false)? {
        claim(&e.id, &e.at)?;
        let (kind, default) = port(e.body, &e.at)?;
        let declared = match e.body {
            Value::Mapping(b) => match get(b, "type") {
                Some(Value::String(t)) if t == "array" || t == "enum" || t == "record" => {
                    Some(e.body)
                }
                t => t,
            },
            t @ Value::String(_) => Some(t),
            _ => None,
        };
        inputs.push(WorkflowInput {
            id: e.id,
            default,
            kind: kind.unwrap_or_default(),
            cwl_type: declared
                .and_then(|t| serde_json::to_value(t).ok())
                .map(|t| t.to_string()),
        });
    }

    let steps_value = get(m, "steps")
        .ok_or_else(|| invalid("steps", "missing; a workflow needs at least one step"))?;
    let step_entries = entries(steps_value, "steps", false)?;
    if step_entries.is_empty() {
        return Err(invalid(
            "steps",
            "empty; a workflow needs at least one step",
        ));
    }
    let here = Inherited {
        expressions: expression_reqs(m, "workflow", &inherited.expressions)?,
        max_attempts,
        retry,
        needs,
    };
    let mut steps = Vec::new();
    let mut declared_inputs = BTreeMap::new();
    for e in &step_entries {
        claim(&e.id, &e.at)?;
        let (s, declared) = step(e, &here)?;
        declared_inputs.insert(s.id.clone(), declared);
        steps.push(s);
    }

    let mut outputs = Vec::new();
    for e in entries(get(m, "outputs").unwrap_or(&Value::Null), "outputs", false)? {
        claim(&e.id, &e.at)?;
        let b = mapping(e.body, &e.at)?;
        let declared = check_type(get(b, "type"), &e.at)?;
        let sources = match get(b, "outputSource") {
            None | Some(Value::Null) => {
                return Err(invalid(&e.at, format!("workflow output `{}` has no `outputSource`; name the step output it comes from, as `step/output`", e.id)))
            }
            Some(Value::Sequence(list)) if !list.is_empty() => list
                .iter()
                .map(|v| {
                    scalar_string(v).map(|s| parse_source(&s)).ok_or_else(|| {
                        invalid(format!("{}.outputSource", e.at), "must be a list of strings")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::Sequence(_)) => {
                return Err(invalid(format!("{}.outputSource", e.at), "is an empty list; name at least one source"))
            }
            Some(v) => vec![parse_source(&scalar_string(v).ok_or_else(|| invalid(format!("{}.outputSource", e.at), "must be a string"))?)],
        };
        let link_merge = link_merge(b, &e.at)?;
        let pick_value = pick_value(b, &e.at)?;
        let many = sources.len() > 1 || link_merge.is_some() || pick_value.is_some();
        let declared = if many {
            declared.or(Some(Kind::Data))
        } else {
            declared
        };
        outputs.push((
            WorkflowOutput {
                id: e.id.clone(),
                source: sources[0].clone(),
                kind: declared.unwrap_or_default(),
                sources: if sources.len() > 1 {
                    sources
                } else {
                    Vec::new()
                },
                link_merge,
                pick_value,
            },
            declared.is_some() && !many,
        ));
    }

    // Every source must exist.
    let input_ids: BTreeSet<&str> = inputs.iter().map(|i| i.id.as_str()).collect();
    let step_outputs: BTreeMap<&str, BTreeSet<&str>> = steps
        .iter()
        .map(|s| {
            (
                s.id.as_str(),
                s.outputs.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let check = |src: &Source, at: &str| -> Result<(), Error> {
        match src {
            Source::Input(i) if input_ids.contains(i.as_str()) => Ok(()),
            Source::Input(i) => Err(invalid(at, format!("unknown source `{i}`: no workflow input has that id (inputs: {})", list(&input_ids)))),
            Source::StepOutput { step, output } => match step_outputs.get(step.as_str()) {
                None => Err(invalid(at, format!("unknown source `{step}/{output}`: there is no step `{step}`"))),
                Some(outs) if outs.contains(output.as_str()) => Ok(()),
                Some(outs) => Err(invalid(at, format!("unknown source `{step}/{output}`: step `{step}` has no output `{output}` (outputs: {})", list(outs)))),
            },
        }
    };
    for s in &steps {
        for i in &s.inputs {
            for src in i.all_sources() {
                check(src, &format!("steps.{}.in.{}", s.id, i.name))?;
            }
        }
    }
    for (o, _) in &outputs {
        for src in o.all_sources() {
            check(src, &format!("outputs.{}.outputSource", o.id))?;
        }
    }

    // Every port carries what its source carries: an undeclared one takes
    // its source's kind, a declared one must match it.
    let input_kinds: BTreeMap<String, Kind> =
        inputs.iter().map(|i| (i.id.clone(), i.kind)).collect();
    let output_kinds: BTreeMap<(String, String), Kind> = steps
        .iter()
        .flat_map(|s| {
            s.outputs.iter().map(|o| {
                (
                    (s.id.clone(), o.clone()),
                    s.output_kinds.get(o).copied().unwrap_or_default(),
                )
            })
        })
        .collect();
    let kind_of = |src: &Source| match src {
        Source::Input(i) => input_kinds.get(i).copied().unwrap_or_default(),
        Source::StepOutput { step, output } => output_kinds
            .get(&(step.clone(), output.clone()))
            .copied()
            .unwrap_or_default(),
    };
    let mismatch = |at: String, src: &Source, have: Kind, want: Kind| {
        invalid(
            at,
            format!(
                "`{src}` carries {} but this is declared {}; declare both the same type",
                have.cwl(),
                want.cwl()
            ),
        )
    };
    for s in &mut steps {
        let declared = declared_inputs.remove(&s.id).unwrap_or_default();
        let dynamic = s.dynamic.is_some();
        for i in &mut s.inputs {
            let Some(src) = &i.source else { continue };
            let have = kind_of(src);
            if dynamic {
                // Scatter, merges and expressions change what a value
                // carries: the process reads it by its type when it runs.
                if !declared.get(&i.name).copied().unwrap_or(false) {
                    i.kind = Kind::Data;
                }
                continue;
            }
            if declared.get(&i.name).copied().unwrap_or(false) {
                // A Caroni job type stages only plain File references.
                let plain_files = s.job_type != caroni_types::CWL_TOOL_JOB_TYPE
                    && matches!(i.kind, Kind::File | Kind::Files);
                if !i.kind.accepts(have) || (plain_files && have == Kind::Data) {
                    return Err(mismatch(
                        format!("steps.{}.in.{}", s.id, i.name),
                        src,
                        have,
                        i.kind,
                    ));
                }
            } else {
                i.kind = have;
            }
        }
    }
    let outputs = outputs
        .into_iter()
        .map(|(mut o, declared)| {
            if !o.sources.is_empty() || o.pick_value.is_some() || o.link_merge.is_some() {
                return Ok(o);
            }
            let have = kind_of(&o.source);
            if declared && !o.kind.accepts(have) {
                return Err(mismatch(
                    format!("outputs.{}", o.id),
                    &o.source,
                    have,
                    o.kind,
                ));
            }
            o.kind = have;
            Ok(o)
        })
        .collect::<Result<Vec<_>, Error>>()?;

    let steps = topo_sort(steps)?;
    Ok(Workflow {
        inputs,
        outputs,
        steps,
        max_attempts,
        budget,
        priority,
    })
}

fn list(set: &BTreeSet<&str>) -> String {
    if set.is_empty() {
        "none".into()
    } else {
        set.iter().copied().collect::<Vec<_>>().join(", ")
    }
}

fn parse_source(s: &str) -> Source {
    let s = strip_hash(s);
    match s.split_once('/') {
        Some((step, output)) => Source::StepOutput {
            step: step.to_string(),
            output: output.to_string(),
        },
        None => Source::Input(s.to_string()),
    }
}

/// A default as it travels: a scalar as its text, anything else as JSON.
fn default_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        other => {
            scalar_string(other).or_else(|| serde_json::to_value(other).ok().map(|j| j.to_string()))
        }
    }
}

fn link_merge(b: &Mapping, at: &str) -> Result<Option<LinkMerge>, Error> {
    match get(b, "linkMerge").and_then(Value::as_str) {
        None => Ok(None),
        Some("merge_nested") => Ok(Some(LinkMerge::Nested)),
        Some("merge_flattened") => Ok(Some(LinkMerge::Flattened)),
        Some(other) => Err(invalid(
            format!("{at}.linkMerge"),
            format!("`{other}` is not a linkMerge method; use merge_nested or merge_flattened"),
        )),
    }
}

fn pick_value(b: &Mapping, at: &str) -> Result<Option<PickValue>, Error> {
    match get(b, "pickValue").and_then(Value::as_str) {
        None => Ok(None),
        Some("first_non_null") => Ok(Some(PickValue::FirstNonNull)),
        Some("the_only_non_null") => Ok(Some(PickValue::TheOnlyNonNull)),
        Some("all_non_null") => Ok(Some(PickValue::AllNonNull)),
        Some(other) => Err(invalid(
            format!("{at}.pickValue"),
            format!("`{other}` is not a pickValue method; use first_non_null, the_only_non_null or all_non_null"),
        )),
    }
}

/// One binding of a step's `in`, as written.
#[derive(Default)]
struct Binding {
    sources: Vec<Source>,
    default: Option<String>,
    link_merge: Option<LinkMerge>,
    pick_value: Option<PickValue>,
    value_from: Option<String>,
    load_contents: bool,
}

fn binding(body: &Value, at: &str) -> Result<Binding, Error> {
    let sources_of = |v: &Value, at: &str| -> Result<Vec<Source>, Error> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(list) => list
                .iter()
                .map(|x| {
                    scalar_string(x)
                        .map(|s| parse_source(&s))
                        .ok_or_else(|| invalid(at, "sources must be strings"))
                })
                .collect(),
            v => {
                Ok(vec![parse_source(&scalar_string(v).ok_or_else(|| {
                    invalid(at, "a source must be a string")
                })?)])
            }
        }
    };
    match body {
        Value::Mapping(ib) => Ok(Binding {
            sources: sources_of(
                get(ib, "source").unwrap_or(&Value::Null),
                &format!("{at}.source"),
            )?,
            default: get(ib, "default").and_then(default_text),
            link_merge: link_merge(ib, at)?,
            pick_value: pick_value(ib, at)?,
            value_from: match get(ib, "valueFrom") {
                None | Some(Value::Null) => None,
                Some(v) => Some(scalar_string(v).ok_or_else(|| {
                    invalid(
                        format!("{at}.valueFrom"),
                        "must be a string (an expression)",
                    )
                })?),
            },
            load_contents: matches!(get(ib, "loadContents"), Some(Value::Bool(true))),
        }),
        v => Ok(Binding {
            sources: sources_of(v, at)?,
            ..Binding::default()
        }),
    }
}

/// What a step's `run` declares: inputs (name, default, declared kind),
/// outputs (name, kind), and how it runs.
struct Process {
    inputs: Vec<(String, Option<String>, Option<Kind>)>,
    outputs: Vec<(String, Kind)>,
    /// The CWL type of each input, as JSON text.
    types: BTreeMap<String, String>,
    /// The CWL type of each output, as JSON text.
    output_types: BTreeMap<String, String>,
    /// A real CWL tool as JSON.
    cwl_tool: Option<String>,
    /// A sub-workflow.
    sub: Option<Workflow>,
}

/// Reads a step's `run`.
fn process(
    b: &Mapping,
    at: &str,
    here: &Inherited,
    requirement_holders: &mut Vec<(Mapping, String)>,
) -> Result<Option<Process>, Error> {
    let run_at = format!("{at}.run");
    let tool = match get(b, "run") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(r)) => {
            return Err(unsupported(
                run_at,
                format!("an external tool reference (`{r}`)"),
                "write the tool inline under `run:` (`caroni template add` inlines the files a document names)",
            ))
        }
        Some(Value::Mapping(tool)) => tool,
        Some(_) => return Err(invalid(run_at, "expected an inline tool (a mapping)")),
    };
    let types_of = |key: &str| -> BTreeMap<String, String> {
        let Ok(raw) = serde_json::to_value(tool) else {
            return BTreeMap::new();
        };
        let Ok(norm) = caroni_cwl_exec::load::normalize(raw) else {
            return BTreeMap::new();
        };
        caroni_cwl_exec::load::params(&norm, key)
            .into_iter()
            .map(|(id, t)| (id, t.to_string()))
            .collect()
    };
    if get(tool, "class").and_then(Value::as_str) == Some("Workflow") {
        let inherited = Inherited {
            expressions: expression_reqs(b, at, &here.expressions)?,
            max_attempts: here.retry.max_attempts,
            retry: here.retry.clone(),
            needs: here.needs.clone(),
        };
        let sub = workflow_in(tool, &inherited).map_err(|e| within(&run_at, e))?;
        return Ok(Some(Process {
            inputs: sub
                .inputs
                .iter()
                .map(|i| (i.id.clone(), i.default.clone(), Some(i.kind)))
                .collect(),
            outputs: sub.outputs.iter().map(|o| (o.id.clone(), o.kind)).collect(),
            types: types_of("inputs"),
            output_types: types_of("outputs"),
            cwl_tool: None,
            sub: Some(sub),
        }));
    }
    if is_real_tool(b, tool, at)? {
        let (inputs, outputs, json) = real_tool(tool, &run_at)?;
        return Ok(Some(Process {
            inputs,
            outputs,
            types: types_of("inputs"),
            output_types: types_of("outputs"),
            cwl_tool: Some(json),
            sub: None,
        }));
    }
    if get(tool, "class").and_then(Value::as_str) == Some("ExpressionTool") {
        return Err(unsupported(
            run_at,
            "an ExpressionTool with a Caroni job type",
            "leave out CaroniRequirement: an agent that runs CWL tools evaluates it",
        ));
    }
    let mut ins = Vec::new();
    for ie in entries(
        get(tool, "inputs").unwrap_or(&Value::Null),
        &format!("{run_at}.inputs"),
        false,
    )? {
        let (kind, default) = port(ie.body, &ie.at)?;
        ins.push((ie.id, default, kind));
    }
    let mut outs = Vec::new();
    for oe in entries(
        get(tool, "outputs").unwrap_or(&Value::Null),
        &format!("{run_at}.outputs"),
        false,
    )? {
        let kind = match oe.body {
            Value::Mapping(ob) => check_type(get(ob, "type"), &oe.at)?,
            ty @ Value::String(_) => check_type(Some(ty), &oe.at)?,
            _ => None,
        };
        outs.push((oe.id, kind.unwrap_or_default()));
    }
    requirement_holders.push((tool.clone(), run_at));
    Ok(Some(Process {
        inputs: ins,
        outputs: outs,
        types: types_of("inputs"),
        output_types: types_of("outputs"),
        cwl_tool: None,
        sub: None,
    }))
}

/// What a step's CaroniRequirement (or its tool's) names: its job type,
/// static parameters and retry policy (the step's over the tool's).
type CaroniJob = (Option<String>, BTreeMap<String, String>, Retry);

/// The job type, static parameters and retry policy a step names in its
/// (or its tool's) CaroniRequirement.
fn caroni_job(holders: &[(Mapping, String)]) -> Result<CaroniJob, Error> {
    let mut job_type = None;
    let mut job_kvs = BTreeMap::new();
    let mut retry = Retry::default();
    for (holder, hat) in holders {
        for (class, body, rat) in requirement_entries(holder, hat)? {
            if !is_caroni(&class) {
                continue;
            }
            known_keys(body, &rat, &STEP_KEYS, "a step")?;
            // Holders come step first: what the step says wins.
            retry = retry.over(&retry_of(body, &rat)?);
            if let Some(v) = get(body, "CaroniJobName") {
                let name = scalar_string(v).filter(|s| !s.is_empty()).ok_or_else(|| {
                    invalid(format!("{rat}.CaroniJobName"), "must be a non-empty string")
                })?;
                caroni_types::validate_env_name(&name).map_err(|err| {
                    invalid(
                        format!("{rat}.CaroniJobName"),
                        format!("job type name {err}"),
                    )
                })?;
                job_type = Some(name);
            }
            match get(body, "CaroniJobKVs") {
                None | Some(Value::Null) => {}
                Some(Value::Mapping(kvs)) => {
                    for (k, v) in kvs {
                        let (Some(k), Some(v)) = (scalar_string(k), scalar_string(v)) else {
                            return Err(invalid(
                                format!("{rat}.CaroniJobKVs"),
                                "keys and values must be scalars",
                            ));
                        };
                        job_kvs.insert(k, v);
                    }
                }
                Some(_) => {
                    return Err(invalid(
                        format!("{rat}.CaroniJobKVs"),
                        "must be a mapping of key: value",
                    ))
                }
            }
        }
    }
    Ok((job_type, job_kvs, retry))
}

/// A step, and for each input whether its tool declares its type (an
/// undeclared one carries what its source carries).
fn step(e: &Entry<'_>, here: &Inherited) -> Result<(Step, BTreeMap<String, bool>), Error> {
    let at = &e.at;
    let b = mapping(e.body, at)?;
    let mut holders = vec![(b.clone(), at.clone())];
    // What the step itself says holds for a sub-workflow's steps too.
    let own = Inherited {
        expressions: here.expressions.clone(),
        max_attempts: here.max_attempts,
        retry: caroni_job(&holders)?.2.over(&here.retry),
        needs: needs::of(b, at)?.over(&here.needs),
    };
    let proc = process(b, at, &own, &mut holders)?;
    // Needs: the step's over its tool's over the workflow's.
    let tool_needs = match get(b, "run") {
        Some(Value::Mapping(t)) => needs::of(t, &format!("{at}.run"))?,
        _ => needs::Partial::default(),
    };
    let step_needs = needs::of(b, at)?
        .over(&tool_needs.over(&here.needs))
        .needs();
    let (named_type, named_kvs, named_retry) = caroni_job(&holders)?;
    let retry = named_retry.over(&here.retry);
    let (job_type, job_kvs) = match &proc {
        Some(Process {
            cwl_tool: Some(json),
            ..
        }) => (
            caroni_types::CWL_TOOL_JOB_TYPE.to_string(),
            BTreeMap::from([(caroni_types::CWL_TOOL_KV.to_string(), json.clone())]),
        ),
        Some(Process { sub: Some(_), .. }) => (String::new(), BTreeMap::new()),
        _ => (
            named_type.ok_or_else(|| {
                invalid(at, format!("step `{}` names no job type; add `hints: {{caroni:CaroniRequirement: {{CaroniJobName: <job type>}}}}`", e.id))
            })?,
            named_kvs,
        ),
    };
    let real = proc
        .as_ref()
        .is_some_and(|p| p.cwl_tool.is_some() || p.sub.is_some());

    // Bindings from `in`.
    let mut bindings: BTreeMap<String, Binding> = BTreeMap::new();
    let mut binding_order = Vec::new();
    for ie in entries(
        get(b, "in").unwrap_or(&Value::Null),
        &format!("{at}.in"),
        false,
    )? {
        let bd = binding(ie.body, &ie.at)?;
        binding_order.push(ie.id.clone());
        bindings.insert(ie.id, bd);
    }

    // `out` names.
    let mut outs = Vec::new();
    for oe in entries(
        get(b, "out").unwrap_or(&Value::Null),
        &format!("{at}.out"),
        true,
    )? {
        outs.push(oe.id);
    }

    // Scatter and condition.
    let scatter: Vec<String> = match get(b, "scatter") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(l)) => l
            .iter()
            .map(|x| {
                scalar_string(x)
                    .map(|s| caroni_cwl_exec::load::short_id(&s))
                    .ok_or_else(|| invalid(format!("{at}.scatter"), "must name step inputs"))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => vec![caroni_cwl_exec::load::short_id(
            &scalar_string(v)
                .ok_or_else(|| invalid(format!("{at}.scatter"), "must name step inputs"))?,
        )],
    };
    for name in &scatter {
        if !bindings.contains_key(name) {
            return Err(invalid(
                format!("{at}.scatter"),
                format!(
                    "`{name}` is not an input of this step (its inputs: {})",
                    binding_order.join(", ")
                ),
            ));
        }
    }
    let scatter_method = match get(b, "scatterMethod").and_then(Value::as_str) {
        None if scatter.len() > 1 => {
            return Err(invalid(
                format!("{at}.scatterMethod"),
                "is required when a step scatters over several inputs: dotproduct, nested_crossproduct or flat_crossproduct",
            ))
        }
        None | Some("dotproduct") => ScatterMethod::Dotproduct,
        Some("nested_crossproduct") => ScatterMethod::NestedCrossproduct,
        Some("flat_crossproduct") => ScatterMethod::FlatCrossproduct,
        Some(other) => {
            return Err(invalid(
                format!("{at}.scatterMethod"),
                format!("`{other}` is not a scatter method; use dotproduct, nested_crossproduct or flat_crossproduct"),
            ))
        }
    };
    let when = match get(b, "when") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            scalar_string(v)
                .ok_or_else(|| invalid(format!("{at}.when"), "must be an expression"))?,
        ),
    };

    let mut types = BTreeMap::new();
    let mut output_types = BTreeMap::new();
    let mut sub = None;
    let (inputs, outputs, output_kinds) = match proc {
        Some(p) => {
            types = p.types;
            output_types = p.output_types;
            sub = p.sub;
            let (tin, tout) = (p.inputs, p.outputs);
            // Inputs the tool does not declare are for the step's
            // expressions; without any they are a mistake.
            let expressions =
                get(b, "when").is_some() || bindings.values().any(|bd| bd.value_from.is_some());
            if !real && !expressions {
                for name in bindings.keys() {
                    if !tin.iter().any(|(n, _, _)| n == name) {
                        return Err(invalid(
                            format!("{at}.in.{name}"),
                            format!(
                                "the step's tool declares no input `{name}` (inputs: {})",
                                tin.iter()
                                    .map(|(n, _, _)| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
            }
            for o in &outs {
                if !tout.iter().any(|(n, _)| n == o) {
                    return Err(invalid(
                        format!("{at}.out"),
                        format!("the step's tool declares no output `{o}`"),
                    ));
                }
            }
            let mut inputs = Vec::new();
            for (name, tool_default, kind) in tin {
                let bd = bindings.remove(&name).unwrap_or_default();
                let default = bd
                    .default
                    .clone()
                    .or(if real { None } else { tool_default });
                if bd.sources.is_empty() && default.is_none() && bd.value_from.is_none() && real {
                    // A real tool applies its own default, or checks that
                    // the input may be absent, when it runs.
                    inputs.push((
                        StepInput {
                            name,
                            default: Some("null".into()),
                            ..StepInput::default()
                        },
                        true,
                    ));
                    continue;
                }
                if bd.sources.is_empty() && default.is_none() && bd.value_from.is_none() {
                    return Err(invalid(format!("{at}.in"), format!("input `{name}` of the step's tool has no source and no default; bind it under `in:`")));
                }
                inputs.push((
                    input_of(name, bd, default, kind.unwrap_or_default(), false),
                    kind.is_some(),
                ));
            }
            // Inputs the process does not declare: seen by the step's
            // expressions, not passed on.
            for name in &binding_order {
                if let Some(bd) = bindings.remove(name) {
                    let default = bd.default.clone();
                    inputs.push((input_of(name.clone(), bd, default, Kind::Data, true), false));
                }
            }
            let kinds = tout
                .iter()
                .filter(|(_, k)| *k != Kind::Value)
                .cloned()
                .collect();
            (inputs, tout.into_iter().map(|(n, _)| n).collect(), kinds)
        }
        None => {
            let mut inputs = Vec::new();
            for name in binding_order {
                let bd = bindings.remove(&name).unwrap_or_default();
                if bd.sources.is_empty() && bd.default.is_none() && bd.value_from.is_none() {
                    return Err(invalid(
                        format!("{at}.in.{name}"),
                        "no source and no default",
                    ));
                }
                let default = bd.default.clone();
                inputs.push((input_of(name, bd, default, Kind::Value, false), false));
            }
            if outs.is_empty() {
                return Err(invalid(format!("{at}.out"), "the step declares no outputs"));
            }
            (inputs, outs, BTreeMap::new())
        }
    };
    for (i, _) in &inputs {
        if i.hidden {
            continue;
        }
        if real {
            caroni_types::validate_cwl_name(&i.name)
        } else {
            caroni_types::validate_env_name(&i.name)
        }
        .map_err(|err| invalid(format!("{at}.in.{}", i.name), format!("input name {err}")))?;
    }
    let inputs_only: Vec<StepInput> = inputs.iter().map(|(i, _)| i.clone()).collect();
    let computes = inputs_only.iter().any(|i| {
        i.sources.len() > 1
            || i.link_merge.is_some()
            || i.pick_value.is_some()
            || i.value_from.is_some()
            || i.load_contents
    });
    let dynamic = if sub.is_some() || !scatter.is_empty() || when.is_some() || computes {
        let subworkflow = sub.is_some();
        let body = match sub {
            Some(w) => w,
            None => one_step(
                &e.id,
                &job_type,
                &job_kvs,
                &inputs_only,
                &outputs,
                &output_kinds,
                &retry,
                &step_needs,
            ),
        };
        let expressions = expression_reqs(b, at, &here.expressions)?;
        Some(Dynamic {
            scatter: scatter.clone(),
            scatter_method,
            when,
            body: Box::new(body),
            subworkflow,
            expression_context: serde_json::json!({ "requirements": expressions }).to_string(),
            input_types: types,
        })
    } else {
        None
    };
    // Inputs the process does not declare matter only to expressions: a
    // step without any drops them (CWL: they are not passed on).
    let mut inputs_only = inputs_only;
    let mut inputs = inputs;
    if dynamic.is_none() {
        inputs_only.retain(|i| !i.hidden);
        inputs.retain(|(i, _)| !i.hidden);
    }
    // A scattered step's outputs are lists of its elements' outputs.
    let output_kinds = if scatter.is_empty() {
        output_kinds
    } else {
        outputs
            .iter()
            .map(|o| {
                let k = output_kinds.get(o).copied().unwrap_or_default();
                let listed = match k {
                    Kind::File => Kind::Files,
                    Kind::Value => Kind::Value,
                    _ => Kind::Data,
                };
                (o.clone(), listed)
            })
            .filter(|(_, k)| *k != Kind::Value)
            .collect()
    };
    Ok((
        Step {
            id: e.id.clone(),
            job_type,
            job_kvs,
            inputs: inputs_only,
            outputs,
            output_kinds,
            dynamic,
            output_types,
            retry,
            needs: step_needs,
        },
        inputs
            .into_iter()
            .map(|(i, declared)| (i.name, declared))
            .collect(),
    ))
}

fn input_of(
    name: String,
    bd: Binding,
    default: Option<String>,
    kind: Kind,
    hidden: bool,
) -> StepInput {
    let many = bd.sources.len() > 1;
    StepInput {
        name,
        source: bd.sources.first().cloned(),
        sources: if many { bd.sources } else { Vec::new() },
        default,
        kind,
        link_merge: bd.link_merge,
        pick_value: bd.pick_value,
        value_from: bd.value_from,
        load_contents: bd.load_contents,
        hidden,
    }
}

/// What one element of a dynamic step that runs a tool runs: a workflow
/// of that one step, whose inputs are the inputs the tool declares.
#[allow(clippy::too_many_arguments)]
fn one_step(
    id: &str,
    job_type: &str,
    job_kvs: &BTreeMap<String, String>,
    inputs: &[StepInput],
    outputs: &[String],
    output_kinds: &BTreeMap<String, Kind>,
    retry: &Retry,
    needs: &caroni_types::market::Needs,
) -> Workflow {
    let passed: Vec<&StepInput> = inputs.iter().filter(|i| !i.hidden).collect();
    // A real tool reads its values by its own types: after a scatter or an
    // expression a value may carry files anywhere.
    let kind = |i: &StepInput| {
        if job_type == caroni_types::CWL_TOOL_JOB_TYPE {
            Kind::Data
        } else {
            i.kind
        }
    };
    Workflow {
        inputs: passed
            .iter()
            .map(|i| WorkflowInput {
                id: i.name.clone(),
                default: Some("null".into()),
                kind: kind(i),
                cwl_type: None,
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|o| WorkflowOutput {
                id: o.clone(),
                source: Source::StepOutput {
                    step: id.to_string(),
                    output: o.clone(),
                },
                kind: output_kinds.get(o).copied().unwrap_or_default(),
                sources: Vec::new(),
                link_merge: None,
                pick_value: None,
            })
            .collect(),
        steps: vec![Step {
            id: id.to_string(),
            job_type: job_type.to_string(),
            job_kvs: job_kvs.clone(),
            inputs: passed
                .iter()
                .map(|i| StepInput {
                    name: i.name.clone(),
                    source: Some(Source::Input(i.name.clone())),
                    kind: kind(i),
                    ..StepInput::default()
                })
                .collect(),
            outputs: outputs.to_vec(),
            output_kinds: output_kinds.clone(),
            dynamic: None,
            output_types: BTreeMap::new(),
            retry: retry.clone(),
            needs: needs.clone(),
        }],
        max_attempts: retry.max_attempts,
        budget: None,
        priority: 0,
    }
}

/// True when the step runs a real CWL CommandLineTool or ExpressionTool
/// (for now also run by an agent that runs CWL tools): its `run` is one
/// and neither it nor the step names a Caroni job type.
fn is_real_tool(step: &Mapping, tool: &Mapping, at: &str) -> Result<bool, Error> {
    if !matches!(
        get(tool, "class").and_then(Value::as_str),
        Some("CommandLineTool" | "ExpressionTool")
    ) {
        return Ok(false);
    }
    for (holder, hat) in [(step, at.to_string()), (tool, format!("{at}.run"))] {
        if requirement_entries(holder, &hat)?
            .iter()
            .any(|(class, _, _)| is_caroni(class))
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What a port of a real tool (normalised) carries on the mesh (see
/// [`classify`]): a port with secondary files carries a value with files.
pub fn port_kind(port: &serde_json::Value) -> Kind {
    if port.get("secondaryFiles").is_some() {
        return Kind::Data;
    }
    let t = port
        .get("type")
        .cloned()
        .unwrap_or(serde_json::json!("Any"));
    classify(&caroni_cwl_exec::load::normalize_type(&t), true).unwrap_or(Kind::Data)
}

/// A real CWL CommandLineTool written inline: its inputs (with their
/// kinds; none has a default here, the tool applies its own), its outputs,
/// and the tool as compact, normalised JSON for the request.
#[allow(clippy::type_complexity)]
fn real_tool(
    tool: &Mapping,
    at: &str,
) -> Result<
    (
        Vec<(String, Option<String>, Option<Kind>)>,
        Vec<(String, Kind)>,
        String,
    ),
    Error,
> {
    let raw = serde_json::to_value(tool)
        .map_err(|e| invalid(at, format!("the tool cannot be read as JSON: {e}")))?;
    let norm = caroni_cwl_exec::load::normalize(raw).map_err(|e| invalid(at, e.to_string()))?;
    let ports = |key: &str| -> Vec<(String, Kind)> {
        norm.get(key)
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let id = p.get("id")?.as_str()?.to_string();
                Some((id, port_kind(p)))
            })
            .collect()
    };
    let ins = ports("inputs")
        .into_iter()
        .map(|(id, k)| (id, None, Some(k)))
        .collect();
    let outs = ports("outputs");
    let json = norm.to_string();
    if json.len() > caroni_types::MAX_CWL_TOOL_BYTES {
        return Err(unsupported(
            at,
            format!("a tool of {} bytes as JSON", json.len()),
            format!(
                "keep a tool under {} KiB (move long scripts into files the tool reads)",
                caroni_types::MAX_CWL_TOOL_BYTES / 1024
            ),
        ));
    }
    Ok((ins, outs, json))
}

/// Orders steps so that each comes after the steps it reads from; refuses a
/// cycle, naming the steps in it.
fn topo_sort(steps: Vec<Step>) -> Result<Vec<Step>, Error> {
    let index: BTreeMap<String, usize> = steps
        .iter()
        .enumerate()
        .map(|(n, s)| (s.id.clone(), n))
        .collect();
    let mut indegree = vec![0usize; steps.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (n, s) in steps.iter().enumerate() {
        let deps: BTreeSet<usize> = s
            .inputs
            .iter()
            .filter_map(|i| match &i.source {
                Some(Source::StepOutput { step, .. }) => index.get(step).copied(),
                _ => None,
            })
            .collect();
        indegree[n] = deps.len();
        for d in deps {
            readers[d].push(n);
        }
    }
    let mut ready: VecDeque<usize> = (0..steps.len()).filter(|&n| indegree[n] == 0).collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(n) = ready.pop_front() {
        order.push(n);
        for &r in &readers[n] {
            indegree[r] -= 1;
            if indegree[r] == 0 {
                ready.push_back(r);
            }
        }
    }
    if order.len() != steps.len() {
        let stuck: Vec<&str> = (0..steps.len())
            .filter(|n| indegree[*n] > 0)
            .map(|n| steps[n].id.as_str())
            .collect();
        return Err(invalid(
            "steps",
            format!(
                "the steps form a cycle through {}; a workflow must be a DAG",
                stuck.join(" → ")
            ),
        ));
    }
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|n| slots[n].take()).collect())
}
