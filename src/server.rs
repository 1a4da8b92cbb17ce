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

use crate::analytics::Analytics;
use crate::api::rpc_metrics::RpcMetricsLayer;
use crate::api::{AdminService, GateService};
use crate::auth::{AuthInterceptor, AuthMode};
use crate::config::Secret;
use crate::config::{Config, ConfigError};
use crate::engine::{system_now_ms, Clock, Engine, EngineError};
use crate::postgres::Reader;
use crate::postgres::{self, rows::Changes, snapshot::PostgresFollower, PostgresError};
use crate::proto::quota_admin_server::QuotaAdminServer;
use crate::proto::quota_gate_server::QuotaGateServer;
use crate::storage::snapshot::{write_snapshot, Follower, Snapshotter};
use crate::storage::{recover, LogStore, Recovered, SledLog, StorageError, Wal};
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
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error(
        "the data directory is empty and Postgres, which would hold the state, does not answer ({0}); \
         quotad will not start from nothing while the state may be there"
    )]
    NoState(String),
}

/// How long start-up waits for Postgres before serving from the data
/// directory alone.
const POSTGRES_START_WAIT: Duration = Duration::from_secs(5);

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
    let (recovered, follower) = match &config.postgres_url {
        Some(url) => recover_with_postgres(&store, url, &config).await?,
        None => (recover_local(store.as_ref())?, None),
    };
    let (wal, writer, durable) = Wal::start(store.clone(), config.wal(), recovered.last_seq)?;
    let snapshotter = Snapshotter::start(
        store,
        durable,
        recovered.clone(),
        Duration::from_secs(config.snapshot_interval_s),
        config.limits(),
        system_now_ms,
        follower,
    )?;
    let (engine, runtime) =
        Engine::start(recovered.state, wal, config.engine()?, Clock::System).await?;
    let reader = analytics_reader(&config);
    let metrics_task = listeners
        .metrics
        .map(|listener| tokio::spawn(serve_metrics(listener, metrics, engine.clone(), &config)));
    let analytics = Arc::new(Analytics::new(
        engine.clone(),
        reader.clone(),
        config.alert_thresholds(),
    ));
    // The alert gauges need Postgres' daily usage; without it there are none.
    let alerts_task = reader.is_some().then(|| {
        let interval = Duration::from_secs(config.alerts_interval_s);
        tokio::spawn(analytics.clone().run_alert_gauges(interval))
    });
    let served = serve_grpc(listeners.grpc, engine, analytics, &config, auth, shutdown).await;
    for task in [metrics_task, alerts_task].into_iter().flatten() {
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

fn recover_local(store: &dyn LogStore) -> Result<Recovered, ServeError> {
    let recovered = recover(store).map_err(ServeError::Recover)?;
    tracing::info!(
        schools = recovered.state.schools.len(),
        teachers = recovered.state.accounts.len(),
        snapshot_wal_seq = recovered.snapshot_seq,
        replayed_records = recovered.replayed_records,
        "state recovered from the data directory"
    );
    Ok(recovered)
}

/// Recovers from whichever of the data directory and Postgres is further
/// along. The local WAL is never truncated past what Postgres holds, so when
/// the data directory has anything at or beyond Postgres's position, it is
/// the whole story (Postgres's snapshot plus the WAL after it) and wins. When
/// it is empty or older (a new node, a lost disk), the Postgres snapshot is
/// loaded and written down locally at once, so the WAL continues after it.
///
/// When Postgres does not answer at start, a data directory with state is
/// served alone and Postgres is caught up once it answers; an empty one
/// cannot be, and start-up fails.
async fn recover_with_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    config: &Config,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let interval = Duration::from_secs(config.postgres_snapshot_interval_s);
    let connected = tokio::time::timeout(POSTGRES_START_WAIT, postgres::prepare(&url.0)).await;
    let mut client = match connected {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => return start_without_postgres(store, url, interval, error.to_string()),
        Err(_) => {
            let waited = format!("no answer within {} s", POSTGRES_START_WAIT.as_secs());
            return start_without_postgres(store, url, interval, waited);
        }
    };
    let store_arc = store.clone();
    let store = store.as_ref();
    let local = recover_local(store)?;
    let pg_seq = postgres::recover::snapshot_seq(&client).await?;
    let history_written = postgres::recover::history_written(&client).await?;
    let (recovered, changes) = if local.last_seq >= pg_seq {
        let changes = if local.last_seq == pg_seq {
            Changes::new(history_written)
        } else {
            catch_up(store, &local, pg_seq, history_written)?
        };
        (local, changes)
    } else {
        let loaded = postgres::recover::load(&mut client).await?;
        if local.last_seq > 0 {
            tracing::warn!(
                local_wal_seq = local.last_seq,
                postgres_wal_seq = loaded.wal_seq,
                "the data directory is older than the Postgres snapshot; recovering from Postgres"
            );
        }
        write_snapshot(store, loaded.wal_seq, &loaded.state)?;
        tracing::info!(
            schools = loaded.state.schools.len(),
            teachers = loaded.state.accounts.len(),
            snapshot_wal_seq = loaded.wal_seq,
            "state recovered from Postgres"
        );
        // Written down (and flushed) just above, so the snapshot position is
        // a real one: nothing after it needs replaying, nothing before it is
        // held only in memory.
        let recovered = Recovered {
            state: loaded.state,
            snapshot_seq: loaded.wal_seq,
            last_seq: loaded.wal_seq,
            replayed_records: 0,
        };
        (recovered, Changes::new(history_written))
    };
    let follower = PostgresFollower::start(url.clone(), interval, store_arc, pg_seq, changes)?;
    Ok((recovered, Some(Box::new(follower))))
}

