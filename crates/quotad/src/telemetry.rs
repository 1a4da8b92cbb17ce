//! Metric names and how they are recorded, in one place. Names follow
//! Prometheus conventions: base units, `_total` for counters, `_seconds` for
//! durations, `_bytes` for sizes. Every label has a bounded set of values (see
//! the README's Metrics section): call, outcome, rpc and code come from fixed
//! lists here, service types are capped at [`SERVICE_LABELS_MAX`], and the
//! per-school pool gauges at the `metrics_schools_max` setting.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{counter, gauge, histogram, Counter, Histogram};

use quotad_core::{SchoolId, ServiceType};

pub const DECISIONS_TOTAL: &str = "quotad_decisions_total";
pub const GRPC_REQUEST_DURATION_SECONDS: &str = "quotad_grpc_request_duration_seconds";
pub const WAL_FLUSH_DURATION_SECONDS: &str = "quotad_wal_flush_duration_seconds";
pub const WAL_FLUSH_BATCH_RECORDS: &str = "quotad_wal_flush_batch_records";
pub const WAL_FLUSH_BATCH_BYTES: &str = "quotad_wal_flush_batch_bytes";
pub const WAL_RECORDS_TOTAL: &str = "quotad_wal_records_total";
pub const WAL_POISONED: &str = "quotad_wal_poisoned";
pub const ACTORS_ALIVE: &str = "quotad_actors_alive";
pub const ACTOR_RESTARTS_TOTAL: &str = "quotad_actor_restarts_total";
pub const SNAPSHOT_DURATION_SECONDS: &str = "quotad_snapshot_duration_seconds";
pub const SNAPSHOT_WAL_SEQ: &str = "quotad_snapshot_wal_seq";
pub const WAL_DURABLE_SEQ: &str = "quotad_wal_durable_seq";
pub const ROLLOVERS_TOTAL: &str = "quotad_cycle_rollovers_total";
pub const PG_SNAPSHOT_DURATION_SECONDS: &str = "quotad_postgres_snapshot_duration_seconds";
pub const PG_SNAPSHOT_WAL_SEQ: &str = "quotad_postgres_snapshot_wal_seq";
pub const PG_SNAPSHOT_LAG_RECORDS: &str = "quotad_postgres_snapshot_lag_records";
pub const PG_SNAPSHOT_LAG_SECONDS: &str = "quotad_postgres_snapshot_lag_seconds";
pub const PG_SNAPSHOT_FAILURES_TOTAL: &str = "quotad_postgres_snapshot_failures_total";
pub const PG_SNAPSHOT_ROWS_TOTAL: &str = "quotad_postgres_snapshot_rows_total";
/// Pool gauges per school and service type, rendered by [`render_pools`].
pub const POOL_CYCLE_UNITS: &str = "quotad_pool_cycle_units";
pub const POOL_ALLOCATED_UNITS: &str = "quotad_pool_allocated_units";
pub const POOL_USED_UNITS: &str = "quotad_pool_used_units";
pub const POOL_SCHOOLS_OMITTED: &str = "quotad_pool_schools_omitted";

/// Every metric quotad exports (the dashboard test checks its queries against it).
pub const ALL_NAMES: &[&str] = &[
    DECISIONS_TOTAL,
    GRPC_REQUEST_DURATION_SECONDS,
    WAL_FLUSH_DURATION_SECONDS,
    WAL_FLUSH_BATCH_RECORDS,
    WAL_FLUSH_BATCH_BYTES,
    WAL_RECORDS_TOTAL,
    WAL_POISONED,
    ACTORS_ALIVE,
    ACTOR_RESTARTS_TOTAL,
    SNAPSHOT_DURATION_SECONDS,
    SNAPSHOT_WAL_SEQ,
    WAL_DURABLE_SEQ,
    ROLLOVERS_TOTAL,
    PG_SNAPSHOT_DURATION_SECONDS,
    PG_SNAPSHOT_WAL_SEQ,
    PG_SNAPSHOT_LAG_RECORDS,
    PG_SNAPSHOT_LAG_SECONDS,
    PG_SNAPSHOT_FAILURES_TOTAL,
    PG_SNAPSHOT_ROWS_TOTAL,
    POOL_CYCLE_UNITS,
    POOL_ALLOCATED_UNITS,
    POOL_USED_UNITS,
    POOL_SCHOOLS_OMITTED,
    ALERTS_ACTIVE,
    ALERTS_FAILURES_TOTAL,
    RLS_REQUESTS_TOTAL,
    RLS_UNKNOWN_SLICE_TOTAL,
    CONNECTIONS_OPEN,
    CONNECTIONS_REFUSED_TOTAL,
];

