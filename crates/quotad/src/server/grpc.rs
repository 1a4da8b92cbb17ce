//! The gRPC side: QuotaGate, QuotaAdmin and the gateways' rate limit
//! protocols behind the bearer-token interceptor, the health service and
//! server reflection, served on every actor thread; the rate limit protocols
//! again on their own listener, without tokens; and the graceful stop
//! (NOT_SERVING first, then the calls in flight finish).

use std::future::Future;
use std::sync::Arc;

use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::conn::{incoming, ConnGate};
use super::tls::Tls;
use super::ServeError;
use crate::analytics::Analytics;
use crate::api::rpc_metrics::RpcMetricsLayer;
use crate::api::{AdminService, GateService};
use crate::auth::{AuthInterceptor, AuthMode};
use crate::config::Config;
use crate::engine::Engine;
use crate::proto::quota_admin_server::QuotaAdminServer;
use crate::proto::quota_gate_server::QuotaGateServer;
use crate::rls::{Domains, RateLimiter, Trust};
use crate::storage::Wal;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyRlsServer;
use quotad_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer as KuadrantRlsServer;

/// The largest response, in bytes (a usage view of 32 service types is ~3 KiB).
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// What the gRPC servers answer with.
pub(super) struct Grpc {
    pub(super) engine: Engine,
    pub(super) analytics: Arc<Analytics>,
    /// Followed by the health service.
    pub(super) wal: Wal,
    pub(super) auth: AuthMode,
    pub(super) domains: Arc<Domains>,
}

/// Both ports' routers: every call timed by the RPC metrics layer.
type Router =
    tonic::transport::server::Router<tower_layer::Stack<RpcMetricsLayer, tower_layer::Identity>>;

/// What one server (on one actor thread) ended with.
type Served = oneshot::Receiver<Result<(), ServeError>>;

/// Serves gRPC on every actor thread: each runs an accept loop on the same
/// socket, and a call is answered on the thread that accepted its connection.
/// Half the time (with two threads) the teacher's actor lives there too, and
/// the call never crosses threads; the other half costs one hop each way.
pub(super) async fn serve_grpc(
    listener: TcpListener,
    rls_listener: Option<TcpListener>,
    Grpc {
        engine,
        analytics,
        wal,
        auth,
        domains,
    }: Grpc,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<QuotaGateServer<GateService>>().await;
    health.set_serving::<QuotaAdminServer<AdminService>>().await;
    health.set_serving::<EnvoyRlsServer<RateLimiter>>().await;
    health.set_serving::<KuadrantRlsServer<RateLimiter>>().await;
    let health_follows_wal = tokio::spawn(follow_wal(health.clone(), wal));
    let gate = QuotaGateServer::new(GateService::new(engine.clone()))
        .max_decoding_message_size(config.gate_request_bytes_max())
        .max_encoding_message_size(RESPONSE_BYTES_MAX);
    let admin = QuotaAdminServer::new(AdminService::new(engine.clone(), analytics))
        .max_decoding_message_size(config.request_bytes_max)
        .max_encoding_message_size(RESPONSE_BYTES_MAX);
    let rate_limiter = |trust| RateLimiter::new(engine.clone(), domains.clone(), trust);
    let limiters = |trust| {
        let limiter = rate_limiter(trust);
        (
            EnvoyRlsServer::new(limiter.clone())
                .max_decoding_message_size(config.request_bytes_max)
                .max_encoding_message_size(RESPONSE_BYTES_MAX),
            KuadrantRlsServer::new(limiter)
                .max_decoding_message_size(config.request_bytes_max)
                .max_encoding_message_size(RESPONSE_BYTES_MAX),
        )
    };
    // Every gate, admin and (on this port) rate limit call carries a bearer
    // token; the health check and reflection do not, so that load balancers
    // can probe and grpcurl can list.
    let interceptor = AuthInterceptor::new(auth);
    let gate = InterceptedService::new(gate, interceptor.clone());
    let admin = InterceptedService::new(admin, interceptor.clone());
    let (envoy, kuadrant) = limiters(Trust::Token);
    let envoy = InterceptedService::new(envoy, interceptor.clone());
    let kuadrant = InterceptedService::new(kuadrant, interceptor);
    let (reflection_v1, reflection_v1alpha) = reflection(None)?;
    let builder = || {
        tonic::transport::Server::builder()
            .max_concurrent_streams(config.streams_per_connection_max)
            .http2_max_header_list_size(config.header_list_bytes_max)
            .layer(RpcMetricsLayer)
    };
    let tls = config
        .tls_files()?
        .map(|(main, rls)| (Tls::load(main), Tls::load(rls)));
    let (main_tls, rls_tls) = match tls {
        Some((main, rls)) => (
            Some(main.map_err(ServeError::Tls)?),
            Some(rls.map_err(ServeError::Tls)?),
        ),
        None => (None, None),
    };
    let reloads: Vec<_> = [&main_tls, &rls_tls]
        .into_iter()
        .flatten()
        .map(|tls| {
            let interval = Duration::from_secs(config.tls_reload_interval_s);
            tokio::spawn(tls.clone().follow(interval))
        })
        .collect();
    let conn_gate = ConnGate::new(config.conn_limits());
    let main = builder()
        .add_service(health_service.clone())
        .add_service(reflection_v1.clone())
        .add_service(reflection_v1alpha.clone())
        .add_service(gate)
        .add_service(admin)
        .add_service(envoy)
        .add_service(kuadrant);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = serve_on_arbiters(&engine, listener, main, main_tls, &conn_gate, &stop_rx)?;
    if let Some(listener) = rls_listener {
        let (envoy, kuadrant) = limiters(Trust::Listener);
        let (reflection_v1, reflection_v1alpha) = reflection(Some(&[
            <EnvoyRlsServer<RateLimiter> as NamedService>::NAME,
            <KuadrantRlsServer<RateLimiter> as NamedService>::NAME,
            HEALTH_SERVICE,
        ]))?;
        let rls = builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(envoy)
            .add_service(kuadrant);
        servers.extend(serve_on_arbiters(
            &engine, listener, rls, rls_tls, &conn_gate, &stop_rx,
        )?);
    }
    let failed = until_shutdown_or_failure(&mut servers, shutdown).await;
    health_follows_wal.abort();
    for reload in reloads {
        reload.abort();
    }
    set_not_serving(&health).await;
    tracing::info!("health: NOT_SERVING, shutting down");
    let _ = stop_tx.send(true);
    end_health_watches(health).await;
    stop_servers(servers, failed).await
}

