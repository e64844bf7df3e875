//! `caroni`: the command-line client of a Caroni node (gRPC).
//!
//! It depends on the wire contract (`caroni-proto`), not on the engines;
//! the one exception is `caroni demo`, which embeds nodes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
mod output;
mod bench;
mod bench_files;
mod client;
mod commands;
mod complete;
mod cwl_runner;
mod cwl_values;
mod demo;
mod files;
mod jobtype_file;
mod logs;
mod trust;
mod workflow;

/// The node a command talks to unless told otherwise.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7070";

/// Caroni: broker-free, peer-to-peer workflows.
#[derive(Debug, Parser)]
#[command(
    name = "caroni",
    version,
    after_help = "Examples:\n  caroni template add test_simple examples/templates/test_simple.cwl\n  caroni jobtype add examples/jobtypes/foojob0.yaml\n  caroni --node http://127.0.0.1:7070 -o json template list"
)]
struct Cli {
    /// Client API URL of the node to talk to [default: http://127.0.0.1:7070].
    /// `caroni bench` starts its own nodes unless this is given.
    #[arg(long, global = true, env = "CARONI_NODE")]
    node: Option<String>,
    /// API token, when the node requires one.
    #[arg(long, global = true, env = "CARONI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// node URL (the node's
    /// --api-tls-cert is signed by it; `caroni tls-cert` makes both).
    #[arg(long, global = true, env = "CARONI_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = output::OutputArg::Table)]
    output: output::OutputArg,
    /// Tables without their header line (for scripts that read columns).
    #[arg(long, global = true)]
    no_headers: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Workflow templates (CWL) on a manager.
    #[command(
        subcommand,
        after_help = "Examples:\n  caroni template add test_simple examples/templates/test_simple.cwl\n  caroni template list\n  caroni template show test_simple"
    )]
    Template(commands::TemplateCmd),
    /// Job types on an agent.
    #[command(
        subcommand,
        name = "jobtype",
        after_help = "Examples:\n  caroni jobtype add examples/jobtypes/foojob0.yaml\n  caroni jobtype list\n  caroni jobtype update examples/jobtypes/foojob0.yaml"
    )]
    JobType(commands::JobTypeCmd),
    /// The node itself.
    #[command(subcommand, after_help = "Example:\n  caroni node info")]
    Node(commands::NodeCmd),
    /// Start a workflow from a template.
    #[command(
        after_help = "Examples:\n  caroni run test_simple start_message=caronirocks --wait\n  caroni run test_simple --inputs job.yml --wait"
    )]
    Run {
        /// Template name.
        #[arg(add = crate::complete::templates())]
        template: String,
        /// Workflow inputs as name=value (name=@path uploads a file).
        inputs: Vec<String>,
        /// Read inputs from a CWL job file (YAML or JSON: `name: value`;
        /// a File as `{class: File, path: p}`); name=value arguments win.
        #[arg(long = "inputs", value_name = "FILE")]
        inputs_file: Option<std::path::PathBuf>,
        /// This submission's id (default: a fresh UUID): the same id again
        /// returns the same workflow and creates nothing. Lost answers are
        /// retried with it automatically.
        #[arg(long)]
        request_id: Option<String>,
        /// Follow the workflow until it ends, then print its outputs; exit
        /// non-zero unless it completed.
        #[arg(long)]
        wait: bool,
        /// Its priority among the manager's workflows (higher first, -1000
        /// to 1000); over the template's CaroniPriority.
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        /// The most it may spend, in credits (e.g. 10 or 2.5); over the
        /// template's CaroniBudget.
        #[arg(long, value_name = "CREDITS")]
        budget: Option<String>,
        /// With --budget: fail the workflow as soon as a step cannot be
        /// placed within what is left (default: the step waits).
        #[arg(long, requires = "budget")]
        fail_when_exhausted: bool,
    },
    /// Workflows on a manager: list, show, watch, cancel, retry, rerun,
    /// delete, download.
    #[command(
        subcommand,
        after_help = "Examples:\n  caroni workflow list --state failed --since 1d\n  caroni workflow show 0190f5c2\n  caroni workflow watch --all\n  caroni workflow retry 0190f5c2 --wait"
    )]
    Workflow(workflow::WorkflowCmd),
    /// Jobs on an agent: list, show.
    #[command(
        subcommand,
        after_help = "Examples:\n  caroni job list\n  caroni job show 0190f5c2"
    )]
    Job(workflow::JobCmd),
    /// The versions of this CLI and (when it answers) of the node.
    #[command(after_help = "Example:\n  caroni version\n  caroni -o json version")]
    Version,
    /// The node at a glance: who it is, whether it serves, its peers, its
    /// workflows and jobs.
    #[command(
        after_help = "Example:\n  caroni status\n  caroni --node http://10.0.0.5:7070 -o json status"
    )]
    Status,
    /// Peers of the node: libp2p connections and outbox queues.
    #[command(
        after_help = "Examples:\n  caroni peers\n  caroni peers 12D3KooWQm7x      # one peer, by a unique prefix of its node id"
    )]
    Peers {
        /// Only the peer whose node id starts with this (a unique prefix,
        /// as tables print node ids).
        #[arg(value_name = "NODE_ID")]
        peer: Option<String>,
    },
    /// The node's ledger: balances per peer and the newest receipts and
    /// verdicts, and whether each hash chain holds.
    #[command(
        after_help = "Examples:\n  caroni ledger\n  caroni ledger --role agent --peer 12D3KooWQm7x --limit 20\n  caroni -o json ledger"
    )]
    Ledger {
        /// Only this chain: agent (receipts this node issued) or manager
        /// (receipts it received); both by default.
        #[arg(long, value_parser = ["agent", "manager"])]
        role: Option<String>,
        /// Only this peer (a unique prefix of its node id).
        #[arg(long, value_name = "NODE_ID")]
        peer: Option<String>,
        /// Most entries shown per chain, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Exit 0 when the node's gRPC health service says SERVING (for
    /// container health checks).
    #[command(after_help = "Example:\n  caroni --node http://127.0.0.1:7070 health")]
    Health,
    /// Measure a mesh: latency, throughput, messages, writes, CPU and
    /// memory per node, against the floor of the job body itself.
    #[command(
        after_help = "Examples:\n  caroni bench                                   # 1 manager + 2 agents, 100 workflows one at a time\n  caroni bench --workflows 1000 --concurrency 0  # a burst of 1,000\n  caroni bench --sleep 0.05 --agents 1 --workflows 200 --concurrency 0\n  caroni -o json bench --in-process\n  caroni --node http://10.0.0.5:7070 bench --agent-api http://10.0.0.6:7070   # running nodes"
    )]
    Bench(bench::BenchArgs),
    /// Make a certificate for a node's client API (TLS), signed by a CA
    /// made in the same directory on first use.
    #[command(
        name = "tls-cert",
        after_help = "Example:\n  caroni tls-cert --dir tls --host manager.example.org --host 10.0.0.5\n  caroni-node --api-tls-cert tls/manager.example.org.pem --api-tls-key tls/manager.example.org.key …\n  caroni --node https://manager.example.org:7070 --tls-ca tls/ca.pem workflow list"
    )]
    TlsCert(trust::TlsCertArgs),
    /// Make a pre-shared key for a private mesh (every node gets the same
    /// file with --mesh-key); printed unless a file is named.
    #[command(
        name = "mesh-key",
        after_help = "Example:\n  caroni mesh-key mesh.key\n  caroni-node --mesh-key mesh.key …"
    )]
    MeshKey {
        /// File to write (created with mode 0600, never overwritten).
        file: Option<std::path::PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell). Besides commands and flags, it completes template
    /// names, job type names, workflow ids and job ids by asking the node
    /// (CARONI_NODE, CARONI_TOKEN) at each TAB.
    #[command(
        after_help = "Examples:\n  source <(caroni completions bash)        # in ~/.bashrc\n  source <(caroni completions zsh)         # in ~/.zshrc\n  caroni completions fish | source         # in ~/.config/fish/config.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) of `caroni`, generated from these
    /// definitions; `--all DIR` writes one page per command
    /// (caroni-workflow-list.1, ...) and caroni-node.1 into DIR.
    #[command(
        after_help = "Examples:\n  caroni man > caroni.1 && man ./caroni.1\n  caroni man --all /usr/local/share/man/man1"
    )]
    Man {
        /// Write every page (caroni.1 and one per subcommand) into this
        /// directory.
        #[arg(long, value_name = "DIR")]
        all: Option<std::path::PathBuf>,
    },
    /// Run a CWL CommandLineTool with a job order (the cwl-runner
    /// interface): on --node, or on an embedded node with a local agent.
    #[command(
        name = "cwl-runner",
        after_help = "Examples:\n  caroni cwl-runner --outdir out tool.cwl job.yml\n  cwltest --test conformance_tests.yaml --tool scripts/caroni-cwl-runner"
    )]
    CwlRunner(cwl_runner::CwlRunnerArgs),
    /// Run the demonstration workflow on an embedded manager and agent.
    #[command(after_help = "Example:\n  caroni demo caronirocks\n  → prependCARONIROCKS append")]
    Demo {
        /// The start message.
        #[arg(default_value = "caronirocks")]
        text: String,
    },
}

