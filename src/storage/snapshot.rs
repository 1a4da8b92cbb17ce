//! The local snapshot. A thread keeps its own copy of the state, built only
//! from durable records applied in log order, and writes it down every
//! interval; the log is then truncated up to the position it covers. Because
//! the copy is built from the log itself, the snapshot is consistent by
//! construction: it is exactly the state after record N.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::codec;
use super::log::{Entry, LogStore};
use super::wal::DurableBatches;
use super::{Recovered, StorageError};
use crate::domain::{Record, RuleLimits, State, TimestampMs};
use crate::telemetry;

pub struct Snapshotter {
    thread: Option<JoinHandle<()>>,
}

/// Something that follows the durable records in log order, beside the local
/// snapshot: the Postgres snapshotter. It runs on the snapshot thread, so it
/// must hand slow work to its own thread.
pub trait Follower: Send + 'static {
    /// `record`, durable at `wal_seq`, was just applied to `state`.
    fn applied(&mut self, wal_seq: u64, record: &Record, state: &State);
    /// How often [`Follower::tick`] is called.
    fn interval(&self) -> Duration;
    fn tick(&mut self, state: &mut State, applied_seq: u64);
    /// The log may be truncated only through this position: records after it
    /// are not yet safe anywhere else.
    fn truncate_floor(&self) -> u64;
    /// The WAL writer has stopped; `applied_seq` is the last record. Called once.
    fn finish(&mut self, state: &mut State, applied_seq: u64);
    /// Called about every [`REFRESH_INTERVAL`], between ticks: for gauges.
    fn refresh(&mut self, _applied_seq: u64) {}
}

/// How often [`Follower::refresh`] is called.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

struct Worker {
    store: Arc<dyn LogStore>,
    batches: DurableBatches,
    state: State,
    /// The last record applied to `state`.
    applied_seq: u64,
    /// The position of the last snapshot written and flushed: only such a
    /// position may bound a truncation, because the records it covers exist
    /// nowhere else once the WAL drops them.
    snapshot_seq: u64,
    /// Records that arrived before a lower position; applied once the gap fills.
    ahead: BTreeMap<u64, Record>,
    interval: Duration,
    limits: RuleLimits,
    now_ms: fn() -> TimestampMs,
    follower: Option<Box<dyn Follower>>,
    /// The log holds no record at or below this position.
    truncated_seq: u64,
}

impl Snapshotter {
    /// Starts from what recovery found. Its two positions are kept apart on
    /// purpose: the records between `recovered.snapshot_seq` and
    /// `recovered.last_seq` were replayed from the WAL into memory and are
    /// held by no snapshot yet, so they count as changed (the next snapshot,
    /// at the latest the one at shutdown, writes them) and the WAL keeps
    /// them until it has.
    pub fn start(
        store: Arc<dyn LogStore>,
        batches: DurableBatches,
        recovered: Recovered,
        interval: Duration,
        limits: RuleLimits,
        now_ms: fn() -> TimestampMs,
        follower: Option<Box<dyn Follower>>,
    ) -> Result<Self, StorageError> {
        assert!(
            recovered.snapshot_seq <= recovered.last_seq,
            "the snapshot at {} is past the last record {}",
            recovered.snapshot_seq,
            recovered.last_seq
        );
        let worker = Worker {
            store,
            batches,
            state: recovered.state,
            applied_seq: recovered.last_seq,
            snapshot_seq: recovered.snapshot_seq,
            ahead: BTreeMap::new(),
            interval,
            limits,
            now_ms,
            follower,
            truncated_seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name("quotad-snapshot".into())
            .spawn(move || worker.run())
            .map_err(|e| StorageError::Io(format!("start the snapshot thread: {e}")))?;
        Ok(Self {
            thread: Some(thread),
        })
    }

    /// Waits until the WAL writer has stopped and the final snapshot is written.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the snapshot thread panicked");
            }
        }
    }
}

