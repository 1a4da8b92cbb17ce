//! The write-ahead log with group commit.
//!
//! Actors append records from their own threads: `append` encodes the record,
//! takes the next log position and queues it. One writer thread drains the
//! queue, writes everything that arrived meanwhile and flushes once: one fsync
//! covers the whole batch. Callers wait for the flush that holds their
//! record (`wait_durable`) before answering, so nothing acknowledged is lost.
//!
//! Positions are taken with an atomic counter before the queue send, so two
//! actors may queue positions out of order. The writer therefore only
//! advances the durable watermark over a contiguous prefix: position N is
//! reported durable once every position up to N is.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::codec::{self, RECORD_BYTES_MAX};
use super::log::{Entry, LogStore};
use super::StorageError;
use crate::domain::Record;
use crate::telemetry;

/// When a change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// After the flush that holds its record (the default): nothing acknowledged is lost.
    #[default]
    Sync,
    /// At once; records are flushed every `batched_flush_interval_ms`. A crash
    /// loses at most that window of acknowledged changes.
    Batched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalConfig {
    pub durability: Durability,
    /// How often batched mode flushes.
    pub batched_flush_interval_ms: u64,
    /// Records queued for the writer at most; appends wait beyond it.
    pub queue_records_max: usize,
    /// Records written by one group commit at most.
    pub batch_records_max: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            batched_flush_interval_ms: 5,
            queue_records_max: 65_536,
            batch_records_max: 4_096,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    /// A write failed earlier; the server refuses every change until it restarts.
    #[error("the write-ahead log failed ({0}); changes are refused until quotad restarts")]
    Poisoned(String),
    #[error("the write-ahead log is shut down")]
    Closed,
    #[error("a record could not be encoded: {0}")]
    Encode(String),
    /// The change would make a record larger than the log takes. Every call
    /// the API allows fits (the limit is derived from the largest), so this is
    /// a request beyond them: refused for good, nothing written.
    #[error("the change is too large to record: a {kind} record of {bytes} bytes; at most {bytes_max} fit")]
    RecordTooLarge {
        kind: &'static str,
        bytes: usize,
        bytes_max: usize,
    },
}

enum Message {
    Record(Entry),
    /// Flush what is queued, then stop.
    Shutdown,
}

struct Shared {
    next_seq: AtomicU64,
    durable_seq: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
    flushed: Notify,
    durability: Durability,
}

/// The appending side, cloned into every actor.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    tx: Sender<Message>,
}

/// Owns the writer thread; joining it flushes the queue.
pub struct WalWriter {
    thread: Option<JoinHandle<()>>,
    tx: Sender<Message>,
}

/// Batches of durable records, handed to whoever keeps a copy of the state.
pub type DurableBatches = Receiver<Vec<Entry>>;

