//! The calls the benchmark drives: the gRPC health check (the floor),
//! `QuotaGate/Consume` (the hot path) and `QuotaAdmin/SetAllocation`.

use std::future::Future;

use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::v1::{ConsumeRequest, SetAllocationRequest};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::measure::{Outcome, Workload};
use crate::setup::Authed;

/// The pool every consume call charges.
pub(super) const SERVICE_TYPE: &str = "claude_messages";
/// Units each bench teacher gets: far more than any run can consume, so no call is denied for
/// lack of units and the figures measure the allowed path.
pub(super) const TEACHER_ALLOCATION_UNITS: u64 = 1_000_000_000_000;
/// The school's pool is at least this big (and always big enough for every teacher's slice).
/// The client of `lane`'s connection: lanes spread round robin over the connections.
fn client_for_lane<C: Clone>(clients: &[C], lane: usize) -> C {
    clients[lane % clients.len()].clone()
}

fn status_label(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// `grpc.health.v1.Health/Check` of the whole server (service ""): what the gRPC stack alone
/// costs, the floor the consume figures are compared with.
pub(super) struct HealthCheck {
    clients: Vec<HealthClient<Channel>>,
}

impl HealthCheck {
    pub(super) fn new(channels: &[Channel]) -> Self {
        let clients = channels.iter().cloned().map(HealthClient::new).collect();
        Self { clients }
    }
}

impl Workload for HealthCheck {
    fn call(&self, _call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        async move {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            match client.check(request).await {
                Ok(response) => health_outcome(response.get_ref().status),
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

fn health_outcome(serving_status: i32) -> Outcome {
    match ServingStatus::try_from(serving_status) {
        Ok(ServingStatus::Serving) => Outcome::Ok,
        Ok(other) => Outcome::Failed(other.as_str_name().to_string()),
        Err(_) => Outcome::Failed(format!("SERVING_STATUS_{serving_status}")),
    }
}

/// `QuotaGate/Consume` of `units` for teachers "t0".."t{T-1}" in turn, each with a fresh event id.
pub(super) struct ConsumeLoad {
    pub(super) clients: Vec<QuotaGateClient<Authed>>,
    /// Admin clients on the same connections, for the allocation target.
    pub(super) admins: Vec<QuotaAdminClient<Authed>>,
    pub(super) school_id: String,
    pub(super) teacher_ids: Vec<String>,
    pub(super) units: u64,
}

impl Workload for ConsumeLoad {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        let teacher = usize::try_from(call % self.teacher_ids.len() as u64).unwrap_or(0);
        let request = ConsumeRequest {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_ids[teacher].clone(),
            service_type: SERVICE_TYPE.to_string(),
            units: self.units,
            // Unique per run and call, so no consume is answered from the idempotency cache.
            event_id: format!("{}-{call}", self.school_id),
            occurred_at_ms: 0,
            model: String::new(),
        };
        async move {
            match client.consume(request).await {
                Ok(response) => match response.into_inner().decision {
                    Some(decision) if decision.allowed => Outcome::Ok,
                    Some(_) => Outcome::Denied,
                    None => Outcome::Failed("MissingDecision".to_string()),
                },
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

/// `QuotaAdmin/SetAllocation` for teachers "t0".."t{T-1}" in turn, alternating each slice
/// between two sizes that both fit the pool, so every call is a real change.
pub(super) struct AllocationLoad {
    pub(super) clients: Vec<QuotaAdminClient<Authed>>,
    pub(super) school_id: String,
    pub(super) teacher_ids: Vec<String>,
}

impl Workload for AllocationLoad {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        let teachers = self.teacher_ids.len() as u64;
        let teacher = usize::try_from(call % teachers).unwrap_or(0);
        let request = SetAllocationRequest {
            school_id: self.school_id.clone(),
            teacher_id: self.teacher_ids[teacher].clone(),
            service_type: SERVICE_TYPE.to_string(),
            allocated_units: TEACHER_ALLOCATION_UNITS - (call / teachers) % 2,
            priority: String::new(),
            auto_renew: false,
            changed_by: "quotad-bench".to_string(),
            reason: "allocation latency".to_string(),
        };
        async move {
            match client.set_allocation(request).await {
                Ok(_) => Outcome::Ok,
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}
