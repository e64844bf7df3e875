//! Real CWL CommandLineTools as jobs. A manager's request for the job type
//! [`CWL_TOOL_JOB_TYPE`] carries the tool as JSON in its static parameter
//! [`CWL_TOOL_KV`]; the job type it stands for is made from the tool (its
//! inputs and outputs). Running tools a manager sends is running its code,
//! so an agent does it only when its operator said so (`--cwl-tools`).

use std::collections::BTreeMap;

use caroni_types::{JobTypeDef, CWL_TOOL_JOB_TYPE, CWL_TOOL_KV};
use serde_json::Value;

/// Which CWL tools this agent runs (`--cwl-tools`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CwlTools {
    /// None: their requests are declined with the reason.
    #[default]
    Off,
    /// Every tool, on this host as the agent's user (a DockerRequirement
    /// is taken as a hint).
    Local,
    /// Only tools with a DockerRequirement, each in a container of its
    /// image (which must be on this agent's Docker host: none is pulled
    /// beyond Docker's own attempt).
    Container,
}

impl std::str::FromStr for CwlTools {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(CwlTools::Off),
            "local" => Ok(CwlTools::Local),
            "container" => Ok(CwlTools::Container),
            other => Err(format!(
                "--cwl-tools `{other}`: write off, container or local"
            )),
        }
    }
}

/// The tool a request or job carries, parsed.
pub fn tool_of(kvs: &BTreeMap<String, String>) -> Result<Value, String> {
    let text = kvs
        .get(CWL_TOOL_KV)
        .ok_or_else(|| format!("the request carries no CWL tool (`{CWL_TOOL_KV}`)"))?;
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("its CWL tool is not JSON: {e}"))?;
    if !matches!(
        v.get("class").and_then(Value::as_str),
        Some("CommandLineTool" | "ExpressionTool")
    ) {
        return Err("its CWL tool is neither a CommandLineTool nor an ExpressionTool".into());
    }
    Ok(v)
}

fn ids(tool: &Value, key: &str) -> Vec<String> {
    tool.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("id").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The job type a CWL tool stands for, and why this agent will not run it
/// (`None` when it will).
pub fn job_type(kvs: &BTreeMap<String, String>, mode: CwlTools) -> (JobTypeDef, Option<String>) {
    let mut def = JobTypeDef {
        name: CWL_TOOL_JOB_TYPE.to_string(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        body: String::new(),
        // A tool bounds itself with ToolTimeLimit; the agent's own bound
        // is the longest a job may run.
        timeout_seconds: caroni_types::MAX_TIMEOUT_SECONDS,
        max_output_bytes: caroni_types::MAX_OUTPUT_BYTES,
        updated_at_ms: 0,
    };
    let tool = match tool_of(kvs) {
        Ok(t) => t,
        Err(why) => return (def, Some(why)),
    };
    def.inputs = ids(&tool, "inputs");
    def.outputs = ids(&tool, "outputs");
    let why = match mode {
        CwlTools::Off => {
            Some("this agent does not run CWL tools (it runs with --cwl-tools off)".to_string())
        }
        CwlTools::Local => caroni_cwl_exec::run::check_requirements(&tool)
            .err()
            .map(|e| e.to_string()),
        CwlTools::Container if caroni_cwl_exec::run::docker_image(&tool).is_none() => Some(
            "this agent runs only CWL tools with a DockerRequirement (it runs with --cwl-tools container)"
                .to_string(),
        ),
        CwlTools::Container => caroni_cwl_exec::run::check_requirements(&tool)
            .err()
            .map(|e| e.to_string()),
    };
    (def, why)
}

/// The executor a CWL tool's job is answered for: Docker (so that an
/// unreachable engine is the reason to decline) in container mode.
pub fn executor(kvs: &BTreeMap<String, String>, mode: CwlTools) -> caroni_types::ExecutorSpec {
    match (
        mode,
        tool_of(kvs)
            .ok()
            .and_then(|t| caroni_cwl_exec::run::docker_image(&t)),
    ) {
        (CwlTools::Container, Some(image)) => {
            caroni_types::ExecutorSpec::Docker(caroni_types::DockerSpec {
                image,
                ..Default::default()
            })
        }
        _ => caroni_types::ExecutorSpec::Bash,
    }
}
