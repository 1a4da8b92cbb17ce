//! Flushing the journal: commits first (replayed with Commit), then usage
//! events in SyncUsage batches, each entry as the school and teacher it was
//! recorded for. Each call is retried with exponential backoff and jitter
//! while the server cannot be reached, a bounded number of times per run;
//! entries leave the journal only after the server answered for them. An
//! entry the server refuses for good is dropped (logged, counted as
//! rejected) so that it cannot block the others; a refusal of the caller
//! (auth) keeps everything and stops the run.
//!
//! Known limitation: a commit journaled offline is replayed with Commit,
//! which charges the billing cycle current when the replay reaches the
//! server. A hold committed before a cycle rollover and synced after it is
//! charged to the new cycle.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::{Code, Status};

use crate::client::{is_unreachable, lock, QuotaClient};
use crate::journal::{PendingKind, PendingUsage};
use crate::proto::{self, SyncStatus};
use crate::ClientError;

/// What one flush run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries the server charged now.
    pub accepted: usize,
    /// Of those, the ones charged past the slice.
    pub over_quota: usize,
    /// Entries the server had counted already.
    pub duplicates: usize,
    /// Entries the server refused (logged with the reason); they leave the journal.
    pub rejected: usize,
    /// Entries still in the journal after the run.
    pub still_queued: usize,
    /// Why the run stopped early, if it did (server unreachable after every
    /// attempt, or a refusal of a whole batch).
    pub stopped: Option<String>,
}

/// The delay before retry `attempt` (0 for the first retry): `initial`
/// doubled per attempt, capped at `max`, then scaled into [50 %, 100 %] by
/// `jitter_unit` (in [0, 1]) so that devices coming back together spread out.
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration, jitter_unit: f64) -> Duration {
    let doubled = initial.saturating_mul(2u32.saturating_pow(attempt.min(31)));
    doubled
        .min(max)
        .mul_f64(0.5 + 0.5 * jitter_unit.clamp(0.0, 1.0))
}

impl QuotaClient {
    /// One flush run. Never fails: what could not be sent stays in the
    /// journal for the next run, and the report says why it stopped.
    pub async fn sync_now(&self) -> SyncReport {
        let _running = self.inner.sync_running.lock().await;
        let mut report = SyncReport::default();
        if let Err(stop) = self.sync_commits(&mut report).await {
            report.stopped = Some(stop);
        } else if let Err(stop) = self.sync_events(&mut report).await {
            report.stopped = Some(stop);
        }
        report.still_queued = lock(&self.inner.journal).len();
        if report.accepted + report.duplicates + report.rejected > 0 || report.stopped.is_some() {
            tracing::info!(
                accepted = report.accepted,
                duplicates = report.duplicates,
                rejected = report.rejected,
                still_queued = report.still_queued,
                stopped = report.stopped.as_deref().unwrap_or(""),
                "journal synced"
            );
        }
        report
    }

    fn pending_of(&self, kind: PendingKind, max: usize) -> Vec<PendingUsage> {
        lock(&self.inner.journal)
            .pending()
            .filter(|p| p.kind == kind)
            .take(max)
            .cloned()
            .collect()
    }

    /// The oldest pending events of the oldest pending event's school: one
    /// SyncUsage call is about one school.
    fn next_event_batch(&self, max: usize) -> Vec<PendingUsage> {
        let journal = lock(&self.inner.journal);
        let mut events = journal.pending().filter(|p| p.kind == PendingKind::Event);
        let Some(first) = events.next() else {
            return Vec::new();
        };
        let same_school = events.filter(|p| p.school_id == first.school_id);
        std::iter::once(first)
            .chain(same_school)
            .take(max)
            .cloned()
            .collect()
    }

