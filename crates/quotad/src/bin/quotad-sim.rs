//! Runs the deterministic simulator (`quotad::sim`): one seed with its
//! trace, or a range of seeds. `scripts/simulate` is the way to call it.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use quotad::sim::{run, shrink, Protocol, SimConfig};

#[derive(Parser, Debug)]
#[command(about = "Search message orders and faults for a broken invariant")]
struct Args {
    /// Replay this one seed and print its (shrunk) trace if it fails.
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run, from --first.
    #[arg(long, default_value_t = 2000)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// "current" (today's protocol) or "seed" (the first version's).
    #[arg(long, default_value = "current")]
    protocol: String,
    /// Stop after this many failing seeds.
    #[arg(long, default_value_t = 5)]
    failures_max: usize,
    /// Replays the shrinker may spend on one failure.
    #[arg(long, default_value_t = 3000)]
    shrink_replays: usize,
    /// Print every failure's whole shrunk trace.
    #[arg(long)]
    traces: bool,
    /// Do not count failures of invariants whose name starts with this
    /// (e.g. "I3" to see what else the seed protocol breaks).
    #[arg(long)]
    ignore: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(protocol) = Protocol::parse(&args.protocol) else {
        eprintln!(
            "--protocol must be current or seed, not {:?}",
            args.protocol
        );
        return ExitCode::from(2);
    };
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first..args.first + args.seeds).collect(),
    };
    let started = Instant::now();
    let (mut steps_total, mut failures) = (0usize, 0usize);
    let mut by_invariant = std::collections::BTreeMap::<&str, Vec<u64>>::new();
    for seed in &seeds {
        let outcome = run(SimConfig {
            seed: *seed,
            steps: args.steps,
            protocol,
            ignore: args.ignore.clone(),
        });
        steps_total += outcome.steps_run;
        let Some(violation) = outcome.violation else {
            continue;
        };
        failures += 1;
        by_invariant
            .entry(violation.invariant)
            .or_default()
            .push(*seed);
        let trace = shrink(
            protocol,
            &args.ignore,
            &outcome.trace,
            violation.invariant,
            args.shrink_replays,
        );
        // The shortest trace may break the invariant another way: say how.
        let shown = quotad::sim::replay(protocol, &args.ignore, &trace).unwrap_or(violation);
        println!("seed {seed}: {shown}");
        println!(
            "  shortest trace found: {} of {} steps",
            trace.len(),
            outcome.steps_run
        );
        if args.traces || args.seed.is_some() {
            for (i, action) in trace.iter().enumerate() {
                println!("  {i:>4} {action:?}");
            }
        }
        let ignored: String = args
            .ignore
            .iter()
            .map(|i| format!(" --ignore {i}"))
            .collect();
        println!(
            "  replay: scripts/simulate --protocol {} --seed {seed} --steps {}{ignored}",
            args.protocol, args.steps
        );
        if failures >= args.failures_max {
            break;
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{} protocol: {} seeds, {steps_total} steps in {:.1} s ({:.0} steps/s): {failures} failing seed(s)",
        args.protocol,
        seeds.len(),
        elapsed.as_secs_f64(),
        steps_total as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    for (invariant, seeds) in &by_invariant {
        println!("  {invariant}: seeds {seeds:?}");
    }
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