/// Distinct service types that get their own `service` label on decisions;
/// further ones are counted under [`OTHER_SERVICE_LABEL`]. Service types are
/// per school (at most 32 each), so across schools their names are not bounded.
pub const SERVICE_LABELS_MAX: usize = 64;
/// Cannot be a service type's name (parentheses are not allowed in one).
pub const OTHER_SERVICE_LABEL: &str = "(other)";
pub const ALERTS_ACTIVE: &str = "quotad_alerts_active";
pub const ALERTS_FAILURES_TOTAL: &str = "quotad_alerts_failures_total";
pub const RLS_REQUESTS_TOTAL: &str = "quotad_rls_requests_total";
pub const RLS_UNKNOWN_SLICE_TOTAL: &str = "quotad_rls_unknown_slice_total";
pub const CONNECTIONS_OPEN: &str = "quotad_connections_open";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "quotad_connections_refused_total";
/// The `reason` label values of [`CONNECTIONS_REFUSED_TOTAL`].
pub const CONNECTION_REFUSALS: [&str; 3] =
    ["connections_max", "connections_per_ip_max", "tls_handshake"];

/// Histogram buckets for request and flush latencies, in seconds: 25 us to 1 s.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Buckets for the number of records one flush covers.
pub const BATCH_BUCKETS_RECORDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];
/// Buckets for the bytes one flush writes: 64 B to 16 MiB.
pub const BATCH_BUCKETS_BYTES: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// Every gRPC method quotad serves, as (service, method): the fixed set of
/// the `grpc_service` and `rpc` labels. A test checks it against the .proto
/// files, so a new RPC cannot be left out.
pub const RPCS: &[(&str, &str)] = &[
    // The hot path first: the lookup scans in order.
    ("quotad.v1.QuotaGate", "Consume"),
    (
        "envoy.service.ratelimit.v3.RateLimitService",
        "ShouldRateLimit",
    ),
    ("quotad.v1.QuotaGate", "Check"),
    ("quotad.v1.QuotaGate", "Reserve"),
    ("quotad.v1.QuotaGate", "Commit"),
    ("quotad.v1.QuotaGate", "Release"),
    ("quotad.v1.QuotaGate", "GetUsage"),
    ("quotad.v1.QuotaGate", "SyncUsage"),
    ("quotad.v1.QuotaGate", "BulkIncrement"),
    ("quotad.v1.QuotaAdmin", "CreateSchool"),
    ("quotad.v1.QuotaAdmin", "GetSchool"),
    ("quotad.v1.QuotaAdmin", "ListSchools"),
    ("quotad.v1.QuotaAdmin", "UpdateSchoolSettings"),
    ("quotad.v1.QuotaAdmin", "SetPool"),
    ("quotad.v1.QuotaAdmin", "SetAllocation"),
    ("quotad.v1.QuotaAdmin", "BulkSetAllocations"),
    ("quotad.v1.QuotaAdmin", "RemoveAllocation"),
    ("quotad.v1.QuotaAdmin", "SetAllocationStatus"),
    ("quotad.v1.QuotaAdmin", "ListAllocations"),
    ("quotad.v1.QuotaAdmin", "RequestIncrease"),
    ("quotad.v1.QuotaAdmin", "ApproveRequest"),
    ("quotad.v1.QuotaAdmin", "RejectRequest"),
    ("quotad.v1.QuotaAdmin", "ListRequests"),
    ("quotad.v1.QuotaAdmin", "ListHistory"),
    ("quotad.v1.QuotaAdmin", "VerifyHistory"),
    ("quotad.v1.QuotaAdmin", "GetUsageReport"),
    ("quotad.v1.QuotaAdmin", "GetUsageRollups"),
    ("quotad.v1.QuotaAdmin", "GetSuggestions"),
    ("quotad.v1.QuotaAdmin", "ListAlerts"),
    (
        "kuadrant.service.ratelimit.v1.RateLimitService",
        "CheckRateLimit",
    ),
    ("kuadrant.service.ratelimit.v1.RateLimitService", "Report"),
    ("kuadrant.service.ratelimit.v1.RateLimitService", "Reserve"),
    ("kuadrant.service.ratelimit.v1.RateLimitService", "Commit"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];
/// The label values of a path that is none of [`RPCS`] (answered UNIMPLEMENTED).
const UNKNOWN_RPC: (&str, &str) = ("unknown", "unknown");

/// gRPC status codes by number: the fixed set of the `code` label.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
pub const GRPC_CODE_UNKNOWN: usize = 2;

pub fn describe() {
    metrics::describe_counter!(
        DECISIONS_TOTAL,
        "Gate decisions by call (consume, reserve, check), outcome (allowed, duplicate or the \
         denial's reason) and service type."
    );
    metrics::describe_histogram!(
        GRPC_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from a gRPC request's arrival to its response, by service, method and status \
         code; refused calls included."
    );
    metrics::describe_histogram!(
        WAL_FLUSH_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of one WAL flush (the fsync of a group commit)."
    );
    metrics::describe_histogram!(
        WAL_FLUSH_BATCH_RECORDS,
        "Records covered by one WAL group commit."
    );
    metrics::describe_histogram!(
        WAL_FLUSH_BATCH_BYTES,
        metrics::Unit::Bytes,
        "Encoded bytes of the records one WAL group commit covers."
    );
    metrics::describe_counter!(WAL_RECORDS_TOTAL, "Records appended to the WAL.");
    metrics::describe_gauge!(
        WAL_POISONED,
        "1 when a WAL write failed and changes are refused until restart."
    );
    metrics::describe_gauge!(ACTORS_ALIVE, "Teacher and school actors alive.");
    metrics::describe_counter!(
        ACTOR_RESTARTS_TOTAL,
        "Actors restarted by their supervisor after a panic."
    );
    metrics::describe_histogram!(
        SNAPSHOT_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to write one local snapshot."
    );
    metrics::describe_gauge!(
        SNAPSHOT_WAL_SEQ,
        "The WAL position the latest local snapshot covers."
    );
    metrics::describe_gauge!(WAL_DURABLE_SEQ, "The highest WAL position known durable.");
    metrics::describe_counter!(ROLLOVERS_TOTAL, "Billing cycle rollovers.");
    describe_postgres();
}

fn describe_postgres() {
    metrics::describe_histogram!(
        PG_SNAPSHOT_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of one Postgres snapshot transaction, commit included."
    );
    metrics::describe_gauge!(
        PG_SNAPSHOT_WAL_SEQ,
        "The WAL position the latest Postgres snapshot covers."
    );
    metrics::describe_gauge!(
        PG_SNAPSHOT_LAG_RECORDS,
        "Durable WAL records not yet in Postgres."
    );
    metrics::describe_gauge!(
        PG_SNAPSHOT_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest change not yet in Postgres (0 when caught up)."
    );
    metrics::describe_counter!(
        PG_SNAPSHOT_FAILURES_TOTAL,
        "Postgres snapshot attempts that failed (each is retried with backoff)."
    );
    metrics::describe_counter!(
        PG_SNAPSHOT_ROWS_TOTAL,
        "Rows written to Postgres by snapshots, by table."
    );
    metrics::describe_gauge!(
        ALERTS_ACTIVE,
        "Active alerts over every school, by kind (slice_threshold, pool_exhausting, usage_anomaly), as of the last alert pass."
    );
    metrics::describe_counter!(
        ALERTS_FAILURES_TOTAL,
        "Schools an alert pass could not compute (Postgres unavailable, too much data)."
    );
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "gRPC connections open, on every listener."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "gRPC connections closed as soon as they were accepted, by reason (connections_max, connections_per_ip_max, tls_handshake)."
    );
    metrics::describe_counter!(
        RLS_REQUESTS_TOTAL,
        "Rate limit calls of the gateways' protocols, by protocol (envoy, kuadrant), method, domain (a configured one, or unknown) and code (ok, over_limit, invalid, error)."
    );
    metrics::describe_counter!(
        RLS_UNKNOWN_SLICE_TOTAL,
        "Rate limit descriptors that named no known slice, by domain and the answer the domain gives them (deny, allow)."
    );
}

