//! The analytics calls of `QuotaAdmin`: request checks and answers. The
//! service's trait methods in admin.rs call these.

use chrono::{DateTime, Utc};
use tonic::Status;

use super::convert;
use super::status::{analytics_status, invalid};
use crate::analytics::Analytics;
use crate::auth::{authorize, Action, Caller};
use crate::postgres::analytics::{Granularity, Grouping, RollupQuery, RollupRow, ROLLUP_ROWS_MAX};
use crate::proto;
use quotad_core::{
    analytics as rules, InvalidInput, SchoolId, ServiceType, TeacherId, TimestampMs,
};

/// Rows a rollup answers when the request names no limit.
const ROLLUP_ROWS_DEFAULT: usize = 1000;
/// The longest range a rollup may span, in days (three years of days).
const ROLLUP_RANGE_DAYS_MAX: i64 = 1100;

pub async fn rollups(
    analytics: &Analytics,
    caller: &Caller,
    r: proto::UsageRollupsRequest,
    now_ms: TimestampMs,
) -> Result<proto::UsageRollupsResponse, Status> {
    let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
    let teacher_id = convert::optional(&r.teacher_id, TeacherId::parse).map_err(invalid)?;
    authorize(
        caller,
        Action::GetUsageRollups,
        &school_id,
        teacher_id.as_ref(),
    )?;
    let granularity = granularity(r.granularity)?;
    let grouping = grouping(r.grouping)?;
    let rows_max = match r.rows_max {
        0 => ROLLUP_ROWS_DEFAULT,
        n if n as usize <= ROLLUP_ROWS_MAX => n as usize,
        n => {
            return Err(invalid(InvalidInput::new(
                "rows_max",
                format!("is {n}; at most {ROLLUP_ROWS_MAX}"),
            )))
        }
    };
    let service = convert::optional(&r.service_type, ServiceType::parse).map_err(invalid)?;
    let (from_ms, to_ms) = range(r.from_ms, r.to_ms, now_ms)?;
    let from_ms = match from_ms {
        Some(from_ms) => from_ms,
        None => analytics
            .cycle_start_ms(&school_id)
            .await
            .map_err(analytics_status)?,
    };
    check_span(from_ms, to_ms)?;
    let query = RollupQuery {
        school_id,
        granularity,
        grouping,
        from_ms,
        to_ms,
        teacher_id,
        service,
        rows_max,
    };
    let (rows, truncated) = analytics.rollups(&query).await.map_err(analytics_status)?;
    Ok(proto::UsageRollupsResponse {
        school_id: query.school_id.to_string(),
        rows: rows.iter().map(|row| rollup(row, granularity)).collect(),
        truncated,
    })
}

fn granularity(value: i32) -> Result<Granularity, Status> {
    match proto::RollupGranularity::try_from(value) {
        Ok(proto::RollupGranularity::Day) => Ok(Granularity::Day),
        Ok(proto::RollupGranularity::Month) => Ok(Granularity::Month),
        Err(_) => Err(invalid(InvalidInput::new(
            "granularity",
            format!("{value} is neither DAY (0) nor MONTH (1)"),
        ))),
    }
}

fn grouping(value: i32) -> Result<Grouping, Status> {
    match proto::RollupGrouping::try_from(value) {
        Ok(proto::RollupGrouping::TeacherAndService) => Ok(Grouping::TeacherAndService),
        Ok(proto::RollupGrouping::Service) => Ok(Grouping::Service),
        Ok(proto::RollupGrouping::Teacher) => Ok(Grouping::Teacher),
        Ok(proto::RollupGrouping::School) => Ok(Grouping::School),
        Err(_) => Err(invalid(InvalidInput::new(
            "grouping",
            format!(
            "{value} is not one of TEACHER_AND_SERVICE (0), SERVICE (1), TEACHER (2), SCHOOL (3)"
        ),
        ))),
    }
}

/// The range's ends; 0 means "the cycle's start" (None, looked up after the
/// checks) and "now".
fn range(
    from_ms: i64,
    to_ms: i64,
    now_ms: TimestampMs,
) -> Result<(Option<TimestampMs>, TimestampMs), Status> {
    let in_range = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).is_some() && ms >= 0;
    if !in_range(from_ms) {
        return Err(invalid(InvalidInput::new(
            "from_ms",
            format!("{from_ms} is not a time since 1970"),
        )));
    }
    if !in_range(to_ms) {
        return Err(invalid(InvalidInput::new(
            "to_ms",
            format!("{to_ms} is not a time since 1970"),
        )));
    }
    let to_ms = if to_ms == 0 { now_ms } else { to_ms };
    let from_ms = (from_ms != 0).then_some(from_ms);
    if let Some(from_ms) = from_ms {
        check_span(from_ms, to_ms)?;
    }
    Ok((from_ms, to_ms))
}

