//! A teacher's slices in one school, with their holds and the ids already
//! seen. Decisions are made by `&self` methods that return a record; the
//! record is then applied with [`TeacherAccount::apply`], the same function
//! that replays the write-ahead log. A decision therefore never changes state
//! that the log would not reproduce.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cycle::{following_start, next_cycle, BillingAnchor, Cycle, CycleInfo, TimestampMs};
use super::error::{add_units, InvalidInput, RuleError};
use super::ids::{EventId, ReservationId, SchoolId, ServiceType, TeacherId};
use super::limits::RuleLimits;
use super::record::{HoldEnd, Record, Usage, UsageSource};
use super::slice::{CycleTotals, DenyReason, Priority, Slice, SliceStatus};

mod apply;

/// The answer of the quota check, before idempotency and borrowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `from_slice` fits in the slice; `borrow` more must be granted by the school.
    Allow {
        from_slice: u64,
        borrow: u64,
    },
    Deny(DenyReason),
}

/// The first decision about an event id, returned again for every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEntry {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    pub units: u64,
    pub borrowed_units: u64,
    pub occurred_at_ms: TimestampMs,
    /// The log position of the record that decided it: a retry is answered
    /// only once that record is durable.
    pub wal_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOutcome {
    pub charged_units: u64,
    pub overage_units: u64,
    pub hold_had_expired: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    Held,
    Denied(DenyReason),
    Committed(CommitOutcome),
    Released,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub service: ServiceType,
    pub units: u64,
    pub created_at_ms: TimestampMs,
    pub expires_at_ms: TimestampMs,
    pub model: Arc<str>,
    pub state: HoldState,
    pub wal_seq: u64,
}

/// A reservation asked for, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub service: ServiceType,
    pub units: u64,
    pub ttl_ms: u64,
    pub reservation_id: ReservationId,
    pub model: Arc<str>,
}

/// What a consume or reserve call must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<D> {
    /// The id was seen before: answer with the first decision, change nothing.
    Duplicate(D),
    Decide(Gate),
}

/// What a commit must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitStep {
    Duplicate {
        outcome: CommitOutcome,
        wal_seq: u64,
    },
    Charge(Record),
}

/// One service type's figures as a teacher sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUsageView {
    pub service: ServiceType,
    pub allocated_units: u64,
    /// Everything used this cycle, borrowed units included.
    pub used_units: u64,
    pub reserved_units: u64,
    pub remaining_units: u64,
    /// The part of `used_units` taken from the school's unallocated units.
    pub borrowed_units: u64,
    pub overage_units: u64,
    pub priority: Priority,
    pub status: SliceStatus,
    pub auto_renew: bool,
    /// What the slice counted in the cycle before this one.
    pub previous: CycleTotals,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherAccount {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub anchor: BillingAnchor,
    /// An anchor that takes effect when the next cycle starts.
    pub next_anchor: Option<BillingAnchor>,
    pub cycle_start_ms: TimestampMs,
    pub slices: BTreeMap<ServiceType, Slice>,
    pub reservations: HashMap<ReservationId, Reservation>,
    pub events: HashMap<EventId, EventEntry>,
    /// No live hold expires before this; a cache, so it is not persisted.
    #[serde(skip, default = "earliest_unknown")]
    earliest_expiry_ms: TimestampMs,
}

fn earliest_unknown() -> TimestampMs {
    TimestampMs::MIN
}

impl TeacherAccount {
    /// A slice may not shrink below what its teacher used and holds this
    /// cycle ([`Slice::lowest_allowed_units`]: keeping or growing a slice
    /// that ran over is allowed); a slice not there yet has no floor.
    pub fn check_shrink(
        &self,
        service: &ServiceType,
        allocated_units: u64,
    ) -> Result<(), RuleError> {
        let Some(slice) = self.slices.get(service) else {
            return Ok(());
        };
        let lowest_units = slice.lowest_allowed_units();
        if allocated_units < lowest_units {
            return Err(RuleError::precondition(format!(
                "teacher {} has used {} and holds {} units of {service} this cycle; the slice cannot shrink below {lowest_units}",
                self.teacher_id, slice.used_units, slice.reserved_units
            )));
        }
        Ok(())
    }

