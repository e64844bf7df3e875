//! Seeded runs of the whole protocol. `make test` runs
//! [`DEFAULT_SEEDS`] seeds (or `CARONI_SIM_SEEDS`), `make fuzz` many more;
//! `CARONI_SIM_SEED=N` replays one seed alone.

use super::*;

/// Seeds per `make test`.
const DEFAULT_SEEDS: u64 = 2000;

fn seeds() -> (u64, u64) {
    if let Some(one) = std::env::var("CARONI_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return (one, 1);
    }
    let n = std::env::var("CARONI_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    (0, n)
}

/// Every seeded run keeps every guarantee: workflows end with the right
/// outputs, each completed step has one successful job, no message is
/// applied twice, no honest peer is refused, nothing goes to the
/// stranger's address, no completed job runs again, no budget is
/// exceeded, receipts balance on both sides.
#[test]
fn the_protocol_keeps_its_guarantees_under_seeded_faults() {
    let (from, n) = seeds();
    let started = std::time::Instant::now();
    let (failures, c) = run_seeds(from, n, &Config::default());
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulated {n} seeds in {secs:.1} s ({:.0} seeds/s, {} events): {} workflows completed, {} failed ({} over budget), {} cancelled; {} crashes; {} forgeries refused; {} answers in the ack to unconfirmed peers",
        n as f64 / secs,
        c.events,
        c.completed,
        c.failed,
        c.over_budget,
        c.cancelled,
        c.crashes,
        c.forgeries_refused,
        c.answered_in_ack
    );
    if let Some(first) = failures.first() {
        panic!(
            "{} of {n} seeds broke a guarantee; the first:\n{}",
            failures.len(),
            first.violations.join("\n")
        );
    }
    assert!(c.completed > 0, "no workflow completed in {n} seeds");
}

/// Without faults, every workflow completes: the simulator itself is
/// not what makes workflows fail.
#[test]
fn without_faults_every_workflow_completes() {
    let cfg = Config {
        drop: 0.0,
        duplicate: 0.0,
        crash: 0.0,
        job_failure: 0.0,
        forgeries: 0,
        ..Config::default()
    };
    for seed in 0..50 {
        let (f, c) = Sim::new(seed, cfg.clone()).run();
        assert!(f.violations.is_empty(), "{}", f.violations.join("\n"));
        assert_eq!(
            c.completed + c.cancelled,
            cfg.workflows as u64,
            "seed {seed}"
        );
    }
}

/// A run is a function of its seed.
#[test]
fn a_seed_replays_exactly() {
    let a = Sim::new(7, Config::default()).run().1;
    let b = Sim::new(7, Config::default()).run().1;
    assert_eq!(
        (a.events, a.completed, a.crashes),
        (b.events, b.completed, b.crashes)
    );
}

/// The market at scale (docs/market.md): 10 managers and 100 agents, no
/// faults. Managers ask the agents they choose from the adverts, so the
/// direct messages per step do not grow with the mesh (with a broadcast
/// to which every agent answered, it was 2 per agent and step), and the
/// steps spread over the agents.
#[test]
fn a_mesh_of_100_agents_costs_few_messages_per_step_and_spreads_the_work() {
    let cfg = Config {
        managers: 10,
        agents: 100,
        workflows: 1000,
        drop: 0.0,
        duplicate: 0.0,
        crash: 0.0,
        job_failure: 0.0,
        forgeries: 0,
        ..Config::default()
    };
    for seed in 0..3 {
        let (f, c) = Sim::new(seed, cfg.clone()).run();
        assert!(f.violations.is_empty(), "{}", f.violations.join("\n"));
        // (A run may cancel one workflow on purpose.)
        assert_eq!(
            c.completed + c.cancelled,
            cfg.workflows as u64,
            "seed {seed}"
        );
        let m = c.direct_messages as f64 / c.runs_completed as f64;
        let runs: Vec<u64> = (0..cfg.agents)
            .map(|a| {
                c.runs_per_agent
                    .get(&format!("agent{a}"))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        let even = c.runs_completed as f64 / cfg.agents as f64;
        let (lo, hi) = (
            runs.iter().copied().min().unwrap_or(0),
            runs.iter().copied().max().unwrap_or(0),
        );
        println!(
            "seed {seed}: {} steps, {m:.2} direct messages per step, jobs per agent {lo}..{hi} (even share {even:.1})",
            c.runs_completed
        );
        assert!(m <= 10.0, "seed {seed}: {m:.2} direct messages per step");
        assert!(
            (lo as f64) >= even * 0.75 && (hi as f64) <= even * 1.25,
            "seed {seed}: jobs per agent {lo}..{hi}, even share {even:.1}"
        );
    }
}
