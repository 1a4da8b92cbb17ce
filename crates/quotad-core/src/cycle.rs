//! Billing cycles: monthly, starting on an anchor day of month, in UTC.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::error::InvalidInput;

/// Milliseconds since the Unix epoch, UTC. Time is always passed in to the rules.
pub type TimestampMs = i64;

/// The last anchor day allowed: every month has a 28th, so every cycle is a whole month.
pub const ANCHOR_DAY_MAX: u32 = 28;

/// The day of month (1..=28) on which each billing cycle starts, at 00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingAnchor(u8);

/// One billing cycle: `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cycle {
    pub start_ms: TimestampMs,
    pub end_ms: TimestampMs,
}

impl Cycle {
    pub fn contains(&self, at_ms: TimestampMs) -> bool {
        self.start_ms <= at_ms && at_ms < self.end_ms
    }
}

/// The cycle that holds `now_ms`, when it is later than `current`; None while
/// `now_ms` is still in `current`. `anchor` is the one in effect from the next
/// cycle on. Cycles follow each other without gaps, each one ending at its
/// anchor's next boundary, whenever the rollover is noticed: a rollover
/// noticed late (a teacher idle for weeks, a clock that jumped) gives the
/// same cycles as one noticed on time. The first cycle after a change of
/// anchor starts where the old one ended, so a change neither cuts a cycle
/// short nor resets usage early.
pub fn next_cycle(
    current: Cycle,
    anchor: BillingAnchor,
    now_ms: TimestampMs,
) -> Result<Option<Cycle>, InvalidInput> {
    if now_ms < current.end_ms {
        return Ok(None);
    }
    let mut cycle = anchor.cycle_from(current.end_ms)?;
    while now_ms >= cycle.end_ms {
        cycle = anchor.cycle_from(cycle.end_ms)?;
    }
    Ok(Some(cycle))
}

/// The start of the cycle after the one that starts at `start_ms`, or None
/// when the anchor cannot say (out of range).
pub fn following_start(start_ms: TimestampMs, anchor: BillingAnchor) -> Option<TimestampMs> {
    anchor
        .cycle_from(start_ms)
        .ok()
        .map(|c| c.end_ms)
        .filter(|end| *end > start_ms)
}

/// What a school's teachers need to know to roll exactly as the school does:
/// the cycle it is in and the anchors that place the next boundary. The school
/// publishes it; teachers follow it before every decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleInfo {
    pub start_ms: TimestampMs,
    /// When the cycle before it started (0 before the school's first rollover).
    pub previous_start_ms: TimestampMs,
    pub anchor: BillingAnchor,
    /// The anchor from the next cycle on, if it changes.
    pub next_anchor: Option<BillingAnchor>,
}

impl Default for BillingAnchor {
    fn default() -> Self {
        Self(1)
    }
}

impl BillingAnchor {
    /// `day` 0 means the default, the 1st.
    pub fn new(day: u32) -> Result<Self, InvalidInput> {
        match day {
            0 => Ok(Self::default()),
            1..=ANCHOR_DAY_MAX => Ok(Self(day as u8)),
            _ => Err(InvalidInput::new(
                "billing_anchor_day",
                format!("is {day}; it must be between 1 and {ANCHOR_DAY_MAX} so that every month has it"),
            )),
        }
    }

    pub fn day(self) -> u32 {
        u32::from(self.0)
    }

    /// The cycle that starts at `start_ms` and ends at this anchor's next
    /// boundary. `start_ms` is this anchor's day, except for the first cycle
    /// after a change of anchor, which starts on the old anchor's day.
    pub fn cycle_from(self, start_ms: TimestampMs) -> Result<Cycle, InvalidInput> {
        let end_ms = self.cycle_at(start_ms)?.end_ms;
        Ok(Cycle { start_ms, end_ms })
    }