    /// Sends the events in batches. A batch refused as a whole (a server whose
    /// `sync_events_per_batch_max` is below ours, or one bad entry) is halved
    /// and sent again, down to one entry, which is then dropped as refused.
    /// The smaller size holds for the rest of the run.
    async fn sync_events(&self, report: &mut SyncReport) -> Result<(), String> {
        let mut batch_max = self.inner.config.sync_batch_events_max.max(1);
        loop {
            let batch = self.next_event_batch(batch_max);
            let Some(first) = batch.first() else {
                return Ok(());
            };
            match self.send_with_retries(&batch).await? {
                Ok(results) => self.settle(&batch, &results, report).await?,
                Err(status) if batch.len() > 1 => {
                    batch_max = batch.len() / 2;
                    tracing::warn!(%status, batch_max, "sync: the server refused a whole batch; sending smaller ones");
                }
                Err(status) => self.drop_refused(first, &status, report).await?,
            }
        }
    }

    /// Replays journaled commits, each as the school and teacher it was
    /// made for. A reservation the server does not know (the reserve never
    /// reached it) is synced as a usage event with its id.
    async fn sync_commits(&self, report: &mut SyncReport) -> Result<(), String> {
        for pending in self.pending_of(PendingKind::Commit, usize::MAX) {
            let request = proto::CommitRequest {
                school_id: pending.school_id.clone(),
                teacher_id: pending.teacher_id.clone(),
                reservation_id: pending.id.clone(),
                actual_units: pending.units,
            };
            let answer = self.with_retries(|mut gate| {
                let request = request.clone();
                async move { gate.commit(request).await.map(|r| r.into_inner()) }
            });
            match answer.await {
                Ok(response) => {
                    tally(report, response.duplicate, false);
                    self.forget(vec![pending.key()]).await?;
                }
                Err(status) if status.code() == Code::NotFound => {
                    self.sync_as_event(&pending, report).await?;
                }
                Err(status) if stops_the_run(&status) => return Err(stop_reason(&status)),
                Err(status) => self.drop_refused(&pending, &status, report).await?,
            }
        }
        Ok(())
    }

    async fn sync_as_event(
        &self,
        pending: &PendingUsage,
        report: &mut SyncReport,
    ) -> Result<(), String> {
        let batch = std::slice::from_ref(pending);
        match self.send_with_retries(batch).await? {
            Ok(results) => self.settle(batch, &results, report).await,
            Err(status) => self.drop_refused(pending, &status, report).await,
        }
    }

    /// The server's results for `batch`; `Ok(Err)` when it refused the call
    /// for good (about the entries sent), `Err` when the run must stop.
    async fn send_with_retries(
        &self,
        batch: &[PendingUsage],
    ) -> Result<Result<Vec<proto::SyncResult>, Status>, String> {
        let request = proto::SyncUsageRequest {
            school_id: batch
                .first()
                .map(|p| p.school_id.clone())
                .unwrap_or_default(),
            events: batch.iter().map(usage_event).collect(),
        };
        let answer = self
            .with_retries(|mut gate| {
                let request = request.clone();
                async move { gate.sync_usage(request).await.map(|r| r.into_inner()) }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) if stops_the_run(&status) => return Err(stop_reason(&status)),
            Err(status) => return Ok(Err(status)),
        };
        if answer.results.len() != batch.len() {
            return Err(format!(
                "the server answered {} results for {} events; nothing removed",
                answer.results.len(),
                batch.len()
            ));
        }
        Ok(Ok(answer.results))
    }

    /// Drops an entry the server refused for good, so that it does not
    /// block the entries after it.
    async fn drop_refused(
        &self,
        pending: &PendingUsage,
        status: &Status,
        report: &mut SyncReport,
    ) -> Result<(), String> {
        self.count_rejected(report);
        tracing::error!(
            id = %pending.id,
            kind = ?pending.kind,
            school_id = %pending.school_id,
            teacher_id = %pending.teacher_id,
            units = pending.units,
            code = ?status.code(),
            message = status.message(),
            "sync: the server refused a journaled usage for good; it is dropped from the journal"
        );
        self.forget(vec![pending.key()]).await
    }

