//! The rules of CWL workflows that act on values while a workflow runs:
//! how a value travelling as text is read and written, how several
//! sources combine (`linkMerge`, `pickValue`), how scattered inputs make
//! elements and how the elements' outputs gather, and step expressions
//! (`valueFrom`, `when`). Pure functions over JSON: the manager's machine
//! calls them; nothing here does I/O beyond the expression engine.

use caroni_cwl_exec::expr::{Evaluator, Limits};
use caroni_cwl_exec::types::from_text;
pub use caroni_cwl_exec::types::Names;
use serde_json::{json, Value as J};

use crate::{Dynamic, LinkMerge, PickValue, ScatterMethod};

/// Time allowed to one step expression on the manager.
const EXPRESSION_SECONDS: u64 = 5;
/// Memory allowed to the manager's expression engine.
const EXPRESSION_MEMORY: usize = 64 << 20;

/// Reads a value as it travels (text) by its CWL type when known (`ty`,
/// JSON), else as JSON, else as a string. The text `null` is null.
pub fn read(text: &str, ty: Option<&str>, names: &Names) -> J {
    if text == "null" {
        return J::Null;
    }
    if let Some(t) = ty.and_then(|t| serde_json::from_str::<J>(t).ok()) {
        if let Ok(v) = from_text(&t, text, names) {
            return v;
        }
    }
    serde_json::from_str(text).unwrap_or_else(|_| J::String(text.to_string()))
}

/// Writes a value as it travels: null as `null`, a string as it is
/// where its type reads it back so (any string but `null` when the type
/// is not known), anything else as JSON.
pub fn write(v: &J, ty: Option<&str>, names: &Names) -> String {
    match v {
        J::Null => "null".into(),
        J::String(s) if s != "null" => {
            let t = ty.and_then(|t| serde_json::from_str::<J>(t).ok());
            match t {
                Some(t) if from_text(&t, s, names).ok().as_ref() != Some(v) => v.to_string(),
                _ => s.clone(),
            }
        }
        other => other.to_string(),
    }
}

/// Combines the values of a port's sources: `values` in source order,
/// `many` when the port names several sources.
pub fn merge(values: Vec<J>, link_merge: Option<LinkMerge>, many: bool) -> J {
    match (link_merge, many) {
        (None, false) => values.into_iter().next().unwrap_or(J::Null),
        (None | Some(LinkMerge::Nested), _) => J::Array(values),
        (Some(LinkMerge::Flattened), _) => {
            let mut out = Vec::new();
            for v in values {
                match v {
                    J::Array(items) => out.extend(items),
                    other => out.push(other),
                }
            }
            J::Array(out)
        }
    }
}

/// Applies `pickValue` to a combined value (a list); the errors are the
/// specification's.
pub fn pick(v: J, how: PickValue, at: &str) -> Result<J, String> {
    let items = match v {
        J::Array(items) => items,
        J::Null => Vec::new(),
        other => vec![other],
    };
    let mut non_null = items.into_iter().filter(|x| !x.is_null());
    match how {
        PickValue::FirstNonNull => non_null.next().ok_or_else(|| {
            format!("{at}: pickValue first_non_null found no value that is not null")
        }),
        PickValue::TheOnlyNonNull => {
            let first = non_null.next().ok_or_else(|| {
                format!("{at}: pickValue the_only_non_null found no value that is not null")
            })?;
            if non_null.next().is_some() {
                return Err(format!(
                    "{at}: pickValue the_only_non_null found more than one value that is not null"
                ));
            }
            Ok(first)
        }
        PickValue::AllNonNull => Ok(J::Array(non_null.collect())),
    }
}

/// The shape of a scatter: the length of each scattered input.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Length of each scattered input, in `scatter` order (empty: the
    /// step does not scatter and has one element).
    pub dims: Vec<u32>,
    /// How they combine.
    pub method: ScatterMethod,
}

impl Shape {
    /// The shape of `inputs` (the step's input object) scattered over
    /// `names`; an error when one is not a list, or dot-product lists
    /// differ in length.
    pub fn of(d: &Dynamic, inputs: &J) -> Result<Shape, String> {
        let mut dims = Vec::new();
        for name in &d.scatter {
            match inputs.get(name) {
                Some(J::Array(a)) => dims.push(a.len() as u32),
                other => {
                    return Err(format!(
                    "scatter input `{name}` is {}, not a list; a scattered input must be an array",
                    describe(other.unwrap_or(&J::Null))
                ))
                }
            }
        }
        if d.scatter_method == ScatterMethod::Dotproduct && dims.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "dotproduct scatter over inputs of different lengths ({}); give lists of one length or use a crossproduct",
                d.scatter
                    .iter()
                    .zip(&dims)
                    .map(|(n, l)| format!("{n}: {l}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Shape {
            dims,
            method: d.scatter_method,
        })
    }

