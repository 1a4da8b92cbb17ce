//! The facts written to the write-ahead log. A record says what happened, not
//! what was asked: replay applies it without deciding again, so the state
//! recovered from the log equals the state that produced it.
//!
//! Records that can be written concurrently by different actors commute:
//! counters are added, terms are set to absolute values, and every record
//! carries the cycle it belongs to, so applying it first rolls its target to
//! that cycle. That is why the order of two records from different actors
//! never changes the state they lead to.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cycle::{BillingAnchor, TimestampMs};
use super::ids::{EventId, ReservationId, SchoolId, ServiceType, TeacherId};
use super::requests::RequestOutcome;
use super::school::SchoolConfig;
use super::slice::{DenyReason, Priority, SliceStatus};

/// The longest `by` or `reason` of a [`Change`], in bytes: the API refuses
/// longer text, so a record's size stays bounded (see `storage::codec`).
pub const CHANGE_TEXT_BYTES_MAX: usize = 1024;

/// Who made an administrative change, why, and when: kept for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub by: Arc<str>,
    pub reason: Arc<str>,
    pub at_ms: TimestampMs,
}

/// What a usage was charged for: a consume's event or a reservation's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageSource {
    Event(EventId),
    Reservation {
        id: ReservationId,
        held_units: u64,
        hold_had_expired: bool,
    },
}

/// Units charged to a teacher's slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub source: UsageSource,
    /// All units charged, borrowed and overage ones included.
    pub units: u64,
    /// The part taken from the school's unallocated units.
    pub borrowed_units: u64,
    /// The part charged beyond what the slice had left (committed usage is never refused).
    pub overage_units: u64,
    /// The cycle the usage is charged to.
    pub cycle_start_ms: TimestampMs,
    pub occurred_at_ms: TimestampMs,
    pub recorded_at_ms: TimestampMs,
    pub model: Arc<str>,
}

/// How a hold ended without a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldEnd {
    Released,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    SchoolCreated {
        config: SchoolConfig,
        cycle_start_ms: TimestampMs,
        pools: Vec<(ServiceType, u64)>,
        change: Change,
    },
    PoolSet {
        school_id: SchoolId,
        service: ServiceType,
        cycle_units: u64,
        cycle_start_ms: TimestampMs,
        change: Change,
    },
    AllocationSet {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        allocated_units: u64,
        priority: Priority,
        auto_renew: bool,
        cycle_start_ms: TimestampMs,
        change: Change,
        /// Set when the change grants an increase request.
        grant: Option<Grant>,
    },
    AllocationStatusSet {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        status: SliceStatus,
        cycle_start_ms: TimestampMs,
        change: Change,
    },
    UsageCharged(Usage),
    UsageDenied {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        event_id: EventId,
        reason: DenyReason,
        occurred_at_ms: TimestampMs,
        cycle_start_ms: TimestampMs,
        recorded_at_ms: TimestampMs,
    },
    Reserved {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        reservation_id: ReservationId,
        units: u64,
        expires_at_ms: TimestampMs,
        cycle_start_ms: TimestampMs,
        at_ms: TimestampMs,
        model: Arc<str>,
    },
    ReserveDenied {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        reservation_id: ReservationId,
        reason: DenyReason,
        cycle_start_ms: TimestampMs,
        at_ms: TimestampMs,
    },
    HoldEnded {
        school_id: SchoolId,
        teacher_id: TeacherId,
        reservation_id: ReservationId,
        how: HoldEnd,
        at_ms: TimestampMs,
    },
    CycleRolledOver {
        school_id: SchoolId,
        from_start_ms: TimestampMs,
        to_start_ms: TimestampMs,
        at_ms: TimestampMs,
    },
    /// School settings changed; a None keeps the setting.
    SettingsSet {
        school_id: SchoolId,
        name: Option<Arc<str>>,
        borrowing_enabled: Option<bool>,
        self_service_requests: Option<bool>,
        /// The billing anchor from the next cycle on.
        next_anchor: Option<BillingAnchor>,
        change: Change,
    },
    /// A slice returned its units to the pool and is gone.
    AllocationRemoved {
        school_id: SchoolId,
        teacher_id: TeacherId,
        service: ServiceType,
        cycle_start_ms: TimestampMs,
        change: Change,
    },
    /// Many slices set in one step: all of them or none.
    AllocationsSet {
        school_id: SchoolId,
        slices: Vec<SliceSet>,
        cycle_start_ms: TimestampMs,
        change: Change,
    },
    RequestFiled {
        school_id: SchoolId,
        request_id: u64,
        teacher_id: TeacherId,
        service: ServiceType,
        units: u64,
        /// `change.reason` is the teacher's reason.
        change: Change,
    },
    /// A request ended without an approval (approvals are `AllocationSet` with a grant).
    RequestDecided {
        school_id: SchoolId,
        request_id: u64,
        outcome: RequestOutcome,
        change: Change,
    },
    /// The operator started quotad on a damaged log with `--accept-data-loss`:
    /// the school's state is what the log held up to `served_through_seq`.
    /// Last in the enum: records are encoded by variant index.
    DataLossAccepted {
        school_id: SchoolId,
        served_through_seq: u64,
        /// What recovery found damaged or missing.
        lost: Arc<str>,
        change: Change,
    },
}

/// The increase request an allocation change grants, and how many units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub request_id: u64,
    pub units: u64,
}

