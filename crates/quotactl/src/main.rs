//! quotactl: the command-line client of quotad.
//!
//! Layout, so that the admin API can grow without the file losing its shape:
//! - the command line: one clap subcommand group per resource (`school`, `pool`, `alloc`,
//!   `request`, `history`) and one subcommand per hot-path call or report, with shared argument
//!   groups ([`SliceRef`], [`Audit`]);
//! - [`run`] dispatches each subcommand to one small function that builds the request, makes the
//!   call and returns the response message;
//! - every response message knows how to show itself ([`ToJson`] for scripts, [`Render`] for
//!   people);
//! - [`allocation_csv`] reads and writes the allocation files of `alloc import` and `alloc export`
//!   without doing I/O, so that its checks are tested alone.
//!
//! Adding a call means: a variant and its argument struct, one function, and `ToJson`/`Render`
//! for a new response type.
//!
//! Exit codes: [`EXIT_CODES_HELP`], which `--help` prints.
#![deny(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::v1::{
    Alert, AllocationMove, IdleSlice, ListAlertsRequest, ListAlertsResponse, ProposedAllocation,
    RollupGranularity, RollupGrouping, RunOutForecast, SuggestionsRequest, SuggestionsResponse,
    UsageRollup, UsageRollupsRequest, UsageRollupsResponse,
};
use quotad_proto::v1::{
    Allocation, AllocationSpec, ApproveRequestRequest, BulkSetAllocationsRequest,
    BulkSetAllocationsResponse, CheckRequest, CheckResponse, CommitRequest, CommitResponse,
    ConsumeRequest, ConsumeResponse, CreateSchoolRequest, CycleChoice, Decision, DenyReason,
    GetSchoolRequest, GetUsageRequest, GetUsageResponse, HistoryEntry, IncreaseRequest,
    ListAllocationsRequest, ListAllocationsResponse, ListHistoryRequest, ListRequestsRequest,
    ListRequestsResponse, ListSchoolsRequest, ListSchoolsResponse, Pool, PoolUnits,
    RejectRequestRequest, ReleaseRequest, ReleaseResponse, RemoveAllocationRequest,
    RequestIncreaseRequest, ReserveRequest, ReserveResponse, School, ServiceUsage,
    SetAllocationRequest, SetAllocationStatusRequest, SetPoolRequest, UpdateSchoolSettingsRequest,
    UsageReport, UsageReportRequest, UsageRow, VerifyHistoryRequest, VerifyHistoryResponse,
};
use serde_json::{json, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to wait for the connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Items asked for per page when listing schools or history: the most the server gives.
const PAGE_SIZE: u32 = 1000;

/// Most pages read by one listing (ten million items at [`PAGE_SIZE`]): a bound, so that a server
/// that never says "last page" cannot keep the client looping.
const PAGES_MAX: usize = 10_000;

/// Printed at the end of `quotactl --help`.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (a denied consume is a success: the server answered)
  1  any other failure (e.g. the server's Internal, DeadlineExceeded or Unimplemented)
  2  refused as wrong: a bad command line, token or CSV file (nothing is sent), or the
     server's InvalidArgument, NotFound, FailedPrecondition, PermissionDenied or
     Unauthenticated
  3  the server could not be reached (no connection, or Unavailable)
  4  history verify: the school's audit trail is broken";

// ---------------------------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(version, about = "Command-line client for quotad", after_help = EXIT_CODES_HELP)]
struct Cli {
    /// The quotad server.
    #[arg(
        long,
        global = true,
        env = "QUOTAD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Sent with every call as `authorization: Bearer <TOKEN>`.
    #[arg(long, global = true, env = "QUOTAD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the response as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Timeout of each call, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, inspect and configure schools.
    #[command(subcommand)]
    School(SchoolCommand),
    /// Set a school's pools (units bought per cycle).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Set, list, remove, suspend and reactivate teachers' slices; import and export them as CSV.
    #[command(subcommand)]
    Alloc(AllocCommand),
    /// File, approve, reject and list teachers' requests for more units.
    #[command(subcommand)]
    Request(RequestCommand),
    /// List and verify a school's audit trail.
    #[command(subcommand)]
    History(HistoryCommand),
    /// Usage per teacher and service type, with per-service totals.
    Report(ReportArgs),
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
    /// Charged usage per day or month, per teacher and/or service type (read from Postgres).
    Rollups(RollupsArgs),
    /// Idle slices, slices that will run out, and moves that keep each pool's total.
    Suggest(SuggestArgs),
    /// Active alerts: slices over a threshold, pools nearly used up, usage anomalies.
    Alerts(AlertsArgs),
    /// Send usage that already happened (a JSON-lines file of events) with SyncUsage.
    Sync(SyncArgs),
}

#[derive(Subcommand, Debug)]
enum SchoolCommand {
    /// Create a school with its pools.
    Create(SchoolCreateArgs),
    /// Show a school, its pools and its current cycle.
    Get(SchoolGetArgs),
    /// List schools in id order, every page.
    List(SchoolListArgs),
    /// Change a school's settings; the ones not given keep their values.
    Settings(SchoolSettingsArgs),
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
    Suspend(AllocSliceArgs),
    /// Reactivate a suspended slice.
    Reactivate(AllocSliceArgs),
    /// Return a slice's units to the pool (nothing may be used or held on it this cycle).
    Remove(AllocSliceArgs),
    /// List a school's slices.
    List(AllocListArgs),
    /// Same as `alloc import`, with the file given as --file.
    Bulk(AllocBulkArgs),
    /// Set the slices of a CSV file in one all-or-nothing call, after checking every line.
    ///
    /// The file starts with this header, then has one slice per line:
    ///
    /// teacher_id,service_type,allocated_units,priority,auto_renew
    ///
    /// priority is low, normal or high (empty: normal); auto_renew is true, false, 1, 0, yes or
    /// no (empty: false); both in any case. Each teacher and service type pair may appear once.
    ///
    /// Every bad line is reported with its number (the header is line 1), and nothing is sent
    /// unless every line is right.
    Import(AllocImportArgs),
    /// Write a school's slices as CSV, in the format `alloc import` reads.
    ///
    /// The CSV goes to stdout unless --output is given; --json changes only the summary printed
    /// with --output. A slice's status (suspended or active) and usage are not part of the file.
    Export(AllocExportArgs),
}

#[derive(Subcommand, Debug)]
enum RequestCommand {
    /// File a teacher's request for more units (the school must allow self-service).
    File(RequestFileArgs),
    /// Grant all or part of a pending request, as an allocation change.
    Approve(RequestApproveArgs),
    /// Refuse a pending request; the teacher sees the reason.
    Reject(RequestRejectArgs),
    /// List a school's requests.
    List(RequestListArgs),
}

#[derive(Subcommand, Debug)]
enum HistoryCommand {
    /// List a school's audit trail, oldest first, every page.
    List(HistoryListArgs),
    /// Recompute the hash chain of a school's audit trail (exit code 4 when it is broken).
    Verify(HistoryVerifyArgs),
}

/// Who changes something and why, kept in the server's audit trail.
#[derive(Args, Debug)]
struct Audit {
    /// Why the change is made.
    #[arg(long)]
    reason: Option<String>,
    /// Who makes the change (default: $USER; the server records a token's subject instead).
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

/// `--borrowing on|off` and the like.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn is_on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RequestStatus {
    Pending,
    Approved,
    Rejected,
    Expired,
}

impl RequestStatus {
    fn wire_name(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
            RequestStatus::Expired => "expired",
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

/// `--from`/`--to`: RFC 3339 ("2025-09-01T00:00:00Z") or milliseconds since the Unix epoch.
fn parse_time_ms(text: &str) -> Result<i64, String> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => DateTime::parse_from_rfc3339(text)
            .map_err(|error| {
                format!(
                    "expected RFC 3339 (e.g. 2025-09-01T00:00:00Z) or milliseconds since the \
                     Unix epoch, got {text:?}: {error}"
                )
            })?
            .timestamp_millis(),
    };
    if ms < 0 {
        return Err(format!("{text:?} is before 1970-01-01T00:00:00Z"));
    }
    Ok(ms)
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
    /// Let teachers file requests for more units (`request file`).
    #[arg(long)]
    self_service: bool,
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
struct SchoolListArgs {
    /// Only the schools of this plan.
    #[arg(long, value_enum)]
    tier: Option<Tier>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("setting").required(true).multiple(true)))]
struct SchoolSettingsArgs {
    /// The school.
    school_id: String,
    /// Let high priority teachers borrow unallocated units when their slice is exhausted.
    #[arg(long, value_enum, group = "setting")]
    borrowing: Option<OnOff>,
    /// Let teachers file requests for more units.
    #[arg(long, value_enum, group = "setting")]
    self_service: Option<OnOff>,
    /// Day of month (1-28, UTC) billing cycles start on; takes effect at the next rollover.
    #[arg(long, group = "setting", value_parser = clap::value_parser!(u32).range(1..=28))]
    anchor_day: Option<u32>,
    /// The school's new name.
    #[arg(long, group = "setting")]
    name: Option<String>,
    #[command(flatten)]
    audit: Audit,
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
struct AllocSliceArgs {
    #[command(flatten)]
    slice: SliceRef,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct AllocListArgs {
    /// The school.
    school_id: String,
    /// Only this teacher's slices.
    #[arg(long = "teacher", value_name = "TEACHER")]
    teacher_id: Option<String>,
    /// Only slices of this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    service_type: Option<String>,
}

#[derive(Args, Debug)]
struct AllocBulkArgs {
    /// The school.
    school_id: String,
    /// The CSV file (see `alloc import --help` for its format).
    #[arg(long, value_name = "FILE.csv")]
    file: PathBuf,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct AllocImportArgs {
    /// The school.
    school_id: String,
    /// The CSV file.
    #[arg(value_name = "FILE.csv")]
    file: PathBuf,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct AllocExportArgs {
    /// The school.
    school_id: String,
    /// Write the CSV to this file (replaced if it exists) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RequestFileArgs {
    #[command(flatten)]
    slice: SliceRef,
    /// Units asked for, on top of the slice.
    units: u64,
    /// Why the teacher needs them (the approver sees it).
    #[arg(long)]
    reason: String,
}

#[derive(Args, Debug)]
struct RequestApproveArgs {
    /// The school.
    school_id: String,
    /// The request's id.
    #[arg(value_name = "ID")]
    request_id: u64,
    /// Units to grant, fewer than asked to grant part (default: all that was asked).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    units: Option<u64>,
    #[command(flatten)]
    audit: Audit,
}

#[derive(Args, Debug)]
struct RequestRejectArgs {
    /// The school.
    school_id: String,
    /// The request's id.
    #[arg(value_name = "ID")]
    request_id: u64,
    /// Why the request is refused (the teacher sees it).
    #[arg(long)]
    reason: String,
    /// Who refuses (default: $USER; the server records a token's subject instead).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    changed_by: Option<String>,
}

#[derive(Args, Debug)]
struct RequestListArgs {
    /// The school.
    school_id: String,
    /// Only this teacher's requests.
    #[arg(long = "teacher", value_name = "TEACHER")]
    teacher_id: Option<String>,
    /// Only requests in this state.
    #[arg(long, value_enum)]
    status: Option<RequestStatus>,
}

#[derive(Args, Debug)]
struct HistoryListArgs {
    /// The school.
    school_id: String,
    /// Only changes to this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    teacher_id: Option<String>,
    /// Only changes to this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    service_type: Option<String>,
    /// Only changes at or after this time: RFC 3339 or milliseconds since the Unix epoch.
    #[arg(long = "from", value_name = "TIME", value_parser = parse_time_ms)]
    from_ms: Option<i64>,
    /// Only changes up to this time: RFC 3339 or milliseconds since the Unix epoch.
    #[arg(long = "to", value_name = "TIME", value_parser = parse_time_ms)]
    to_ms: Option<i64>,
    /// Stop after this many entries (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
}

#[derive(Args, Debug)]
struct HistoryVerifyArgs {
    /// The school.
    school_id: String,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The school.
    school_id: String,
    /// Only this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    teacher_id: Option<String>,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    service_type: Option<String>,
    /// The previous billing cycle instead of the current one.
    #[arg(long)]
    previous: bool,
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
    /// Preview a Reserve (a hold never borrows) instead of a Consume.
    #[arg(long)]
    reserve: bool,
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

/// What each rollup row sums over, besides its period.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum RollupBy {
    TeacherService,
    Service,
    Teacher,
    School,
}

#[derive(Args, Debug)]
struct RollupsArgs {
    /// The school.
    school_id: String,
    /// Months instead of days.
    #[arg(long)]
    monthly: bool,
    /// What each row sums over, besides its period.
    #[arg(long, value_enum, default_value = "teacher-service")]
    by: RollupBy,
    /// The first day, YYYY-MM-DD (UTC); default: the start of the current cycle.
    #[arg(long, value_parser = parse_date_ms)]
    from: Option<i64>,
    /// The day after the last one, YYYY-MM-DD (UTC); default: up to now.
    #[arg(long, value_parser = parse_date_ms)]
    to: Option<i64>,
    /// Only this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    teacher_id: Option<String>,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    service_type: Option<String>,
    /// At most this many rows (default 1000, at most 10000).
    #[arg(long)]
    rows_max: Option<u32>,
}

#[derive(Args, Debug)]
struct SuggestArgs {
    /// The school.
    school_id: String,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    service_type: Option<String>,
}

#[derive(Args, Debug)]
struct AlertsArgs {
    /// The school.
    school_id: String,
}

/// 00:00 UTC of a YYYY-MM-DD day, in milliseconds since the epoch.
fn parse_date_ms(value: &str) -> Result<i64, String> {
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map(|day| {
            day.and_time(chrono::NaiveTime::MIN)
                .and_utc()
                .timestamp_millis()
        })
        .map_err(|_| format!("{value:?} is not a day written YYYY-MM-DD"))
}

#[derive(Args, Debug)]
struct SyncArgs {
    #[arg(long)]
    school_id: String,
    /// One JSON object per line: {"event_id", "teacher_id", "service_type", "units",
    /// "occurred_at_ms", "model" (optional)}. At most the server's batch size (1,000 by default).
    file: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Errors and exit codes.
// ---------------------------------------------------------------------------------------------

/// Why a command failed; each kind maps to one exit code ([`EXIT_CODES_HELP`]).
#[derive(Debug)]
enum CliError {
    /// `--addr` is not a URI.
    Address { addr: String, message: String },
    /// `--token` cannot be sent as a bearer token.
    Token(String),
    /// The command line asks for something impossible, found before any call.
    Usage(String),
    /// A file named on the command line cannot be read.
    ReadFile { path: PathBuf, error: io::Error },
    /// Lines of an allocation CSV file are wrong; nothing was sent.
    Csv {
        path: PathBuf,
        errors: Vec<allocation_csv::LineError>,
    },
    /// No connection to the server.
    Connect { addr: String, message: String },
    /// The server answered with a non-OK status.
    Status(Status),
    /// The server broke the paging contract.
    Paging(String),
    /// The school's audit trail does not verify: the answer is itself the bad news.
    HistoryBroken {
        school_id: String,
        verdict: VerifyHistoryResponse,
    },
    /// The response could not be written (e.g. stdout closed).
    Output(io::Error),
    /// The export could not be written to its file.
    WriteFile { path: PathBuf, error: io::Error },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Address { .. }
            | CliError::Token(_)
            | CliError::Usage(_)
            | CliError::ReadFile { .. }
            | CliError::Csv { .. } => 2,
            CliError::Connect { .. } => 3,
            CliError::Status(status) => match status.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::PermissionDenied
                | Code::Unauthenticated => 2,
                Code::Unavailable => 3,
                _ => 1,
            },
            CliError::HistoryBroken { .. } => 4,
            CliError::Paging(_) | CliError::Output(_) | CliError::WriteFile { .. } => 1,
        }
    }

    /// Lines to print before the error itself: one per bad line of a CSV file.
    fn details(&self) -> Vec<String> {
        match self {
            CliError::Csv { path, errors } => errors
                .iter()
                .map(|error| format!("{} {error}", path.display()))
                .collect(),
            _ => Vec::new(),
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
            // The token itself is never printed: it is a secret.
            CliError::Token(message) => write!(f, "InvalidArgument: invalid --token: {message}"),
            CliError::Usage(message) => write!(f, "InvalidArgument: {message}"),
            CliError::ReadFile { path, error } => {
                write!(
                    f,
                    "InvalidArgument: cannot read {}: {error}",
                    path.display()
                )
            }
            CliError::Csv { path, errors } => write!(
                f,
                "InvalidArgument: {}: {} bad line{}; nothing was sent to the server",
                path.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            ),
            CliError::Connect { addr, message } => {
                write!(f, "Unavailable: cannot connect to {addr}: {message}")
            }
            CliError::Status(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            CliError::Paging(message) => write!(f, "Internal: {message}"),
            CliError::HistoryBroken { school_id, verdict } => write!(
                f,
                "DataLoss: the audit trail of {school_id} is broken: first bad entry {} \
                 (of {}): {}",
                verdict.first_bad_seq, verdict.entries, verdict.problem
            ),
            CliError::Output(error) => write!(f, "Internal: cannot write output: {error}"),
            CliError::WriteFile { path, error } => {
                write!(f, "Internal: cannot write {}: {error}", path.display())
            }
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
// Connection and authentication.
// ---------------------------------------------------------------------------------------------

/// Adds `authorization: Bearer <token>` to every call when a token was given.
#[derive(Clone, Debug)]
struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    /// Checks the token once, before connecting, so that a bad one is a clear local error
    /// rather than a failure inside the first call.
    fn new(token: Option<&str>) -> Result<Self, CliError> {
        let Some(token) = token else {
            return Ok(Self { header: None });
        };
        if token.is_empty() {
            return Err(CliError::Token(
                "it is empty; give a token or unset QUOTAD_TOKEN".to_string(),
            ));
        }
        // A bearer token is printable ASCII without spaces (RFC 6750); anything else is a
        // pasting mistake (a line break, quotes from a document) better caught here.
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(CliError::Token(
                "it must be printable ASCII without spaces or line breaks".to_string(),
            ));
        }
        let mut header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            CliError::Token("it cannot be sent as an HTTP header value".to_string())
        })?;
        // Keeps the token out of HPACK's table and out of debug output.
        header.set_sensitive(true);
        Ok(Self {
            header: Some(header),
        })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type AdminClient = QuotaAdminClient<InterceptedService<Channel, BearerAuth>>;
type GateClient = QuotaGateClient<InterceptedService<Channel, BearerAuth>>;

/// Connects when a command first needs the server, so that local input (the token, a CSV file)
/// is checked and reported without dialling anything.
struct Server {
    addr: String,
    timeout: Duration,
    auth: BearerAuth,
}

impl Server {
    fn new(cli: &Cli) -> Result<Self, CliError> {
        Ok(Self {
            addr: cli.addr.clone(),
            timeout: Duration::from_millis(cli.timeout_ms),
            auth: BearerAuth::new(cli.token.as_deref())?,
        })
    }

    async fn channel(&self) -> Result<Channel, CliError> {
        let endpoint =
            Endpoint::from_shared(self.addr.clone()).map_err(|error| CliError::Address {
                addr: self.addr.clone(),
                message: error_chain(&error),
            })?;
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.timeout)
            .connect()
            .await
            .map_err(|error| CliError::Connect {
                addr: self.addr.clone(),
                message: error_chain(&error),
            })
    }

    async fn admin(&self) -> Result<AdminClient, CliError> {
        let channel = self.channel().await?;
        Ok(QuotaAdminClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }

    async fn gate(&self) -> Result<GateClient, CliError> {
        let channel = self.channel().await?;
        Ok(QuotaGateClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: one arm per subcommand.
// ---------------------------------------------------------------------------------------------

/// What a run prints on stdout, and the failure to report after it when the answer is itself
/// bad news (a broken audit trail).
struct Output {
    stdout: Vec<u8>,
    failure: Option<CliError>,
}

impl Output {
    /// A rendered response, printed with a final line break.
    fn text(text: String) -> Self {
        let mut stdout = text.into_bytes();
        stdout.push(b'\n');
        Self {
            stdout,
            failure: None,
        }
    }

    /// Bytes printed as they are (a CSV export).
    fn bytes(stdout: Vec<u8>) -> Self {
        Self {
            stdout,
            failure: None,
        }
    }
}

/// Runs the command and renders its response, as JSON or for a person.
async fn run(cli: Cli) -> Result<Output, CliError> {
    let server = Server::new(&cli)?;
    let json = cli.json;
    let rendered = match cli.command {
        Command::School(command) => run_school(&server, command, json).await?,
        Command::Pool(PoolCommand::Set(args)) => {
            show(set_pool(server.admin().await?, args).await?, json)
        }
        Command::Alloc(command) => return run_alloc(&server, command, json).await,
        Command::Request(command) => run_request(&server, command, json).await?,
        Command::History(command) => return run_history(&server, command, json).await,
        Command::Report(args) => show(usage_report(server.admin().await?, args).await?, json),
        Command::Consume(args) => show(consume(server.gate().await?, args).await?, json),
        Command::Check(args) => show(check(server.gate().await?, args).await?, json),
        Command::Reserve(args) => show(reserve(server.gate().await?, args).await?, json),
        Command::Commit(args) => show(commit(server.gate().await?, args).await?, json),
        Command::Release(args) => show(release(server.gate().await?, args).await?, json),
        Command::Usage(args) => show(usage(server.gate().await?, args).await?, json),
        Command::Rollups(args) => show(rollups(server.admin().await?, args).await?, json),
        Command::Suggest(args) => show(suggest(server.admin().await?, args).await?, json),
        Command::Alerts(args) => show(alerts(server.admin().await?, args).await?, json),
        Command::Sync(args) => show(usage_sync::send(server.gate().await?, args).await?, json),
    };
    Ok(Output::text(rendered))
}

async fn run_school(
    server: &Server,
    command: SchoolCommand,
    json: bool,
) -> Result<String, CliError> {
    let admin = server.admin().await?;
    Ok(match command {
        SchoolCommand::Create(args) => show(create_school(admin, args).await?, json),
        SchoolCommand::Get(args) => show(get_school(admin, args).await?, json),
        SchoolCommand::List(args) => show(list_schools(admin, args).await?, json),
        SchoolCommand::Settings(args) => show(update_school_settings(admin, args).await?, json),
    })
}

async fn run_alloc(server: &Server, command: AllocCommand, json: bool) -> Result<Output, CliError> {
    let rendered = match command {
        AllocCommand::Set(args) => show(set_allocation(server.admin().await?, args).await?, json),
        AllocCommand::Suspend(args) => {
            let admin = server.admin().await?;
            show(set_allocation_status(admin, args, "suspended").await?, json)
        }
        AllocCommand::Reactivate(args) => {
            let admin = server.admin().await?;
            show(set_allocation_status(admin, args, "active").await?, json)
        }
        AllocCommand::Remove(args) => {
            show(remove_allocation(server.admin().await?, args).await?, json)
        }
        AllocCommand::List(args) => {
            show(list_allocations(server.admin().await?, args).await?, json)
        }
        AllocCommand::Bulk(args) => show(
            import_allocations(server, args.school_id, &args.file, args.audit).await?,
            json,
        ),
        AllocCommand::Import(args) => show(
            import_allocations(server, args.school_id, &args.file, args.audit).await?,
            json,
        ),
        AllocCommand::Export(args) => {
            return export_allocations(server.admin().await?, args, json).await;
        }
    };
    Ok(Output::text(rendered))
}

async fn run_request(
    server: &Server,
    command: RequestCommand,
    json: bool,
) -> Result<String, CliError> {
    let admin = server.admin().await?;
    Ok(match command {
        RequestCommand::File(args) => show(request_increase(admin, args).await?, json),
        RequestCommand::Approve(args) => show(approve_request(admin, args).await?, json),
        RequestCommand::Reject(args) => show(reject_request(admin, args).await?, json),
        RequestCommand::List(args) => show(list_requests(admin, args).await?, json),
    })
}

async fn run_history(
    server: &Server,
    command: HistoryCommand,
    json: bool,
) -> Result<Output, CliError> {
    match command {
        HistoryCommand::List(args) => {
            let listing = list_history(server.admin().await?, args).await?;
            Ok(Output::text(show(listing, json)))
        }
        HistoryCommand::Verify(args) => {
            let school_id = args.school_id.clone();
            let verdict = verify_history(server.admin().await?, args).await?;
            if verdict.intact {
                return Ok(Output::text(show(verdict, json)));
            }
            // A broken chain is reported as an error (exit code 4); scripts asking for JSON
            // still get the answer on stdout, people get the one line on stderr.
            let mut output = if json {
                Output::text(verdict.to_json().to_string())
            } else {
                Output::bytes(Vec::new())
            };
            output.failure = Some(CliError::HistoryBroken { school_id, verdict });
            Ok(output)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calls: one function per subcommand, each returning the response message.
// ---------------------------------------------------------------------------------------------

async fn create_school(mut admin: AdminClient, args: SchoolCreateArgs) -> Result<School, Status> {
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
        self_service_requests: args.self_service,
    };
    Ok(admin.create_school(request).await?.into_inner())
}

async fn get_school(mut admin: AdminClient, args: SchoolGetArgs) -> Result<School, Status> {
    let request = GetSchoolRequest {
        school_id: args.school_id,
    };
    Ok(admin.get_school(request).await?.into_inner())
}

async fn set_pool(mut admin: AdminClient, args: PoolSetArgs) -> Result<Pool, Status> {
    let request = SetPoolRequest {
        school_id: args.school_id,
        service_type: args.service_type,
        cycle_units: args.cycle_units,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_pool(request).await?.into_inner())
}

async fn set_allocation(mut admin: AdminClient, args: AllocSetArgs) -> Result<Allocation, Status> {
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
    mut admin: AdminClient,
    args: AllocSliceArgs,
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

async fn consume(mut gate: GateClient, args: ConsumeArgs) -> Result<ConsumeResponse, Status> {
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

async fn check(mut gate: GateClient, args: CheckArgs) -> Result<CheckResponse, Status> {
    let request = CheckRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        previews: if args.reserve {
            quotad_proto::v1::CheckPreviews::Reserve as i32
        } else {
            quotad_proto::v1::CheckPreviews::Consume as i32
        },
    };
    Ok(gate.check(request).await?.into_inner())
}

async fn reserve(mut gate: GateClient, args: ReserveArgs) -> Result<ReserveResponse, Status> {
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

async fn commit(mut gate: GateClient, args: CommitArgs) -> Result<CommitResponse, Status> {
    let request = CommitRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
        actual_units: args.actual_units,
    };
    Ok(gate.commit(request).await?.into_inner())
}

async fn release(mut gate: GateClient, args: ReleaseArgs) -> Result<ReleaseResponse, Status> {
    let request = ReleaseRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
    };
    Ok(gate.release(request).await?.into_inner())
}

async fn usage(mut gate: GateClient, args: UsageArgs) -> Result<GetUsageResponse, Status> {
    let request = GetUsageRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
    };
    Ok(gate.get_usage(request).await?.into_inner())
}

/// The token of the next page, refusing one that would list the same page again forever.
fn next_page_token(current: &str, next: String) -> Result<String, CliError> {
    if next == current {
        return Err(CliError::Paging(format!(
            "the server gave page token {next:?} twice; stopped instead of looping"
        )));
    }
    Ok(next)
}

fn too_many_pages() -> CliError {
    CliError::Paging(format!(
        "the listing did not end after {PAGES_MAX} pages; stopped"
    ))
}

/// Every page of the listing, as one response.
async fn list_schools(
    mut admin: AdminClient,
    args: SchoolListArgs,
) -> Result<ListSchoolsResponse, CliError> {
    let tier = args
        .tier
        .map_or_else(String::new, |tier| tier.wire_name().to_string());
    let mut schools = Vec::new();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let request = ListSchoolsRequest {
            tier: tier.clone(),
            page_size: PAGE_SIZE,
            page_token: page_token.clone(),
        };
        let page = admin.list_schools(request).await?.into_inner();
        schools.extend(page.schools);
        if page.next_page_token.is_empty() {
            return Ok(ListSchoolsResponse {
                schools,
                next_page_token: String::new(),
            });
        }
        page_token = next_page_token(&page_token, page.next_page_token)?;
    }
    Err(too_many_pages())
}

async fn update_school_settings(
    mut admin: AdminClient,
    args: SchoolSettingsArgs,
) -> Result<School, Status> {
    let request = UpdateSchoolSettingsRequest {
        school_id: args.school_id,
        borrowing_enabled: args.borrowing.map(OnOff::is_on),
        self_service_requests: args.self_service.map(OnOff::is_on),
        billing_anchor_day: args.anchor_day,
        name: args.name,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.update_school_settings(request).await?.into_inner())
}

/// A slice just removed; shown as a removal rather than as a live slice.
struct RemovedAllocation(Allocation);

async fn remove_allocation(
    mut admin: AdminClient,
    args: AllocSliceArgs,
) -> Result<RemovedAllocation, Status> {
    let request = RemoveAllocationRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    let removed = admin.remove_allocation(request).await?.into_inner();
    Ok(RemovedAllocation(removed))
}

async fn list_allocations(
    mut admin: AdminClient,
    args: AllocListArgs,
) -> Result<ListAllocationsResponse, Status> {
    let request = ListAllocationsRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
    };
    Ok(admin.list_allocations(request).await?.into_inner())
}

/// Reads an allocation CSV file, bounded in size, and checks every line of it.
fn read_allocation_file(path: &Path) -> Result<Vec<AllocationSpec>, CliError> {
    let read_error = |error| CliError::ReadFile {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(allocation_csv::FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > allocation_csv::FILE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{} is larger than {} bytes; split it into several files",
            path.display(),
            allocation_csv::FILE_BYTES_MAX
        )));
    }
    allocation_csv::parse_bytes(&bytes).map_err(|errors| CliError::Csv {
        path: path.to_path_buf(),
        errors,
    })
}

/// Checks every line of the file, then sets all its slices in one all-or-nothing call.
async fn import_allocations(
    server: &Server,
    school_id: String,
    file: &Path,
    audit: Audit,
) -> Result<BulkSetAllocationsResponse, CliError> {
    let allocations = read_allocation_file(file)?;
    let mut admin = server.admin().await?;
    let request = BulkSetAllocationsRequest {
        school_id,
        allocations,
        changed_by: audit.changed_by.unwrap_or_default(),
        reason: audit.reason.unwrap_or_default(),
    };
    Ok(admin.bulk_set_allocations(request).await?.into_inner())
}

/// What `alloc export --output FILE` says once the file is written.
struct ExportSummary {
    path: PathBuf,
    allocation_count: usize,
}

async fn export_allocations(
    mut admin: AdminClient,
    args: AllocExportArgs,
    json: bool,
) -> Result<Output, CliError> {
    let request = ListAllocationsRequest {
        school_id: args.school_id,
        teacher_id: String::new(),
        service_type: String::new(),
    };
    let mut allocations = admin
        .list_allocations(request)
        .await?
        .into_inner()
        .allocations;
    // Sorted, so that two exports of the same slices are the same file and diff cleanly.
    allocations
        .sort_by(|a, b| (&a.teacher_id, &a.service_type).cmp(&(&b.teacher_id, &b.service_type)));
    let csv = allocation_csv::write(&allocations)
        .map_err(|error| CliError::Output(io::Error::other(error)))?;
    let Some(path) = args.output else {
        return Ok(Output::bytes(csv));
    };
    std::fs::write(&path, csv).map_err(|error| CliError::WriteFile {
        path: path.clone(),
        error,
    })?;
    let summary = ExportSummary {
        path,
        allocation_count: allocations.len(),
    };
    Ok(Output::text(show(summary, json)))
}

async fn request_increase(
    mut admin: AdminClient,
    args: RequestFileArgs,
) -> Result<IncreaseRequest, Status> {
    let request = RequestIncreaseRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        reason: args.reason,
    };
    Ok(admin.request_increase(request).await?.into_inner())
}

async fn approve_request(
    mut admin: AdminClient,
    args: RequestApproveArgs,
) -> Result<IncreaseRequest, Status> {
    let request = ApproveRequestRequest {
        school_id: args.school_id,
        request_id: args.request_id,
        // 0 grants all that was asked.
        units: args.units.unwrap_or(0),
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.approve_request(request).await?.into_inner())
}

async fn reject_request(
    mut admin: AdminClient,
    args: RequestRejectArgs,
) -> Result<IncreaseRequest, Status> {
    let request = RejectRequestRequest {
        school_id: args.school_id,
        request_id: args.request_id,
        changed_by: args.changed_by.unwrap_or_default(),
        reason: args.reason,
    };
    Ok(admin.reject_request(request).await?.into_inner())
}

async fn list_requests(
    mut admin: AdminClient,
    args: RequestListArgs,
) -> Result<ListRequestsResponse, Status> {
    let request = ListRequestsRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        status: args
            .status
            .map_or_else(String::new, |status| status.wire_name().to_string()),
    };
    Ok(admin.list_requests(request).await?.into_inner())
}

/// The entries of `history list`, and whether `--limit` left some unread.
struct HistoryListing {
    entries: Vec<HistoryEntry>,
    more: bool,
}

/// Every page of the listing (or the first `--limit` entries), as one answer.
async fn list_history(
    mut admin: AdminClient,
    args: HistoryListArgs,
) -> Result<HistoryListing, CliError> {
    let from_ms = args.from_ms.unwrap_or(0);
    let to_ms = args.to_ms.unwrap_or(0);
    if from_ms > 0 && to_ms > 0 && from_ms > to_ms {
        return Err(CliError::Usage(format!(
            "--from {} is after --to {}",
            timestamp_text(from_ms),
            timestamp_text(to_ms)
        )));
    }
    let entries_max = args.limit.map_or(usize::MAX, |limit| limit as usize);
    let mut entries = Vec::new();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let left = entries_max - entries.len();
        let request = ListHistoryRequest {
            school_id: args.school_id.clone(),
            teacher_id: args.teacher_id.clone().unwrap_or_default(),
            service_type: args.service_type.clone().unwrap_or_default(),
            from_ms,
            to_ms,
            page_size: u32::try_from(left).map_or(PAGE_SIZE, |left| left.min(PAGE_SIZE)),
            page_token: page_token.clone(),
        };
        let page = admin.list_history(request).await?.into_inner();
        let last_page = page.next_page_token.is_empty();
        entries.extend(page.entries);
        if entries.len() >= entries_max {
            let more = !last_page || entries.len() > entries_max;
            entries.truncate(entries_max);
            return Ok(HistoryListing { entries, more });
        }
        if last_page {
            return Ok(HistoryListing {
                entries,
                more: false,
            });
        }
        page_token = next_page_token(&page_token, page.next_page_token)?;
    }
    Err(too_many_pages())
}

async fn verify_history(
    mut admin: AdminClient,
    args: HistoryVerifyArgs,
) -> Result<VerifyHistoryResponse, Status> {
    let request = VerifyHistoryRequest {
        school_id: args.school_id,
    };
    Ok(admin.verify_history(request).await?.into_inner())
}

async fn usage_report(mut admin: AdminClient, args: ReportArgs) -> Result<UsageReport, Status> {
    let cycle = if args.previous {
        CycleChoice::Previous
    } else {
        CycleChoice::Current
    };
    let request = UsageReportRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
        cycle: cycle.into(),
    };
    Ok(admin.get_usage_report(request).await?.into_inner())
}

async fn rollups(
    mut admin: AdminClient,
    args: RollupsArgs,
) -> Result<UsageRollupsResponse, Status> {
    let granularity = if args.monthly {
        RollupGranularity::Month
    } else {
        RollupGranularity::Day
    };
    let grouping = match args.by {
        RollupBy::TeacherService => RollupGrouping::TeacherAndService,
        RollupBy::Service => RollupGrouping::Service,
        RollupBy::Teacher => RollupGrouping::Teacher,
        RollupBy::School => RollupGrouping::School,
    };
    let request = UsageRollupsRequest {
        school_id: args.school_id,
        granularity: granularity.into(),
        grouping: grouping.into(),
        from_ms: args.from.unwrap_or(0),
        to_ms: args.to.unwrap_or(0),
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
        rows_max: args.rows_max.unwrap_or(0),
    };
    Ok(admin.get_usage_rollups(request).await?.into_inner())
}

async fn suggest(mut admin: AdminClient, args: SuggestArgs) -> Result<SuggestionsResponse, Status> {
    let request = SuggestionsRequest {
        school_id: args.school_id,
        service_type: args.service_type.unwrap_or_default(),
    };
    Ok(admin.get_suggestions(request).await?.into_inner())
}

async fn alerts(mut admin: AdminClient, args: AlertsArgs) -> Result<ListAlertsResponse, Status> {
    let request = ListAlertsRequest {
        school_id: args.school_id,
    };
    Ok(admin.list_alerts(request).await?.into_inner())
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
            "next_billing_anchor_day": self.next_billing_anchor_day,
            "borrowing_enabled": self.borrowing_enabled,
            "pools": self.pools.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "teacher_count": self.teacher_count,
            "self_service_requests": self.self_service_requests,
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

fn list_json<T: ToJson>(items: &[T]) -> Value {
    Value::Array(items.iter().map(ToJson::to_json).collect())
}

impl ToJson for ListSchoolsResponse {
    /// Every page at once, so there is no page token to show.
    fn to_json(&self) -> Value {
        json!({ "schools": list_json(&self.schools) })
    }
}

impl ToJson for RemovedAllocation {
    fn to_json(&self) -> Value {
        self.0.to_json()
    }
}

impl ToJson for ListAllocationsResponse {
    fn to_json(&self) -> Value {
        json!({ "allocations": list_json(&self.allocations) })
    }
}

impl ToJson for BulkSetAllocationsResponse {
    fn to_json(&self) -> Value {
        json!({ "allocations": list_json(&self.allocations) })
    }
}

impl ToJson for ExportSummary {
    fn to_json(&self) -> Value {
        json!({
            "output": self.path.display().to_string(),
            "allocation_count": self.allocation_count,
        })
    }
}

impl ToJson for IncreaseRequest {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "request_id": self.request_id,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "requested_units": self.requested_units,
            "reason": self.reason,
            "status": self.status,
            "approved_units": self.approved_units,
            "decision_reason": self.decision_reason,
            "decided_by": self.decided_by,
            "created_at_ms": self.created_at_ms,
            "decided_at_ms": self.decided_at_ms,
            "expires_at_ms": self.expires_at_ms,
        })
    }
}