impl Wal {
    /// Starts the writer thread. `last_seq` is the last position already in
    /// the log (0 for an empty one).
    pub fn start(
        store: Arc<dyn LogStore>,
        config: WalConfig,
        last_seq: u64,
    ) -> Result<(Wal, WalWriter, DurableBatches), StorageError> {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_records_max);
        let (durable_tx, durable_rx) = crossbeam_channel::bounded(1024);
        let shared = Arc::new(Shared {
            next_seq: AtomicU64::new(last_seq + 1),
            durable_seq: AtomicU64::new(last_seq),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
            flushed: Notify::new(),
            durability: config.durability,
        });
        let writer = Writer {
            store,
            config,
            shared: shared.clone(),
            rx,
            durable_tx,
            watermark: Watermark {
                next_expected: last_seq + 1,
                ahead: BTreeSet::new(),
            },
        };
        let thread = std::thread::Builder::new()
            .name("quotad-wal".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::Io(format!("start the WAL writer thread: {e}")))?;
        Ok((
            Wal {
                shared,
                tx: tx.clone(),
            },
            WalWriter {
                thread: Some(thread),
                tx,
            },
            durable_rx,
        ))
    }

    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Refuses early when the log can no longer be written.
    pub fn check_writable(&self) -> Result<(), WalError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(WalError::Poisoned(self.poison_reason()));
        }
        Ok(())
    }

    /// Queues a record and returns its log position. The record is durable
    /// once [`Wal::wait_durable`] returns for that position.
    pub fn append(&self, record: &Record) -> Result<u64, WalError> {
        self.check_writable()?;
        let bytes = codec::encode(record).map_err(|e| WalError::Encode(e.to_string()))?;
        // Checked before a position is taken: a refused record leaves no gap.
        if bytes.len() > RECORD_BYTES_MAX {
            return Err(WalError::RecordTooLarge {
                kind: record.kind(),
                bytes: bytes.len(),
                bytes_max: RECORD_BYTES_MAX,
            });
        }
        let seq = self.shared.next_seq.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send(Message::Record((seq, bytes)))
            .map_err(|_| WalError::Closed)?;
        Ok(seq)
    }

    pub fn is_durable(&self, seq: u64) -> bool {
        self.shared.durable_seq.load(Ordering::Acquire) >= seq
    }

    /// Waits until the record at `seq` is durable. In batched mode it returns
    /// at once: the caller accepted the documented loss window.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), WalError> {
        if self.shared.durability == Durability::Batched {
            return self.check_writable();
        }
        loop {
            if self.is_durable(seq) {
                return Ok(());
            }
            self.check_writable()?;
            let notified = self.shared.flushed.notified();
            tokio::pin!(notified);
            // Register before the second look, so a flush between the look
            // and the await still wakes this waiter.
            notified.as_mut().enable();
            if self.is_durable(seq) {
                return Ok(());
            }
            self.check_writable()?;
            notified.await;
        }
    }

    fn poison_reason(&self) -> String {
        self.shared
            .poison_reason
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl WalWriter {
    /// Flushes every queued record and stops the writer thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Message::Shutdown);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the WAL writer thread panicked");
            }
        }
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Watermark {
    next_expected: u64,
    ahead: BTreeSet<u64>,
}

impl Watermark {
    /// Marks positions durable; returns the highest position below which all are.
    fn advance(&mut self, batch: &[Entry]) -> u64 {
        for (seq, _) in batch {
            if *seq == self.next_expected {
                self.next_expected += 1;
            } else {
                self.ahead.insert(*seq);
            }
        }
        while self.ahead.remove(&self.next_expected) {
            self.next_expected += 1;
        }
        self.next_expected - 1
    }
}

struct Writer {
    store: Arc<dyn LogStore>,
    config: WalConfig,
    shared: Arc<Shared>,
    rx: Receiver<Message>,
    durable_tx: Sender<Vec<Entry>>,
    watermark: Watermark,
}

impl Writer {
    fn run(mut self) {
        let interval = Duration::from_millis(self.config.batched_flush_interval_ms.max(1));
        let mut unflushed: Vec<Entry> = Vec::new();
        let mut last_flush = Instant::now();
        loop {
            let (batch, shutdown) = self.next_batch(&unflushed, last_flush, interval);
            if batch.is_empty() || self.write(&batch) {
                unflushed.extend(batch);
                let due =
                    self.config.durability == Durability::Sync || last_flush.elapsed() >= interval;
                if !unflushed.is_empty() && (due || shutdown) {
                    self.flush(std::mem::take(&mut unflushed));
                    last_flush = Instant::now();
                }
            }
            if shutdown {
                return;
            }
        }
    }

