//! The gate's calls, on the hot path: routed to the teacher's actor, then
//! answered once durable. A sync batch is grouped by teacher first.

use std::collections::BTreeMap;

use crate::telemetry;
use quotad_core::{
    service_not_configured, DenyReason, InvalidInput, SchoolId, ServiceType, SyncEvent,
    SyncOutcome, SyncRejection, TeacherId, TimestampMs,
};

use super::messages::*;
use super::views::*;
use super::{registry, Engine, EngineError, TeacherRef};

impl Engine {
    pub async fn consume(
        &self,
        teacher: &TeacherRef,
        msg: Consume,
    ) -> Result<Decision, EngineError> {
        self.limits().check_units("units", msg.units)?;
        let service = msg.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("consume", DenyReason::NoAllocation.as_str(), &service);
            return Ok(Self::no_allocation(teacher, &service));
        };
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        let decision = self.settle(durable).await?;
        telemetry::decision("consume", outcome(&decision), &service);
        Ok(decision)
    }

    pub async fn check(&self, teacher: &TeacherRef, msg: Check) -> Result<Decision, EngineError> {
        self.limits().check_units("units", msg.units)?;
        let service = msg.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("check", DenyReason::NoAllocation.as_str(), &service);
            return Ok(Self::no_allocation(teacher, &service));
        };
        let decision = addr.send(msg).await.map_err(EngineError::mailbox)??;
        telemetry::decision("check", outcome(&decision), &service);
        Ok(decision)
    }

    pub async fn reserve(
        &self,
        teacher: &TeacherRef,
        mut msg: Reserve,
    ) -> Result<(Decision, TimestampMs), EngineError> {
        msg.0.units = self.limits().check_units("estimate_units", msg.0.units)?;
        msg.0.ttl_ms = self.limits().check_ttl(msg.0.ttl_ms)?;
        let service = msg.0.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("reserve", DenyReason::NoAllocation.as_str(), &service);
            return Ok((Self::no_allocation(teacher, &service), 0));
        };
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        let answer = self.settle(durable).await?;
        telemetry::decision("reserve", outcome(&answer.0), &service);
        Ok(answer)
    }

    pub async fn commit(
        &self,
        teacher: &TeacherRef,
        msg: Commit,
    ) -> Result<CommitResult, EngineError> {
        self.limits()
            .check_units("actual_units", msg.actual_units)?;
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    pub async fn release(&self, teacher: &TeacherRef, msg: Release) -> Result<u64, EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    pub async fn usage(&self, teacher: &TeacherRef) -> Result<UsageView, EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        addr.send(GetUsage).await.map_err(EngineError::mailbox)?
    }

    /// Charges usage that already happened (a device's journal, an old
    /// client's counts): one outcome per event, in the batch's order. Each
    /// teacher's events go to its actor in one message; the answer waits for
    /// the last record any of them needs, so every outcome told is durable.
    pub async fn sync_usage(
        &self,
        school_id: &SchoolId,
        events: Vec<Result<(TeacherId, SyncEvent), BadEvent>>,
    ) -> Result<Vec<SyncOutcome>, EngineError> {
        self.limits().check_sync_batch("events", events.len())?;
        let school = self.school(school_id)?;
        let event_count = events.len();
        // Decisions are labelled by service type only for the school's own
        // types: a device naming any type it likes must not take a label.
        let services: Vec<Option<ServiceType>> = events
            .iter()
            .map(|e| {
                match e {
                    Ok((_, event)) => Some(&event.service),
                    Err(bad) => bad.service.as_ref(),
                }
                .filter(|service| school.has_service(service))
                .cloned()
            })
            .collect();
        let (mut outcomes, by_teacher) = group_sync_events(&school, school_id, events);
        let sends = by_teacher
            .into_iter()
            .map(|(teacher_id, (indexes, batch))| {
                let teacher = TeacherRef {
                    school_id: school_id.clone(),
                    teacher_id,
                };
                async move { (indexes, self.sync_teacher(&teacher, batch).await) }
            });
        let mut last_seq = 0;
        for (indexes, answer) in futures::future::join_all(sends).await {
            let durable = answer?;
            // Answers are matched to events by position: a short answer
            // would shift them, so it is refused rather than trusted.
            if durable.value.len() != indexes.len() {
                return Err(EngineError::Internal(format!(
                    "a teacher actor answered {} outcomes for {} synced events",
                    durable.value.len(),
                    indexes.len()
                )));
            }
            last_seq = last_seq.max(durable.wal_seq.unwrap_or(0));
            for (index, outcome) in indexes.into_iter().zip(durable.value) {
                outcomes[index] = Some(outcome);
            }
        }
        self.core.shared.wal.wait_durable(last_seq).await?;
        let outcomes: Vec<SyncOutcome> = outcomes.into_iter().flatten().collect();
        if outcomes.len() != event_count {
            return Err(EngineError::Internal(
                "a synced event got no outcome".into(),
            ));
        }
        for (outcome, service) in outcomes.iter().zip(&services) {
            match service {
                Some(service) => telemetry::decision("sync_usage", outcome.as_str(), service),
                None => telemetry::decision_of_no_service("sync_usage", outcome.as_str()),
            }
        }
        Ok(outcomes)
    }

    /// One teacher's share of a sync batch. A teacher without any slice in
    /// the school has no actor: each event is an unknown allocation.
    async fn sync_teacher(
        &self,
        teacher: &TeacherRef,
        events: Vec<SyncEvent>,
    ) -> Result<Durable<Vec<SyncOutcome>>, EngineError> {
        let Some(addr) = self.route(teacher, None)? else {
            let unknown = SyncOutcome::rejected(
                SyncRejection::UnknownAllocation,
                format!(
                    "teacher {} has no allocation in school {}",
                    teacher.teacher_id, teacher.school_id
                ),
            );
            return Ok(Durable::read(vec![unknown; events.len()]));
        };
        addr.send(SyncUsage(events))
            .await
            .map_err(EngineError::mailbox)?
    }
}

