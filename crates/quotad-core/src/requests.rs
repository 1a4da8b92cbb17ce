//! Increase requests: a teacher asks for more units of a service type, the
//! principal grants all or part of it (an allocation change, subject to the
//! pool) or rejects it with a reason; a request nobody decided expires.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cycle::TimestampMs;
use super::error::InvalidInput;
use super::ids::{ServiceType, TeacherId};

/// A pending request expires this long after it was filed (7 days).
pub const REQUEST_TTL_MS: TimestampMs = 7 * 24 * 3600 * 1000;
/// Pending requests one teacher may have at once.
pub const PENDING_REQUESTS_PER_TEACHER_MAX: usize = 3;
/// Longest reason, in bytes.
pub const REASON_BYTES_MAX: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestStatus {
    Pending,
    Approved { units: u64 },
    Rejected,
    Expired,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved { .. } => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }

    /// A filter value: "pending", "approved", "rejected" or "expired".
    pub fn parse_filter(value: &str) -> Result<&'static str, InvalidInput> {
        match value {
            "pending" => Ok("pending"),
            "approved" => Ok("approved"),
            "rejected" => Ok("rejected"),
            "expired" => Ok("expired"),
            other => Err(InvalidInput::new(
                "status",
                format!("is {other:?}; it must be pending, approved, rejected or expired"),
            )),
        }
    }
}

/// How a request ended without an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOutcome {
    Rejected,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncreaseRequest {
    pub id: u64,
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub units: u64,
    pub reason: Arc<str>,
    pub filed_by: Arc<str>,
    pub created_at_ms: TimestampMs,
    pub status: RequestStatus,
    pub decided_by: Option<Arc<str>>,
    pub decision_reason: Option<Arc<str>>,
    pub decided_at_ms: Option<TimestampMs>,
}

impl IncreaseRequest {
    pub fn expires_at_ms(&self) -> TimestampMs {
        self.created_at_ms.saturating_add(REQUEST_TTL_MS)
    }

    pub fn is_pending(&self) -> bool {
        self.status == RequestStatus::Pending
    }

    pub fn is_due_to_expire(&self, now_ms: TimestampMs) -> bool {
        self.is_pending() && now_ms >= self.expires_at_ms()
    }
}

/// A reason a person must give: not blank, not huge.
pub fn check_reason(field: &'static str, reason: &str) -> Result<Arc<str>, InvalidInput> {
    if reason.trim().is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if reason.len() > REASON_BYTES_MAX || reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {REASON_BYTES_MAX} bytes without control characters"),
        ));
    }
    Ok(Arc::from(reason))
}