pub fn connection_opened() {
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

pub fn connection_closed() {
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

/// A connection closed as soon as it was accepted (`reason`: one of
/// [`CONNECTION_REFUSALS`]).
pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// One rate limit call answered. `domain` is a configured domain's name
/// (or "unknown"): the label set stays bounded by the config.
pub fn rls_request(protocol: &'static str, method: &'static str, domain: &str, code: &'static str) {
    counter!(
        RLS_REQUESTS_TOTAL,
        "protocol" => protocol,
        "method" => method,
        "domain" => domain.to_owned(),
        "code" => code
    )
    .increment(1);
}

/// A descriptor that named no known slice (logged by the caller too).
pub fn rls_unknown_slice(domain: &str, answer: &'static str) {
    counter!(RLS_UNKNOWN_SLICE_TOTAL, "domain" => domain.to_owned(), "answer" => answer)
        .increment(1);
}

/// Decision counters already registered, so that the hot path finds its
/// counter without building a label set (at most 3 calls x 5 outcomes x
/// SERVICE_LABELS_MAX entries).
type DecisionKey = (&'static str, &'static str, ServiceType);
static DECISION_COUNTERS: OnceLock<DashMap<DecisionKey, Counter>> = OnceLock::new();
/// The service types given a label of their own so far, at most SERVICE_LABELS_MAX.
static SERVICE_LABELS: Mutex<BTreeSet<ServiceType>> = Mutex::new(BTreeSet::new());

/// A decision about an event too malformed to name a service type.
pub fn decision_of_no_service(call: &'static str, outcome: &'static str) {
    counter!(DECISIONS_TOTAL, "call" => call, "outcome" => outcome, "service" => OTHER_SERVICE_LABEL)
        .increment(1);
}

pub fn decision(call: &'static str, outcome: &'static str, service: &ServiceType) {
    let counters = DECISION_COUNTERS.get_or_init(DashMap::new);
    let key = (call, outcome, service.clone());
    if let Some(counter) = counters.get(&key) {
        counter.increment(1);
        return;
    }
    if !admit_service_label(service) {
        counter!(DECISIONS_TOTAL, "call" => call, "outcome" => outcome, "service" => OTHER_SERVICE_LABEL)
            .increment(1);
        return;
    }
    let counter = counter!(
        DECISIONS_TOTAL,
        "call" => call,
        "outcome" => outcome,
        "service" => service.as_str().to_owned()
    );
    counter.increment(1);
    counters.insert(key, counter);
}

/// True when `service` has, or may now get, a label of its own.
fn admit_service_label(service: &ServiceType) -> bool {
    // A poisoned lock only means a panic between two inserts of a set.
    let mut labels = SERVICE_LABELS.lock().unwrap_or_else(|p| p.into_inner());
    admit(&mut labels, service, SERVICE_LABELS_MAX)
}

fn admit(labels: &mut BTreeSet<ServiceType>, service: &ServiceType, labels_max: usize) -> bool {
    if labels.contains(service) {
        return true;
    }
    if labels.len() >= labels_max {
        return false;
    }
    labels.insert(service.clone())
}

/// Which of [`RPCS`] a request path (`/quotad.v1.QuotaGate/Consume`) names;
/// `RPCS.len()` (the `unknown` labels) for any other path.
pub fn rpc_index(path: &str) -> usize {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return RPCS.len();
    };
    RPCS.iter()
        .position(|(s, m)| *m == method && *s == service)
        .unwrap_or(RPCS.len())
}

/// The index into [`GRPC_CODES`] of a `grpc-status` header value; no header
/// means OK (a successful unary answer carries its status in the trailers).
pub fn grpc_code_index(grpc_status: Option<&[u8]>) -> usize {
    let Some(value) = grpc_status else {
        return 0;
    };
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|code| *code < GRPC_CODES.len())
        .unwrap_or(GRPC_CODE_UNKNOWN)
}

