//! Snapshots to Postgres. The local snapshot thread tells a
//! [`PostgresFollower`] about every durable record it applies; every interval
//! the follower turns what changed into a [`Delta`] and hands it to a writer
//! thread, which writes it in one transaction together with the WAL position
//! it covers. Only after that commit may the sled WAL be truncated up to that
//! position ([`Follower::truncate_floor`]).
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};

use std::collections::HashMap;

use super::rows::{Changes, Delta, UsageRow};
use super::{connect, PostgresError};
use crate::config::Secret;
use crate::storage::history::{self, Decision, History, HistoryId, HistoryPosition, RecoverFrom};
use crate::storage::snapshot::Follower;
use crate::storage::{codec, LogStore};
use crate::telemetry;
use quotad_core::{Record, SchoolId, State, TimestampMs};

/// The first wait after a failed write; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
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

/// What the writer found when Postgres first answered.
struct Attach {
    committed_seq: u64,
    history_written: HashMap<SchoolId, u64>,
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

struct Writer {
    /// This process's name in `quotad_snapshot.writer`.
    writer_id: String,
    /// The history and epoch this quotad attached to; None until a detached
    /// writer attaches (no delta comes before that).
    history: Option<History>,
    url: Secret,
    client: Option<Client>,
    shared: Arc<Shared>,
    /// The WAL, for usage rows a delta did not carry (see [`Delta::usage_from_wal`]).
    store: Arc<dyn LogStore>,
}

impl Writer {
    fn run(
        mut self,
        mut receiver: mpsc::Receiver<Delta>,
        attach: Option<(crossbeam_channel::Sender<Attach>, HistoryPosition)>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the Postgres writer; snapshots stopped");
                return;
            }
        };
        runtime.block_on(async move {
            if let Some((attach, local)) = attach {
                if !self.attach(&attach, &local).await {
                    return;
                }
            }
            while let Some(delta) = receiver.recv().await {
                if !self.write_until_done(&delta).await {
                    return;
                }
            }
        });
    }

    /// Connects (applying migrations) until Postgres answers, with backoff,
    /// and attaches; false when shutdown came first or the data directory
    /// and Postgres have diverged.
    async fn attach(
        &mut self,
        attach: &crossbeam_channel::Sender<Attach>,
        local: &HistoryPosition,
    ) -> bool {
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.find_position(local).await {
                Ok(None) => {
                    self.shared.stopped.store(true, Ordering::Release);
                    return false;
                }
                Ok(Some(found)) => {
                    self.warn_if_wal_misses_records_after(found.committed_seq);
                    self.shared
                        .committed_seq
                        .store(found.committed_seq, Ordering::Release);
                    return attach.send(found).is_ok();
                }
                Err(error) => {
                    telemetry::postgres_snapshot_failed();
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "Postgres does not answer; the WAL keeps everything, retrying");
                }
            }
            if self.shared.stopping.load(Ordering::Acquire) {
                return false;
            }
            self.sleep(with_jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Says so when the WAL no longer holds the record right after Postgres's
    /// position (quotad ran without Postgres, or this is another database):
    /// the state is written whole, but those records' usage rows are gone.
    fn warn_if_wal_misses_records_after(&self, committed_seq: u64) {
        let first = self
            .store
            .read_range(committed_seq, 1)
            .ok()
            .and_then(|e| e.first().map(|(seq, _)| *seq));
        if first.is_some_and(|first| first > committed_seq + 1) {
            tracing::warn!(
                postgres_wal_seq = committed_seq,
                "the WAL no longer holds every record after the Postgres snapshot: the state is \
                 written whole, but the usage log rows of the missing records will not be in ai_usage_logs"
            );
        }
    }

    /// The attach transaction of a writer that started detached: the same
    /// comparison as a start with Postgres ([`history::decide`]), with the
    /// directory's history and position at start. Only serving the directory
    /// is possible now (quotad has been serving it all along); anything else
    /// means they diverged, and nothing is written (None).
    async fn find_position(
        &mut self,
        local: &HistoryPosition,
    ) -> Result<Option<Attach>, PostgresError> {
        let mut client = super::prepare(&self.url.0).await?;
        let new_id = HistoryId::random().map_err(|e| PostgresError::Thread(e.to_string()))?;
        let attaching = super::recover::begin_attach(&mut client).await?;
        let found = attaching.found;
        let history = match history::decide(local, &found, RecoverFrom::Auto, new_id) {
            Decision::Serve {
                history,
                record_locally,
                ..
            } => {
                // Before the commit: a crash between the two leaves a
                // directory that names the history and a Postgres that does
                // not yet, which the next start serves and records again.
                if record_locally {
                    history::write(self.store.as_ref(), &history)
                        .map_err(|e| PostgresError::Wal(e.to_string()))?;
                }
                history
            }
            Decision::Load { .. } => {
                tracing::error!(
                    local = %local,
                    postgres = %found,
                    "Postgres holds state this data directory does not (it was served while \
                     Postgres did not answer): they have diverged, so no snapshot is written and \
                     the WAL keeps everything. Restart quotad with Postgres answering to decide"
                );
                return Ok(None);
            }
            Decision::Refuse(conflict) => {
                tracing::error!(
                    "this data directory, served while Postgres did not answer, diverges from \
                     Postgres; no snapshot is written and the WAL keeps everything. The data \
                     directory: {conflict}"
                );
                return Ok(None);
            }
        };
        let found = Attach {
            committed_seq: found.wal_seq,
            history_written: attaching.history_written().await?,
        };
        attaching.commit(&history).await?;
        tracing::info!(%history, "attached to Postgres");
        self.history = Some(history);
        self.client = Some(client);
        Ok(Some(found))
    }

    /// Writes `delta`, retrying with exponential backoff and jitter until it
    /// commits; at shutdown, until [`FINAL_SNAPSHOT_WAIT`] has passed. False
    /// when fenced: another writer holds the database, and this one stops.
    async fn write_until_done(&mut self, delta: &Delta) -> bool {
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let started = Instant::now();
            match self.write(delta).await {
                Ok(()) => {
                    self.shared
                        .committed_seq
                        .store(delta.wal_seq, Ordering::Release);
                    telemetry::postgres_snapshot_written(started.elapsed(), delta.wal_seq);
                    record_rows(delta);
                    if failures > 0 {
                        tracing::info!(
                            wal_seq = delta.wal_seq,
                            failures,
                            "Postgres snapshot written after failures"
                        );
                    } else {
                        tracing::debug!(
                            wal_seq = delta.wal_seq,
                            rows = delta.rows(),
                            "Postgres snapshot written"
                        );
                    }
                    return true;
                }
                Err(error) if error.is_fenced() => {
                    telemetry::postgres_snapshot_failed();
                    let committed = self.shared.committed_seq.load(Ordering::Acquire);
                    let what_now = match error {
                        PostgresError::Superseded { .. } => {
                            "another quotad has taken this history up from Postgres at a newer \
                             epoch: stop this one, whose changes from now on reach Postgres by \
                             no one's hand. A restart on this data directory is refused until an \
                             operator decides (--recover-from postgres)"
                        }
                        _ => {
                            "another quotad of the same history and epoch writes to this \
                             database (two quotads on copies of one data directory?): stop one \
                             of them"
                        }
                    };
                    tracing::error!(
                        %error,
                        wal_seq = delta.wal_seq,
                        committed_wal_seq = committed,
                        "Postgres snapshots STOPPED: this quotad wrote nothing and writes no more \
                         snapshots; it goes on serving, and its WAL keeps every record after the \
                         last snapshot it wrote. {what_now}"
                    );
                    self.shared.stopped.store(true, Ordering::Release);
                    return false;
                }
                Err(error) => {
                    failures += 1;
                    telemetry::postgres_snapshot_failed();
                    let committed = self.shared.committed_seq.load(Ordering::Acquire);
                    tracing::warn!(
                        %error,
                        attempt = failures,
                        retry_in_ms = backoff.as_millis() as u64,
                        behind_records = delta.wal_seq.saturating_sub(committed),
                        "Postgres snapshot failed; the WAL keeps everything, retrying"
                    );
                    if is_connection_lost(&error) {
                        self.client = None;
                    }
                }
            }
            if self.shared.stopping.load(Ordering::Acquire) {
                let deadline =
                    *stop_deadline.get_or_insert_with(|| Instant::now() + FINAL_SNAPSHOT_WAIT);
                if Instant::now() >= deadline {
                    return true;
                }
            }
            self.sleep(with_jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Sleeps, waking early when shutdown begins (the last snapshot should
    /// not wait out a minute of backoff).
    async fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        while Instant::now() < until {
            if self.shared.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn write(&mut self, delta: &Delta) -> Result<(), PostgresError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.url.0).await?);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(PostgresError::Thread("no Postgres connection".into()));
        };
        let expected = self.shared.committed_seq.load(Ordering::Acquire);
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SNAPSHOT_LOCK])
            .await?;
        let found = match tx
            .query_opt(
                "SELECT wal_seq, writer, history_id, epoch FROM quotad_snapshot WHERE id = 1",
                &[],
            )
            .await?
        {
            Some(row) => Found {
                wal_seq: db_u64(row.get(0)),
                written_by_us: row.get::<_, &str>(1) == self.writer_id,
                history: super::recover::history_from_row(row.get(2), row.get(3))?,
            },
            None => Found::default(),
        };
        match fence(&found, self.history.as_ref(), expected, delta.wal_seq)? {
            Fence::AlreadyCommitted => return Ok(()),
            Fence::Write => {}
        }
        write_delta(&tx, delta, self.store.as_ref()).await?;
        tx.execute(
            "INSERT INTO quotad_snapshot (id, wal_seq, taken_at, writer) VALUES (1, $1, now(), $2)
             ON CONFLICT (id) DO UPDATE SET wal_seq = EXCLUDED.wal_seq,
                 taken_at = EXCLUDED.taken_at, writer = EXCLUDED.writer",
            &[&db_i64(delta.wal_seq), &self.writer_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// What a snapshot transaction finds at its start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fence {
    Write,
    /// An earlier attempt of this very snapshot committed, but its answer was
    /// lost with the connection: nothing to write again.
    AlreadyCommitted,
}

/// What `quotad_snapshot` holds when a snapshot transaction starts.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub wal_seq: u64,
    /// `writer` is this process's id.
    pub written_by_us: bool,
    pub history: Option<History>,
}

