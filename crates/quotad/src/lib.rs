//! quotad: a quota engine for AI usage in schools.
//!
//! The quota rules (pools, slices, cycles, reservations, idempotency) are in the `quotad-core`
//! crate, free of I/O; the wire contract is in `quotad-proto`.
//!
//! - [`engine`]: actix actors that hold the live state: one per teacher, supervised by one per school.
//! - [`storage`]: the sled write-ahead log with group commit, snapshots and recovery.
//! - [`postgres`]: the long-term store's schema and migrations.
//! - [`analytics`]: suggestions and alerts, from the engine's state and Postgres' daily usage.
//! - [`api`]: the gRPC services and the one place where errors become statuses.
//! - [`rls`]: the AI gateways' protocols: Envoy's rate limit service and Kuadrant's reserve/commit.
//! - [`auth`]: bearer tokens (HS256 JWTs), the caller they name, and what each role may do.
#![deny(clippy::unwrap_used)]

/// Types generated from `proto/quotad/v1` (compiled once, in `quotad-proto`).
pub use quotad_proto::v1 as proto;

pub mod analytics;
pub mod api;
pub mod auth;
pub mod config;
pub mod engine;
pub mod owned_thread;
pub mod postgres;
pub mod rls;
pub mod server;
pub mod sim;
pub mod storage;
pub mod telemetry;
