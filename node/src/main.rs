//! The `caroni-node` daemon: configuration, logging, signals; the rest is in
//! the library.

use anyhow::Context;
use caroni_node::{Config, LogFormat, Node};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = match Config::load(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caroni-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Everything the node writes (RocksDB, keys, job directories) is its
    // owner's alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    init_tracing(config.log_format);
    caroni_node::raise_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("caroni-node: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "node stopped with an error");
            eprintln!("caroni-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = %config.summary(), "effective configuration");
    let mut node = Node::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received, shutting down"); None }
        _ = term.recv() => { tracing::info!("SIGTERM received, shutting down"); None }
        r = node.stopped() => r.err(),
    };
    node.shutdown();
    let rest = node.wait().await;
    if let Some(e) = failed {
        return Err(e);
    }
    rest?;
    tracing::info!("node stopped");
    Ok(())
}