/// Postgres must be at this quotad's history and epoch (`ours`): another one
/// means another quotad took the history up from Postgres since (or started
/// another), and this one's state is older than what Postgres holds. It must
/// also hold the position this quotad committed last (`expected`); another
/// position means another writer of the same epoch. Either way nothing is
/// written. The one exception is this very snapshot, written by this process
/// (`written_by_us`): an earlier attempt committed and its answer was lost.
pub(crate) fn fence(
    found: &Found,
    ours: Option<&History>,
    expected: u64,
    delta_seq: u64,
) -> Result<Fence, PostgresError> {
    if ours.is_none() || found.history.as_ref() != ours {
        let name = |h: Option<&History>| h.map_or_else(|| "no history".into(), History::to_string);
        return Err(PostgresError::Superseded {
            found: name(found.history.as_ref()),
            ours: name(ours),
        });
    }
    let found_seq = found.wal_seq;
    if found_seq == expected {
        Ok(Fence::Write)
    } else if found_seq == delta_seq && found_seq > expected && found.written_by_us {
        Ok(Fence::AlreadyCommitted)
    } else {
        Err(PostgresError::Fenced {
            found: found_seq,
            expected,
        })
    }
}

/// A name no other quotad process uses: the host's process id and the start
/// time in nanoseconds.
fn writer_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

