//! The server side of authentication: [`AuthInterceptor`] runs before every
//! handler, the one place that reads the clock, and leaves the [`Caller`] in
//! the request's extensions.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::token::{AuthError, Authenticator, Caller};

/// How the server authenticates.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Every call is [`Caller::dev`], whatever it sends. For local development only.
    InsecureDev,
    /// Every call needs a token these keys accept.
    Key(Arc<Authenticator>),
}

/// Authenticates every call before its handler runs and leaves the
/// [`Caller`] in the request's extensions. A refused token ends the call with
/// UNAUTHENTICATED. On the hot path: one signature check, no I/O.
///
/// A proxy sends the same token with every call, so tokens that verified are
/// remembered (by their exact text, until they expire): checking a signature
/// and parsing JSON on every call cost more than the quota decision itself.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    mode: AuthMode,
    pub(super) verified: Arc<DashMap<Box<str>, (Caller, u64)>>,
}

/// Verified tokens remembered at most; beyond it the memory starts over.
const VERIFIED_TOKENS_MAX: usize = 4096;

impl AuthInterceptor {
    pub fn new(mode: AuthMode) -> Self {
        AuthInterceptor {
            mode,
            verified: Arc::default(),
        }
    }

    pub(super) fn verify(
        &self,
        authenticator: &Authenticator,
        header_value: Option<&str>,
        now_s: u64,
    ) -> Result<Caller, AuthError> {
        if let Some(value) = header_value {
            if let Some(hit) = self.verified.get(value) {
                let (caller, exp) = hit.value();
                if now_s < *exp {
                    return Ok(caller.clone());
                }
            }
        }
        let (caller, exp) = authenticator.verify_until(header_value, now_s)?;
        if let Some(value) = header_value {
            if self.verified.len() >= VERIFIED_TOKENS_MAX {
                self.verified.clear();
            }
            self.verified
                .insert(Box::from(value), (caller.clone(), exp));
        }
        Ok(caller)
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.mode {
            AuthMode::InsecureDev => Caller::dev(),
            AuthMode::Key(authenticator) => {
                let header_value = match request.metadata().get("authorization") {
                    None => None,
                    Some(value) => Some(value.to_str().map_err(|_| {
                        AuthError::Malformed(
                            "the authorization value is not visible ASCII".to_owned(),
                        )
                    })?),
                };
                self.verify(authenticator, header_value, unix_now_s()?)?
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The one place authentication reads the clock.
pub(super) fn unix_now_s() -> Result<u64, Status> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| since_epoch.as_secs())
        .map_err(|_| Status::internal("the system clock is before 1970: cannot check token expiry"))
}

/// The caller the [`AuthInterceptor`] left on this request.
pub fn caller<T>(request: &Request<T>) -> Result<&Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::internal("no caller: the auth interceptor is not installed"))
}
