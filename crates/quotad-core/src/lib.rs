//! The quota rules. No I/O, no clocks, no actors: time is passed in, and every
//! change is a [`Record`] applied by the same function that replays the log.

pub mod account;
pub mod analytics;
pub mod audit;
pub mod cycle;
pub mod error;
pub mod ids;
pub mod limits;
pub mod record;
pub mod requests;
pub mod school;
pub mod slice;
pub mod state;
pub mod sync;

#[cfg(test)]
mod admin_tests;
#[cfg(test)]
mod analytics_tests;
#[cfg(test)]
mod floor_tests;
#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod tests;

pub use account::{
    CommitOutcome, CommitStep, EventEntry, Gate, HoldRequest, HoldState, Reservation,
    ServiceUsageView, Step, TeacherAccount,
};
pub use audit::{AuditAction, AuditEntry, AuditTrail, HistoryFilter};
pub use cycle::{BillingAnchor, Cycle, CycleInfo, TimestampMs};
pub use error::{InvalidInput, RuleError};
pub use ids::{parse_model_field, EventId, ReservationId, SchoolId, ServiceType, TeacherId};
pub use limits::RuleLimits;
pub use record::{Change, Grant, HoldEnd, Record, SliceSet, Usage, UsageSource};
pub use requests::{IncreaseRequest, RequestOutcome, RequestStatus};
pub use school::{
    check_bulk_floor, individual_owner, owner_slice_order, owner_slice_terms,
    service_not_configured, OwnerSliceOrder, Pool, SchoolConfig, SchoolState, SliceTerms, Tier,
};
pub use slice::{DenyReason, Priority, Slice, SliceStatus};
pub use state::{ApplyError, State};
pub use sync::{SyncEvent, SyncOutcome, SyncRejection, SyncStep};

/// The service types a school gets when it names none.
pub const DEFAULT_SERVICE_TYPES: [&str; 6] = [
    "lesson_generation",
    "grading_assistance",
    "homework_help",
    "claude_messages",
    "content_generation",
    "assessment_ai",
];
