//! CWL expressions: parameter references (`$(inputs.x.basename)`) always,
//! JavaScript (`$(…)` expressions and `${…}` function bodies) when the
//! process has `InlineJavascriptRequirement`.
//!
//! JavaScript runs in QuickJS (through `rquickjs`), embedded: no Node.js at
//! run time. Every evaluation has a deadline and the runtime a memory
//! limit, so an expression can neither hang nor exhaust the node; either
//! ends the evaluation with an error that says which limit was hit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// Bounds of one evaluator.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest one evaluation may run.
    pub time: Duration,
    /// Most memory the JavaScript heap may take.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(10),
            memory_bytes: 256 << 20,
        }
    }
}

/// Why an expression gave no value.
#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    /// JavaScript where the process does not ask for it.
    #[error(
        "`{0}` is a JavaScript expression; the process needs InlineJavascriptRequirement for it"
    )]
    NeedsJavascript(String),
    /// An expression that is not closed.
    #[error("unterminated expression in `{0}`")]
    Unterminated(String),
    /// A parameter reference to something absent.
    #[error("`{expr}`: {why}")]
    Reference {
        /// The reference.
        expr: String,
        /// What was wrong.
        why: String,
    },
    /// The script threw.
    #[error("expression `{expr}` failed: {why}")]
    Script {
        /// The expression (shortened).
        expr: String,
        /// The exception.
        why: String,
    },
    /// The deadline passed.
    #[error("expression `{expr}` ran longer than its limit of {limit:?} and was stopped")]
    Timeout {
        /// The expression (shortened).
        expr: String,
        /// The limit.
        limit: Duration,
    },
    /// The memory limit was hit.
    #[error(
        "expression `{expr}` used more than its limit of {limit} MiB of memory and was stopped"
    )]
    Memory {
        /// The expression (shortened).
        expr: String,
        /// The limit in MiB.
        limit: usize,
    },
    /// The engine could not start.
    #[error("cannot start the JavaScript engine: {0}")]
    Engine(String),
}

/// One piece of an interpolated string.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(std::borrow::Cow<'a, str>),
    /// `$( … )`: the text between the parentheses.
    Paren(&'a str),
    /// `${ … }`: the function body.
    Brace(&'a str),
}

/// Where the expression starting at `open` (the index of `(` or `{`)
/// ends: the index of its closing bracket. Quotes are skipped.
fn closing(s: &str, open: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut i = open;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
        } else {
            match c {
                b'\'' | b'"' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Splits `s` into text and expressions. `${` is an expression only with
/// JavaScript. A backslash before `$(` (or `${`) makes it text; two
/// backslashes are one backslash followed by an expression.
fn scan(s: &str, js: bool) -> Result<Vec<Piece<'_>>, ExprError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let mut plain_from = 0;
    while i < b.len() {
        // Backslashes as the reference runner reads them in a string that
        // holds an expression: `\$(` and `\${` are that text, `\\` is one
        // backslash, any other `\` stays.
        if b[i] == b'\\' && i + 1 < b.len() {
            if b[i + 1] == b'$' && i + 2 < b.len() && (b[i + 2] == b'(' || b[i + 2] == b'{') {
                text.push_str(&s[plain_from..i]);
                text.push('$');
                i += 2;
                plain_from = i;
                // The `(` is text: step past it so it starts nothing.
                continue;
            }
            if b[i + 1] == b'\\' {
                text.push_str(&s[plain_from..i]);
                text.push('\\');
                i += 2;
                plain_from = i;
                continue;
            }
            i += 1;
            continue;
        }
        if b[i] == b'$' && i + 1 < b.len() && (b[i + 1] == b'(' || (js && b[i + 1] == b'{')) {
            let end = closing(s, i + 1).ok_or_else(|| ExprError::Unterminated(s.to_string()))?;
            text.push_str(&s[plain_from..i]);
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text).into()));
            }
            let inner = &s[i + 2..end];
            out.push(if b[i + 1] == b'(' {
                Piece::Paren(inner)
            } else {
                Piece::Brace(inner)
            });
            i = end + 1;
            plain_from = i;
            continue;
        }
        i += 1;
    }
    text.push_str(&s[plain_from..]);
    if !text.is_empty() {
        out.push(Piece::Text(text.into()));
    }
    Ok(out)
}