fn is_connection_lost(error: &PostgresError) -> bool {
    match error {
        PostgresError::Query(e) => e.is_closed() || e.as_db_error().is_none(),
        PostgresError::Connect(_) => true,
        _ => false,
    }
}

fn with_jitter(backoff: Duration) -> Duration {
    // Up to a quarter more, so that many quotads restarting together do not
    // retry in step. The clock's nanoseconds are random enough for that.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    backoff + backoff.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

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

/// Units, positions and counters are u64 in quotad and bigint in Postgres;
/// quotad caps units far below 2^63, so the clamp never bites in practice.
pub(crate) fn db_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn db_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(crate) fn db_time(at_ms: TimestampMs) -> SystemTime {
    let magnitude = Duration::from_millis(at_ms.unsigned_abs());
    if at_ms >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn db_ms(at: SystemTime) -> TimestampMs {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Every row of the delta, one statement per table (arrays unnested on the
/// server side) and COPY for the usage log: a handful of round trips
/// whatever the size of the snapshot.
async fn write_delta(
    tx: &Transaction<'_>,
    delta: &Delta,
    wal: &dyn LogStore,
) -> Result<(), PostgresError> {
    write_subscriptions(tx, delta).await?;
    write_allocations(tx, delta).await?;
    write_requests(tx, delta).await?;
    write_history(tx, delta).await?;
    write_usage(tx, delta, wal, WAL_READ_RECORDS_MAX).await?;
    write_states(tx, delta).await
}

async fn write_subscriptions(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.subscriptions;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|r| r.school_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    let name: Vec<&str> = rows.iter().map(|r| r.school_name.as_str()).collect();
    let tier: Vec<&str> = rows.iter().map(|r| r.tier).collect();
    let anchor: Vec<i16> = rows.iter().map(|r| r.anchor_day).collect();
    let next_anchor: Vec<Option<i16>> = rows.iter().map(|r| r.next_anchor_day).collect();
    let borrowing: Vec<bool> = rows.iter().map(|r| r.borrowing_enabled).collect();
    let self_service: Vec<bool> = rows.iter().map(|r| r.self_service_requests).collect();
    let start: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle.start_ms)).collect();
    let end: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle.end_ms)).collect();
    let cycle_units: Vec<i64> = rows.iter().map(|r| db_i64(r.pool.cycle_units)).collect();
    let allocated: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.pool.allocated_units))
        .collect();
    let borrowed: Vec<i64> = rows.iter().map(|r| db_i64(r.pool.borrowed_units)).collect();
    let used: Vec<i64> = rows.iter().map(|r| db_i64(r.used_units)).collect();
    let params: [&(dyn ToSql + Sync); 14] = [
        &school,
        &service,
        &name,
        &tier,
        &anchor,
        &next_anchor,
        &borrowing,
        &self_service,
        &start,
        &end,
        &cycle_units,
        &allocated,
        &borrowed,
        &used,
    ];
    tx.execute(
        "INSERT INTO school_ai_subscriptions (school_id, service_type, school_name, tier,
             billing_anchor_day, next_billing_anchor_day, borrowing_enabled, self_service_requests,
             cycle_start, cycle_end, cycle_units, allocated_units, borrowed_units, used_units)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[],
             $6::int2[], $7::bool[], $8::bool[], $9::timestamptz[], $10::timestamptz[],
             $11::int8[], $12::int8[], $13::int8[], $14::int8[])
         ON CONFLICT (school_id, service_type) DO UPDATE SET
             school_name = EXCLUDED.school_name, tier = EXCLUDED.tier,
             billing_anchor_day = EXCLUDED.billing_anchor_day,
             next_billing_anchor_day = EXCLUDED.next_billing_anchor_day,
             borrowing_enabled = EXCLUDED.borrowing_enabled,
             self_service_requests = EXCLUDED.self_service_requests,
             cycle_start = EXCLUDED.cycle_start, cycle_end = EXCLUDED.cycle_end,
             cycle_units = EXCLUDED.cycle_units, allocated_units = EXCLUDED.allocated_units,
             borrowed_units = EXCLUDED.borrowed_units, used_units = EXCLUDED.used_units,
             updated_at = now()",
        &params,
    )
    .await?;
    Ok(())
}

