//! `caroni demo [TEXT]`: an embedded node that is both manager and agent,
//! on temporary storage and loopback ports, loaded with the demonstration
//! fixtures; one run of `test_simple`; its result printed; everything
//! removed afterwards.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use caroni_node::{Config, Node};
use caroni_proto::v1 as pb;

use crate::client::{status, Context};
use crate::output::Format;

const TEMPLATE: &str = include_str!("../../examples/templates/test_simple.cwl");
const JOB_TYPES: [(&str, &str); 3] = [
    (
        "foojob0.yaml",
        include_str!("../../examples/jobtypes/foojob0.yaml"),
    ),
    (
        "foojob1.yaml",
        include_str!("../../examples/jobtypes/foojob1.yaml"),
    ),
    (
        "foojob2.yaml",
        include_str!("../../examples/jobtypes/foojob2.yaml"),
    ),
];

pub async fn demo(text: String, format: Format) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("caroni-demo-")
        .tempdir()
        .context("cannot create a temporary directory for the demo")?;
    let config = Config::embedded(dir.path().join("node"));
    let node = Node::start(config).await?;
    let ctx = Context::new(format!("http://{}", node.api_addr), None, format);
    let result = run(&ctx, text).await;
    node.shutdown();
    let _ = node.wait().await;
    drop(dir);
    result
}

async fn run(ctx: &Context, text: String) -> anyhow::Result<ExitCode> {
    let mut manager = ctx.manager().await?;
    manager
        .put_template(ctx.request(pb::PutTemplateRequest {
            name: "test_simple".into(),
            cwl: TEMPLATE.into(),
        }))
        .await
        .map_err(status)?;
    let mut agent = ctx.agent().await?;
    for (name, body) in JOB_TYPES {
        for def in crate::jobtype_file::parse(body, false, Path::new(name))? {
            agent
                .put_job_type(ctx.request(pb::PutJobTypeRequest {
                    job_type: Some(def),
                    replace: false,
                }))
                .await
                .map_err(status)?;
        }
    }
    let started = Instant::now();
    let id = manager
        .run_workflow(ctx.request(pb::RunWorkflowRequest {
            template: "test_simple".into(),
            inputs: [("start_message".to_string(), text)].into_iter().collect(),
            request_id: String::new(),
            ..Default::default()
        }))
        .await
        .map_err(status)?
        .into_inner()
        .workflow_id;
    let w = crate::workflow::follow(ctx, &id, true).await?;
    let elapsed = started.elapsed();
    if ctx.format == Format::Json {
        let mut v = crate::workflow::workflow_json(&w);
        v["elapsed_ms"] = serde_json::json!(elapsed.as_secs_f64() * 1000.0);
        crate::output::json(&v);
    } else if w.state == "completed" {
        say!("{}", w.outputs.get("result").cloned().unwrap_or_default());
        tell!(
            "(workflow {} completed in {:.1} ms)",
            w.id,
            elapsed.as_secs_f64() * 1000.0
        );
    } else {
        tell!("workflow {} {}: {}", w.id, w.state, w.message);
    }
    Ok(if w.state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
