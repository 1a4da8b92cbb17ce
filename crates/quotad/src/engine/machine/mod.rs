//! The actors' handlers as plain state machines: no actix, no threads, no
//! clock of their own. A [`TeacherMachine`] or [`SchoolMachine`] takes a
//! message, the time and a [`Journal`], and answers — or, for a teacher, asks
//! its school and says how to finish once the school answers
//! ([`Started::Ask`]). The actix actors in `engine::teacher` and
//! `engine::school` are thin shells around these, and the deterministic
//! simulator (`crate::sim`) drives the very same machines under any order of
//! delivery. `docs/protocol.md` says which machine owns which fact and why
//! every admin change keeps the pools whole in every order.

pub mod school;
pub mod teacher;

use std::sync::{Arc, Mutex};

use crate::storage::{Wal, WalError};
use quotad_core::{
    Change, CycleInfo, Grant, Priority, Record, RuleLimits, ServiceType, SliceStatus, TeacherId,
    TimestampMs,
};

pub use school::SchoolMachine;
pub use teacher::{Frozen, Resume, Started, TeacherMachine};

/// Where a machine's records go: the WAL in production, a simulated log in
/// the simulator. `append` gives the record its position; it is durable later
/// (the caller waits for that before answering).
pub trait Journal {
    fn append(&self, record: &Record) -> Result<u64, WalError>;
}

impl Journal for Wal {
    fn append(&self, record: &Record) -> Result<u64, WalError> {
        Wal::append(self, record)
    }
}

/// What every handler call is given.
pub struct Env<'a> {
    pub now_ms: TimestampMs,
    pub journal: &'a dyn Journal,
    pub limits: &'a RuleLimits,
}

/// The school's cycle, published by its machine and read by its teachers'
/// machines before every decision (shared memory, not a message, so that no
/// full mailbox can keep a teacher in an old cycle). A mutex, because the
/// three fields change together; it is held for a copy only.
#[derive(Debug)]
pub struct CycleCell(Mutex<CycleInfo>);

impl CycleCell {
    pub fn new(info: CycleInfo) -> Arc<Self> {
        Arc::new(Self(Mutex::new(info)))
    }

    pub fn get(&self) -> CycleInfo {
        // A poisoned lock only means a panic while copying three fields in:
        // the value is whole either way.
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, info: CycleInfo) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = info;
    }
}

/// What a teacher asks its school to record about one of its slices.
#[derive(Debug, Clone)]
pub enum SliceChange {
    Set {
        allocated_units: u64,
        priority: Priority,
        auto_renew: bool,
        grant: Option<Grant>,
    },
    Status(SliceStatus),
    Remove,
}

/// What a teacher asks of its school while it waits (its mailbox held, so
/// that what it checked still holds when the school answers).
#[derive(Debug, Clone)]
pub enum SchoolAsk {
    /// Record this change of the teacher's slice, if the pool allows it.
    SliceChange {
        teacher_id: TeacherId,
        service: ServiceType,
        change: SliceChange,
        audit: Change,
        /// False only for quotad's own changes to an individual account's slice.
        managed: bool,
    },
    /// Write this usage, whose `borrowed_units` the school lends from its
    /// unallocated units, if it still has them. The school writes it so that
    /// the loan and the usage are one record: the pool's borrowed total
    /// changes exactly when the log says so.
    ChargeBorrowed(Record),
    /// Could the school lend `units` now? (Check's preview of a borrow.)
    CanLend { service: ServiceType, units: u64 },
}

/// The school's answer to a [`SchoolAsk`].
#[derive(Debug, Clone)]
pub enum SchoolAnswer {
    /// Written at this position: the teacher applies it.
    Written(u64, Record),
    /// The school cannot lend the units (a ChargeBorrowed refused).
    Refused,
    CanLend(bool),
}
