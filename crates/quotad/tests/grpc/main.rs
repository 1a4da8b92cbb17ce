//! quotad through its real gRPC API: a real server on 127.0.0.1:0 (in this
//! process, or as a child process for the crash tests), real tonic clients
//! over TCP and real sled in a temp dir.

mod admin;
mod auth_keys;
mod bad_input;
mod common;
mod contract;
mod corruption;
mod crash;
mod crash_restart;
mod gate;
mod health;
mod idempotency;
mod large_bulk;
mod load;
mod metrics;
mod offline_client;
mod overspend;
mod quotactl;
mod quotactl_fake;
mod rls;
mod stress;
mod sync;
mod tenants;
mod tls;
mod undecodable;
