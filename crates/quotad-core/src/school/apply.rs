//! How a school's state follows its log: [`SchoolState::apply`] folds one
//! record into the pools, the slices' terms, the requests and the audit trail.
//! It never decides anything (the checks in the parent module did, before the
//! record was written), so replaying the log rebuilds the same state.

use std::sync::Arc;

use super::{SchoolConfig, SchoolState, SliceTerms, SYSTEM_ACTOR};
use crate::audit::{AuditAction, Draft};
use crate::cycle::{format_ms, TimestampMs};
use crate::ids::{ServiceType, TeacherId};
use crate::record::{Change, Grant, Record, SliceSet};
use crate::requests::{IncreaseRequest, RequestOutcome, RequestStatus};
use crate::slice::SliceStatus;

impl SchoolState {
    /// Applies a fact to the pools, the slices' terms, the requests and the
    /// audit trail. Never decides: the record says what happened.
    pub fn apply(&mut self, record: &Record) {
        if let Some(cycle_start_ms) = record.cycle_start_ms() {
            self.roll_to(cycle_start_ms);
        }
        // A record of a cycle that has ended here (written by an actor that
        // had not seen the rollover) is applied as that rollover would have
        // left it.
        let late = record
            .cycle_start_ms()
            .is_some_and(|c| c < self.cycle_start_ms);
        match record {
            Record::SchoolCreated {
                config,
                pools,
                change,
                ..
            } => self.created(config, pools, change),
            Record::PoolSet {
                service,
                cycle_units,
                change,
                ..
            } => self.set_pool(service, *cycle_units, change),
            Record::AllocationSet {
                teacher_id,
                service,
                allocated_units,
                priority,
                auto_renew,
                change,
                grant,
                ..
            } => {
                let slice = SliceSet {
                    teacher_id: teacher_id.clone(),
                    service: service.clone(),
                    allocated_units: *allocated_units,
                    priority: *priority,
                    auto_renew: *auto_renew,
                };
                self.set_slice(&slice, change, late);
                if let Some(grant) = grant {
                    self.approve(grant, change);
                }
            }
            Record::AllocationsSet { slices, change, .. } => {
                for slice in slices {
                    self.set_slice(slice, change, late);
                }
            }
            Record::AllocationStatusSet {
                teacher_id,
                service,
                status,
                change,
                ..
            } => self.set_status(teacher_id, service, *status, change),
            Record::AllocationRemoved {
                teacher_id,
                service,
                change,
                ..
            } => self.remove_slice(teacher_id, service, change),
            Record::DataLossAccepted {
                served_through_seq,
                lost,
                change,
                ..
            } => {
                let draft = Draft::new(AuditAction::DataLossAccepted, change)
                    .after("served_through_wal_seq", served_through_seq)
                    .after("lost", lost);
                self.history.append(draft);
            }
            Record::SettingsSet { .. } => self.set_settings(record),
            Record::RequestFiled {
                request_id,
                teacher_id,
                service,
                units,
                change,
                ..
            } => self.file_request(*request_id, teacher_id, service, *units, change),
            Record::RequestDecided {
                request_id,
                outcome,
                change,
                ..
            } => {
                let (status, action) = match outcome {
                    RequestOutcome::Rejected => {
                        (RequestStatus::Rejected, AuditAction::RequestRejected)
                    }
                    RequestOutcome::Expired => {
                        (RequestStatus::Expired, AuditAction::RequestExpired)
                    }
                };
                self.decide(*request_id, status, action, change);
            }
            Record::UsageCharged(usage) if usage.cycle_start_ms == self.cycle_start_ms => {
                let pool = self.pools.entry(usage.service.clone()).or_default();
                pool.borrowed_units = pool.borrowed_units.saturating_add(usage.borrowed_units);
            }
            Record::CycleRolledOver {
                from_start_ms,
                to_start_ms,
                at_ms,
                ..
            } => self.rolled_over(*from_start_ms, *to_start_ms, *at_ms),
            _ => {}
        }
    }

    fn created(&mut self, config: &SchoolConfig, pools: &[(ServiceType, u64)], change: &Change) {
        let mut draft = Draft::new(AuditAction::SchoolCreated, change)
            .after("name", &config.name)
            .after("tier", config.tier.as_str())
            .after("billing_anchor_day", config.anchor.day())
            .after("borrowing_enabled", config.borrowing_enabled)
            .after("self_service_requests", config.self_service_requests);
        for (service, units) in pools {
            draft = draft.after(&format!("cycle_units.{service}"), units);
        }
        self.history.append(draft);
    }

    /// The audit entry of a rollover; [`SchoolState::roll_to`] moved the state.
    fn rolled_over(
        &mut self,
        from_start_ms: TimestampMs,
        to_start_ms: TimestampMs,
        at_ms: TimestampMs,
    ) {
        let change = Change {
            by: Arc::from(SYSTEM_ACTOR),
            reason: Arc::from("billing cycle ended"),
            at_ms,
        };
        self.history.append(
            Draft::new(AuditAction::CycleRolledOver, &change)
                .before("cycle_start", format_ms(from_start_ms))
                .after("cycle_start", format_ms(to_start_ms)),
        );
    }

    fn set_pool(&mut self, service: &ServiceType, cycle_units: u64, change: &Change) {
        let pool = self.pools.entry(service.clone()).or_default();
        let before = pool.cycle_units;
        pool.cycle_units = cycle_units;
        self.history.append(
            Draft::new(AuditAction::PoolSet, change)
                .service(service)
                .before("cycle_units", before)
                .after("cycle_units", cycle_units),
        );
    }