/// Output cut short by its reader (`caroni workflow list | head`) ends the
/// program quietly, as SIGPIPE ends other Unix tools (status 141), instead
/// of a panic with a backtrace. Any other panic is reported as usual.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    // At a TAB, the shell runs `COMPLETE=<shell> caroni -- <words>`:
    // answered here, and the program ends.
    clap_complete::CompleteEnv::with_factory(|| {
        use clap::CommandFactory;
        Cli::command()
    })
    .complete();
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
            tell!("caroni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = cli.node.clone();
    let ctx = client::Context::new(
        cli.node.unwrap_or_else(|| DEFAULT_NODE.to_string()),
        cli.token,
        output::configure(cli.output, cli.no_headers),
    )
    .with_tls_ca(cli.tls_ca);
    match cli.command {
        Command::Template(c) => commands::template(&ctx, c).await,
        Command::JobType(c) => commands::job_type(&ctx, c).await,
        Command::Node(c) => commands::node(&ctx, c).await,
        Command::Run {
            template,
            inputs,
            inputs_file,
            request_id,
            wait,
            priority,
            budget,
            fail_when_exhausted,
        } => {
            let budget_milli = budget
                .map(|b| {
                    caroni_types::market::parse_credits(&b)
                        .map_err(|e| anyhow::anyhow!("--budget {b}: {e}"))
                })
                .transpose()?;
            let spend = workflow::Spend {
                priority,
                budget_milli,
                fail_when_exhausted,
            };
            workflow::run(&ctx, template, inputs, inputs_file, request_id, wait, spend).await
        }
        Command::Workflow(c) => workflow::workflow(&ctx, c).await,
        Command::Job(c) => workflow::job(&ctx, c).await,
        Command::Peers { peer } => workflow::peers(&ctx, peer).await,
        Command::Ledger { role, peer, limit } => commands::ledger(&ctx, role, peer, limit).await,
        Command::Version => commands::version(&ctx).await,
        Command::Status => commands::node_status(&ctx).await,
        Command::Health => ctx.health().await,
        Command::Completions { shell } => {
            complete::registration(&shell.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { all } => {
            use clap::CommandFactory;
            match all {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    clap_mangen::generate_to(Cli::command(), &dir)?;
                    // And the daemon's own page.
                    let mut node = Vec::new();
                    clap_mangen::Man::new(caroni_node::Config::command()).render(&mut node)?;
                    std::fs::write(dir.join("caroni-node.1"), node)?;
                    say!("man pages written to {}", dir.display());
                }
                None => {
                    let mut out = Vec::new();
                    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
                    std::io::Write::write_all(&mut std::io::stdout(), &out)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::TlsCert(args) => trust::tls_cert(args),
        Command::MeshKey { file } => trust::mesh_key(file),
        Command::Demo { text } => demo::demo(text, ctx.format).await,
        Command::CwlRunner(args) => {
            let token = ctx.token().map(str::to_string);
            cwl_runner::cwl_runner(args, target, token).await
        }
        Command::Bench(mut args) => {
            args.target = target;
            bench::bench(args, ctx.format).await
        }
    }
}
