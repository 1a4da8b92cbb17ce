//! The hot path, one call each: `consume`, `check`, `reserve`, `commit`, `release` and `usage`.

use std::time::{SystemTime, UNIX_EPOCH};

use quotad_proto::v1::{
    CheckPreviews, CheckRequest, CheckResponse, CommitRequest, CommitResponse, ConsumeRequest,
    ConsumeResponse, Decision, DenyReason, GetUsageRequest, GetUsageResponse, ReleaseRequest,
    ReleaseResponse, ReserveRequest, ReserveResponse, ServiceUsage,
};
use serde_json::{json, Value};
use tonic::Status;

use crate::cli::{CheckArgs, CommitArgs, ConsumeArgs, ReleaseArgs, ReserveArgs, UsageArgs};
use crate::connect::GateClient;
use crate::output::{on_off, table, timestamp_text, Render, ToJson};

pub async fn consume(mut gate: GateClient, args: ConsumeArgs) -> Result<ConsumeResponse, Status> {
    let request = ConsumeRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        event_id: args.event_id.unwrap_or_else(fresh_event_id),
        occurred_at_ms: 0,
        model: args.model.unwrap_or_default(),
    };
    Ok(gate.consume(request).await?.into_inner())
}

/// Unique enough for one person at a terminal: process id and the current nanosecond.
fn fresh_event_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_nanos());
    format!("quotactl-{}-{nanos}", std::process::id())
}

pub async fn check(mut gate: GateClient, args: CheckArgs) -> Result<CheckResponse, Status> {
    let request = CheckRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        previews: if args.reserve {
            CheckPreviews::Reserve as i32
        } else {
            CheckPreviews::Consume as i32
        },
    };
    Ok(gate.check(request).await?.into_inner())
}

pub async fn reserve(mut gate: GateClient, args: ReserveArgs) -> Result<ReserveResponse, Status> {
    let request = ReserveRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        estimate_units: args.estimate_units,
        ttl_ms: args.ttl_ms.unwrap_or(0),
        reservation_id: args.reservation_id,
        model: args.model.unwrap_or_default(),
    };
    Ok(gate.reserve(request).await?.into_inner())
}

pub async fn commit(mut gate: GateClient, args: CommitArgs) -> Result<CommitResponse, Status> {
    let request = CommitRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
        actual_units: args.actual_units,
    };
    Ok(gate.commit(request).await?.into_inner())
}

pub async fn release(mut gate: GateClient, args: ReleaseArgs) -> Result<ReleaseResponse, Status> {
    let request = ReleaseRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
        reservation_id: args.reservation_id,
    };
    Ok(gate.release(request).await?.into_inner())
}

pub async fn usage(mut gate: GateClient, args: UsageArgs) -> Result<GetUsageResponse, Status> {
    let request = GetUsageRequest {
        school_id: args.teacher.school_id,
        teacher_id: args.teacher.teacher_id,
    };
    Ok(gate.get_usage(request).await?.into_inner())
}

/// The proto name of a deny reason ("DENY_REASON_EXHAUSTED"), or its number if this client
/// does not know it yet.
fn deny_reason_json(reason: i32) -> Value {
    DenyReason::try_from(reason).map_or(json!(reason), |known| json!(known.as_str_name()))
}

impl ToJson for Decision {
    fn to_json(&self) -> Value {
        json!({
            "allowed": self.allowed,
            "reason": deny_reason_json(self.reason),
            "remaining_units": self.remaining_units,
            "borrowed_units": self.borrowed_units,
            "duplicate": self.duplicate,
            "message": self.message,
        })
    }
}

fn decision_json(decision: Option<&Decision>) -> Value {
    decision.map_or(Value::Null, ToJson::to_json)
}

impl ToJson for ConsumeResponse {
    fn to_json(&self) -> Value {
        json!({ "decision": decision_json(self.decision.as_ref()) })
    }
}

impl ToJson for CheckResponse {
    fn to_json(&self) -> Value {
        json!({ "decision": decision_json(self.decision.as_ref()) })
    }
}

impl ToJson for ReserveResponse {
    fn to_json(&self) -> Value {
        json!({
            "decision": decision_json(self.decision.as_ref()),
            "expires_at_ms": self.expires_at_ms,
        })
    }
}

