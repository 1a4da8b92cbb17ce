//! Suggestions and alerts for a school, from its slices, pools and daily usage.
//! Pure: the caller gathers the facts (allocations and used units from the
//! engine's memory, daily usage from Postgres) and passes the time in; every
//! answer carries a sentence that explains it and the numbers behind it.
//!
//! Days are UTC days; a cycle starts at 00:00 UTC, so "day N of M" counts
//! whole days from the cycle's start (day 1 is the first).
//!
//! The rules, and what their words mean:
//! - **Idle slice**: an active slice with units whose teacher used less than
//!   [`IDLE_USED_PERCENT`] of them, once at least [`LATE_CYCLE_PERCENT`] of the
//!   cycle has gone ("late in the cycle").
//! - **Runs out**: the burn rate is what an active slice used over the last
//!   [`RECENT_DAYS`] days of this cycle (today so far included), per day. If
//!   what is left lasts less than the time to the cycle's end at that rate, the
//!   slice runs out on the day it reaches zero. No forecast before the cycle is
//!   [`FORECAST_HISTORY_MS_MIN`] old (one day of usage says too little) or
//!   without usage in the window.
//! - **Redistribution**: units move from idle slices to slices that run out,
//!   within one service type, so the sum of the slices (the pool's allocated
//!   units) stays the same. An idle slice keeps what it used plus what it is
//!   projected to use until the cycle ends, with a [`KEEP_MARGIN_PERCENT`]
//!   margin; it never goes below what it used. A slice that runs out asks for
//!   its projected shortfall. The earliest to run out are served first, from
//!   the slices with the most to spare; ties go by teacher id.
//! - **Alerts** (thresholds from the config, [`AlertThresholds`]): a slice at or
//!   above a share of its units (the highest one crossed, e.g. 80% or 100%); a
//!   pool whose used units reach a share of the units bought; a usage anomaly,
//!   a teacher's units today above a multiple of their average over the
//!   [`RECENT_DAYS`] days before today (days without usage count as 0), if they
//!   used units on at least [`ANOMALY_ACTIVE_DAYS_MIN`] of those days and
//!   today's units reach [`ANOMALY_UNITS_MIN`].
//!
//! Suspended slices take no part: their units stay allocated on purpose, and
//! nobody can use them. A slice of 0 units has no share to cross and nothing
//! to run out of.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::cycle::{Cycle, TimestampMs};
use super::error::InvalidInput;
use super::ids::{ServiceType, TeacherId};
use super::slice::SliceStatus;

pub const DAY_MS: i64 = 86_400_000;
/// Days of usage the burn rate and the anomaly baseline look back over.
pub const RECENT_DAYS: i64 = 7;
/// A cycle younger than this gets no run-out forecast.
pub const FORECAST_HISTORY_MS_MIN: i64 = DAY_MS;
/// "Late in the cycle": at least this share of it has gone.
pub const LATE_CYCLE_PERCENT: u64 = 50;
/// "Idle": less than this share of the slice used.
pub const IDLE_USED_PERCENT: u64 = 25;
/// What an idle slice keeps above its projected need, in percent of it.
pub const KEEP_MARGIN_PERCENT: u64 = 20;
/// Days of the baseline on which the teacher must have used units.
pub const ANOMALY_ACTIVE_DAYS_MIN: usize = 3;
/// Today's units below this never count as an anomaly (3 units after 1 a day is noise).
pub const ANOMALY_UNITS_MIN: u64 = 10;
/// Slice thresholds a config may name at most (each is a metric label value).
pub const SLICE_THRESHOLDS_MAX: usize = 8;

/// The alert thresholds, from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertThresholds {
    /// Percentages of a slice's units, ascending; the highest one crossed alerts.
    pub slice_used_percents: Vec<u32>,
    /// Percentage of a pool's units bought that, once used, alerts.
    pub pool_used_percent: u32,
    /// Today's units above this percentage of the recent daily average alert
    /// (300: more than 3 times the average).
    pub anomaly_factor_percent: u32,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        Self {
            slice_used_percents: vec![80, 100],
            pool_used_percent: 90,
            anomaly_factor_percent: 300,
        }
    }
}