impl ToJson for ListRequestsResponse {
    fn to_json(&self) -> Value {
        json!({ "requests": list_json(&self.requests) })
    }
}

/// A proto map as a JSON object with its keys sorted (the map itself has no order).
fn string_map_json(map: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    Value::Object(
        sorted
            .into_iter()
            .map(|(key, value)| (key.clone(), Value::String(value.clone())))
            .collect(),
    )
}

impl ToJson for HistoryEntry {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "seq": self.seq,
            "at_ms": self.at_ms,
            "actor": self.actor,
            "action": self.action,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "reason": self.reason,
            "before": string_map_json(&self.before),
            "after": string_map_json(&self.after),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        })
    }
}

impl ToJson for HistoryListing {
    /// `more` is true when `--limit` stopped the listing before its end.
    fn to_json(&self) -> Value {
        json!({
            "entries": list_json(&self.entries),
            "more": self.more,
        })
    }
}

impl ToJson for VerifyHistoryResponse {
    fn to_json(&self) -> Value {
        json!({
            "intact": self.intact,
            "entries": self.entries,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
        })
    }
}

impl ToJson for UsageRow {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
        })
    }
}

impl ToJson for UsageReport {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "rows": list_json(&self.rows),
            "totals": list_json(&self.totals),
        })
    }
}

