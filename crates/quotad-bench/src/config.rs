//! The settings every phase of a run uses, resolved from the command line.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::{Args, BenchError, Mode, Target};

/// Longest school id accepted, so that `<school_id>-rls<call number>#<k>` (the id the server
/// derives for the k-th descriptor of a ShouldRateLimit) stays within the 128-byte event id
/// limit of the contract: 100 + 4 + 20 digits + 2.
const SCHOOL_ID_MAX_BYTES: usize = 100;

/// The settings every phase runs with, resolved from the command line.
#[derive(Debug, Clone, Serialize)]
pub(super) struct RunConfig {
    pub(super) addr: String,
    /// The RLS listener (ShouldRateLimit, no bearer token); used by `--target rls` only.
    pub(super) rls_addr: String,
    /// `RateLimitRequest.domain` of every ShouldRateLimit.
    pub(super) domain: String,
    /// Descriptors per ShouldRateLimit, each naming one slice of the same teacher.
    pub(super) descriptors: usize,
    pub(super) mode: Mode,
    pub(super) target: Target,
    pub(super) concurrency: usize,
    pub(super) rate_per_s: u32,
    pub(super) max_in_flight: usize,
    pub(super) duration_s: u64,
    pub(super) warmup_s: u64,
    pub(super) connections: usize,
    pub(super) teachers: usize,
    pub(super) units: u64,
    pub(super) timeout_ms: u64,
    pub(super) school_id: String,
    /// Never printed.
    #[serde(skip)]
    pub(super) token: Option<String>,
}

impl RunConfig {
    pub(super) fn from_args(args: &Args) -> Result<Self, BenchError> {
        let school_id = match &args.school_id {
            Some(id) => id.clone(),
            None => default_school_id(),
        };
        if school_id.is_empty() || school_id.len() > SCHOOL_ID_MAX_BYTES {
            return Err(BenchError::SchoolId(format!(
                "must be 1-{SCHOOL_ID_MAX_BYTES} bytes, got {}",
                school_id.len()
            )));
        }
        Ok(Self {
            addr: args.addr.clone(),
            rls_addr: args.rls_addr.clone(),
            domain: args.domain.clone(),
            descriptors: args.descriptors as usize,
            mode: args.mode,
            target: args.target,
            concurrency: args.concurrency as usize,
            rate_per_s: args.rate,
            max_in_flight: args.max_in_flight as usize,
            duration_s: args.duration_s,
            warmup_s: args.warmup_s,
            connections: args.connections as usize,
            teachers: args.teachers as usize,
            units: args.units,
            timeout_ms: args.timeout_ms,
            school_id,
            token: args.token.clone(),
        })
    }
}

fn default_school_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_millis());
    format!("bench-{}-{millis}", std::process::id())
}
