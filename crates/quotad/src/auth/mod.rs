//! Who is calling, and may they do this?
//!
//! Every gRPC call carries `authorization: Bearer <token>`, a JWT signed with
//! EdDSA or ES256 by a private key quotad never holds (it checks the token
//! with the public key its `kid` names), or, on a single box, with HS256 and a
//! shared key (`keys.rs` says why only there). [`Authenticator::verify`] turns it into a
//! [`Caller`]; [`authorize`] decides, from the caller's role and schools alone,
//! whether an [`Action`] on a school (and teacher) is allowed. Both are pure:
//! the time is passed in, so expiry is tested without a clock, and neither
//! looks at stored data, so a refusal never tells whether another school's or
//! teacher's data exists.
//!
//! [`AuthInterceptor`] runs before every handler: it is the one place that
//! reads the clock, and it leaves the [`Caller`] in the request's extensions,
//! where handlers find it with [`caller`]. The client side, `quotad_proto::BearerToken`,
//! sends the token.

mod interceptor;
mod keys;
mod policy;
mod token;

pub use interceptor::{caller, AuthInterceptor, AuthMode};
pub use keys::{
    check_kid, check_public_key_ids, KeyAlgorithm, KeyError, PublicKey, PublicKeyFile, TokenSigner,
    KID_BYTES_MAX, PUBLIC_KEYS_MAX,
};
pub use policy::{authorize, authorize_global, Action, Denied};
pub use token::{
    AuthError, Authenticator, Caller, Claims, Role, HEADER_BYTES_MAX, KEY_BYTES_MIN,
    SCHOOLS_PER_TOKEN_MAX, SUBJECT_BYTES_MAX,
};

#[cfg(test)]
mod key_tests;
#[cfg(test)]
mod tests;