fn start_without_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    interval: Duration,
    error: String,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let local = recover_local(store.as_ref())?;
    if local.last_seq == 0 {
        return Err(ServeError::NoState(error));
    }
    tracing::warn!(
        %error,
        "Postgres does not answer: serving from the data directory; the WAL is kept whole and \
         Postgres is caught up once it answers"
    );
    let follower = PostgresFollower::start_detached(url.clone(), interval, store.clone())?;
    Ok((local, Some(Box::new(follower))))
}

/// What Postgres lacks when the data directory is ahead of it: every school
/// and teacher (rewritten whole) and the usage rows of the WAL records after
/// its position, which the writer reads from the WAL in pieces.
fn catch_up(
    store: &dyn LogStore,
    local: &Recovered,
    pg_seq: u64,
    history_written: std::collections::HashMap<crate::domain::SchoolId, u64>,
) -> Result<Changes, ServeError> {
    let mut changes = Changes::everything(&local.state, history_written);
    changes.take_usage_from_wal();
    let first = store.read_range(pg_seq, 1)?.first().map(|(seq, _)| *seq);
    if first.is_none_or(|first| first > pg_seq + 1) {
        tracing::warn!(
            postgres_wal_seq = pg_seq,
            local_wal_seq = local.last_seq,
            "the WAL no longer holds every record after the Postgres snapshot (quotad ran \
             without Postgres): the state is written whole, but the usage log rows of the \
             missing records will not be in ai_usage_logs"
        );
    }
    tracing::info!(
        postgres_wal_seq = pg_seq,
        local_wal_seq = local.last_seq,
        "Postgres is behind the data directory; the first snapshot catches it up"
    );
    Ok(changes)
}

/// With a Postgres URL, the analytics reader: its connection (made when first
/// needed, remade when lost) runs on this (the main) runtime, away from the
/// actor threads that answer the gate. The schema is brought up to date by
/// recovery, before it.
fn analytics_reader(config: &Config) -> Option<Arc<Reader>> {
    let url = config.postgres_url.as_ref()?;
    Some(Arc::new(Reader::new(&url.0)))
}

/// Serves gRPC on every actor thread: each runs an accept loop on the same
/// socket, and a call is answered on the thread that accepted its connection.
/// Half the time (with two threads) the teacher's actor lives there too, and
/// the call never crosses threads; the other half costs one hop each way.
async fn serve_grpc(
    listener: TcpListener,
    engine: Engine,
    analytics: Arc<Analytics>,
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
    let admin = QuotaAdminServer::new(AdminService::new(engine.clone(), analytics))
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
            .layer(RpcMetricsLayer)
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
        .set_buckets_for_metric(
            Matcher::Full(telemetry::WAL_FLUSH_BATCH_BYTES.into()),
            telemetry::BATCH_BUCKETS_BYTES,
        )
        .map_err(metrics_error)?
        .install_recorder()
        .map_err(metrics_error)?;
    telemetry::describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Serves `/metrics`: the recorder's metrics, then the pool gauges, which a
/// background task refreshes from the engine every `metrics_refresh_interval_ms`
/// (so that scrapes, however frequent, never reach the actors).
fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    engine: Engine,
    config: &Config,
) -> impl Future<Output = ()> + Send + 'static {
    let pools = Arc::new(Mutex::new(String::new()));
    let refresh = Duration::from_millis(config.metrics_refresh_interval_ms);
    let schools_max = config.metrics_schools_max;
    let refresher = refresh_pools(engine, schools_max, refresh, pools.clone());
    async move {
        let upkeep = handle.clone();
        // Dropped with this future (the server aborts it on shutdown), which
        // stops both tasks: neither outlives the engine it reads.
        let mut background = tokio::task::JoinSet::new();
        background.spawn(refresher);
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (handle, pools) = (handle.clone(), pools.clone());
                async move { render_metrics(&handle, &pools) }
            }),
        );
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    }
}

fn render_metrics(handle: &PrometheusHandle, pools: &Mutex<String>) -> String {
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    // A poisoned lock only means a panic between two whole-string writes.
    text.push_str(&pools.lock().unwrap_or_else(|p| p.into_inner()));
    text
}

/// Renders the pool gauges of the first `schools_max` schools (in id order)
/// every `interval`. A failed read keeps the previous text and is logged.
async fn refresh_pools(
    engine: Engine,
    schools_max: usize,
    interval: Duration,
    pools: Arc<Mutex<String>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match engine.pools_of_first_schools(schools_max).await {
            Ok((schools, omitted)) => {
                let text = telemetry::render_pools(&schools, omitted);
                *pools.lock().unwrap_or_else(|p| p.into_inner()) = text;
            }
            Err(error) => tracing::warn!(%error, "the pool gauges were not refreshed"),
        }
    }
}
