//! The CWL subset Caroni runs: a CWL v1.x `class: Workflow` document whose
//! steps name a Caroni job type, turned into a validated step graph.
//!
//! This crate owns parsing and validation only. It does no I/O and must not
//! depend on any engine, storage or network crate. Everything outside the
//! subset is refused with an error that names the feature and where it is;
//! nothing is silently ignored.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

pub mod dynamic;
mod parse;
pub use parse::port_kind;

/// A validated workflow template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflow {
    /// Workflow inputs, in document order.
    pub inputs: Vec<WorkflowInput>,
    /// Workflow outputs, in document order.
    pub outputs: Vec<WorkflowOutput>,
    /// Steps in a topological order (every step after the steps it reads).
    pub steps: Vec<Step>,
    /// Attempts allowed per step (`CaroniMaxAttempts` hint on the workflow).
    pub max_attempts: Option<u32>,
    /// What the workflow may spend (`CaroniBudget`); not kept in stored
    /// plans (a workflow's budget has a record of its own).
    #[serde(skip)]
    pub budget: Option<caroni_types::market::Budget>,
    /// Its priority among this manager's workflows (`CaroniPriority`;
    /// higher first, 0 by default); not kept in stored plans.
    #[serde(skip)]
    pub priority: i32,
}

/// Kinds of failure a retry policy may name (`CaroniNoRetry`).
pub const FAILURE_KINDS: [&str; 7] = [
    "exit_status",
    "output",
    "timeout",
    "killed",
    "lost",
    "unplaceable",
    "other",
];

/// How a step is retried (`CaroniRequirement` keys `CaroniMaxAttempts`,
/// `CaroniRetryBackoff`, `CaroniNoRetry`): what the step says, else what
/// the workflow around it says, else the manager's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Attempts allowed.
    pub max_attempts: Option<u32>,
    /// Delay before the first retry (ms); doubles per failure.
    pub backoff_initial_ms: Option<u64>,
    /// Longest delay between retries (ms).
    pub backoff_max_ms: Option<u64>,
    /// Failure kinds never retried ([`FAILURE_KINDS`]).
    pub no_retry: Option<Vec<String>>,
}

impl Retry {
    /// This policy, with what it leaves unsaid taken from `outer`.
    pub fn over(&self, outer: &Retry) -> Retry {
        Retry {
            max_attempts: self.max_attempts.or(outer.max_attempts),
            backoff_initial_ms: self.backoff_initial_ms.or(outer.backoff_initial_ms),
            backoff_max_ms: self.backoff_max_ms.or(outer.backoff_max_ms),
            no_retry: self.no_retry.clone().or_else(|| outer.no_retry.clone()),
        }
    }
}

/// How the elements of several scattered inputs are combined
/// (`scatterMethod`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScatterMethod {
    /// Element k of every scattered input together (equal lengths).
    #[default]
    Dotproduct,
    /// Every combination; the outputs nest one array level per input.
    NestedCrossproduct,
    /// Every combination; the outputs are one flat array.
    FlatCrossproduct,
}

/// How the values of several sources are combined (`linkMerge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkMerge {
    /// A list with one item per source.
    Nested,
    /// A list of every source's items (a source that is not a list is
    /// one item).
    Flattened,
}

/// Which of several values is taken (`pickValue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PickValue {
    /// The first value that is not null; an error when all are.
    FirstNonNull,
    /// The one value that is not null; an error when there are none or
    /// several.
    TheOnlyNonNull,
    /// Every value that is not null, as a list.
    AllNonNull,
}

/// What a step does beyond one job with its inputs as they arrive: it
/// scatters, runs on a condition, runs a sub-workflow, or computes its
/// inputs (several sources, `valueFrom`, `loadContents`). Such a step
/// runs when all its sources have values; the manager evaluates its
/// inputs and runs [`Dynamic::body`] once per element as a workflow of its
/// own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dynamic {
    /// The scattered inputs, in order.
    pub scatter: Vec<String>,
    /// How several scattered inputs combine.
    pub scatter_method: ScatterMethod,
    /// The condition (`when`), an expression.
    pub when: Option<String>,
    /// What one element runs: the step's tool as a one-step workflow, or
    /// its sub-workflow. Its inputs are the step inputs the process
    /// declares.
    pub body: Box<Workflow>,
    /// True when the body is a sub-workflow written in the document.
    pub subworkflow: bool,
    /// Requirements for the step's expressions, as JSON
    /// (`{"requirements": [...]}`: InlineJavascriptRequirement,
    /// SchemaDefRequirement).
    pub expression_context: String,
    /// The CWL type of each input the process declares, as JSON, to read
    /// values by (an input it does not declare is read as JSON or text).
    pub input_types: BTreeMap<String, String>,
}

