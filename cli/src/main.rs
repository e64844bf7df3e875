//! `caroni`: the command-line client of a Caroni node (gRPC).
//!
//! It depends on the wire contract (`caroni-proto`), not on the engines;
//! the one exception is `caroni demo`, which embeds nodes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod commands;
mod jobtype_file;
mod output;

use output::Format;

/// Caroni: broker-free, peer-to-peer workflows.
#[derive(Debug, Parser)]
#[command(
    name = "caroni",
    version,
    after_help = "Examples:\n  caroni template add test_simple examples/templates/test_simple.cwl\n  caroni jobtype add examples/jobtypes/foojob0.yaml\n  caroni --node http://127.0.0.1:7070 -o json template list"
)]
struct Cli {
    /// Client API URL of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "CARONI_NODE",
        default_value = "http://127.0.0.1:7070"
    )]
    node: String,
    /// API token, when the node requires one.
    #[arg(long, global = true, env = "CARONI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Workflow templates (CWL) on a manager.
    #[command(subcommand)]
    Template(commands::TemplateCmd),
    /// Job types on an agent.
    #[command(subcommand, name = "jobtype")]
    JobType(commands::JobTypeCmd),
    /// The node itself.
    #[command(subcommand)]
    Node(commands::NodeCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("caroni: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("caroni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = client::Context::new(cli.node, cli.token, cli.output);
    match cli.command {
        Command::Template(c) => commands::template(&ctx, c).await,
        Command::JobType(c) => commands::job_type(&ctx, c).await,
        Command::Node(c) => commands::node(&ctx, c).await,
    }
}