/// Histogram handles by rpc and code, filled on first use: the per-call cost
/// is two array lookups, no label set to build or hash.
type RpcHistograms = [[OnceLock<Histogram>; GRPC_CODES.len()]; RPCS.len() + 1];
static RPC_HISTOGRAMS: RpcHistograms =
    [const { [const { OnceLock::new() }; GRPC_CODES.len()] }; RPCS.len() + 1];

/// Records one gRPC call's latency (`rpc` from [`rpc_index`], `code` from
/// [`grpc_code_index`]; out-of-range values count as unknown).
pub fn rpc_finished(rpc: usize, code: usize, elapsed: Duration) {
    let rpc = rpc.min(RPCS.len());
    let code = if code < GRPC_CODES.len() {
        code
    } else {
        GRPC_CODE_UNKNOWN
    };
    let Some(slot) = RPC_HISTOGRAMS.get(rpc).and_then(|row| row.get(code)) else {
        return;
    };
    let histogram = slot.get_or_init(|| {
        let (service, method) = RPCS.get(rpc).copied().unwrap_or(UNKNOWN_RPC);
        let short_service = service.rsplit('.').next().unwrap_or(service);
        let code_name = GRPC_CODES.get(code).copied().unwrap_or("UNKNOWN");
        histogram!(
            GRPC_REQUEST_DURATION_SECONDS,
            "grpc_service" => short_service,
            "rpc" => method,
            "code" => code_name
        )
    });
    histogram.record(elapsed.as_secs_f64());
}