impl ToJson for CommitResponse {
    fn to_json(&self) -> Value {
        json!({
            "charged_units": self.charged_units,
            "overage_units": self.overage_units,
            "duplicate": self.duplicate,
            "hold_had_expired": self.hold_had_expired,
            "remaining_units": self.remaining_units,
        })
    }
}

impl ToJson for ReleaseResponse {
    fn to_json(&self) -> Value {
        json!({
            "released": self.released,
            "released_units": self.released_units,
        })
    }
}

impl ToJson for ServiceUsage {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "reserved_units": self.reserved_units,
            "remaining_units": self.remaining_units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
            "priority": self.priority,
            "status": self.status,
            "auto_renew": self.auto_renew,
        })
    }
}

impl ToJson for GetUsageResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "teacher_id": self.teacher_id,
            "services": self.services.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
        })
    }
}

fn deny_reason_text(reason: i32) -> String {
    match DenyReason::try_from(reason) {
        Ok(DenyReason::Exhausted) => "exhausted".to_string(),
        Ok(DenyReason::Suspended) => "suspended".to_string(),
        Ok(DenyReason::NoAllocation) => "no allocation".to_string(),
        Ok(DenyReason::Unspecified) => "unspecified".to_string(),
        Err(_) => format!("reason {reason}"),
    }
}

/// "allowed: 95 units left" or "denied (exhausted): 0 units left: <server's sentence>".
fn decision_text(decision: Option<&Decision>) -> String {
    let Some(decision) = decision else {
        return "no decision in the response".to_string();
    };
    let mut text = if decision.allowed {
        format!("allowed: {} units left", decision.remaining_units)
    } else {
        format!(
            "denied ({}): {} units left",
            deny_reason_text(decision.reason),
            decision.remaining_units
        )
    };
    if decision.borrowed_units > 0 {
        text += &format!(", {} borrowed from the pool", decision.borrowed_units);
    }
    if decision.duplicate {
        text += " (duplicate: first decision returned, nothing charged again)";
    }
    if !decision.message.is_empty() {
        text += &format!(": {}", decision.message);
    }
    text
}

impl Render for ConsumeResponse {
    fn render(&self) -> String {
        decision_text(self.decision.as_ref())
    }
}

impl Render for CheckResponse {
    fn render(&self) -> String {
        decision_text(self.decision.as_ref())
    }
}

impl Render for ReserveResponse {
    fn render(&self) -> String {
        let decision = decision_text(self.decision.as_ref());
        if self.expires_at_ms == 0 {
            return decision;
        }
        format!(
            "{decision}\nhold expires {}",
            timestamp_text(self.expires_at_ms)
        )
    }
}

impl Render for CommitResponse {
    fn render(&self) -> String {
        let mut text = format!(
            "charged {} units ({} over the slice), {} units left",
            self.charged_units, self.overage_units, self.remaining_units
        );
        if self.hold_had_expired {
            text += " (the hold had expired; charged all the same)";
        }
        if self.duplicate {
            text += " (duplicate: first result returned, nothing charged again)";
        }
        text
    }
}

impl Render for ReleaseResponse {
    fn render(&self) -> String {
        if self.released {
            format!("released {} units", self.released_units)
        } else {
            "nothing released: the hold was already gone (released, committed or expired)"
                .to_string()
        }
    }
}

impl Render for GetUsageResponse {
    fn render(&self) -> String {
        let headers = [
            "SERVICE",
            "ALLOCATED",
            "USED",
            "RESERVED",
            "REMAINING",
            "BORROWED",
            "OVERAGE",
            "PRIORITY",
            "STATUS",
            "AUTO-RENEW",
        ];
        let rows: Vec<Vec<String>> = self.services.iter().map(service_usage_row).collect();
        format!(
            "{}/{}  cycle {} .. {}\n\n{}",
            self.school_id,
            self.teacher_id,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&headers, &rows)
        )
    }
}

fn service_usage_row(service: &ServiceUsage) -> Vec<String> {
    vec![
        service.service_type.clone(),
        service.allocated_units.to_string(),
        service.used_units.to_string(),
        service.reserved_units.to_string(),
        service.remaining_units.to_string(),
        service.borrowed_units.to_string(),
        service.overage_units.to_string(),
        service.priority.clone(),
        service.status.clone(),
        on_off(service.auto_renew).to_string(),
    ]
}