/// What a port carries.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Kind {
    /// A string (other scalars in their string form).
    #[default]
    Value,
    /// One file (`File`, `File?`): a reference to a blob.
    File,
    /// A list of files (`File[]`).
    Files,
    /// A CWL value that holds Files or Directories anywhere (a Directory,
    /// a record or nested array with files, a File with secondary files,
    /// `Any` of a real tool): JSON whose File and Directory objects are
    /// references (`caroni_types::file::data_refs`).
    Data,
}

impl Kind {
    /// The CWL spelling.
    pub fn cwl(self) -> &'static str {
        match self {
            Kind::Value => "string",
            Kind::File => "File",
            Kind::Files => "File[]",
            Kind::Data => "a value with files",
        }
    }

    /// True when a port declared `self` may read from a source that
    /// carries `have`. A value with files goes anywhere a value may be
    /// read by its type (the consuming tool checks it when it runs); files
    /// and text do not mix.
    pub fn accepts(self, have: Kind) -> bool {
        self == have || self == Kind::Data || have == Kind::Data
    }
}

/// One workflow input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowInput {
    /// Its id.
    pub id: String,
    /// Default value, if the document gives one.
    pub default: Option<String>,
    /// What it carries.
    pub kind: Kind,
    /// Its declared CWL type as JSON, to check given values against
    /// ([`check_input`]); not kept in stored plans.
    #[serde(skip)]
    pub cwl_type: Option<String>,
}

/// Checks a value given for a workflow input against its declared CWL
/// type (`ty`, JSON): numbers, booleans and enum symbols must be what the
/// type says, lists must be JSON lists of such; strings, files, records
/// and `Any` are not checked here. `Err` says what was expected.
pub fn check_input(ty: &str, v: &str) -> Result<(), String> {
    let Ok(ty) = serde_json::from_str::<serde_json::Value>(ty) else {
        return Ok(());
    };
    check_typed(&ty, v.trim())
}