impl ToJson for UsageRollup {
    fn to_json(&self) -> Value {
        json!({
            "period_start_ms": self.period_start_ms,
            "period": self.period,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "units": self.units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
            "events": self.events,
        })
    }
}

impl ToJson for UsageRollupsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "rows": list_json(&self.rows),
            "truncated": self.truncated,
        })
    }
}

impl ToJson for IdleSlice {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "spare_units": self.spare_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for RunOutForecast {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "units_per_day": self.units_per_day,
            "run_out_at_ms": self.run_out_at_ms,
            "run_out_day": self.run_out_day,
            "shortfall_units": self.shortfall_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for AllocationMove {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "from_teacher_id": self.from_teacher_id,
            "to_teacher_id": self.to_teacher_id,
            "units": self.units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for ProposedAllocation {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "proposed_units": self.proposed_units,
            "used_units": self.used_units,
        })
    }
}

impl ToJson for SuggestionsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "now_ms": self.now_ms,
            "day_of_cycle": self.day_of_cycle,
            "cycle_days": self.cycle_days,
            "idle_slices": list_json(&self.idle_slices),
            "run_outs": list_json(&self.run_outs),
            "moves": list_json(&self.moves),
            "proposed": list_json(&self.proposed),
            "explanation": self.explanation,
        })
    }
}

