//! Fuzzing with proptest (cargo-fuzz needs a nightly toolchain): hostile
//! input must be answered, never crash quotad, and change nothing when it is
//! refused.
//!
//! - `rpc`: every RPC quotad serves (QuotaGate, QuotaAdmin, Envoy's and
//!   Kuadrant's rate limit services), through the generated servers, so that
//!   each body is decoded by the server's own codec (`ValidatingCodec`) and
//!   then parsed and checked by the api layer, on a real engine and WAL in
//!   memory. The bodies are arbitrary bytes, damaged encodings, and
//!   well-formed messages of the method's own type built from the descriptor
//!   set (so a new RPC or field is fuzzed without a line here).
//! - `storage`: the WAL record decoder and the snapshot decoder, on arbitrary
//!   bytes and on real records and snapshots damaged (with the checksum
//!   fixed up, too, so the postcard decoder behind it is reached), and
//!   recovery over a log or snapshot so damaged.
//!
//! The normal test run keeps each test to a few seconds. `scripts/fuzz`
//! runs them with many more cases: `PROPTEST_CASES` sets the number of cases
//! of each test, and a failure prints the shrunk input and the seed to
//! replay it (proptest's own `PROPTEST_` settings apply).

mod damage;
mod harness;
mod messages;
mod rpc;
mod storage;

/// The cases a test runs: `PROPTEST_CASES` when set (scripts/fuzz), else
/// `default`, sized so that the normal test run stays short.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}

/// A runner of `cases` cases. Failures are not written to a regressions
/// file: they print the shrunk input and the seed, which is what a fix
/// turns into a named test. The seed is `PROPTEST_RNG_SEED` when set (to
/// replay a failure), else new each run, so that every run of the suite
/// tries other inputs.
pub fn runner(cases: u32) -> Runner {
    runner_seeded(cases, seed())
}

/// `PROPTEST_RNG_SEED` when set, else one from the clock.
pub fn seed() -> u64 {
    use proptest::test_runner::{Config, RngSeed};
    match Config::default().rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64),
    }
}

/// [`runner`] with the seed given.
pub fn runner_seeded(cases: u32, seed: u64) -> Runner {
    use proptest::test_runner::{Config, RngSeed, TestRunner};
    let config = Config {
        cases,
        failure_persistence: None,
        // A case that fails is shrunk, but not for ever.
        max_shrink_iters: 2_000,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    Runner {
        runner: TestRunner::new(config),
        seed,
    }
}

pub struct Runner {
    pub runner: proptest::test_runner::TestRunner,
    pub seed: u64,
}

impl Runner {
    /// Runs the cases; a failure panics with the shrunk input and the seed.
    pub fn run<S: proptest::strategy::Strategy>(
        &mut self,
        strategy: &S,
        test: impl Fn(S::Value) -> proptest::test_runner::TestCaseResult,
    ) {
        if let Err(failure) = self.runner.run(strategy, test) {
            panic!(
                "{failure}\nreplay with PROPTEST_RNG_SEED={} PROPTEST_CASES={}",
                self.seed,
                self.runner.config().cases
            );
        }
    }
}