fn check_typed(ty: &serde_json::Value, v: &str) -> Result<(), String> {
    use serde_json::Value as J;
    match ty {
        J::String(t) => {
            if let Some(inner) = t.strip_suffix('?') {
                if v == "null" {
                    return Ok(());
                }
                return check_typed(&J::String(inner.into()), v);
            }
            if let Some(item) = t.strip_suffix("[]") {
                return check_list(&J::String(item.into()), v);
            }
            let name = t.rsplit(['#', '/']).next().unwrap_or(t);
            let unquoted = serde_json::from_str::<String>(v).unwrap_or_else(|_| v.to_string());
            let ok = match name {
                "int" | "long" => unquoted.parse::<i64>().is_ok(),
                "float" | "double" => unquoted.parse::<f64>().is_ok_and(f64::is_finite),
                "boolean" => matches!(unquoted.as_str(), "true" | "false"),
                "null" => v == "null",
                _ => true,
            };
            if ok {
                Ok(())
            } else {
                Err(match name {
                    "int" | "long" => "a whole number such as 42".into(),
                    "float" | "double" => "a number such as 2.5".into(),
                    "boolean" => "true or false".into(),
                    _ => format!("a value of type {name}"),
                })
            }
        }
        J::Array(members) => {
            let mut wanted = Vec::new();
            for m in members {
                match check_typed(m, v) {
                    Ok(()) => return Ok(()),
                    Err(w) => wanted.push(w),
                }
            }
            Err(wanted.join(" or "))
        }
        J::Object(o) => match o.get("type").and_then(J::as_str) {
            Some("enum") => {
                let symbols: Vec<String> = o
                    .get("symbols")
                    .and_then(J::as_array)
                    .map(|l| {
                        l.iter()
                            .filter_map(J::as_str)
                            .map(|s| s.rsplit(['#', '/']).next().unwrap_or(s).to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let unquoted = serde_json::from_str::<String>(v).unwrap_or_else(|_| v.to_string());
                if symbols.is_empty() || symbols.contains(&unquoted) {
                    Ok(())
                } else {
                    Err(format!("one of {}", symbols.join(", ")))
                }
            }
            Some("array") => match o.get("items") {
                Some(items) => check_list(items, v),
                None => Ok(()),
            },
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn check_list(item: &serde_json::Value, v: &str) -> Result<(), String> {
    let what = || {
        let inner = check_typed(item, "\u{0}")
            .err()
            .unwrap_or_else(|| "values".into());
        format!("a JSON list of {inner}, such as [1, 2]")
    };
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(v) else {
        return Err(what());
    };
    for (n, i) in items.iter().enumerate() {
        let text = match i {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        check_typed(item, &text)
            .map_err(|w| format!("a list whose items are {w} (item {n} is `{text}`)"))?;
    }
    Ok(())
}

/// One workflow output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowOutput {
    /// Its id.
    pub id: String,
    /// Where its value comes from.
    pub source: Source,
    /// What it carries.
    pub kind: Kind,
    /// Every source when there are several (`source` is the first).
    #[serde(default)]
    pub sources: Vec<Source>,
    /// How several sources combine.
    #[serde(default)]
    pub link_merge: Option<LinkMerge>,
    /// Which value of several is taken.
    #[serde(default)]
    pub pick_value: Option<PickValue>,
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Source {
    /// A workflow input.
    Input(String),
    /// An output of a step.
    StepOutput {
        /// Step id.
        step: String,
        /// Output name.
        output: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Input(i) => write!(f, "{i}"),
            Source::StepOutput { step, output } => write!(f, "{step}/{output}"),
        }
    }
}

/// One step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Step id.
    pub id: String,
    /// Job type it needs (`CaroniJobName`).
    pub job_type: String,
    /// Static parameters (`CaroniJobKVs`).
    pub job_kvs: BTreeMap<String, String>,
    /// The step's inputs: its tool's declared inputs, each bound.
    pub inputs: Vec<StepInput>,
    /// The step's outputs: its tool's declared outputs.
    pub outputs: Vec<String>,
    /// What each output carries (outputs not listed carry strings).
    pub output_kinds: BTreeMap<String, Kind>,
    /// Scatter, condition, sub-workflow or computed inputs; `None` for a
    /// step that is one job fed as its sources deliver.
    #[serde(default)]
    pub dynamic: Option<Dynamic>,
    /// The CWL type of each output its process declares (of one element),
    /// as JSON: values are read by it where the manager combines them.
    #[serde(default)]
    pub output_types: BTreeMap<String, String>,
    /// How the step is retried (the workflow's policy under the step's).
    /// Not in the stored plan: a manager keeps policies in a record of
    /// their own ([`Workflow::policies`]), so that plans stored before
    /// policies existed are still read.
    #[serde(skip)]
    pub retry: Retry,
    /// What its job needs of an agent (resources and labels; docs/market.md).
    /// Not in the stored plan, like [`Step::retry`]: a manager keeps needs
    /// in a record of their own ([`Workflow::all_needs`]).
    #[serde(skip)]
    pub needs: caroni_types::market::Needs,
}

/// A bound input of a step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInput {
    /// Input name (the job's parameter key).
    pub name: String,
    /// Where the value comes from; `None` when only a default is given.
    pub source: Option<Source>,
    /// Value used when there is no source (or the source's value is absent).
    pub default: Option<String>,
    /// What it carries.
    pub kind: Kind,
    /// Every source when there are several (`source` is the first).
    #[serde(default)]
    pub sources: Vec<Source>,
    /// How several sources combine.
    #[serde(default)]
    pub link_merge: Option<LinkMerge>,
    /// Which value of several is taken.
    #[serde(default)]
    pub pick_value: Option<PickValue>,
    /// An expression that computes the value (`valueFrom`).
    #[serde(default)]
    pub value_from: Option<String>,
    /// The first 64 KiB of a File value are read into `contents`.
    #[serde(default)]
    pub load_contents: bool,
    /// True for an input the step's process does not declare: it is seen
    /// by the step's expressions and not passed on.
    #[serde(default)]
    pub hidden: bool,
}

impl StepInput {
    /// Every source, in order.
    pub fn all_sources(&self) -> Vec<&Source> {
        if self.sources.is_empty() {
            self.source.iter().collect()
        } else {
            self.sources.iter().collect()
        }
    }
}

impl WorkflowOutput {
    /// Every source, in order.
    pub fn all_sources(&self) -> Vec<&Source> {
        if self.sources.is_empty() {
            vec![&self.source]
        } else {
            self.sources.iter().collect()
        }
    }
}

/// Why a document was refused. Every variant says where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not YAML/JSON at all.
    #[error("the document is not valid YAML: {0}")]
    Syntax(String),
    /// A rule of the subset is broken.
    #[error("at {at}: {what}")]
    Invalid {
        /// Path in the document, e.g. `steps.step1.in.text`.
        at: String,
        /// What is wrong and what to do.
        what: String,
    },
    /// A CWL feature outside the subset.
    #[error("at {at}: {feature} is not supported by Caroni; {hint}")]
    Unsupported {
        /// Path in the document.
        at: String,
        /// The feature.
        feature: String,
        /// What to do instead.
        hint: String,
    },
}

pub(crate) fn invalid(at: impl Into<String>, what: impl Into<String>) -> Error {
    Error::Invalid {
        at: at.into(),
        what: what.into(),
    }
}

pub(crate) fn unsupported(
    at: impl Into<String>,
    feature: impl Into<String>,
    hint: impl Into<String>,
) -> Error {
    Error::Unsupported {
        at: at.into(),
        feature: feature.into(),
        hint: hint.into(),
    }
}

/// Largest document accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Deepest nesting of YAML collections accepted. The YAML parser's time
/// grows with the product of a document's size and its flow nesting (200 KB
/// of `[` took 44 s), so this is checked on the text before it is parsed.
pub const MAX_NESTING: usize = 32;

mod nesting;
use nesting::nesting;

/// Parses and validates a CWL document (YAML or JSON text).
pub fn parse(text: &str) -> Result<Workflow, Error> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(invalid(
            "document",
            format!(
                "the document is {} bytes long; at most {MAX_DOCUMENT_BYTES} bytes are accepted",
                text.len()
            ),
        ));
    }
    if nesting(text) > MAX_NESTING {
        return Err(invalid(
            "document",
            format!(
                "collections nest deeper than {MAX_NESTING} levels; a workflow needs far fewer"
            ),
        ));
    }
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::Syntax(e.to_string()))?;
    let Value::Mapping(map) = doc else {
        return Err(invalid(
            "document",
            "expected a mapping with `class: Workflow`",
        ));
    };
    parse::workflow(&map)
}

