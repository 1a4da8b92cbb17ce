//! Flushing the journal: commits first (replayed with Commit), then usage
//! events in SyncUsage batches. Each batch is retried with exponential
//! backoff and jitter while the server cannot be reached, a bounded number of
//! times per run; entries leave the journal only after the server answered
//! for them.

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

    async fn sync_events(&self, report: &mut SyncReport) -> Result<(), String> {
        let batch_max = self.inner.config.sync_batch_events_max.max(1);
        loop {
            let batch = self.pending_of(PendingKind::Event, batch_max);
            if batch.is_empty() {
                return Ok(());
            }
            let results = self.send_with_retries(&batch).await?;
            self.settle(&batch, &results, report).await?;
        }
    }

    /// Replays journaled commits. A reservation the server does not know (the
    /// reserve never reached it) is synced as a usage event with its id.
    async fn sync_commits(&self, report: &mut SyncReport) -> Result<(), String> {
        for pending in self.pending_of(PendingKind::Commit, usize::MAX) {
            let request = proto::CommitRequest {
                school_id: self.inner.config.school_id.clone(),
                teacher_id: self.inner.config.teacher_id.clone(),
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
                    let results = self
                        .send_with_retries(std::slice::from_ref(&pending))
                        .await?;
                    self.settle(std::slice::from_ref(&pending), &results, report)
                        .await?;
                }
                Err(status) => return Err(stop_reason(&status)),
            }
        }
        Ok(())
    }

    async fn send_with_retries(
        &self,
        batch: &[PendingUsage],
    ) -> Result<Vec<proto::SyncResult>, String> {
        let request = proto::SyncUsageRequest {
            school_id: self.inner.config.school_id.clone(),
            events: batch.iter().map(|p| self.usage_event(p)).collect(),
        };
        let answer = self
            .with_retries(|mut gate| {
                let request = request.clone();
                async move { gate.sync_usage(request).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|status| stop_reason(&status))?;
        if answer.results.len() != batch.len() {
            return Err(format!(
                "the server answered {} results for {} events; nothing removed",
                answer.results.len(),
                batch.len()
            ));
        }
        Ok(answer.results)
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
                    report.rejected += 1;
                    self.inner
                        .counters
                        .rejected_events
                        .fetch_add(1, Ordering::Relaxed);
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

    fn usage_event(&self, pending: &PendingUsage) -> proto::UsageEvent {
        proto::UsageEvent {
            event_id: pending.id.clone(),
            teacher_id: self.inner.config.teacher_id.clone(),
            service_type: pending.service_type.clone(),
            units: pending.units,
            model: pending.model.clone(),
            occurred_at_ms: pending.occurred_at_ms,
        }
    }
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
