//! A developer's measure of the execution layer alone: the cwl-runner
//! interface (`--outdir DIR --quiet PROCESS.cwl [JOB]`) over
//! `caroni_cwl_exec::run` on this host, with no node and no mesh. Used to
//! run the conformance suite's tool tests against this crate while the
//! mesh path (`caroni cwl-runner`) is built; it is not that command.
//! Workflows are reported unsupported (exit 33).

use std::path::PathBuf;

use caroni_cwl_exec::{expr::Limits, load, load::load_job, run, Job, Options, ToolError};

fn main() {
    let mut outdir = std::env::current_dir().unwrap_or_default();
    let mut rest = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(v) = a.strip_prefix("--outdir=") {
            outdir = PathBuf::from(v);
        } else if a == "--outdir" {
            outdir = PathBuf::from(args.next().unwrap_or_default());
        } else if a.starts_with("--") {
            continue;
        } else {
            rest.push(a);
        }
    }
    let Some(doc) = rest.first() else {
        eprintln!("usage: local_runner [--outdir DIR] PROCESS.cwl [JOB]");
        std::process::exit(2);
    };
    let loaded = match load(doc) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let (inputs, inputs_dir) = match load_job(rest.get(1).map(std::path::Path::new)) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if loaded.process.get("class").and_then(|c| c.as_str()) == Some("Workflow") {
        eprintln!("unsupported: workflows are not run by the execution layer alone");
        std::process::exit(33);
    }
    let tmp = std::env::temp_dir().join(format!("cwl-local-{}", std::process::id()));
    let opts = Options {
        outdir: outdir.clone(),
        tmpdir: tmp.clone(),
        limits: Limits::default(),
        path_env: std::env::var("PATH").unwrap_or_default(),
        checksums: true,
        cancel: None,
        stderr_to: None,
        container: None,
    };
    let r = run(
        &Job {
            process: &loaded.process,
            process_dir: &loaded.dir,
            inputs: &inputs,
            inputs_dir: &inputs_dir,
        },
        &opts,
    );
    let _ = std::fs::remove_dir_all(&tmp);
    match r {
        Ok(v) => println!("{}", caroni_cwl_exec::expr::output_json(&v)),
        Err(ToolError::Unsupported(e)) => {
            eprintln!("unsupported: {e}");
            std::process::exit(33);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