/// Replaces the rows of every changed teacher: a slice removed since the last
/// snapshot loses its row.
async fn write_allocations(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    if delta.teachers.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = delta.teachers.iter().map(|(s, _)| s.as_str()).collect();
    let teacher: Vec<&str> = delta.teachers.iter().map(|(_, t)| t.as_str()).collect();
    tx.execute(
        "DELETE FROM teacher_ai_allocations a
          USING unnest($1::text[], $2::text[]) AS d(school_id, teacher_id)
          WHERE a.school_id = d.school_id AND a.teacher_id = d.teacher_id",
        &[&school, &teacher],
    )
    .await?;
    let rows = &delta.allocations;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|r| r.school_id.as_str()).collect();
    let teacher: Vec<&str> = rows.iter().map(|r| r.teacher_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    let allocated: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.allocated_units))
        .collect();
    let used: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.total_used_units()))
        .collect();
    let reserved: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.reserved_units))
        .collect();
    let borrowed: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.borrowed_units))
        .collect();
    let overage: Vec<i64> = rows.iter().map(|r| db_i64(r.slice.overage_units)).collect();
    let priority: Vec<&str> = rows.iter().map(|r| r.slice.priority.as_str()).collect();
    let auto_renew: Vec<bool> = rows.iter().map(|r| r.slice.auto_renew).collect();
    let status: Vec<&str> = rows.iter().map(|r| r.slice.status.as_str()).collect();
    let start: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle_start_ms)).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &school,
        &teacher,
        &service,
        &allocated,
        &used,
        &reserved,
        &borrowed,
        &overage,
        &priority,
        &auto_renew,
        &status,
        &start,
    ];
    tx.execute(
        "INSERT INTO teacher_ai_allocations (school_id, teacher_id, service_type, allocated_units,
             used_units, reserved_units, borrowed_units, overage_units, priority, auto_renew,
             status, cycle_start)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[],
             $6::int8[], $7::int8[], $8::int8[], $9::text[], $10::bool[], $11::text[],
             $12::timestamptz[])",
        &params,
    )
    .await?;
    Ok(())
}

