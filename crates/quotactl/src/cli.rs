//! The command line: one clap subcommand group per resource (`school`, `pool`, `alloc`,
//! `request`, `history`) and one subcommand per hot-path call or report, with shared argument
//! groups ([`SliceRef`], [`TeacherRef`], [`Audit`]) and the parsers of values clap does not know
//! (`--pool`, times, days). Nothing here talks to the server.

use std::path::PathBuf;

use chrono::DateTime;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::error::EXIT_CODES_HELP;

#[derive(Parser, Debug)]
#[command(version, about = "Command-line client for quotad", after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// The quotad server.
    #[arg(
        long,
        global = true,
        env = "QUOTAD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// Sent with every call as `authorization: Bearer <TOKEN>`.
    #[arg(long, global = true, env = "QUOTAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the response as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Timeout of each call, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
pub enum SchoolCommand {
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
pub enum PoolCommand {
    /// Set the units bought for the cycle for one service type (adds the type if new).
    Set(PoolSetArgs),
}

#[derive(Subcommand, Debug)]
pub enum AllocCommand {
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
    /// A file states each slice in full: an empty cell sets the default, it does not keep what
    /// the slice has now (as leaving --priority or --auto-renew out of `alloc set` does).
    ///
    /// Every bad line is reported with its number (the header is line 1), and nothing is sent
    /// unless every line is right.
    Import(AllocImportArgs),
    /// Write a school's slices as CSV, in the format `alloc import` reads.
    ///
    /// The CSV goes to stdout unless --output is given. With --json, stdout gets a JSON array
    /// instead, one object per slice with the CSV's columns as keys; with --json and --output the
    /// file is still CSV and the summary is JSON. A slice's status (suspended or active) and
    /// usage are not part of the export.
    Export(AllocExportArgs),
}

#[derive(Subcommand, Debug)]
pub enum RequestCommand {
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
pub enum HistoryCommand {
    /// List a school's audit trail, oldest first, every page.
    List(HistoryListArgs),
    /// Recompute the hash chain of a school's audit trail (exit code 4 when it is broken).
    Verify(HistoryVerifyArgs),
}

/// Who changes something and why, kept in the server's audit trail.
#[derive(Args, Debug)]
pub struct Audit {
    /// Why the change is made.
    #[arg(long)]
    pub reason: Option<String>,
    /// Who makes the change (default: $USER; the server records a token's subject instead).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    pub changed_by: Option<String>,
}

/// One teacher's slice of one service type.
#[derive(Args, Debug)]
pub struct SliceRef {
    /// The school.
    pub school_id: String,
    /// The teacher, within the school.
    pub teacher_id: String,
    /// The service type of the slice, e.g. claude_messages.
    pub service_type: String,
}

/// One teacher.
#[derive(Args, Debug)]
pub struct TeacherRef {
    /// The school.
    pub school_id: String,
    /// The teacher, within the school.
    pub teacher_id: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Tier {
    Preschool,
    K12,
    Individual,
}

impl Tier {
    pub fn wire_name(self) -> &'static str {
        match self {
            Tier::Preschool => "preschool",
            Tier::K12 => "k12",
            Tier::Individual => "individual",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl Priority {
    pub fn wire_name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// `--borrowing on|off` and the like.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn is_on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum RequestStatus {
    Pending,
    Approved,
    Rejected,
    Expired,
}

impl RequestStatus {
    pub fn wire_name(self) -> &'static str {
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
pub struct PoolArg {
    pub service_type: String,
    pub cycle_units: u64,
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
pub struct SchoolCreateArgs {
    /// The new school's id.
    pub school_id: String,
    /// The school's name.
    #[arg(long)]
    pub name: String,
    /// The school's plan.
    #[arg(long, value_enum)]
    pub tier: Tier,
    /// Day of month (1-28, UTC) each billing cycle starts on (server default: 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=28))]
    pub anchor_day: Option<u32>,
    /// Let high priority teachers borrow unallocated units when their slice is exhausted.
    #[arg(long)]
    pub borrowing: bool,
    /// Let teachers file requests for more units (`request file`).
    #[arg(long)]
    pub self_service: bool,
    /// A pool to create, as SERVICE=UNITS; repeat for several (none: the server's default types
    /// with 0 units).
    #[arg(long = "pool", value_name = "SERVICE=UNITS", value_parser = parse_pool_arg)]
    pub pools: Vec<PoolArg>,
    /// Who creates the school (default: $USER).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    pub changed_by: Option<String>,
}

#[derive(Args, Debug)]
pub struct SchoolGetArgs {
    /// The school.
    pub school_id: String,
}

#[derive(Args, Debug)]
pub struct SchoolListArgs {
    /// Only the schools of this plan.
    #[arg(long, value_enum)]
    pub tier: Option<Tier>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("setting").required(true).multiple(true)))]
pub struct SchoolSettingsArgs {
    /// The school.
    pub school_id: String,
    /// Let high priority teachers borrow unallocated units when their slice is exhausted.
    #[arg(long, value_enum, group = "setting")]
    pub borrowing: Option<OnOff>,
    /// Let teachers file requests for more units.
    #[arg(long, value_enum, group = "setting")]
    pub self_service: Option<OnOff>,
    /// Day of month (1-28, UTC) billing cycles start on; takes effect at the next rollover.
    #[arg(long, group = "setting", value_parser = clap::value_parser!(u32).range(1..=28))]
    pub anchor_day: Option<u32>,
    /// The school's new name.
    #[arg(long, group = "setting")]
    pub name: Option<String>,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct PoolSetArgs {
    /// The school.
    pub school_id: String,
    /// The service type, e.g. claude_messages (added if new).
    pub service_type: String,
    /// Units bought per billing cycle.
    pub cycle_units: u64,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct AllocSetArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    /// Units of the slice per cycle.
    pub units: u64,
    /// Unset: keep the slice's current priority ("normal" for a new slice).
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// on: the slice keeps its units at cycle rollover; off: they return to the pool.
    /// `--auto-renew` alone is on. Unset: keep the slice's current setting (off for a new slice).
    #[arg(
        long,
        value_enum,
        num_args = 0..=1,
        default_missing_value = "on",
        value_name = "on|off"
    )]
    pub auto_renew: Option<OnOff>,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct AllocSliceArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct AllocListArgs {
    /// The school.
    pub school_id: String,
    /// Only this teacher's slices.
    #[arg(long = "teacher", value_name = "TEACHER")]
    pub teacher_id: Option<String>,
    /// Only slices of this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    pub service_type: Option<String>,
}

#[derive(Args, Debug)]
pub struct AllocBulkArgs {
    /// The school.
    pub school_id: String,
    /// The CSV file (see `alloc import --help` for its format).
    #[arg(long, value_name = "FILE.csv")]
    pub file: PathBuf,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct AllocImportArgs {
    /// The school.
    pub school_id: String,
    /// The CSV file.
    #[arg(value_name = "FILE.csv")]
    pub file: PathBuf,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct AllocExportArgs {
    /// The school.
    pub school_id: String,
    /// Write the CSV to this file (replaced if it exists) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RequestFileArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    /// Units asked for, on top of the slice.
    pub units: u64,
    /// Why the teacher needs them (the approver sees it).
    #[arg(long)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct RequestApproveArgs {
    /// The school.
    pub school_id: String,
    /// The request's id.
    #[arg(value_name = "ID")]
    pub request_id: u64,
    /// Units to grant, fewer than asked to grant part (default: all that was asked).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub units: Option<u64>,
    #[command(flatten)]
    pub audit: Audit,
}

#[derive(Args, Debug)]
pub struct RequestRejectArgs {
    /// The school.
    pub school_id: String,
    /// The request's id.
    #[arg(value_name = "ID")]
    pub request_id: u64,
    /// Why the request is refused (the teacher sees it).
    #[arg(long)]
    pub reason: String,
    /// Who refuses (default: $USER; the server records a token's subject instead).
    #[arg(long = "by", value_name = "WHO", env = "USER", hide_env_values = true)]
    pub changed_by: Option<String>,
}

#[derive(Args, Debug)]
pub struct RequestListArgs {
    /// The school.
    pub school_id: String,
    /// Only this teacher's requests.
    #[arg(long = "teacher", value_name = "TEACHER")]
    pub teacher_id: Option<String>,
    /// Only requests in this state.
    #[arg(long, value_enum)]
    pub status: Option<RequestStatus>,
}

#[derive(Args, Debug)]
pub struct HistoryListArgs {
    /// The school.
    pub school_id: String,
    /// Only changes to this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    pub teacher_id: Option<String>,
    /// Only changes to this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    pub service_type: Option<String>,
    /// Only changes at or after this time: RFC 3339 or milliseconds since the Unix epoch.
    #[arg(long = "from", value_name = "TIME", value_parser = parse_time_ms)]
    pub from_ms: Option<i64>,
    /// Only changes up to this time: RFC 3339 or milliseconds since the Unix epoch.
    #[arg(long = "to", value_name = "TIME", value_parser = parse_time_ms)]
    pub to_ms: Option<i64>,
    /// Stop after this many entries (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
}

#[derive(Args, Debug)]
pub struct HistoryVerifyArgs {
    /// The school.
    pub school_id: String,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The school.
    pub school_id: String,
    /// Only this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    pub teacher_id: Option<String>,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    pub service_type: Option<String>,
    /// The previous billing cycle instead of the current one.
    #[arg(long)]
    pub previous: bool,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    /// Units to charge.
    pub units: u64,
    /// Idempotency key; reuse one to retry safely (default: a fresh unique id).
    #[arg(long)]
    pub event_id: Option<String>,
    /// The AI model used.
    #[arg(long)]
    pub model: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    /// Units that would be charged.
    pub units: u64,
    /// Preview a Reserve (a hold never borrows) instead of a Consume.
    #[arg(long)]
    pub reserve: bool,
}

#[derive(Args, Debug)]
pub struct ReserveArgs {
    #[command(flatten)]
    pub slice: SliceRef,
    /// Units to hold.
    #[arg(value_name = "ESTIMATE")]
    pub estimate_units: u64,
    /// Idempotency key of the hold; commit and release name it.
    #[arg(long)]
    pub reservation_id: String,
    /// How long the hold lives (default: the server's).
    #[arg(long)]
    pub ttl_ms: Option<u64>,
    /// The AI model used.
    #[arg(long)]
    pub model: Option<String>,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub teacher: TeacherRef,
    /// The reservation given to reserve.
    pub reservation_id: String,
    /// Units really used (charged even above the estimate).
    pub actual_units: u64,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub teacher: TeacherRef,
    /// The reservation given to reserve.
    pub reservation_id: String,
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    pub teacher: TeacherRef,
}

/// What each rollup row sums over, besides its period.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum RollupBy {
    TeacherService,
    Service,
    Teacher,
    School,
}

#[derive(Args, Debug)]
pub struct RollupsArgs {
    /// The school.
    pub school_id: String,
    /// Months instead of days.
    #[arg(long)]
    pub monthly: bool,
    /// What each row sums over, besides its period.
    #[arg(long, value_enum, default_value = "teacher-service")]
    pub by: RollupBy,
    /// The first day, YYYY-MM-DD (UTC); default: the start of the current cycle.
    #[arg(long, value_parser = parse_date_ms)]
    pub from: Option<i64>,
    /// The day after the last one, YYYY-MM-DD (UTC); default: up to now.
    #[arg(long, value_parser = parse_date_ms)]
    pub to: Option<i64>,
    /// Only this teacher.
    #[arg(long = "teacher", value_name = "TEACHER")]
    pub teacher_id: Option<String>,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    pub service_type: Option<String>,
    /// At most this many rows (default 1000, at most 10000).
    #[arg(long)]
    pub rows_max: Option<u32>,
}

#[derive(Args, Debug)]
pub struct SuggestArgs {
    /// The school.
    pub school_id: String,
    /// Only this service type.
    #[arg(long = "service", value_name = "SERVICE")]
    pub service_type: Option<String>,
}

#[derive(Args, Debug)]
pub struct AlertsArgs {
    /// The school.
    pub school_id: String,
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
pub struct SyncArgs {
    #[arg(long)]
    pub school_id: String,
    /// One JSON object per line: {"event_id", "teacher_id", "service_type", "units",
    /// "occurred_at_ms", "model" (optional)}. At most the server's batch size (1,000 by default).
    pub file: PathBuf,
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
}
