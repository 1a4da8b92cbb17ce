//! quotad-bench: a load generator for one quotad server.
//!
//! It drives `grpc.health.v1.Health/Check` (the floor: what the gRPC stack alone costs) and
//! `QuotaGate/Consume` (the hot path) with the same parameters, and reports both side by side so
//! the ratio shows what the quota engine adds on top of the transport.
//!
//! Two ways to apply load share one measuring core ([`Recorder`], [`Window`], [`PhaseReport`]):
//! - closed loop: N workers, each with one call in flight; measures service time at saturation.
//! - fixed rate: calls are scheduled at R per second whatever the server does, and latency is
//!   taken from each call's *scheduled* send time, so a stall that delays later sends is counted
//!   against those calls (no coordinated omission).
//!
//! It only talks to `--addr`, and always stops by itself: every phase has a deadline and every
//! call a timeout.
#![deny(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures::stream::{self, StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use quotad_proto::error_chain;
use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::v1::{ConsumeRequest, CreateSchoolRequest, PoolUnits, SetAllocationRequest};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The pool every consume call charges.
const SERVICE_TYPE: &str = "claude_messages";
/// Units each bench teacher gets: far more than any run can consume, so no call is denied for
/// lack of units and the figures measure the allowed path.
const TEACHER_ALLOCATION_UNITS: u64 = 1_000_000_000_000;
/// The school's pool is at least this big (and always big enough for every teacher's slice).
const POOL_MIN_CYCLE_UNITS: u64 = 1_000_000_000_000_000;
/// Histogram range: 1 us to 60 s, 3 significant figures; slower calls are clamped to 60 s.
const HISTOGRAM_LOWEST_US: u64 = 1;
const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
const HISTOGRAM_SIGNIFICANT_FIGURES: u8 = 3;
/// How long to wait for a TCP + HTTP/2 connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How late after the window closes a fixed-rate call may still be sent. tokio's timer has 1 ms
/// resolution, so the last calls leave a little late even when the sender keeps up; beyond this
/// the sender has fallen behind, and the calls not yet sent are reported as `unsent`.
const SEND_GRACE: Duration = Duration::from_millis(100);
/// Setup calls (one per teacher) run this many at a time.
const SETUP_CONCURRENCY: usize = 16;
/// Longest school id accepted, so that `<school_id>-<call number>` stays within the
/// 128-byte event id limit of the contract.
const SCHOOL_ID_MAX_BYTES: usize = 100;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator for quotad (health check vs. consume)"
)]
struct Args {
    /// Server to load (the only address this tool talks to).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// closed: --concurrency workers, one call in flight each. fixed-rate: --rate calls/s.
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    /// Workers in closed-loop mode.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Calls per second in total, in fixed-rate mode.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Most calls in flight at once in fixed-rate mode; when reached, sending falls behind
    /// schedule and the delay is counted in the latencies.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_in_flight: u32,
    /// Measured time of each phase, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration_s: u64,
    /// Unmeasured time before each phase's measurement, in seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    warmup_s: u64,
    /// Separate HTTP/2 connections; workers (or calls, in fixed-rate mode) spread round robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    connections: u32,
    /// Distinct teachers ("t0".."t{T-1}") the consume calls spread across.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    teachers: u32,
    /// Units charged by each consume call.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    units: u64,
    /// What to load; `both` runs health then consume and prints their ratio.
    #[arg(long, value_enum, default_value_t = Target::Both)]
    target: Target,
    /// Timeout of each call, in milliseconds (counted as an error when it runs out).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    json: bool,
    /// School created for the run (default: bench-<pid>-<unix millis>, fresh each run).
    #[arg(long)]
    school_id: Option<String>,
    /// A bearer token (an admin's: the run creates its own school); `quotad token` mints one.
    #[arg(long, env = "QUOTAD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Sends the bearer token, if there is one, with every call.
#[derive(Clone)]
struct Token(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Token>;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Closed,
    FixedRate,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Consume,
    Health,
    Both,
    /// `QuotaAdmin/SetAllocation` (an admin call: p50/p99 of allocation changes).
    Allocation,
}

impl Target {
    fn runs_health(self) -> bool {
        matches!(self, Target::Health | Target::Both)
    }

    fn runs_consume(self) -> bool {
        matches!(self, Target::Consume | Target::Both)
    }

    fn needs_school(self) -> bool {
        matches!(self, Target::Consume | Target::Both | Target::Allocation)
    }
}

/// Why a run stopped before measuring anything.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("invalid --addr {addr:?}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {addr} (is quotad running?)")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("setup failed: {step}: {code:?}: {message}", code = status.code(), message = status.message())]
    Setup { step: String, status: tonic::Status },
    #[error("invalid --school-id: {0}")]
    SchoolId(String),
    #[error("a load task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the pacing thread: {0}")]
    Pacer(String),
    #[error("--token holds characters a header cannot carry")]
    Token,
}