impl Workflow {
    /// Every step's retry policy, at any depth of dynamic bodies, keyed
    /// by its path (`step`, `step/inner`, ...).
    pub fn policies(&self) -> Vec<(String, Retry)> {
        let mut out = Vec::new();
        self.walk_policies("", &mut |path, s| out.push((path, s.retry.clone())));
        out
    }

    /// Every step's needs, by path (`step`, `step/inner`), those that say
    /// something only.
    pub fn all_needs(&self) -> Vec<(String, caroni_types::market::Needs)> {
        let mut out = Vec::new();
        self.walk_policies("", &mut |path, s| {
            if !s.needs.is_empty() {
                out.push((path, s.needs.clone()));
            }
        });
        out
    }

    /// Puts back needs read from [`Workflow::all_needs`].
    pub fn set_needs(&mut self, needs: &[(String, caroni_types::market::Needs)]) {
        let map: BTreeMap<&str, &caroni_types::market::Needs> =
            needs.iter().map(|(p, n)| (p.as_str(), n)).collect();
        self.walk_steps_mut("", &mut |path, s| {
            if let Some(n) = map.get(path) {
                s.needs = (*n).clone();
            }
        });
    }

    fn walk_steps_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Step)) {
        for s in &mut self.steps {
            let path = format!("{prefix}{}", s.id);
            f(&path, s);
            if let Some(d) = &mut s.dynamic {
                d.body.walk_steps_mut(&format!("{path}/"), f);
            }
        }
    }

    /// Puts back policies read from [`Workflow::policies`].
    pub fn set_policies(&mut self, policies: &[(String, Retry)]) {
        let map: BTreeMap<&str, &Retry> = policies.iter().map(|(p, r)| (p.as_str(), r)).collect();
        self.walk_policies_mut("", &map);
    }

    fn walk_policies(&self, prefix: &str, f: &mut dyn FnMut(String, &Step)) {
        for s in &self.steps {
            let path = format!("{prefix}{}", s.id);
            f(path.clone(), s);
            if let Some(d) = &s.dynamic {
                d.body.walk_policies(&format!("{path}/"), f);
            }
        }
    }

    fn walk_policies_mut(&mut self, prefix: &str, map: &BTreeMap<&str, &Retry>) {
        for s in &mut self.steps {
            let path = format!("{prefix}{}", s.id);
            if let Some(r) = map.get(path.as_str()) {
                s.retry = (*r).clone();
            }
            if let Some(d) = &mut s.dynamic {
                d.body.walk_policies_mut(&format!("{path}/"), map);
            }
        }
    }

    /// Every dataflow edge: (source, destination step, input name).
    pub fn step_edges(&self) -> impl Iterator<Item = (&Source, &str, &str)> {
        self.steps.iter().flat_map(|s| {
            s.inputs.iter().flat_map(move |i| {
                i.all_sources()
                    .into_iter()
                    .map(move |src| (src, s.id.as_str(), i.name.as_str()))
            })
        })
    }

    /// True when a step is dynamic or an output combines sources: the
    /// manager keeps the parsed workflow with the run.
    pub fn is_dynamic(&self) -> bool {
        self.steps.iter().any(|s| s.dynamic.is_some())
            || self
                .outputs
                .iter()
                .any(|o| !o.sources.is_empty() || o.pick_value.is_some() || o.link_merge.is_some())
    }

    /// Ids of the workflow inputs that no default covers.
    pub fn required_inputs(&self) -> BTreeSet<&str> {
        self.inputs
            .iter()
            .filter(|i| i.default.is_none())
            .map(|i| i.id.as_str())
            .collect()
    }
}

pub(crate) fn get<'a>(m: &'a Mapping, key: &str) -> Option<&'a Value> {
    m.get(Value::String(key.to_string()))
}

#[cfg(test)]
mod tests;
