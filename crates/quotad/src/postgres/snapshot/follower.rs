//! The follower side of Postgres snapshots, on the local snapshot thread:
//! it notes what every applied record changed, hands the accumulated changes
//! to the writer thread each interval (unless the writer is still busy),
//! exports the lag, and at shutdown waits a bounded time for the last
//! snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::writer::{writer_id, Writer};
use super::{Attach, Shared, FINAL_SNAPSHOT_WAIT};
use crate::config::Secret;
use crate::postgres::rows::{Changes, Delta};
use crate::postgres::PostgresError;
use crate::storage::history::{History, HistoryPosition};
use crate::storage::snapshot::Follower;
use crate::storage::LogStore;
use crate::telemetry;
use quotad_core::{Record, State};

/// The [`Follower`] that snapshots to Postgres: it runs on the local snapshot
/// thread and hands each interval's changes to its writer thread.
pub struct PostgresFollower {
    changes: Changes,
    interval: Duration,
    sender: Option<mpsc::Sender<Delta>>,
    shared: Arc<Shared>,
    /// The position handed to the writer last, and since when its oldest change waits.
    in_flight: Option<(u64, Instant)>,
    /// Since when the oldest change not yet handed over waits.
    unsent_since: Option<Instant>,
    thread: Option<JoinHandle<()>>,
    done: crossbeam_channel::Receiver<()>,
    /// Set while Postgres has not answered since the start: see [`PostgresFollower::start_detached`].
    detached: Option<crossbeam_channel::Receiver<Attach>>,
}

impl PostgresFollower {
    /// Starts the writer thread. `committed_seq` is the position Postgres
    /// already covers; `changes` is what the state holds beyond it;
    /// `history` is the history and epoch start-up attached to, which every
    /// commit checks Postgres is still at.
    pub fn start(
        url: Secret,
        interval: Duration,
        store: Arc<dyn LogStore>,
        committed_seq: u64,
        changes: Changes,
        history: History,
    ) -> Result<Self, PostgresError> {
        let pending = !changes.is_empty();
        let mut follower = Self::spawn(url, interval, store, committed_seq, Some(history), None)?;
        follower.changes = changes;
        follower.unsent_since = pending.then(Instant::now);
        Ok(follower)
    }

    /// Starts without Postgres, which did not answer at start-up: quotad
    /// serves from its data directory, the WAL is not truncated at all, and
    /// the writer keeps trying to connect (with backoff). When Postgres
    /// answers, the writer compares it with `local` (what the data directory
    /// held at start) as a start with both would; when the directory is at
    /// Postgres's history (or Postgres has none) and not behind it, the
    /// follower catches Postgres up from the state and the WAL after its
    /// position. Otherwise they have diverged and nothing is written.
    pub fn start_detached(
        url: Secret,
        interval: Duration,
        store: Arc<dyn LogStore>,
        local: HistoryPosition,
    ) -> Result<Self, PostgresError> {
        let (attach_tx, attached) = crossbeam_channel::bounded(1);
        let mut follower = Self::spawn(url, interval, store, 0, None, Some((attach_tx, local)))?;
        follower.detached = Some(attached);
        Ok(follower)
    }

