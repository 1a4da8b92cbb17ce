//! The gRPC services. Proto types are turned into domain types here, at the
//! edge; errors become statuses in [`status::to_status`] only.

pub mod admin;
pub mod analytics;
pub mod convert;
pub mod gate;
pub mod rpc_metrics;
pub mod status;
pub mod sync;

pub use admin::AdminService;
pub use gate::GateService;

/// The authenticated caller (put there by the auth interceptor) and the message.
pub(crate) fn caller_and<T>(
    request: tonic::Request<T>,
) -> Result<(crate::auth::Caller, T), tonic::Status> {
    let (_, mut extensions, message) = request.into_parts();
    let caller = extensions.remove::<crate::auth::Caller>().ok_or_else(|| {
        tonic::Status::internal("no caller: the auth interceptor is not installed")
    })?;
    Ok((caller, message))
}
