//! Caroni's shared vocabulary: domain states, job-type definitions and the
//! naming rules every layer agrees on.
//!
//! This crate owns plain data and pure validation. It must not depend on
//! tokio, tonic, libp2p or rocksdb.

use serde::{Deserialize, Serialize};

pub mod delivery;
mod executor;
pub mod file;
pub mod ledger;
pub mod market;
pub mod msg;
mod names;
pub use executor::{
    parse_cpus, parse_memory, DockerSpec, ExecutorSpec, SettingError, SlurmSpec,
    DEFAULT_SLURM_IN_FLIGHT,
};
pub use names::{validate_cwl_name, validate_env_name, validate_template_name, NameError};

/// Default wall-clock limit of one job run.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 300;

/// The job type of a step that runs a real CWL CommandLineTool: no agent
/// stores a job type of this name (`:` is not allowed in one); the tool
/// travels as JSON in the request's static parameter [`CWL_TOOL_KV`].
pub const CWL_TOOL_JOB_TYPE: &str = "cwl:CommandLineTool";
/// The static parameter that carries a CWL tool.
pub const CWL_TOOL_KV: &str = "cwl:tool";
/// Largest CWL tool a request carries, as compact JSON (requests travel on
/// gossip, in messages of at most 64 KiB).
pub const MAX_CWL_TOOL_BYTES: usize = 48 * 1024;
/// Largest accepted timeout.
pub const MAX_TIMEOUT_SECONDS: u32 = 86_400;
/// Default largest stdout a job may print.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Largest output limit a job type may set: a job's outputs travel in one
/// message, and messages between nodes are at most 16 MiB.
pub const MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// Largest job body: bash receives it as one argument, and Linux refuses
/// one argument over 128 KiB.
pub const MAX_BODY_BYTES: usize = 100 * 1024;

/// A job type: what an agent can run. Data, not code in the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTypeDef {
    /// Name, usable as part of an environment variable name.
    pub name: String,
    /// Declared input names; each becomes `CARONI_ENV_<name>`.
    pub inputs: Vec<String>,
    /// Declared output names: the keys stdout's JSON object must have.
    pub outputs: Vec<String>,
    /// The bash body.
    pub body: String,
    /// Wall-clock limit of one run, in seconds.
    pub timeout_seconds: u32,
    /// Largest stdout accepted, in bytes.
    pub max_output_bytes: u64,
    /// Milliseconds since the Unix epoch of the last change.
    pub updated_at_ms: u64,
}

/// Why a job type definition was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobTypeError {
    /// The name is not usable.
    #[error("job type name {0}")]
    Name(NameError),
    /// An input or output name is not usable.
    #[error("{kind} {0}", kind = .1)]
    Field(NameError, &'static str),
    /// A name is listed twice.
    #[error("{kind} `{name}` is listed twice; names must be unique")]
    Duplicate {
        /// "input" or "output".
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// The body is empty.
    #[error("body is empty; give the bash script the job runs")]
    EmptyBody,
    /// The timeout is out of range.
    #[error("timeout of {0} s is out of range; use 1 to {MAX_TIMEOUT_SECONDS} seconds (0 means the default, {DEFAULT_TIMEOUT_SECONDS})")]
    Timeout(u32),
    /// No output declared.
    #[error(
        "no outputs declared; a job must print a JSON object with at least one declared output"
    )]
    NoOutputs,
    /// The body cannot be given to bash.
    #[error("body {0}")]
    Body(String),
    /// The output limit is too large.
    #[error("output limit of {0} bytes is too large; at most {MAX_OUTPUT_BYTES} bytes (0 means the default, {DEFAULT_MAX_OUTPUT_BYTES})")]
    OutputLimit(u64),
}

impl JobTypeDef {
    /// Fills defaults (timeout, output limit) and checks every rule.
    pub fn normalize(mut self) -> Result<Self, JobTypeError> {
        validate_env_name(&self.name).map_err(JobTypeError::Name)?;
        for (kind, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            let mut seen = std::collections::BTreeSet::new();
            for n in list {
                validate_env_name(n).map_err(|e| JobTypeError::Field(e, kind))?;
                if !seen.insert(n) {
                    return Err(JobTypeError::Duplicate {
                        kind,
                        name: n.clone(),
                    });
                }
            }
        }
        if self.outputs.is_empty() {
            return Err(JobTypeError::NoOutputs);
        }
        if self.body.trim().is_empty() {
            return Err(JobTypeError::EmptyBody);
        }
        if self.body.contains('\0') {
            return Err(JobTypeError::Body(
                "contains a NUL character, which bash cannot be given".into(),
            ));
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Err(JobTypeError::Body(format!(
                "is {} bytes long; at most {MAX_BODY_BYTES} bytes (put a longer script in a file on the agent and call it)",
                self.body.len()
            )));
        }
        if self.timeout_seconds == 0 {
            self.timeout_seconds = DEFAULT_TIMEOUT_SECONDS;
        }
        if self.timeout_seconds > MAX_TIMEOUT_SECONDS {
            return Err(JobTypeError::Timeout(self.timeout_seconds));
        }
        if self.max_output_bytes == 0 {
            self.max_output_bytes = DEFAULT_MAX_OUTPUT_BYTES;
        }
        if self.max_output_bytes > MAX_OUTPUT_BYTES {
            return Err(JobTypeError::OutputLimit(self.max_output_bytes));
        }
        Ok(self)
    }
}

