//! The limits every rule works within. Each has a documented default.

use serde::{Deserialize, Serialize};

use super::cycle::TimestampMs;
use super::error::InvalidInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleLimits {
    /// How long event and reservation ids are remembered (default 8 days). An
    /// event older than this is refused: it could no longer be recognised as a duplicate.
    pub idempotency_window_ms: i64,
    /// How far in the future an event's time may lie (clock skew; default 5 minutes).
    pub clock_skew_ms_max: i64,
    /// The most units one call may consume, reserve or commit (default 10^12).
    pub units_per_call_max: u64,
    /// The most units a pool or a slice may hold (default 10^15), so that
    /// sums over a school's slices and usages stay far from overflowing.
    pub pool_units_max: u64,
    /// A hold's lifetime when the client gives none (default 60 s).
    pub hold_ttl_ms_default: u64,
    /// The longest a hold may live (default 1 hour).
    pub hold_ttl_ms_max: u64,
    /// The most service types one school may have (32).
    pub service_types_per_school_max: usize,
    /// The most live holds one teacher may have at once (default 10,000).
    pub holds_per_teacher_max: usize,
    /// The most events one SyncUsage batch may carry (default 1,000).
    pub sync_events_per_batch_max: usize,
}

impl Default for RuleLimits {
    fn default() -> Self {
        Self {
            idempotency_window_ms: 8 * 24 * 3600 * 1000,
            clock_skew_ms_max: 5 * 60 * 1000,
            units_per_call_max: 1_000_000_000_000,
            pool_units_max: 1_000_000_000_000_000,
            hold_ttl_ms_default: 60_000,
            hold_ttl_ms_max: 3_600_000,
            service_types_per_school_max: 32,
            holds_per_teacher_max: 10_000,
            sync_events_per_batch_max: 1_000,
        }
    }
}

impl RuleLimits {
    /// Units of one call: at least 1, at most `units_per_call_max`.
    pub fn check_units(&self, field: &'static str, units: u64) -> Result<u64, InvalidInput> {
        if units == 0 {
            return Err(InvalidInput::new(field, "must be at least 1"));
        }
        if units > self.units_per_call_max {
            return Err(InvalidInput::new(
                field,
                format!(
                    "is {units}; one call may use at most {}",
                    self.units_per_call_max
                ),
            ));
        }
        Ok(units)
    }

    /// The size of a pool or a slice: 0 (empty) up to `pool_units_max`.
    pub fn check_pool_units(&self, field: &'static str, units: u64) -> Result<u64, InvalidInput> {
        if units > self.pool_units_max {
            return Err(InvalidInput::new(
                field,
                format!(
                    "is {units}; a pool or a slice holds at most {}",
                    self.pool_units_max
                ),
            ));
        }
        Ok(units)
    }

    /// An event's time: inside the idempotency window and not in the future.
    /// 0 means now.
    pub fn check_event_time(
        &self,
        occurred_at_ms: TimestampMs,
        now_ms: TimestampMs,
    ) -> Result<TimestampMs, InvalidInput> {
        if occurred_at_ms == 0 {
            return Ok(now_ms);
        }
        let oldest_ms = now_ms.saturating_sub(self.idempotency_window_ms);
        if occurred_at_ms < oldest_ms {
            return Err(InvalidInput::new(
                "occurred_at_ms",
                format!(
                    "is {}, older than the idempotency window of {} hours: such an event can no longer be told apart from a duplicate, so it is refused",
                    super::cycle::format_ms(occurred_at_ms),
                    self.idempotency_window_ms / 3_600_000
                ),
            ));
        }
        if occurred_at_ms > now_ms.saturating_add(self.clock_skew_ms_max) {
            return Err(InvalidInput::new(
                "occurred_at_ms",
                format!(
                    "is {}, in the future",
                    super::cycle::format_ms(occurred_at_ms)
                ),
            ));
        }
        Ok(occurred_at_ms)
    }

    /// A sync batch: at least one event, at most `sync_events_per_batch_max`.
    /// A batch's size; `field` names the batch's list as the caller sent it
    /// (`events` for SyncUsage, `counts` for BulkIncrement).
    pub fn check_sync_batch(
        &self,
        field: &'static str,
        events: usize,
    ) -> Result<usize, InvalidInput> {
        if events == 0 {
            return Err(InvalidInput::new(field, "must hold at least one entry"));
        }
        if events > self.sync_events_per_batch_max {
            return Err(InvalidInput::new(
                field,
                format!(
                    "holds {events} entries; one batch may hold at most {} (split it)",
                    self.sync_events_per_batch_max
                ),
            ));
        }
        Ok(events)
    }

    /// A hold's lifetime: 0 means the default; at most the maximum.
    pub fn check_ttl(&self, ttl_ms: u64) -> Result<u64, InvalidInput> {
        match ttl_ms {
            0 => Ok(self.hold_ttl_ms_default),
            t if t > self.hold_ttl_ms_max => Err(InvalidInput::new(
                "ttl_ms",
                format!(
                    "is {t}; a hold may live at most {} ms",
                    self.hold_ttl_ms_max
                ),
            )),
            t => Ok(t),
        }
    }
}
