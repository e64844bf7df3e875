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
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum File {
    Many { job_type: Vec<Def> },
    One(Def),
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
                bail!("{} is not a valid job-type file: {e}expected keys: name, inputs, outputs, body, timeout", path.display())
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
                bail!("{} is not a valid job-type file: {e}; expected keys: name, inputs, outputs, body, timeout", path.display())
            }
        }
    };
    let defs = match file {
        File::Many { job_type } => job_type,
        File::One(d) => vec![d],
    };
    if defs.is_empty() {
        bail!("{} defines no job type", path.display());
    }
    Ok(defs
        .into_iter()
        .map(|d| pb::JobType {
            name: d.name,
            inputs: d.inputs,
            outputs: d.outputs,
            body: d.body,
            timeout_seconds: d.timeout.unwrap_or(0),
            max_output_bytes: d.max_output_bytes.unwrap_or(0),
            updated_at: None,
        })
        .collect())
}
