//! What the engine answers, free of any wire format.

use quotad_core::{
    Cycle, DenyReason, Priority, SchoolConfig, ServiceType, ServiceUsageView, SliceStatus,
    TeacherAccount,
};
use quotad_core::{SchoolId, TeacherId, TimestampMs};

/// A gate decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    pub remaining_units: u64,
    pub borrowed_units: u64,
    pub duplicate: bool,
    /// Empty when allowed; otherwise a sentence a person can read.
    pub message: String,
    /// The slice's allocation this cycle (0 without a slice): the limit a
    /// rate limit protocol reports.
    pub allocated_units: u64,
    /// When the billing cycle the decision counted in ends (0 without a
    /// slice): when a rate limit protocol's window resets.
    pub cycle_end_ms: TimestampMs,
}

/// A value and the log position that must be durable before it is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable<T> {
    pub value: T,
    /// None when nothing was written.
    pub wal_seq: Option<u64>,
}

impl<T> Durable<T> {
    pub fn written(value: T, wal_seq: u64) -> Self {
        Self {
            value,
            wal_seq: Some(wal_seq),
        }
    }
    pub fn read(value: T) -> Self {
        Self {
            value,
            wal_seq: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageView {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub services: Vec<ServiceUsageView>,
    pub cycle: Cycle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub service: ServiceType,
    pub cycle_units: u64,
    pub allocated_units: u64,
    pub borrowed_units: u64,
    pub available_units: u64,
    pub used_units: u64,
}

impl PoolView {
    /// What the metrics page shows of this pool.
    pub fn gauges(self) -> crate::telemetry::PoolGauges {
        crate::telemetry::PoolGauges {
            service: self.service,
            cycle_units: self.cycle_units,
            allocated_units: self.allocated_units,
            used_units: self.used_units,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchoolView {
    pub config: SchoolConfig,
    pub next_anchor: Option<quotad_core::BillingAnchor>,
    pub cycle: Cycle,
    pub pools: Vec<PoolView>,
    pub teacher_count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationView {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub used_units: u64,
    pub reserved_units: u64,
    pub priority: Priority,
    pub auto_renew: bool,
    pub status: SliceStatus,
}

impl AllocationView {
    pub fn of(account: &TeacherAccount, service: &ServiceType) -> Self {
        let slice = account.slices.get(service).cloned().unwrap_or_default();
        Self {
            school_id: account.school_id.clone(),
            teacher_id: account.teacher_id.clone(),
            service: service.clone(),
            allocated_units: slice.allocated_units,
            used_units: slice.total_used_units(),
            reserved_units: slice.reserved_units,
            priority: slice.priority,
            auto_renew: slice.auto_renew,
            status: slice.status,
        }
    }
}

/// One row of a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub allocated_units: u64,
    pub used_units: u64,
    pub borrowed_units: u64,
    pub overage_units: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReportView {
    pub cycle: Cycle,
    pub rows: Vec<UsageRow>,
}
