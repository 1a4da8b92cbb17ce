//! A teacher's slice of one service type's pool.

use serde::{Deserialize, Serialize};

use super::cycle::TimestampMs;
use super::error::InvalidInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    /// May borrow the school's unallocated units when the slice is exhausted.
    High,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SliceStatus {
    #[default]
    Active,
    /// Consumes are denied with `suspended`; the units stay allocated.
    Suspended,
}

/// Why a usage was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    Exhausted,
    Suspended,
    NoAllocation,
}

impl Priority {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        match value {
            "low" => Ok(Self::Low),
            "normal" => Ok(Self::Normal),
            "high" => Ok(Self::High),
            other => Err(InvalidInput::new(
                "priority",
                format!("is {other:?}; it must be one of low, normal, high"),
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        }
    }
}

impl SliceStatus {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        match value {
            "active" => Ok(Self::Active),
            "suspended" => Ok(Self::Suspended),
            other => Err(InvalidInput::new(
                "status",
                format!("is {other:?}; it must be active or suspended"),
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Suspended => "suspended",
            Self::NoAllocation => "no_allocation",
        }
    }
}

/// What one slice counted in one cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CycleTotals {
    pub cycle_start_ms: TimestampMs,
    pub allocated_units: u64,
    pub used_units: u64,
    pub borrowed_units: u64,
    pub overage_units: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Slice {
    pub allocated_units: u64,
    pub priority: Priority,
    pub auto_renew: bool,
    pub status: SliceStatus,
    /// Units charged to the slice this cycle, overage included, borrowed excluded.
    pub used_units: u64,
    /// Units charged this cycle to the school's unallocated units.
    pub borrowed_units: u64,
    /// Units held by live reservations.
    pub reserved_units: u64,
    /// Units charged this cycle beyond what the slice had (part of `used_units`).
    pub overage_units: u64,
    /// The cycle before the current one, for late usage and the views.
    pub previous: CycleTotals,
    /// The log position of the record that last set the terms. Live, terms
    /// reach a teacher in log order; the guard keeps an older record from
    /// undoing a newer one wherever records are applied out of order.
    pub terms_seq: u64,
}

impl Slice {
    /// Units a new usage may still take: allocated - used - reserved, never below 0.
    pub fn remaining_units(&self) -> u64 {
        self.allocated_units.saturating_sub(self.floor_units())
    }

    /// The least the slice may shrink to: what its teacher used from it and
    /// holds this cycle. Borrowed units came from the pool's unallocated
    /// units, not the slice, so they do not count.
    pub fn floor_units(&self) -> u64 {
        self.used_units.saturating_add(self.reserved_units)
    }

    /// The fewest units a change may set the slice to: its floor, or its
    /// units now when its teacher used more than the slice has (late usage
    /// and commits are charged past it, as overage). Only a change that
    /// shrinks the slice can go below its floor, so one that keeps or grows
    /// a slice that ran over is never refused for what was used.
    pub fn lowest_allowed_units(&self) -> u64 {
        self.floor_units().min(self.allocated_units)
    }

    /// Everything the teacher used this cycle: from the slice and borrowed.
    /// This is the "used" every view shows.
    pub fn total_used_units(&self) -> u64 {
        self.used_units.saturating_add(self.borrowed_units)
    }

    /// Starts a new cycle: the usage counters reset and a slice without
    /// auto-renew returns its units to the pool.
    pub fn roll(&mut self, old_cycle_start_ms: TimestampMs) {
        self.previous = CycleTotals {
            cycle_start_ms: old_cycle_start_ms,
            allocated_units: self.allocated_units,
            used_units: self.used_units,
            borrowed_units: self.borrowed_units,
            overage_units: self.overage_units,
        };
        self.used_units = 0;
        self.borrowed_units = 0;
        self.overage_units = 0;
        if !self.auto_renew {
            self.allocated_units = 0;
        }
    }
}
