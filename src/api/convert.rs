//! Wire types to domain types and back. Every field a client sends is
//! validated here, before anything reaches an actor.

use std::sync::Arc;

use crate::domain::{
    parse_model_field, Change, DenyReason, EventId, InvalidInput, ReservationId, SchoolId,
    ServiceType, TeacherId, TimestampMs,
};
use crate::engine::{AllocationView, Decision, PoolView, SchoolView, TeacherRef, UsageView};
use crate::proto;

pub fn teacher(school_id: &str, teacher_id: &str) -> Result<TeacherRef, InvalidInput> {
    Ok(TeacherRef {
        school_id: SchoolId::parse(school_id)?,
        teacher_id: TeacherId::parse(teacher_id)?,
    })
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
    const TEXT_BYTES_MAX: usize = 1024;
    for (field, value) in [("changed_by", changed_by), ("reason", reason)] {
        if value.len() > TEXT_BYTES_MAX {
            return Err(InvalidInput::new(
                field,
                format!(
                    "is {} bytes long; at most {TEXT_BYTES_MAX} are allowed",
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
