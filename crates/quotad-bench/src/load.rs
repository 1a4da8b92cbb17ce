//! The two ways of applying load over one phase: a closed loop of workers
//! with one call in flight each, and calls paced at a fixed rate.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::RunConfig;
use crate::measure::{Outcome, Recorder, Window, Workload};
use crate::report::PhaseReport;
use crate::{BenchError, Mode};

/// How late after the window closes a fixed-rate call may still be sent. tokio's timer has 1 ms
/// resolution, so the last calls leave a little late even when the sender keeps up; beyond this
/// the sender has fallen behind, and the calls not yet sent are reported as `unsent`.
const SEND_GRACE: Duration = Duration::from_millis(100);
/// One measured phase: a workload driven in the configured mode over one window.
pub(super) struct Phase<W: Workload> {
    pub(super) name: &'static str,
    pub(super) workload: Arc<W>,
}

impl<W: Workload> Phase<W> {
    pub(super) async fn run(self, config: &RunConfig) -> Result<PhaseReport, BenchError> {
        let window = Window::starting_now(config);
        let recorder = match config.mode {
            Mode::Closed => run_closed_loop(&self.workload, config.concurrency, window).await?,
            Mode::FixedRate => run_fixed_rate(&self.workload, config, window).await?,
        };
        // Measure to the last completion, not to the deadline: calls started just before the
        // deadline are recorded, so their time belongs in the denominator too.
        let measured = Instant::now().saturating_duration_since(window.measure_start);
        Ok(PhaseReport::new(self.name, recorder, measured))
    }
}

async fn run_closed_loop<W: Workload>(
    workload: &Arc<W>,
    workers: usize,
    window: Window,
) -> Result<Recorder, BenchError> {
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        tasks.spawn(closed_loop_worker(
            workload.clone(),
            worker,
            workers,
            window,
        ));
    }
    let mut merged = Recorder::new();
    while let Some(worker_recorder) = tasks.join_next().await {
        merged.merge(worker_recorder?);
    }
    Ok(merged)
}

/// One call in flight at a time until the window closes.
async fn closed_loop_worker<W: Workload>(
    workload: Arc<W>,
    worker: usize,
    workers: usize,
    window: Window,
) -> Recorder {
    let mut recorder = Recorder::new();
    for seq in 0u64.. {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        // Interleaved numbering keeps call numbers unique across workers without sharing a counter.
        let call = seq * workers as u64 + worker as u64;
        let outcome = workload.call(call, worker).await;
        if window.is_measured(started) {
            recorder.record(outcome, started.elapsed());
        }
    }
    recorder
}

/// Sends call n at `start + n / rate`, each in its own task, at most `max_in_flight` at once.
///
/// Latency runs from the scheduled time, so when the server (or the in-flight bound) holds the
/// sender back, the calls that should have gone out meanwhile are charged the wait. The pacing
/// runs on its own OS thread with `std::thread::sleep` (tens of microseconds of overshoot):
/// tokio's timer has 1 ms resolution, which sent calls in per-millisecond bursts and charged
/// each up to ~1 ms of sender lag.
async fn run_fixed_rate<W: Workload>(
    workload: &Arc<W>,
    config: &RunConfig,
    window: Window,
) -> Result<Recorder, BenchError> {
    let runtime = tokio::runtime::Handle::current();
    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (workload, rate_per_s) = (workload.clone(), config.rate_per_s);
    let pacer = std::thread::Builder::new()
        .name("quotad-bench-pacer".into())
        .spawn(move || {
            let mut call = 0u64;
            loop {
                let scheduled = window.start + scheduled_offset(call, rate_per_s);
                if scheduled >= window.end {
                    return 0;
                }
                let now = Instant::now();
                if now >= window.end + SEND_GRACE {
                    // Far behind schedule when the window closed: the rest are reported, never sent.
                    return scheduled_call_count(window, rate_per_s).saturating_sub(call);
                }
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                let Ok(permit) = runtime.block_on(permits.clone().acquire_owned()) else {
                    return 0;
                };
                let (workload, done_tx) = (workload.clone(), done_tx.clone());
                runtime.spawn(async move {
                    let result = timed_call(workload, call, scheduled, window).await;
                    drop(permit);
                    let _ = done_tx.send(result);
                });
                call += 1;
            }
        })
        .map_err(|e| BenchError::Pacer(format!("cannot start it: {e}")))?;
    let mut recorder = Recorder::new();
    while let Some(result) = done_rx.recv().await {
        if let Some((outcome, latency)) = result {
            recorder.record(outcome, latency);
        }
    }
    recorder.unsent = pacer
        .join()
        .map_err(|_| BenchError::Pacer("it panicked".into()))?;
    Ok(recorder)
}

/// One fixed-rate call: its outcome and latency from its scheduled time, if measured.
async fn timed_call<W: Workload>(
    workload: Arc<W>,
    call: u64,
    scheduled: Instant,
    window: Window,
) -> Option<(Outcome, Duration)> {
    let lane = usize::try_from(call).unwrap_or(usize::MAX);
    let outcome = workload.call(call, lane).await;
    window
        .is_measured(scheduled)
        .then(|| (outcome, scheduled.elapsed()))
}

fn scheduled_offset(call: u64, rate_per_s: u32) -> Duration {
    // u128 keeps call * 1e9 exact for any run length.
    let offset_ns = u128::from(call) * 1_000_000_000 / u128::from(rate_per_s);
    Duration::from_nanos(u64::try_from(offset_ns).unwrap_or(u64::MAX))
}

/// How many calls fall inside the window (warm-up included): every n with n / rate < span.
fn scheduled_call_count(window: Window, rate_per_s: u32) -> u64 {
    let span_ns = (window.end - window.start).as_nanos();
    let count = (span_ns * u128::from(rate_per_s)).div_ceil(1_000_000_000);
    u64::try_from(count).unwrap_or(u64::MAX)
}