    fn set_status(
        &mut self,
        teacher_id: &TeacherId,
        service: &ServiceType,
        status: SliceStatus,
        change: &Change,
    ) {
        let Some(terms) = self.slices.get_mut(&(teacher_id.clone(), service.clone())) else {
            return;
        };
        let before = terms.status;
        terms.status = status;
        self.history.append(
            Draft::new(AuditAction::AllocationStatusSet, change)
                .slice(teacher_id, service)
                .before("status", before.as_str())
                .after("status", status.as_str()),
        );
    }

    fn remove_slice(&mut self, teacher_id: &TeacherId, service: &ServiceType, change: &Change) {
        let Some(old) = self.slices.remove(&(teacher_id.clone(), service.clone())) else {
            return;
        };
        if let Some(pool) = self.pools.get_mut(service) {
            pool.allocated_units = pool.allocated_units.saturating_sub(old.allocated_units);
        }
        self.history.append(
            terms_values(
                Draft::new(AuditAction::AllocationRemoved, change),
                Some(&old),
                true,
            )
            .slice(teacher_id, service),
        );
    }

    /// `record` is a [`Record::SettingsSet`]; only the settings it names change.
    fn set_settings(&mut self, record: &Record) {
        let Record::SettingsSet {
            name,
            borrowing_enabled,
            self_service_requests,
            next_anchor,
            change,
            ..
        } = record
        else {
            return;
        };
        let mut draft = Draft::new(AuditAction::SettingsSet, change);
        if let Some(anchor) = next_anchor {
            draft = draft
                .before("billing_anchor_day", self.config.anchor.day())
                .after("next_billing_anchor_day", anchor.day());
            self.next_anchor = Some(*anchor);
        }
        if let Some(name) = name {
            draft = draft.before("name", &self.config.name).after("name", name);
            self.config.name = name.clone();
        }
        if let Some(on) = borrowing_enabled {
            draft = draft
                .before("borrowing_enabled", self.config.borrowing_enabled)
                .after("borrowing_enabled", on);
            self.config.borrowing_enabled = *on;
        }
        if let Some(on) = self_service_requests {
            draft = draft
                .before("self_service_requests", self.config.self_service_requests)
                .after("self_service_requests", on);
            self.config.self_service_requests = *on;
        }
        self.history.append(draft);
    }

    fn file_request(
        &mut self,
        request_id: u64,
        teacher_id: &TeacherId,
        service: &ServiceType,
        units: u64,
        change: &Change,
    ) {
        self.requests.insert(
            request_id,
            IncreaseRequest {
                id: request_id,
                teacher_id: teacher_id.clone(),
                service: service.clone(),
                units,
                reason: change.reason.clone(),
                filed_by: change.by.clone(),
                created_at_ms: change.at_ms,
                status: RequestStatus::Pending,
                decided_by: None,
                decision_reason: None,
                decided_at_ms: None,
            },
        );
        self.history.append(
            Draft::new(AuditAction::RequestFiled, change)
                .slice(teacher_id, service)
                .after("request_id", request_id)
                .after("requested_units", units)
                .after("status", "pending"),
        );
    }

    fn set_slice(&mut self, slice: &SliceSet, change: &Change, late: bool) {
        let key = (slice.teacher_id.clone(), slice.service.clone());
        let old = self.slices.get(&key).copied();
        let terms = SliceTerms {
            allocated_units: slice.allocated_units,
            auto_renew: slice.auto_renew,
            priority: slice.priority,
            status: old.map_or(SliceStatus::Active, |t| t.status),
        };
        let kept = SliceTerms {
            allocated_units: if late && !slice.auto_renew {
                0
            } else {
                slice.allocated_units
            },
            ..terms
        };
        self.slices.insert(key, kept);
        let pool = self.pools.entry(slice.service.clone()).or_default();
        pool.allocated_units = pool
            .allocated_units
            .saturating_sub(old.map_or(0, |t| t.allocated_units))
            .saturating_add(kept.allocated_units);
        let draft = terms_values(
            Draft::new(AuditAction::AllocationSet, change),
            old.as_ref(),
            true,
        );
        let draft = terms_values(draft, Some(&terms), false);
        self.history
            .append(draft.slice(&slice.teacher_id, &slice.service));
    }

    fn approve(&mut self, grant: &Grant, change: &Change) {
        self.decide(
            grant.request_id,
            RequestStatus::Approved { units: grant.units },
            AuditAction::RequestApproved,
            change,
        );
    }

    fn decide(&mut self, id: u64, status: RequestStatus, action: AuditAction, change: &Change) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        request.status = status;
        request.decided_by = Some(change.by.clone());
        request.decision_reason = Some(change.reason.clone());
        request.decided_at_ms = Some(change.at_ms);
        let mut draft = Draft::new(action, change)
            .slice(&request.teacher_id, &request.service)
            .after("request_id", id)
            .before("status", "pending")
            .after("status", status.as_str());
        if let RequestStatus::Approved { units } = status {
            draft = draft
                .before("requested_units", request.units)
                .after("approved_units", units);
        }
        self.history.append(draft);
    }
}

/// A slice's terms as audit values (`before` or `after`).
fn terms_values(draft: Draft, terms: Option<&SliceTerms>, before: bool) -> Draft {
    let Some(t) = terms else {
        return draft;
    };
    let values = [
        ("allocated_units", t.allocated_units.to_string()),
        ("priority", t.priority.as_str().to_string()),
        ("auto_renew", t.auto_renew.to_string()),
        ("status", t.status.as_str().to_string()),
    ];
    values.into_iter().fold(draft, |d, (name, value)| {
        if before {
            d.before(name, value)
        } else {
            d.after(name, value)
        }
    })
}