/// The health service's name, as reflection lists it.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Server reflection, v1 and v1alpha (grpcurl and Postman speak either):
/// every service of quotad's, or (on the rate limit listener) only those
/// named, so that a port lists what it serves.
fn reflection(
    only: Option<&[&'static str]>,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(quotad_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if let Some(names) = only {
            for name in names {
                builder = builder.with_service_name(*name);
            }
            // Named services replace the default list, reflection's own too.
            for reflection in [
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                builder = builder.with_service_name(reflection);
            }
        }
        builder
    };
    let failed = |e: tonic_reflection::server::Error| {
        ServeError::Listener(std::io::Error::other(format!("gRPC reflection: {e}")))
    };
    Ok((
        builder().build_v1().map_err(failed)?,
        builder().build_v1alpha().map_err(failed)?,
    ))
}

/// Serves `router` on `listener` from every actor thread: each runs an
/// accept loop on the same socket, until `stop` says so.
fn serve_on_arbiters(
    engine: &Engine,
    listener: TcpListener,
    router: Router,
    tls: Option<Tls>,
    gate: &Arc<ConnGate>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<Served>, ServeError> {
    let listener = listener.into_std().map_err(ServeError::Listener)?;
    let mut servers = Vec::new();
    for arbiter in engine.arbiters() {
        let listener = listener.try_clone().map_err(ServeError::Listener)?;
        let router = router.clone();
        let (tls, gate) = (tls.clone(), gate.clone());
        let mut stop = stop.clone();
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = arbiter.spawn(async move {
            let served = async {
                let listener = TcpListener::from_std(listener).map_err(ServeError::Listener)?;
                let incoming = incoming(listener, tls, gate);
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                router
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await
                    .map_err(ServeError::Transport)
            };
            let _ = done_tx.send(served.await);
        });
        if !spawned {
            return Err(ServeError::Listener(std::io::Error::other(
                "an actor thread stopped before the gRPC server started",
            )));
        }
        servers.push(done_rx);
    }
    Ok(servers)
}

/// Runs until asked to stop (None), or until one server ends: its index and
/// how it ended.
async fn until_shutdown_or_failure(
    servers: &mut [Served],
    shutdown: impl Future<Output = ()>,
) -> Option<(usize, Result<(), ServeError>)> {
    let first_exit = futures::future::select_all(servers.iter_mut());
    tokio::select! {
        _ = shutdown => None,
        (result, index, _) = first_exit => Some((index, flatten(result))),
    }
}

/// Graceful: each server (told to stop already) finishes the calls in flight
/// before it returns. A server that ended by itself makes the stop an error.
async fn stop_servers(
    servers: Vec<Served>,
    failed: Option<(usize, Result<(), ServeError>)>,
) -> Result<(), ServeError> {
    let mut outcome = Ok(());
    for (i, server) in servers.into_iter().enumerate() {
        if failed.as_ref().is_some_and(|(index, _)| *index == i) {
            continue;
        }
        if let Err(error) = flatten(server.await) {
            tracing::error!(%error, "a gRPC server failed while stopping");
            outcome = outcome.and(Err(error));
        }
    }
    match failed {
        None => outcome,
        Some((_, Err(error))) => Err(error),
        Some((_, Ok(()))) => Err(ServeError::Listener(std::io::Error::other(
            "a gRPC server stopped unexpectedly",
        ))),
    }
}

/// Every name the health service answers for: the server as a whole ("")
/// and each service.
const HEALTH_SERVICES: [&str; 5] = [
    "",
    <QuotaGateServer<GateService> as NamedService>::NAME,
    <QuotaAdminServer<AdminService> as NamedService>::NAME,
    <EnvoyRlsServer<RateLimiter> as NamedService>::NAME,
    <KuadrantRlsServer<RateLimiter> as NamedService>::NAME,
];

/// Says NOT_SERVING once the WAL is poisoned: every change would be refused,
/// so a load balancer should send callers to another node.
async fn follow_wal(health: HealthReporter, wal: Wal) {
    let reason = wal.poisoned().await;
    set_not_serving(&health).await;
    tracing::error!(%reason, "health: NOT_SERVING, the write-ahead log failed");
}

/// For every service and the server as a whole.
async fn set_not_serving(health: &HealthReporter) {
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

/// A Watch stream never ends by itself, and a graceful stop waits for every
/// open stream: a client watching health would hold quotad up forever.
/// Dropping the statuses ends each stream after it has told NOT_SERVING
/// (a Check from then on is NOT_FOUND, as for any unknown service).
async fn end_health_watches(mut health: HealthReporter) {
    for service in HEALTH_SERVICES {
        health.clear_service_status(service).await;
    }
}

fn flatten(
    result: Result<Result<(), ServeError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), ServeError> {
    result.unwrap_or_else(|_| {
        Err(ServeError::Listener(std::io::Error::other(
            "a gRPC server's actor thread stopped",
        )))
    })
}
