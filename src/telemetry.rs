//! Metric names and how they are recorded, in one place. Names follow
//! Prometheus conventions: base units, `_total` for counters, `_seconds` for
//! durations.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const CONSUME_DURATION_SECONDS: &str = "quotad_consume_duration_seconds";
pub const DECISIONS_TOTAL: &str = "quotad_decisions_total";
pub const WAL_FLUSH_DURATION_SECONDS: &str = "quotad_wal_flush_duration_seconds";
pub const WAL_FLUSH_BATCH_RECORDS: &str = "quotad_wal_flush_batch_records";
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
pub const ALERTS_ACTIVE: &str = "quotad_alerts_active";
pub const ALERTS_FAILURES_TOTAL: &str = "quotad_alerts_failures_total";

/// Histogram buckets for request and flush latencies, in seconds: 25 us to 1 s.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Buckets for the number of records one flush covers.
pub const BATCH_BUCKETS_RECORDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

pub fn describe() {
    metrics::describe_histogram!(
        CONSUME_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a Consume, durability wait included."
    );
    metrics::describe_counter!(
        DECISIONS_TOTAL,
        "Gate decisions by call and outcome (allowed, denied reason, duplicate)."
    );
    metrics::describe_histogram!(
        WAL_FLUSH_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of one WAL group commit (write and fsync)."
    );
    metrics::describe_histogram!(
        WAL_FLUSH_BATCH_RECORDS,
        "Records covered by one WAL group commit."
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
}

pub fn decision(call: &'static str, outcome: &'static str) {
    counter!(DECISIONS_TOTAL, "call" => call, "outcome" => outcome).increment(1);
}

pub fn consume_latency(elapsed: Duration) {
    histogram!(CONSUME_DURATION_SECONDS).record(elapsed.as_secs_f64());
}

pub fn wal_flush(elapsed: Duration, records: usize, durable_seq: u64) {
    histogram!(WAL_FLUSH_DURATION_SECONDS).record(elapsed.as_secs_f64());
    histogram!(WAL_FLUSH_BATCH_RECORDS).record(records as f64);
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

/// `kind` is one of the three alert kinds: the label stays bounded. No school
/// or teacher label: there can be any number of them (ListAlerts names them).
pub fn alerts_active(kind: &'static str, count: usize) {
    gauge!(ALERTS_ACTIVE, "kind" => kind).set(count as f64);
}

pub fn alerts_failed() {
    counter!(ALERTS_FAILURES_TOTAL).increment(1);
}
