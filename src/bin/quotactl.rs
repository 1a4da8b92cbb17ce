//! quotactl: the command-line client of quotad.
//!
//! Layout, so that the admin API can grow without the file losing its shape:
//! - the command line: one clap subcommand group per resource (`school`, `pool`, `alloc`) and one
//!   subcommand per hot-path call, with shared argument groups ([`SliceRef`], [`Audit`]);
//! - [`run`] dispatches each subcommand to one small function that builds the request, makes the
//!   call and returns the response message;
//! - every response message knows how to show itself ([`ToJson`] for scripts, [`Render`] for people).
//!
//! Adding a call means: a variant and its argument struct, one function, and `ToJson`/`Render`
//! for a new response type.
//!
//! Exit codes: 0 on success (a denied consume is a success: the server answered), 2 when the
//! request was refused as wrong (invalid argument, not found, failed precondition, or a bad
//! command line), 3 when the server could not be reached, 1 for anything else.
#![deny(clippy::unwrap_used)]

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use quotad::proto::quota_admin_client::QuotaAdminClient;
use quotad::proto::quota_gate_client::QuotaGateClient;
use quotad::proto::{
    Allocation, CheckRequest, CheckResponse, CommitRequest, CommitResponse, ConsumeRequest,
    ConsumeResponse, CreateSchoolRequest, Decision, DenyReason, GetSchoolRequest, GetUsageRequest,
    GetUsageResponse, Pool, PoolUnits, ReleaseRequest, ReleaseResponse, ReserveRequest,
    ReserveResponse, School, ServiceUsage, SetAllocationRequest, SetAllocationStatusRequest,
    SetPoolRequest,
};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to wait for the connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(version, about = "Command-line client for quotad")]
struct Cli {
    /// The quotad server.
    #[arg(
        long,
        global = true,
        env = "QUOTAD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Print the response as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Timeout of the call, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create and inspect schools.
    #[command(subcommand)]
    School(SchoolCommand),
    /// Set a school's pools (units bought per cycle).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Set, suspend and reactivate teachers' slices.
    #[command(subcommand)]
    Alloc(AllocCommand),
    /// Check and charge units in one step (a denial is printed, not an error).
    Consume(ConsumeArgs),
    /// The answer consume would give now, charging nothing.
    Check(CheckArgs),
    /// Hold an estimate until commit, release or its TTL.
    Reserve(ReserveArgs),
    /// Charge the real amount of a reservation and free the hold.
    Commit(CommitArgs),
    /// Free a hold without charging.
    Release(ReleaseArgs),
    /// A teacher's usage this cycle, per service type.
    Usage(UsageArgs),
}

#[derive(Subcommand, Debug)]
enum SchoolCommand {
    /// Create a school with its pools.
    Create(SchoolCreateArgs),
    /// Show a school, its pools and its current cycle.
    Get(SchoolGetArgs),
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// Set the units bought for the cycle for one service type (adds the type if new).
    Set(PoolSetArgs),
}

#[derive(Subcommand, Debug)]
enum AllocCommand {
    /// Create or change a teacher's slice of one service type.
    Set(AllocSetArgs),
    /// Suspend a slice: its units stay allocated but nothing can be consumed.
    Suspend(AllocStatusArgs),
    /// Reactivate a suspended slice.
    Reactivate(AllocStatusArgs),
}

/// Who changes something and why, kept in the server's audit trail.
#[derive(Args, Debug)]
struct Audit {
    /// Why the change is made.
    #[arg(long)]
    reason: Option<String>,
    /// Who makes the change (default: $USER).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    changed_by: Option<String>,
}

/// One teacher's slice of one service type.
#[derive(Args, Debug)]
struct SliceRef {
    /// The school.
    school_id: String,
    /// The teacher, within the school.
    teacher_id: String,
    /// The service type of the slice, e.g. claude_messages.
    service_type: String,
}

