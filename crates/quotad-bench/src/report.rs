//! What a run prints: the figures of each phase, consume (or ShouldRateLimit)
//! over the health check (what the quota engine adds to the bare gRPC round
//! trip), as a table or as one JSON object.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::RunConfig;
use crate::measure::Recorder;
use crate::{Mode, Target};

/// The figures printed for one phase.
#[derive(Debug, Clone, Serialize)]
pub(super) struct PhaseReport {
    phase: &'static str,
    calls: u64,
    ok: u64,
    denied: u64,
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    unsent: u64,
    measured_s: f64,
    requests_per_s: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl PhaseReport {
    pub(super) fn new(phase: &'static str, recorder: Recorder, measured: Duration) -> Self {
        let errors: u64 = recorder.errors_by_code.values().sum();
        let calls = recorder.ok + recorder.denied + errors;
        let measured_s = measured.as_secs_f64();
        let histogram = &recorder.latency_us;
        Self {
            phase,
            calls,
            ok: recorder.ok,
            denied: recorder.denied,
            errors,
            unsent: recorder.unsent,
            measured_s,
            requests_per_s: calls as f64 / measured_s,
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
            errors_by_code: recorder.errors_by_code,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Reports {
    pub(super) health: Option<PhaseReport>,
    pub(super) consume: Option<PhaseReport>,
    pub(super) allocation: Option<PhaseReport>,
    pub(super) rls: Option<PhaseReport>,
}

/// consume (or rls) / health: how much the quota engine adds to the bare gRPC round trip.
#[derive(Debug, Serialize)]
struct Ratio {
    requests_per_s: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Reports {
    fn consume_over_health(&self) -> Option<Ratio> {
        over_health(self.consume.as_ref()?, self.health.as_ref()?)
    }

    fn rls_over_health(&self) -> Option<Ratio> {
        over_health(self.rls.as_ref()?, self.health.as_ref()?)
    }

    fn phases(&self) -> impl Iterator<Item = &PhaseReport> {
        self.health
            .iter()
            .chain(self.consume.iter())
            .chain(self.allocation.iter())
            .chain(self.rls.iter())
    }
}

fn over_health(phase: &PhaseReport, health: &PhaseReport) -> Option<Ratio> {
    let divide =
        |numerator: f64, denominator: f64| (denominator > 0.0).then(|| numerator / denominator);
    Some(Ratio {
        requests_per_s: divide(phase.requests_per_s, health.requests_per_s),
        p50: divide(phase.p50_us as f64, health.p50_us as f64),
        p99: divide(phase.p99_us as f64, health.p99_us as f64),
    })
}

pub(super) fn render_json(config: &RunConfig, reports: &Reports) -> String {
    let document = serde_json::json!({
        "config": config,
        "health": reports.health,
        "consume": reports.consume,
        "set_allocation": reports.allocation,
        "consume_over_health": reports.consume_over_health(),
        "rls": reports.rls,
        "rls_over_health": reports.rls_over_health(),
    });
    document.to_string()
}

pub(super) fn render_table(config: &RunConfig, reports: &Reports) -> String {
    let load = match config.mode {
        Mode::Closed => format!("closed loop, concurrency {}", config.concurrency),
        Mode::FixedRate => format!(
            "fixed rate {}/s, max in flight {}",
            config.rate_per_s, config.max_in_flight
        ),
    };
    let calls = match config.target {
        Target::Rls => format!(
            "ShouldRateLimit on {} (health check there too), domain {}, {} descriptor(s) \
             of {} unit(s)/call",
            config.rls_addr, config.domain, config.descriptors, config.units
        ),
        _ => format!("{} unit(s)/consume", config.units),
    };
    let mut out = format!(
        "quotad-bench {}: {load}, {} connection(s), {} teacher(s), {calls}, \
         {} s measured after {} s warm-up, school {}\n\n",
        config.addr,
        config.connections,
        config.teachers,
        config.duration_s,
        config.warmup_s,
        config.school_id,
    );
    out += &format!(
        "{:<8} {:>10} {:>8} {:>8} {:>8} {:>11} {:>9} {:>9} {:>9} {:>9}\n",
        "phase",
        "calls",
        "errors",
        "denied",
        "unsent",
        "req/s",
        "p50_us",
        "p90_us",
        "p99_us",
        "max_us"
    );
    for phase in reports.phases() {
        out += &format!(
            "{:<8} {:>10} {:>8} {:>8} {:>8} {:>11.1} {:>9} {:>9} {:>9} {:>9}\n",
            phase.phase,
            phase.calls,
            phase.errors,
            phase.denied,
            phase.unsent,
            phase.requests_per_s,
            phase.p50_us,
            phase.p90_us,
            phase.p99_us,
            phase.max_us
        );
    }
    out += &render_table_notes(reports);
    out
}

fn render_table_notes(reports: &Reports) -> String {
    let mut out = String::new();
    if let Some(ratio) = reports.consume_over_health() {
        let show = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}"));
        out += &format!(
            "\nconsume/health: req/s {}  p50 {}  p99 {}\n",
            show(ratio.requests_per_s),
            show(ratio.p50),
            show(ratio.p99)
        );
    }
    if let Some(ratio) = reports.rls_over_health() {
        let show = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}"));
        out += &format!(
            "\nrls/health: req/s {}  p50 {}  p99 {}\n\
             rls denied = OVER_LIMIT answers (an answer, not an error)\n",
            show(ratio.requests_per_s),
            show(ratio.p50),
            show(ratio.p99)
        );
    }
    for phase in reports.phases() {
        if !phase.errors_by_code.is_empty() {
            let codes: Vec<String> = phase
                .errors_by_code
                .iter()
                .map(|(code, count)| format!("{code}={count}"))
                .collect();
            out += &format!("{} errors by code: {}\n", phase.phase, codes.join(" "));
        }
    }
    out
}
