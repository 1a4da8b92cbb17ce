//! The messages the actors answer. One struct per message, each documented.

use std::sync::Arc;

use actix::prelude::*;

use super::views::{AllocationView, Decision, Durable, PoolView, SchoolView, UsageView};
use super::EngineError;
use crate::domain::{
    Change, CommitOutcome, EventId, HoldRequest, Priority, Record, ReservationId, ServiceType,
    SliceStatus, TeacherId, TimestampMs,
};

pub type Reply<T> = Result<T, EngineError>;

/// Check and charge units for one event. Idempotent on `event_id`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<Decision>>")]
pub struct Consume {
    pub service: ServiceType,
    pub units: u64,
    pub event_id: EventId,
    /// 0 means now.
    pub occurred_at_ms: TimestampMs,
    pub model: Arc<str>,
}

/// The answer Consume would give, charging nothing.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Decision>")]
pub struct Check {
    pub service: ServiceType,
    pub units: u64,
}

/// Hold units until commit, release or expiry. Idempotent on the reservation id.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<(Decision, TimestampMs)>>")]
pub struct Reserve(pub HoldRequest);

/// Charge the real units of a reservation.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<CommitResult>>")]
pub struct Commit {
    pub reservation_id: ReservationId,
    pub actual_units: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitResult {
    pub outcome: CommitOutcome,
    pub duplicate: bool,
    pub remaining_units: u64,
}

/// Free a hold without charging. Answers the units freed, 0 if it was gone.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<u64>>")]
pub struct Release {
    pub reservation_id: ReservationId,
}

/// The teacher's usage per service type.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<UsageView>")]
pub struct GetUsage;

/// Create or change the teacher's slice (sent to the teacher, which asks its school).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct SetAllocation {
    pub service: ServiceType,
    pub allocated_units: u64,
    /// None keeps the current priority (normal for a new slice).
    pub priority: Option<Priority>,
    pub auto_renew: bool,
    pub change: Change,
}

/// Suspend or reactivate a slice.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct SetStatus {
    pub service: ServiceType,
    pub status: SliceStatus,
    pub change: Change,
}

/// From a teacher to its school: check the pool and record the slice change.
/// `floor_units` is what the teacher has used and holds, below which the
/// slice may not shrink.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<(u64, Record)>")]
pub struct ApplyAllocation {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub priority: Priority,
    pub auto_renew: bool,
    pub change: Change,
}

/// From a teacher to its school: lend `units` of the unallocated part
/// (`dry_run`: only say whether it could).
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct Borrow {
    pub service: ServiceType,
    pub units: u64,
    pub dry_run: bool,
}

/// Set a pool's cycle units (adds the service type if new).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<PoolView>>")]
pub struct SetPool {
    pub service: ServiceType,
    pub cycle_units: u64,
    pub change: Change,
}

/// The school with its pools and their usage.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<SchoolView>")]
pub struct GetSchool;

/// Find the teacher's actor, starting one if there is none.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Addr<super::teacher::TeacherActor>>")]
pub struct EnsureTeacher(pub TeacherId);

/// From a teacher that saw the cycle end: roll the school if it has not yet.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct RollIfDue;

/// From the school after a rollover: start the new cycle.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct RollTo(pub TimestampMs);

/// Makes the handler panic, to show supervision at work (tests only).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Reply<()>")]
pub struct InjectPanic;
