//! The errors of the quota rules. They classify: bad input, a rule that
//! refuses, or something missing; the API maps each class to one status.

use thiserror::Error;

/// A field a client sent is malformed. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {problem}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub problem: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Why a rule refused a change. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The thing named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow this change now (e.g. the pool is too small).
    #[error("{0}")]
    Precondition(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
}

impl RuleError {
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::Precondition(message.into())
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }
}

/// Adds units, refusing to wrap: units are u64 and an overflow is an error.
pub fn add_units(field: &'static str, a: u64, b: u64) -> Result<u64, InvalidInput> {
    a.checked_add(b)
        .ok_or_else(|| InvalidInput::new(field, format!("{a} + {b} overflows a 64-bit unit count")))
}