/// Per teacher: the positions in the batch of its events, and the events.
type SyncByTeacher = BTreeMap<TeacherId, (Vec<usize>, Vec<SyncEvent>)>;

/// The outcomes already known (bad input, a service type the school lacks)
/// and, per teacher, the events left for its actor.
/// A synced event refused before it reached a teacher, with its service
/// type when that much of it was valid (its decision is labelled by it).
#[derive(Debug, Clone)]
pub struct BadEvent {
    pub service: Option<ServiceType>,
    pub error: InvalidInput,
}

impl From<InvalidInput> for BadEvent {
    fn from(error: InvalidInput) -> Self {
        Self {
            service: None,
            error,
        }
    }
}

fn group_sync_events(
    school: &registry::SchoolHandle,
    school_id: &SchoolId,
    events: Vec<Result<(TeacherId, SyncEvent), BadEvent>>,
) -> (Vec<Option<SyncOutcome>>, SyncByTeacher) {
    let mut outcomes: Vec<Option<SyncOutcome>> = vec![None; events.len()];
    let mut by_teacher = SyncByTeacher::new();
    for (index, item) in events.into_iter().enumerate() {
        match item {
            Err(bad) => outcomes[index] = Some(SyncOutcome::bad_input(&bad.error)),
            Ok((_, event)) if !school.has_service(&event.service) => {
                outcomes[index] = Some(SyncOutcome::rejected(
                    SyncRejection::UnknownAllocation,
                    service_not_configured(school_id, &event.service).to_string(),
                ))
            }
            Ok((teacher_id, event)) => {
                let (indexes, batch) = by_teacher.entry(teacher_id).or_default();
                indexes.push(index);
                batch.push(event);
            }
        }
    }
    (outcomes, by_teacher)
}

fn outcome(decision: &Decision) -> &'static str {
    match (decision.duplicate, decision.reason) {
        (true, _) => "duplicate",
        (false, None) => "allowed",
        (false, Some(reason)) => reason.as_str(),
    }
}
