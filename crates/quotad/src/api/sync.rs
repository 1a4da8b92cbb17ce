//! SyncUsage and BulkIncrement: usage reported after it happened. The wire
//! events are validated one by one here; a malformed event is answered
//! `rejected` (bad input) without failing the rest of its batch.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use tonic::Status;

use super::convert;
use super::status::{invalid, to_status};
use crate::auth::{authorize, Action, Caller};
use crate::engine::{BadEvent, Engine};
use crate::proto;
use quotad_core::{
    EventId, InvalidInput, SchoolId, SyncEvent, SyncOutcome, SyncRejection, TeacherId,
};

/// Hex digits of the SHA-256 kept in a bulk event id: 160 bits, so two
/// different (batch id, feature) pairs never meet in practice.
const BULK_ID_HEX_DIGITS: usize = 40;

type Parsed = Result<(TeacherId, SyncEvent), BadEvent>;

/// Validates, authorizes and charges a SyncUsage batch.
pub async fn sync_usage(
    engine: &Engine,
    caller: &Caller,
    request: proto::SyncUsageRequest,
) -> Result<proto::SyncUsageResponse, Status> {
    let school_id = SchoolId::parse(&request.school_id).map_err(invalid)?;
    authorize(caller, Action::SyncUsage, &school_id, None)?;
    engine
        .limits()
        .check_sync_batch("events", request.events.len())
        .map_err(invalid)?;
    let parsed: Vec<Parsed> = request.events.iter().map(parse_event).collect();
    authorize_teachers(caller, Action::SyncUsage, &school_id, &parsed)?;
    let outcomes = engine
        .sync_usage(&school_id, parsed)
        .await
        .map_err(to_status)?;
    let results = request
        .events
        .into_iter()
        .zip(outcomes)
        .map(|(event, outcome)| result(event.event_id, outcome))
        .collect();
    Ok(proto::SyncUsageResponse { results })
}

/// Turns an old client's counts into synced events with derived ids.
pub async fn bulk_increment(
    engine: &Engine,
    caller: &Caller,
    request: proto::BulkIncrementRequest,
) -> Result<proto::BulkIncrementResponse, Status> {
    let teacher = convert::teacher(&request.school_id, &request.teacher_id).map_err(invalid)?;
    authorize(
        caller,
        Action::BulkIncrement,
        &teacher.school_id,
        Some(&teacher.teacher_id),
    )?;
    check_batch_id(&request.batch_id).map_err(invalid)?;
    engine
        .limits()
        .check_sync_batch("counts", request.counts.len())
        .map_err(invalid)?;
    let model = convert::model(&request.model).map_err(invalid)?;
    let occurred_at_ms = match request.occurred_at_ms {
        0 => engine.clock().now_ms(),
        at_ms => at_ms,
    };
    let mut event_ids = Vec::with_capacity(request.counts.len());
    let mut parsed = Vec::with_capacity(request.counts.len());
    for count in &request.counts {
        let event_id = bulk_event_id(&request.batch_id, &count.feature);
        event_ids.push(event_id.as_str().to_string());
        // Checked here, so that a refusal names this request's own fields.
        let checked = convert::service(&count.feature)
            .map_err(|e| BadEvent::from(InvalidInput::new("feature", e.problem)))
            .and_then(
                |service| match engine.limits().check_units("count", count.count) {
                    Ok(_) => Ok(service),
                    Err(error) => Err(BadEvent {
                        service: Some(service),
                        error,
                    }),
                },
            );
        parsed.push(checked.map(|service| {
            let event = SyncEvent {
                service,
                units: count.count,
                event_id,
                occurred_at_ms,
                model: model.clone(),
            };
            (teacher.teacher_id.clone(), event)
        }));
    }
    let outcomes = engine
        .sync_usage(&teacher.school_id, parsed)
        .await
        .map_err(to_status)?;
    let results = event_ids
        .into_iter()
        .zip(outcomes)
        .map(|(event_id, outcome)| result(event_id, outcome))
        .collect();
    Ok(proto::BulkIncrementResponse { results })
}

/// The event id of one count of a bulk batch: the same (batch id, feature)
/// always gives the same id, so a re-sent batch is a duplicate.
pub fn bulk_event_id(batch_id: &str, feature: &str) -> EventId {
    let digest = Sha256::new()
        .chain_update(batch_id.as_bytes())
        .chain_update(b"\n")
        .chain_update(feature.as_bytes())
        .finalize();
    let hex = hex::encode(digest);
    let id = format!("bulk-{}", &hex[..BULK_ID_HEX_DIGITS]);
    // Letters, digits and a dash, 45 bytes: always a valid event id.
    EventId::parse(&id).unwrap_or_else(|e| unreachable!("derived event id {id}: {e}"))
}

