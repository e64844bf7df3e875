//! Where an agent runs the jobs of a job type: `bash` on its own host (the
//! default), in a Docker container, or as a Slurm batch job. The job's
//! contract is the same for every executor: `CARONI_ENV_<input>` in, one
//! JSON object on stdout out, the job type's timeout and output limit.

use serde::{Deserialize, Serialize};

/// Default number of Slurm jobs an agent keeps submitted for one job type.
pub const DEFAULT_SLURM_IN_FLIGHT: u32 = 16;
/// Most Slurm jobs an agent keeps submitted for one job type.
pub const MAX_SLURM_IN_FLIGHT: u32 = 10_000;

/// How the jobs of a job type run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorSpec {
    /// `bash -c BODY` on the agent's host.
    #[default]
    Bash,
    /// `bash -c BODY` in a container of `image`, through the Docker Engine API.
    Docker(DockerSpec),
    /// One `sbatch` batch job per Caroni job.
    Slurm(SlurmSpec),
}

/// Settings of the Docker executor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerSpec {
    /// Image the job runs in; it must provide bash. Never pulled implicitly
    /// beyond one attempt: a missing image fails the job with its name.
    pub image: String,
    /// CPU limit in billionths of a CPU (Docker's NanoCpus); none = no limit.
    pub nano_cpus: Option<u64>,
    /// Memory limit in bytes; none = no limit.
    pub memory_bytes: Option<u64>,
    /// Docker network; `none` (the default) gives the job no network.
    pub network: String,
    /// Names of the agent's environment variables passed into the container.
    pub env: Vec<String>,
}

/// Settings of the Slurm executor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmSpec {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time`, in Slurm's format (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`…).
    pub time_limit: Option<String>,
    /// `--cpus-per-task`.
    pub cpus: Option<u32>,
    /// `--mem`, in Slurm's format (`512M`, `4G`).
    pub memory: Option<String>,
    /// Further `sbatch` arguments, one per entry.
    pub sbatch: Vec<String>,
    /// Slurm jobs of this type the agent keeps submitted at once.
    pub max_in_flight: u32,
}

impl ExecutorSpec {
    /// Its name, as job-type files and the API write it.
    pub fn name(&self) -> &'static str {
        match self {
            ExecutorSpec::Bash => "bash",
            ExecutorSpec::Docker(_) => "docker",
            ExecutorSpec::Slurm(_) => "slurm",
        }
    }

    /// Checks the settings and fills in defaults; the error says which
    /// setting is wrong and what it accepts.
    pub fn normalize(self) -> Result<Self, SettingError> {
        match self {
            ExecutorSpec::Bash => Ok(ExecutorSpec::Bash),
            ExecutorSpec::Docker(mut d) => {
                d.image = d.image.trim().to_string();
                if d.image.is_empty() {
                    return Err(SettingError("the docker executor needs `image` (an image on the agent's Docker host that provides bash)".into()));
                }
                if d.image.len() > 255 || !d.image.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(SettingError(format!(
                        "image `{}` is not an image reference (printable ASCII without spaces, at most 255 characters)",
                        d.image.escape_debug()
                    )));
                }
                if d.network.is_empty() {
                    d.network = "none".into();
                }
                if !token(&d.network, 64) {
                    return Err(SettingError(format!(
                        "network `{}` is not a Docker network name",
                        d.network.escape_debug()
                    )));
                }
                if d.nano_cpus == Some(0) {
                    return Err(SettingError("cpus must be more than 0".into()));
                }
                if d.memory_bytes.is_some_and(|m| m < 6 * 1024 * 1024) {
                    return Err(SettingError(
                        "memory must be at least 6m (Docker's minimum)".into(),
                    ));
                }
                for name in &d.env {
                    crate::validate_env_name(name).map_err(|e| {
                        SettingError(format!("env entry `{}` {e}", name.escape_debug()))
                    })?;
                }
                Ok(ExecutorSpec::Docker(d))
            }
            ExecutorSpec::Slurm(mut s) => {
                if let Some(p) = &s.partition {
                    if !token(p, 64) {
                        return Err(SettingError(format!(
                            "partition `{}` is not a Slurm partition name",
                            p.escape_debug()
                        )));
                    }
                }
                if let Some(t) = &s.time_limit {
                    let ok = !t.is_empty()
                        && t.len() <= 16
                        && t.chars()
                            .all(|c| c.is_ascii_digit() || c == ':' || c == '-');
                    if !ok {
                        return Err(SettingError(format!(
                            "time_limit `{}` is not in Slurm's format (MM, MM:SS, HH:MM:SS, D-HH:MM)",
                            t.escape_debug()
                        )));
                    }
                }
                if let Some(m) = &s.memory {
                    let digits = m.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
                    let ok = !digits.is_empty()
                        && digits.chars().all(|c| c.is_ascii_digit())
                        && m.len() - digits.len() <= 1;
                    if !ok {
                        return Err(SettingError(format!(
                            "memory `{}` is not in Slurm's format (a number with K, M, G or T)",
                            m.escape_debug()
                        )));
                    }
                }
                if s.cpus == Some(0) {
                    return Err(SettingError("cpus must be at least 1".into()));
                }
                if s.sbatch.len() > 32 {
                    return Err(SettingError("at most 32 extra sbatch arguments".into()));
                }
                for a in &s.sbatch {
                    if a.is_empty() || a.len() > 256 || a.chars().any(char::is_control) {
                        return Err(SettingError(format!(
                            "sbatch argument `{}` is empty, too long or holds control characters",
                            a.escape_debug()
                        )));
                    }
                }
                if s.max_in_flight == 0 {
                    s.max_in_flight = DEFAULT_SLURM_IN_FLIGHT;
                }
                if s.max_in_flight > MAX_SLURM_IN_FLIGHT {
                    return Err(SettingError(format!(
                        "max_in_flight is at most {MAX_SLURM_IN_FLIGHT}"
                    )));
                }
                Ok(ExecutorSpec::Slurm(s))
            }
        }
    }
}