impl AlertThresholds {
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let slices = &self.slice_used_percents;
        if slices.is_empty() || slices.len() > SLICE_THRESHOLDS_MAX {
            return Err(InvalidInput::new(
                "alert_slice_used_percents",
                format!(
                    "names {}; between 1 and {SLICE_THRESHOLDS_MAX} are allowed",
                    slices.len()
                ),
            ));
        }
        if slices.iter().any(|p| !(1..=1000).contains(p)) || slices.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(InvalidInput::new(
                "alert_slice_used_percents",
                "must be ascending, each between 1 and 1000",
            ));
        }
        if !(1..=100).contains(&self.pool_used_percent) {
            return Err(InvalidInput::new(
                "alert_pool_used_percent",
                "must be between 1 and 100",
            ));
        }
        if !(101..=100_000).contains(&self.anomaly_factor_percent) {
            return Err(InvalidInput::new(
                "alert_anomaly_factor_percent",
                "must be between 101 and 100000 (more than the average itself)",
            ));
        }
        Ok(())
    }
}

/// One slice as it stands now, with its daily usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    /// Everything used this cycle (borrowed units included).
    pub used_units: u64,
    pub status: SliceStatus,
    /// Units charged per UTC day: (the day's start, units). Days before the
    /// baseline or after now are ignored.
    pub daily_units: Vec<(TimestampMs, u64)>,
}

/// One service type's pool as it stands now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFacts {
    pub service: ServiceType,
    pub cycle_units: u64,
    pub used_units: u64,
}

/// Everything the rules look at, for one school.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchoolFacts {
    pub cycle: Cycle,
    pub now_ms: TimestampMs,
    pub pools: Vec<PoolFacts>,
    pub slices: Vec<SliceFacts>,
}

/// Where `now_ms` stands in the cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CyclePosition {
    /// 1 on the cycle's first day.
    pub day: u32,
    pub days: u32,
    /// Share of the cycle gone, 0-100.
    pub elapsed_percent: u64,
}

impl CyclePosition {
    pub fn of(cycle: Cycle, now_ms: TimestampMs) -> Self {
        let length_ms = (cycle.end_ms - cycle.start_ms).max(1);
        let elapsed_ms = (now_ms - cycle.start_ms).clamp(0, length_ms);
        Self {
            day: day_of_cycle(cycle, now_ms.min(cycle.end_ms - 1)),
            days: u32::try_from((length_ms + DAY_MS - 1) / DAY_MS).unwrap_or(u32::MAX),
            elapsed_percent: (elapsed_ms as u128 * 100 / length_ms as u128) as u64,
        }
    }
}

/// The 1-based day of the cycle that holds `at_ms`.
fn day_of_cycle(cycle: Cycle, at_ms: TimestampMs) -> u32 {
    u32::try_from((at_ms - cycle.start_ms).div_euclid(DAY_MS) + 1).unwrap_or(0)
}

/// What a slice used per day recently: `window_units` over `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurnRate {
    pub window_units: u64,
    pub window_ms: i64,
}

impl BurnRate {
    pub fn units_per_day(&self) -> f64 {
        self.window_units as f64 * DAY_MS as f64 / self.window_ms as f64
    }

    /// Units used over `ms` at this rate, rounded up.
    fn units_over(&self, ms: i64) -> u64 {
        let units = u128::from(self.window_units) * ms.max(0) as u128;
        u64::try_from(units.div_ceil(self.window_ms as u128)).unwrap_or(u64::MAX)
    }

    /// Time until `units` are used at this rate (None at rate 0), rounded up.
    fn ms_to_use(&self, units: u64) -> Option<i64> {
        (self.window_units > 0).then(|| {
            let ms = (u128::from(units) * self.window_ms as u128)
                .div_ceil(u128::from(self.window_units));
            i64::try_from(ms).unwrap_or(i64::MAX)
        })
    }
}

