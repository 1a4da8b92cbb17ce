//! The local snapshot. A thread keeps its own copy of the state, built only
//! from durable records applied in log order, and writes it down every
//! interval; the log is then truncated up to the position it covers. Because
//! the copy is built from the log itself, the snapshot is consistent by
//! construction: it is exactly the state after record N.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::codec;
use super::log::{Entry, LogStore};
use super::wal::DurableBatches;
use super::{Recovered, StorageError};
use crate::owned_thread::OwnedThread;
use crate::telemetry;
use quotad_core::{Record, RuleLimits, State, TimestampMs};

pub struct Snapshotter {
    /// Ends by itself once the WAL writer has stopped (its batches end).
    thread: OwnedThread,
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

/// Records one truncation step drops at most. Dropping a sled record costs
/// about 13 us (measured: 1M records in one step took 13.4 s), so a step
/// takes some 50 ms, and the durable batches waiting meanwhile are applied
/// between steps: the WAL writer, which waits when its queue to this thread
/// is full, never waits for a whole truncation. (In batched mode a writer
/// waiting there flushes nothing: with a 15 s snapshot interval under load, a
/// kill lost acknowledged answers up to 3.5 s old.)
const TRUNCATE_STEP_RECORDS: u64 = 4_096;

/// How long a shutdown goes on truncating the WAL after its final snapshot.
/// What is left is safe to keep (recovery skips the records a snapshot covers
/// by position) and is dropped after the next start; a stop must fit in a
/// container's stop timeout (Docker's default is 10 s).
const SHUTDOWN_TRUNCATE_BUDGET: Duration = Duration::from_secs(1);

/// Durable batches applied at most between two truncation steps.
const BATCHES_PER_STEP_MAX: usize = 1024;

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
    /// A truncation step failed: no more are tried until the next snapshot
    /// or follower tick, rather than in a loop.
    truncate_failed: bool,
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
            truncate_failed: false,
        };
        let thread = OwnedThread::spawn("quotad-snapshot", move || worker.run())
            .map_err(|e| StorageError::Io(format!("start the snapshot thread: {e}")))?;
        Ok(Self { thread })
    }

    /// Waits until the WAL writer has stopped and the final snapshot is written.
    pub fn join(mut self) {
        self.thread.stop();
    }
}

/// Not joined when dropped without [`Snapshotter::join`] (a start-up that
/// failed half-way): the thread ends by itself once the WAL writer, which
/// its owner may drop later, has stopped. Waiting here could wait for ever.
impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.thread.detach();
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
            // While a truncation is under way, its steps take turns with the
            // batches: nothing to apply is no reason to wait.
            let wait = match self.truncation_due() {
                true => Duration::ZERO,
                false => self.next_wait(last, follower_last),
            };
            match self.batches.recv_timeout(wait) {
                Ok(batch) => {
                    if let Err(e) = self.apply_waiting(batch) {
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
                    // Its floor may have moved.
                    self.truncate_failed = false;
                } else if refreshed.elapsed() >= REFRESH_INTERVAL {
                    follower.refresh(self.applied_seq);
                    refreshed = Instant::now();
                }
            }
            if self.truncation_due() {
                self.truncate_step();
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
    /// follower's last changes, then as much of the truncation both allow as
    /// fits in [`SHUTDOWN_TRUNCATE_BUDGET`].
    fn finish(&mut self) {
        self.write_if_changed();
        if let Some(follower) = self.follower.as_mut() {
            follower.finish(&mut self.state, self.applied_seq);
        }
        self.truncate_failed = false;
        let deadline = Instant::now() + SHUTDOWN_TRUNCATE_BUDGET;
        while self.truncation_due() && Instant::now() < deadline {
            self.truncate_step();
        }
        if self.truncation_due() {
            tracing::info!(
                truncated_wal_seq = self.truncated_seq,
                snapshot_wal_seq = self.snapshot_seq,
                "the WAL records the snapshot covers are not all dropped yet; the next start drops the rest"
            );
        }
    }

    /// The log may be truncated through here: records that both the local
    /// snapshot (written and flushed) and the follower hold.
    fn truncate_target(&self) -> u64 {
        let floor = self
            .follower
            .as_ref()
            .map_or(u64::MAX, |f| f.truncate_floor());
        self.snapshot_seq.min(floor)
    }

    fn truncation_due(&self) -> bool {
        !self.truncate_failed && self.truncate_target() > self.truncated_seq
    }

    /// Drops the next [`TRUNCATE_STEP_RECORDS`] records at most, toward
    /// [`Worker::truncate_target`].
    fn truncate_step(&mut self) {
        let target = self.truncate_target();
        let first = match self.store.read_range(self.truncated_seq, 1) {
            Ok(entries) => entries.first().map(|(seq, _)| *seq),
            Err(e) => return self.truncation_failed(&e),
        };
        // Nothing left at or below the target: no record needs dropping.
        let Some(first) = first.filter(|first| *first <= target) else {
            self.truncated_seq = target;
            return;
        };
        let through = target.min(first.saturating_add(TRUNCATE_STEP_RECORDS - 1));
        match self.store.truncate_through(through) {
            Ok(()) => self.truncated_seq = through,
            Err(e) => self.truncation_failed(&e),
        }
    }

    fn truncation_failed(&mut self, error: &StorageError) {
        tracing::error!(%error, "WAL truncation failed; it is tried again after the next snapshot");
        self.truncate_failed = true;
    }

    /// Applies `batch` and the batches already waiting behind it (up to
    /// [`BATCHES_PER_STEP_MAX`]), so that a truncation step never leaves the
    /// WAL writer's queue to fill.
    fn apply_waiting(&mut self, batch: Vec<Entry>) -> Result<(), StorageError> {
        self.apply(batch)?;
        for _ in 1..BATCHES_PER_STEP_MAX {
            match self.batches.try_recv() {
                Ok(batch) => self.apply(batch)?,
                Err(_) => break,
            }
        }
        Ok(())
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
            Ok(bytes) => {
                self.snapshot_seq = self.applied_seq;
                // The truncation it allows is done in steps by the caller's loop.
                self.truncate_failed = false;
                telemetry::snapshot_written(started.elapsed(), self.snapshot_seq);
                tracing::debug!(
                    wal_seq = self.snapshot_seq,
                    bytes,
                    write_ms = started.elapsed().as_millis() as u64,
                    "local snapshot written"
                );
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
/// records the snapshot covers. Returns the snapshot's size in bytes.
fn write_local(store: &dyn LogStore, wal_seq: u64, state: &State) -> Result<usize, StorageError> {
    let bytes = codec::encode(state)?;
    store.write_snapshot(wal_seq, &bytes)?;
    store.flush()?;
    Ok(bytes.len())
}