/// One teacher.
#[derive(Args, Debug)]
struct TeacherRef {
    /// The school.
    school_id: String,
    /// The teacher, within the school.
    teacher_id: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Tier {
    Preschool,
    K12,
    Individual,
}

impl Tier {
    fn wire_name(self) -> &'static str {
        match self {
            Tier::Preschool => "preschool",
            Tier::K12 => "k12",
            Tier::Individual => "individual",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Priority {
    Low,
    Normal,
    High,
}

impl Priority {
    fn wire_name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// `--pool service=units`.
#[derive(Clone, Debug)]
struct PoolArg {
    service_type: String,
    cycle_units: u64,
}

fn parse_pool_arg(text: &str) -> Result<PoolArg, String> {
    let (service_type, units) = text
        .split_once('=')
        .ok_or_else(|| format!("expected SERVICE=UNITS, got {text:?}"))?;
    if service_type.is_empty() {
        return Err(format!("empty service type in {text:?}"));
    }
    let cycle_units = units
        .parse()
        .map_err(|error| format!("bad units in {text:?}: {error}"))?;
    Ok(PoolArg {
        service_type: service_type.to_string(),
        cycle_units,
    })
}

#[derive(Args, Debug)]
struct SchoolCreateArgs {
    /// The new school's id.
    school_id: String,
    /// The school's name.
    #[arg(long)]
    name: String,
    /// The school's plan.
    #[arg(long, value_enum)]
    tier: Tier,
    /// Day of month (1-28, UTC) each billing cycle starts on (server default: 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=28))]
    anchor_day: Option<u32>,
    /// Let high priority teachers borrow unallocated units when their slice is exhausted.
    #[arg(long)]
    borrowing: bool,
    /// A pool to create, as SERVICE=UNITS; repeat for several (none: the server's default types
    /// with 0 units).
    #[arg(long = "pool", value_name = "SERVICE=UNITS", value_parser = parse_pool_arg)]
    pools: Vec<PoolArg>,
    /// Who creates the school (default: $USER).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    changed_by: Option<String>,
}

#[derive(Args, Debug)]
struct SchoolGetArgs {
    /// The school.
    school_id: String,
}

#[derive(Args, Debug)]
struct PoolSetArgs {
    /// The school.
    school_id: String,
    /// The service type, e.g. claude_messages (added if new).
    service_type: String,
    /// Units bought per billing cycle.
    cycle_units: u64,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct AllocSetArgs {
    #[command(flatten)]
    slice: SliceRef,
    /// Units of the slice per cycle.
    units: u64,
    /// Unset: keep the slice's current priority ("normal" for a new slice).
    #[arg(long, value_enum)]
    priority: Option<Priority>,
    /// Keep the slice's units at cycle rollover instead of returning them to the pool.
    #[arg(long)]
    auto_renew: bool,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct AllocStatusArgs {
    #[command(flatten)]
    slice: SliceRef,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    #[command(flatten)]
    slice: SliceRef,
    /// Units to charge.
    units: u64,
    /// Idempotency key; reuse one to retry safely (default: a fresh unique id).
    #[arg(long)]
    event_id: Option<String>,
    /// The AI model used.
    #[arg(long)]
    model: Option<String>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    slice: SliceRef,
    /// Units that would be charged.
    units: u64,
}

#[derive(Args, Debug)]
struct ReserveArgs {
    #[command(flatten)]
    slice: SliceRef,
    /// Units to hold.
    #[arg(value_name = "ESTIMATE")]
    estimate_units: u64,
    /// Idempotency key of the hold; commit and release name it.
    #[arg(long)]
    reservation_id: String,
    /// How long the hold lives (default: the server's).
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// The AI model used.
    #[arg(long)]
    model: Option<String>,
}

#[derive(Args, Debug)]
struct CommitArgs {
    #[command(flatten)]
    teacher: TeacherRef,
    /// The reservation given to reserve.
    reservation_id: String,
    /// Units really used (charged even above the estimate).
    actual_units: u64,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    #[command(flatten)]
    teacher: TeacherRef,
    /// The reservation given to reserve.
    reservation_id: String,
}

#[derive(Args, Debug)]
struct UsageArgs {
    #[command(flatten)]
    teacher: TeacherRef,
}

// ---------------------------------------------------------------------------------------------
// Errors and exit codes.
// ---------------------------------------------------------------------------------------------

/// Why a command failed; each kind maps to one exit code.
#[derive(Debug)]
enum CliError {
    /// `--addr` is not a URI.
    Address { addr: String, message: String },
    /// No connection to the server.
    Connect { addr: String, message: String },
    /// The server answered with a non-OK status.
    Status(Status),
    /// The response could not be written (e.g. stdout closed).
    Output(io::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Address { .. } => 2,
            CliError::Connect { .. } => 3,
            CliError::Status(status) => match status.code() {
                Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => 2,
                Code::Unavailable => 3,
                _ => 1,
            },
            CliError::Output(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    /// `<code>: <message>`, the same shape for local failures as for server statuses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Address { addr, message } => {
                write!(f, "InvalidArgument: invalid --addr {addr:?}: {message}")
            }
            CliError::Connect { addr, message } => {
                write!(f, "Unavailable: cannot connect to {addr}: {message}")
            }
            CliError::Status(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            CliError::Output(error) => write!(f, "Internal: cannot write output: {error}"),
        }
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Status(status)
    }
}

/// The error and its causes on one line: tonic's transport error alone says only "transport error".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some layers repeat their cause's text; say it once.
        let cause_text = cause.to_string();
        if !message.ends_with(&cause_text) {
            message += &format!(": {cause_text}");
        }
        source = cause.source();
    }
    message
}

// ---------------------------------------------------------------------------------------------
// Calls: one function per subcommand, each returning the response message.
// ---------------------------------------------------------------------------------------------

async fn connect(cli: &Cli) -> Result<Channel, CliError> {
    let endpoint = Endpoint::from_shared(cli.addr.clone()).map_err(|error| CliError::Address {
        addr: cli.addr.clone(),
        message: error_chain(&error),
    })?;
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_millis(cli.timeout_ms))
        .connect()
        .await
        .map_err(|error| CliError::Connect {
            addr: cli.addr.clone(),
            message: error_chain(&error),
        })
}

/// Runs the command and renders its response, as JSON or for a person.
async fn run(cli: Cli) -> Result<String, CliError> {
    let channel = connect(&cli).await?;
    let admin = QuotaAdminClient::new(channel.clone());
    let gate = QuotaGateClient::new(channel);
    let json = cli.json;
    let rendered = match cli.command {
        Command::School(SchoolCommand::Create(args)) => {
            show(create_school(admin, args).await?, json)
        }
        Command::School(SchoolCommand::Get(args)) => show(get_school(admin, args).await?, json),
        Command::Pool(PoolCommand::Set(args)) => show(set_pool(admin, args).await?, json),
        Command::Alloc(AllocCommand::Set(args)) => show(set_allocation(admin, args).await?, json),
        Command::Alloc(AllocCommand::Suspend(args)) => {
            show(set_allocation_status(admin, args, "suspended").await?, json)
        }
        Command::Alloc(AllocCommand::Reactivate(args)) => {
            show(set_allocation_status(admin, args, "active").await?, json)
        }
        Command::Consume(args) => show(consume(gate, args).await?, json),
        Command::Check(args) => show(check(gate, args).await?, json),
        Command::Reserve(args) => show(reserve(gate, args).await?, json),
        Command::Commit(args) => show(commit(gate, args).await?, json),
        Command::Release(args) => show(release(gate, args).await?, json),
        Command::Usage(args) => show(usage(gate, args).await?, json),
    };
    Ok(rendered)
}

async fn create_school(
    mut admin: QuotaAdminClient<Channel>,
    args: SchoolCreateArgs,
) -> Result<School, Status> {
    let pools = args
        .pools
        .into_iter()
        .map(|pool| PoolUnits {
            service_type: pool.service_type,
            cycle_units: pool.cycle_units,
        })
        .collect();
    let request = CreateSchoolRequest {
        school_id: args.school_id,
        name: args.name,
        tier: args.tier.wire_name().to_string(),
        billing_anchor_day: args.anchor_day.unwrap_or(0),
        borrowing_enabled: args.borrowing,
        pools,
        changed_by: args.changed_by.unwrap_or_default(),
        self_service_requests: false,
    };
    Ok(admin.create_school(request).await?.into_inner())
}

async fn get_school(
    mut admin: QuotaAdminClient<Channel>,
    args: SchoolGetArgs,
) -> Result<School, Status> {
    let request = GetSchoolRequest {
        school_id: args.school_id,
    };
    Ok(admin.get_school(request).await?.into_inner())
}

async fn set_pool(mut admin: QuotaAdminClient<Channel>, args: PoolSetArgs) -> Result<Pool, Status> {
    let request = SetPoolRequest {
        school_id: args.school_id,
        service_type: args.service_type,
        cycle_units: args.cycle_units,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_pool(request).await?.into_inner())
}

async fn set_allocation(
    mut admin: QuotaAdminClient<Channel>,
    args: AllocSetArgs,
) -> Result<Allocation, Status> {
    let request = SetAllocationRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        allocated_units: args.units,
        // Empty asks the server to keep the current priority.
        priority: args
            .priority
            .map_or_else(String::new, |p| p.wire_name().to_string()),
        auto_renew: args.auto_renew,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_allocation(request).await?.into_inner())
}

async fn set_allocation_status(
    mut admin: QuotaAdminClient<Channel>,
    args: AllocStatusArgs,
    status: &str,
) -> Result<Allocation, Status> {
    let request = SetAllocationStatusRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        status: status.to_string(),
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_allocation_status(request).await?.into_inner())
}

async fn consume(
    mut gate: QuotaGateClient<Channel>,
    args: ConsumeArgs,
) -> Result<ConsumeResponse, Status> {
    let request = ConsumeRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        event_id: args.event_id.unwrap_or_else(fresh_event_id),
        occurred_at_ms: 0,
        model: args.model.unwrap_or_default(),
    };
    Ok(gate.consume(request).await?.into_inner())
}

