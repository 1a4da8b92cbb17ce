//! The messages the actors answer. One struct per message, each documented.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;

use super::machine::{Frozen, SchoolAnswer, SchoolAsk};
use super::views::{
    AllocationView, Decision, Durable, PoolView, SchoolView, UsageReportView, UsageView,
};
use super::EngineError;
use quotad_core::audit::Broken;
use quotad_core::{
    AuditEntry, BillingAnchor, Change, CommitOutcome, EventId, Grant, HistoryFilter, HoldRequest,
    IncreaseRequest, Priority, Record, ReservationId, ServiceType, SliceSet, SliceStatus,
    SyncEvent, SyncOutcome, TeacherId, TimestampMs,
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

/// The answer the previewed call would give now, charging nothing.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Decision>")]
pub struct Check {
    pub service: ServiceType,
    pub units: u64,
    pub previews: CheckPreviews,
}

/// Which call a Check previews. They differ for a high priority teacher
/// short of units: Consume may borrow from the school, a hold never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckPreviews {
    #[default]
    Consume,
    Reserve,
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

/// Charge usage that already happened (synced from a device's journal), one
/// answer per event in order. All records are appended in one handler call,
/// so one group commit covers them; `wal_seq` is the last position the
/// teacher's account reflects (a duplicate's first record, or the change a
/// rejection rests on, may still be in flight).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<Vec<SyncOutcome>>>")]
pub struct SyncUsage(pub Vec<SyncEvent>);

/// Create or change the teacher's slice (sent to the teacher, which asks its
/// school). Priority and auto-renew left out (None) keep the slice's own,
/// which only the teacher knows for sure: see [`KeptTerms::after`].
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct SetAllocation {
    pub service: ServiceType,
    pub allocated_units: u64,
    /// None keeps the current priority (normal for a new slice).
    pub priority: Option<Priority>,
    /// None keeps the current setting (off for a new slice).
    pub auto_renew: Option<bool>,
    pub change: Change,
    /// False only for quotad's own changes to an individual account's slice.
    pub managed: bool,
}

/// The terms of a slice that a change may leave out, and so keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeptTerms {
    pub priority: Priority,
    pub auto_renew: bool,
}

impl KeptTerms {
    /// The terms after a change that names `priority` and `auto_renew` or
    /// leaves them out (None): each one left out stays as it is on the slice
    /// (`current`), and a new slice (`current` None) starts at the defaults,
    /// normal priority without auto-renew. One rule for SetAllocation and
    /// for every entry of a bulk change, so that an omitted field means
    /// "keep" in both.
    pub fn after(
        current: Option<KeptTerms>,
        priority: Option<Priority>,
        auto_renew: Option<bool>,
    ) -> KeptTerms {
        let current = current.unwrap_or_default();
        KeptTerms {
            priority: priority.unwrap_or(current.priority),
            auto_renew: auto_renew.unwrap_or(current.auto_renew),
        }
    }
}

/// One slice of a bulk change as the caller asked for it: priority and
/// auto-renew left out (None) keep the slice's own. They become a
/// [`SliceSet`] (everything named) only once the teacher is frozen and has
/// reported its slices' terms ([`Frozen::terms`], [`resolve_bulk`]), so that
/// what is kept cannot change before the school writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub priority: Option<Priority>,
    pub auto_renew: Option<bool>,
}

/// Every term named: what a caller that states a slice in full asks.
impl From<SliceSet> for SliceSpec {
    fn from(set: SliceSet) -> SliceSpec {
        SliceSpec {
            teacher_id: set.teacher_id,
            service: set.service,
            allocated_units: set.allocated_units,
            priority: Some(set.priority),
            auto_renew: Some(set.auto_renew),
        }
    }
}