/// Node roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns workflows.
    Manager,
    /// Runs jobs.
    Agent,
    /// Both at once.
    #[default]
    Both,
}

impl Role {
    /// True when the node runs the manager engine.
    pub fn is_manager(self) -> bool {
        matches!(self, Role::Manager | Role::Both)
    }
    /// True when the node runs the agent engine.
    pub fn is_agent(self) -> bool {
        matches!(self, Role::Agent | Role::Both)
    }
    /// Role names, as shown to users.
    pub fn names(self) -> Vec<&'static str> {
        match self {
            Role::Manager => vec!["manager"],
            Role::Agent => vec!["agent"],
            Role::Both => vec!["manager", "agent"],
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manager" => Ok(Role::Manager),
            "agent" => Ok(Role::Agent),
            "both" => Ok(Role::Both),
            other => Err(format!(
                "unknown role `{other}`; use manager, agent or both"
            )),
        }
    }
}

/// Milliseconds since the Unix epoch, now, from a monotonic clock.
///
/// The wall clock is read once per process and every later reading adds
/// the time elapsed on [`std::time::Instant`], so leases and timers never
/// jump when the system clock is stepped (NTP, a user) while the node runs.
/// Values stay comparable with timestamps stored before a restart, which
/// re-anchors on the wall clock.
pub fn now_ms() -> u64 {
    now_ms_anchored()
}

/// Time and fresh ids, as the engines' machines take them: passed in, so
/// that a machine reads no clock and draws no randomness of its own (the
/// simulator passes a virtual clock and seeded ids).
pub struct Now<'a> {
    /// Now, ms since the epoch.
    pub ms: u64,
    /// Fresh ids.
    pub new_id: &'a mut dyn FnMut() -> uuid::Uuid,
}

impl std::fmt::Debug for Now<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Now").field("ms", &self.ms).finish()
    }
}

/// Runs `f` with this process's clock ([`now_ms`]) and ids from `new_id`.
pub fn wall_clock<R>(new_id: fn() -> uuid::Uuid, f: impl FnOnce(&mut Now<'_>) -> R) -> R {
    let mut gen = new_id;
    let mut now = Now {
        ms: now_ms(),
        new_id: &mut gen,
    };
    f(&mut now)
}

fn now_ms_anchored() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (wall, std::time::Instant::now())
    });
    wall.saturating_add(at.elapsed().as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, inputs: &[&str], outputs: &[&str]) -> JobTypeDef {
        JobTypeDef {
            name: name.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            body: "echo '{}'".into(),
            timeout_seconds: 0,
            max_output_bytes: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn defaults_are_filled() {
        let d = def("foojob0", &["message"], &["jobout"])
            .normalize()
            .expect("valid");
        assert_eq!(d.timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(d.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
    }

    #[test]
    fn bad_input_name_is_refused_with_the_rule() {
        let e = def("ok", &["my-input"], &["o"])
            .normalize()
            .expect_err("dash");
        assert!(e.to_string().contains("input `my-input`"), "{e}");
        assert!(e.to_string().contains("CARONI_ENV_"), "{e}");
    }

    #[test]
    fn duplicates_and_empty_body_are_refused() {
        let e = def("ok", &["a", "a"], &["o"]).normalize().expect_err("dup");
        assert!(e.to_string().contains("listed twice"));
        let mut d = def("ok", &[], &["o"]);
        d.body = "  ".into();
        assert_eq!(d.clone().normalize(), Err(JobTypeError::EmptyBody));
        d.body = "echo a\0b".into();
        assert!(matches!(d.clone().normalize(), Err(JobTypeError::Body(m)) if m.contains("NUL")));
        d.body = "#".repeat(MAX_BODY_BYTES + 1);
        assert!(
            matches!(d.clone().normalize(), Err(JobTypeError::Body(m)) if m.contains("at most"))
        );
        let mut d = def("ok", &[], &["o"]);
        d.timeout_seconds = 100_000;
        assert!(d
            .normalize()
            .expect_err("timeout")
            .to_string()
            .contains("out of range"));
    }
}
