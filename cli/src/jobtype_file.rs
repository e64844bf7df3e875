//! Job-type files: YAML (`.yaml`/`.yml`) or TOML (`.toml`), holding one job
//! type, or several under `job_type:` (`[[job_type]]` in TOML).

use std::path::Path;

use anyhow::{bail, Context as _};
use caroni_proto::v1 as pb;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Def {
    name: String,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    body: String,
    #[serde(default, alias = "timeout_seconds")]
    timeout: Option<u32>,
    #[serde(default)]
    max_output_bytes: Option<u64>,
    /// bash (default), docker or slurm; the keys below set it up.
    #[serde(default)]
    executor: Option<String>,
    /// docker: the image.
    #[serde(default)]
    image: Option<String>,
    /// docker: CPUs (1.5); slurm: --cpus-per-task.
    #[serde(default)]
    cpus: Option<f64>,
    /// docker: `512m`; slurm: --mem (`512M`).
    #[serde(default)]
    memory: Option<String>,
    /// docker: the network (default none).
    #[serde(default)]
    network: Option<String>,
    /// docker: names of the agent's environment variables passed in.
    #[serde(default)]
    env: Vec<String>,
    /// slurm: --partition.
    #[serde(default)]
    partition: Option<String>,
    /// slurm: --time.
    #[serde(default)]
    time_limit: Option<String>,
    /// slurm: further sbatch arguments.
    #[serde(default)]
    sbatch: Vec<String>,
    /// slurm: Slurm jobs kept submitted at once.
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// What a job costs, in credits: `{fixed: 0.5, per_second: 0.01}`.
    #[serde(default)]
    price: Option<PriceDef>,
}

/// A price in a job-type file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceDef {
    #[serde(default)]
    fixed: Option<Amount>,
    #[serde(default)]
    per_second: Option<Amount>,
}

/// Credits as a number or as text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Amount {
    Number(f64),
    Text(String),
}

impl Amount {
    fn milli(&self) -> Result<u64, String> {
        match self {
            Amount::Number(n) => caroni_types::market::parse_credits(&n.to_string()),
            Amount::Text(t) => caroni_types::market::parse_credits(t),
        }
    }
}

const KEYS: &str = "name, inputs, outputs, body, timeout, max_output_bytes, price (fixed, per_second), executor (bash, docker, slurm), image, cpus, memory, network, env (docker), partition, time_limit, cpus, memory, sbatch, max_in_flight (slurm)";

