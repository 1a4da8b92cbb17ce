//! The one place where errors become gRPC statuses.

use tonic::Status;

use crate::analytics::AnalyticsError;
use crate::auth::{AuthError, Denied};
use crate::engine::EngineError;
use crate::postgres::ReadError;
use crate::rls::RlsError;
use crate::storage::WalError;
use quotad_core::{InvalidInput, RuleError};

/// Bad input says which field and why (a change too large to record is bad
/// input too: it can never succeed); a rule that refuses says what is in
/// the way; a failed WAL is UNAVAILABLE, so clients retry elsewhere or later
/// instead of treating the refusal as an answer about their quota.
pub fn to_status(error: EngineError) -> Status {
    match error {
        EngineError::Rule(RuleError::Invalid(e)) => invalid(e),
        EngineError::Rule(RuleError::NotFound(m)) => Status::not_found(m),
        EngineError::Rule(RuleError::Precondition(m)) => Status::failed_precondition(m),
        EngineError::Rule(RuleError::AlreadyExists(m)) => Status::already_exists(m),
        EngineError::Wal(e @ (WalError::Poisoned(_) | WalError::Closed)) => {
            Status::unavailable(e.to_string())
        }
        EngineError::Wal(e @ WalError::Encode(_)) => Status::internal(e.to_string()),
        // Retrying cannot help: the same change makes the same record.
        EngineError::Wal(e @ WalError::RecordTooLarge { .. }) => {
            Status::invalid_argument(format!("request: {e}"))
        }
        EngineError::Unavailable(m) => Status::unavailable(m),
        EngineError::Internal(m) => Status::internal(m),
    }
}

/// A rate limit call (Envoy's or Kuadrant's protocol): bad input names the
/// field; an unknown domain is NOT_FOUND; a school the domain (or the
/// token) may not charge is PERMISSION_DENIED; the engine's own errors as
/// for every gate call.
pub fn rls_status(error: RlsError) -> Status {
    match error {
        e @ RlsError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        e @ RlsError::UnknownDomain(_) => Status::not_found(e.to_string()),
        e @ RlsError::SchoolNotInDomain { .. } => Status::permission_denied(e.to_string()),
        RlsError::Denied(denied) => denied.into(),
        e @ RlsError::NoCaller => Status::internal(e.to_string()),
        RlsError::Engine(e) => to_status(e),
    }
}

pub fn invalid(error: InvalidInput) -> Status {
    Status::invalid_argument(format!("{}: {}", error.field, error.problem))
}

/// Bad input in entry `number` (1-based, as people count) of the list field
/// `list`: "allocations[3]: teacher_id: ...".
pub fn invalid_entry(list: &str, number: usize, error: InvalidInput) -> Status {
    Status::invalid_argument(format!(
        "{list}[{number}]: {}: {}",
        error.field, error.problem
    ))
}

/// Analytics read Postgres: without one configured the call cannot work here
/// (FAILED_PRECONDITION); one out of reach may come back (UNAVAILABLE, retry).
pub fn analytics_status(error: AnalyticsError) -> Status {
    match error {
        AnalyticsError::Engine(e) => to_status(e),
        AnalyticsError::Read(e @ (ReadError::NotConfigured | ReadError::TooLarge(_))) => {
            Status::failed_precondition(e.to_string())
        }
        AnalyticsError::Read(e @ ReadError::Unavailable(_)) => Status::unavailable(e.to_string()),
        AnalyticsError::Read(e @ ReadError::Failed(_)) => Status::internal(e.to_string()),
    }
}

/// Every authentication failure is UNAUTHENTICATED: the caller should get a
/// valid token. (Only `Authenticator::verify` runs on requests; the key and
/// minting errors arise at startup or in tools, never from a client.)
impl From<AuthError> for Status {
    fn from(error: AuthError) -> Status {
        Status::unauthenticated(error.to_string())
    }
}

/// A refusal says what the caller's role may do, never what exists.
impl From<Denied> for Status {
    fn from(denied: Denied) -> Status {
        Status::permission_denied(denied.to_string())
    }
}