/// The settings every phase runs with, resolved from the command line.
#[derive(Debug, Clone, Serialize)]
struct RunConfig {
    addr: String,
    mode: Mode,
    target: Target,
    concurrency: usize,
    rate_per_s: u32,
    max_in_flight: usize,
    duration_s: u64,
    warmup_s: u64,
    connections: usize,
    teachers: usize,
    units: u64,
    timeout_ms: u64,
    school_id: String,
    /// Never printed.
    #[serde(skip)]
    token: Option<String>,
}

impl RunConfig {
    fn from_args(args: &Args) -> Result<Self, BenchError> {
        let school_id = match &args.school_id {
            Some(id) => id.clone(),
            None => default_school_id(),
        };
        if school_id.is_empty() || school_id.len() > SCHOOL_ID_MAX_BYTES {
            return Err(BenchError::SchoolId(format!(
                "must be 1-{SCHOOL_ID_MAX_BYTES} bytes, got {}",
                school_id.len()
            )));
        }
        Ok(Self {
            addr: args.addr.clone(),
            mode: args.mode,
            target: args.target,
            concurrency: args.concurrency as usize,
            rate_per_s: args.rate,
            max_in_flight: args.max_in_flight as usize,
            duration_s: args.duration_s,
            warmup_s: args.warmup_s,
            connections: args.connections as usize,
            teachers: args.teachers as usize,
            units: args.units,
            timeout_ms: args.timeout_ms,
            school_id,
            token: args.token.clone(),
        })
    }
}

fn default_school_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_millis());
    format!("bench-{}-{millis}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Measuring core, shared by both modes.
// ---------------------------------------------------------------------------------------------

/// How one call ended.
#[derive(Debug)]
enum Outcome {
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
trait Workload: Send + Sync + 'static {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static;
}

/// The time span of one phase: calls that *start* before `measure_start` warm up and are not
/// recorded; no call starts after `end`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    measure_start: Instant,
    end: Instant,
}

impl Window {
    fn starting_now(config: &RunConfig) -> Self {
        let start = Instant::now();
        let measure_start = start + Duration::from_secs(config.warmup_s);
        let end = measure_start + Duration::from_secs(config.duration_s);
        Self {
            start,
            measure_start,
            end,
        }
    }

    fn is_measured(&self, started: Instant) -> bool {
        started >= self.measure_start
    }
}

/// Counts and latencies of the measured calls of one worker (or of a whole phase, once merged).
struct Recorder {
    latency_us: Histogram<u64>,
    ok: u64,
    denied: u64,
    errors_by_code: BTreeMap<String, u64>,
    /// Fixed-rate only: calls scheduled inside the window that could not be sent before it closed.
    unsent: u64,
}

