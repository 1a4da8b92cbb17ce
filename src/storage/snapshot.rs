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
use super::StorageError;
use crate::domain::{Record, RuleLimits, State, TimestampMs};
use crate::telemetry;

pub struct Snapshotter {
    thread: Option<JoinHandle<()>>,
}

struct Worker {
    store: Arc<dyn LogStore>,
    batches: DurableBatches,
    state: State,
    applied_seq: u64,
    snapshot_seq: u64,
    /// Records that arrived before a lower position; applied once the gap fills.
    ahead: BTreeMap<u64, Record>,
    interval: Duration,
    limits: RuleLimits,
    now_ms: fn() -> TimestampMs,
}

impl Snapshotter {
    /// `state` is the recovered state, which covers the log up to `applied_seq`.
    pub fn start(
        store: Arc<dyn LogStore>,
        batches: DurableBatches,
        state: State,
        applied_seq: u64,
        interval: Duration,
        limits: RuleLimits,
        now_ms: fn() -> TimestampMs,
    ) -> Result<Self, StorageError> {
        let worker = Worker {
            store,
            batches,
            state,
            applied_seq,
            snapshot_seq: applied_seq,
            ahead: BTreeMap::new(),
            interval,
            limits,
            now_ms,
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
        loop {
            match self
                .batches
                .recv_timeout(self.interval.saturating_sub(last.elapsed()))
            {
                Ok(batch) => {
                    if let Err(e) = self.apply(batch) {
                        tracing::error!(error = %e, "snapshots stopped: a durable record could not be applied; the WAL keeps everything");
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.write_if_changed();
                    return;
                }
            }
            if last.elapsed() >= self.interval {
                self.write_if_changed();
                last = Instant::now();
            }
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
        }
        Ok(())
    }

    fn write_if_changed(&mut self) {
        if self.applied_seq == self.snapshot_seq {
            return;
        }
        let started = Instant::now();
        self.state.prune((self.now_ms)(), &self.limits);
        match write_snapshot(self.store.as_ref(), self.applied_seq, &self.state) {
            Ok(()) => {
                self.snapshot_seq = self.applied_seq;
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
    let bytes = codec::encode(state)?;
    store.write_snapshot(wal_seq, &bytes)?;
    store.flush()?;
    store.truncate_through(wal_seq)
}