impl ToJson for Alert {
    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "threshold_percent": self.threshold_percent,
            "value_units": self.value_units,
            "limit_units": self.limit_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for ListAlertsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "alerts": list_json(&self.alerts),
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
        let rows: Vec<Vec<String>> = self.pools.iter().map(pool_row).collect();
        let mut anchor_day = self.billing_anchor_day.to_string();
        if self.next_billing_anchor_day != 0 {
            anchor_day += &format!(" ({} from the next cycle)", self.next_billing_anchor_day);
        }
        format!(
            "school        {} ({})\ntier          {}\nanchor day    {}\nborrowing     {}\n\
             self-service  {}\nteachers      {}\ncycle         {} .. {}\n\n{}",
            self.school_id,
            self.name,
            self.tier,
            anchor_day,
            on_off(self.borrowing_enabled),
            on_off(self.self_service_requests),
            self.teacher_count,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&POOL_HEADERS, &rows)
        )
    }
}

const POOL_HEADERS: [&str; 6] = [
    "SERVICE",
    "CYCLE",
    "ALLOCATED",
    "BORROWED",
    "AVAILABLE",
    "USED",
];

fn pool_row(pool: &Pool) -> Vec<String> {
    vec![
        pool.service_type.clone(),
        pool.cycle_units.to_string(),
        pool.allocated_units.to_string(),
        pool.borrowed_units.to_string(),
        pool.available_units.to_string(),
        pool.used_units.to_string(),
    ]
}

impl Render for Pool {
    fn render(&self) -> String {
        table(&POOL_HEADERS, &[pool_row(self)])
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

/// "-" for an empty cell, so that columns stay readable.
fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

impl Render for ListSchoolsResponse {
    fn render(&self) -> String {
        let headers = [
            "SCHOOL",
            "NAME",
            "TIER",
            "ANCHOR",
            "BORROWING",
            "SELF-SERVICE",
            "TEACHERS",
            "CYCLE END",
        ];
        let rows: Vec<Vec<String>> = self
            .schools
            .iter()
            .map(|school| {
                vec![
                    school.school_id.clone(),
                    school.name.clone(),
                    school.tier.clone(),
                    school.billing_anchor_day.to_string(),
                    on_off(school.borrowing_enabled).to_string(),
                    on_off(school.self_service_requests).to_string(),
                    school.teacher_count.to_string(),
                    timestamp_text(school.cycle_end_ms),
                ]
            })
            .collect();
        format!(
            "{}\n\n{} school{}",
            table(&headers, &rows),
            rows.len(),
            plural(rows.len())
        )
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

impl Render for RemovedAllocation {
    fn render(&self) -> String {
        let removed = &self.0;
        format!(
            "removed {}/{} {}: its units are back in the pool",
            removed.school_id, removed.teacher_id, removed.service_type
        )
    }
}

/// One slice per row; the school is the one the command named.
fn allocation_table(allocations: &[Allocation]) -> String {
    let headers = [
        "TEACHER",
        "SERVICE",
        "ALLOCATED",
        "USED",
        "RESERVED",
        "PRIORITY",
        "AUTO-RENEW",
        "STATUS",
    ];
    let rows: Vec<Vec<String>> = allocations
        .iter()
        .map(|allocation| {
            vec![
                allocation.teacher_id.clone(),
                allocation.service_type.clone(),
                allocation.allocated_units.to_string(),
                allocation.used_units.to_string(),
                allocation.reserved_units.to_string(),
                allocation.priority.clone(),
                on_off(allocation.auto_renew).to_string(),
                allocation.status.clone(),
            ]
        })
        .collect();
    table(&headers, &rows)
}

impl Render for ListAllocationsResponse {
    fn render(&self) -> String {
        let count = self.allocations.len();
        format!(
            "{}\n\n{count} slice{}",
            allocation_table(&self.allocations),
            plural(count)
        )
    }
}

impl Render for BulkSetAllocationsResponse {
    fn render(&self) -> String {
        let count = self.allocations.len();
        format!(
            "{}\n\nset {count} slice{} in one call",
            allocation_table(&self.allocations),
            plural(count)
        )
    }
}

impl Render for ExportSummary {
    fn render(&self) -> String {
        format!(
            "wrote {} slice{} to {}",
            self.allocation_count,
            plural(self.allocation_count),
            self.path.display()
        )
    }
}

impl Render for IncreaseRequest {
    fn render(&self) -> String {
        let mut lines = vec![
            format!("request   {} ({})", self.request_id, self.school_id),
            format!("teacher   {}", self.teacher_id),
            format!("service   {}", self.service_type),
            format!("asked     {} units: {}", self.requested_units, self.reason),
            format!("filed     {}", timestamp_text(self.created_at_ms)),
            format!("status    {}", self.status),
        ];
        if self.status == "pending" {
            lines.push(format!("expires   {}", timestamp_text(self.expires_at_ms)));
        }
        if self.status == "approved" {
            lines.push(format!("granted   {} units", self.approved_units));
        }
        if self.decided_at_ms != 0 {
            lines.push(format!(
                "decided   {} by {}",
                timestamp_text(self.decided_at_ms),
                cell(&self.decided_by)
            ));
        }
        if !self.decision_reason.is_empty() {
            lines.push(format!("note      {}", self.decision_reason));
        }
        lines.join("\n")
    }
}

impl Render for ListRequestsResponse {
    fn render(&self) -> String {
        let headers = [
            "ID", "TEACHER", "SERVICE", "ASKED", "STATUS", "GRANTED", "FILED", "DECIDED", "BY",
            "REASON", "NOTE",
        ];
        let rows: Vec<Vec<String>> = self
            .requests
            .iter()
            .map(|request| {
                vec![
                    request.request_id.to_string(),
                    request.teacher_id.clone(),
                    request.service_type.clone(),
                    request.requested_units.to_string(),
                    request.status.clone(),
                    request.approved_units.to_string(),
                    timestamp_text(request.created_at_ms),
                    timestamp_text(request.decided_at_ms),
                    cell(&request.decided_by),
                    cell(&request.reason),
                    cell(&request.decision_reason),
                ]
            })
            .collect();
        let count = rows.len();
        format!(
            "{}\n\n{count} request{}",
            table(&headers, &rows),
            plural(count)
        )
    }
}

/// "allocated_units 10 -> 20, priority normal -> high": what an entry changed, keys sorted.
fn change_text(entry: &HistoryEntry) -> String {
    let keys: BTreeSet<&String> = entry.before.keys().chain(entry.after.keys()).collect();
    let changes: Vec<String> = keys
        .into_iter()
        .map(|key| {
            let before = entry.before.get(key).map_or("-", String::as_str);
            let after = entry.after.get(key).map_or("-", String::as_str);
            format!("{key} {before} -> {after}")
        })
        .collect();
    cell(&changes.join(", "))
}

impl Render for HistoryListing {
    fn render(&self) -> String {
        let headers = [
            "SEQ", "TIME", "ACTOR", "ACTION", "TEACHER", "SERVICE", "CHANGE", "REASON",
        ];
        let rows: Vec<Vec<String>> = self
            .entries
            .iter()
            .map(|entry| {
                vec![
                    entry.seq.to_string(),
                    timestamp_text(entry.at_ms),
                    cell(&entry.actor),
                    entry.action.clone(),
                    cell(&entry.teacher_id),
                    cell(&entry.service_type),
                    change_text(entry),
                    cell(&entry.reason),
                ]
            })
            .collect();
        let count = rows.len();
        let mut text = format!(
            "{}\n\n{count} entr{}",
            table(&headers, &rows),
            if count == 1 { "y" } else { "ies" }
        );
        if self.more {
            text += " (--limit reached; more entries follow)";
        }
        text
    }
}

impl Render for VerifyHistoryResponse {
    fn render(&self) -> String {
        if self.intact {
            format!(
                "intact: {} entries, every hash and link matches",
                self.entries
            )
        } else {
            format!(
                "BROKEN: first bad entry {} (of {}): {}",
                self.first_bad_seq, self.entries, self.problem
            )
        }
    }
}

const USAGE_ROW_HEADERS: [&str; 6] = [
    "TEACHER",
    "SERVICE",
    "ALLOCATED",
    "USED",
    "BORROWED",
    "OVERAGE",
];

fn usage_row(row: &UsageRow) -> Vec<String> {
    vec![
        row.teacher_id.clone(),
        row.service_type.clone(),
        row.allocated_units.to_string(),
        row.used_units.to_string(),
        row.borrowed_units.to_string(),
        row.overage_units.to_string(),
    ]
}

impl Render for UsageReport {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self.rows.iter().map(usage_row).collect();
        // A total has no teacher: its rows drop the first column.
        let totals: Vec<Vec<String>> = self
            .totals
            .iter()
            .map(|total| usage_row(total).split_off(1))
            .collect();
        format!(
            "{}  cycle {} .. {}\n\n{}\n\nTOTALS\n{}",
            self.school_id,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&USAGE_ROW_HEADERS, &rows),
            table(&USAGE_ROW_HEADERS[1..], &totals)
        )
    }
}

/// A column a rollup sums over shows "*".
fn or_all(value: &str) -> String {
    if value.is_empty() {
        "*".to_string()
    } else {
        value.to_string()
    }
}

impl Render for UsageRollupsResponse {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.period.clone(),
                    or_all(&r.teacher_id),
                    or_all(&r.service_type),
                    r.units.to_string(),
                    r.borrowed_units.to_string(),
                    r.overage_units.to_string(),
                    r.events.to_string(),
                ]
            })
            .collect();
        let headers = [
            "PERIOD", "TEACHER", "SERVICE", "UNITS", "BORROWED", "OVERAGE", "EVENTS",
        ];
        let mut text = format!("{}\n\n{}", self.school_id, table(&headers, &rows));
        if self.truncated {
            text.push_str("\n\nmore rows matched: narrow the range or raise --rows-max");
        }
        text
    }
}

