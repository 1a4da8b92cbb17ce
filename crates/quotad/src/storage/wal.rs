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
//!
//! A failed write or flush poisons the log, and so does any end of the writer
//! thread other than a requested shutdown (a panic inside sled): waiters are
//! woken with [`WalError::Poisoned`] at once, every later append is refused,
//! and [`Wal::poisoned`] tells whoever must react (the health service).

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::codec::{self, RECORD_BYTES_MAX};
use super::log::{Entry, LogStore};
use super::StorageError;
use crate::owned_thread::OwnedThread;
use crate::telemetry;
use quotad_core::Record;

/// When a change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// After the flush that holds its record (the default): nothing acknowledged is lost.
    #[default]
    Sync,
    /// At once while the writer keeps up (it flushed within twice
    /// `batched_flush_interval_ms`, or has nothing to flush); records are
    /// flushed every interval. Behind, answers wait for the flush, so a crash
    /// loses at most about one window of acknowledged changes.
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
    /// Set once the reason is in `poison`: the hot path's cheap look.
    poisoned: AtomicBool,
    /// Why the log is poisoned (None: it is not); watched by the server.
    poison: watch::Sender<Option<String>>,
    flushed: Notify,
    durability: Durability,
    /// Batched mode answers at once only while the writer keeps up: it was
    /// idle, or caught up (a flush completed) within this window.
    batched_window_ms: u64,
    epoch: Instant,
    /// When the writer was last caught up, in ms since `epoch`.
    caught_up_at_ms: AtomicU64,
    /// The writer waits for a record with nothing unflushed.
    idle: AtomicBool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_caught_up(&self) {
        self.caught_up_at_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Whether a batched acknowledgement may go before its flush. Behind (a
    /// slow write or fsync), batched answers wait for the flush like sync
    /// ones, so what a crash can lose stays within one window of answers
    /// instead of growing with the stall (measured before: up to 256 ms).
    fn keeps_up(&self) -> bool {
        self.idle.load(Ordering::Acquire)
            || self
                .now_ms()
                .saturating_sub(self.caught_up_at_ms.load(Ordering::Acquire))
                <= self.batched_window_ms
    }
}

/// The appending side, cloned into every actor.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    tx: Sender<Message>,
}

/// Owns the writer thread; stopping it (or dropping it) flushes the queue.
pub struct WalWriter {
    thread: OwnedThread,
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
            poison: watch::Sender::new(None),
            flushed: Notify::new(),
            durability: config.durability,
            batched_window_ms: 2 * config.batched_flush_interval_ms.max(1),
            epoch: Instant::now(),
            caught_up_at_ms: AtomicU64::new(0),
            idle: AtomicBool::new(false),
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
            held: BTreeMap::new(),
            next_to_write: last_seq + 1,
            drained: true,
        };
        let stop = tx.clone();
        let thread = OwnedThread::spawn("quotad-wal", move || writer.run_until_shutdown())
            .map_err(|e| StorageError::Io(format!("start the WAL writer thread: {e}")))?
            .stopped_by(move || {
                let _ = stop.send(Message::Shutdown);
            });
        telemetry::wal_started(last_seq);
        Ok((Wal { shared, tx }, WalWriter { thread }, durable_rx))
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
        // Batched mode's window opens at the first record after the writer
        // went idle, not when the writer gets round to running: a writer
        // starved of CPU must not stretch it.
        let shared = &self.shared;
        if shared.idle.load(Ordering::Acquire) && shared.idle.swap(false, Ordering::AcqRel) {
            shared.mark_caught_up();
        }
        Ok(seq)
    }

    pub fn is_durable(&self, seq: u64) -> bool {
        self.shared.durable_seq.load(Ordering::Acquire) >= seq
    }

    /// Waits until the record at `seq` is durable. In batched mode it returns
    /// at once: the caller accepted the documented loss window.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), WalError> {
        if self.shared.durability == Durability::Batched {
            self.check_writable()?;
            if self.shared.keeps_up() {
                return Ok(());
            }
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
        self.poisoned_because().unwrap_or_default()
    }

    /// Why the log refuses changes, if it does.
    pub fn poisoned_because(&self) -> Option<String> {
        self.shared.poison.borrow().clone()
    }

    /// Resolves, with the reason, once the log is poisoned (never, if it is
    /// not): for what must follow the log's health, not for the hot path.
    pub async fn poisoned(&self) -> String {
        let mut poison = self.shared.poison.subscribe();
        // The sender lives in `shared`, which `self` holds: this cannot end
        // in an error, only in a reason.
        let reason = poison
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }
}