/// The `actor` label values of [`ACTOR_RESTARTS_TOTAL`].
pub const ACTOR_KINDS: [&str; 2] = ["teacher", "school"];

/// The `table` label values of [`PG_SNAPSHOT_ROWS_TOTAL`]: what
/// `src/postgres/snapshot.rs` writes (a test checks the two agree).
pub const PG_SNAPSHOT_TABLES: [&str; 6] = [
    "school_ai_subscriptions",
    "teacher_ai_allocations",
    "ai_allocation_requests",
    "ai_allocation_history",
    "ai_usage_logs",
    "quotad_state",
];

/// Registers, at zero, every family whose label values are known before
/// anything happens, so that the first scrape already has their series: an
/// alert on `quotad_wal_poisoned == 1`, or on a rate of restarts, must find
/// a series on a healthy node too, not none. The Postgres and alert families
/// only with Postgres configured: without it they have nothing to say.
/// Counters and gauges are incremented by 0, never set, so that a second
/// server in the same process (tests) does not reset the first one's values.
pub fn register_at_start(with_postgres: bool) {
    for histogram in [
        WAL_FLUSH_DURATION_SECONDS,
        WAL_FLUSH_BATCH_RECORDS,
        WAL_FLUSH_BATCH_BYTES,
        SNAPSHOT_DURATION_SECONDS,
    ] {
        let _ = histogram!(histogram);
    }
    counter!(WAL_RECORDS_TOTAL).increment(0);
    counter!(ROLLOVERS_TOTAL).increment(0);
    for reason in CONNECTION_REFUSALS {
        counter!(CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(0);
    }
    for kind in ACTOR_KINDS {
        counter!(ACTOR_RESTARTS_TOTAL, "actor" => kind).increment(0);
    }
    for gauge in [
        WAL_POISONED,
        WAL_DURABLE_SEQ,
        SNAPSHOT_WAL_SEQ,
        ACTORS_ALIVE,
        CONNECTIONS_OPEN,
    ] {
        gauge!(gauge).increment(0.0);
    }
    if with_postgres {
        register_postgres_at_start();
    }
}

fn register_postgres_at_start() {
    let _ = histogram!(PG_SNAPSHOT_DURATION_SECONDS);
    for gauge in [
        PG_SNAPSHOT_WAL_SEQ,
        PG_SNAPSHOT_LAG_RECORDS,
        PG_SNAPSHOT_LAG_SECONDS,
    ] {
        gauge!(gauge).increment(0.0);
    }
    counter!(PG_SNAPSHOT_FAILURES_TOTAL).increment(0);
    for table in PG_SNAPSHOT_TABLES {
        counter!(PG_SNAPSHOT_ROWS_TOTAL, "table" => table).increment(0);
    }
    for kind in quotad_core::analytics::AlertKind::ALL {
        gauge!(ALERTS_ACTIVE, "kind" => kind.as_str()).increment(0.0);
    }
    counter!(ALERTS_FAILURES_TOTAL).increment(0);
}

/// Where the WAL starts: nothing poisoned, everything recovered durable.
pub fn wal_started(durable_seq: u64) {
    gauge!(WAL_POISONED).set(0.0);
    gauge!(WAL_DURABLE_SEQ).set(durable_seq as f64);
}

/// The position the snapshot found at start covers, until the next is written.
pub fn snapshot_recovered(wal_seq: u64) {
    gauge!(SNAPSHOT_WAL_SEQ).set(wal_seq as f64);
}

/// The position Postgres held at start, until the first snapshot there.
pub fn postgres_snapshot_recovered(wal_seq: u64) {
    gauge!(PG_SNAPSHOT_WAL_SEQ).set(wal_seq as f64);
}

pub fn wal_flush(elapsed: Duration, records: usize, bytes: usize, durable_seq: u64) {
    histogram!(WAL_FLUSH_DURATION_SECONDS).record(elapsed.as_secs_f64());
    histogram!(WAL_FLUSH_BATCH_RECORDS).record(records as f64);
    histogram!(WAL_FLUSH_BATCH_BYTES).record(bytes as f64);
    counter!(WAL_RECORDS_TOTAL).increment(records as u64);
    gauge!(WAL_DURABLE_SEQ).set(durable_seq as f64);
}

pub fn wal_poisoned() {
    gauge!(WAL_POISONED).set(1.0);
}

pub fn actor_started() {
    gauge!(ACTORS_ALIVE).increment(1.0);
}

pub fn actor_stopped() {
    gauge!(ACTORS_ALIVE).decrement(1.0);
}

pub fn actor_restarted(kind: &'static str) {
    counter!(ACTOR_RESTARTS_TOTAL, "actor" => kind).increment(1);
}

pub fn snapshot_written(elapsed: Duration, wal_seq: u64) {
    histogram!(SNAPSHOT_DURATION_SECONDS).record(elapsed.as_secs_f64());
    gauge!(SNAPSHOT_WAL_SEQ).set(wal_seq as f64);
}

pub fn rollover() {
    counter!(ROLLOVERS_TOTAL).increment(1);
}

pub fn postgres_snapshot_written(elapsed: Duration, wal_seq: u64) {
    histogram!(PG_SNAPSHOT_DURATION_SECONDS).record(elapsed.as_secs_f64());
    gauge!(PG_SNAPSHOT_WAL_SEQ).set(wal_seq as f64);
}

pub fn postgres_snapshot_rows(table: &'static str, rows: usize) {
    counter!(PG_SNAPSHOT_ROWS_TOTAL, "table" => table).increment(rows as u64);
}

pub fn postgres_snapshot_failed() {
    counter!(PG_SNAPSHOT_FAILURES_TOTAL).increment(1);
}

pub fn postgres_snapshot_lag(records: u64, age: Duration) {
    gauge!(PG_SNAPSHOT_LAG_RECORDS).set(records as f64);
    gauge!(PG_SNAPSHOT_LAG_SECONDS).set(age.as_secs_f64());
}

/// One school's pools, as the pool gauges show them.
pub struct SchoolPools {
    pub school_id: SchoolId,
    pub pools: Vec<PoolGauges>,
}

/// One pool's gauges: what the metrics page shows of a school's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGauges {
    pub service: ServiceType,
    pub cycle_units: u64,
    pub allocated_units: u64,
    pub used_units: u64,
}

