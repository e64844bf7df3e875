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