/// True when `s` holds an expression (as the specification means it).
pub fn has_expression(s: &str) -> bool {
    s.contains("$(") || s.contains("${")
}

/// A value as text inside a larger string: strings as they are, anything
/// else as JSON with sorted keys (as the reference runner writes it).
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => python_json(other),
    }
}

/// JSON as Python's `json.dumps(v, sort_keys=True)` writes it.
pub fn python_json(v: &Value) -> String {
    let mut out = String::new();
    write_python_json(v, &mut out);
    out
}

fn write_python_json(v: &Value, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Number(n) => out.push_str(&number_text(n)),
        other => out.push_str(&other.to_string()),
    }
}

/// A number as the reference runner prints it: integers plainly, floats
/// with a fractional part (`2.0`), never in exponent form.
pub fn number_text(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// Evaluates a parameter reference such as `inputs.x['y'][0].basename`.
fn reference(expr: &str, root: &Value) -> Result<Value, ExprError> {
    let bad = |why: &str| ExprError::Reference {
        expr: expr.to_string(),
        why: why.to_string(),
    };
    let s = expr.trim();
    match s {
        "null" => return Ok(Value::Null),
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let b = s.as_bytes();
    let ident = |i: usize| -> usize {
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        j
    };
    let end = ident(0);
    if end == 0 || b[0].is_ascii_digit() {
        return Err(ExprError::NeedsJavascript(format!("$({expr})")));
    }
    let mut cur = root.get(&s[..end]).cloned().unwrap_or(Value::Null);
    if root.get(&s[..end]).is_none() {
        return Err(bad(&format!("`{}` is not defined", &s[..end])));
    }
    let mut i = end;
    while i < b.len() {
        let key: Value = match b[i] {
            b'.' => {
                let e = ident(i + 1);
                if e == i + 1 {
                    return Err(ExprError::NeedsJavascript(format!("$({expr})")));
                }
                let k = &s[i + 1..e];
                i = e;
                Value::String(k.to_string())
            }
            b'[' => {
                let mut j = i + 1;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let key = if j < b.len() && (b[j] == b'\'' || b[j] == b'"') {
                    // A quoted name, with backslash escapes.
                    let q = b[j];
                    let mut name = String::new();
                    let mut k = j + 1;
                    let mut chars = s[k..].char_indices();
                    let mut closed = false;
                    while let Some((off, c)) = chars.next() {
                        if c == '\\' {
                            if let Some((_, n)) = chars.next() {
                                name.push(n);
                            }
                            continue;
                        }
                        if c as u32 == u32::from(q) {
                            k += off + 1;
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(bad("unterminated quoted name"));
                    }
                    j = k;
                    Value::String(name)
                } else {
                    let start = j;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    let n: usize = s[start..j]
                        .parse()
                        .map_err(|_| ExprError::NeedsJavascript(format!("$({expr})")))?;
                    Value::from(n)
                };
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                if j >= b.len() || b[j] != b']' {
                    return Err(ExprError::NeedsJavascript(format!("$({expr})")));
                }
                i = j + 1;
                key
            }
            _ => return Err(ExprError::NeedsJavascript(format!("$({expr})"))),
        };
        cur = match (&cur, &key) {
            (Value::Array(a), Value::Number(n)) => n
                .as_u64()
                .and_then(|n| a.get(n as usize))
                .cloned()
                .ok_or_else(|| bad(&format!("index {n} is past the end")))?,
            (Value::Array(a), Value::String(k)) if k == "length" => Value::from(a.len()),
            (Value::String(t), Value::String(k)) if k == "length" => {
                Value::from(t.encode_utf16().count())
            }
            (Value::Object(m), Value::String(k)) => m.get(k).cloned().unwrap_or(Value::Null),
            (Value::Null, _) => {
                return Err(bad(&format!("cannot read {key} of null")));
            }
            _ => Value::Null,
        };
    }
    Ok(cur)
}

/// The JavaScript engine of one evaluator.
struct Js {
    // The context holds the runtime alive; the runtime is kept to reset
    // the deadline between evaluations.
    ctx: rquickjs::Context,
    _rt: rquickjs::Runtime,
    deadline: Arc<std::sync::Mutex<Instant>>,
    interrupted: Arc<AtomicBool>,
}

/// Evaluates a process's expressions against its inputs and runtime.
pub struct Evaluator {
    js: Option<Js>,
    js_wanted: bool,
    expression_lib: Vec<String>,
    root: Map<String, Value>,
    limits: Limits,
    /// What the JavaScript globals were last set to.
    synced: Option<(Value, Value)>,
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 120 {
        let cut: String = s.chars().take(117).collect();
        format!("{cut}…")
    } else {
        s.to_string()
    }
}

impl Evaluator {
    /// An evaluator for a process with (or without) JavaScript; the
    /// engine starts when the first JavaScript expression needs it.
    pub fn new(js: bool, expression_lib: Vec<String>, limits: Limits) -> Self {
        let mut root = Map::new();
        root.insert("inputs".into(), Value::Object(Map::new()));
        root.insert("runtime".into(), Value::Object(Map::new()));
        root.insert("self".into(), Value::Null);
        Self {
            js: None,
            js_wanted: js,
            expression_lib,
            root,
            limits,
            synced: None,
        }
    }

    /// Sets `inputs`.
    pub fn set_inputs(&mut self, inputs: Value) {
        self.root.insert("inputs".into(), inputs);
    }

    /// Sets `runtime`.
    pub fn set_runtime(&mut self, runtime: Value) {
        self.root.insert("runtime".into(), runtime);
    }

    /// The current `inputs`.
    pub fn inputs(&self) -> &Value {
        &self.root["inputs"]
    }

    /// The current `runtime`.
    pub fn runtime(&self) -> &Value {
        &self.root["runtime"]
    }

    /// True when JavaScript is allowed.
    pub fn javascript(&self) -> bool {
        self.js_wanted
    }

    /// Evaluates `v` with `self` bound to `this`: a string is interpolated,
    /// anything else is returned as it is.
    pub fn eval(&mut self, v: &Value, this: &Value) -> Result<Value, ExprError> {
        match v {
            Value::String(s) => self.interpolate(s, this),
            other => Ok(other.clone()),
        }
    }

    /// Evaluates `v` as [`Evaluator::eval`] does, but blanks around a lone
    /// expression make it text (an InitialWorkDir entry keeps its
    /// trailing newline).
    pub fn eval_exact(&mut self, v: &Value, this: &Value) -> Result<Value, ExprError> {
        match v {
            Value::String(s) if s.trim() != s.as_str() && has_expression(s) => {
                let pieces = scan(s, self.js_wanted)?;
                let mut out = String::new();
                for p in &pieces {
                    match p {
                        Piece::Text(t) => out.push_str(t),
                        other => out.push_str(&to_text(&self.piece(other, this)?)),
                    }
                }
                Ok(Value::String(out))
            }
            other => self.eval(other, this),
        }
    }

    /// Interpolates `s`: one expression alone gives its value; expressions
    /// inside text are written into it.
    pub fn interpolate(&mut self, s: &str, this: &Value) -> Result<Value, ExprError> {
        if !has_expression(s) && !s.contains('\\') {
            return Ok(Value::String(s.to_string()));
        }
        // One expression alone (surrounding blanks aside) gives its value;
        // otherwise the text is kept whole, blanks and newlines included.
        let trimmed = s.trim();
        let alone = scan(trimmed, self.js_wanted)?;
        if alone.len() == 1 && !matches!(alone[0], Piece::Text(_)) {
            return self.piece(&alone[0], this);
        }
        let pieces = scan(s, self.js_wanted)?;
        if pieces.iter().all(|p| matches!(p, Piece::Text(_))) {
            // No expression: the text as written (backslashes kept unless
            // they escaped an expression).
            let mut out = String::new();
            for p in &pieces {
                if let Piece::Text(t) = p {
                    out.push_str(t);
                }
            }
            return Ok(Value::String(if has_expression(s) {
                out
            } else {
                s.to_string()
            }));
        }
        let mut out = String::new();
        for p in &pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                other => out.push_str(&to_text(&self.piece(other, this)?)),
            }
        }
        Ok(Value::String(out))
    }

    fn piece(&mut self, p: &Piece<'_>, this: &Value) -> Result<Value, ExprError> {
        match p {
            Piece::Text(t) => Ok(Value::String(t.to_string())),
            Piece::Paren(e) => {
                if !self.js_wanted {
                    self.root.insert("self".into(), this.clone());
                    let root = Value::Object(std::mem::take(&mut self.root));
                    let r = reference(e, &root);
                    if let Value::Object(m) = root {
                        self.root = m;
                    }
                    return r;
                }
                // A plain reference needs no engine.
                self.root.insert("self".into(), this.clone());
                let root = Value::Object(std::mem::take(&mut self.root));
                let r = reference(e, &root);
                if let Value::Object(m) = root {
                    self.root = m;
                }
                match r {
                    Ok(v) => Ok(v),
                    Err(_) => self.run_js(&format!("return ({e});"), e, this),
                }
            }
            Piece::Brace(body) => self.run_js(body, body, this),
        }
    }

    fn engine(&mut self) -> Result<&mut Js, ExprError> {
        if self.js.is_none() {
            let engine = |e: rquickjs::Error| ExprError::Engine(e.to_string());
            let rt = rquickjs::Runtime::new().map_err(engine)?;
            rt.set_memory_limit(self.limits.memory_bytes);
            rt.set_max_stack_size(1 << 20);
            let deadline = Arc::new(std::sync::Mutex::new(Instant::now() + self.limits.time));
            let interrupted = Arc::new(AtomicBool::new(false));
            {
                let (d, flag) = (deadline.clone(), interrupted.clone());
                rt.set_interrupt_handler(Some(Box::new(move || {
                    let late = d.lock().map(|d| Instant::now() > *d).unwrap_or(true);
                    if late {
                        flag.store(true, Ordering::Relaxed);
                    }
                    late
                })));
            }
            let ctx = rquickjs::Context::full(&rt).map_err(engine)?;
            let mut js = Js {
                ctx,
                _rt: rt,
                deadline,
                interrupted,
            };
            for lib in self.expression_lib.clone() {
                run_script(&mut js, &lib, &lib, &self.limits)?;
            }
            self.js = Some(js);
            self.synced = None;
        }
        self.js
            .as_mut()
            .ok_or_else(|| ExprError::Engine("the engine is gone".into()))
    }

    fn run_js(&mut self, body: &str, shown: &str, this: &Value) -> Result<Value, ExprError> {
        if !self.js_wanted {
            return Err(ExprError::NeedsJavascript(short(shown)));
        }
        let inputs = self.root["inputs"].clone();
        let runtime = self.root["runtime"].clone();
        let limits = self.limits;
        let stale = self
            .synced
            .as_ref()
            .is_none_or(|(i, r)| *i != inputs || *r != runtime);
        let js = self.engine()?;
        if stale {
            let set = format!(
                "var inputs = {}; var runtime = {}; undefined;",
                js_literal(&inputs),
                js_literal(&runtime)
            );
            run_script(js, &set, "inputs", &limits)?;
        }
        let src = format!(
            "(function(self) {{ var r = (function() {{ {body}\n }})(); return r === undefined ? 'null' : JSON.stringify(r); }})({})",
            js_literal(this)
        );
        let out = run_script(js, &src, shown, &limits)?;
        self.synced = Some((inputs, runtime));
        serde_json::from_str(&out).map_err(|e| ExprError::Script {
            expr: short(shown),
            why: format!("its value is not JSON: {e}"),
        })
    }
}

/// A JSON value as JavaScript source (JSON is a subset of JavaScript once
/// the two line separators are escaped).
fn js_literal(v: &Value) -> String {
    v.to_string()
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// Runs `src` in the engine within the limits; returns its string value.
fn run_script(js: &mut Js, src: &str, shown: &str, limits: &Limits) -> Result<String, ExprError> {
    if let Ok(mut d) = js.deadline.lock() {
        *d = Instant::now() + limits.time;
    }
    js.interrupted.store(false, Ordering::Relaxed);
    let interrupted = js.interrupted.clone();
    let r: Result<String, String> = js.ctx.with(|ctx| {
        match ctx.eval::<rquickjs::Value, _>(src) {
            Ok(v) => Ok(v
                .as_string()
                .and_then(|s| s.to_string().ok())
                .unwrap_or_default()),
            Err(rquickjs::Error::Exception) => {
                let e = ctx.catch();
                // QuickJS throws null when it cannot even allocate the
                // exception: the memory limit was hit.
                let text = if e.is_null() {
                    "out of memory".to_string()
                } else if let Some(ex) = e.as_exception() {
                    ex.message().unwrap_or_else(|| "exception".into())
                } else if let Some(s) = e.as_string() {
                    s.to_string().unwrap_or_default()
                } else {
                    format!("{e:?}")
                };
                Err(text)
            }
            Err(e) => Err(e.to_string()),
        }
    });
    r.map_err(|why| {
        if interrupted.load(Ordering::Relaxed) {
            ExprError::Timeout {
                expr: short(shown),
                limit: limits.time,
            }
        } else if why.contains("out of memory") || why.contains("Allocation") {
            ExprError::Memory {
                expr: short(shown),
                limit: limits.memory_bytes >> 20,
            }
        } else {
            ExprError::Script {
                expr: short(shown),
                why,
            }
        }
    })
}

/// A CWL output object as the reference runner prints it: pretty JSON in
/// which a whole number held as a float beyond 2^53 is written with all
/// its digits (`1000000000000000000000000000000000000000000`, not `1e42`),
/// as Python writes the integer its JSON reader made of those digits.
pub fn output_json(v: &Value) -> String {
    use serde::Serialize as _;
    struct Digits<'a>(serde_json::ser::PrettyFormatter<'a>);
    impl serde_json::ser::Formatter for Digits<'_> {
        fn write_f64<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            value: f64,
        ) -> std::io::Result<()> {
            if value.is_finite() && value.fract() == 0.0 && value.abs() >= 9_007_199_254_740_992.0 {
                write!(w, "{value}")
            } else {
                serde_json::ser::CompactFormatter.write_f64(w, value)
            }
        }
        fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.0.begin_array(w)
        }
        fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.0.end_array(w)
        }
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.0.begin_array_value(w, first)
        }
        fn end_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            self.0.end_array_value(w)
        }
        fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.0.begin_object(w)
        }
        fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.0.end_object(w)
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.0.begin_object_key(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            self.0.begin_object_value(w)
        }
        fn end_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            self.0.end_object_value(w)
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        Digits(serde_json::ser::PrettyFormatter::new()),
    );
    if v.serialize(&mut ser).is_err() {
        return v.to_string();
    }
    String::from_utf8(out).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn outputs_print_big_whole_floats_with_all_their_digits() {
        let v = json!({"big": 1e42, "small": 4.2, "int": 3, "neg": -1e20});
        let text = output_json(&v);
        assert!(
            text.contains("\"big\": 1000000000000000000000000000000000000000000"),
            "{text}"
        );
        assert!(text.contains("\"small\": 4.2"), "{text}");
        assert!(text.contains("\"neg\": -100000000000000000000"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(back["big"].as_f64(), Some(1e42));
    }

    use super::*;
    use serde_json::json;

    fn ev(js: bool) -> Evaluator {
        let mut e = Evaluator::new(js, Vec::new(), Limits::default());
        e.set_inputs(
            json!({"x": {"basename": "a.txt", "size": 3}, "n": 4, "l": [1, 2, 3], "s": "hi"}),
        );
        e.set_runtime(json!({"outdir": "/out", "cores": 1}));
        e
    }

    #[test]
    fn parameter_references_work_without_javascript() {
        let mut e = ev(false);
        assert_eq!(
            e.interpolate("$(inputs.x.basename)", &Value::Null)
                .expect("ok"),
            json!("a.txt")
        );
        assert_eq!(
            e.interpolate("$(inputs['x'][\"size\"])", &Value::Null)
                .expect("ok"),
            json!(3)
        );
        assert_eq!(
            e.interpolate("$(inputs.l[1])", &Value::Null).expect("ok"),
            json!(2)
        );
        assert_eq!(
            e.interpolate("$(inputs.l.length)", &Value::Null)
                .expect("ok"),
            json!(3)
        );
        assert_eq!(
            e.interpolate(
                "n=$(inputs.n) l=$(inputs.l) $(runtime.outdir)",
                &Value::Null
            )
            .expect("ok"),
            json!("n=4 l=[1, 2, 3] /out")
        );
        assert_eq!(
            e.interpolate("$(self)", &json!([1])).expect("ok"),
            json!([1])
        );
        // Escapes, and `${` is text without JavaScript.
        assert_eq!(
            e.interpolate("\\$(inputs.n)", &Value::Null).expect("ok"),
            json!("$(inputs.n)")
        );
        assert_eq!(
            e.interpolate("${ return 1; }", &Value::Null).expect("ok"),
            json!("${ return 1; }")
        );
        assert_eq!(
            e.interpolate("a\\\\$(inputs.n)", &Value::Null).expect("ok"),
            json!("a\\4"),
            "two backslashes are one, and the expression stays"
        );
        // As the reference runner reads them where a string holds an
        // expression: `\\` is one backslash everywhere, `\$(` is text,
        // a lone backslash stays; a string without one is left alone.
        assert_eq!(
            e.interpolate("'\\\\\\$(inputs.n)' '\\\\' '\\x' $(inputs.n)", &Value::Null)
                .expect("ok"),
            json!("'\\$(inputs.n)' '\\' '\\x' 4")
        );
        assert_eq!(
            e.interpolate("a\\\\b", &Value::Null).expect("ok"),
            json!("a\\\\b")
        );
        let err = e
            .interpolate("$(inputs.n + 1)", &Value::Null)
            .expect_err("fails");
        assert!(matches!(err, ExprError::NeedsJavascript(_)), "{err}");
    }

    #[test]
    fn javascript_expressions_and_function_bodies() {
        let mut e = Evaluator::new(
            true,
            vec!["function twice(x) { return 2 * x; }".into()],
            Limits::default(),
        );
        e.set_inputs(json!({"n": 4}));
        assert_eq!(
            e.interpolate("$(inputs.n + 1)", &Value::Null).expect("ok"),
            json!(5)
        );
        assert_eq!(
            e.interpolate("$(twice(inputs.n))", &Value::Null)
                .expect("ok"),
            json!(8)
        );
        assert_eq!(
            e.interpolate(
                "${ var a = []; for (var i = 0; i < inputs.n; i++) a.push(i); return a; }",
                &Value::Null
            )
            .expect("ok"),
            json!([0, 1, 2, 3])
        );
        assert_eq!(
            e.interpolate("a$(self.k)b", &json!({"k": 1.5}))
                .expect("ok"),
            json!("a1.5b")
        );
        assert_eq!(
            e.interpolate("$(undefined)", &Value::Null).expect("ok"),
            Value::Null
        );
        e.set_inputs(json!({"n": 10}));
        assert_eq!(
            e.interpolate("$(inputs.n * 2)", &Value::Null).expect("ok"),
            json!(20)
        );
        let err = e.interpolate("$(nope.x)", &Value::Null).expect_err("fails");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn an_endless_loop_or_allocation_ends_within_its_limit() {
        let limits = Limits {
            time: Duration::from_millis(300),
            memory_bytes: 32 << 20,
        };
        let mut e = Evaluator::new(true, Vec::new(), limits);
        let start = Instant::now();
        let err = e
            .interpolate("${ while (true) {} }", &Value::Null)
            .expect_err("fails");
        assert!(matches!(err, ExprError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let err = e
            .interpolate(
                "${ var a = []; while (true) a.push('xxxxxxxxxxxxxxxx' + a.length); }",
                &Value::Null,
            )
            .expect_err("fails");
        assert!(
            matches!(err, ExprError::Memory { .. } | ExprError::Timeout { .. }),
            "{err}"
        );
        // The evaluator goes on working.
        assert_eq!(
            e.interpolate("$(1 + 1)", &Value::Null).expect("ok"),
            json!(2)
        );
    }

    #[test]
    fn numbers_print_as_the_reference_runner_prints_them() {
        assert_eq!(to_text(&json!(2.0)), "2.0");
        assert_eq!(to_text(&json!(7)), "7");
        assert_eq!(
            to_text(&json!({"b": 1, "a": [true, null]})),
            "{\"a\": [true, null], \"b\": 1}"
        );
    }
}