fn bullets(title: &str, lines: impl Iterator<Item = String>) -> String {
    let lines: Vec<String> = lines.map(|line| format!("- {line}")).collect();
    if lines.is_empty() {
        format!("{title}: none")
    } else {
        format!("{title}\n{}", lines.join("\n"))
    }
}

impl Render for SuggestionsResponse {
    fn render(&self) -> String {
        let proposed: Vec<Vec<String>> = self
            .proposed
            .iter()
            .map(|p| {
                vec![
                    p.teacher_id.clone(),
                    p.service_type.clone(),
                    p.allocated_units.to_string(),
                    p.proposed_units.to_string(),
                    p.used_units.to_string(),
                ]
            })
            .collect();
        let mut text = format!(
            "{}  day {} of {}  cycle {} .. {}\n\n{}\n\n{}\n\n{}",
            self.school_id,
            self.day_of_cycle,
            self.cycle_days,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            bullets(
                "IDLE SLICES",
                self.idle_slices.iter().map(|i| i.explanation.clone())
            ),
            bullets(
                "RUNS OUT",
                self.run_outs.iter().map(|r| r.explanation.clone())
            ),
            bullets("MOVES", self.moves.iter().map(|m| m.explanation.clone())),
        );
        if !proposed.is_empty() {
            let headers = ["TEACHER", "SERVICE", "ALLOCATED", "PROPOSED", "USED"];
            text.push_str(&format!("\n\n{}", table(&headers, &proposed)));
        }
        format!("{text}\n\n{}", self.explanation)
    }
}