    /// True when the step scatters.
    pub fn scatters(&self) -> bool {
        !self.dims.is_empty()
    }

    /// Number of elements.
    pub fn total(&self) -> u64 {
        if self.dims.is_empty() {
            return 1;
        }
        match self.method {
            ScatterMethod::Dotproduct => u64::from(self.dims[0]),
            _ => self.dims.iter().map(|d| u64::from(*d)).product(),
        }
    }

    /// The index into each scattered input of element `k`.
    pub fn indexes(&self, k: u64) -> Vec<usize> {
        match self.method {
            ScatterMethod::Dotproduct => vec![k as usize; self.dims.len()],
            _ => {
                let mut rest = k;
                let mut out = vec![0; self.dims.len()];
                for (i, d) in self.dims.iter().enumerate().rev() {
                    let d = u64::from(*d).max(1);
                    out[i] = (rest % d) as usize;
                    rest /= d;
                }
                out
            }
        }
    }

    /// The input object of element `k`: each scattered input replaced by
    /// its item.
    pub fn element(&self, d: &Dynamic, inputs: &J, k: u64) -> J {
        let Some(all) = inputs.as_object() else {
            return inputs.clone();
        };
        let idx = self.indexes(k);
        // Each input copied once, a scattered one as its item only (never
        // the whole list: a step of N elements would copy N² items).
        let obj = all
            .iter()
            .map(|(name, v)| {
                let v = match d.scatter.iter().position(|s| s == name) {
                    Some(p) => v.get(idx[p]).cloned().unwrap_or(J::Null),
                    None => v.clone(),
                };
                (name.clone(), v)
            })
            .collect();
        J::Object(obj)
    }

    /// The output of the step from its elements' values, in element
    /// order: one value when it does not scatter, a list (nested one level
    /// per input for `nested_crossproduct`) when it does.
    pub fn gather(&self, values: Vec<J>) -> J {
        if self.dims.is_empty() {
            return values.into_iter().next().unwrap_or(J::Null);
        }
        if self.method != ScatterMethod::NestedCrossproduct || self.dims.len() == 1 {
            return J::Array(values);
        }
        fn nest(dims: &[u32], items: &mut std::vec::IntoIter<J>) -> J {
            match dims {
                [] => items.next().unwrap_or(J::Null),
                [d, rest @ ..] => J::Array((0..*d).map(|_| nest(rest, items)).collect()),
            }
        }
        nest(&self.dims, &mut values.into_iter())
    }
}

fn describe(v: &J) -> &'static str {
    match v {
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "a list",
        J::Object(_) => "an object",
    }
}

/// Step expressions of one dynamic step: `valueFrom` and `when` under its
/// requirements.
pub struct Expressions {
    ev: Evaluator,
    /// Named types of the expression context.
    pub names: Names,
}

impl Expressions {
    /// The evaluator of a dynamic step.
    pub fn of(d: &Dynamic) -> Self {
        let doc: J = serde_json::from_str(&d.expression_context).unwrap_or(json!({}));
        let limits = Limits {
            time: std::time::Duration::from_secs(EXPRESSION_SECONDS),
            memory_bytes: EXPRESSION_MEMORY,
        };
        Self {
            ev: caroni_cwl_exec::run::evaluator(&doc, limits),
            names: Names::of(&doc),
        }
    }

    /// Evaluates `expr` with `inputs` and `self`.
    pub fn eval(&mut self, expr: &str, inputs: &J, this: &J) -> Result<J, String> {
        self.ev.set_inputs(with_names(inputs));
        self.ev
            .eval(&J::String(expr.to_string()), &with_names(this))
            .map_err(|e| e.to_string())
    }

    /// Evaluates a `when` condition; it must give a boolean.
    pub fn when(&mut self, expr: &str, inputs: &J) -> Result<bool, String> {
        match self.eval(expr, inputs, &J::Null)? {
            J::Bool(b) => Ok(b),
            other => Err(format!(
                "the `when` condition {expr} gave {other}, not a boolean (true or false)"
            )),
        }
    }
}