impl Def {
    /// The wire form; the error names a key that does not fit the executor.
    fn into_pb(self, path: &Path) -> anyhow::Result<pb::JobType> {
        let executor = self.executor.clone().unwrap_or_else(|| "bash".into());
        let name = self.name.clone();
        let misplaced = |key: &str, belongs: &str| {
            anyhow::anyhow!(
                "{}: job type {name}: `{key}` is a setting of the {belongs} executor, but the executor is {executor}; add `executor: {belongs}` or remove `{key}`",
                path.display()
            )
        };
        let docker_keys = [
            ("image", self.image.is_some()),
            ("network", self.network.is_some()),
            ("env", !self.env.is_empty()),
        ];
        let slurm_keys = [
            ("partition", self.partition.is_some()),
            ("time_limit", self.time_limit.is_some()),
            ("sbatch", !self.sbatch.is_empty()),
            ("max_in_flight", self.max_in_flight.is_some()),
        ];
        let (mut docker, mut slurm) = (None, None);
        match executor.as_str() {
            "bash" => {
                if let Some((k, _)) = docker_keys.iter().find(|(_, set)| *set) {
                    return Err(misplaced(k, "docker"));
                }
                if let Some((k, _)) = slurm_keys.iter().find(|(_, set)| *set) {
                    return Err(misplaced(k, "slurm"));
                }
                for (k, set) in [
                    ("cpus", self.cpus.is_some()),
                    ("memory", self.memory.is_some()),
                ] {
                    if set {
                        bail!(
                            "{}: job type {name}: `{k}` needs `executor: docker` or `executor: slurm`",
                            path.display()
                        );
                    }
                }
            }
            "docker" => {
                if let Some((k, _)) = slurm_keys.iter().find(|(_, set)| *set) {
                    return Err(misplaced(k, "slurm"));
                }
                docker = Some(pb::DockerExecutor {
                    image: self.image.unwrap_or_default(),
                    cpus: self.cpus.unwrap_or(0.0),
                    memory: self.memory.unwrap_or_default(),
                    network: self.network.unwrap_or_default(),
                    env: self.env,
                });
            }
            "slurm" => {
                if let Some((k, _)) = docker_keys.iter().find(|(_, set)| *set) {
                    return Err(misplaced(k, "docker"));
                }
                let cpus = match self.cpus {
                    None => 0,
                    Some(c) if c >= 1.0 && c.fract() == 0.0 && c <= f64::from(u32::MAX) => c as u32,
                    Some(c) => bail!(
                        "{}: job type {name}: cpus {c} is not a whole number of CPUs, which Slurm's --cpus-per-task needs",
                        path.display()
                    ),
                };
                slurm = Some(pb::SlurmExecutor {
                    partition: self.partition.unwrap_or_default(),
                    time_limit: self.time_limit.unwrap_or_default(),
                    cpus,
                    memory: self.memory.unwrap_or_default(),
                    sbatch: self.sbatch,
                    max_in_flight: self.max_in_flight.unwrap_or(0),
                });
            }
            other => bail!(
                "{}: job type {name}: executor `{}` is not one of bash, docker, slurm",
                path.display(),
                other.escape_debug()
            ),
        }
        let price = match &self.price {
            None => None,
            Some(p) => {
                let amount = |a: &Option<Amount>, key: &str| -> anyhow::Result<u64> {
                    match a {
                        None => Ok(0),
                        Some(a) => a.milli().map_err(|e| {
                            anyhow::anyhow!("{}: job type {name}: price.{key}: {e}", path.display())
                        }),
                    }
                };
                Some(pb::Price {
                    fixed_milli: amount(&p.fixed, "fixed")?,
                    per_second_milli: amount(&p.per_second, "per_second")?,
                })
            }
        };
        Ok(pb::JobType {
            price,
            name: self.name,
            inputs: self.inputs,
            outputs: self.outputs,
            body: self.body,
            timeout_seconds: self.timeout.unwrap_or(0),
            max_output_bytes: self.max_output_bytes.unwrap_or(0),
            updated_at: None,
            executor,
            docker,
            slurm,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum File {
    Many { job_type: Vec<Def> },
    One(Box<Def>),
}

/// Reads every job type in `path`.
pub fn read(path: &Path) -> anyhow::Result<Vec<pb::JobType>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the job-type file {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    parse(&text, is_toml, path)
}

/// Parses job-type text (TOML when `is_toml`, else YAML); `path` names it
/// in errors.
pub fn parse(text: &str, is_toml: bool, path: &Path) -> anyhow::Result<Vec<pb::JobType>> {
    let text = text.to_string();
    let file: File = if is_toml {
        // Parse once strictly for a precise message, then into the union.
        match toml::from_str::<File>(&text) {
            Ok(f) => f,
            Err(_) => {
                let e = toml::from_str::<Def>(&text)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                bail!(
                    "{} is not a valid job-type file: {e}expected keys: {KEYS}",
                    path.display()
                )
            }
        }
    } else {
        match serde_yaml_ng::from_str::<File>(&text) {
            Ok(f) => f,
            Err(_) => {
                let e = serde_yaml_ng::from_str::<Def>(&text)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                bail!(
                    "{} is not a valid job-type file: {e}; expected keys: {KEYS}",
                    path.display()
                )
            }
        }
    };
    let defs = match file {
        File::Many { job_type } => job_type,
        File::One(d) => vec![*d],
    };
    if defs.is_empty() {
        bail!("{} defines no job type", path.display());
    }
    defs.into_iter().map(|d| d.into_pb(path)).collect()
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    /// Any job-type file text, YAML or TOML, gives job types or an error,
    /// never a panic (`make fuzz` runs 100,000 cases).
    #[test]
    fn job_type_files_never_panic() {
        let cases = std::env::var("CARONI_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let start = std::time::Instant::now();
        let key = prop_oneof![
            Just("name"),
            Just("inputs"),
            Just("outputs"),
            Just("body"),
            Just("timeout"),
            Just("max_output_bytes"),
            Just("executor"),
            Just("image"),
            Just("cpus"),
            Just("memory"),
            Just("sbatch"),
            Just("job_type"),
            Just("other"),
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            ".{0,30}".prop_map(|s| format!("{s:?}")),
            Just("[a, b]".to_string()),
            Just("[\"a\", 1]".to_string()),
            Just("{ x: 1 }".to_string()),
            ".{0,20}",
        ];
        let path = std::path::Path::new("fuzz.yaml");
        proptest!(
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() },
            |(lines in proptest::collection::vec((key, value), 0..7), raw in ".{0,200}")| {
                let yaml: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
                let toml: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                let _ = super::parse(&yaml, false, path);
                let _ = super::parse(&toml, true, path);
                let _ = super::parse(&raw, false, path);
                let _ = super::parse(&raw, true, path);
            }
        );
        println!(
            "job-type files: {cases} cases in {:.1} s, no panic",
            start.elapsed().as_secs_f64()
        );
    }
}