    /// What each slice may shrink to, by service type
    /// ([`Slice::lowest_allowed_units`]).
    pub fn floors(&self) -> BTreeMap<ServiceType, u64> {
        self.slices
            .iter()
            .map(|(service, slice)| (service.clone(), slice.lowest_allowed_units()))
            .collect()
    }

    pub fn new(
        school_id: SchoolId,
        teacher_id: TeacherId,
        anchor: BillingAnchor,
        cycle_start_ms: TimestampMs,
    ) -> Self {
        Self {
            school_id,
            teacher_id,
            anchor,
            next_anchor: None,
            cycle_start_ms,
            slices: BTreeMap::new(),
            reservations: HashMap::new(),
            events: HashMap::new(),
            earliest_expiry_ms: TimestampMs::MAX,
        }
    }

    pub fn cycle(&self) -> Result<Cycle, InvalidInput> {
        self.anchor.cycle_from(self.cycle_start_ms)
    }

    /// The cycle that holds `now_ms`, when it is newer than the current one.
    pub fn due_cycle(&self, now_ms: TimestampMs) -> Result<Option<Cycle>, InvalidInput> {
        next_cycle(
            self.cycle()?,
            self.next_anchor.unwrap_or(self.anchor),
            now_ms,
        )
    }

    /// Moves the account to the cycle that holds `now_ms` if that cycle is
    /// newer. Deterministic, so the log's replay reaches the same state.
    pub fn roll_if_due(&mut self, now_ms: TimestampMs) -> Result<(), InvalidInput> {
        if let Some(cycle) = self.due_cycle(now_ms)? {
            self.roll_to(cycle.start_ms);
        }
        Ok(())
    }

    /// Catches up with the school's cycle, then rolls by the clock exactly as
    /// the school will (same anchors, same function). The school decides the
    /// cycle: a teacher never stays behind a school that has rolled, and an
    /// anchor change reaches the teacher with no message that could be lost.
    pub fn follow(&mut self, school: CycleInfo, now_ms: TimestampMs) -> Result<(), InvalidInput> {
        self.follow_school(school);
        self.roll_if_due(now_ms)
    }

    /// Catches up with the school's cycle (no clock): the cycles the school
    /// went through are the ones this account goes through, and its anchors
    /// become the school's.
    pub fn follow_school(&mut self, school: CycleInfo) {
        if school.start_ms > self.cycle_start_ms {
            // Whole cycles this account never saw had no usage here.
            if school.previous_start_ms > self.cycle_start_ms {
                self.roll_once(school.previous_start_ms);
            }
            self.roll_once(school.start_ms);
        }
        // Ahead of the school (rolled by the clock first), the teacher keeps
        // the anchors it rolled with: the school's are those of the old cycle.
        if school.start_ms == self.cycle_start_ms {
            self.anchor = school.anchor;
            self.next_anchor = school.next_anchor;
        }
    }

    fn roll_once(&mut self, to_start_ms: TimestampMs) {
        for slice in self.slices.values_mut() {
            slice.roll(self.cycle_start_ms);
        }
        self.cycle_start_ms = to_start_ms;
        if let Some(anchor) = self.next_anchor.take() {
            self.anchor = anchor;
        }
    }

    /// Starts the cycle that begins at `cycle_start_ms` (if it is newer); a
    /// pending anchor takes effect with it.
    /// Every cycle in between is passed through, so the previous cycle is
    /// the one just before `cycle_start_ms` however late the roll is noticed.
    pub fn roll_to(&mut self, cycle_start_ms: TimestampMs) {
        while self.cycle_start_ms < cycle_start_ms {
            let step_ms = following_start(self.cycle_start_ms, self.anchor)
                .filter(|next| *next < cycle_start_ms)
                .unwrap_or(cycle_start_ms);
            self.roll_once(step_ms);
        }
    }

