//! quotad-bench: a load generator for one quotad server.
//!
//! It drives `grpc.health.v1.Health/Check` (the floor: what the gRPC stack alone costs) and
//! `QuotaGate/Consume` (the hot path) with the same parameters, and reports both side by side so
//! the ratio shows what the quota engine adds on top of the transport. `--target rls` does the
//! same on the RLS listener: its health check, then Envoy's
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` (what a gateway calls).
//!
//! Two ways to apply load share one measuring core ([`Recorder`](measure::Recorder),
//! [`Window`](measure::Window), [`PhaseReport`](report::PhaseReport)):
//! - closed loop: N workers, each with one call in flight; measures service time at saturation.
//! - fixed rate: calls are scheduled at R per second whatever the server does, and latency is
//!   taken from each call's *scheduled* send time, so a stall that delays later sends is counted
//!   against those calls (no coordinated omission).
//!
//! It only talks to `--addr` (and `--rls-addr` with `--target rls`), and always stops by itself: every phase has a deadline and every
//! call a timeout.
//!
//! - [`config`]: the settings of a run, resolved from the command line.
//! - [`setup`]: the connections, the bearer token and the bench school.
//! - [`workloads`]: the calls driven (health check, consume, set allocation, ShouldRateLimit).
//! - [`measure`]: how one call ended, the measuring window, latency histograms.
//! - [`load`]: closed loop and fixed rate, each over one phase.
//! - [`report`]: the figures of each phase, the ratios to the health check, the table and JSON.
#![deny(clippy::unwrap_used)]

mod config;
mod load;
mod measure;
mod report;
mod setup;
mod workloads;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use quotad_proto::error_chain;
use serde::Serialize;

use config::RunConfig;
use load::Phase;
use report::{render_json, render_table, Reports};
use setup::{connect_all, prepare_consume, prepare_rls};
use workloads::{AllocationLoad, HealthCheck};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator for quotad (health check vs. consume)"
)]
struct Args {
    /// Server to load (the only address this tool talks to).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// quotad's RLS listener (`--target rls`: its health check and ShouldRateLimit go there,
    /// without a token; the school is still set up through --addr).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    rls_addr: String,
    /// `RateLimitRequest.domain` of every ShouldRateLimit (`quotad` exists by default under
    /// `quotad serve --insecure-dev`; otherwise it must be an `[[rls_domains]]` of the server).
    #[arg(long, default_value = "quotad")]
    domain: String,
    /// Descriptors in each ShouldRateLimit: one per service type of the same teacher
    /// (claude_messages, then lesson_generation, then grading_assistance), as a gateway that
    /// meters one request against several of a teacher's pools sends them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    descriptors: u32,
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
    /// Units charged by each consume call (by each descriptor of a ShouldRateLimit: its
    /// `hits_addend`).
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
    /// The health check, then `ShouldRateLimit`, both on --rls-addr, and their ratio.
    Rls,
}

impl Target {
    fn runs_health(self) -> bool {
        matches!(self, Target::Health | Target::Both | Target::Rls)
    }

    fn runs_consume(self) -> bool {
        matches!(self, Target::Consume | Target::Both)
    }

    fn needs_school(self) -> bool {
        matches!(
            self,
            Target::Consume | Target::Both | Target::Allocation | Target::Rls
        )
    }
}

/// Why a run stopped before measuring anything.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("invalid {flag} {addr:?}")]
    Address {
        flag: &'static str,
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
    #[error("--units: {0}")]
    Units(String),
    #[error("--token: {0}")]
    Token(quotad_proto::TokenError),
}

async fn run(args: &Args) -> Result<String, BenchError> {
    let config = RunConfig::from_args(args)?;
    let channels = connect_all("--addr", &config.addr, &config).await?;
    // The RLS target's health check goes to the listener its calls go to: the same transport.
    let rls_channels = match config.target {
        Target::Rls => Some(connect_all("--rls-addr", &config.rls_addr, &config).await?),
        _ => None,
    };
    // Set up before any phase, so a setup failure costs no measuring time.
    if config.target.needs_school() {
        eprintln!(
            "setting up school {} with {} teacher(s)",
            config.school_id, config.teachers
        );
    }
    let rls_load = match &rls_channels {
        Some(rls_channels) => Some(prepare_rls(&channels, rls_channels, &config).await?),
        None => None,
    };
    let consume_load = match config.target {
        Target::Consume | Target::Both | Target::Allocation => {
            Some(prepare_consume(&channels, &config).await?)
        }
        Target::Health | Target::Rls => None,
    };
    let mut reports = Reports::default();
    if config.target.runs_health() {
        announce("health", &config);
        let workload = Arc::new(HealthCheck::new(
            rls_channels.as_deref().unwrap_or(&channels),
        ));
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
    if let Some(load) = rls_load {
        announce("rls", &config);
        let workload = Arc::new(load);
        reports.rls = Some(
            Phase {
                name: "rls",
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
