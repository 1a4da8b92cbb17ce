//! Wire types to domain types and back. Every field a client sends is
//! validated here, before anything reaches an actor.

use std::sync::Arc;

use crate::engine::{
    AllocationView, CheckPreviews, Decision, PoolView, SchoolView, TeacherRef, UsageReportView,
    UsageRow, UsageView,
};
use crate::proto;
use quotad_core::record::CHANGE_TEXT_BYTES_MAX;
use quotad_core::{
    parse_model_field, AuditEntry, Change, DenyReason, EventId, IncreaseRequest, InvalidInput,
    Priority, RequestStatus, ReservationId, SchoolId, ServiceType, TeacherId, TimestampMs,
};

pub fn teacher(school_id: &str, teacher_id: &str) -> Result<TeacherRef, InvalidInput> {
    Ok(TeacherRef {
        school_id: SchoolId::parse(school_id)?,
        teacher_id: TeacherId::parse(teacher_id)?,
    })
}

/// The call a Check previews; an unknown value names the field.
pub fn check_previews(value: i32) -> Result<CheckPreviews, InvalidInput> {
    match proto::CheckPreviews::try_from(value) {
        Ok(proto::CheckPreviews::Consume) => Ok(CheckPreviews::Consume),
        Ok(proto::CheckPreviews::Reserve) => Ok(CheckPreviews::Reserve),
        Err(_) => Err(InvalidInput::new(
            "previews",
            format!(
                "is {value}; it must be CHECK_PREVIEWS_CONSUME (0) or CHECK_PREVIEWS_RESERVE (1)"
            ),
        )),
    }
}

/// A slice's priority in a change: empty leaves it out (None keeps the
/// current one).
pub fn priority(value: &str) -> Result<Option<Priority>, InvalidInput> {
    optional(value, Priority::parse)
}

pub fn service(value: &str) -> Result<ServiceType, InvalidInput> {
    ServiceType::parse(value)
}

pub fn event_id(value: &str) -> Result<EventId, InvalidInput> {
    EventId::parse(value)
}

pub fn reservation_id(value: &str) -> Result<ReservationId, InvalidInput> {
    ReservationId::parse(value)
}

pub fn model(value: &str) -> Result<Arc<str>, InvalidInput> {
    parse_model_field(value)
}

/// Who changed what and why, for the audit trail. Free text, bounded.
pub fn change(changed_by: &str, reason: &str, now_ms: TimestampMs) -> Result<Change, InvalidInput> {
    for (field, value) in [("changed_by", changed_by), ("reason", reason)] {
        if value.len() > CHANGE_TEXT_BYTES_MAX {
            return Err(InvalidInput::new(
                field,
                format!(
                    "is {} bytes long; at most {CHANGE_TEXT_BYTES_MAX} are allowed",
                    value.len()
                ),
            ));
        }
    }
    let by = if changed_by.is_empty() {
        "anonymous"
    } else {
        changed_by
    };
    Ok(Change {
        by: Arc::from(by),
        reason: Arc::from(reason),
        at_ms: now_ms,
    })
}

fn deny_reason(reason: Option<DenyReason>) -> proto::DenyReason {
    match reason {
        None => proto::DenyReason::Unspecified,
        Some(DenyReason::Exhausted) => proto::DenyReason::Exhausted,
        Some(DenyReason::Suspended) => proto::DenyReason::Suspended,
        Some(DenyReason::NoAllocation) => proto::DenyReason::NoAllocation,
    }
}

pub fn decision(d: Decision) -> proto::Decision {
    proto::Decision {
        allowed: d.allowed,
        reason: deny_reason(d.reason) as i32,
        remaining_units: d.remaining_units,
        borrowed_units: d.borrowed_units,
        duplicate: d.duplicate,
        message: d.message,
    }
}

pub fn usage(view: UsageView) -> proto::GetUsageResponse {
    proto::GetUsageResponse {
        school_id: view.school_id.to_string(),
        teacher_id: view.teacher_id.to_string(),
        services: view
            .services
            .into_iter()
            .map(|s| proto::ServiceUsage {
                service_type: s.service.to_string(),
                allocated_units: s.allocated_units,
                used_units: s.used_units,
                reserved_units: s.reserved_units,
                remaining_units: s.remaining_units,
                borrowed_units: s.borrowed_units,
                overage_units: s.overage_units,
                priority: s.priority.as_str().into(),
                status: s.status.as_str().into(),
                auto_renew: s.auto_renew,
            })
            .collect(),
        cycle_start_ms: view.cycle.start_ms,
        cycle_end_ms: view.cycle.end_ms,
    }
}

pub fn pool(p: PoolView) -> proto::Pool {
    proto::Pool {
        service_type: p.service.to_string(),
        cycle_units: p.cycle_units,
        allocated_units: p.allocated_units,
        borrowed_units: p.borrowed_units,
        available_units: p.available_units,
        used_units: p.used_units,
    }
}

