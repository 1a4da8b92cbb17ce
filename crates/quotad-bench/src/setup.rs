//! Setup before any phase: the connections, the bearer token every call
//! carries, and the bench school with a slice for every teacher (one per
//! service type the run charges).

use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::v1::{CreateSchoolRequest, PoolUnits, SetAllocationRequest};
use quotad_proto::BearerToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::RunConfig;
use crate::workloads::{
    ConsumeLoad, RlsLoad, RLS_MODEL, SERVICE_TYPE, SERVICE_TYPES, TEACHER_ALLOCATION_UNITS,
};
use crate::BenchError;

/// The school's pool is at least this big (and always big enough for every teacher's slice).
const POOL_MIN_CYCLE_UNITS: u64 = 1_000_000_000_000_000;
/// How long to wait for a TCP + HTTP/2 connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Setup calls (one per teacher) run this many at a time.
const SETUP_CONCURRENCY: usize = 16;

pub(super) type Authed = tonic::service::interceptor::InterceptedService<Channel, BearerToken>;

/// Opens every connection to `addr` (given as `flag`) up front, so an unreachable server stops
/// the run before any phase. Returns at least one channel: `--connections` is at least 1.
pub(super) async fn connect_all(
    flag: &'static str,
    addr: &str,
    config: &RunConfig,
) -> Result<Vec<Channel>, BenchError> {
    let endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|source| BenchError::Address {
            flag,
            addr: addr.to_string(),
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
                addr: addr.to_string(),
                source,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The school a run creates, with a slice of every service type it charges for every teacher.
struct BenchSchool {
    token: BearerToken,
    teacher_ids: Vec<String>,
}

/// Creates the bench school and the consume (or allocation) load on it: one pool, claude_messages.
pub(super) async fn prepare_consume(
    channels: &[Channel],
    config: &RunConfig,
) -> Result<ConsumeLoad, BenchError> {
    let BenchSchool { token, teacher_ids } =
        prepare_school(channels, config, &[SERVICE_TYPE]).await?;
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

/// Creates the bench school through `admin_channels` (the main port, with the token) with one
/// pool per descriptor, and the ShouldRateLimit load on `rls_channels` (no token: the RLS
/// listener takes none, as a gateway calls it).
pub(super) async fn prepare_rls(
    admin_channels: &[Channel],
    rls_channels: &[Channel],
    config: &RunConfig,
) -> Result<RlsLoad, BenchError> {
    let service_types = &SERVICE_TYPES[..config.descriptors.clamp(1, SERVICE_TYPES.len())];
    let BenchSchool { teacher_ids, .. } =
        prepare_school(admin_channels, config, service_types).await?;
    let hits_addend = u32::try_from(config.units).map_err(|_| {
        BenchError::Units(format!(
            "{} does not fit ShouldRateLimit's uint32 hits_addend",
            config.units
        ))
    })?;
    Ok(RlsLoad {
        clients: rls_channels
            .iter()
            .cloned()
            .map(RateLimitServiceClient::new)
            .collect(),
        domain: config.domain.clone(),
        school_id: config.school_id.clone(),
        teacher_ids,
        service_types: service_types.iter().map(|s| s.to_string()).collect(),
        model: RLS_MODEL.to_string(),
        hits_addend,
    })
}

/// Creates the bench school with a pool per service type, and gives every teacher a slice of
/// each far larger than the run can use.
async fn prepare_school(
    channels: &[Channel],
    config: &RunConfig,
    service_types: &[&'static str],
) -> Result<BenchSchool, BenchError> {
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
        pools: service_types
            .iter()
            .map(|service_type| PoolUnits {
                service_type: service_type.to_string(),
                cycle_units,
            })
            .collect(),
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
    let slices = teacher_ids.iter().flat_map(|teacher_id| {
        service_types
            .iter()
            .map(move |service_type| (teacher_id.clone(), *service_type))
    });
    stream::iter(slices)
        .map(|(teacher_id, service_type)| {
            allocate(
                admin.clone(),
                config.school_id.clone(),
                teacher_id,
                service_type,
            )
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(BenchSchool { token, teacher_ids })
}

async fn allocate(
    mut admin: QuotaAdminClient<Authed>,
    school_id: String,
    teacher_id: String,
    service_type: &'static str,
) -> Result<(), BenchError> {
    let step = format!("SetAllocation {school_id}/{teacher_id}/{service_type}");
    let request = SetAllocationRequest {
        school_id,
        teacher_id,
        service_type: service_type.to_string(),
        allocated_units: TEACHER_ALLOCATION_UNITS,
        priority: String::new(),
        auto_renew: Some(false),
        changed_by: "quotad-bench".to_string(),
        reason: "load test".to_string(),
    };
    admin
        .set_allocation(request)
        .await
        .map_err(|status| BenchError::Setup { step, status })?;
    Ok(())
}