/// Unique enough for one person at a terminal: process id and the current nanosecond.
fn fresh_event_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_nanos());
    format!("quotactl-{}-{nanos}", std::process::id())
}

async fn check(
    mut gate: QuotaGateClient<Channel>,
    args: CheckArgs,
) -> Result<CheckResponse, Status> {
    let request = CheckRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
    };
    Ok(gate.check(request).await?.into_inner())
}

async fn reserve(
    mut gate: QuotaGateClient<Channel>,
    args: ReserveArgs,
) -> Result<ReserveResponse, Status> {
    let request = ReserveRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        estimate_units: args.estimate_units,
        ttl_ms: args.ttl_ms.unwrap_or(0),
        reservation_id: args.reservation_id,
        model: args.model.unwrap_or_default(),
    };
    Ok(gate.reserve(request).await?.into_inner())
}

async fn commit(
    mut gate: QuotaGateClient<Channel>,
    args: CommitArgs,
) -> Result<CommitResponse, Status> {
    let request = CommitRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
        actual_units: args.actual_units,
    };
    Ok(gate.commit(request).await?.into_inner())
}

async fn release(
    mut gate: QuotaGateClient<Channel>,
    args: ReleaseArgs,
) -> Result<ReleaseResponse, Status> {
    let request = ReleaseRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
    };
    Ok(gate.release(request).await?.into_inner())
}