/// The slice's burn rate over the last [`RECENT_DAYS`] days of this cycle.
pub fn burn_rate(slice: &SliceFacts, cycle: Cycle, now_ms: TimestampMs) -> Option<BurnRate> {
    if now_ms - cycle.start_ms < FORECAST_HISTORY_MS_MIN || now_ms >= cycle.end_ms {
        return None;
    }
    let today_start_ms = now_ms - (now_ms - cycle.start_ms).rem_euclid(DAY_MS);
    let window_start_ms = cycle
        .start_ms
        .max(today_start_ms - (RECENT_DAYS - 1) * DAY_MS);
    let window_units = units_between(slice, window_start_ms, now_ms);
    Some(BurnRate {
        window_units,
        window_ms: now_ms - window_start_ms,
    })
}

/// Units of the days that start in `[from_ms, to_ms]`.
fn units_between(slice: &SliceFacts, from_ms: TimestampMs, to_ms: TimestampMs) -> u64 {
    slice
        .daily_units
        .iter()
        .filter(|(day, _)| (from_ms..=to_ms).contains(day))
        .fold(0u64, |sum, (_, units)| sum.saturating_add(*units))
}

fn counts(slice: &SliceFacts) -> bool {
    slice.status == SliceStatus::Active && slice.allocated_units > 0
}

fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    u64::try_from(u128::from(part) * 100 / u128::from(whole)).unwrap_or(u64::MAX)
}

/// A slice that sits idle late in the cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleSlice {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub used_units: u64,
    /// What it could give away and still cover its projected need.
    pub spare_units: u64,
    pub explanation: String,
}

/// A slice forecast to run out before the cycle ends.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOut {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub used_units: u64,
    pub units_per_day: f64,
    pub run_out_at_ms: TimestampMs,
    /// The day of the cycle it runs out on (1-based).
    pub run_out_day: u32,
    /// Units it is projected to need beyond its slice by the cycle's end.
    pub shortfall_units: u64,
    pub explanation: String,
}

/// Units to move from one slice to another of the same service type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub service: ServiceType,
    pub from_teacher_id: TeacherId,
    pub to_teacher_id: TeacherId,
    pub units: u64,
    pub explanation: String,
}

/// A slice's units now and after the proposed moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposedSlice {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub proposed_units: u64,
    pub used_units: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suggestions {
    pub position: CyclePosition,
    pub idle: Vec<IdleSlice>,
    pub run_outs: Vec<RunOut>,
    pub moves: Vec<Move>,
    /// Every slice a move touches.
    pub proposed: Vec<ProposedSlice>,
    /// The redistribution in one paragraph.
    pub explanation: String,
}

/// The idle-slice rule, with what the slice could spare.
pub fn idle_slice(slice: &SliceFacts, cycle: Cycle, now_ms: TimestampMs) -> Option<IdleSlice> {
    let position = CyclePosition::of(cycle, now_ms);
    let used_percent = percent(slice.used_units, slice.allocated_units);
    if !counts(slice)
        || position.elapsed_percent < LATE_CYCLE_PERCENT
        || used_percent >= IDLE_USED_PERCENT
    {
        return None;
    }
    let need_units = burn_rate(slice, cycle, now_ms)
        .map_or(0, |rate| rate.units_over(cycle.end_ms - now_ms))
        .saturating_add(slice.used_units);
    let keep_units = u64::try_from(
        (u128::from(need_units) * u128::from(100 + KEEP_MARGIN_PERCENT)).div_ceil(100),
    )
    .unwrap_or(u64::MAX)
    .max(slice.used_units)
    .min(slice.allocated_units);
    Some(IdleSlice {
        teacher_id: slice.teacher_id.clone(),
        service: slice.service.clone(),
        allocated_units: slice.allocated_units,
        used_units: slice.used_units,
        spare_units: slice.allocated_units - keep_units,
        explanation: format!(
            "{} used {} of {} {} units ({used_percent}%, under the idle mark of \
             {IDLE_USED_PERCENT}%) with {}% of the cycle gone (day {} of {}); projected to need \
             {need_units} by the cycle's end, so {} could go to others",
            slice.teacher_id,
            slice.used_units,
            slice.allocated_units,
            slice.service,
            position.elapsed_percent,
            position.day,
            position.days,
            slice.allocated_units - keep_units,
        ),
    })
}