/// Parses a memory size as Docker writes it: a number with an optional
/// `b`, `k`, `m` or `g` suffix (1024-based).
pub fn parse_memory(s: &str) -> Result<u64, SettingError> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SettingError(format!("memory `{s}` is not a size like 512m or 2g")))?;
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => {
            return Err(SettingError(format!(
                "memory `{s}` has an unknown unit; use b, k, m or g"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| SettingError(format!("memory `{s}` is too large")))
}

/// Parses a CPU count (`1.5`) into Docker's billionths of a CPU.
pub fn parse_cpus(cpus: f64) -> Result<u64, SettingError> {
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
        return Err(SettingError(format!(
            "cpus {cpus} is not a number of CPUs above 0 (at most 1024)"
        )));
    }
    Ok((cpus * 1e9).round() as u64)
}

/// Why an executor setting was refused: which setting, and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingError(pub String);

/// A short name without spaces or control characters.
fn token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_with_the_reason() {
        let e = ExecutorSpec::Docker(DockerSpec::default())
            .normalize()
            .expect_err("no image");
        assert!(e.0.contains("needs `image`"), "{e}");
        let d = ExecutorSpec::Docker(DockerSpec {
            image: "debian:bookworm-slim".into(),
            ..Default::default()
        })
        .normalize()
        .expect("ok");
        assert!(
            matches!(d, ExecutorSpec::Docker(DockerSpec { ref network, .. }) if network == "none")
        );
        let e = ExecutorSpec::Slurm(SlurmSpec {
            time_limit: Some("one hour".into()),
            ..Default::default()
        })
        .normalize()
        .expect_err("bad time");
        assert!(e.0.contains("time_limit"), "{e}");
        let s = ExecutorSpec::Slurm(SlurmSpec::default())
            .normalize()
            .expect("ok");
        assert!(matches!(
            s,
            ExecutorSpec::Slurm(SlurmSpec {
                max_in_flight: DEFAULT_SLURM_IN_FLIGHT,
                ..
            })
        ));
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert!(parse_memory("12 parsecs").is_err());
        assert_eq!(parse_cpus(1.5), Ok(1_500_000_000));
        assert!(parse_cpus(f64::NAN).is_err());
    }
}