async fn usage(
    mut gate: QuotaGateClient<Channel>,
    args: UsageArgs,
) -> Result<GetUsageResponse, Status> {
    let request = GetUsageRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
    };
    Ok(gate.get_usage(request).await?.into_inner())
}

// ---------------------------------------------------------------------------------------------
// JSON: built by hand, because prost types do not derive Serialize. Field names follow the
// proto; u64 stays a JSON number; timestamps stay milliseconds since the epoch.
// ---------------------------------------------------------------------------------------------

trait ToJson {
    fn to_json(&self) -> Value;
}

impl ToJson for Pool {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "cycle_units": self.cycle_units,
            "allocated_units": self.allocated_units,
            "borrowed_units": self.borrowed_units,
            "available_units": self.available_units,
            "used_units": self.used_units,
        })
    }
}

impl ToJson for School {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "name": self.name,
            "tier": self.tier,
            "billing_anchor_day": self.billing_anchor_day,
            "borrowing_enabled": self.borrowing_enabled,
            "pools": self.pools.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "teacher_count": self.teacher_count,
        })
    }
}

impl ToJson for Allocation {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "reserved_units": self.reserved_units,
            "priority": self.priority,
            "auto_renew": self.auto_renew,
            "status": self.status,
        })
    }
}

/// The proto name of a deny reason ("DENY_REASON_EXHAUSTED"), or its number if this client
/// does not know it yet.
fn deny_reason_json(reason: i32) -> Value {
    DenyReason::try_from(reason).map_or(json!(reason), |known| json!(known.as_str_name()))
}