impl WalWriter {
    /// Flushes every queued record and stops the writer thread.
    pub fn shutdown(mut self) {
        self.thread.stop();
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
    /// Records that arrived ahead of a lower position (positions are taken
    /// before the queue send, so two actors can queue them out of order).
    /// They are written only once every position before them is: the log on
    /// disk never has a hole, so a crash leaves a prefix of it, and recovery
    /// can call any hole damage.
    held: BTreeMap<u64, Vec<u8>>,
    next_to_write: u64,
    /// The last batch took everything queued: a flush of it catches the
    /// writer up (batched mode's window, see [`Shared::keeps_up`]).
    drained: bool,
}

impl Writer {
    /// Runs the writer until a requested shutdown. Anything else that ends
    /// it (a panic in the store, or in the writer itself) poisons the log
    /// before the thread goes, so that no caller waits for a flush that will
    /// never come and no later change is accepted.
    fn run_until_shutdown(mut self) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.run())) {
            let reason = format!("the WAL writer thread panicked: {}", panic_message(&*panic));
            self.poison(reason);
        }
    }

    fn run(&mut self) {
        let interval = Duration::from_millis(self.config.batched_flush_interval_ms.max(1));
        let mut unflushed: Vec<Entry> = Vec::new();
        let mut last_flush = Instant::now();
        loop {
            let (batch, shutdown) = self.next_batch(&unflushed, last_flush, interval);
            let batch = self.in_order(batch);
            if batch.is_empty() || self.write(&batch) {
                unflushed.extend(batch);
                let due =
                    self.config.durability == Durability::Sync || last_flush.elapsed() >= interval;
                if !unflushed.is_empty() && (due || shutdown) {
                    // The interval runs from the start of a flush: a slow
                    // fsync must not delay the next one by its own length.
                    last_flush = Instant::now();
                    self.flush(std::mem::take(&mut unflushed));
                }
            }
            if shutdown {
                if !self.held.is_empty() {
                    tracing::warn!(
                        records = self.held.len(),
                        waiting_for = self.next_to_write,
                        "the WAL stopped with records queued behind a position that never came; \
                         they were never acknowledged"
                    );
                }
                return;
            }
        }
    }

    /// The records of `batch` and of those held before that now follow the
    /// last written position without a hole, in order.
    fn in_order(&mut self, batch: Vec<Entry>) -> Vec<Entry> {
        if self.held.is_empty() && batch.iter().map(|(seq, _)| *seq).eq(self.next_to_write..) {
            self.next_to_write += batch.len() as u64;
            return batch;
        }
        self.held.extend(batch);
        let mut ready = Vec::new();
        while let Some(bytes) = self.held.remove(&self.next_to_write) {
            ready.push((self.next_to_write, bytes));
            self.next_to_write += 1;
        }
        ready
    }

    /// Blocks for the first record, then takes whatever else is queued.
    fn next_batch(
        &mut self,
        unflushed: &[Entry],
        last_flush: Instant,
        interval: Duration,
    ) -> (Vec<Entry>, bool) {
        let first = if unflushed.is_empty() {
            self.shared.idle.store(true, Ordering::Release);
            let first = self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected);
            self.shared.mark_caught_up();
            self.shared.idle.store(false, Ordering::Release);
            first
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
        self.drained = self.rx.is_empty();
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
                self.poison(format!("write: {e}"));
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
            self.poison(format!("flush: {e}"));
            return;
        }
        let durable_seq = self.watermark.advance(&batch);
        self.shared
            .durable_seq
            .store(durable_seq, Ordering::Release);
        // Caught up only when nothing was left queued or held behind this
        // flush: a flush that drains part of a backlog does not open the
        // window for answers that wait behind the rest.
        if self.drained && self.held.is_empty() {
            self.shared.mark_caught_up();
        }
        self.shared.flushed.notify_waiters();
        // After the answers: the mark is not on the acknowledgement's path.
        let marked = self.store.mark_durable(durable_seq);
        let bytes: usize = batch.iter().map(|(_, encoded)| encoded.len()).sum();
        telemetry::wal_flush(started.elapsed(), batch.len(), bytes, durable_seq);
        // The snapshotter must see every durable record. Its queue is
        // bounded, so if it falls far behind the writer waits for it rather
        // than let memory grow; a gone snapshotter (shut down) is ignored.
        let _ = self.durable_tx.send(batch);
        if let Err(e) = marked {
            self.poison(format!("durable mark: {e}"));
        }
    }

    /// A failed write is fatal for writes: stop acknowledging, say so loudly.
    /// The first reason is kept: it is the cause, later ones are echoes.
    fn poison(&self, reason: String) {
        let first = self.shared.poison.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(reason.clone());
            }
            first
        });
        // The reason is in place before the flag: whoever sees the flag finds it.
        self.shared.poisoned.store(true, Ordering::Release);
        self.shared.flushed.notify_waiters();
        if first {
            telemetry::wal_poisoned();
            tracing::error!(%reason, "the WAL failed: refusing every change until quotad restarts");
        }
    }
}

