//! quotad's wire contract, compiled once from `proto/quotad/v1` for the
//! server and every client, and what both sides of it share:
//!
//! - [`v1`]: the generated messages, clients and servers.
//! - [`envoy`] and [`kuadrant`]: the AI gateways' rate limit protocols, under
//!   their own packages and field numbers.
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

/// Envoy's rate limit service and the messages it carries, under Envoy's own
/// package names (`proto/envoy`, see its README).
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    #![allow(clippy::all, missing_docs)]
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }
}

/// Kuadrant's rate limit service, with reserve/commit (`proto/kuadrant`).
pub mod kuadrant {
    pub mod service {
        pub mod ratelimit {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("kuadrant.service.ratelimit.v1");
            }
        }
    }
}

/// Every message and service above, as a `FileDescriptorSet`: what gRPC
/// server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("quotad_descriptor");

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