type PoolField = fn(&PoolGauges) -> u64;

/// The pool gauges in Prometheus text format. They are rendered here rather
/// than through the recorder because the set of schools shown changes (a
/// school can fall out of the first `metrics_schools_max`), and the recorder
/// cannot forget a series: a school left out would keep its last values.
pub fn render_pools(schools: &[SchoolPools], omitted_schools: usize) -> String {
    let gauges: [(&str, &str, PoolField); 3] = [
        (
            POOL_CYCLE_UNITS,
            "Units a school's pool holds per billing cycle, by service type.",
            |p| p.cycle_units,
        ),
        (
            POOL_ALLOCATED_UNITS,
            "Units of a school's pool allocated to teachers, by service type.",
            |p| p.allocated_units,
        ),
        (
            POOL_USED_UNITS,
            "Units of a school's pool used this cycle, by service type.",
            |p| p.used_units,
        ),
    ];
    let mut text = String::new();
    let any_pool = schools.iter().any(|s| !s.pools.is_empty());
    for (name, help, field) in gauges.iter().filter(|_| any_pool) {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for school in schools {
            for pool in &school.pools {
                let (school_id, service) = (school.school_id.as_str(), pool.service.as_str());
                let _ = writeln!(
                    text,
                    "{name}{{school=\"{}\",service=\"{}\"}} {}",
                    escape_label(school_id),
                    escape_label(service),
                    field(pool)
                );
            }
        }
    }
    let _ = writeln!(
        text,
        "# HELP {POOL_SCHOOLS_OMITTED} Schools left out of the pool gauges (beyond metrics_schools_max, in school id order).\n\
         # TYPE {POOL_SCHOOLS_OMITTED} gauge\n{POOL_SCHOOLS_OMITTED} {omitted_schools}"
    );
    text
}