impl Render for ListAlertsResponse {
    fn render(&self) -> String {
        if self.alerts.is_empty() {
            return format!("{}: no active alerts", self.school_id);
        }
        let rows: Vec<Vec<String>> = self
            .alerts
            .iter()
            .map(|a| {
                vec![
                    a.kind.clone(),
                    or_all(&a.teacher_id),
                    a.service_type.clone(),
                    format!("{}%", a.threshold_percent),
                    a.value_units.to_string(),
                    a.limit_units.to_string(),
                ]
            })
            .collect();
        let headers = ["KIND", "TEACHER", "SERVICE", "THRESHOLD", "VALUE", "LIMIT"];
        format!(
            "{}\n\n{}\n\n{}",
            self.school_id,
            table(&headers, &rows),
            bullets("WHY", self.alerts.iter().map(|a| a.explanation.clone()))
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation CSV files.
// ---------------------------------------------------------------------------------------------

/// The allocation files of `alloc import`, `alloc bulk` and `alloc export`: parsing, with every
/// line checked and every problem reported, and writing. No I/O here: callers read and write
/// the bytes, so the rules are tested alone.
mod allocation_csv {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    use std::fmt;

    use quotad_core::{ServiceType, TeacherId};
    use quotad_proto::v1::{Allocation, AllocationSpec};

    /// The first line, in this column order: export writes it and import requires it.
    pub const HEADER: [&str; 5] = [
        "teacher_id",
        "service_type",
        "allocated_units",
        "priority",
        "auto_renew",
    ];

    /// Most slices in one file. They all go in one BulkSetAllocations message, which this keeps
    /// well under gRPC's default 4 MiB message limit (a slice is at most about 230 bytes).
    pub const ALLOCATIONS_MAX: usize = 10_000;

    /// Largest file read, so that a wrong file (a log, an image) is refused before parsing.
    pub const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

    /// One bad line and everything wrong with it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct LineError {
        /// 1-based; the header is line 1. A quoted field may span lines: this is the first.
        pub line: u64,
        pub problems: Vec<String>,
    }

    impl fmt::Display for LineError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "line {}: {}", self.line, self.problems.join("; "))
        }
    }

    fn line_error(line: u64, problem: impl Into<String>) -> LineError {
        LineError {
            line,
            problems: vec![problem.into()],
        }
    }

    /// [`parse`] for bytes that should be UTF-8 text.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<AllocationSpec>, Vec<LineError>> {
        match std::str::from_utf8(bytes) {
            Ok(text) => parse(text),
            Err(error) => {
                let valid = bytes.get(..error.valid_up_to()).unwrap_or_default();
                let line = 1 + valid.iter().filter(|&&byte| byte == b'\n').count() as u64;
                Err(vec![line_error(
                    line,
                    "is not UTF-8 text; save the file as \"CSV UTF-8\"",
                )])
            }
        }
    }

    /// The slices of a whole file, or every bad line of it. A UTF-8 byte order mark, blank
    /// lines, CRLF line ends, quoted fields and spaces around fields are accepted.
    pub fn parse(text: &str) -> Result<Vec<AllocationSpec>, Vec<LineError>> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            // A line with too few or too many fields is reported by check_row, not as a
            // reader error that would stop the parsing.
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let mut lines = LineCounter::new(text);
        let mut errors = Vec::new();
        let mut allocations = Vec::new();
        let mut first_line_of_slice = HashMap::new();
        let mut too_many_reported = false;
        let mut header_seen = false;
        for record in reader.records() {
            let (line, record) = match record {
                Ok(record) => (lines.line_at(record.position()), record),
                Err(error) => {
                    let line = lines.line_at(error.position());
                    errors.push(line_error(line, error.to_string()));
                    header_seen = true;
                    continue;
                }
            };
            if !header_seen {
                header_seen = true;
                errors.extend(check_header(&record, line));
                continue;
            }
            match check_row(&record, line, &mut first_line_of_slice) {
                Ok(allocation) if allocations.len() < ALLOCATIONS_MAX => {
                    allocations.push(allocation)
                }
                // Reported once, at the first slice too many; later lines are still checked.
                Ok(_) if !too_many_reported => {
                    too_many_reported = true;
                    errors.push(line_error(
                        line,
                        format!(
                            "more than {ALLOCATIONS_MAX} slices; split the file (each file is \
                             one all-or-nothing call)"
                        ),
                    ));
                }
                Ok(_) => {}
                Err(problems) => errors.push(LineError { line, problems }),
            }
        }
        if !header_seen {
            let expected = HEADER.join(",");
            errors.push(line_error(
                1,
                format!("the file is empty; expected the header {expected}"),
            ));
        }
        if errors.is_empty() && allocations.is_empty() {
            errors.push(line_error(1, "no slices follow the header"));
        }
        if errors.is_empty() {
            Ok(allocations)
        } else {
            errors.sort_by_key(|error| error.line);
            Err(errors)
        }
    }

    fn check_header(header: &csv::StringRecord, line: u64) -> Option<LineError> {
        if header.iter().eq(HEADER) {
            return None;
        }
        Some(line_error(
            line,
            format!(
                "the header is {:?}; expected {:?}",
                header.iter().collect::<Vec<_>>().join(","),
                HEADER.join(",")
            ),
        ))
    }

    /// Line numbers of records, counted from their byte offsets. The reader's own line count
    /// is taken where it began reading a record, before the line breaks it then skips (the
    /// `\n` of a CRLF, blank lines), so it can name the line before the record.
    struct LineCounter<'a> {
        text: &'a [u8],
        /// Where the last count stopped, and the line there; records come in order, so each
        /// count starts where the last one ended and a whole file costs one pass.
        byte: usize,
        line: u64,
    }

    impl<'a> LineCounter<'a> {
        fn new(text: &'a str) -> Self {
            Self {
                text: text.as_bytes(),
                byte: 0,
                line: 1,
            }
        }

        /// The 1-based line the record at `position` starts on (0 if the reader gave none).
        fn line_at(&mut self, position: Option<&csv::Position>) -> u64 {
            let Some(position) = position else {
                return 0;
            };
            let start = usize::try_from(position.byte())
                .unwrap_or(usize::MAX)
                .clamp(self.byte, self.text.len());
            let rest = self.text.get(start..).unwrap_or_default();
            let first = rest
                .iter()
                .position(|&byte| byte != b'\r' && byte != b'\n')
                .map_or(self.text.len(), |offset| start + offset);
            let skipped = self.text.get(self.byte..first).unwrap_or_default();
            self.line += skipped.iter().filter(|&&byte| byte == b'\n').count() as u64;
            self.byte = first;
            self.line
        }
    }

    /// One slice, or everything wrong with its line.
    fn check_row(
        record: &csv::StringRecord,
        line: u64,
        first_line_of_slice: &mut HashMap<(String, String), u64>,
    ) -> Result<AllocationSpec, Vec<String>> {
        let fields: Vec<&str> = record.iter().collect();
        let [teacher_id, service_type, units, priority, auto_renew] = fields.as_slice() else {
            return Err(vec![format!(
                "has {} field{}; expected {} ({})",
                fields.len(),
                if fields.len() == 1 { "" } else { "s" },
                HEADER.len(),
                HEADER.join(",")
            )]);
        };
        let mut problems = Vec::new();
        let teacher_id = noted(&mut problems, TeacherId::parse(teacher_id));
        let service_type = noted(&mut problems, ServiceType::parse(service_type));
        let units = noted(&mut problems, parse_units(units));
        let priority = noted(&mut problems, parse_priority(priority));
        let auto_renew = noted(&mut problems, parse_auto_renew(auto_renew));
        if let (Some(teacher_id), Some(service_type)) = (&teacher_id, &service_type) {
            let key = (teacher_id.to_string(), service_type.to_string());
            match first_line_of_slice.entry(key) {
                Entry::Occupied(first) => problems.push(format!(
                    "teacher {teacher_id} and service type {service_type} are already on line \
                     {}; each pair may appear once",
                    first.get()
                )),
                Entry::Vacant(vacant) => {
                    vacant.insert(line);
                }
            }
        }
        match (teacher_id, service_type, units, priority, auto_renew) {
            (
                Some(teacher_id),
                Some(service_type),
                Some(units),
                Some(priority),
                Some(auto_renew),
            ) if problems.is_empty() => Ok(AllocationSpec {
                teacher_id: teacher_id.to_string(),
                service_type: service_type.to_string(),
                allocated_units: units,
                priority: priority.to_string(),
                auto_renew,
            }),
            _ => Err(problems),
        }
    }

    /// The value, or `None` with its problem noted.
    fn noted<T, E: fmt::Display>(problems: &mut Vec<String>, result: Result<T, E>) -> Option<T> {
        result
            .map_err(|error| problems.push(error.to_string()))
            .ok()
    }

    fn parse_units(text: &str) -> Result<u64, String> {
        if text.is_empty() {
            return Err("allocated_units is empty; expected a whole number of units".to_string());
        }
        text.parse().map_err(|_| {
            format!(
                "allocated_units is {text:?}; expected a whole number of units (0 to {})",
                u64::MAX
            )
        })
    }

    /// The wire name; empty is "normal", sent as such so that a file states every slice in
    /// full rather than depending on what the server has now.
    fn parse_priority(text: &str) -> Result<&'static str, String> {
        match text.to_ascii_lowercase().as_str() {
            "" | "normal" => Ok("normal"),
            "low" => Ok("low"),
            "high" => Ok("high"),
            _ => Err(format!(
                "priority is {text:?}; expected low, normal or high (empty: normal)"
            )),
        }
    }

    fn parse_auto_renew(text: &str) -> Result<bool, String> {
        match text.to_ascii_lowercase().as_str() {
            "" | "false" | "0" | "no" => Ok(false),
            "true" | "1" | "yes" => Ok(true),
            _ => Err(format!(
                "auto_renew is {text:?}; expected true, false, 1, 0, yes or no (empty: false)"
            )),
        }
    }

    /// The header and one line per slice, in the given order: what [`parse`] reads back.
    pub fn write(allocations: &[Allocation]) -> Result<Vec<u8>, csv::Error> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(HEADER)?;
        for allocation in allocations {
            let units = allocation.allocated_units.to_string();
            writer.write_record([
                allocation.teacher_id.as_str(),
                allocation.service_type.as_str(),
                units.as_str(),
                allocation.priority.as_str(),
                if allocation.auto_renew {
                    "true"
                } else {
                    "false"
                },
            ])?;
        }
        writer
            .into_inner()
            .map_err(|error| csv::Error::from(error.into_error()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const GOOD: &str = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                            t1,claude_messages,100,high,true\n\
                            t1,lesson_generation,50,,\n\
                            t2,claude_messages,0,Low,NO\n";

        fn spec(
            teacher: &str,
            service: &str,
            units: u64,
            priority: &str,
            renew: bool,
        ) -> AllocationSpec {
            AllocationSpec {
                teacher_id: teacher.to_string(),
                service_type: service.to_string(),
                allocated_units: units,
                priority: priority.to_string(),
                auto_renew: renew,
            }
        }

        fn allocation(
            teacher: &str,
            service: &str,
            units: u64,
            priority: &str,
            renew: bool,
        ) -> Allocation {
            Allocation {
                school_id: "s1".to_string(),
                teacher_id: teacher.to_string(),
                service_type: service.to_string(),
                allocated_units: units,
                used_units: 7,
                reserved_units: 3,
                priority: priority.to_string(),
                auto_renew: renew,
                status: "active".to_string(),
            }
        }

        fn lines_of(errors: &[LineError]) -> Vec<u64> {
            errors.iter().map(|error| error.line).collect()
        }

        #[test]
        fn a_good_file_parses_with_defaults_filled_in() {
            let parsed = parse(GOOD).unwrap();
            assert_eq!(
                parsed,
                vec![
                    spec("t1", "claude_messages", 100, "high", true),
                    spec("t1", "lesson_generation", 50, "normal", false),
                    spec("t2", "claude_messages", 0, "low", false),
                ]
            );
        }

        #[test]
        fn every_bad_line_is_reported_with_its_number_and_problem() {
            let text = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                        t1,claude_messages,100,high,true\n\
                        t2,Claude,ten,urgent,maybe\n\
                        ,claude_messages,5,,\n\
                        t3,claude_messages\n\
                        t1,claude_messages,20,low,no\n\
                        t4,claude_messages,-1,,\n\
                        t5,claude_messages,18446744073709551616,,\n";
            let errors = parse(text).unwrap_err();
            assert_eq!(lines_of(&errors), vec![3, 4, 5, 6, 7, 8]);
            // Line 3 has four problems, each reported.
            assert_eq!(errors[0].problems.len(), 4, "{:?}", errors[0]);
            let line_3 = errors[0].to_string();
            assert!(
                line_3.starts_with("line 3: service_type contains 'C'"),
                "{line_3}"
            );
            assert!(line_3.contains("allocated_units is \"ten\""), "{line_3}");
            assert!(line_3.contains("priority is \"urgent\""), "{line_3}");
            assert!(line_3.contains("auto_renew is \"maybe\""), "{line_3}");
            assert_eq!(errors[1].problems, vec!["teacher_id must not be empty"]);
            assert!(errors[2].problems[0].starts_with("has 2 fields; expected 5"));
            assert!(
                errors[3].problems[0].contains("already on line 2"),
                "{:?}",
                errors[3]
            );
            assert!(errors[4].problems[0].contains("\"-1\""));
            assert!(errors[5].problems[0].contains("whole number"));
        }

        #[test]
        fn a_wrong_header_is_reported_and_the_rows_still_checked() {
            let errors = parse("teacher,service,units\nt1,claude_messages,x,,\n").unwrap_err();
            assert_eq!(lines_of(&errors), vec![1, 2]);
            assert!(errors[0].problems[0].starts_with("the header is \"teacher,service,units\""));
        }

        #[test]
        fn empty_files_and_header_only_files_are_refused() {
            assert_eq!(lines_of(&parse("").unwrap_err()), vec![1]);
            let errors =
                parse("teacher_id,service_type,allocated_units,priority,auto_renew\n").unwrap_err();
            assert_eq!(errors[0].problems, vec!["no slices follow the header"]);
        }

        #[test]
        fn bom_crlf_blank_lines_and_a_missing_final_newline_are_tolerated() {
            let text = "\u{feff}teacher_id,service_type,allocated_units,priority,auto_renew\r\n\
                        t1,claude_messages,100,high,true\r\n\
                        \r\n\
                        t2,claude_messages,5,,";
            let parsed = parse(text).unwrap();
            assert_eq!(parsed.len(), 2);
            assert_eq!(parsed[0].teacher_id, "t1");
            // Line numbers still count the blank line.
            let bad = text.replace("t2,claude_messages,5", "t2,claude_messages,five");
            assert_eq!(lines_of(&parse(&bad).unwrap_err()), vec![4]);
            assert_eq!(parse(&format!("{GOOD}\n\n")).unwrap().len(), 3);
        }

        #[test]
        fn blank_lines_do_not_shift_line_numbers() {
            let text = "\n\nteacher_id,service_type,allocated_units\n\n\nt1,x,1,,maybe\n";
            let errors = parse(text).unwrap_err();
            assert_eq!(lines_of(&errors), vec![3, 6]);
        }

        #[test]
        fn quoted_fields_are_read_and_lines_counted_across_them() {
            let text =
                "\"teacher_id\",\"service_type\",\"allocated_units\",\"priority\",\"auto_renew\"\n\
                        \"t1\",\"claude_messages\",\"100\",\"high\",\"true\"\n\
                        \"t 2\nx\",claude_messages,5,,\n\
                        t3,claude_messages,5,,oops\n";
            let errors = parse(text).unwrap_err();
            // The quoted field spans lines 3 and 4; the next record starts on line 5.
            assert_eq!(lines_of(&errors), vec![3, 5]);
            let good = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                        \"t1\",\"claude_messages\",\" 100 \",\"\",\"\"\n";
            assert_eq!(
                parse(good).unwrap(),
                vec![spec("t1", "claude_messages", 100, "normal", false)]
            );
        }

        #[test]
        fn export_then_parse_round_trips() {
            let allocations = vec![
                allocation("t1", "claude_messages", 100, "high", true),
                allocation("t1", "lesson_generation", 0, "normal", false),
                allocation("a.b-c:d@e_f", "x", u64::MAX, "low", true),
            ];
            let written = write(&allocations).unwrap();
            let text = String::from_utf8(written).unwrap();
            assert!(
                text.starts_with("teacher_id,service_type,allocated_units,priority,auto_renew\n")
            );
            let parsed = parse(&text).unwrap();
            let expected: Vec<AllocationSpec> = allocations
                .iter()
                .map(|a| {
                    spec(
                        &a.teacher_id,
                        &a.service_type,
                        a.allocated_units,
                        &a.priority,
                        a.auto_renew,
                    )
                })
                .collect();
            assert_eq!(parsed, expected);
            // And the file written again from the parsed slices is the same file.
            let again: Vec<Allocation> = parsed
                .iter()
                .map(|s| {
                    allocation(
                        &s.teacher_id,
                        &s.service_type,
                        s.allocated_units,
                        &s.priority,
                        s.auto_renew,
                    )
                })
                .collect();
            assert_eq!(String::from_utf8(write(&again).unwrap()).unwrap(), text);
        }

        #[test]
        fn bytes_that_are_not_utf8_are_reported_with_their_line() {
            let mut bytes = GOOD.as_bytes().to_vec();
            bytes.extend_from_slice(b"t\xe9,claude_messages,1,,\n");
            let errors = parse_bytes(&bytes).unwrap_err();
            assert_eq!(lines_of(&errors), vec![5]);
            assert!(errors[0].problems[0].contains("not UTF-8"));
        }

        #[test]
        fn more_slices_than_the_limit_are_refused_once() {
            let mut text = HEADER.join(",");
            for teacher in 0..=ALLOCATIONS_MAX + 1 {
                text += &format!("\nt{teacher},claude_messages,1,,");
            }
            let errors = parse(&text).unwrap_err();
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].line, ALLOCATIONS_MAX as u64 + 2);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point.
// ---------------------------------------------------------------------------------------------

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// One line per error on stderr (and one more per bad line of a CSV file).
fn report_error(error: &CliError) {
    for detail in error.details() {
        eprintln!("quotactl: {detail}");
    }
    eprintln!("quotactl: {error}");
}

// One call per run (or a few, for listings): a single-threaded runtime is all it needs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version, printed on stdout.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            // clap's "error: ..." with its usage hint, under this tool's prefix like every error.
            let message = error.render().to_string();
            eprint!(
                "quotactl: {}",
                message.strip_prefix("error: ").unwrap_or(&message)
            );
            return ExitCode::from(2);
        }
    };
    let result = match run(cli).await {
        Ok(output) => write_stdout(&output.stdout).and_then(|()| match output.failure {
            Some(failure) => Err(failure),
            None => Ok(()),
        }),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(&error);
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn settings_needs_at_least_one_setting() {
        assert!(Cli::try_parse_from(["quotactl", "school", "settings", "s1"]).is_err());
        assert!(
            Cli::try_parse_from(["quotactl", "school", "settings", "s1", "--borrowing", "on"])
                .is_ok()
        );
    }

    #[test]
    fn a_token_becomes_a_bearer_header() {
        let mut auth = BearerAuth::new(Some("abc.def-ghi")).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        let header = request.metadata().get("authorization").unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer abc.def-ghi");

        let mut no_auth = BearerAuth::new(None).unwrap();
        let request = no_auth.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn bad_tokens_are_refused_with_exit_code_2() {
        for token in ["", "two words", "line\nbreak", "caf\u{e9}"] {
            let error = BearerAuth::new(Some(token)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{token:?}");
            assert!(!error.to_string().contains(token) || token.is_empty());
        }
    }

    #[test]
    fn times_are_rfc3339_or_milliseconds() {
        assert_eq!(parse_time_ms("1756684800000"), Ok(1_756_684_800_000));
        assert_eq!(parse_time_ms("2025-09-01T00:00:00Z"), Ok(1_756_684_800_000));
        assert_eq!(
            parse_time_ms("2025-09-01T02:00:00+02:00"),
            Ok(1_756_684_800_000)
        );
        assert!(parse_time_ms("yesterday").is_err());
        assert!(parse_time_ms("-5").is_err());
    }

    #[test]
    fn exit_codes_follow_the_scheme() {
        assert_eq!(CliError::Status(Status::not_found("x")).exit_code(), 2);
        assert_eq!(
            CliError::Status(Status::unauthenticated("x")).exit_code(),
            2
        );
        assert_eq!(CliError::Status(Status::unavailable("x")).exit_code(), 3);
        assert_eq!(CliError::Status(Status::unimplemented("x")).exit_code(), 1);
        let broken = CliError::HistoryBroken {
            school_id: "s1".to_string(),
            verdict: VerifyHistoryResponse {
                intact: false,
                entries: 9,
                first_bad_seq: 4,
                problem: "hash mismatch".to_string(),
            },
        };
        assert_eq!(broken.exit_code(), 4);
        assert_eq!(
            broken.to_string(),
            "DataLoss: the audit trail of s1 is broken: first bad entry 4 (of 9): hash mismatch"
        );
    }
}

/// Commands run end to end against an in-process fake `QuotaAdmin` that answers from canned
/// data, because the real server's new calls are being written in parallel against the same
/// proto.
#[cfg(test)]
mod end_to_end {
    use std::sync::{Arc, Mutex};

    use quotad_proto::v1::quota_admin_server::{QuotaAdmin, QuotaAdminServer};
    use quotad_proto::v1::ListHistoryResponse;
    use tonic::{Request, Response};

    use super::*;

    /// What the fake saw, for the tests to check.
    #[derive(Default)]
    struct Seen {
        authorization: Vec<String>,
        bulk_calls: Vec<BulkSetAllocationsRequest>,
        history_page_sizes: Vec<u32>,
    }

    #[derive(Clone, Default)]
    struct FakeAdmin {
        seen: Arc<Mutex<Seen>>,
        allocations: Arc<Mutex<Vec<Allocation>>>,
    }

    /// Entries the fake's history holds, and the most it gives per page, so that listings
    /// take several pages.
    const HISTORY_ENTRIES: u64 = 25;
    const FAKE_PAGE_SIZE_MAX: u32 = 10;

    impl FakeAdmin {
        fn note<T>(&self, request: &Request<T>) {
            let header = request
                .metadata()
                .get("authorization")
                .map_or("(none)".to_string(), |value| {
                    value.to_str().unwrap_or("(not ASCII)").to_string()
                });
            self.seen.lock().unwrap().authorization.push(header);
        }
    }

    fn canned_alerts(school_id: String) -> ListAlertsResponse {
        ListAlertsResponse {
            school_id,
            alerts: vec![Alert {
                kind: "slice_threshold".into(),
                teacher_id: "t1".into(),
                service_type: "claude_messages".into(),
                threshold_percent: 80,
                value_units: 85,
                limit_units: 100,
                explanation: "t1 used 85 of 100 claude_messages units (85%)".into(),
            }],
        }
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    #[tonic::async_trait]
    impl QuotaAdmin for FakeAdmin {
        async fn create_school(
            &self,
            _: Request<CreateSchoolRequest>,
        ) -> Result<Response<School>, Status> {
            unimplemented()
        }
        async fn get_school(
            &self,
            _: Request<GetSchoolRequest>,
        ) -> Result<Response<School>, Status> {
            unimplemented()
        }
        /// Three pages of one school each: "" -> "p2" -> "p3" -> end.
        async fn list_schools(
            &self,
            request: Request<ListSchoolsRequest>,
        ) -> Result<Response<ListSchoolsResponse>, Status> {
            self.note(&request);
            let (school_id, next) = match request.get_ref().page_token.as_str() {
                "" => ("a", "p2"),
                "p2" => ("b", "p3"),
                "p3" => ("c", ""),
                other => return Err(Status::invalid_argument(format!("bad token {other}"))),
            };
            let school = School {
                school_id: school_id.to_string(),
                name: format!("School {school_id}"),
                tier: "k12".to_string(),
                ..School::default()
            };
            Ok(Response::new(ListSchoolsResponse {
                schools: vec![school],
                next_page_token: next.to_string(),
            }))
        }
        async fn update_school_settings(
            &self,
            _: Request<UpdateSchoolSettingsRequest>,
        ) -> Result<Response<School>, Status> {
            unimplemented()
        }
        async fn set_pool(&self, _: Request<SetPoolRequest>) -> Result<Response<Pool>, Status> {
            unimplemented()
        }
        async fn set_allocation(
            &self,
            _: Request<SetAllocationRequest>,
        ) -> Result<Response<Allocation>, Status> {
            unimplemented()
        }
        async fn bulk_set_allocations(
            &self,
            request: Request<BulkSetAllocationsRequest>,
        ) -> Result<Response<BulkSetAllocationsResponse>, Status> {
            self.note(&request);
            let request = request.into_inner();
            let allocations: Vec<Allocation> = request
                .allocations
                .iter()
                .map(|spec| Allocation {
                    school_id: request.school_id.clone(),
                    teacher_id: spec.teacher_id.clone(),
                    service_type: spec.service_type.clone(),
                    allocated_units: spec.allocated_units,
                    priority: spec.priority.clone(),
                    auto_renew: spec.auto_renew,
                    status: "active".to_string(),
                    ..Allocation::default()
                })
                .collect();
            // Newest last, so the export's sorting is tested too.
            *self.allocations.lock().unwrap() = allocations.iter().rev().cloned().collect();
            self.seen.lock().unwrap().bulk_calls.push(request);
            Ok(Response::new(BulkSetAllocationsResponse { allocations }))
        }
        async fn remove_allocation(
            &self,
            _: Request<RemoveAllocationRequest>,
        ) -> Result<Response<Allocation>, Status> {
            unimplemented()
        }
        async fn set_allocation_status(
            &self,
            _: Request<SetAllocationStatusRequest>,
        ) -> Result<Response<Allocation>, Status> {
            unimplemented()
        }
        async fn list_allocations(
            &self,
            request: Request<ListAllocationsRequest>,
        ) -> Result<Response<ListAllocationsResponse>, Status> {
            self.note(&request);
            let allocations = self.allocations.lock().unwrap().clone();
            Ok(Response::new(ListAllocationsResponse { allocations }))
        }
        async fn request_increase(
            &self,
            request: Request<RequestIncreaseRequest>,
        ) -> Result<Response<IncreaseRequest>, Status> {
            let request = request.into_inner();
            Ok(Response::new(IncreaseRequest {
                school_id: request.school_id,
                request_id: 7,
                teacher_id: request.teacher_id,
                service_type: request.service_type,
                requested_units: request.units,
                reason: request.reason,
                status: "pending".to_string(),
                created_at_ms: 1_756_684_800_000,
                expires_at_ms: 1_757_289_600_000,
                ..IncreaseRequest::default()
            }))
        }
        async fn approve_request(
            &self,
            _: Request<ApproveRequestRequest>,
        ) -> Result<Response<IncreaseRequest>, Status> {
            unimplemented()
        }
        async fn reject_request(
            &self,
            _: Request<RejectRequestRequest>,
        ) -> Result<Response<IncreaseRequest>, Status> {
            Err(Status::failed_precondition("request 7 is not pending"))
        }
        async fn list_requests(
            &self,
            _: Request<ListRequestsRequest>,
        ) -> Result<Response<ListRequestsResponse>, Status> {
            unimplemented()
        }
        /// Entries 1..=25, at most 10 per page; the token is the next seq.
        async fn list_history(
            &self,
            request: Request<ListHistoryRequest>,
        ) -> Result<Response<ListHistoryResponse>, Status> {
            let request = request.into_inner();
            self.seen
                .lock()
                .unwrap()
                .history_page_sizes
                .push(request.page_size);
            let first: u64 = if request.page_token.is_empty() {
                1
            } else {
                request.page_token.parse().unwrap()
            };
            let count = u64::from(request.page_size.clamp(1, FAKE_PAGE_SIZE_MAX));
            let last = (first + count - 1).min(HISTORY_ENTRIES);
            let entries = (first..=last)
                .map(|seq| HistoryEntry {
                    school_id: request.school_id.clone(),
                    seq,
                    at_ms: 1_756_684_800_000 + seq as i64,
                    actor: "alice".to_string(),
                    action: "allocation_set".to_string(),
                    teacher_id: "t1".to_string(),
                    service_type: "claude_messages".to_string(),
                    before: [("allocated_units".to_string(), seq.to_string())].into(),
                    after: [("allocated_units".to_string(), (seq + 1).to_string())].into(),
                    ..HistoryEntry::default()
                })
                .collect();
            let next_page_token = if last < HISTORY_ENTRIES {
                (last + 1).to_string()
            } else {
                String::new()
            };
            Ok(Response::new(ListHistoryResponse {
                entries,
                next_page_token,
            }))
        }
        /// Broken for the school named "broken".
        async fn verify_history(
            &self,
            request: Request<VerifyHistoryRequest>,
        ) -> Result<Response<VerifyHistoryResponse>, Status> {
            let broken = request.get_ref().school_id == "broken";
            Ok(Response::new(VerifyHistoryResponse {
                intact: !broken,
                entries: 12,
                first_bad_seq: if broken { 5 } else { 0 },
                problem: if broken {
                    "hash does not match".to_string()
                } else {
                    String::new()
                },
            }))
        }
        async fn get_usage_report(
            &self,
            request: Request<UsageReportRequest>,
        ) -> Result<Response<UsageReport>, Status> {
            let row = |teacher: &str, used| UsageRow {
                teacher_id: teacher.to_string(),
                service_type: "claude_messages".to_string(),
                allocated_units: 100,
                used_units: used,
                ..UsageRow::default()
            };
            let previous = request.get_ref().cycle == i32::from(CycleChoice::Previous);
            Ok(Response::new(UsageReport {
                school_id: request.into_inner().school_id,
                cycle_start_ms: if previous { 1 } else { 1_756_684_800_000 },
                rows: vec![row("t1", 40), row("t2", 2)],
                totals: vec![row("", 42)],
                ..UsageReport::default()
            }))
        }
        async fn get_usage_rollups(
            &self,
            request: Request<UsageRollupsRequest>,
        ) -> Result<Response<UsageRollupsResponse>, Status> {
            let r = request.into_inner();
            // The row echoes what was asked, so that tests see the request.
            Ok(Response::new(UsageRollupsResponse {
                school_id: r.school_id,
                rows: vec![UsageRollup {
                    period: format!(
                        "g{}-b{}-f{}-t{}",
                        r.granularity, r.grouping, r.from_ms, r.to_ms
                    ),
                    teacher_id: r.teacher_id,
                    service_type: r.service_type,
                    units: 12,
                    events: 3,
                    ..UsageRollup::default()
                }],
                truncated: r.rows_max == 1,
            }))
        }
        async fn get_suggestions(
            &self,
            request: Request<SuggestionsRequest>,
        ) -> Result<Response<SuggestionsResponse>, Status> {
            Ok(Response::new(SuggestionsResponse {
                school_id: request.into_inner().school_id,
                day_of_cycle: 18,
                cycle_days: 30,
                run_outs: vec![RunOutForecast {
                    explanation: "t1 runs out on day 19 of 30".into(),
                    ..RunOutForecast::default()
                }],
                moves: vec![AllocationMove {
                    explanation: "60 claude_messages units from t2 (idle) to t1".into(),
                    ..AllocationMove::default()
                }],
                proposed: vec![ProposedAllocation {
                    teacher_id: "t1".into(),
                    service_type: "claude_messages".into(),
                    allocated_units: 90,
                    proposed_units: 150,
                    used_units: 80,
                }],
                explanation: "move 60 units".into(),
                ..SuggestionsResponse::default()
            }))
        }
        async fn list_alerts(
            &self,
            request: Request<ListAlertsRequest>,
        ) -> Result<Response<ListAlertsResponse>, Status> {
            Ok(Response::new(canned_alerts(request.into_inner().school_id)))
        }
    }

    async fn start(fake: FakeAdmin) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(QuotaAdminServer::new(fake))
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }

    async fn quotactl(addr: &str, args: &[&str]) -> Result<Output, CliError> {
        let command_line = ["quotactl", "--addr", addr]
            .into_iter()
            .chain(args.iter().copied());
        run(Cli::try_parse_from(command_line).unwrap()).await
    }

    fn stdout_of(output: Output) -> String {
        assert!(output.failure.is_none());
        String::from_utf8(output.stdout).unwrap()
    }

    #[tokio::test]
    async fn school_list_reads_every_page_and_sends_the_token_each_time() {
        let fake = FakeAdmin::default();
        let addr = start(fake.clone()).await;
        let text = stdout_of(
            quotactl(&addr, &["--token", "t0k", "school", "list"])
                .await
                .unwrap(),
        );
        assert!(text.starts_with("SCHOOL  NAME      TIER"), "{text}");
        assert!(text.contains("\nc       School c  k12"), "{text}");
        assert!(text.ends_with("3 schools\n"), "{text}");
        assert_eq!(
            fake.seen.lock().unwrap().authorization,
            vec!["Bearer t0k"; 3]
        );

        let json = stdout_of(
            quotactl(&addr, &["--json", "school", "list"])
                .await
                .unwrap(),
        );
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["schools"][2]["school_id"], "c");
        assert_eq!(fake.seen.lock().unwrap().authorization[3], "(none)");
    }

    #[tokio::test]
    async fn import_sends_one_call_and_export_then_import_round_trips() {
        let fake = FakeAdmin::default();
        let addr = start(fake.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.csv");
        std::fs::write(
            &file,
            "teacher_id,service_type,allocated_units,priority,auto_renew\n\
             t2,claude_messages,5,,\nt1,claude_messages,100,high,yes\n",
        )
        .unwrap();
        let file_arg = file.to_str().unwrap();
        let text = stdout_of(
            quotactl(&addr, &["alloc", "import", "s1", file_arg])
                .await
                .unwrap(),
        );
        assert!(text.ends_with("set 2 slices in one call\n"), "{text}");

        let exported = quotactl(&addr, &["alloc", "export", "s1"]).await.unwrap();
        let exported = stdout_of(exported);
        assert_eq!(
            exported,
            "teacher_id,service_type,allocated_units,priority,auto_renew\n\
             t1,claude_messages,100,high,true\nt2,claude_messages,5,normal,false\n"
        );
        let out = dir.path().join("out.csv");
        let out_arg = out.to_str().unwrap();
        let summary = quotactl(&addr, &["alloc", "export", "s1", "--output", out_arg]).await;
        assert!(stdout_of(summary.unwrap()).starts_with("wrote 2 slices to "));
        quotactl(
            &addr,
            &[
                "alloc", "bulk", "s1", "--file", out_arg, "--reason", "again",
            ],
        )
        .await
        .unwrap();

        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.bulk_calls.len(), 2);
        let mut first = seen.bulk_calls[0].allocations.clone();
        first.sort_by(|a, b| a.teacher_id.cmp(&b.teacher_id));
        assert_eq!(first, seen.bulk_calls[1].allocations);
        assert_eq!(seen.bulk_calls[1].reason, "again");
    }

    #[tokio::test]
    async fn a_bad_file_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.csv");
        std::fs::write(
            &file,
            "teacher_id,service_type,allocated_units,priority,auto_renew\n\
             t1,claude_messages,ten,,\nt2,claude_messages,5,,\nt3,Claude,5,,\n",
        )
        .unwrap();
        // Nothing listens on port 1: reaching the server would be a Connect error instead.
        let error = quotactl(
            "http://127.0.0.1:1",
            &["alloc", "import", "s1", file.to_str().unwrap()],
        )
        .await
        .err()
        .unwrap();
        assert_eq!(error.exit_code(), 2);
        let details = error.details();
        assert_eq!(details.len(), 2, "{details:?}");
        assert!(
            details[0].ends_with(
                "bad.csv line 2: allocated_units is \"ten\"; \
                 expected a whole number of units (0 to 18446744073709551615)"
            ),
            "{details:?}"
        );
        assert!(
            details[1].contains("bad.csv line 4: service_type contains 'C'"),
            "{details:?}"
        );
        assert!(error
            .to_string()
            .ends_with("bad.csv: 2 bad lines; nothing was sent to the server"));
    }

    #[tokio::test]
    async fn history_list_pages_and_stops_at_the_limit() {
        let fake = FakeAdmin::default();
        let addr = start(fake.clone()).await;
        let json = stdout_of(
            quotactl(&addr, &["--json", "history", "list", "s1"])
                .await
                .unwrap(),
        );
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["entries"].as_array().unwrap().len(), 25);
        assert_eq!(value["more"], false);
        assert_eq!(value["entries"][0]["after"]["allocated_units"], "2");

        let text = quotactl(
            &addr,
            &[
                "history",
                "list",
                "s1",
                "--limit",
                "12",
                "--from",
                "2025-09-01T00:00:00Z",
            ],
        );
        let text = stdout_of(text.await.unwrap());
        assert!(text.contains("allocated_units 12 -> 13"), "{text}");
        assert!(!text.contains("allocated_units 13 -> 14"), "{text}");
        assert!(
            text.ends_with("12 entries (--limit reached; more entries follow)\n"),
            "{text}"
        );
        let sizes = fake.seen.lock().unwrap().history_page_sizes.clone();
        assert_eq!(sizes, vec![PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, 12, 2]);
    }

    #[tokio::test]
    async fn a_broken_history_is_exit_code_4() {
        let addr = start(FakeAdmin::default()).await;
        let intact = stdout_of(quotactl(&addr, &["history", "verify", "s1"]).await.unwrap());
        assert_eq!(intact, "intact: 12 entries, every hash and link matches\n");

        let output = quotactl(&addr, &["history", "verify", "broken"])
            .await
            .unwrap();
        assert!(output.stdout.is_empty());
        let failure = output.failure.unwrap();
        assert_eq!(failure.exit_code(), 4);
        assert!(failure
            .to_string()
            .contains("first bad entry 5 (of 12): hash does not match"));

        let output = quotactl(&addr, &["--json", "history", "verify", "broken"])
            .await
            .unwrap();
        let value: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(value["first_bad_seq"], 5);
        assert_eq!(output.failure.unwrap().exit_code(), 4);
    }

    #[tokio::test]
    async fn report_requests_and_server_refusals() {
        let addr = start(FakeAdmin::default()).await;
        let report = stdout_of(quotactl(&addr, &["report", "s1"]).await.unwrap());
        assert!(
            report.contains("t2       claude_messages  100        2"),
            "{report}"
        );
        assert!(
            report.contains("TOTALS\nSERVICE          ALLOCATED  USED"),
            "{report}"
        );
        assert!(
            report.contains("\nclaude_messages  100        42"),
            "{report}"
        );

        let filed = quotactl(
            &addr,
            &[
                "request",
                "file",
                "s1",
                "t1",
                "claude_messages",
                "50",
                "--reason",
                "exams",
            ],
        );
        let filed = stdout_of(filed.await.unwrap());
        assert!(filed.contains("asked     50 units: exams"), "{filed}");
        assert!(filed.contains("expires   2025-09-08T00:00:00Z"), "{filed}");

        let refused = quotactl(&addr, &["request", "reject", "s1", "7", "--reason", "no"]).await;
        let refused = refused.err().unwrap();
        assert_eq!(
            refused.to_string(),
            "FailedPrecondition: request 7 is not pending"
        );
        assert_eq!(refused.exit_code(), 2);
    }

    #[tokio::test]
    async fn rollups_suggest_and_alerts_send_what_was_asked_and_show_it() {
        let addr = start(FakeAdmin::default()).await;
        let args = [
            "rollups",
            "s1",
            "--monthly",
            "--by",
            "school",
            "--from",
            "2026-10-01",
            "--to",
            "2026-11-01",
            "--teacher",
            "t1",
            "--rows-max",
            "1",
        ];
        let text = stdout_of(quotactl(&addr, &args).await.unwrap());
        let asked = format!(
            "g1-b3-f{}-t{}",
            parse_date_ms("2026-10-01").unwrap(),
            parse_date_ms("2026-11-01").unwrap()
        );
        assert!(text.contains(&format!("{asked}  t1       *")), "{text}");
        assert!(text.contains("narrow the range"), "{text}");
        assert_eq!(parse_date_ms("2026-10-01").unwrap(), 1_790_812_800_000);
        assert!(parse_date_ms("2026-13-01").is_err());

        let text = stdout_of(quotactl(&addr, &["suggest", "s1"]).await.unwrap());
        assert!(text.contains("s1  day 18 of 30"), "{text}");
        assert!(text.contains("IDLE SLICES: none"), "{text}");
        assert!(
            text.contains("RUNS OUT\n- t1 runs out on day 19 of 30"),
            "{text}"
        );
        assert!(
            text.contains("t1       claude_messages  90         150"),
            "{text}"
        );

        let text = stdout_of(quotactl(&addr, &["alerts", "s1"]).await.unwrap());
        assert!(
            text.contains("slice_threshold  t1       claude_messages  80%"),
            "{text}"
        );
        let json = stdout_of(quotactl(&addr, &["--json", "alerts", "s1"]).await.unwrap());
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["alerts"][0]["value_units"], 85);
    }
}

