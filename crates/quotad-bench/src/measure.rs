//! The measuring core shared by both ways of applying load: how one call
//! ended, the kind of call a phase drives, the phase's time window, and the
//! latency histogram and counts of the calls measured in it.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::config::RunConfig;

/// Histogram range: 1 us to 60 s, 3 significant figures; slower calls are clamped to 60 s.
const HISTOGRAM_LOWEST_US: u64 = 1;
const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
const HISTOGRAM_SIGNIFICANT_FIGURES: u8 = 3;

/// How one call ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// An OK status (and, for health, SERVING).
    Ok,
    /// An OK status whose decision was a denial: a valid answer, but not the path we mean to
    /// measure, so it is counted apart.
    Denied,
    /// A non-OK status (named by its code), or a health answer other than SERVING.
    Failed(String),
}

/// One kind of call the benchmark drives.
///
/// `call` numbers every call of a phase uniquely (it makes idempotency keys unique and spreads
/// teachers); `lane` picks the connection. The future is `'static` so fixed-rate mode can spawn it.
pub(super) trait Workload: Send + Sync + 'static {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static;
}

/// The time span of one phase: calls that *start* before `measure_start` warm up and are not
/// recorded; no call starts after `end`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub(super) start: Instant,
    pub(super) measure_start: Instant,
    pub(super) end: Instant,
}

impl Window {
    pub(super) fn starting_now(config: &RunConfig) -> Self {
        let start = Instant::now();
        let measure_start = start + Duration::from_secs(config.warmup_s);
        let end = measure_start + Duration::from_secs(config.duration_s);
        Self {
            start,
            measure_start,
            end,
        }
    }

    pub(super) fn is_measured(&self, started: Instant) -> bool {
        started >= self.measure_start
    }
}

/// Counts and latencies of the measured calls of one worker (or of a whole phase, once merged).
pub(super) struct Recorder {
    pub(super) latency_us: Histogram<u64>,
    pub(super) ok: u64,
    pub(super) denied: u64,
    pub(super) errors_by_code: BTreeMap<String, u64>,
    /// Fixed-rate only: calls scheduled inside the window that could not be sent before it closed.
    pub(super) unsent: u64,
}

impl Recorder {
    pub(super) fn new() -> Self {
        let latency_us = Histogram::new_with_bounds(
            HISTOGRAM_LOWEST_US,
            HISTOGRAM_HIGHEST_US,
            HISTOGRAM_SIGNIFICANT_FIGURES,
        )
        .expect("constant histogram bounds are valid");
        Self {
            latency_us,
            ok: 0,
            denied: 0,
            errors_by_code: BTreeMap::new(),
            unsent: 0,
        }
    }

    /// Every call's latency is recorded, failed ones too: the caller waited that long all the
    /// same, and the error count printed next to the percentiles says how many there were.
    pub(super) fn record(&mut self, outcome: Outcome, latency: Duration) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .saturating_record(latency_us.max(HISTOGRAM_LOWEST_US));
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Denied => self.denied += 1,
            Outcome::Failed(code) => *self.errors_by_code.entry(code).or_default() += 1,
        }
    }

    pub(super) fn merge(&mut self, other: Recorder) {
        self.latency_us
            .add(&other.latency_us)
            .expect("every recorder has the same histogram bounds");
        self.ok += other.ok;
        self.denied += other.denied;
        self.unsent += other.unsent;
        for (code, count) in other.errors_by_code {
            *self.errors_by_code.entry(code).or_default() += count;
        }
    }
}
