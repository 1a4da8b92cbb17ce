use super::*;

/// A fixed budget, as CI runs it: the protocol holds over many seeds.
#[test]
fn the_current_protocol_holds_over_a_fixed_budget_of_seeds() {
    for seed in 0..100 {
        let run = run(SimConfig {
            seed,
            steps: 300,
            protocol: Protocol::Current,
            ignore: Vec::new(),
        });
        if let Some(violation) = run.violation {
            let invariant = violation.invariant;
            let trace = shrink(Protocol::Current, &[], &run.trace, invariant, 500);
            panic!("seed {seed}: {violation}\nshortest trace:\n{trace:#?}");
        }
    }
}

/// The same seed gives the same run: a failure can be replayed.
#[test]
fn a_seed_replays_to_the_same_trace() {
    let config = SimConfig {
        seed: 7,
        steps: 200,
        protocol: Protocol::Current,
        ignore: Vec::new(),
    };
    let first = format!("{:?}", run(config.clone()).trace);
    let second = format!("{:?}", run(config).trace);
    assert_eq!(first, second);
}

/// The simulator finds what the seed's protocol got wrong.
#[test]
fn the_seed_protocol_is_caught_overspending() {
    let found = (0..300).find_map(|seed| {
        run(SimConfig {
            seed,
            steps: 500,
            protocol: Protocol::Seed,
            ignore: Vec::new(),
        })
        .violation
    });
    assert!(
        found.is_some(),
        "300 seeds of the seed protocol found nothing"
    );
}