async fn write_requests(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.requests;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    let id: Vec<i64> = rows.iter().map(|(_, r)| db_i64(r.id)).collect();
    let teacher: Vec<&str> = rows.iter().map(|(_, r)| r.teacher_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|(_, r)| r.service.as_str()).collect();
    let units: Vec<i64> = rows.iter().map(|(_, r)| db_i64(r.units)).collect();
    let reason: Vec<&str> = rows.iter().map(|(_, r)| &*r.reason).collect();
    let status: Vec<&str> = rows.iter().map(|(_, r)| r.status.as_str()).collect();
    let approved: Vec<i64> = rows
        .iter()
        .map(|(_, r)| match r.status {
            quotad_core::RequestStatus::Approved { units } => db_i64(units),
            _ => 0,
        })
        .collect();
    let decision_reason: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, r)| r.decision_reason.as_deref())
        .collect();
    let decided_by: Vec<Option<&str>> = rows.iter().map(|(_, r)| r.decided_by.as_deref()).collect();
    let created: Vec<SystemTime> = rows.iter().map(|(_, r)| db_time(r.created_at_ms)).collect();
    let decided: Vec<Option<SystemTime>> = rows
        .iter()
        .map(|(_, r)| r.decided_at_ms.map(db_time))
        .collect();
    let expires: Vec<SystemTime> = rows
        .iter()
        .map(|(_, r)| db_time(r.expires_at_ms()))
        .collect();
    let params: [&(dyn ToSql + Sync); 13] = [
        &school,
        &id,
        &teacher,
        &service,
        &units,
        &reason,
        &status,
        &approved,
        &decision_reason,
        &decided_by,
        &created,
        &decided,
        &expires,
    ];
    tx.execute(
        "INSERT INTO ai_allocation_requests (school_id, request_id, teacher_id, service_type,
             requested_units, reason, status, approved_units, decision_reason, decided_by,
             created_at, decided_at, expires_at)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[],
             $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::timestamptz[],
             $12::timestamptz[], $13::timestamptz[])
         ON CONFLICT (school_id, request_id) DO UPDATE SET
             status = EXCLUDED.status, approved_units = EXCLUDED.approved_units,
             decision_reason = EXCLUDED.decision_reason, decided_by = EXCLUDED.decided_by,
             decided_at = EXCLUDED.decided_at",
        &params,
    )
    .await?;
    Ok(())
}

/// Appends audit entries. An entry already there (a snapshot retried after
/// a commit whose answer was lost) is left alone: the table is append-only.
async fn write_history(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.history;
    if rows.is_empty() {
        return Ok(());
    }
    let json =
        |values| serde_json::to_string(values).map_err(|e| PostgresError::Encode(e.to_string()));
    let school: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    let seq: Vec<i64> = rows.iter().map(|(_, e)| db_i64(e.seq)).collect();
    let at: Vec<SystemTime> = rows.iter().map(|(_, e)| db_time(e.at_ms)).collect();
    let actor: Vec<&str> = rows.iter().map(|(_, e)| &*e.actor).collect();
    let action: Vec<&str> = rows.iter().map(|(_, e)| e.action.as_str()).collect();
    let teacher: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, e)| e.teacher_id.as_ref().map(|t| t.as_str()))
        .collect();
    let service: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, e)| e.service.as_ref().map(|s| s.as_str()))
        .collect();
    let reason: Vec<&str> = rows.iter().map(|(_, e)| &*e.reason).collect();
    let before = rows
        .iter()
        .map(|(_, e)| json(&e.before))
        .collect::<Result<Vec<String>, _>>()?;
    let after = rows
        .iter()
        .map(|(_, e)| json(&e.after))
        .collect::<Result<Vec<String>, _>>()?;
    let prev_hash: Vec<&[u8]> = rows.iter().map(|(_, e)| &e.prev_hash[..]).collect();
    let hash: Vec<&[u8]> = rows.iter().map(|(_, e)| &e.hash[..]).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &school, &seq, &at, &actor, &action, &teacher, &service, &reason, &before, &after,
        &prev_hash, &hash,
    ];
    tx.execute(
        "INSERT INTO ai_allocation_history (school_id, seq, at, actor, action, teacher_id,
             service_type, reason, before, after, prev_hash, hash)
         SELECT s, q, a, ac, act, t, sv, r, b::jsonb, af::jsonb, ph, h
           FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[],
                $12::bytea[]) AS u(s, q, a, ac, act, t, sv, r, b, af, ph, h)
         ON CONFLICT (school_id, seq) DO NOTHING",
        &params,
    )
    .await?;
    Ok(())
}