    /// The quota check: may `units` more be used now?
    pub fn gate(&self, service: &ServiceType, units: u64) -> Result<Gate, InvalidInput> {
        let Some(slice) = self.slices.get(service) else {
            return Ok(Gate::Deny(DenyReason::NoAllocation));
        };
        if slice.status == SliceStatus::Suspended {
            return Ok(Gate::Deny(DenyReason::Suspended));
        }
        let committed = add_units("used_units", slice.used_units, slice.reserved_units)?;
        let needed = add_units("units", committed, units)?;
        if needed <= slice.allocated_units {
            return Ok(Gate::Allow {
                from_slice: units,
                borrow: 0,
            });
        }
        if slice.priority == Priority::High {
            let from_slice = slice.remaining_units();
            return Ok(Gate::Allow {
                from_slice,
                borrow: units - from_slice,
            });
        }
        Ok(Gate::Deny(DenyReason::Exhausted))
    }

    /// First step of a consume: a retry, or a fresh decision.
    pub fn begin_consume(
        &self,
        service: &ServiceType,
        units: u64,
        event_id: &EventId,
    ) -> Result<Step<EventEntry>, InvalidInput> {
        if let Some(entry) = self.events.get(event_id) {
            return Ok(Step::Duplicate(*entry));
        }
        Ok(Step::Decide(self.gate(service, units)?))
    }

    /// First step of a reserve: a retry, or a fresh decision.
    pub fn begin_reserve(
        &self,
        service: &ServiceType,
        units: u64,
        reservation_id: &ReservationId,
        limits: &RuleLimits,
    ) -> Result<Step<Reservation>, RuleError> {
        if let Some(reservation) = self.reservations.get(reservation_id) {
            return Ok(Step::Duplicate(reservation.clone()));
        }
        Ok(Step::Decide(self.hold_gate(service, units, limits)?))
    }

    /// The quota check of a new hold. Holds never borrow: a hold is an
    /// estimate, and units lent for an estimate would stay lent after a
    /// smaller commit or a release. A high priority teacher short of units
    /// borrows with Consume (or commits past the hold, as overage).
    pub fn hold_gate(
        &self,
        service: &ServiceType,
        units: u64,
        limits: &RuleLimits,
    ) -> Result<Gate, RuleError> {
        let live_holds = self
            .reservations
            .values()
            .filter(|r| r.state == HoldState::Held)
            .count();
        if live_holds >= limits.holds_per_teacher_max {
            return Err(RuleError::precondition(format!(
                "teacher {} has {live_holds} live holds, the most allowed; commit or release some first",
                self.teacher_id
            )));
        }
        Ok(match self.gate(service, units)? {
            Gate::Allow { borrow: 0, .. } => Gate::Allow {
                from_slice: units,
                borrow: 0,
            },
            Gate::Allow { .. } => Gate::Deny(DenyReason::Exhausted),
            deny => deny,
        })
    }