    fn count_rejected(&self, report: &mut SyncReport) {
        report.rejected += 1;
        self.inner
            .counters
            .rejected_events
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Calls `call` until the server answers, at most `sync_attempts_max`
    /// times, sleeping the backoff delay between attempts.
    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(crate::client::Gate) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let config = &self.inner.config;
        let mut attempt = 0;
        loop {
            match call(self.gate()).await {
                Err(status)
                    if is_unreachable(&status) && attempt + 1 < config.sync_attempts_max =>
                {
                    let delay = backoff_delay(
                        attempt,
                        config.backoff_initial,
                        config.backoff_max,
                        fastrand::f64(),
                    );
                    self.inner
                        .counters
                        .sync_retries
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(attempt = attempt + 1, ?delay, %status, "sync: server unreachable, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                answer => return answer,
            }
        }
    }

    /// Counts the server's answers and removes the answered entries.
    async fn settle(
        &self,
        batch: &[PendingUsage],
        results: &[proto::SyncResult],
        report: &mut SyncReport,
    ) -> Result<(), String> {
        for (pending, result) in batch.iter().zip(results) {
            match result.status() {
                SyncStatus::Rejected | SyncStatus::Unspecified => {
                    self.count_rejected(report);
                    tracing::error!(
                        id = %pending.id,
                        units = pending.units,
                        reason = result.reason().as_str_name(),
                        message = %result.message,
                        "sync: the server rejected a journaled usage; it is dropped from the journal"
                    );
                }
                status => tally(
                    report,
                    status == SyncStatus::Duplicate,
                    status == SyncStatus::AcceptedOverQuota,
                ),
            }
        }
        self.forget(batch.iter().map(PendingUsage::key).collect())
            .await
    }

    async fn forget(&self, keys: Vec<String>) -> Result<(), String> {
        let count = keys.len() as u64;
        let journal = self.inner.journal.clone();
        tokio::task::spawn_blocking(move || lock(&journal).remove(keys))
            .await
            .map_err(|e| ClientError::Journal(format!("the journal task failed: {e}")))
            .and_then(|removed| removed)
            .map_err(|e| e.to_string())?;
        self.inner
            .counters
            .synced_events
            .fetch_add(count, Ordering::Relaxed);
        Ok(())
    }
}

fn usage_event(pending: &PendingUsage) -> proto::UsageEvent {
    proto::UsageEvent {
        event_id: pending.id.clone(),
        teacher_id: pending.teacher_id.clone(),
        service_type: pending.service_type.clone(),
        units: pending.units,
        model: pending.model.clone(),
        occurred_at_ms: pending.occurred_at_ms,
    }
}

/// True when a refusal is not about the entries sent: the server could not
/// be asked, or it refuses this caller (its token) or the call itself.
/// Everything stays in the journal for a later run (with a new token, or a
/// newer server). Other refusals (bad input, not found, a rule) are final
/// answers about the entries: those entries are dropped, the rest go on.
fn stops_the_run(status: &Status) -> bool {
    is_unreachable(status)
        || matches!(
            status.code(),
            Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented
        )
}

fn tally(report: &mut SyncReport, duplicate: bool, over_quota: bool) {
    if duplicate {
        report.duplicates += 1;
    } else {
        report.accepted += 1;
        report.over_quota += usize::from(over_quota);
    }
}

fn stop_reason(status: &Status) -> String {
    if is_unreachable(status) {
        format!("the server could not be reached: {}", status.message())
    } else {
        format!(
            "the server refused the batch ({:?}): {}",
            status.code(),
            status.message()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_delay_doubles_from_the_initial_one_and_stops_at_the_cap() {
        let full = |attempt| backoff_delay(attempt, SECOND, 60 * SECOND, 1.0);
        let delays: Vec<u64> = (0..8).map(|a| full(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            full(u32::MAX),
            60 * SECOND,
            "no overflow however many attempts"
        );
    }

    #[test]
    fn jitter_keeps_the_delay_between_half_and_all_of_it() {
        assert_eq!(backoff_delay(2, SECOND, 60 * SECOND, 0.0), 2 * SECOND);
        for _ in 0..1000 {
            let delay = backoff_delay(3, SECOND, 60 * SECOND, fastrand::f64());
            assert!((4 * SECOND..=8 * SECOND).contains(&delay), "{delay:?}");
        }
        // Out-of-range jitter is clamped rather than trusted.
        assert_eq!(backoff_delay(0, SECOND, 60 * SECOND, 7.0), SECOND);
    }
}