/// WAL records read back per piece when a delta's usage rows are in the WAL only.
const WAL_READ_RECORDS_MAX: usize = 10_000;

/// The usage log goes in with binary COPY: it is the one table that grows
/// with traffic, thousands of rows per snapshot under load. Rows the delta
/// did not carry (a catch-up, or more than memory holds) are read from the
/// WAL piece by piece into the same COPY, so memory stays bounded however far
/// behind Postgres is.
async fn write_usage(
    tx: &Transaction<'_>,
    delta: &Delta,
    wal: &dyn LogStore,
    wal_read_records_max: usize,
) -> Result<(), PostgresError> {
    if delta.usage.is_empty() && delta.usage_from_wal.is_none() {
        return Ok(());
    }
    let sink = tx
        .copy_in(
            "COPY ai_usage_logs (wal_seq, event_id, reservation_id, school_id, teacher_id,
                 service_type, units, borrowed_units, overage_units, model, decision,
                 cycle_start, occurred_at, recorded_at) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for row in &delta.usage {
        write_usage_row(writer.as_mut(), row).await?;
    }
    if let Some((after, through)) = delta.usage_from_wal {
        let mut cursor = after;
        while cursor < through {
            let entries = wal
                .read_range(cursor, wal_read_records_max)
                .map_err(|e| PostgresError::Wal(e.to_string()))?;
            let Some(last) = entries.last().map(|(seq, _)| *seq) else {
                break;
            };
            for (seq, bytes) in entries.iter().filter(|(seq, _)| *seq <= through) {
                let record: Record = codec::decode(bytes)
                    .map_err(|e| PostgresError::Wal(format!("record {seq}: {e}")))?;
                if let Some(row) = UsageRow::from_record(*seq, &record) {
                    write_usage_row(writer.as_mut(), &row).await?;
                }
            }
            cursor = last;
        }
    }
    writer.finish().await?;
    Ok(())
}

async fn write_usage_row(
    writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    row: &UsageRow,
) -> Result<(), PostgresError> {
    let values: [&(dyn ToSql + Sync); 14] = [
        &db_i64(row.wal_seq),
        &row.event_id,
        &row.reservation_id,
        &row.school_id.as_str(),
        &row.teacher_id.as_str(),
        &row.service.as_str(),
        &db_i64(row.units),
        &db_i64(row.borrowed_units),
        &db_i64(row.overage_units),
        &row.model,
        &row.decision,
        &db_time(row.cycle_start_ms),
        &db_time(row.occurred_at_ms),
        &db_time(row.recorded_at_ms),
    ];
    writer.write(&values).await?;
    Ok(())
}

async fn write_states(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let seq = db_i64(delta.wal_seq);
    if !delta.school_states.is_empty() {
        let school: Vec<&str> = delta
            .school_states
            .iter()
            .map(|(s, _)| s.as_str())
            .collect();
        let state: Vec<&[u8]> = delta.school_states.iter().map(|(_, b)| &b[..]).collect();
        tx.execute(
            "INSERT INTO quotad_school_state (school_id, wal_seq, state)
             SELECT s, $3, b FROM unnest($1::text[], $2::bytea[]) AS u(s, b)
             ON CONFLICT (school_id) DO UPDATE SET wal_seq = EXCLUDED.wal_seq, state = EXCLUDED.state",
            &[&school, &state, &seq],
        )
        .await?;
    }
    if !delta.account_states.is_empty() {
        let rows = &delta.account_states;
        let school: Vec<&str> = rows.iter().map(|(s, _, _)| s.as_str()).collect();
        let teacher: Vec<&str> = rows.iter().map(|(_, t, _)| t.as_str()).collect();
        let state: Vec<&[u8]> = rows.iter().map(|(_, _, b)| &b[..]).collect();
        tx.execute(
            "INSERT INTO quotad_account_state (school_id, teacher_id, wal_seq, state)
             SELECT s, t, $4, b FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(s, t, b)
             ON CONFLICT (school_id, teacher_id) DO UPDATE SET
                 wal_seq = EXCLUDED.wal_seq, state = EXCLUDED.state",
            &[&school, &teacher, &state, &seq],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
