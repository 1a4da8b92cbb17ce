//! The AI gateways' own protocols: Envoy's global rate limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) and
//! Kuadrant's (`kuadrant.service.ratelimit.v1`: CheckRateLimit, Report,
//! Reserve, Commit), answered from quotad's slices and billing cycles.
//!
//! - [`domain`]: the `[[rls_domains]]` settings: how descriptors name a slice.
//! - [`plan`]: a request read against its domain, checked before any charge.
//! - [`answer`]: the rate limit response from the slices' answers.
//! - [`service`]: the two gRPC services, on the engine's gate calls.

pub mod answer;
pub mod domain;
pub mod plan;
pub mod service;

pub use domain::{DomainConfig, Domains, UnknownSlice};
pub use service::{RateLimiter, Trust};

use thiserror::Error;

use crate::auth::Denied;
use crate::engine::EngineError;
use quotad_core::SchoolId;

/// Why a rate limit call was refused; `api::status::rls_status` makes each
/// a status. A refused call charged nothing.
#[derive(Debug, Error)]
pub enum RlsError {
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
    #[error("domain {0:?} is not configured for rate limiting (rls_domains)")]
    UnknownDomain(String),
    #[error("domain {domain:?} may not charge school {school}")]
    SchoolNotInDomain { domain: String, school: SchoolId },
    /// On the main port, where calls carry a bearer token.
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("no caller: the auth interceptor is not installed")]
    NoCaller,
    #[error(transparent)]
    Engine(#[from] EngineError),
}