/// `quotactl sync`: a JSON-lines file of usage events, every line checked
/// first (all problems reported with their line numbers, nothing sent), then
/// one SyncUsage call; the answer is one result per line.
mod usage_sync {
    use std::path::Path;

    use quotad_proto::v1::{
        SyncResult, SyncStatus, SyncUsageRequest, SyncUsageResponse, UsageEvent,
    };
    use serde::Deserialize;
    use serde_json::{json, Value};

    use super::{CliError, GateClient, Render, SyncArgs, ToJson};

    /// The largest file read: 1,000 events of the longest fields fit in well under it.
    const FILE_BYTES_MAX: u64 = 2 * 1024 * 1024;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        event_id: String,
        teacher_id: String,
        service_type: String,
        units: u64,
        occurred_at_ms: i64,
        #[serde(default)]
        model: String,
    }

    pub async fn send(mut gate: GateClient, args: SyncArgs) -> Result<SyncUsageResponse, CliError> {
        let events = parse(&args.file)?;
        let request = SyncUsageRequest {
            school_id: args.school_id,
            events,
        };
        Ok(gate.sync_usage(request).await?.into_inner())
    }

    fn parse(path: &Path) -> Result<Vec<UsageEvent>, CliError> {
        let read_error = |error| CliError::ReadFile {
            path: path.to_path_buf(),
            error,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > FILE_BYTES_MAX {
            return Err(CliError::Usage(format!(
                "{} is larger than {FILE_BYTES_MAX} bytes; split it into several files",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let mut events = Vec::new();
        let mut problems = Vec::new();
        for (index, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<Line>(line) {
                Ok(l) => events.push(UsageEvent {
                    event_id: l.event_id,
                    teacher_id: l.teacher_id,
                    service_type: l.service_type,
                    units: l.units,
                    model: l.model,
                    occurred_at_ms: l.occurred_at_ms,
                }),
                Err(error) => problems.push(format!("line {}: {error}", index + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(CliError::Usage(format!(
                "{}: nothing was sent\n{}",
                path.display(),
                problems.join("\n")
            )));
        }
        Ok(events)
    }

    fn status_text(result: &SyncResult) -> &'static str {
        match result.status() {
            SyncStatus::Accepted => "accepted",
            SyncStatus::AcceptedOverQuota => "accepted_over_quota",
            SyncStatus::Duplicate => "duplicate",
            SyncStatus::Rejected | SyncStatus::Unspecified => "rejected",
        }
    }

    impl ToJson for SyncUsageResponse {
        fn to_json(&self) -> Value {
            let results: Vec<Value> = self
                .results
                .iter()
                .map(|r| {
                    json!({
                        "event_id": r.event_id,
                        "status": status_text(r),
                        "reason": r.reason().as_str_name(),
                        "message": r.message,
                        "overage_units": r.overage_units,
                        "cycle_start_ms": r.cycle_start_ms,
                    })
                })
                .collect();
            json!({ "results": results })
        }
    }

    impl Render for SyncUsageResponse {
        fn render(&self) -> String {
            let count = |status: &str| {
                self.results
                    .iter()
                    .filter(|r| status_text(r) == status)
                    .count()
            };
            let mut text = format!(
                "{} accepted, {} accepted over quota, {} duplicates, {} rejected",
                count("accepted"),
                count("accepted_over_quota"),
                count("duplicate"),
                count("rejected")
            );
            for r in self.results.iter().filter(|r| status_text(r) == "rejected") {
                text.push_str(&format!(
                    "\n{}: rejected ({}): {}",
                    r.event_id,
                    r.reason().as_str_name(),
                    r.message
                ));
            }
            text
        }
    }
}
