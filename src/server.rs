//! Wires the parts together: storage and recovery, the engine, the gRPC
//! services and the metrics endpoint. Tests call [`serve`] with listeners
//! bound to 127.0.0.1:0 and their own shutdown signal.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use thiserror::Error;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use tonic::service::interceptor::InterceptedService;

use crate::api::{AdminService, GateService};
use crate::auth::{AuthInterceptor, AuthMode};
use crate::config::{Config, ConfigError};
use crate::engine::{system_now_ms, Clock, Engine, EngineError};
use crate::proto::quota_admin_server::QuotaAdminServer;
use crate::proto::quota_gate_server::QuotaGateServer;
use crate::storage::snapshot::Snapshotter;
use crate::storage::{recover, LogStore, SledLog, StorageError, Wal};
use crate::telemetry;

/// The largest response, in bytes (a usage view of 32 service types is ~3 KiB).
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the data directory {path} (is another quotad using it?): {source}")]
    Open { path: PathBuf, source: StorageError },
    #[error("recovery failed: {0}")]
    Recover(StorageError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("gRPC listener: {0}")]
    Listener(std::io::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics: {0}")]
    Metrics(String),
}

pub struct Listeners {
    pub grpc: TcpListener,
    /// None: no metrics endpoint.
    pub metrics: Option<TcpListener>,
}

/// Runs quotad until `shutdown` resolves, then stops in the order that keeps
/// every acknowledged change: stop answering, stop the actors, flush the WAL,
/// write the final snapshot.
pub async fn serve(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let auth = config.auth_mode()?;
    if matches!(auth, AuthMode::InsecureDev) {
        tracing::warn!(
            "INSECURE DEV MODE: every call is accepted without a token, as an admin. \
             Never run this where anyone else can reach the port."
        );
    }
    let metrics = prometheus()?;
    let store: Arc<dyn LogStore> =
        Arc::new(
            SledLog::open(&config.data_dir).map_err(|source| ServeError::Open {
                path: config.data_dir.clone(),
                source,
            })?,
        );
    let recovered = recover(store.as_ref()).map_err(ServeError::Recover)?;
    tracing::info!(
        schools = recovered.state.schools.len(),
        teachers = recovered.state.accounts.len(),
        snapshot_wal_seq = recovered.snapshot_seq,
        replayed_records = recovered.replayed_records,
        "state recovered"
    );
    let (wal, writer, durable) = Wal::start(store.clone(), config.wal(), recovered.last_seq)?;
    let snapshotter = Snapshotter::start(
        store,
        durable,
        recovered.state.clone(),
        recovered.last_seq,
        Duration::from_secs(config.snapshot_interval_s),
        config.limits(),
        system_now_ms,
    )?;
    let (engine, runtime) =
        Engine::start(recovered.state, wal, config.engine()?, Clock::System).await?;
    let metrics_task = listeners
        .metrics
        .map(|listener| tokio::spawn(serve_metrics(listener, metrics)));
    let served = serve_grpc(listeners.grpc, engine, &config, auth, shutdown).await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    let stopped = tokio::task::spawn_blocking(move || {
        runtime.shutdown();
        writer.shutdown();
        snapshotter.join();
    })
    .await;
    if stopped.is_err() {
        tracing::error!("shutdown did not finish cleanly; the WAL holds every acknowledged change");
    }
    tracing::info!("quotad stopped");
    served
}

/// Serves gRPC on every actor thread: each runs an accept loop on the same
/// socket, and a call is answered on the thread that accepted its connection.
/// Half the time (with two threads) the teacher's actor lives there too, and
/// the call never crosses threads; the other half costs one hop each way.
async fn serve_grpc(
    listener: TcpListener,
    engine: Engine,
    config: &Config,
    auth: AuthMode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<QuotaGateServer<GateService>>().await;
    health.set_serving::<QuotaAdminServer<AdminService>>().await;
    let gate = QuotaGateServer::new(GateService::new(engine.clone()))
        .max_decoding_message_size(config.gate_request_bytes_max())
        .max_encoding_message_size(RESPONSE_BYTES_MAX);
    let admin = QuotaAdminServer::new(AdminService::new(engine.clone()))
        .max_decoding_message_size(config.request_bytes_max)
        .max_encoding_message_size(RESPONSE_BYTES_MAX);
    // Every gate and admin call carries a bearer token; the health check does
    // not, so that load balancers can probe.
    let interceptor = AuthInterceptor::new(auth);
    let gate = InterceptedService::new(gate, interceptor.clone());
    let admin = InterceptedService::new(admin, interceptor);
    let listener = listener.into_std().map_err(ServeError::Listener)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for arbiter in engine.arbiters() {
        let listener = listener.try_clone().map_err(ServeError::Listener)?;
        let router = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(gate.clone())
            .add_service(admin.clone());
        let mut stop = stop_rx.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = arbiter.spawn(async move {
            let served = async {
                let listener = TcpListener::from_std(listener).map_err(ServeError::Listener)?;
                // TCP_NODELAY: without it a small unary reply can wait for the
                // peer's delayed ACK (measured: p50 at c=1 from ~200 us to ~146 us).
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
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
    // Run until asked to stop, or until one server fails (then stop the others).
    let failed = {
        let first_exit = futures::future::select_all(servers.iter_mut());
        tokio::select! {
            _ = shutdown => None,
            (result, index, _) = first_exit => Some((index, flatten(result))),
        }
    };
    let _ = stop_tx.send(true);
    // Graceful: each server finishes the calls in flight before it returns.
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

fn flatten(
    result: Result<Result<(), ServeError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), ServeError> {
    result.unwrap_or_else(|_| {
        Err(ServeError::Listener(std::io::Error::other(
            "a gRPC server's actor thread stopped",
        )))
    })
}

/// The process-wide Prometheus recorder, installed once (tests start many servers).
fn prometheus() -> Result<PrometheusHandle, ServeError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let metrics_error =
        |e: metrics_exporter_prometheus::BuildError| ServeError::Metrics(e.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            telemetry::LATENCY_BUCKETS_SECONDS,
        )
        .map_err(metrics_error)?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::WAL_FLUSH_BATCH_RECORDS.into()),
            telemetry::BATCH_BUCKETS_RECORDS,
        )
        .map_err(metrics_error)?
        .install_recorder()
        .map_err(metrics_error)?;
    telemetry::describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

async fn serve_metrics(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
    upkeep_task.abort();
}