/// `value` with the name fields of each File that expressions read
/// (`nameroot`, `nameext`) filled from its basename.
pub fn with_names(value: &J) -> J {
    let mut v = value.clone();
    let _ = caroni_cwl_exec::files::visit_mut(&mut v, &mut |f| {
        if f.get("class").and_then(J::as_str) == Some("File") {
            if let Some(base) = f.get("basename").and_then(J::as_str).map(str::to_string) {
                let (root, ext) = caroni_cwl_exec::files::split_name(&base);
                if f.get("nameroot").is_none() {
                    f["nameroot"] = J::String(root);
                }
                if f.get("nameext").is_none() {
                    f["nameext"] = J::String(ext);
                }
            }
        }
        Ok(())
    });
    v
}

/// `value` in the form it travels in: the fields expressions read that
/// are computed where a file is placed (`nameroot`, `nameext`,
/// `contents`, `path`, `location`, `dirname`, `checksum`) are taken out of
/// every uploaded File and Directory (one with a `sha256`, or a Directory
/// listing them).
pub fn travel_form(value: &mut J) {
    match value {
        J::Object(m) => {
            let class = m.get("class").and_then(J::as_str).map(str::to_string);
            let uploaded = m.contains_key("sha256") || class.as_deref() == Some("Directory");
            if uploaded && matches!(class.as_deref(), Some("File" | "Directory")) {
                for k in [
                    "nameroot", "nameext", "contents", "path", "location", "dirname", "checksum",
                ] {
                    m.remove(k);
                }
            }
            m.values_mut().for_each(travel_form);
        }
        J::Array(a) => a.iter_mut().for_each(travel_form),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: &[u32], method: ScatterMethod) -> Shape {
        Shape {
            dims: dims.to_vec(),
            method,
        }
    }

    #[test]
    fn nested_crossproduct_gathers_one_level_per_input() {
        let s = shape(&[2, 3], ScatterMethod::NestedCrossproduct);
        assert_eq!(s.total(), 6);
        assert_eq!(s.indexes(4), vec![1, 1]);
        let values = (0..6).map(|k| json!(k)).collect();
        assert_eq!(s.gather(values), json!([[0, 1, 2], [3, 4, 5]]));
        let flat = shape(&[2, 3], ScatterMethod::FlatCrossproduct);
        assert_eq!(
            flat.gather((0..6).map(|k| json!(k)).collect()),
            json!([0, 1, 2, 3, 4, 5])
        );
    }

    #[test]
    fn empty_scatters_gather_to_empty_lists() {
        let s = shape(&[0], ScatterMethod::Dotproduct);
        assert_eq!(s.total(), 0);
        assert_eq!(s.gather(Vec::new()), json!([]));
        let n = shape(&[2, 0], ScatterMethod::NestedCrossproduct);
        assert_eq!(n.total(), 0);
        assert_eq!(n.gather(Vec::new()), json!([[], []]));
    }

    #[test]
    fn merge_and_pick_follow_the_specification() {
        assert_eq!(
            merge(
                vec![json!(1), json!([2, 3])],
                Some(LinkMerge::Flattened),
                true
            ),
            json!([1, 2, 3])
        );
        assert_eq!(
            merge(vec![json!(1)], Some(LinkMerge::Nested), false),
            json!([1])
        );
        assert_eq!(merge(vec![json!(1), json!(2)], None, true), json!([1, 2]));
        let v = json!([null, "a", "b"]);
        assert_eq!(
            pick(v.clone(), PickValue::FirstNonNull, "x"),
            Ok(json!("a"))
        );
        assert!(pick(v.clone(), PickValue::TheOnlyNonNull, "x").is_err());
        assert_eq!(pick(v, PickValue::AllNonNull, "x"), Ok(json!(["a", "b"])));
        assert!(pick(json!([null, null]), PickValue::FirstNonNull, "x").is_err());
    }

    #[test]
    fn strings_travel_as_written_unless_their_type_reads_them_otherwise() {
        let names = Names::default();
        assert_eq!(write(&json!("hello"), None, &names), "hello");
        assert_eq!(write(&json!("null"), None, &names), "\"null\"");
        assert_eq!(write(&json!(3), None, &names), "3");
        assert_eq!(read("3", Some("\"int\""), &names), json!(3));
        assert_eq!(read("3", Some("\"string\""), &names), json!("3"));
        assert_eq!(read("null", None, &names), J::Null);
    }
}
