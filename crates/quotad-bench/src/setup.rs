//! Setup before any phase: the connections, the bearer token every call
//! carries, and the bench school with a slice for every teacher.

use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::v1::{CreateSchoolRequest, PoolUnits, SetAllocationRequest};
use quotad_proto::BearerToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::RunConfig;
use crate::workloads::{ConsumeLoad, SERVICE_TYPE, TEACHER_ALLOCATION_UNITS};
use crate::BenchError;

/// The school's pool is at least this big (and always big enough for every teacher's slice).
const POOL_MIN_CYCLE_UNITS: u64 = 1_000_000_000_000_000;
/// How long to wait for a TCP + HTTP/2 connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Setup calls (one per teacher) run this many at a time.
const SETUP_CONCURRENCY: usize = 16;

pub(super) type Authed = tonic::service::interceptor::InterceptedService<Channel, BearerToken>;

/// Opens every connection up front, so an unreachable server stops the run before any phase.
/// Returns at least one channel: `--connections` is at least 1.
pub(super) async fn connect_all(config: &RunConfig) -> Result<Vec<Channel>, BenchError> {
    let endpoint = Endpoint::from_shared(config.addr.clone())
        .map_err(|source| BenchError::Address {
            addr: config.addr.clone(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_millis(config.timeout_ms))
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        // Each connect() opens its own HTTP/2 connection; clones of one Channel would share it.
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| BenchError::Connect {
                addr: config.addr.clone(),
                source,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Creates the bench school and gives every teacher a slice far larger than the run can use.
pub(super) async fn prepare_consume(
    channels: &[Channel],
    config: &RunConfig,
) -> Result<ConsumeLoad, BenchError> {
    let token = match &config.token {
        Some(token) => BearerToken::new(token).map_err(BenchError::Token)?,
        None => BearerToken::none(),
    };
    let mut admin = QuotaAdminClient::with_interceptor(channels[0].clone(), token.clone());
    let teacher_count = config.teachers as u64;
    let cycle_units = teacher_count
        .saturating_mul(TEACHER_ALLOCATION_UNITS)
        .max(POOL_MIN_CYCLE_UNITS);
    let request = CreateSchoolRequest {
        school_id: config.school_id.clone(),
        name: format!("quotad-bench {}", config.school_id),
        tier: "k12".to_string(),
        billing_anchor_day: 0,
        borrowing_enabled: false,
        pools: vec![PoolUnits {
            service_type: SERVICE_TYPE.to_string(),
            cycle_units,
        }],
        changed_by: "quotad-bench".to_string(),
        self_service_requests: false,
    };
    admin
        .create_school(request)
        .await
        .map_err(|status| BenchError::Setup {
            step: format!("CreateSchool {}", config.school_id),
            status,
        })?;
    let teacher_ids: Vec<String> = (0..config.teachers).map(|i| format!("t{i}")).collect();
    stream::iter(teacher_ids.iter().cloned())
        .map(|teacher_id| allocate(admin.clone(), config.school_id.clone(), teacher_id))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(ConsumeLoad {
        clients: channels
            .iter()
            .cloned()
            .map(|c| QuotaGateClient::with_interceptor(c, token.clone()))
            .collect(),
        admins: channels
            .iter()
            .cloned()
            .map(|c| QuotaAdminClient::with_interceptor(c, token.clone()))
            .collect(),
        school_id: config.school_id.clone(),
        teacher_ids,
        units: config.units,
    })
}

async fn allocate(
    mut admin: QuotaAdminClient<Authed>,
    school_id: String,
    teacher_id: String,
) -> Result<(), BenchError> {
    let step = format!("SetAllocation {school_id}/{teacher_id}");
    let request = SetAllocationRequest {
        school_id,
        teacher_id,
        service_type: SERVICE_TYPE.to_string(),
        allocated_units: TEACHER_ALLOCATION_UNITS,
        priority: String::new(),
        auto_renew: false,
        changed_by: "quotad-bench".to_string(),
        reason: "load test".to_string(),
    };
    admin
        .set_allocation(request)
        .await
        .map_err(|status| BenchError::Setup { step, status })?;
    Ok(())
}