/// The run-out forecast of one slice.
pub fn run_out(slice: &SliceFacts, cycle: Cycle, now_ms: TimestampMs) -> Option<RunOut> {
    if !counts(slice) {
        return None;
    }
    let rate = burn_rate(slice, cycle, now_ms)?;
    let left_units = slice.allocated_units.saturating_sub(slice.used_units);
    let run_out_at_ms = now_ms.saturating_add(rate.ms_to_use(left_units)?);
    if run_out_at_ms >= cycle.end_ms {
        return None;
    }
    let position = CyclePosition::of(cycle, now_ms);
    let run_out_day = day_of_cycle(cycle, run_out_at_ms);
    let need_units = slice
        .used_units
        .saturating_add(rate.units_over(cycle.end_ms - now_ms));
    let units_per_day = rate.units_per_day();
    Some(RunOut {
        teacher_id: slice.teacher_id.clone(),
        service: slice.service.clone(),
        allocated_units: slice.allocated_units,
        used_units: slice.used_units,
        units_per_day,
        run_out_at_ms,
        run_out_day,
        shortfall_units: need_units.saturating_sub(slice.allocated_units),
        explanation: format!(
            "{} used {} of {} {} units by day {} of {}, about {units_per_day:.1} a day over the \
             last {} days; at that rate the slice runs out on day {run_out_day} of {} and needs \
             {} more to last the cycle",
            slice.teacher_id,
            slice.used_units,
            slice.allocated_units,
            slice.service,
            position.day,
            position.days,
            (rate.window_ms + DAY_MS - 1) / DAY_MS,
            position.days,
            need_units.saturating_sub(slice.allocated_units),
        ),
    })
}

/// Every suggestion for the school, and the redistribution they lead to.
pub fn suggestions(facts: &SchoolFacts) -> Suggestions {
    let (cycle, now_ms) = (facts.cycle, facts.now_ms);
    let mut idle: Vec<IdleSlice> = facts
        .slices
        .iter()
        .filter_map(|s| idle_slice(s, cycle, now_ms))
        .collect();
    let mut run_outs: Vec<RunOut> = facts
        .slices
        .iter()
        .filter_map(|s| run_out(s, cycle, now_ms))
        .collect();
    idle.sort_by(|a, b| {
        (&a.service, Reverse(a.spare_units), &a.teacher_id).cmp(&(
            &b.service,
            Reverse(b.spare_units),
            &b.teacher_id,
        ))
    });
    run_outs.sort_by(|a, b| {
        (&a.service, a.run_out_at_ms, &a.teacher_id).cmp(&(
            &b.service,
            b.run_out_at_ms,
            &b.teacher_id,
        ))
    });
    let moves = redistribute(&idle, &run_outs);
    let proposed = proposed_slices(facts, &moves);
    let moved_units: u64 = moves.iter().map(|m| m.units).sum();
    let explanation = match (moves.is_empty(), run_outs.is_empty(), idle.is_empty()) {
        (false, _, _) => format!(
            "move {moved_units} units in {} step(s) from idle slices to slices that run out; \
             every pool's allocated total stays the same and no slice goes below what it used",
            moves.len()
        ),
        (true, true, _) => "no slice is forecast to run out: nothing to move".to_string(),
        (true, false, true) => {
            "slices run out, but no slice sits idle to give units: raise the pool or allocate \
             its unallocated units"
                .to_string()
        }
        (true, false, false) => {
            "slices run out, but the idle slices of their service types have nothing to spare"
                .to_string()
        }
    };
    Suggestions {
        position: CyclePosition::of(cycle, now_ms),
        idle,
        run_outs,
        moves,
        proposed,
        explanation,
    }
}

