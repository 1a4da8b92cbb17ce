//! The calls the benchmark drives: the gRPC health check (the floor),
//! `QuotaGate/Consume` (the hot path), `QuotaAdmin/SetAllocation` and Envoy's
//! `RateLimitService/ShouldRateLimit` (the hot path as a gateway calls it).

use std::future::Future;

use quotad_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use quotad_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
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
/// The pools a ShouldRateLimit with N descriptors charges: the first N, one descriptor each.
pub(super) const SERVICE_TYPES: [&str; 3] =
    [SERVICE_TYPE, "lesson_generation", "grading_assistance"];
/// The `model` entry of every descriptor, as a gateway fills it from the request.
pub(super) const RLS_MODEL: &str = "claude-sonnet-4-5";
/// Units each bench teacher gets: far more than any run can consume, so no call is denied for
/// lack of units and the figures measure the allowed path.
pub(super) const TEACHER_ALLOCATION_UNITS: u64 = 1_000_000_000_000;
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
            auto_renew: Some(false),
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

/// `RateLimitService/ShouldRateLimit` in domain `domain` for teachers "t0".."t{T-1}" in turn:
/// one descriptor per service type of that teacher, each with the entries a gateway sends
/// (school_id, teacher_id, service_type, model, and the request's id as event_id), charging
/// `hits_addend` units to each.
pub(super) struct RlsLoad {
    pub(super) clients: Vec<RateLimitServiceClient<Channel>>,
    pub(super) domain: String,
    pub(super) school_id: String,
    pub(super) teacher_ids: Vec<String>,
    pub(super) service_types: Vec<String>,
    pub(super) model: String,
    pub(super) hits_addend: u32,
}

impl RlsLoad {
    fn descriptor(
        &self,
        teacher_id: &str,
        service_type: &str,
        event_id: &str,
    ) -> RateLimitDescriptor {
        let entry = |key: &str, value: &str| Entry {
            key: key.to_string(),
            value: value.to_string(),
        };
        RateLimitDescriptor {
            entries: vec![
                entry("school_id", &self.school_id),
                entry("teacher_id", teacher_id),
                entry("service_type", service_type),
                entry("model", &self.model),
                entry("event_id", event_id),
            ],
            limit: None,
            // Unset: the request's hits_addend applies, as Envoy sends it.
            hits_addend: None,
        }
    }
}

impl Workload for RlsLoad {
    fn call(&self, call: u64, lane: usize) -> impl Future<Output = Outcome> + Send + 'static {
        let mut client = client_for_lane(&self.clients, lane);
        let teacher = usize::try_from(call % self.teacher_ids.len() as u64).unwrap_or(0);
        let teacher_id = &self.teacher_ids[teacher];
        // Unique per run and call, so nothing is answered from the idempotency cache. Every
        // descriptor carries the same id (a gateway's x-request-id); the server charges the
        // k-th slice as `<id>#k`.
        let event_id = format!("{}-rls{call}", self.school_id);
        let descriptors: Vec<RateLimitDescriptor> = self
            .service_types
            .iter()
            .map(|service_type| self.descriptor(teacher_id, service_type, &event_id))
            .collect();
        let expected_statuses = descriptors.len();
        let request = RateLimitRequest {
            domain: self.domain.clone(),
            descriptors,
            hits_addend: self.hits_addend,
        };
        async move {
            match client.should_rate_limit(request).await {
                Ok(response) => rls_outcome(&response.into_inner(), expected_statuses),
                Err(status) => Outcome::Failed(status_label(&status)),
            }
        }
    }
}

/// OK and OVER_LIMIT are both answers (OVER_LIMIT counted as denied, not as an error); an
/// UNKNOWN code or a status count other than one per descriptor is a broken answer.
fn rls_outcome(response: &RateLimitResponse, expected_statuses: usize) -> Outcome {
    if response.statuses.len() != expected_statuses {
        return Outcome::Failed(format!(
            "{}StatusesFor{expected_statuses}Descriptors",
            response.statuses.len()
        ));
    }
    match Code::try_from(response.overall_code) {
        Ok(Code::Ok) => Outcome::Ok,
        Ok(Code::OverLimit) => Outcome::Denied,
        Ok(Code::Unknown) => Outcome::Failed("OverallCodeUnknown".to_string()),
        Err(_) => Outcome::Failed(format!("OverallCode{}", response.overall_code)),
    }
}
