//! What every executor shares: which inputs go in the environment and
//! which in files, the stdout check, failures with their stderr tail.

use std::collections::BTreeMap;

use crate::executor::RunSpec;
use crate::machine::{Failure, RunResult, STDERR_TAIL_BYTES};

/// Largest value of one environment string (`NAME=value`): Linux refuses
/// longer ones (`MAX_ARG_STRLEN`, 32 pages) with "Argument list too long".
const ENV_STRING_MAX: usize = 128 * 1024 - 1;
/// Largest static parameter passed in the environment.
pub const ENV_VALUE_MAX: usize = 64 * 1024;
/// What the environment and arguments of a job may take together, of the
/// kernel's `ARG_MAX`, leaving room for the variables a job always gets.
const ENV_RESERVE: usize = 64 * 1024;

/// The kernel's limit on a new program's arguments and environment.
fn arg_max() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(2 << 20)
}

/// Which inputs go in the environment as `CARONI_ENV_<input>` and which,
/// too large for it, in files named by `CARONI_FILE_<input>`: the
/// smallest first while each string and their sum fit the kernel's limits
/// (with the body, which is an argument). A body that reads
/// `$CARONI_ENV_<input>` of an input that does not fit fails here with a
/// message naming the input and its file variable: it never sees an empty
/// value.
pub(crate) fn env_plan(spec: &RunSpec) -> Result<std::collections::BTreeSet<String>, TooLarge> {
    let kvs: usize = spec
        .job_kvs
        .iter()
        .map(|(k, v)| k.len() + v.len() + 20)
        .sum();
    let mut room = arg_max()
        .saturating_sub(ENV_RESERVE + spec.body.len() + kvs)
        .min(arg_max());
    let mut by_size: Vec<(&String, &String)> = spec.inputs.iter().collect();
    by_size.sort_by_key(|(k, v)| (v.len(), *k));
    let mut files = std::collections::BTreeSet::new();
    for (k, v) in by_size {
        // "CARONI_ENV_" + name + "=" + value + NUL, and its pointer.
        let cost = 11 + k.len() + 1 + v.len() + 1 + 8;
        if cost - 8 <= ENV_STRING_MAX && cost <= room {
            room -= cost;
            continue;
        }
        if reads_env_var(&spec.body, k) {
            return Err(TooLarge {
                input: k.clone(),
                bytes: v.len(),
                per_value: ENV_STRING_MAX - 12 - k.len(),
                all: arg_max().saturating_sub(ENV_RESERVE),
            });
        }
        files.insert(k.clone());
    }
    Ok(files)
}

/// An input the body reads from the environment is too large for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input `{input}` is {bytes} bytes, more than the environment can hold (at most {per_value} bytes per value, about {all} bytes for all of a job's inputs): the body reads $CARONI_ENV_{input}; read the file named by $CARONI_FILE_{input} instead")]
pub struct TooLarge {
    /// The input.
    pub input: String,
    /// Its size.
    pub bytes: usize,
    /// The most one value may take.
    pub per_value: usize,
    /// About what all inputs may take together.
    pub all: usize,
}

/// Why a job's stdout is not a valid answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// Not JSON at all.
    #[error("stdout is not a JSON object ({reason}); it began with: {began:?}")]
    NotJson {
        /// The parser's message.
        reason: String,
        /// The first 200 characters.
        began: String,
    },
    /// JSON, but not an object.
    #[error("stdout is JSON but not an object; print {{\"output\": \"value\", …}}")]
    NotObject,
    /// A value holds NUL.
    #[error("output {0} contains a NUL character; values must be text without NUL")]
    Nul(String),
    /// A string shaped like a File reference: no string may pass for a
    /// file.
    #[error("output {0} is a string shaped like a File reference; declare a file as {{\"class\": \"File\", \"path\": \"…\"}}")]
    Forged(String),
    /// Declared outputs are missing (or null).
    #[error("stdout's JSON object lacks the declared output(s) {}", .0.join(", "))]
    Missing(Vec<String>),
}

/// True when `body` names `CARONI_ENV_<input>` (not a longer name).
fn reads_env_var(body: &str, input: &str) -> bool {
    let name = format!("CARONI_ENV_{input}");
    body.match_indices(&name).any(|(at, _)| {
        !body[at + name.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The PATH jobs run with.
pub(crate) const JOB_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub(crate) fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// A failed run whose kind follows from its exit status: a body that
/// exited 0 failed by its stdout, one that exited otherwise by its status,
/// one that did not exit for another reason (use [`failed_as`] for
/// timeouts and kills).
pub(crate) fn failed(message: String, exit_status: Option<i32>, stderr: &[u8]) -> RunResult {
    let kind = match exit_status {
        Some(0) => Failure::Output,
        Some(_) => Failure::ExitStatus,
        None => Failure::Other,
    };
    failed_as(kind, message, exit_status, stderr)
}

/// A failed run of a given kind.
pub(crate) fn failed_as(
    kind: Failure,
    message: String,
    exit_status: Option<i32>,
    stderr: &[u8],
) -> RunResult {
    RunResult::Failed {
        message,
        exit_status,
        stderr_tail: tail(stderr),
        kind,
    }
}

/// Checks stdout: one JSON object with every declared output.
pub fn parse_outputs(
    stdout: &[u8],
    outputs: &[String],
) -> Result<BTreeMap<String, String>, OutputError> {
    let text = String::from_utf8_lossy(stdout);
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| OutputError::NotJson {
            reason: e.to_string(),
            began: text.chars().take(200).collect(),
        })?;
    let serde_json::Value::Object(map) = value else {
        return Err(OutputError::NotObject);
    };
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for name in outputs {
        match map.get(name) {
            Some(serde_json::Value::String(s)) if s.contains('\0') => {
                return Err(OutputError::Nul(name.clone()));
            }
            Some(serde_json::Value::String(s))
                if caroni_types::file::files_of(s) != caroni_types::file::Files::None =>
            {
                return Err(OutputError::Forged(name.clone()));
            }
            Some(serde_json::Value::String(s)) => {
                out.insert(name.clone(), s.clone());
            }
            Some(serde_json::Value::Null) | None => missing.push(name.clone()),
            Some(other) => {
                out.insert(name.clone(), other.to_string());
            }
        }
    }
    if !missing.is_empty() {
        return Err(OutputError::Missing(missing));
    }
    Ok(out)
}