/// The most slices one [`Record::AllocationsSet`] (one BulkSetAllocations
/// call) may set. It bounds the largest record there is, and so the WAL's
/// record limit (`storage::codec::RECORD_BYTES_MAX`) is derived from it.
pub const BULK_SLICES_MAX: usize = 10_000;

/// One slice's new terms in an [`Record::AllocationsSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceSet {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub priority: Priority,
    pub auto_renew: bool,
}

impl Record {
    /// An `AllocationsSet` cut into one record per teacher, each with only
    /// that teacher's slices (same school, cycle and change): what each
    /// teacher's account applies. Handing the whole record to each of its n
    /// teachers would cost n x n (10,000 slices: 10^8 steps, and 10,000
    /// copies of a 2 MB record). Empty for every other record.
    pub fn allocations_per_teacher(&self) -> BTreeMap<TeacherId, Record> {
        let Record::AllocationsSet {
            school_id,
            slices,
            cycle_start_ms,
            change,
        } = self
        else {
            return BTreeMap::new();
        };
        let mut own: BTreeMap<TeacherId, Vec<SliceSet>> = BTreeMap::new();
        for slice in slices {
            own.entry(slice.teacher_id.clone())
                .or_default()
                .push(slice.clone());
        }
        own.into_iter()
            .map(|(teacher_id, slices)| {
                let record = Record::AllocationsSet {
                    school_id: school_id.clone(),
                    slices,
                    cycle_start_ms: *cycle_start_ms,
                    change: change.clone(),
                };
                (teacher_id, record)
            })
            .collect()
    }

    /// The school the record belongs to.
    pub fn school_id(&self) -> &SchoolId {
        match self {
            Record::SchoolCreated { config, .. } => &config.id,
            Record::UsageCharged(usage) => &usage.school_id,
            Record::PoolSet { school_id, .. }
            | Record::AllocationSet { school_id, .. }
            | Record::AllocationStatusSet { school_id, .. }
            | Record::UsageDenied { school_id, .. }
            | Record::Reserved { school_id, .. }
            | Record::ReserveDenied { school_id, .. }
            | Record::HoldEnded { school_id, .. }
            | Record::CycleRolledOver { school_id, .. }
            | Record::SettingsSet { school_id, .. }
            | Record::AllocationRemoved { school_id, .. }
            | Record::AllocationsSet { school_id, .. }
            | Record::RequestFiled { school_id, .. }
            | Record::RequestDecided { school_id, .. }
            | Record::DataLossAccepted { school_id, .. } => school_id,
        }
    }

    /// The teacher the record belongs to, if it belongs to one.
    pub fn teacher_id(&self) -> Option<&TeacherId> {
        match self {
            Record::UsageCharged(usage) => Some(&usage.teacher_id),
            Record::AllocationSet { teacher_id, .. }
            | Record::AllocationStatusSet { teacher_id, .. }
            | Record::UsageDenied { teacher_id, .. }
            | Record::Reserved { teacher_id, .. }
            | Record::ReserveDenied { teacher_id, .. }
            | Record::HoldEnded { teacher_id, .. }
            | Record::AllocationRemoved { teacher_id, .. } => Some(teacher_id),
            // Request records change the school's list, not the teacher's account.
            Record::SchoolCreated { .. }
            | Record::PoolSet { .. }
            | Record::CycleRolledOver { .. }
            | Record::SettingsSet { .. }
            | Record::AllocationsSet { .. }
            | Record::RequestFiled { .. }
            | Record::RequestDecided { .. }
            | Record::DataLossAccepted { .. } => None,
        }
    }

    /// The cycle the record belongs to, when it carries one.
    pub fn cycle_start_ms(&self) -> Option<TimestampMs> {
        match self {
            Record::SchoolCreated { cycle_start_ms, .. }
            | Record::PoolSet { cycle_start_ms, .. }
            | Record::AllocationSet { cycle_start_ms, .. }
            | Record::AllocationStatusSet { cycle_start_ms, .. }
            | Record::UsageDenied { cycle_start_ms, .. }
            | Record::Reserved { cycle_start_ms, .. }
            | Record::ReserveDenied { cycle_start_ms, .. }
            | Record::AllocationRemoved { cycle_start_ms, .. }
            | Record::AllocationsSet { cycle_start_ms, .. } => Some(*cycle_start_ms),
            Record::UsageCharged(usage) => Some(usage.cycle_start_ms),
            Record::CycleRolledOver { to_start_ms, .. } => Some(*to_start_ms),
            Record::HoldEnded { .. }
            | Record::SettingsSet { .. }
            | Record::RequestFiled { .. }
            | Record::RequestDecided { .. }
            | Record::DataLossAccepted { .. } => None,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::SchoolCreated { .. } => "school_created",
            Record::PoolSet { .. } => "pool_set",
            Record::AllocationSet { .. } => "allocation_set",
            Record::AllocationStatusSet { .. } => "allocation_status_set",
            Record::UsageCharged(_) => "usage_charged",
            Record::UsageDenied { .. } => "usage_denied",
            Record::Reserved { .. } => "reserved",
            Record::ReserveDenied { .. } => "reserve_denied",
            Record::HoldEnded { .. } => "hold_ended",
            Record::CycleRolledOver { .. } => "cycle_rolled_over",
            Record::SettingsSet { .. } => "settings_set",
            Record::AllocationRemoved { .. } => "allocation_removed",
            Record::AllocationsSet { .. } => "allocations_set",
            Record::RequestFiled { .. } => "request_filed",
            Record::RequestDecided { .. } => "request_decided",
            Record::DataLossAccepted { .. } => "data_loss_accepted",
        }
    }
}
