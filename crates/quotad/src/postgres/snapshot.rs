//! Snapshots to Postgres. The local snapshot thread tells a
//! [`PostgresFollower`] about every durable record it applies; every interval
//! the follower turns what changed into a [`Delta`](super::rows::Delta) and
//! hands it to a writer thread, which writes it in one transaction together
//! with the WAL position it covers. Only after that commit may the sled WAL be
//! truncated up to that position
//! ([`Follower::truncate_floor`](crate::storage::snapshot::Follower::truncate_floor)).
//!
//! Each commit is fenced: Postgres must still be at this quotad's history and
//! epoch (see [`crate::storage::history`]) and at the position it wrote last.
//! A writer that finds otherwise writes nothing and stops for good, saying so;
//! the node serves on, and its WAL keeps every record after what it wrote.
//!
//! Postgres being down or slow never slows the hot path: nothing on the hot
//! path waits for the writer. While a write is failing it is retried with
//! exponential backoff, the WAL keeps every record, changes keep accumulating
//! in the follower, and the lag is exported and logged.
//!
//! - `follower`: the [`PostgresFollower`], on the local snapshot thread: what
//!   changed, when to hand it over, the lag, the final snapshot at shutdown.
//! - `writer`: the writer thread: one transaction per delta, retries with
//!   backoff, stopping for good when fenced.
//! - `attach`: a writer started without Postgres attaching once it answers.
//! - `fence`: the `quotad_snapshot` row and the check every commit makes.
//! - `tables` and `usage`: a delta's rows into their tables, the usage log by
//!   COPY (with rows read back from the WAL).
//! - `convert`: quotad's values as Postgres column types.

mod attach;
mod convert;
mod fence;
mod follower;
mod tables;
mod usage;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use super::rows::Delta;
use crate::telemetry;
use quotad_core::SchoolId;

pub(crate) use convert::{db_i64, db_ms, db_u64};
pub use follower::PostgresFollower;

/// How long a graceful shutdown waits for the last snapshot to commit. If
/// Postgres does not answer by then, the WAL keeps the changes and the next
/// start writes them.
pub const FINAL_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// An arbitrary, fixed key: one snapshot transaction at a time per database.
pub(crate) const SNAPSHOT_LOCK: i64 = 0x7175_6f74_6164_5f73; // "quotad_s"

/// What the follower and the writer thread share.
#[derive(Debug, Default)]
struct Shared {
    /// The WAL position the last committed snapshot covers.
    committed_seq: AtomicU64,
    /// Set at shutdown: the writer stops retrying once its deadline passes.
    stopping: AtomicBool,
    /// Set by the writer when it stopped for good: fenced by another writer,
    /// or diverged from Postgres when it first answered. Nothing more is
    /// handed to it, and the WAL is truncated no further.
    stopped: AtomicBool,
}

/// What the writer found when Postgres first answered.
struct Attach {
    committed_seq: u64,
    history_written: HashMap<SchoolId, u64>,
}

/// The rows a committed snapshot wrote, by table. The labels stay in this
/// file: a test in `crate::telemetry` reads them from it and checks they are
/// the ones registered at start.
fn record_rows(delta: &Delta) {
    telemetry::postgres_snapshot_rows("school_ai_subscriptions", delta.subscriptions.len());
    telemetry::postgres_snapshot_rows("teacher_ai_allocations", delta.allocations.len());
    telemetry::postgres_snapshot_rows("ai_allocation_requests", delta.requests.len());
    telemetry::postgres_snapshot_rows("ai_allocation_history", delta.history.len());
    telemetry::postgres_snapshot_rows("ai_usage_logs", delta.usage.len());
    telemetry::postgres_snapshot_rows(
        "quotad_state",
        delta.school_states.len() + delta.account_states.len(),
    );
}

#[cfg(test)]
mod tests;