    /// The cycle that contains `at_ms`.
    pub fn cycle_at(self, at_ms: TimestampMs) -> Result<Cycle, InvalidInput> {
        let at = DateTime::<Utc>::from_timestamp_millis(at_ms)
            .ok_or_else(|| InvalidInput::new("timestamp", format!("{at_ms} ms is out of range")))?;
        let (mut year, mut month) = (at.year(), at.month());
        if at.day() < self.day() {
            (year, month) = previous_month(year, month);
        }
        let (next_year, next_month) = next_month(year, month);
        Ok(Cycle {
            start_ms: self.start_of(year, month)?,
            end_ms: self.start_of(next_year, next_month)?,
        })
    }

    fn start_of(self, year: i32, month: u32) -> Result<TimestampMs, InvalidInput> {
        let date = NaiveDate::from_ymd_opt(year, month, self.day()).ok_or_else(|| {
            InvalidInput::new("timestamp", format!("{year}-{month} is out of range"))
        })?;
        let start = date
            .and_hms_opt(0, 0, 0)
            .ok_or_else(|| InvalidInput::new("timestamp", "midnight is out of range"))?;
        Ok(Utc.from_utc_datetime(&start).timestamp_millis())
    }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

/// Formats a timestamp as RFC 3339 for messages people read.
pub fn format_ms(at_ms: TimestampMs) -> String {
    DateTime::<Utc>::from_timestamp_millis(at_ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| format!("{at_ms} ms"))
}

#[cfg(test)]
pub(crate) fn ms(rfc3339: &str) -> TimestampMs {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("test timestamp")
        .timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollover_noticed_late_gives_the_cycles_one_noticed_on_time_gives() {
        let old = BillingAnchor::new(1).unwrap();
        let new = BillingAnchor::new(15).unwrap();
        let november = old.cycle_at(ms("2026-11-20T00:00:00Z")).unwrap();
        // On time: Dec 1 starts a short cycle to the new anchor, then Dec 15.
        let first = next_cycle(november, new, ms("2026-12-01T00:00:01Z"))
            .unwrap()
            .unwrap();
        assert_eq!(first.start_ms, ms("2026-12-01T00:00:00Z"));
        assert_eq!(first.end_ms, ms("2026-12-15T00:00:00Z"));
        // Noticed a month late: the same sequence, so the cycle holding the
        // time starts on Jan 15, not on a date that depends on the delay.
        let late = next_cycle(november, new, ms("2027-01-20T00:00:00Z"))
            .unwrap()
            .unwrap();
        assert_eq!(late.start_ms, ms("2027-01-15T00:00:00Z"));
        let stepped = next_cycle(first, new, ms("2027-01-20T00:00:00Z"))
            .unwrap()
            .unwrap();
        assert_eq!(stepped, late);
    }

    #[test]
    fn cycle_starts_on_the_anchor_day() {
        let anchor = BillingAnchor::new(15).unwrap();
        let cycle = anchor.cycle_at(ms("2026-11-23T10:00:00Z")).unwrap();
        assert_eq!(cycle.start_ms, ms("2026-11-15T00:00:00Z"));
        assert_eq!(cycle.end_ms, ms("2026-12-15T00:00:00Z"));
    }

    #[test]
    fn before_the_anchor_day_the_cycle_began_last_month_across_a_year() {
        let anchor = BillingAnchor::new(15).unwrap();
        let cycle = anchor.cycle_at(ms("2027-01-03T10:00:00Z")).unwrap();
        assert_eq!(cycle.start_ms, ms("2026-12-15T00:00:00Z"));
        assert_eq!(cycle.end_ms, ms("2027-01-15T00:00:00Z"));
    }

    #[test]
    fn boundary_instant_belongs_to_the_new_cycle() {
        let anchor = BillingAnchor::new(1).unwrap();
        let start = ms("2026-12-01T00:00:00Z");
        assert_eq!(anchor.cycle_at(start).unwrap().start_ms, start);
        assert_eq!(anchor.cycle_at(start - 1).unwrap().end_ms, start);
        assert!(anchor.cycle_at(start).unwrap().contains(start));
        assert!(!anchor.cycle_at(start - 1).unwrap().contains(start));
    }

    #[test]
    fn anchor_day_is_validated() {
        assert_eq!(BillingAnchor::new(0).unwrap().day(), 1);
        assert_eq!(BillingAnchor::new(28).unwrap().day(), 28);
        assert!(BillingAnchor::new(29).is_err());
    }
}