fn check_span(from_ms: TimestampMs, to_ms: TimestampMs) -> Result<(), Status> {
    if to_ms <= from_ms {
        return Err(invalid(InvalidInput::new(
            "to_ms",
            format!("{to_ms} is not after from_ms ({from_ms})"),
        )));
    }
    if to_ms - from_ms > ROLLUP_RANGE_DAYS_MAX * rules::DAY_MS {
        return Err(invalid(InvalidInput::new(
            "to_ms",
            format!("the range spans more than {ROLLUP_RANGE_DAYS_MAX} days; ask for less"),
        )));
    }
    Ok(())
}

fn rollup(row: &RollupRow, granularity: Granularity) -> proto::UsageRollup {
    let format = match granularity {
        Granularity::Day => "%Y-%m-%d",
        Granularity::Month => "%Y-%m",
    };
    let units = |n: i64| u64::try_from(n).unwrap_or(0);
    proto::UsageRollup {
        period_start_ms: row.period_start_ms,
        period: DateTime::<Utc>::from_timestamp_millis(row.period_start_ms)
            .map(|t| t.format(format).to_string())
            .unwrap_or_default(),
        teacher_id: row.teacher_id.clone(),
        service_type: row.service_type.clone(),
        units: units(row.units),
        borrowed_units: units(row.borrowed_units),
        overage_units: units(row.overage_units),
        events: units(row.events),
    }
}

pub async fn suggestions(
    analytics: &Analytics,
    caller: &Caller,
    r: proto::SuggestionsRequest,
) -> Result<proto::SuggestionsResponse, Status> {
    let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
    authorize(caller, Action::GetSuggestions, &school_id, None)?;
    let service = convert::optional(&r.service_type, ServiceType::parse).map_err(invalid)?;
    let found = analytics
        .suggestions(&school_id, service)
        .await
        .map_err(analytics_status)?;
    let s = found.suggestions;
    Ok(proto::SuggestionsResponse {
        school_id: school_id.to_string(),
        cycle_start_ms: found.school.cycle.start_ms,
        cycle_end_ms: found.school.cycle.end_ms,
        now_ms: found.now_ms,
        day_of_cycle: s.position.day,
        cycle_days: s.position.days,
        idle_slices: s.idle.into_iter().map(idle_slice).collect(),
        run_outs: s.run_outs.into_iter().map(run_out).collect(),
        moves: s.moves.into_iter().map(allocation_move).collect(),
        proposed: s.proposed.into_iter().map(proposed).collect(),
        explanation: s.explanation,
    })
}

fn idle_slice(i: rules::IdleSlice) -> proto::IdleSlice {
    proto::IdleSlice {
        teacher_id: i.teacher_id.to_string(),
        service_type: i.service.to_string(),
        allocated_units: i.allocated_units,
        used_units: i.used_units,
        spare_units: i.spare_units,
        explanation: i.explanation,
    }
}

fn run_out(r: rules::RunOut) -> proto::RunOutForecast {
    proto::RunOutForecast {
        teacher_id: r.teacher_id.to_string(),
        service_type: r.service.to_string(),
        allocated_units: r.allocated_units,
        used_units: r.used_units,
        units_per_day: r.units_per_day,
        run_out_at_ms: r.run_out_at_ms,
        run_out_day: r.run_out_day,
        shortfall_units: r.shortfall_units,
        explanation: r.explanation,
    }
}

fn allocation_move(m: rules::Move) -> proto::AllocationMove {
    proto::AllocationMove {
        service_type: m.service.to_string(),
        from_teacher_id: m.from_teacher_id.to_string(),
        to_teacher_id: m.to_teacher_id.to_string(),
        units: m.units,
        explanation: m.explanation,
    }
}

fn proposed(p: rules::ProposedSlice) -> proto::ProposedAllocation {
    proto::ProposedAllocation {
        teacher_id: p.teacher_id.to_string(),
        service_type: p.service.to_string(),
        allocated_units: p.allocated_units,
        proposed_units: p.proposed_units,
        used_units: p.used_units,
    }
}

pub async fn alerts(
    analytics: &Analytics,
    caller: &Caller,
    r: proto::ListAlertsRequest,
) -> Result<proto::ListAlertsResponse, Status> {
    let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
    authorize(caller, Action::ListAlerts, &school_id, None)?;
    let found = analytics
        .alerts(&school_id)
        .await
        .map_err(analytics_status)?;
    Ok(proto::ListAlertsResponse {
        school_id: school_id.to_string(),
        alerts: found
            .into_iter()
            .map(|a| proto::Alert {
                kind: a.kind.as_str().into(),
                teacher_id: a.teacher_id.map(|t| t.to_string()).unwrap_or_default(),
                service_type: a.service.to_string(),
                threshold_percent: a.threshold_percent,
                value_units: a.value_units,
                limit_units: a.limit_units,
                explanation: a.explanation,
            })
            .collect(),
    })
}