fn check_batch_id(batch_id: &str) -> Result<(), InvalidInput> {
    EventId::parse(batch_id)
        .map(drop)
        .map_err(|e| InvalidInput::new("batch_id", e.problem))
}

fn parse_event(event: &proto::UsageEvent) -> Parsed {
    let service = convert::service(&event.service_type)?;
    // Past the service type, a refusal keeps it for the decision's label.
    let with_service = |error: InvalidInput| BadEvent {
        service: Some(service.clone()),
        error,
    };
    let teacher_id = TeacherId::parse(&event.teacher_id).map_err(with_service)?;
    let sync_event = SyncEvent {
        service: service.clone(),
        units: event.units,
        event_id: convert::event_id(&event.event_id).map_err(with_service)?,
        occurred_at_ms: event.occurred_at_ms,
        model: convert::model(&event.model).map_err(with_service)?,
    };
    Ok((teacher_id, sync_event))
}

/// Every teacher the batch names must be one the caller may charge: one
/// refusal refuses the whole batch, before anything is charged.
fn authorize_teachers(
    caller: &Caller,
    action: Action,
    school_id: &SchoolId,
    parsed: &[Parsed],
) -> Result<(), Status> {
    let teachers: BTreeSet<&TeacherId> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().map(|(teacher_id, _)| teacher_id))
        .collect();
    for teacher_id in teachers {
        authorize(caller, action, school_id, Some(teacher_id))?;
    }
    Ok(())
}

fn result(event_id: String, outcome: SyncOutcome) -> proto::SyncResult {
    let mut result = proto::SyncResult {
        event_id,
        ..Default::default()
    };
    match outcome {
        SyncOutcome::Accepted { cycle_start_ms } => {
            result.set_status(proto::SyncStatus::Accepted);
            result.cycle_start_ms = cycle_start_ms;
        }
        SyncOutcome::AcceptedOverQuota {
            cycle_start_ms,
            overage_units,
        } => {
            result.set_status(proto::SyncStatus::AcceptedOverQuota);
            result.cycle_start_ms = cycle_start_ms;
            result.overage_units = overage_units;
        }
        SyncOutcome::Duplicate => result.set_status(proto::SyncStatus::Duplicate),
        SyncOutcome::Rejected { reason, message } => {
            result.set_status(proto::SyncStatus::Rejected);
            result.set_reason(reject_reason(reason));
            result.message = message;
        }
    }
    result
}

fn reject_reason(reason: SyncRejection) -> proto::SyncRejectReason {
    match reason {
        SyncRejection::UnknownAllocation => proto::SyncRejectReason::UnknownAllocation,
        SyncRejection::TooOld => proto::SyncRejectReason::TooOld,
        SyncRejection::BadInput => proto::SyncRejectReason::BadInput,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_event_id_depends_on_batch_and_feature_only() {
        let id = bulk_event_id("batch-1", "claude_messages");
        assert_eq!(id, bulk_event_id("batch-1", "claude_messages"));
        assert_ne!(id, bulk_event_id("batch-2", "claude_messages"));
        assert_ne!(id, bulk_event_id("batch-1", "homework_help"));
        // The separator keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(bulk_event_id("a", "bc"), bulk_event_id("ab", "c"));
        assert_eq!(id.as_str().len(), 5 + BULK_ID_HEX_DIGITS);
    }

    /// The gate's request limit counts SYNC_EVENT_BYTES_MAX per event: the
    /// largest valid event, with its framing in the batch, must fit in it.
    #[test]
    fn the_largest_valid_event_fits_the_bytes_counted_per_event() {
        use prost::Message;
        use quotad_core::ids::{ID_BYTES_MAX, MODEL_BYTES_MAX, SERVICE_TYPE_BYTES_MAX};
        let event = proto::UsageEvent {
            event_id: "e".repeat(ID_BYTES_MAX),
            teacher_id: "t".repeat(ID_BYTES_MAX),
            service_type: "s".repeat(SERVICE_TYPE_BYTES_MAX),
            units: u64::MAX,
            model: "m".repeat(MODEL_BYTES_MAX),
            occurred_at_ms: i64::MIN,
        };
        assert!(parse_event(&event).is_ok_and(|(_, e)| e.service.as_str().len() == 64));
        let batch = proto::SyncUsageRequest {
            school_id: String::new(),
            events: vec![event],
        };
        assert!(
            batch.encoded_len() <= crate::config::SYNC_EVENT_BYTES_MAX,
            "{} bytes",
            batch.encoded_len()
        );
    }
}