impl ToJson for Decision {
    fn to_json(&self) -> Value {
        json!({
            "allowed": self.allowed,
            "reason": deny_reason_json(self.reason),
            "remaining_units": self.remaining_units,
            "borrowed_units": self.borrowed_units,
            "duplicate": self.duplicate,
            "message": self.message,
        })
    }
}

fn decision_json(decision: Option<&Decision>) -> Value {
    decision.map_or(Value::Null, ToJson::to_json)
}

impl ToJson for ConsumeResponse {
    fn to_json(&self) -> Value {
        json!({ "decision": decision_json(self.decision.as_ref()) })
    }
}

impl ToJson for CheckResponse {
    fn to_json(&self) -> Value {
        json!({ "decision": decision_json(self.decision.as_ref()) })
    }
}

impl ToJson for ReserveResponse {
    fn to_json(&self) -> Value {
        json!({
            "decision": decision_json(self.decision.as_ref()),
            "expires_at_ms": self.expires_at_ms,
        })
    }
}

impl ToJson for CommitResponse {
    fn to_json(&self) -> Value {
        json!({
            "charged_units": self.charged_units,
            "overage_units": self.overage_units,
            "duplicate": self.duplicate,
            "hold_had_expired": self.hold_had_expired,
            "remaining_units": self.remaining_units,
        })
    }
}

impl ToJson for ReleaseResponse {
    fn to_json(&self) -> Value {
        json!({
            "released": self.released,
            "released_units": self.released_units,
        })
    }
}

impl ToJson for ServiceUsage {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "reserved_units": self.reserved_units,
            "remaining_units": self.remaining_units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
            "priority": self.priority,
            "status": self.status,
            "auto_renew": self.auto_renew,
        })
    }
}

impl ToJson for GetUsageResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "teacher_id": self.teacher_id,
            "services": self.services.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Text for people.
// ---------------------------------------------------------------------------------------------

/// A response shown to a person: a line, or a few lines and a table.
trait Render: ToJson {
    fn render(&self) -> String;
}