    /// First step of a commit: charge the real units, even past the slice.
    pub fn begin_commit(
        &self,
        reservation_id: &ReservationId,
        actual_units: u64,
        now_ms: TimestampMs,
    ) -> Result<CommitStep, RuleError> {
        let reservation = self.reservations.get(reservation_id).ok_or_else(|| {
            RuleError::not_found(format!(
                "reservation {:?} is unknown for teacher {} (never made, or older than the idempotency window)",
                reservation_id.as_str(),
                self.teacher_id
            ))
        })?;
        if let HoldState::Committed(outcome) = reservation.state {
            return Ok(CommitStep::Duplicate {
                outcome,
                wal_seq: reservation.wal_seq,
            });
        }
        if let HoldState::Denied(reason) = reservation.state {
            // Reserve answered no (a retry of it says so again): nothing was
            // held and no call should have been made on it.
            return Err(RuleError::precondition(format!(
                "reservation {:?} of teacher {} was denied ({}): there is nothing to commit",
                reservation_id.as_str(),
                self.teacher_id,
                reason.as_str()
            )));
        }
        let held_units = if reservation.state == HoldState::Held {
            reservation.units
        } else {
            0
        };
        // A hold that ended (expired or released) may be committed late, as
        // usage that happened; but only into a slice the school still has.
        // Charging a removed slice would bring it back at the teacher alone.
        let slice = self.slices.get(&reservation.service).cloned().ok_or_else(|| {
            RuleError::precondition(format!(
                "teacher {} no longer has a slice of {} (it was removed after reservation {:?} ended): the usage cannot be charged",
                self.teacher_id,
                reservation.service,
                reservation_id.as_str()
            ))
        })?;
        let reserved_by_others = slice.reserved_units.saturating_sub(held_units);
        add_units("actual_units", slice.used_units, actual_units)?;
        let available = slice
            .allocated_units
            .saturating_sub(slice.used_units.saturating_add(reserved_by_others));
        Ok(CommitStep::Charge(Record::UsageCharged(Usage {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_id.clone(),
            service: reservation.service.clone(),
            source: UsageSource::Reservation {
                id: reservation_id.clone(),
                held_units,
                hold_had_expired: reservation.state == HoldState::Expired,
            },
            units: actual_units,
            borrowed_units: 0,
            overage_units: actual_units.saturating_sub(available),
            cycle_start_ms: self.cycle_start_ms,
            occurred_at_ms: now_ms,
            recorded_at_ms: now_ms,
            model: reservation.model.clone(),
        })))
    }

    /// The record of a consume decision. `gate` is the quota check and
    /// `borrow_granted` whether the school lent what it asked for.
    #[allow(clippy::too_many_arguments)]
    pub fn consume_record(
        &self,
        service: &ServiceType,
        units: u64,
        event_id: &EventId,
        gate: Gate,
        borrow_granted: bool,
        occurred_at_ms: TimestampMs,
        now_ms: TimestampMs,
        model: &Arc<str>,
    ) -> Record {
        let borrowed_units = match gate {
            Gate::Allow { borrow: 0, .. } => 0,
            Gate::Allow { borrow, .. } if borrow_granted => borrow,
            Gate::Allow { .. } => {
                return self.denied_record(
                    service,
                    event_id,
                    DenyReason::Exhausted,
                    occurred_at_ms,
                    now_ms,
                )
            }
            Gate::Deny(reason) => {
                return self.denied_record(service, event_id, reason, occurred_at_ms, now_ms)
            }
        };
        Record::UsageCharged(Usage {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_id.clone(),
            service: service.clone(),
            source: UsageSource::Event(event_id.clone()),
            units,
            borrowed_units,
            overage_units: 0,
            cycle_start_ms: self.cycle_start_ms,
            occurred_at_ms,
            recorded_at_ms: now_ms,
            model: model.clone(),
        })
    }

    fn denied_record(
        &self,
        service: &ServiceType,
        event_id: &EventId,
        reason: DenyReason,
        occurred_at_ms: TimestampMs,
        now_ms: TimestampMs,
    ) -> Record {
        Record::UsageDenied {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_id.clone(),
            service: service.clone(),
            event_id: event_id.clone(),
            reason,
            occurred_at_ms,
            cycle_start_ms: self.cycle_start_ms,
            recorded_at_ms: now_ms,
        }
    }

    /// The record of a reserve decision.
    pub fn reserve_record(&self, request: &HoldRequest, gate: Gate, now_ms: TimestampMs) -> Record {
        match gate {
            Gate::Allow { .. } => Record::Reserved {
                school_id: self.school_id.clone(),
                teacher_id: self.teacher_id.clone(),
                service: request.service.clone(),
                reservation_id: request.reservation_id.clone(),
                units: request.units,
                expires_at_ms: now_ms
                    .saturating_add(i64::try_from(request.ttl_ms).unwrap_or(i64::MAX)),
                cycle_start_ms: self.cycle_start_ms,
                at_ms: now_ms,
                model: request.model.clone(),
            },
            Gate::Deny(reason) => Record::ReserveDenied {
                school_id: self.school_id.clone(),
                teacher_id: self.teacher_id.clone(),
                service: request.service.clone(),
                reservation_id: request.reservation_id.clone(),
                reason,
                cycle_start_ms: self.cycle_start_ms,
                at_ms: now_ms,
            },
        }
    }