/// Serves each slice that runs out (earliest first) from the idle slices of
/// its service type (most to spare first). Both lists come sorted.
fn redistribute(idle: &[IdleSlice], run_outs: &[RunOut]) -> Vec<Move> {
    let mut spare: Vec<u64> = idle.iter().map(|i| i.spare_units).collect();
    let mut moves = Vec::new();
    for receiver in run_outs {
        let mut wanted = receiver.shortfall_units;
        for (donor, left) in idle.iter().zip(spare.iter_mut()) {
            if wanted == 0 {
                break;
            }
            if donor.service != receiver.service || *left == 0 {
                continue;
            }
            let units = wanted.min(*left);
            *left -= units;
            wanted -= units;
            moves.push(Move {
                service: receiver.service.clone(),
                from_teacher_id: donor.teacher_id.clone(),
                to_teacher_id: receiver.teacher_id.clone(),
                units,
                explanation: format!(
                    "{units} {} units from {} (idle) to {} (runs out on day {})",
                    receiver.service, donor.teacher_id, receiver.teacher_id, receiver.run_out_day
                ),
            });
        }
    }
    moves
}

fn proposed_slices(facts: &SchoolFacts, moves: &[Move]) -> Vec<ProposedSlice> {
    type Proposed = BTreeMap<(ServiceType, TeacherId), ProposedSlice>;
    fn touch<'a>(
        proposed: &'a mut Proposed,
        facts: &SchoolFacts,
        service: &ServiceType,
        teacher: &TeacherId,
    ) -> Option<&'a mut ProposedSlice> {
        let slice = facts
            .slices
            .iter()
            .find(|s| &s.service == service && &s.teacher_id == teacher)?;
        Some(
            proposed
                .entry((service.clone(), teacher.clone()))
                .or_insert_with(|| ProposedSlice {
                    teacher_id: teacher.clone(),
                    service: service.clone(),
                    allocated_units: slice.allocated_units,
                    proposed_units: slice.allocated_units,
                    used_units: slice.used_units,
                }),
        )
    }
    let mut proposed = Proposed::new();
    for m in moves {
        if let Some(from) = touch(&mut proposed, facts, &m.service, &m.from_teacher_id) {
            from.proposed_units = from.proposed_units.saturating_sub(m.units);
        }
        if let Some(to) = touch(&mut proposed, facts, &m.service, &m.to_teacher_id) {
            to.proposed_units = to.proposed_units.saturating_add(m.units);
        }
    }
    proposed.into_values().collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    /// A slice at or above a share of its units.
    SliceThreshold,
    /// A pool whose used units reach a share of the units bought.
    PoolExhausting,
    /// A teacher's units today far above their recent average.
    UsageAnomaly,
}