/// Ids are validated to need no escaping; this keeps the output valid anyway.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `kind` is one of the three alert kinds: the label stays bounded. No school
/// or teacher label: there can be any number of them (ListAlerts names them).
pub fn alerts_active(kind: &'static str, count: usize) {
    gauge!(ALERTS_ACTIVE, "kind" => kind).set(count as f64);
}

pub fn alerts_failed() {
    counter!(ALERTS_FAILURES_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (service, method) of every `rpc` in a .proto file.
    fn proto_rpcs(proto: &str) -> Vec<(String, String)> {
        let package = proto
            .lines()
            .find_map(|l| l.trim().strip_prefix("package "))
            .map(|p| p.trim_end_matches(';').trim().to_string())
            .expect("a package line");
        let mut service = String::new();
        let mut rpcs = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = format!("{package}.{}", rest.trim_end_matches('{').trim());
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim().to_string();
                rpcs.push((service.clone(), method));
            }
        }
        rpcs
    }

    #[test]
    fn the_rpc_label_list_is_every_rpc_of_the_protos_and_health() {
        let mut from_protos: Vec<(String, String)> = [
            include_str!("../../quotad-proto/proto/quotad/v1/gate.proto"),
            include_str!("../../quotad-proto/proto/quotad/v1/admin.proto"),
            include_str!("../../quotad-proto/proto/envoy/service/ratelimit/v3/rls.proto"),
            include_str!(
                "../../quotad-proto/proto/kuadrant/service/ratelimit/v1/kuadrantrls.proto"
            ),
        ]
        .into_iter()
        .flat_map(proto_rpcs)
        .collect();
        from_protos.push(("grpc.health.v1.Health".into(), "Check".into()));
        from_protos.push(("grpc.health.v1.Health".into(), "Watch".into()));
        for reflection in ["grpc.reflection.v1", "grpc.reflection.v1alpha"] {
            from_protos.push((
                format!("{reflection}.ServerReflection"),
                "ServerReflectionInfo".into(),
            ));
        }
        let mut listed: Vec<(String, String)> = RPCS
            .iter()
            .map(|(s, m)| (s.to_string(), m.to_string()))
            .collect();
        from_protos.sort();
        listed.sort();
        assert!(from_protos.len() > 20, "the proto parser found the rpcs");
        assert_eq!(listed, from_protos, "telemetry::RPCS must name every RPC");
    }

    #[test]
    fn a_request_path_maps_to_its_rpc_or_to_unknown() {
        assert_eq!(rpc_index("/quotad.v1.QuotaGate/Consume"), 0);
        let check = rpc_index("/grpc.health.v1.Health/Check");
        assert_eq!(RPCS[check], ("grpc.health.v1.Health", "Check"));
        let gate_check = rpc_index("/quotad.v1.QuotaGate/Check");
        assert_eq!(RPCS[gate_check], ("quotad.v1.QuotaGate", "Check"));
        for unknown in [
            "/quotad.v1.QuotaGate/Nope",
            "/quotad.v1.Other/Consume",
            "/",
            "",
            "Consume",
            "/quotad.v1.QuotaGate/Consume/extra",
        ] {
            assert_eq!(rpc_index(unknown), RPCS.len(), "{unknown:?}");
        }
    }

    #[test]
    fn a_grpc_status_header_maps_to_its_code_and_anything_else_to_unknown() {
        assert_eq!(GRPC_CODES[grpc_code_index(None)], "OK");
        assert_eq!(GRPC_CODES[grpc_code_index(Some(b"0"))], "OK");
        assert_eq!(GRPC_CODES[grpc_code_index(Some(b"5"))], "NOT_FOUND");
        assert_eq!(GRPC_CODES[grpc_code_index(Some(b"16"))], "UNAUTHENTICATED");
        for bad in [&b"17"[..], b"-1", b"x", b"", b"\xff"] {
            assert_eq!(GRPC_CODES[grpc_code_index(Some(bad))], "UNKNOWN");
        }
    }

    #[test]
    fn service_labels_stop_at_their_limit_and_keep_the_admitted_ones() {
        let service = |name: &str| ServiceType::parse(name).unwrap();
        let mut labels = BTreeSet::new();
        assert!(admit(&mut labels, &service("a"), 2));
        assert!(admit(&mut labels, &service("b"), 2));
        assert!(!admit(&mut labels, &service("c"), 2));
        assert!(admit(&mut labels, &service("a"), 2));
        assert_eq!(labels.len(), 2);
        assert!(ServiceType::parse(OTHER_SERVICE_LABEL).is_err());
    }

    fn pool(service: &str, cycle: u64, allocated: u64, used: u64) -> PoolGauges {
        PoolGauges {
            service: ServiceType::parse(service).unwrap(),
            cycle_units: cycle,
            allocated_units: allocated,
            used_units: used,
        }
    }

    #[test]
    fn pool_gauges_show_each_school_and_service_and_count_the_rest() {
        let schools = [
            SchoolPools {
                school_id: SchoolId::parse("s1").unwrap(),
                pools: vec![pool("chat", 100, 60, 7), pool("image", 50, 0, 0)],
            },
            SchoolPools {
                school_id: SchoolId::parse("s2").unwrap(),
                pools: vec![pool("chat", 10, 10, 10)],
            },
        ];
        let text = render_pools(&schools, 3);
        for line in [
            "# TYPE quotad_pool_cycle_units gauge",
            "quotad_pool_cycle_units{school=\"s1\",service=\"chat\"} 100",
            "quotad_pool_allocated_units{school=\"s1\",service=\"chat\"} 60",
            "quotad_pool_used_units{school=\"s1\",service=\"chat\"} 7",
            "quotad_pool_cycle_units{school=\"s1\",service=\"image\"} 50",
            "quotad_pool_used_units{school=\"s2\",service=\"chat\"} 10",
            "quotad_pool_schools_omitted 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 3 * 3 + 1);
        let empty = render_pools(&[], 0);
        assert!(!empty.contains(POOL_CYCLE_UNITS), "{empty}");
        assert!(empty.ends_with("quotad_pool_schools_omitted 0\n"));
    }

    #[test]
    fn the_table_labels_registered_at_start_are_the_ones_snapshots_write() {
        let source = include_str!("postgres/snapshot.rs");
        let written: BTreeSet<&str> = source
            .split("telemetry::postgres_snapshot_rows(")
            .skip(1)
            .filter_map(|call| call.trim_start().strip_prefix('"')?.split('"').next())
            .collect();
        let registered: BTreeSet<&str> = PG_SNAPSHOT_TABLES.into_iter().collect();
        assert_eq!(written, registered);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The metric names a PromQL expression reads (histogram series named by
    /// their family).
    fn metrics_in(expr: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(start) = rest.find("quotad_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| {
                    family.ends_with("_seconds")
                        || family.ends_with("_records")
                        || family.ends_with("_bytes")
                })
                .unwrap_or(name);
            names.push(family.to_string());
            rest = &tail[end..];
        }
        names
    }

    fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(e)) => {
                            out.push(e.clone())
                        }
                        _ => exprs(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_grafana_dashboard_queries_only_metrics_quotad_exports() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/quotad.json")).unwrap();
        let variables = &dashboard["templating"]["list"];
        assert!(
            variables
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["type"] == "datasource"),
            "the datasource is a variable, so the dashboard imports anywhere"
        );
        let mut all = Vec::new();
        exprs(&dashboard, &mut all);
        assert!(all.len() > 15, "found the queries: {all:?}");
        let queried: BTreeSet<String> = all.iter().flat_map(|e| metrics_in(e)).collect();
        for name in &queried {
            assert!(
                ALL_NAMES.contains(&name.as_str()),
                "{name} is not a quotad metric"
            );
        }
        for wanted in [
            DECISIONS_TOTAL,
            GRPC_REQUEST_DURATION_SECONDS,
            WAL_FLUSH_DURATION_SECONDS,
            WAL_FLUSH_BATCH_RECORDS,
            PG_SNAPSHOT_LAG_SECONDS,
            POOL_USED_UNITS,
            POOL_ALLOCATED_UNITS,
            ACTORS_ALIVE,
        ] {
            assert!(
                queried.contains(wanted),
                "the dashboard has no panel on {wanted}"
            );
        }
    }
}
