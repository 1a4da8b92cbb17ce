//! Usage that already happened, reported late: an offline device's journal
//! or an old client's aggregated counts, synced in batches.
//!
//! A synced event is never refused for lack of quota: the AI call was made
//! while the server could not be asked. What exceeds the slice is charged as
//! overage and stays visible. It is charged to the billing cycle in which it
//! happened (the current one or the one before, the only other cycle a slice
//! keeps), never borrowed from the school, and shares its id space with
//! Consume: an event already consumed or synced is a duplicate.

use std::sync::Arc;

use super::account::{EventEntry, TeacherAccount};
use super::cycle::{format_ms, TimestampMs};
use super::error::InvalidInput;
use super::ids::{EventId, ServiceType};
use super::limits::RuleLimits;
use super::record::{Usage, UsageSource};

/// One usage event as a device reports it, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEvent {
    pub service: ServiceType,
    pub units: u64,
    pub event_id: EventId,
    /// When the usage happened on the device.
    pub occurred_at_ms: TimestampMs,
    pub model: Arc<str>,
}

/// Why a synced event was not charged. Nothing changed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRejection {
    /// The teacher had no slice of the service type in the cycle the event happened.
    UnknownAllocation,
    /// Older than the idempotency window (or than the previous cycle): it
    /// could no longer be told apart from a duplicate.
    TooOld,
    /// A field is malformed, or the time is in the future.
    BadInput,
}

impl SyncRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownAllocation => "unknown_allocation",
            Self::TooOld => "too_old",
            Self::BadInput => "bad_input",
        }
    }
}

/// The answer about one synced event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Charged within the slice.
    Accepted { cycle_start_ms: TimestampMs },
    /// Charged, `overage_units` of it beyond what the slice had left.
    AcceptedOverQuota {
        cycle_start_ms: TimestampMs,
        overage_units: u64,
    },
    /// The id was charged before (by Consume or an earlier sync): nothing
    /// changed. (An id Consume denied counted nothing: synced, it is charged.)
    Duplicate,
    Rejected {
        reason: SyncRejection,
        message: String,
    },
}

impl SyncOutcome {
    pub fn rejected(reason: SyncRejection, message: impl Into<String>) -> Self {
        Self::Rejected {
            reason,
            message: message.into(),
        }
    }

    pub fn bad_input(error: &InvalidInput) -> Self {
        Self::rejected(SyncRejection::BadInput, error.to_string())
    }

    /// The outcome a charge record leads to.
    pub fn of_charge(usage: &Usage) -> Self {
        if usage.overage_units > 0 {
            Self::AcceptedOverQuota {
                cycle_start_ms: usage.cycle_start_ms,
                overage_units: usage.overage_units,
            }
        } else {
            Self::Accepted {
                cycle_start_ms: usage.cycle_start_ms,
            }
        }
    }

    /// A short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::AcceptedOverQuota { .. } => "accepted_over_quota",
            Self::Duplicate => "duplicate",
            Self::Rejected { reason, .. } => reason.as_str(),
        }
    }
}

/// What a sync must do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    /// Seen before: answer `duplicate` once the first record is durable.
    Duplicate(EventEntry),
    /// Append this usage as a `Record::UsageCharged` and apply it.
    Charge(Usage),
    Reject(SyncOutcome),
}

/// The cycle an event is charged to, and what its slice had left in it.
struct Target {
    cycle_start_ms: TimestampMs,
    available_units: u64,
}