    /// Blocks for the first record, then takes whatever else is queued.
    fn next_batch(
        &self,
        unflushed: &[Entry],
        last_flush: Instant,
        interval: Duration,
    ) -> (Vec<Entry>, bool) {
        let first = if unflushed.is_empty() {
            self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            self.rx
                .recv_timeout(interval.saturating_sub(last_flush.elapsed()))
        };
        let mut batch = Vec::new();
        match first {
            Ok(Message::Record(entry)) => batch.push(entry),
            Ok(Message::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                return (self.drain(batch), true)
            }
            Err(RecvTimeoutError::Timeout) => return (batch, false),
        }
        while batch.len() < self.config.batch_records_max {
            match self.rx.try_recv() {
                Ok(Message::Record(entry)) => batch.push(entry),
                Ok(Message::Shutdown) => return (self.drain(batch), true),
                Err(_) => break,
            }
        }
        (batch, false)
    }

    fn drain(&self, mut batch: Vec<Entry>) -> Vec<Entry> {
        while let Ok(Message::Record(entry)) = self.rx.try_recv() {
            batch.push(entry);
        }
        batch
    }

    fn write(&self, batch: &[Entry]) -> bool {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return false;
        }
        match self.store.append(batch) {
            Ok(()) => true,
            Err(e) => {
                self.poison(&e);
                false
            }
        }
    }

    fn flush(&mut self, batch: Vec<Entry>) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = self.store.flush() {
            self.poison(&e);
            return;
        }
        let durable_seq = self.watermark.advance(&batch);
        self.shared
            .durable_seq
            .store(durable_seq, Ordering::Release);
        self.shared.flushed.notify_waiters();
        let bytes: usize = batch.iter().map(|(_, encoded)| encoded.len()).sum();
        telemetry::wal_flush(started.elapsed(), batch.len(), bytes, durable_seq);
        // The snapshotter must see every durable record. Its queue is
        // bounded, so if it falls far behind the writer waits for it rather
        // than let memory grow; a gone snapshotter (shut down) is ignored.
        let _ = self.durable_tx.send(batch);
    }

    /// A failed write is fatal for writes: stop acknowledging, say so loudly.
    fn poison(&self, error: &StorageError) {
        if let Ok(mut reason) = self.shared.poison_reason.lock() {
            *reason = error.to_string();
        }
        self.shared.poisoned.store(true, Ordering::Release);
        self.shared.flushed.notify_waiters();
        telemetry::wal_poisoned();
        tracing::error!(%error, "WAL write failed: refusing every change until quotad restarts");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::{Change, Priority, SchoolId, ServiceType, SliceSet, TeacherId};
    use crate::storage::MemoryLog;

    fn allocations_set(slices: usize) -> Record {
        let slices = (0..slices)
            .map(|i| SliceSet {
                teacher_id: TeacherId::parse(&format!("{i:0>128}")).unwrap(),
                service: ServiceType::parse(&"s".repeat(64)).unwrap(),
                allocated_units: 1,
                priority: Priority::Normal,
                auto_renew: false,
            })
            .collect();
        Record::AllocationsSet {
            school_id: SchoolId::parse("school").unwrap(),
            slices,
            cycle_start_ms: 0,
            change: Change {
                by: Arc::from("principal"),
                reason: Arc::from(""),
                at_ms: 0,
            },
        }
    }

    #[tokio::test]
    async fn a_record_over_the_limit_is_refused_with_its_size_and_leaves_no_gap() {
        let store = MemoryLog::default();
        let (wal, writer, _durable) =
            Wal::start(Arc::new(store.clone()), WalConfig::default(), 0).unwrap();
        let too_large = allocations_set(3 * crate::domain::record::BULK_SLICES_MAX);
        match wal.append(&too_large) {
            Err(WalError::RecordTooLarge {
                kind,
                bytes,
                bytes_max,
            }) => {
                assert_eq!(kind, "allocations_set");
                assert!(bytes > bytes_max && bytes_max == RECORD_BYTES_MAX);
            }
            other => panic!("{other:?}"),
        }
        let seq = wal.append(&allocations_set(1)).unwrap();
        assert_eq!(seq, 1, "the refused record took no position");
        wal.wait_durable(seq).await.unwrap();
        writer.shutdown();
        assert_eq!(store.read_after(0).unwrap().len(), 1);
    }
}