/// The new terms of every slice of a bulk change, with what each entry left
/// out taken from its frozen teacher's report. A teacher missing from
/// `frozen` is an engine bug (every teacher named is frozen first), not the
/// caller's.
pub fn resolve_bulk<'a>(
    specs: Vec<SliceSpec>,
    frozen: impl IntoIterator<Item = &'a Frozen>,
) -> Reply<Vec<SliceSet>> {
    let frozen: BTreeMap<&TeacherId, &Frozen> =
        frozen.into_iter().map(|f| (&f.teacher_id, f)).collect();
    specs
        .into_iter()
        .map(|spec| {
            let teacher = frozen.get(&spec.teacher_id).ok_or_else(|| {
                EngineError::Internal(format!(
                    "teacher {} was not frozen for the bulk change",
                    spec.teacher_id
                ))
            })?;
            let current = teacher.terms.get(&spec.service).copied();
            let terms = KeptTerms::after(current, spec.priority, spec.auto_renew);
            Ok(SliceSet {
                teacher_id: spec.teacher_id,
                service: spec.service,
                allocated_units: spec.allocated_units,
                priority: terms.priority,
                auto_renew: terms.auto_renew,
            })
        })
        .collect()
}

/// Suspend or reactivate a slice.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct SetStatus {
    pub service: ServiceType,
    pub status: SliceStatus,
    pub change: Change,
}

/// Return a slice's units to the pool; only a slice with nothing used or held this cycle.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct RemoveSlice {
    pub service: ServiceType,
    pub change: Change,
}

/// Add the units an approved request grants to the teacher's slice.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<AllocationView>>")]
pub struct GrantIncrease {
    pub service: ServiceType,
    pub grant: Grant,
    pub change: Change,
}

/// From a teacher to its school, the teacher waiting (see `machine::SchoolAsk`).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<SchoolAnswer>")]
pub struct Ask(pub SchoolAsk);

/// The first half of a bulk change, to each teacher it names: report your
/// floors and answer nothing more until the school's record (or its refusal)
/// comes back through the [`Thaw`] you return.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Reply<(Frozen, Thaw)>")]
pub struct Freeze;

/// Ends a teacher's freeze: the school's record of the change and its
/// position, or None (refused). Dropped unsent, it also ends it, unchanged.
pub type Thaw = tokio::sync::oneshot::Sender<Option<(u64, Record)>>;

/// Set many slices of a school at once: all or none. Every teacher named is
/// frozen (`frozen`), so its floors still hold while the school decides.
#[derive(Message, Debug)]
#[rtype(result = "Reply<u64>")]
pub struct BulkSet {
    pub slices: Vec<SliceSet>,
    pub change: Change,
    pub frozen: Vec<(Frozen, Thaw)>,
}

/// Find the actors of these teachers, starting those that have none.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Vec<Addr<super::teacher::TeacherActor>>>")]
pub struct EnsureTeachers(pub Vec<TeacherId>);

/// Change a school's settings; each None keeps the setting.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<u64>")]
pub struct UpdateSettings {
    pub name: Option<Arc<str>>,
    pub borrowing_enabled: Option<bool>,
    pub self_service_requests: Option<bool>,
    /// From the next cycle on.
    pub next_anchor: Option<BillingAnchor>,
    pub change: Change,
}

/// A teacher asks for more units.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<IncreaseRequest>>")]
pub struct FileRequest {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub units: u64,
    pub change: Change,
}

/// Validates an approval and says whose slice gets how many units.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Reply<(TeacherId, ServiceType, Grant)>")]
pub struct PrepareGrant {
    pub request_id: u64,
    /// 0: all that was asked.
    pub units: u64,
}

/// Refuse a pending request.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Durable<IncreaseRequest>>")]
pub struct RejectRequest {
    pub request_id: u64,
    pub change: Change,
}

/// Requests of the school, filtered.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Vec<IncreaseRequest>>")]
pub struct ListRequests {
    pub teacher_id: Option<TeacherId>,
    /// "pending", "approved", "rejected" or "expired".
    pub status: Option<&'static str>,
    pub request_id: Option<u64>,
}

/// A page of the audit trail.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<(Vec<AuditEntry>, Option<u64>)>")]
pub struct ListHistory {
    pub filter: HistoryFilter,
    pub after_seq: u64,
    pub limit: usize,
}

/// Recompute the audit chain: the number of entries, or where it breaks.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Reply<Result<usize, Broken>>")]
pub struct VerifyHistory;

/// The school's slices with their usage.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<Vec<AllocationView>>")]
pub struct ListSlices {
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
}

/// Usage per teacher and service type, this cycle or the one before.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Reply<UsageReportView>")]
pub struct UsageReport {
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
    pub previous: bool,
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

/// Makes the handler panic, to show supervision at work (tests only).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Reply<()>")]
pub struct InjectPanic;