impl AlertKind {
    pub const ALL: [AlertKind; 3] = [
        AlertKind::SliceThreshold,
        AlertKind::PoolExhausting,
        AlertKind::UsageAnomaly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SliceThreshold => "slice_threshold",
            Self::PoolExhausting => "pool_exhausting",
            Self::UsageAnomaly => "usage_anomaly",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    /// None for a pool.
    pub teacher_id: Option<TeacherId>,
    pub service: ServiceType,
    /// The threshold crossed: a share of the slice or pool, or the anomaly factor, in percent.
    pub threshold_percent: u32,
    /// Units used (slice, pool) or used today (anomaly).
    pub value_units: u64,
    /// The slice's or pool's units, or the units today had to exceed (anomaly).
    pub limit_units: u64,
    pub explanation: String,
}

/// Every active alert of the school: slices, then pools, then anomalies.
pub fn alerts(facts: &SchoolFacts, thresholds: &AlertThresholds) -> Vec<Alert> {
    let slices = facts
        .slices
        .iter()
        .filter_map(|s| slice_alert(s, thresholds));
    let pools = facts
        .pools
        .iter()
        .filter_map(|p| pool_alert(p, thresholds, facts));
    let anomalies = facts
        .slices
        .iter()
        .filter_map(|s| anomaly_alert(s, thresholds, facts.cycle, facts.now_ms));
    slices.chain(pools).chain(anomalies).collect()
}

fn slice_alert(slice: &SliceFacts, thresholds: &AlertThresholds) -> Option<Alert> {
    if !counts(slice) {
        return None;
    }
    let used_percent = percent(slice.used_units, slice.allocated_units);
    let crossed = *thresholds
        .slice_used_percents
        .iter()
        .rev()
        .find(|t| used_percent >= u64::from(**t))?;
    Some(Alert {
        kind: AlertKind::SliceThreshold,
        teacher_id: Some(slice.teacher_id.clone()),
        service: slice.service.clone(),
        threshold_percent: crossed,
        value_units: slice.used_units,
        limit_units: slice.allocated_units,
        explanation: format!(
            "{} used {} of {} {} units ({used_percent}%), at or above the {crossed}% threshold",
            slice.teacher_id, slice.used_units, slice.allocated_units, slice.service
        ),
    })
}

fn pool_alert(
    pool: &PoolFacts,
    thresholds: &AlertThresholds,
    facts: &SchoolFacts,
) -> Option<Alert> {
    let used_percent = percent(pool.used_units, pool.cycle_units);
    let threshold = thresholds.pool_used_percent;
    if pool.cycle_units == 0 || used_percent < u64::from(threshold) {
        return None;
    }
    let position = CyclePosition::of(facts.cycle, facts.now_ms);
    Some(Alert {
        kind: AlertKind::PoolExhausting,
        teacher_id: None,
        service: pool.service.clone(),
        threshold_percent: threshold,
        value_units: pool.used_units,
        limit_units: pool.cycle_units,
        explanation: format!(
            "the {} pool has {} of its {} units used ({used_percent}%), at or above the \
             {threshold}% threshold, on day {} of {}; {} are left",
            pool.service,
            pool.used_units,
            pool.cycle_units,
            position.day,
            position.days,
            pool.cycle_units.saturating_sub(pool.used_units)
        ),
    })
}

fn anomaly_alert(
    slice: &SliceFacts,
    thresholds: &AlertThresholds,
    cycle: Cycle,
    now_ms: TimestampMs,
) -> Option<Alert> {
    if slice.status != SliceStatus::Active {
        return None;
    }
    let today_start_ms = now_ms - (now_ms - cycle.start_ms).rem_euclid(DAY_MS);
    let today_units = units_between(slice, today_start_ms, now_ms);
    let baseline_start_ms = today_start_ms - RECENT_DAYS * DAY_MS;
    let baseline: Vec<u64> = slice
        .daily_units
        .iter()
        .filter(|(day, units)| (baseline_start_ms..today_start_ms).contains(day) && *units > 0)
        .map(|(_, units)| *units)
        .collect();
    if baseline.len() < ANOMALY_ACTIVE_DAYS_MIN || today_units < ANOMALY_UNITS_MIN {
        return None;
    }
    let baseline_units = baseline.iter().fold(0u64, |s, u| s.saturating_add(*u));
    let factor = u128::from(thresholds.anomaly_factor_percent);
    // today > factor/100 * baseline/RECENT_DAYS, in integers.
    let limit = u128::from(baseline_units) * factor;
    if u128::from(today_units) * 100 * RECENT_DAYS as u128 <= limit {
        return None;
    }
    let average = baseline_units as f64 / RECENT_DAYS as f64;
    let limit_units = u64::try_from(limit / (100 * RECENT_DAYS as u128)).unwrap_or(u64::MAX);
    Some(Alert {
        kind: AlertKind::UsageAnomaly,
        teacher_id: Some(slice.teacher_id.clone()),
        service: slice.service.clone(),
        threshold_percent: thresholds.anomaly_factor_percent,
        value_units: today_units,
        limit_units,
        explanation: format!(
            "{} used {today_units} {} units today, more than {}% of their average of \
             {average:.1} a day over the {RECENT_DAYS} days before",
            slice.teacher_id, slice.service, thresholds.anomaly_factor_percent
        ),
    })
}