impl Recorder {
    fn new() -> Self {
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
    fn record(&mut self, outcome: Outcome, latency: Duration) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .saturating_record(latency_us.max(HISTOGRAM_LOWEST_US));
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Denied => self.denied += 1,
            Outcome::Failed(code) => *self.errors_by_code.entry(code).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Recorder) {
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

/// The figures printed for one phase.
#[derive(Debug, Clone, Serialize)]
struct PhaseReport {
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
    fn new(phase: &'static str, recorder: Recorder, measured: Duration) -> Self {
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

/// One measured phase: a workload driven in the configured mode over one window.
struct Phase<W: Workload> {
    name: &'static str,
    workload: Arc<W>,
}

impl<W: Workload> Phase<W> {
    async fn run(self, config: &RunConfig) -> Result<PhaseReport, BenchError> {
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

// ---------------------------------------------------------------------------------------------
// Workloads.
// ---------------------------------------------------------------------------------------------

/// The client of `lane`'s connection: lanes spread round robin over the connections.
fn client_for_lane<C: Clone>(clients: &[C], lane: usize) -> C {
    clients[lane % clients.len()].clone()
}

fn status_label(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// `grpc.health.v1.Health/Check` of the whole server (service ""): what the gRPC stack alone
/// costs, the floor the consume figures are compared with.
struct HealthCheck {
    clients: Vec<HealthClient<Channel>>,
}

impl HealthCheck {
    fn new(channels: &[Channel]) -> Self {
        let clients = channels.iter().cloned().map(HealthClient::new).collect();
        Self { clients }
    }
}

impl Workload for HealthCheck {
    fn call(&self, _call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        async move {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            match client.check(request).await {
                Ok(response) => health_outcome(response.get_ref().status),
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

fn health_outcome(serving_status: i32) -> Outcome {
    match ServingStatus::try_from(serving_status) {
        Ok(ServingStatus::Serving) => Outcome::Ok,
        Ok(other) => Outcome::Failed(other.as_str_name().to_string()),
        Err(_) => Outcome::Failed(format!("SERVING_STATUS_{serving_status}")),
    }
}

/// `QuotaGate/Consume` of `units` for teachers "t0".."t{T-1}" in turn, each with a fresh event id.
struct ConsumeLoad {
    clients: Vec<QuotaGateClient<Authed>>,
    /// Admin clients on the same connections, for the allocation target.
    admins: Vec<QuotaAdminClient<Authed>>,
    school_id: String,
    teacher_ids: Vec<String>,
    units: u64,
}

impl Workload for ConsumeLoad {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        let teacher = usize::try_from(call % self.teacher_ids.len() as u64).unwrap_or(0);
        let request = ConsumeRequest {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_ids[teacher].clone(),
            service_type: SERVICE_TYPE.to_string(),
            units: self.units,
            // Unique per run and call, so no consume is answered from the idempotency cache.
            event_id: format!("{}-{call}", self.school_id),
            occurred_at_ms: 0,
            model: String::new(),
        };
        async move {
            match client.consume(request).await {
                Ok(response) => match response.into_inner().decision {
                    Some(decision) if decision.allowed => Outcome::Ok,
                    Some(_) => Outcome::Denied,
                    None => Outcome::Failed("MissingDecision".to_string()),
                },
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

/// `QuotaAdmin/SetAllocation` for teachers "t0".."t{T-1}" in turn, alternating each slice
/// between two sizes that both fit the pool, so every call is a real change.
struct AllocationLoad {
    clients: Vec<QuotaAdminClient<Authed>>,
    school_id: String,
    teacher_ids: Vec<String>,
}

impl Workload for AllocationLoad {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        let teachers = self.teacher_ids.len() as u64;
        let teacher = usize::try_from(call % teachers).unwrap_or(0);
        let request = SetAllocationRequest {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_ids[teacher].clone(),
            service_type: SERVICE_TYPE.to_string(),
            allocated_units: TEACHER_ALLOCATION_UNITS - (call / teachers) % 2,
            priority: String::new(),
            auto_renew: false,
            changed_by: "quotad-bench".to_string(),
            reason: "allocation latency".to_string(),
        };
        async move {
            match client.set_allocation(request).await {
                Ok(_) => Outcome::Ok,
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Setup: connections and the bench school.
// ---------------------------------------------------------------------------------------------

/// Opens every connection up front, so an unreachable server stops the run before any phase.
/// Returns at least one channel: `--connections` is at least 1.
async fn connect_all(config: &RunConfig) -> Result<Vec<Channel>, BenchError> {
    let endpoint = Endpoint::from_shared(config.addr.clone())
        .map_err(|source| BenchError::Address {
            addr: config.addr.clone(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_millis(config.timeout_ms))
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        // Each connect() opens its own HTTP/2 connection; clones of one Channel would share it.
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| BenchError::Connect {
                addr: config.addr.clone(),
                source,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Creates the bench school and gives every teacher a slice far larger than the run can use.
async fn prepare_consume(
    channels: &[Channel],
    config: &RunConfig,
) -> Result<ConsumeLoad, BenchError> {
    let token = Token(match &config.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| BenchError::Token)?,
        ),
        None => None,
    });
    let mut admin = QuotaAdminClient::with_interceptor(channels[0].clone(), token.clone());
    let teacher_count = config.teachers as u64;
    let cycle_units = teacher_count
        .saturating_mul(TEACHER_ALLOCATION_UNITS)
        .max(POOL_MIN_CYCLE_UNITS);
    let request = CreateSchoolRequest {
        school_id: config.school_id.clone(),
        name: format!("quotad-bench {}", config.school_id),
        tier: "k12".to_string(),
        billing_anchor_day: 0,
        borrowing_enabled: false,
        pools: vec![PoolUnits {
            service_type: SERVICE_TYPE.to_string(),
            cycle_units,
        }],
        changed_by: "quotad-bench".to_string(),
        self_service_requests: false,
    };
    admin
        .create_school(request)
        .await
        .map_err(|status| BenchError::Setup {
            step: format!("CreateSchool {}", config.school_id),
            status,
        })?;
    let teacher_ids: Vec<String> = (0..config.teachers).map(|i| format!("t{i}")).collect();
    stream::iter(teacher_ids.iter().cloned())
        .map(|teacher_id| allocate(admin.clone(), config.school_id.clone(), teacher_id))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(ConsumeLoad {
        clients: channels
            .iter()
            .cloned()
            .map(|c| QuotaGateClient::with_interceptor(c, token.clone()))
            .collect(),
        admins: channels
            .iter()
            .cloned()
            .map(|c| QuotaAdminClient::with_interceptor(c, token.clone()))
            .collect(),
        school_id: config.school_id.clone(),
        teacher_ids,
        units: config.units,
    })
}

async fn allocate(
    mut admin: QuotaAdminClient<Authed>,
    school_id: String,
    teacher_id: String,
) -> Result<(), BenchError> {
    let step = format!("SetAllocation {school_id}/{teacher_id}");
    let request = SetAllocationRequest {
        school_id,
        teacher_id,
        service_type: SERVICE_TYPE.to_string(),
        allocated_units: TEACHER_ALLOCATION_UNITS,
        priority: String::new(),
        auto_renew: false,
        changed_by: "quotad-bench".to_string(),
        reason: "load test".to_string(),
    };
    admin
        .set_allocation(request)
        .await
        .map_err(|status| BenchError::Setup { step, status })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Serialize)]
struct Reports {
    health: Option<PhaseReport>,
    consume: Option<PhaseReport>,
    allocation: Option<PhaseReport>,
}

/// consume / health: how much the quota engine adds to the bare gRPC round trip.
#[derive(Debug, Serialize)]
struct Ratio {
    requests_per_s: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Reports {
    fn consume_over_health(&self) -> Option<Ratio> {
        let (consume, health) = (self.consume.as_ref()?, self.health.as_ref()?);
        let divide =
            |numerator: f64, denominator: f64| (denominator > 0.0).then(|| numerator / denominator);
        Some(Ratio {
            requests_per_s: divide(consume.requests_per_s, health.requests_per_s),
            p50: divide(consume.p50_us as f64, health.p50_us as f64),
            p99: divide(consume.p99_us as f64, health.p99_us as f64),
        })
    }

    fn phases(&self) -> impl Iterator<Item = &PhaseReport> {
        self.health
            .iter()
            .chain(self.consume.iter())
            .chain(self.allocation.iter())
    }
}

fn render_json(config: &RunConfig, reports: &Reports) -> String {
    let document = serde_json::json!({
        "config": config,
        "health": reports.health,
        "consume": reports.consume,
        "set_allocation": reports.allocation,
        "consume_over_health": reports.consume_over_health(),
    });
    document.to_string()
}

fn render_table(config: &RunConfig, reports: &Reports) -> String {
    let load = match config.mode {
        Mode::Closed => format!("closed loop, concurrency {}", config.concurrency),
        Mode::FixedRate => format!(
            "fixed rate {}/s, max in flight {}",
            config.rate_per_s, config.max_in_flight
        ),
    };
    let mut out = format!(
        "quotad-bench {}: {load}, {} connection(s), {} teacher(s), {} unit(s)/consume, \
         {} s measured after {} s warm-up, school {}\n\n",
        config.addr,
        config.connections,
        config.teachers,
        config.units,
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

// ---------------------------------------------------------------------------------------------
// Entry point.
// ---------------------------------------------------------------------------------------------

async fn run(args: &Args) -> Result<String, BenchError> {
    let config = RunConfig::from_args(args)?;
    let channels = connect_all(&config).await?;
    // Set up before any phase, so a setup failure costs no measuring time.
    let consume_load = if config.target.needs_school() {
        eprintln!(
            "setting up school {} with {} teacher(s)",
            config.school_id, config.teachers
        );
        Some(prepare_consume(&channels, &config).await?)
    } else {
        None
    };
    let mut reports = Reports::default();
    if config.target.runs_health() {
        announce("health", &config);
        let workload = Arc::new(HealthCheck::new(&channels));
        reports.health = Some(
            Phase {
                name: "health",
                workload,
            }
            .run(&config)
            .await?,
        );
    }
    if let (Some(load), Target::Allocation) = (&consume_load, config.target) {
        announce("set_allocation", &config);
        let workload = Arc::new(AllocationLoad {
            clients: load.admins.clone(),
            school_id: load.school_id.clone(),
            teacher_ids: load.teacher_ids.clone(),
        });
        reports.allocation = Some(
            Phase {
                name: "set_allocation",
                workload,
            }
            .run(&config)
            .await?,
        );
    }
    if let Some(load) = consume_load.filter(|_| config.target.runs_consume()) {
        announce("consume", &config);
        let workload = Arc::new(load);
        reports.consume = Some(
            Phase {
                name: "consume",
                workload,
            }
            .run(&config)
            .await?,
        );
    }
    Ok(if args.json {
        render_json(&config, &reports)
    } else {
        render_table(&config, &reports)
    })
}

/// Progress goes to stderr so stdout holds only the results (one JSON object with --json).
fn announce(phase: &str, config: &RunConfig) {
    eprintln!(
        "running {phase}: {} s warm-up + {} s measured",
        config.warmup_s, config.duration_s
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(output) => {
            println!("{}", output.trim_end());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