    fn spawn(
        url: Secret,
        interval: Duration,
        store: Arc<dyn LogStore>,
        committed_seq: u64,
        history: Option<History>,
        attach: Option<(crossbeam_channel::Sender<Attach>, HistoryPosition)>,
    ) -> Result<Self, PostgresError> {
        let shared = Arc::new(Shared {
            committed_seq: AtomicU64::new(committed_seq),
            stopping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let (sender, receiver) = mpsc::channel(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let writer = Writer {
            writer_id: writer_id(),
            history,
            url,
            client: None,
            shared: shared.clone(),
            store,
        };
        let thread = std::thread::Builder::new()
            .name("quotad-postgres".into())
            .spawn(move || {
                writer.run(receiver, attach);
                let _ = done_tx.send(());
            })
            .map_err(|e| PostgresError::Thread(e.to_string()))?;
        Ok(Self {
            changes: Changes::default(),
            interval,
            sender: Some(sender),
            shared,
            in_flight: None,
            unsent_since: None,
            thread: Some(thread),
            done,
            detached: None,
        })
    }

    /// Once Postgres answered and the writer attached to it: everything the
    /// state holds and the usage rows of the WAL records after Postgres's
    /// position become the first delta. (The writer compared histories and
    /// positions; when they diverged it sends nothing and stops, and the
    /// follower stays detached: no snapshot, no truncation.)
    fn try_attach(&mut self, state: &State, applied_seq: u64) {
        let Some(detached) = &self.detached else {
            return;
        };
        let Ok(attach) = detached.try_recv() else {
            return;
        };
        let mut changes = Changes::everything(state, attach.history_written);
        changes.take_usage_from_wal();
        tracing::info!(
            postgres_wal_seq = attach.committed_seq,
            local_wal_seq = applied_seq,
            "Postgres answers; the next snapshot catches it up"
        );
        self.changes = changes;
        self.unsent_since = Some(Instant::now());
        self.detached = None;
    }

    fn committed_seq(&self) -> u64 {
        self.shared.committed_seq.load(Ordering::Acquire)
    }

    fn writer_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Whether the writer has finished what it was handed last (a stopped
    /// writer will finish nothing more: nothing is waited for).
    fn writer_idle(&mut self) -> bool {
        if self.writer_stopped() {
            self.in_flight = None;
            return true;
        }
        match self.in_flight {
            Some((seq, _)) if self.committed_seq() < seq => false,
            _ => {
                self.in_flight = None;
                true
            }
        }
    }

    /// Hands what changed to the writer, unless it is still busy (then the
    /// changes keep accumulating and go in the next snapshot).
    fn hand_over(&mut self, state: &mut State, applied_seq: u64) {
        if !self.writer_idle() || applied_seq <= self.committed_seq() {
            return;
        }
        if self.writer_stopped() {
            // The writer said why, loudly, when it stopped.
            self.sender = None;
        }
        if self.sender.is_none() {
            return;
        }
        let usage_in_wal_only = self.changes.usage_in_wal_only();
        let mut delta = match self.changes.take(state, applied_seq) {
            Ok(delta) => delta,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a Postgres snapshot; the WAL keeps everything");
                return;
            }
        };
        if usage_in_wal_only {
            delta.usage_from_wal = Some((self.committed_seq(), applied_seq));
        }
        let Some(sender) = &self.sender else { return };
        if let Err(e) = sender.try_send(delta) {
            // Cannot happen while the writer is idle and alive; if it does,
            // the changes are still in the WAL, and the next start writes them.
            tracing::error!(error = %e, "the Postgres writer is gone; snapshots stopped");
            self.sender = None;
            return;
        }
        let since = self.unsent_since.take().unwrap_or_else(Instant::now);
        self.in_flight = Some((applied_seq, since));
    }

    fn report_lag(&mut self, applied_seq: u64) {
        let committed = self.committed_seq();
        self.writer_idle();
        let oldest = [self.in_flight.map(|(_, since)| since), self.unsent_since]
            .into_iter()
            .flatten()
            .min();
        telemetry::postgres_snapshot_lag(
            applied_seq.saturating_sub(committed),
            oldest.map_or(Duration::ZERO, |since| since.elapsed()),
        );
    }
}

impl Follower for PostgresFollower {
    fn applied(&mut self, wal_seq: u64, record: &Record, state: &State) {
        self.unsent_since.get_or_insert_with(Instant::now);
        // While detached nothing is noted: attaching starts from the state.
        if self.detached.is_none() {
            self.changes.note(wal_seq, record, state);
        }
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn tick(&mut self, state: &mut State, applied_seq: u64) {
        self.try_attach(state, applied_seq);
        if self.detached.is_none() {
            self.hand_over(state, applied_seq);
        }
        self.report_lag(applied_seq);
    }

    fn refresh(&mut self, applied_seq: u64) {
        self.report_lag(applied_seq);
    }

    fn truncate_floor(&self) -> u64 {
        if self.detached.is_some() {
            return 0;
        }
        self.committed_seq()
    }

    fn finish(&mut self, state: &mut State, applied_seq: u64) {
        let deadline = Instant::now() + FINAL_SNAPSHOT_WAIT;
        self.try_attach(state, applied_seq);
        self.shared.stopping.store(true, Ordering::Release);
        // Wait for the write in flight, then hand over the rest.
        while !self.writer_idle() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.detached.is_none() {
            self.hand_over(state, applied_seq);
        }
        self.sender = None;
        let waited = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        if waited.is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        let committed = self.committed_seq();
        if self.writer_stopped() {
            // Not "the next start writes them": that start is refused or
            // decided afresh (see crate::storage::history).
            tracing::error!(
                committed_wal_seq = committed,
                applied_wal_seq = applied_seq,
                "Postgres snapshots were stopped (said above): the WAL keeps every record after \
                 the last snapshot this quotad wrote"
            );
        } else if committed < applied_seq {
            tracing::warn!(
                committed_wal_seq = committed,
                applied_wal_seq = applied_seq,
                "Postgres did not take the last snapshot before shutdown; the WAL keeps those \
                 records and the next start writes them"
            );
        } else {
            tracing::info!(wal_seq = committed, "final Postgres snapshot written");
        }
        self.report_lag(applied_seq);
    }
}