impl TeacherAccount {
    /// Decides one synced event. The account must already be in the cycle
    /// that holds `now_ms` (the actor's housekeeping runs first).
    pub fn sync_step(
        &self,
        event: &SyncEvent,
        limits: &RuleLimits,
        now_ms: TimestampMs,
    ) -> SyncStep {
        // A denied id counted nothing. A device syncs an id only when it
        // never got the answer (the server was out of reach) and went ahead,
        // so the usage happened: it is charged now. An id that was charged is
        // a duplicate.
        if let Some(entry) = self.events.get(&event.event_id).filter(|e| e.allowed) {
            return SyncStep::Duplicate(*entry);
        }
        if let Err(rejection) = check_sync_time(event.occurred_at_ms, limits, now_ms) {
            return SyncStep::Reject(rejection);
        }
        if let Err(error) = limits.check_units("units", event.units) {
            return SyncStep::Reject(SyncOutcome::bad_input(&error));
        }
        let target = match self.sync_target(event) {
            Ok(target) => target,
            Err(rejection) => return SyncStep::Reject(rejection),
        };
        SyncStep::Charge(Usage {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_id.clone(),
            service: event.service.clone(),
            source: UsageSource::Event(event.event_id.clone()),
            units: event.units,
            borrowed_units: 0,
            overage_units: event.units.saturating_sub(target.available_units),
            cycle_start_ms: target.cycle_start_ms,
            occurred_at_ms: event.occurred_at_ms,
            recorded_at_ms: now_ms,
            model: event.model.clone(),
        })
    }

    /// The current cycle if the event happened in it, else the previous one
    /// if the slice counted it and the event falls inside it.
    fn sync_target(&self, event: &SyncEvent) -> Result<Target, SyncOutcome> {
        let unknown = || {
            SyncOutcome::rejected(
                SyncRejection::UnknownAllocation,
                format!(
                    "teacher {} had no {} slice in the billing cycle of {}",
                    self.teacher_id,
                    event.service,
                    format_ms(event.occurred_at_ms)
                ),
            )
        };
        let slice = self.slices.get(&event.service).ok_or_else(unknown)?;
        if event.occurred_at_ms >= self.cycle_start_ms {
            return Ok(Target {
                cycle_start_ms: self.cycle_start_ms,
                available_units: slice.remaining_units(),
            });
        }
        let previous = &slice.previous;
        if previous.cycle_start_ms == 0 || previous.cycle_start_ms >= self.cycle_start_ms {
            return Err(unknown());
        }
        if event.occurred_at_ms < previous.cycle_start_ms {
            return Err(SyncOutcome::rejected(
                SyncRejection::TooOld,
                format!(
                    "happened at {}, before the previous billing cycle (from {}), the oldest quotad keeps",
                    format_ms(event.occurred_at_ms),
                    format_ms(previous.cycle_start_ms)
                ),
            ));
        }
        // The totals kept are those of the cycle that held the event, unless
        // the account skipped a cycle in which it counted nothing (then the
        // event's cycle, by the billing anchor, starts after them).
        let event_cycle = self
            .anchor
            .cycle_at(event.occurred_at_ms)
            .map_err(|e| SyncOutcome::bad_input(&e))?;
        if event_cycle.start_ms > previous.cycle_start_ms {
            return Err(unknown());
        }
        Ok(Target {
            cycle_start_ms: previous.cycle_start_ms,
            available_units: previous.allocated_units.saturating_sub(previous.used_units),
        })
    }
}

/// A synced event must carry its time (it decides the cycle), inside the
/// idempotency window and not in the future.
fn check_sync_time(
    occurred_at_ms: TimestampMs,
    limits: &RuleLimits,
    now_ms: TimestampMs,
) -> Result<(), SyncOutcome> {
    if occurred_at_ms <= 0 {
        return Err(SyncOutcome::rejected(
            SyncRejection::BadInput,
            "occurred_at_ms must be set to when the usage happened (milliseconds since the epoch)",
        ));
    }
    match limits.check_event_time(occurred_at_ms, now_ms) {
        Ok(_) => Ok(()),
        Err(error) if occurred_at_ms < now_ms => Err(SyncOutcome::rejected(
            SyncRejection::TooOld,
            error.to_string(),
        )),
        Err(error) => Err(SyncOutcome::bad_input(&error)),
    }
}
