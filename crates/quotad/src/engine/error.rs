//! The engine's errors: a rule's refusal, a WAL that cannot record, or an
//! engine that cannot answer now. `api::status` makes each a status.

use actix::MailboxError;
use quotad_core::{InvalidInput, RuleError};
use thiserror::Error;

use crate::storage::WalError;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The engine cannot answer now (shutting down, an actor gone).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<InvalidInput> for EngineError {
    fn from(error: InvalidInput) -> Self {
        Self::Rule(RuleError::Invalid(error))
    }
}

impl EngineError {
    pub fn mailbox(error: MailboxError) -> Self {
        match error {
            MailboxError::Closed => {
                Self::Unavailable("the actor is stopped (shutting down?)".into())
            }
            MailboxError::Timeout => Self::Unavailable("the actor did not answer in time".into()),
        }
    }
}
