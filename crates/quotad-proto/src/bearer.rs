//! The client side of quotad's authentication: `authorization: Bearer <token>`
//! on every call. The server side (checking the token, the roles) is in the
//! server's `auth` module.

use std::fmt;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Why a token cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the bearer token is empty")]
    Empty,
    /// RFC 6750: a bearer token is a run of visible ASCII characters. Anything
    /// else (a line break, a space, quotes from a document) is a pasting mistake.
    #[error("a bearer token is a run of visible ASCII characters, without spaces or line breaks")]
    NotVisibleAscii,
}

/// A client interceptor that sends `authorization: Bearer <token>` with every
/// call, or, made with [`BearerToken::none`], no authorization at all. The
/// value is marked sensitive, so HTTP/2 never indexes it.
#[derive(Clone)]
pub struct BearerToken(Option<AsciiMetadataValue>);

/// Never prints the token.
impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("BearerToken(<redacted>)"),
            None => f.write_str("BearerToken(none)"),
        }
    }
}

impl BearerToken {
    /// Checks the token once, before any call, so that a bad one is a clear
    /// local error rather than a failure inside the first call.
    pub fn new(token: &str) -> Result<Self, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(TokenError::NotVisibleAscii);
        }
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| TokenError::NotVisibleAscii)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Sends no authorization (a server run with `--insecure-dev`, or a test
    /// of what an unauthenticated call gets).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_sent_as_a_sensitive_bearer_header() {
        let mut bearer = BearerToken::new("abc.def-ghi").expect("a valid token");
        let request = bearer.call(Request::new(())).expect("no refusal");
        let value = request.metadata().get("authorization").expect("sent");
        assert_eq!(value.to_str().ok(), Some("Bearer abc.def-ghi"));
        assert!(value.is_sensitive());
        assert_eq!(format!("{bearer:?}"), "BearerToken(<redacted>)");
    }

    #[test]
    fn none_sends_no_authorization() {
        let mut bearer = BearerToken::none();
        let request = bearer.call(Request::new(())).expect("no refusal");
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn tokens_that_cannot_be_sent_are_refused_before_any_call() {
        assert_eq!(BearerToken::new("").unwrap_err(), TokenError::Empty);
        for token in ["a b", "caf\u{e9}", "abc\n", "\tabc"] {
            assert_eq!(
                BearerToken::new(token).unwrap_err(),
                TokenError::NotVisibleAscii,
                "{token:?}"
            );
        }
    }
}