impl Worker {
    fn run(mut self) {
        let mut last = Instant::now();
        // The follower's first tick comes at once: a Postgres that is behind
        // the recovered state should catch up without waiting an interval.
        let mut follower_last: Option<Instant> = None;
        let mut refreshed = Instant::now();
        loop {
            let wait = self.next_wait(last, follower_last);
            match self.batches.recv_timeout(wait) {
                Ok(batch) => {
                    if let Err(e) = self.apply(batch) {
                        tracing::error!(error = %e, "snapshots stopped: a durable record could not be applied; the WAL keeps everything");
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return;
                }
            }
            if last.elapsed() >= self.interval {
                self.write_if_changed();
                last = Instant::now();
            }
            if let Some(follower) = self.follower.as_mut() {
                if follower_last.is_none_or(|at| at.elapsed() >= follower.interval()) {
                    follower.tick(&mut self.state, self.applied_seq);
                    follower_last = Some(Instant::now());
                    self.truncate();
                } else if refreshed.elapsed() >= REFRESH_INTERVAL {
                    follower.refresh(self.applied_seq);
                    refreshed = Instant::now();
                }
            }
        }
    }

    fn next_wait(&self, last: Instant, follower_last: Option<Instant>) -> Duration {
        let local = self.interval.saturating_sub(last.elapsed());
        match (&self.follower, follower_last) {
            (Some(_), None) => Duration::ZERO,
            (Some(follower), Some(at)) => {
                local.min(follower.interval().saturating_sub(at.elapsed()))
            }
            (None, _) => local,
        }
    }

    /// The WAL writer has stopped: the last local snapshot, then the
    /// follower's last changes, then the truncation both allow.
    fn finish(&mut self) {
        self.write_if_changed();
        if let Some(follower) = self.follower.as_mut() {
            follower.finish(&mut self.state, self.applied_seq);
        }
        self.truncate();
    }

    /// Drops the log records that both the local snapshot and the follower hold.
    fn truncate(&mut self) {
        let floor = self
            .follower
            .as_ref()
            .map_or(u64::MAX, |f| f.truncate_floor());
        let through = self.snapshot_seq.min(floor);
        if through <= self.truncated_seq {
            return;
        }
        match self.store.truncate_through(through) {
            Ok(()) => self.truncated_seq = through,
            Err(e) => tracing::error!(error = %e, "WAL truncation failed; it is tried again"),
        }
    }

    fn apply(&mut self, batch: Vec<Entry>) -> Result<(), StorageError> {
        for (seq, bytes) in batch {
            let record: Record = codec::decode(&bytes)?;
            self.ahead.insert(seq, record);
        }
        while let Some(record) = self.ahead.remove(&(self.applied_seq + 1)) {
            self.applied_seq += 1;
            self.state.apply(self.applied_seq, &record)?;
            if let Some(follower) = self.follower.as_mut() {
                follower.applied(self.applied_seq, &record, &self.state);
            }
        }
        Ok(())
    }

    fn write_if_changed(&mut self) {
        if self.applied_seq == self.snapshot_seq {
            return;
        }
        let started = Instant::now();
        self.state.prune((self.now_ms)(), &self.limits);
        match write_local(self.store.as_ref(), self.applied_seq, &self.state) {
            Ok(()) => {
                self.snapshot_seq = self.applied_seq;
                self.truncate();
                telemetry::snapshot_written(started.elapsed(), self.snapshot_seq);
                tracing::debug!(wal_seq = self.snapshot_seq, "local snapshot written");
            }
            Err(e) => {
                tracing::error!(error = %e, "local snapshot failed; the WAL keeps everything and it is tried again")
            }
        }
    }
}

/// Writes the snapshot durably, then drops the log records it covers. The
/// order matters: a crash between the two leaves records the snapshot already
/// holds, which recovery skips by position.
pub fn write_snapshot(
    store: &dyn LogStore,
    wal_seq: u64,
    state: &State,
) -> Result<(), StorageError> {
    write_local(store, wal_seq, state)?;
    store.truncate_through(wal_seq)
}

/// Writes the snapshot durably and keeps the log: a follower may still need
/// records the snapshot covers.
fn write_local(store: &dyn LogStore, wal_seq: u64, state: &State) -> Result<(), StorageError> {
    let bytes = codec::encode(state)?;
    store.write_snapshot(wal_seq, &bytes)?;
    store.flush()
}
