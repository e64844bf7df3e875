//! Walks the YAML value tree of a CWL document and builds a [`Workflow`].
//!
//! (Over 600 lines: one walk over the document, each part of CWL a
//! function; the next issues split it by CWL class as they grow it.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_yaml_ng::{Mapping, Value};

use crate::{
    get, invalid, unsupported, Error, Kind, Source, Step, StepInput, Workflow, WorkflowInput,
    WorkflowOutput,
};

const REQUIREMENT: &str = "CaroniRequirement";

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
                Some(Value::String(t)) if t == "array" => Some(body),
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

/// Refuses keys that name features outside the subset.
fn refuse_features(m: &Mapping, at: &str) -> Result<(), Error> {
    for (key, feature, hint) in [
        ("scatter", "`scatter`", "run one workflow per item instead"),
        (
            "when",
            "conditional execution (`when`)",
            "remove the condition",
        ),
        (
            "valueFrom",
            "expressions (`valueFrom`)",
            "compute the value in the job body",
        ),
        ("linkMerge", "`linkMerge`", "use a single source"),
        ("pickValue", "`pickValue`", "use a single source"),
    ] {
        if get(m, key).is_some() {
            return Err(unsupported(format!("{at}.{key}"), feature, hint));
        }
    }
    Ok(())
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

fn refuse_requirement(class: &str, at: &str) -> Result<(), Error> {
    let short = class.rsplit([':', '#']).next().unwrap_or(class);
    match short {
        "ScatterFeatureRequirement" => Err(unsupported(
            at,
            "`scatter` (ScatterFeatureRequirement)",
            "run one workflow per item instead",
        )),
        "SubworkflowFeatureRequirement" => Err(unsupported(
            at,
            "sub-workflows (SubworkflowFeatureRequirement)",
            "flatten the sub-workflow's steps into this workflow",
        )),
        "InlineJavascriptRequirement" | "StepInputExpressionRequirement" => Err(unsupported(
            at,
            format!("expressions ({short})"),
            "compute values in the job body",
        )),
        "MultipleInputFeatureRequirement" => Err(unsupported(
            at,
            "multiple sources (MultipleInputFeatureRequirement)",
            "use one source per input",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn workflow(m: &Mapping) -> Result<Workflow, Error> {
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
    let mut max_attempts = None;
    for (class, body, at) in requirement_entries(m, "workflow")? {
        refuse_requirement(&class, &at)?;
        if is_caroni(&class) {
            if let Some(v) = get(body, "CaroniMaxAttempts") {
                let n = scalar_string(v)
                    .and_then(|s| s.parse::<u32>().ok())
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            format!("{at}.CaroniMaxAttempts"),
                            "must be a whole number from 1 to 100",
                        )
                    })?;
                max_attempts = Some(n);
            }
        }
    }

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
        inputs.push(WorkflowInput {
            id: e.id,
            default,
            kind: kind.unwrap_or_default(),
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
    let mut steps = Vec::new();
    let mut declared_inputs = BTreeMap::new();
    for e in &step_entries {
        claim(&e.id, &e.at)?;
        let (s, declared) = step(e)?;
        declared_inputs.insert(s.id.clone(), declared);
        steps.push(s);
    }

    let mut outputs = Vec::new();
    for e in entries(get(m, "outputs").unwrap_or(&Value::Null), "outputs", false)? {
        claim(&e.id, &e.at)?;
        let b = mapping(e.body, &e.at)?;
        let declared = check_type(get(b, "type"), &e.at)?;
        refuse_features(b, &e.at)?;
        let src = match get(b, "outputSource") {
            None | Some(Value::Null) => {
                return Err(invalid(&e.at, format!("workflow output `{}` has no `outputSource`; name the step output it comes from, as `step/output`", e.id)))
            }
            Some(Value::Sequence(_)) => {
                return Err(unsupported(format!("{}.outputSource", e.at), "multiple output sources", "use one source"))
            }
            Some(v) => scalar_string(v).ok_or_else(|| invalid(format!("{}.outputSource", e.at), "must be a string"))?,
        };
        outputs.push((
            WorkflowOutput {
                id: e.id.clone(),
                source: parse_source(&src),
                kind: declared.unwrap_or_default(),
            },
            declared.is_some(),
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
            if let Some(src) = &i.source {
                check(src, &format!("steps.{}.in.{}", s.id, i.name))?;
            }
        }
    }
    for (o, _) in &outputs {
        check(&o.source, &format!("outputs.{}.outputSource", o.id))?;
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
        for i in &mut s.inputs {
            let Some(src) = &i.source else { continue };
            let have = kind_of(src);
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

/// A step, and for each input whether its tool declares its type (an
/// undeclared one carries what its source carries).
fn step(e: &Entry<'_>) -> Result<(Step, BTreeMap<String, bool>), Error> {
    let at = &e.at;
    let b = mapping(e.body, at)?;
    refuse_features(b, at)?;

    // The tool: inline `run:` with its declared inputs and outputs.
    type ToolInputs = Vec<(String, Option<String>, Option<Kind>)>;
    let mut tool_inputs: Option<ToolInputs> = None;
    let mut tool_outputs: Option<Vec<(String, Kind)>> = None;
    // A real CWL CommandLineTool (no CaroniRequirement): its JSON.
    let mut cwl_tool: Option<String> = None;
    let mut requirement_holders = vec![(b, at.clone())];
    match get(b, "run") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) => {
            return Err(unsupported(
                format!("{at}.run"),
                format!("an external tool reference (`{r}`)"),
                "write the tool inline under `run:`",
            ))
        }
        Some(Value::Mapping(tool)) if is_real_tool(b, tool, at)? => {
            let run_at = format!("{at}.run");
            let (ins, outs, json) = real_tool(tool, &run_at)?;
            tool_inputs = Some(ins);
            tool_outputs = Some(outs);
            cwl_tool = Some(json);
        }
        Some(Value::Mapping(tool)) => {
            let run_at = format!("{at}.run");
            match get(tool, "class").and_then(Value::as_str) {
                Some("Workflow") => {
                    return Err(unsupported(
                        run_at,
                        "a sub-workflow",
                        "flatten the sub-workflow's steps into this workflow",
                    ))
                }
                Some("ExpressionTool") => {
                    return Err(unsupported(
                        run_at,
                        "an ExpressionTool (expressions)",
                        "compute the value in a job body",
                    ))
                }
                _ => {}
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
            tool_inputs = Some(ins);
            tool_outputs = Some(outs);
            requirement_holders.push((tool, run_at));
        }
        Some(_) => {
            return Err(invalid(
                format!("{at}.run"),
                "expected an inline tool (a mapping)",
            ))
        }
    }

    // The job type, from hints or requirements of the step or its tool.
    let mut job_type = None;
    let mut job_kvs = BTreeMap::new();
    for (holder, hat) in &requirement_holders {
        for (class, body, rat) in requirement_entries(holder, hat)? {
            refuse_requirement(&class, &rat)?;
            if !is_caroni(&class) {
                continue;
            }
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
    if let Some(json) = &cwl_tool {
        job_type = Some(caroni_types::CWL_TOOL_JOB_TYPE.to_string());
        job_kvs = BTreeMap::from([(caroni_types::CWL_TOOL_KV.to_string(), json.clone())]);
    }
    let job_type = job_type.ok_or_else(|| {
        invalid(at, format!("step `{}` names no job type; add `hints: {{caroni:CaroniRequirement: {{CaroniJobName: <job type>}}}}`", e.id))
    })?;

    // Bindings from `in`.
    let mut bindings: BTreeMap<String, (Option<Source>, Option<String>)> = BTreeMap::new();
    let mut binding_order = Vec::new();
    for ie in entries(
        get(b, "in").unwrap_or(&Value::Null),
        &format!("{at}.in"),
        false,
    )? {
        let (source, default) = match ie.body {
            Value::Mapping(ib) => {
                refuse_features(ib, &ie.at)?;
                let source = match get(ib, "source") {
                    None | Some(Value::Null) => None,
                    Some(Value::Sequence(_)) => {
                        return Err(unsupported(
                            format!("{}.source", ie.at),
                            "multiple sources",
                            "use one source per input",
                        ))
                    }
                    Some(v) => Some(parse_source(&scalar_string(v).ok_or_else(|| {
                        invalid(format!("{}.source", ie.at), "must be a string")
                    })?)),
                };
                (source, get(ib, "default").and_then(scalar_string))
            }
            Value::Sequence(_) => {
                return Err(unsupported(
                    &ie.at,
                    "multiple sources",
                    "use one source per input",
                ))
            }
            v => (
                Some(parse_source(
                    &scalar_string(v).ok_or_else(|| invalid(&ie.at, "source must be a string"))?,
                )),
                None,
            ),
        };
        binding_order.push(ie.id.clone());
        bindings.insert(ie.id, (source, default));
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

    let (inputs, outputs, output_kinds) = match (tool_inputs, tool_outputs) {
        (Some(tin), Some(tout)) => {
            if cwl_tool.is_some() {
                // CWL: a step input the tool does not declare is not
                // passed to it.
                bindings.retain(|name, _| tin.iter().any(|(n, _, _)| n == name));
            }
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
                let (source, default) = bindings.remove(&name).unwrap_or((None, None));
                let default = default.or(tool_default);
                if source.is_none() && default.is_none() && cwl_tool.is_some() {
                    // A real tool applies its own default, or checks that
                    // the input may be absent, when it runs.
                    inputs.push((
                        StepInput {
                            name,
                            source: None,
                            default: Some("null".into()),
                            kind: Kind::Value,
                        },
                        true,
                    ));
                    continue;
                }
                if source.is_none() && default.is_none() {
                    return Err(invalid(format!("{at}.in"), format!("input `{name}` of the step's tool has no source and no default; bind it under `in:`")));
                }
                inputs.push((
                    StepInput {
                        name,
                        source,
                        default,
                        kind: kind.unwrap_or_default(),
                    },
                    kind.is_some(),
                ));
            }
            let kinds = tout
                .iter()
                .filter(|(_, k)| *k != Kind::Value)
                .cloned()
                .collect();
            (inputs, tout.into_iter().map(|(n, _)| n).collect(), kinds)
        }
        _ => {
            let mut inputs = Vec::new();
            for name in binding_order {
                let (source, default) = bindings.remove(&name).unwrap_or((None, None));
                if source.is_none() && default.is_none() {
                    return Err(invalid(
                        format!("{at}.in.{name}"),
                        "no source and no default",
                    ));
                }
                inputs.push((
                    StepInput {
                        name,
                        source,
                        default,
                        kind: Kind::Value,
                    },
                    false,
                ));
            }
            if outs.is_empty() {
                return Err(invalid(format!("{at}.out"), "the step declares no outputs"));
            }
            (inputs, outs, BTreeMap::new())
        }
    };
    for (i, _) in &inputs {
        if cwl_tool.is_some() {
            caroni_types::validate_cwl_name(&i.name)
        } else {
            caroni_types::validate_env_name(&i.name)
        }
        .map_err(|err| invalid(format!("{at}.in.{}", i.name), format!("input name {err}")))?;
    }
    Ok((
        Step {
            id: e.id.clone(),
            job_type,
            job_kvs,
            inputs: inputs.iter().map(|(i, _)| i.clone()).collect(),
            outputs,
            output_kinds,
        },
        inputs
            .into_iter()
            .map(|(i, declared)| (i.name, declared))
            .collect(),
    ))
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
