//! Attaching a writer that started without Postgres (it did not answer at
//! start-up): connect with backoff until it answers, then compare its
//! history and position with the data directory's, as a start with both
//! would, and either catch Postgres up or write nothing.

use std::sync::atomic::Ordering;

use super::writer::{with_jitter, Writer, BACKOFF_FIRST, BACKOFF_MAX};
use super::Attach;
use crate::postgres::recover::begin_attach;
use crate::postgres::{prepare, PostgresError};
use crate::storage::history::{self, Decision, HistoryId, HistoryPosition, RecoverFrom};
use crate::telemetry;

impl Writer {
    /// Connects (applying migrations) until Postgres answers, with backoff,
    /// and attaches; false when shutdown came first or the data directory
    /// and Postgres have diverged.
    pub(super) async fn attach(
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
        let mut client = prepare(&self.url.0).await?;
        let new_id = HistoryId::random().map_err(|e| PostgresError::Thread(e.to_string()))?;
        let attaching = begin_attach(&mut client).await?;
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
}