pub fn school(view: SchoolView) -> proto::School {
    proto::School {
        school_id: view.config.id.to_string(),
        name: view.config.name.to_string(),
        tier: view.config.tier.as_str().into(),
        billing_anchor_day: view.config.anchor.day(),
        borrowing_enabled: view.config.borrowing_enabled,
        pools: view.pools.into_iter().map(pool).collect(),
        cycle_start_ms: view.cycle.start_ms,
        cycle_end_ms: view.cycle.end_ms,
        teacher_count: u32::try_from(view.teacher_count).unwrap_or(u32::MAX),
        self_service_requests: view.config.self_service_requests,
        next_billing_anchor_day: view.next_anchor.map_or(0, |a| a.day()),
    }
}

pub fn allocation(view: AllocationView) -> proto::Allocation {
    proto::Allocation {
        school_id: view.school_id.to_string(),
        teacher_id: view.teacher_id.to_string(),
        service_type: view.service.to_string(),
        allocated_units: view.allocated_units,
        used_units: view.used_units,
        reserved_units: view.reserved_units,
        priority: view.priority.as_str().into(),
        auto_renew: view.auto_renew,
        status: view.status.as_str().into(),
    }
}

/// An optional filter: empty means none.
pub fn optional<T>(
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, InvalidInput>,
) -> Result<Option<T>, InvalidInput> {
    match value {
        "" => Ok(None),
        value => parse(value).map(Some),
    }
}

/// A page size: 0 means 100; at most 1000.
pub fn page_size(value: u32) -> Result<usize, InvalidInput> {
    match value {
        0 => Ok(100),
        1..=1000 => Ok(value as usize),
        _ => Err(InvalidInput::new(
            "page_size",
            format!("is {value}; at most 1000"),
        )),
    }
}

pub fn request(school_id: &SchoolId, r: IncreaseRequest) -> proto::IncreaseRequest {
    proto::IncreaseRequest {
        school_id: school_id.to_string(),
        request_id: r.id,
        teacher_id: r.teacher_id.to_string(),
        service_type: r.service.to_string(),
        requested_units: r.units,
        reason: r.reason.to_string(),
        status: r.status.as_str().into(),
        approved_units: match r.status {
            RequestStatus::Approved { units } => units,
            _ => 0,
        },
        decision_reason: r.decision_reason.as_deref().unwrap_or_default().into(),
        decided_by: r.decided_by.as_deref().unwrap_or_default().into(),
        created_at_ms: r.created_at_ms,
        decided_at_ms: r.decided_at_ms.unwrap_or(0),
        expires_at_ms: if r.is_pending() { r.expires_at_ms() } else { 0 },
    }
}

pub fn history_entry(school_id: &SchoolId, e: AuditEntry) -> proto::HistoryEntry {
    proto::HistoryEntry {
        school_id: school_id.to_string(),
        seq: e.seq,
        at_ms: e.at_ms,
        actor: e.actor.to_string(),
        action: e.action.as_str().into(),
        teacher_id: e.teacher_id.map(|t| t.to_string()).unwrap_or_default(),
        service_type: e.service.map(|s| s.to_string()).unwrap_or_default(),
        reason: e.reason.to_string(),
        before: e.before.into_iter().collect(),
        after: e.after.into_iter().collect(),
        prev_hash: hex::encode(e.prev_hash),
        hash: hex::encode(e.hash),
    }
}

fn usage_row(r: &UsageRow) -> proto::UsageRow {
    proto::UsageRow {
        teacher_id: r.teacher_id.to_string(),
        service_type: r.service.to_string(),
        allocated_units: r.allocated_units,
        used_units: r.used_units,
        borrowed_units: r.borrowed_units,
        overage_units: r.overage_units,
    }
}

pub fn usage_report(school_id: &SchoolId, view: UsageReportView) -> proto::UsageReport {
    let mut totals: std::collections::BTreeMap<String, proto::UsageRow> = Default::default();
    for row in &view.rows {
        let total = totals
            .entry(row.service.to_string())
            .or_insert_with(|| proto::UsageRow {
                service_type: row.service.to_string(),
                ..Default::default()
            });
        total.allocated_units = total.allocated_units.saturating_add(row.allocated_units);
        total.used_units = total.used_units.saturating_add(row.used_units);
        total.borrowed_units = total.borrowed_units.saturating_add(row.borrowed_units);
        total.overage_units = total.overage_units.saturating_add(row.overage_units);
    }
    proto::UsageReport {
        school_id: school_id.to_string(),
        cycle_start_ms: view.cycle.start_ms,
        cycle_end_ms: view.cycle.end_ms,
        rows: view.rows.iter().map(usage_row).collect(),
        totals: totals.into_values().collect(),
    }
}
