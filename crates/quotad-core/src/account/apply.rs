//! How an account follows its log: [`TeacherAccount::apply`] folds one record
//! into the slices, holds and seen ids. The same function serves a live
//! decision and a replay of the write-ahead log, so both end in the same state.

use std::sync::Arc;

use super::{CommitOutcome, EventEntry, HoldState, Reservation, TeacherAccount};
use crate::cycle::TimestampMs;
use crate::ids::{ReservationId, ServiceType};
use crate::record::{HoldEnd, Record, SliceSet, Usage, UsageSource};

impl TeacherAccount {
    /// Sets a slice's terms, unless a newer record set them already. Terms of
    /// a cycle that has ended here are applied as that cycle's rollover would
    /// have left them: a slice without auto-renew starts the new cycle at 0
    /// (the school returned its units to the pool when it rolled).
    fn set_terms(&mut self, wal_seq: u64, set: &SliceSet, cycle_start_ms: TimestampMs) {
        let late = cycle_start_ms < self.cycle_start_ms;
        let slice = self.slices.entry(set.service.clone()).or_default();
        if wal_seq < slice.terms_seq {
            return;
        }
        slice.terms_seq = wal_seq;
        slice.priority = set.priority;
        slice.auto_renew = set.auto_renew;
        if !late {
            slice.allocated_units = set.allocated_units;
            return;
        }
        if slice.previous.cycle_start_ms == cycle_start_ms {
            slice.previous.allocated_units = set.allocated_units;
        }
        slice.allocated_units = if set.auto_renew {
            set.allocated_units
        } else {
            0
        };
    }

    /// Applies a fact. Never decides: the record says what happened.
    pub fn apply(&mut self, wal_seq: u64, record: &Record) {
        let record_cycle_ms = record.cycle_start_ms().unwrap_or(self.cycle_start_ms);
        self.roll_to(record_cycle_ms);
        match record {
            Record::AllocationSet {
                teacher_id,
                service,
                allocated_units,
                priority,
                auto_renew,
                ..
            } => self.set_terms(
                wal_seq,
                &SliceSet {
                    teacher_id: teacher_id.clone(),
                    service: service.clone(),
                    allocated_units: *allocated_units,
                    priority: *priority,
                    auto_renew: *auto_renew,
                },
                record_cycle_ms,
            ),
            Record::AllocationsSet { slices, .. } => {
                let own = self.teacher_id.clone();
                for slice in slices.iter().filter(|s| s.teacher_id == own) {
                    self.set_terms(wal_seq, slice, record_cycle_ms);
                }
            }
            Record::AllocationRemoved { service, .. } => {
                self.slices.remove(service);
            }
            Record::AllocationStatusSet {
                service, status, ..
            } => {
                self.slices.entry(service.clone()).or_default().status = *status;
            }
            Record::UsageCharged(usage) => self.apply_usage(wal_seq, usage),
            Record::UsageDenied {
                event_id,
                reason,
                occurred_at_ms,
                ..
            } => {
                let entry = EventEntry {
                    allowed: false,
                    reason: Some(*reason),
                    units: 0,
                    borrowed_units: 0,
                    occurred_at_ms: *occurred_at_ms,
                    wal_seq,
                };
                self.events.insert(event_id.clone(), entry);
            }
            Record::Reserved {
                service,
                reservation_id,
                units,
                expires_at_ms,
                at_ms,
                model,
                ..
            } => {
                let hold = Reservation {
                    service: service.clone(),
                    units: *units,
                    created_at_ms: *at_ms,
                    expires_at_ms: *expires_at_ms,
                    model: model.clone(),
                    state: HoldState::Held,
                    wal_seq,
                };
                self.hold(reservation_id, hold);
            }
            Record::ReserveDenied {
                service,
                reservation_id,
                reason,
                at_ms,
                ..
            } => {
                let denied = Reservation {
                    service: service.clone(),
                    units: 0,
                    created_at_ms: *at_ms,
                    expires_at_ms: *at_ms,
                    model: Arc::from(""),
                    state: HoldState::Denied(*reason),
                    wal_seq,
                };
                self.reservations.insert(reservation_id.clone(), denied);
            }
            Record::HoldEnded {
                reservation_id,
                how,
                ..
            } => self.end_hold(reservation_id, *how),
            Record::SchoolCreated { .. }
            | Record::PoolSet { .. }
            | Record::CycleRolledOver { .. }
            | Record::SettingsSet { .. }
            | Record::RequestFiled { .. }
            | Record::RequestDecided { .. }
            | Record::DataLossAccepted { .. } => {}
        }
    }

