//! quotad's wire contract, compiled once from `proto/quotad/v1` for the
//! server and every client, and what both sides of it share:
//!
//! - [`v1`]: the generated messages, clients and servers.
//! - [`codec`]: the codec the generated servers decode requests with (an
//!   undecodable body is the caller's INVALID_ARGUMENT, not INTERNAL).
//! - [`bearer`]: the client interceptor that sends a bearer token.
//! - [`error_chain`]: an error and its causes on one line, for clients' messages.
#![deny(clippy::unwrap_used)]

pub mod bearer;
pub mod codec;

pub use bearer::{BearerToken, TokenError};

/// Types generated from `proto/quotad/v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quotad.v1");
}

/// The error and its causes on one line, e.g. "cannot connect to ...:
/// transport error: ...": tonic's transport error alone says only "transport
/// error".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some layers repeat their cause's text; say it once.
        let cause_text = cause.to_string();
        if !message.ends_with(&cause_text) {
            message += &format!(": {cause_text}");
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: inner")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] Leaf);

    #[derive(Debug, thiserror::Error)]
    #[error("leaf")]
    struct Leaf;

    #[test]
    fn a_chain_says_each_cause_once() {
        assert_eq!(error_chain(&Outer(Inner(Leaf))), "outer: inner: leaf");
        assert_eq!(error_chain(&Leaf), "leaf");
    }
}