    /// Why a usage of `units` was denied, in a sentence a person can read.
    pub fn explain(&self, service: &ServiceType, reason: DenyReason, units: u64) -> String {
        let slice = self.slices.get(service);
        match (reason, slice) {
            (DenyReason::Exhausted, Some(s)) => format!(
                "the {service} slice is exhausted: {} used and {} reserved of {} allocated, {units} asked",
                s.used_units, s.reserved_units, s.allocated_units
            ),
            (DenyReason::Suspended, _) => format!("the {service} slice of teacher {} is suspended", self.teacher_id),
            _ => format!("teacher {} has no {service} slice", self.teacher_id),
        }
    }

    /// The record that frees a live hold, or None when it is already gone.
    pub fn release_record(
        &self,
        reservation_id: &ReservationId,
        now_ms: TimestampMs,
    ) -> Option<Record> {
        let reservation = self.reservations.get(reservation_id)?;
        (reservation.state == HoldState::Held)
            .then(|| self.hold_ended(reservation_id, HoldEnd::Released, now_ms))
    }

    /// Records that free every hold whose time ran out by `now_ms`.
    pub fn expiry_records(&self, now_ms: TimestampMs) -> Vec<Record> {
        if now_ms < self.earliest_expiry_ms {
            return Vec::new();
        }
        self.reservations
            .iter()
            .filter(|(_, r)| r.state == HoldState::Held && r.expires_at_ms <= now_ms)
            .map(|(id, _)| self.hold_ended(id, HoldEnd::Expired, now_ms))
            .collect()
    }

    fn hold_ended(
        &self,
        reservation_id: &ReservationId,
        how: HoldEnd,
        now_ms: TimestampMs,
    ) -> Record {
        Record::HoldEnded {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_id.clone(),
            reservation_id: reservation_id.clone(),
            how,
            at_ms: now_ms,
        }
    }

    /// Forgets ids older than the idempotency window. Events that old are
    /// refused anyway, so nothing can be counted twice.
    pub fn prune(&mut self, now_ms: TimestampMs, limits: &RuleLimits) {
        let oldest_ms = now_ms.saturating_sub(limits.idempotency_window_ms);
        self.events.retain(|_, e| e.occurred_at_ms >= oldest_ms);
        self.reservations
            .retain(|_, r| r.state == HoldState::Held || r.created_at_ms >= oldest_ms);
    }

    pub fn usage(&self) -> Vec<ServiceUsageView> {
        self.slices
            .iter()
            .map(|(service, s)| ServiceUsageView {
                service: service.clone(),
                allocated_units: s.allocated_units,
                used_units: s.total_used_units(),
                reserved_units: s.reserved_units,
                remaining_units: s.remaining_units(),
                borrowed_units: s.borrowed_units,
                overage_units: s.overage_units,
                priority: s.priority,
                status: s.status,
                auto_renew: s.auto_renew,
                previous: s.previous,
            })
            .collect()
    }

    pub fn remaining_units(&self, service: &ServiceType) -> u64 {
        self.slices.get(service).map_or(0, Slice::remaining_units)
    }

    /// Equal in everything the log holds (the expiry cache aside): how the
    /// simulator compares a live account with the one a replay rebuilds.
    pub fn same_state(&self, other: &Self) -> bool {
        let mut this = self.clone();
        this.earliest_expiry_ms = other.earliest_expiry_ms;
        this == *other
    }

    /// Checks the account's own invariants; used after a restart of its actor
    /// and by the property tests. Returns what is wrong.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (service, slice) in &self.slices {
            let held: u64 = self
                .reservations
                .values()
                .filter(|r| r.state == HoldState::Held && &r.service == service)
                .map(|r| r.units)
                .sum();
            if held != slice.reserved_units {
                return Err(format!(
                    "{service}: reserved {} but holds add up to {held}",
                    slice.reserved_units
                ));
            }
        }
        Ok(())
    }
}