    fn hold(&mut self, reservation_id: &ReservationId, hold: Reservation) {
        let slice = self.slices.entry(hold.service.clone()).or_default();
        slice.reserved_units = slice.reserved_units.saturating_add(hold.units);
        self.earliest_expiry_ms = self.earliest_expiry_ms.min(hold.expires_at_ms);
        self.reservations.insert(reservation_id.clone(), hold);
    }

    fn apply_usage(&mut self, wal_seq: u64, usage: &Usage) {
        if let UsageSource::Reservation {
            id,
            held_units,
            hold_had_expired,
        } = &usage.source
        {
            let outcome = CommitOutcome {
                charged_units: usage.units,
                overage_units: usage.overage_units,
                hold_had_expired: *hold_had_expired,
            };
            self.release_held_units(&usage.service, *held_units);
            let entry = self
                .reservations
                .entry(id.clone())
                .or_insert_with(|| Reservation {
                    service: usage.service.clone(),
                    units: *held_units,
                    created_at_ms: usage.recorded_at_ms,
                    expires_at_ms: usage.recorded_at_ms,
                    model: usage.model.clone(),
                    state: HoldState::Expired,
                    wal_seq,
                });
            entry.state = HoldState::Committed(outcome);
            entry.wal_seq = wal_seq;
        }
        if let UsageSource::Event(event_id) = &usage.source {
            self.events.insert(
                event_id.clone(),
                EventEntry {
                    allowed: true,
                    reason: None,
                    units: usage.units,
                    borrowed_units: usage.borrowed_units,
                    occurred_at_ms: usage.occurred_at_ms,
                    wal_seq,
                },
            );
        }
        let slice = self.slices.entry(usage.service.clone()).or_default();
        let from_slice = usage.units.saturating_sub(usage.borrowed_units);
        if usage.cycle_start_ms == self.cycle_start_ms {
            slice.used_units = slice.used_units.saturating_add(from_slice);
            slice.borrowed_units = slice.borrowed_units.saturating_add(usage.borrowed_units);
            slice.overage_units = slice.overage_units.saturating_add(usage.overage_units);
        } else if usage.cycle_start_ms == slice.previous.cycle_start_ms {
            let previous = &mut slice.previous;
            previous.used_units = previous.used_units.saturating_add(from_slice);
            previous.borrowed_units = previous.borrowed_units.saturating_add(usage.borrowed_units);
            previous.overage_units = previous.overage_units.saturating_add(usage.overage_units);
        }
    }

    fn end_hold(&mut self, reservation_id: &ReservationId, how: HoldEnd) {
        let Some(reservation) = self.reservations.get_mut(reservation_id) else {
            return;
        };
        if reservation.state != HoldState::Held {
            return;
        }
        reservation.state = match how {
            HoldEnd::Released => HoldState::Released,
            HoldEnd::Expired => HoldState::Expired,
        };
        let (service, units) = (reservation.service.clone(), reservation.units);
        self.release_held_units(&service, units);
        if how == HoldEnd::Expired {
            self.earliest_expiry_ms = self.live_hold_expiry_min();
        }
    }

    fn release_held_units(&mut self, service: &ServiceType, units: u64) {
        if let Some(slice) = self.slices.get_mut(service) {
            slice.reserved_units = slice.reserved_units.saturating_sub(units);
        }
    }

    fn live_hold_expiry_min(&self) -> TimestampMs {
        self.reservations
            .values()
            .filter(|r| r.state == HoldState::Held)
            .map(|r| r.expires_at_ms)
            .min()
            .unwrap_or(TimestampMs::MAX)
    }
}
