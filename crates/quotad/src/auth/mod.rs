//! Who is calling, and may they do this?
//!
//! Every gRPC call carries `authorization: Bearer <token>`, a JWT signed with
//! HS256 and the key from the config. [`Authenticator::verify`] turns it into a
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
mod policy;
mod token;

pub use interceptor::{caller, AuthInterceptor, AuthMode};
pub use policy::{authorize, authorize_global, Action, Denied};
pub use token::{
    AuthError, Authenticator, Caller, Claims, Role, HEADER_BYTES_MAX, KEY_BYTES_MIN,
    SCHOOLS_PER_TOKEN_MAX, SUBJECT_BYTES_MAX,
};

#[cfg(test)]
mod tests;
