//! The gRPC services. Proto types are turned into domain types here, at the
//! edge; errors become statuses in [`status::to_status`] only.

pub mod admin;
pub mod convert;
pub mod gate;
pub mod status;

pub use admin::AdminService;
pub use gate::GateService;