/// What a panic said, when it said it with a string (as `panic!` does).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::{LogCall, MemoryLog, WrappedLog};
    use quotad_core::{Change, Priority, SchoolId, ServiceType, SliceSet, TeacherId};
    use std::time::Duration;

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

    /// A store whose flush (or append) panics once armed, as a bug inside
    /// sled would.
    #[derive(Default)]
    struct PanickingStore {
        inner: MemoryLog,
        panic_in_flush: AtomicBool,
        panic_in_append: AtomicBool,
    }

    impl WrappedLog for PanickingStore {
        fn inner(&self) -> &dyn LogStore {
            &self.inner
        }
        fn before(&self, call: LogCall<'_>) -> Result<(), StorageError> {
            match call {
                LogCall::Append(_) => assert!(
                    !self.panic_in_append.load(Ordering::SeqCst),
                    "sled's append blew up"
                ),
                LogCall::Flush => assert!(
                    !self.panic_in_flush.load(Ordering::SeqCst),
                    "sled's flush blew up"
                ),
                LogCall::TruncateThrough(_) => {}
            }
            Ok(())
        }
    }

    /// The writer thread dies in the store: every waiter hears Poisoned at
    /// once (not at its deadline), the reason names the panic, later appends
    /// are refused, and whoever watches the log is told.
    async fn a_dead_writer_poisons_the_log(arm: impl FnOnce(&PanickingStore), said: &str) {
        let store = Arc::new(PanickingStore::default());
        let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        let first = wal.append(&allocations_set(1)).unwrap();
        wal.wait_durable(first).await.unwrap();
        assert_eq!(wal.poisoned_because(), None);
        arm(&store);
        // The first append is always queued (the writer has not seen it yet);
        // the others may already find the log poisoned, which is right too.
        let mut waiters = Vec::new();
        for _ in 0..3 {
            match wal.append(&allocations_set(1)) {
                Ok(seq) => {
                    let wal = wal.clone();
                    waiters.push(tokio::spawn(async move { wal.wait_durable(seq).await }));
                }
                Err(error) => assert!(matches!(error, WalError::Poisoned(_)), "{error:?}"),
            }
        }
        assert!(!waiters.is_empty());
        for waiter in waiters {
            let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiter is told at once, not left hanging")
                .unwrap();
            assert!(
                matches!(&waited, Err(WalError::Poisoned(reason)) if reason.contains(said)),
                "{waited:?}"
            );
        }
        let reason = tokio::time::timeout(Duration::from_secs(5), wal.poisoned())
            .await
            .unwrap();
        assert!(
            reason.contains("panicked") && reason.contains(said),
            "{reason}"
        );
        let later = wal.append(&allocations_set(1));
        assert!(matches!(later, Err(WalError::Poisoned(_))), "{later:?}");
        writer.shutdown();
        assert!(
            wal.poisoned_because().is_some(),
            "still poisoned after the stop"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_stores_flush_poisons_the_wal_and_fails_every_waiter() {
        let arm = |s: &PanickingStore| s.panic_in_flush.store(true, Ordering::SeqCst);
        a_dead_writer_poisons_the_log(arm, "sled's flush blew up").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_stores_append_poisons_the_wal_and_fails_every_waiter() {
        let arm = |s: &PanickingStore| s.panic_in_append.store(true, Ordering::SeqCst);
        a_dead_writer_poisons_the_log(arm, "sled's append blew up").await;
    }

    #[tokio::test]
    async fn a_requested_shutdown_does_not_poison() {
        let (wal, writer, _durable) =
            Wal::start(Arc::new(MemoryLog::default()), WalConfig::default(), 0).unwrap();
        let seq = wal.append(&allocations_set(1)).unwrap();
        wal.wait_durable(seq).await.unwrap();
        writer.shutdown();
        assert_eq!(wal.poisoned_because(), None);
        assert_eq!(wal.append(&allocations_set(1)), Err(WalError::Closed));
    }

    #[tokio::test]
    async fn a_record_over_the_limit_is_refused_with_its_size_and_leaves_no_gap() {
        let store = MemoryLog::default();
        let (wal, writer, _durable) =
            Wal::start(Arc::new(store.clone()), WalConfig::default(), 0).unwrap();
        let too_large = allocations_set(3 * quotad_core::record::BULK_SLICES_MAX);
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

    /// Batched mode answers at once while the writer keeps up, and waits for
    /// the flush once a stalled disk has put it behind: the answers a crash
    /// can lose stay within one window instead of growing with the stall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_answers_wait_for_the_flush_once_the_writer_falls_behind() {
        let store = Arc::new(crate::storage::log::testing::HeldFlushes::default());
        let config = WalConfig {
            durability: Durability::Batched,
            batched_flush_interval_ms: 5,
            ..WalConfig::default()
        };
        let (wal, writer, _durable) = Wal::start(store.clone(), config, 0).unwrap();
        store.hold();
        let first = wal.append(&allocations_set(1)).unwrap();
        let answered = tokio::time::timeout(Duration::from_millis(500), wal.wait_durable(first));
        assert!(
            matches!(answered.await, Ok(Ok(()))),
            "an idle writer keeps up: the answer goes at once"
        );
        // The first flush is stalled: well past the window, the writer is behind.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = wal.append(&allocations_set(1)).unwrap();
        let waiting = tokio::spawn({
            let wal = wal.clone();
            async move { wal.wait_durable(second).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "behind the disk, a batched answer waited for its flush"
        );
        store.let_go();
        let waited = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(waited, Ok(Ok(Ok(())))), "{waited:?}");
        assert!(wal.is_durable(second));
        writer.shutdown();
    }

    /// Two actors can queue their positions out of order; the writer holds
    /// the later one back until the earlier arrives, so the log never has a
    /// hole that a crash could leave behind (recovery calls a hole damage).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_position_queued_early_is_written_only_after_the_one_before_it() {
        let store = Arc::new(MemoryLog::default());
        let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        let bytes = codec::encode(&allocations_set(1)).unwrap();
        let first = wal.shared.next_seq.fetch_add(1, Ordering::AcqRel);
        let second = wal.shared.next_seq.fetch_add(1, Ordering::AcqRel);
        wal.tx
            .send(Message::Record((second, bytes.clone())))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            store.read_after(0).unwrap().is_empty(),
            "written ahead of the position before it"
        );
        assert!(!wal.is_durable(second));
        wal.tx.send(Message::Record((first, bytes))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), wal.wait_durable(second))
            .await
            .unwrap()
            .unwrap();
        let written: Vec<u64> = store
            .read_after(0)
            .unwrap()
            .iter()
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(written, [first, second]);
        writer.shutdown();
    }
}