fn show<R: Render>(response: R, json: bool) -> String {
    if json {
        response.to_json().to_string()
    } else {
        response.render()
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC ("2025-09-01T00:00:00Z", with milliseconds only
/// when there are some); "-" when unset.
fn timestamp_text(ms: i64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms (out of range)"),
        |time| time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

fn on_off(flag: bool) -> &'static str {
    if flag {
        "on"
    } else {
        "off"
    }
}

/// Left-aligned columns, each as wide as its widest cell, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header_cells: Vec<String> = headers.iter().map(|header| header.to_string()).collect();
    std::iter::once(&header_cells)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Render for School {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .pools
            .iter()
            .map(|pool| {
                vec![
                    pool.service_type.clone(),
                    pool.cycle_units.to_string(),
                    pool.allocated_units.to_string(),
                    pool.borrowed_units.to_string(),
                    pool.available_units.to_string(),
                    pool.used_units.to_string(),
                ]
            })
            .collect();
        let headers = [
            "SERVICE",
            "CYCLE",
            "ALLOCATED",
            "BORROWED",
            "AVAILABLE",
            "USED",
        ];
        format!(
            "school     {} ({})\ntier       {}\nanchor day {}\nborrowing  {}\nteachers   {}\n\
             cycle      {} .. {}\n\n{}",
            self.school_id,
            self.name,
            self.tier,
            self.billing_anchor_day,
            on_off(self.borrowing_enabled),
            self.teacher_count,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&headers, &rows)
        )
    }
}

impl Render for Pool {
    fn render(&self) -> String {
        let headers = [
            "SERVICE",
            "CYCLE",
            "ALLOCATED",
            "BORROWED",
            "AVAILABLE",
            "USED",
        ];
        let row = vec![
            self.service_type.clone(),
            self.cycle_units.to_string(),
            self.allocated_units.to_string(),
            self.borrowed_units.to_string(),
            self.available_units.to_string(),
            self.used_units.to_string(),
        ];
        table(&headers, &[row])
    }
}

impl Render for Allocation {
    fn render(&self) -> String {
        format!(
            "{}/{} {}: {} allocated, {} used, {} reserved; priority {}, auto-renew {}, {}",
            self.school_id,
            self.teacher_id,
            self.service_type,
            self.allocated_units,
            self.used_units,
            self.reserved_units,
            self.priority,
            on_off(self.auto_renew),
            self.status
        )
    }
}

fn deny_reason_text(reason: i32) -> String {
    match DenyReason::try_from(reason) {
        Ok(DenyReason::Exhausted) => "exhausted".to_string(),
        Ok(DenyReason::Suspended) => "suspended".to_string(),
        Ok(DenyReason::NoAllocation) => "no allocation".to_string(),
        Ok(DenyReason::Unspecified) => "unspecified".to_string(),
        Err(_) => format!("reason {reason}"),
    }
}

/// "allowed: 95 units left" or "denied (exhausted): 0 units left: <server's sentence>".
fn decision_text(decision: Option<&Decision>) -> String {
    let Some(decision) = decision else {
        return "no decision in the response".to_string();
    };
    let mut text = if decision.allowed {
        format!("allowed: {} units left", decision.remaining_units)
    } else {
        format!(
            "denied ({}): {} units left",
            deny_reason_text(decision.reason),
            decision.remaining_units
        )
    };
    if decision.borrowed_units > 0 {
        text += &format!(", {} borrowed from the pool", decision.borrowed_units);
    }
    if decision.duplicate {
        text += " (duplicate: first decision returned, nothing charged again)";
    }
    if !decision.message.is_empty() {
        text += &format!(": {}", decision.message);
    }
    text
}

impl Render for ConsumeResponse {
    fn render(&self) -> String {
        decision_text(self.decision.as_ref())
    }
}

impl Render for CheckResponse {
    fn render(&self) -> String {
        decision_text(self.decision.as_ref())
    }
}

impl Render for ReserveResponse {
    fn render(&self) -> String {
        let decision = decision_text(self.decision.as_ref());
        if self.expires_at_ms == 0 {
            return decision;
        }
        format!(
            "{decision}\nhold expires {}",
            timestamp_text(self.expires_at_ms)
        )
    }
}

impl Render for CommitResponse {
    fn render(&self) -> String {
        let mut text = format!(
            "charged {} units ({} over the slice), {} units left",
            self.charged_units, self.overage_units, self.remaining_units
        );
        if self.hold_had_expired {
            text += " (the hold had expired; charged all the same)";
        }
        if self.duplicate {
            text += " (duplicate: first result returned, nothing charged again)";
        }
        text
    }
}

impl Render for ReleaseResponse {
    fn render(&self) -> String {
        if self.released {
            format!("released {} units", self.released_units)
        } else {
            "nothing released: the hold was already gone (released, committed or expired)"
                .to_string()
        }
    }
}

impl Render for GetUsageResponse {
    fn render(&self) -> String {
        let headers = [
            "SERVICE",
            "ALLOCATED",
            "USED",
            "RESERVED",
            "REMAINING",
            "BORROWED",
            "OVERAGE",
            "PRIORITY",
            "STATUS",
            "AUTO-RENEW",
        ];
        let rows: Vec<Vec<String>> = self.services.iter().map(service_usage_row).collect();
        format!(
            "{}/{}  cycle {} .. {}\n\n{}",
            self.school_id,
            self.teacher_id,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&headers, &rows)
        )
    }
}

fn service_usage_row(service: &ServiceUsage) -> Vec<String> {
    vec![
        service.service_type.clone(),
        service.allocated_units.to_string(),
        service.used_units.to_string(),
        service.reserved_units.to_string(),
        service.remaining_units.to_string(),
        service.borrowed_units.to_string(),
        service.overage_units.to_string(),
        service.priority.clone(),
        service.status.clone(),
        on_off(service.auto_renew).to_string(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Entry point.
// ---------------------------------------------------------------------------------------------

fn print_line(text: &str) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}").map_err(CliError::Output)
}

// One call per run: a single-threaded runtime is all it needs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match run(cli).await {
        Ok(rendered) => print_line(&rendered),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
