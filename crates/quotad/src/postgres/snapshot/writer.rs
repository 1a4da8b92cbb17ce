//! The writer thread of Postgres snapshots: it writes each delta the
//! follower hands it in one fenced transaction, retrying with backoff while
//! Postgres fails, and stops for good when another writer holds the database.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::fence::{fence, record_position, Fence, Found};
use super::tables::write_delta;
use super::{record_rows, Attach, Shared, FINAL_SNAPSHOT_WAIT, SNAPSHOT_LOCK};
use crate::config::Secret;
use crate::postgres::rows::Delta;
use crate::postgres::{connect, PostgresError};
use crate::storage::history::{History, HistoryPosition};
use crate::storage::LogStore;
use crate::telemetry;

/// The first wait after a failed write; it doubles up to [`BACKOFF_MAX`].
pub(super) const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The writer thread's state: its connection, and what every commit is
/// fenced with.
pub(super) struct Writer {
    /// This process's name in `quotad_snapshot.writer`.
    pub(super) writer_id: String,
    /// The history and epoch this quotad attached to; None until a detached
    /// writer attaches (no delta comes before that).
    pub(super) history: Option<History>,
    pub(super) url: Secret,
    pub(super) client: Option<Client>,
    pub(super) shared: Arc<Shared>,
    /// The WAL, for usage rows a delta did not carry (see [`Delta::usage_from_wal`]).
    pub(super) store: Arc<dyn LogStore>,
}

impl Writer {
    /// The thread's body: attach first when started detached, then write
    /// every delta handed over until the follower hangs up or a fence stops it.
    pub(super) fn run(
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

    /// Writes `delta`, retrying with exponential backoff and jitter until it
    /// commits; at shutdown, until [`FINAL_SNAPSHOT_WAIT`] has passed. False
    /// when fenced: another writer holds the database, and this one stops.
    pub(super) async fn write_until_done(&mut self, delta: &Delta) -> bool {
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let started = Instant::now();
            match self.write(delta).await {
                Ok(()) => {
                    self.written(delta, started, failures);
                    return true;
                }
                Err(error) if error.is_fenced() => {
                    self.stop_fenced(&error, delta);
                    return false;
                }
                Err(error) => {
                    failures += 1;
                    self.failed(&error, delta, failures, backoff);
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

    /// `delta` committed (the attempt began at `started`, after `failures`
    /// failed ones): the follower may now let the WAL be truncated up to it.
    fn written(&self, delta: &Delta, started: Instant, failures: u32) {
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
    }

    /// Another writer holds the database: retrying cannot help. Says so
    /// loudly, with what the operator should do, and stops for good.
    fn stop_fenced(&self, error: &PostgresError, delta: &Delta) {
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
    }

    /// Attempt `attempt` at `delta` failed and is retried after `backoff`
    /// (plus jitter); a lost connection is opened afresh for the next one.
    fn failed(&mut self, error: &PostgresError, delta: &Delta, attempt: u32, backoff: Duration) {
        telemetry::postgres_snapshot_failed();
        let committed = self.shared.committed_seq.load(Ordering::Acquire);
        tracing::warn!(
            %error,
            attempt,
            retry_in_ms = backoff.as_millis() as u64,
            behind_records = delta.wal_seq.saturating_sub(committed),
            "Postgres snapshot failed; the WAL keeps everything, retrying"
        );
        if is_connection_lost(error) {
            self.client = None;
        }
    }

    /// Sleeps, waking early when shutdown begins (the last snapshot should
    /// not wait out a minute of backoff).
    pub(super) async fn sleep(&self, total: Duration) {
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
        let found = Found::read(&tx, &self.writer_id).await?;
        match fence(&found, self.history.as_ref(), expected, delta.wal_seq)? {
            Fence::AlreadyCommitted => return Ok(()),
            Fence::Write => {}
        }
        write_delta(&tx, delta, self.store.as_ref()).await?;
        record_position(&tx, delta.wal_seq, &self.writer_id).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// A name no other quotad process uses: the host's process id and the start
/// time in nanoseconds.
pub(super) fn writer_id() -> String {
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

pub(super) fn with_jitter(backoff: Duration) -> Duration {
    // Up to a quarter more, so that many quotads restarting together do not
    // retry in step. The clock's nanoseconds are random enough for that.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    backoff + backoff.mul_f64(f64::from(nanos % 1000) / 4000.0)
}
