//! Wires the parts together: storage and recovery, the engine, the gRPC
//! services and the metrics endpoint. Tests call [`serve`] with listeners
//! bound to 127.0.0.1:0 and their own shutdown signal, or [`serve_on_store`]
//! with a log store that fails when they say so.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use thiserror::Error;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use tonic::service::interceptor::InterceptedService;

use crate::analytics::Analytics;
use crate::api::rpc_metrics::RpcMetricsLayer;
use crate::api::{AdminService, GateService};
use crate::auth::{AuthInterceptor, AuthMode};
use crate::config::Secret;
use crate::config::{Config, ConfigError};
use crate::engine::{system_now_ms, Clock, Engine, EngineError, EngineRuntime};
use crate::postgres::recover::{Attaching, PostgresSnapshot};
use crate::postgres::Reader;
use crate::postgres::{self, rows::Changes, snapshot::PostgresFollower, PostgresError};
use crate::proto::quota_admin_server::QuotaAdminServer;
use crate::proto::quota_gate_server::QuotaGateServer;
use crate::storage::history::{self, Decision, History, HistoryId, HistoryPosition, RecoverFrom};
use crate::storage::snapshot::{write_snapshot, Follower, Snapshotter};
use crate::storage::{
    recover_with, LogStore, OnDamage, Recovered, SledLog, StorageError, Wal, WalWriter,
};
use crate::telemetry;

/// The largest response, in bytes (a usage view of 32 service types is ~3 KiB).
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "cannot open the data directory {path}: {source}{}",
        recovery_advice(source)
    )]
    Open { path: PathBuf, source: StorageError },
    #[error("recovery refused: {source}{}", recovery_advice(source))]
    Recover { source: StorageError },
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
    #[error(
        "recover_from = postgres, but Postgres does not answer ({0}): quotad will not serve the \
         data directory it was asked to recover over"
    )]
    PostgresNeeded(String),
    #[error("the accepted data loss could not be written to the audit trail: {0}")]
    Audit(crate::storage::WalError),
    #[error("the data directory {path}: {conflict}")]
    History {
        path: PathBuf,
        conflict: history::Conflict,
    },
    /// The WAL failed while serving: changes were refused from then on. The
    /// exit is an error so that a supervisor notices and restarts quotad.
    #[error(
        "the write-ahead log failed ({0}); changes were refused from then on. Every \
         acknowledged change is in the data directory: restart quotad"
    )]
    WalPoisoned(String),
}

/// How to go on from damage, for the refusal's message.
fn recovery_advice(error: &StorageError) -> &'static str {
    match error {
        StorageError::Damaged(_)
        | StorageError::Corrupt { .. }
        | StorageError::LogEndsEarly { .. }
        | StorageError::LogGap { .. }
        | StorageError::Sled(sled::Error::Corruption { .. }) => {
            ". Nothing was served. To go on: recover from Postgres (move this data directory \
             aside and start with --database-url: Postgres holds everything up to its last \
             snapshot), or serve what the log still holds with --accept-data-loss (the loss is \
             logged and written in every school's audit trail)"
        }
        _ => "",
    }
}

/// How long start-up waits for Postgres before serving from the data
/// directory alone.
const POSTGRES_START_WAIT: Duration = Duration::from_secs(5);

pub struct Listeners {
    pub grpc: TcpListener,
    /// None: no metrics endpoint.
    pub metrics: Option<TcpListener>,
}

/// Runs quotad on the sled log in `data_dir` until `shutdown` resolves, then
/// stops in the order that keeps every acknowledged change: stop answering,
/// stop the actors, flush the WAL, write the final snapshot. A WAL that
/// failed meanwhile makes it return [`ServeError::WalPoisoned`].
pub async fn serve(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let store = SledLog::open(&config.data_dir).map_err(|source| ServeError::Open {
        path: config.data_dir.clone(),
        source,
    })?;
    serve_on_store(listeners, config, Arc::new(store), shutdown).await
}

/// [`serve`] on a log store the caller opened. quotad itself runs on sled;
/// tests use this to run the real server on a store that fails or panics
/// when they say so (a full disk, a bug inside sled).
pub async fn serve_on_store(
    listeners: Listeners,
    config: Config,
    store: Arc<dyn LogStore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_on_clock(listeners, config, store, Clock::system(), shutdown).await
}

/// [`serve_on_store`] with the rules' clock given: tests run the real
/// server on [`Clock::manual`] to move it across a billing cycle's end.
/// (The snapshotter keeps the system clock: it only paces snapshots.)
pub async fn serve_on_clock(
    listeners: Listeners,
    config: Config,
    store: Arc<dyn LogStore>,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let auth = config.auth_mode()?;
    warn_if_insecure(&auth);
    let metrics = prometheus()?;
    telemetry::register_at_start(config.postgres_url.is_some());
    let (mut recovered, follower) = match &config.postgres_url {
        Some(url) => recover_with_postgres(&store, url, &config).await?,
        None => (recover_without_postgres(store.as_ref(), &config)?, None),
    };
    telemetry::snapshot_recovered(recovered.snapshot_seq);
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
    audit_accepted_loss(&wal, &mut recovered).await?;
    let (engine, runtime) =
        Engine::start(recovered.state, wal.clone(), config.engine()?, clock).await?;
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
    let grpc = Grpc {
        engine,
        analytics,
        wal: wal.clone(),
        auth,
    };
    let served = serve_grpc(listeners.grpc, grpc, &config, shutdown).await;
    for task in [metrics_task, alerts_task].into_iter().flatten() {
        task.abort();
    }
    stop_in_order(runtime, writer, snapshotter).await;
    served?;
    wal.poisoned_because()
        .map_or(Ok(()), |reason| Err(ServeError::WalPoisoned(reason)))
}

fn warn_if_insecure(auth: &AuthMode) {
    if matches!(auth, AuthMode::InsecureDev) {
        tracing::warn!(
            "INSECURE DEV MODE: every call is accepted without a token, as an admin. \
             Never run this where anyone else can reach the port."
        );
    }
}

/// The actors first (no new records), then the WAL (flushes what they
/// queued), then the snapshotter (writes the final snapshot of it all).
async fn stop_in_order(runtime: EngineRuntime, writer: WalWriter, snapshotter: Snapshotter) {
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
}

/// Recovers from the data directory. Damage refuses to start unless the
/// operator accepted the loss for this start; then the state up to the last
/// whole record is written down as the snapshot and everything after it is
/// dropped, so that new records follow it without a gap.
fn recover_local(store: &dyn LogStore, config: &Config) -> Result<Recovered, ServeError> {
    let on_damage = if config.accept_data_loss {
        OnDamage::AcceptLoss
    } else {
        OnDamage::Refuse
    };
    // sled has been seen to panic on a damaged log while reading it.
    let mut recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        recover_with(store, on_damage)
    }))
    .map_err(|panic| {
        StorageError::Damaged(format!(
            "sled panicked while reading the log: {}",
            crate::storage::log::panic_message(&panic)
        ))
    })
    .and_then(|recovered| recovered)
    .map_err(|source| ServeError::Recover { source })?;
    if let Some(lost) = &recovered.lost {
        tracing::error!(
            %lost,
            served_through_wal_seq = recovered.last_seq,
            "DATA LOSS ACCEPTED (--accept-data-loss): serving the state up to the last whole \
             record; every record after it is gone"
        );
        // The lower mark first (it is synced at once): a crash after the
        // cut must not find a mark past the log's new end.
        store.mark_durable(recovered.last_seq)?;
        write_snapshot(store, recovered.last_seq, &recovered.state)?;
        recovered.snapshot_seq = recovered.last_seq;
        store.truncate_through(u64::MAX)?;
        store.flush()?;
    }
    tracing::info!(
        schools = recovered.state.schools.len(),
        teachers = recovered.state.accounts.len(),
        snapshot_wal_seq = recovered.snapshot_seq,
        replayed_records = recovered.replayed_records,
        "state recovered from the data directory"
    );
    Ok(recovered)
}

/// After `--accept-data-loss` served a damaged log: an entry in every
/// school's audit trail, so that principals (and Postgres's history table)
/// see that the state was cut back and why. Written through the WAL like any
/// change, after the snapshotter started (it applies them from the durable
/// batches) and before the engine (which starts from the state with them).
async fn audit_accepted_loss(wal: &Wal, recovered: &mut Recovered) -> Result<(), ServeError> {
    let Some(lost) = recovered.lost.clone() else {
        return Ok(());
    };
    let change = quotad_core::Change {
        by: Arc::from("quotad --accept-data-loss"),
        reason: Arc::from("the operator accepted the loss of a damaged write-ahead log"),
        at_ms: system_now_ms(),
    };
    let schools: Vec<_> = recovered.state.schools.keys().cloned().collect();
    for school_id in schools {
        let record = quotad_core::Record::DataLossAccepted {
            school_id,
            served_through_seq: recovered.snapshot_seq,
            lost: Arc::from(lost.as_str()),
            change: change.clone(),
        };
        let wal_seq = wal.append(&record).map_err(ServeError::Audit)?;
        wal.wait_durable(wal_seq).await.map_err(ServeError::Audit)?;
        recovered
            .state
            .apply(wal_seq, &record)
            .map_err(StorageError::from)?;
        recovered.last_seq = wal_seq;
    }
    Ok(())
}

/// Without Postgres, a new data directory starts a history of its own; a
/// directory an older quotad wrote is left without one (nothing here says
/// which history it belongs to; the first start with Postgres decides).
fn recover_without_postgres(
    store: &dyn LogStore,
    config: &Config,
) -> Result<Recovered, ServeError> {
    let recovered = recover_local(store, config)?;
    if recovered.last_seq == 0 && history::read(store)?.is_none() {
        let started = History::first(HistoryId::random()?);
        history::write(store, &started)?;
        tracing::info!(history = %started, "a new history starts");
    }
    Ok(recovered)
}

/// Recovers from the data directory or from Postgres, as
/// [`history::decide`] rules from which history and epoch each holds and
/// how far along it is. Serving the directory catches Postgres up from it
/// (the local WAL is never truncated past what Postgres holds, so it is
/// Postgres's snapshot plus the WAL after it). Loading Postgres (a new node,
/// a lost disk, or `--recover-from postgres`) discards the directory's state,
/// writes the loaded one down and continues the WAL after its position, at a
/// new epoch. A directory of another history or epoch is refused. All of it
/// is decided and recorded in Postgres under the snapshot lock, in one
/// transaction ([`Attaching`]).
///
/// When Postgres does not answer at start, a data directory with state is
/// served alone and Postgres is caught up once it answers (if the directory
/// is at its history); an empty one cannot be, and start-up fails.
async fn recover_with_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    config: &Config,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let interval = Duration::from_secs(config.postgres_snapshot_interval_s);
    let connected = tokio::time::timeout(POSTGRES_START_WAIT, postgres::prepare(&url.0)).await;
    let answered = match connected {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "no answer within {} s",
            POSTGRES_START_WAIT.as_secs()
        )),
    };
    let mut client = match answered {
        Ok(client) => client,
        // The operator asked for Postgres's state: serving the directory
        // alone (perhaps the very one they meant to discard) is the opposite.
        Err(error) if config.recover_from == RecoverFrom::Postgres => {
            return Err(ServeError::PostgresNeeded(error))
        }
        Err(error) => return start_without_postgres(store, url, config, error),
    };
    let local = recover_local(store.as_ref(), config)?;
    let attached = attach(store.as_ref(), &mut client, local, config).await?;
    telemetry::postgres_snapshot_recovered(attached.postgres_seq);
    tracing::info!(
        history = %attached.history,
        wal_seq = attached.recovered.last_seq,
        "attached to Postgres"
    );
    let follower = PostgresFollower::start(
        url.clone(),
        interval,
        store.clone(),
        attached.postgres_seq,
        attached.changes,
        attached.history,
    )?;
    Ok((attached.recovered, Some(Box::new(follower))))
}

/// What start-up attached to: the state to serve, what Postgres lacks of
/// it, and the history and epoch every snapshot commit will be fenced on.
struct Attached {
    recovered: Recovered,
    changes: Changes,
    history: History,
    /// The position Postgres covers.
    postgres_seq: u64,
}

/// Compares the data directory (`local`, recovered from it) with Postgres
/// and carries out [`history::decide`]'s ruling in the attach transaction.
async fn attach(
    store: &dyn LogStore,
    client: &mut tokio_postgres::Client,
    local: Recovered,
    config: &Config,
) -> Result<Attached, ServeError> {
    let local_at = HistoryPosition {
        history: history::read(store)?,
        wal_seq: local.last_seq,
    };
    let new_id = HistoryId::random()?;
    let attaching = postgres::recover::begin_attach(client).await?;
    let postgres_at = attaching.found;
    let history_written = attaching.history_written().await?;
    let (recovered, changes, history) =
        match history::decide(&local_at, &postgres_at, config.recover_from, new_id) {
            Decision::Refuse(conflict) => {
                // Dropping `attaching` rolls back: Postgres is left as it was.
                return Err(ServeError::History {
                    path: config.data_dir.clone(),
                    conflict,
                });
            }
            Decision::Serve {
                history,
                record_locally,
                ..
            } => {
                if config.recover_from == RecoverFrom::Postgres {
                    tracing::info!(
                        %history,
                        "recover_from = postgres is not needed: the data directory is served (it \
                         is at Postgres's history and epoch, or Postgres has none); nothing is \
                         discarded"
                    );
                }
                if record_locally {
                    // Before the commit: a crash between the two leaves a
                    // directory that names the history and a Postgres that
                    // does not yet, which the next start serves and records.
                    history::write(store, &history)?;
                }
                attaching.commit(&history).await?;
                let changes = if local.last_seq == postgres_at.wal_seq {
                    Changes::new(history_written)
                } else {
                    catch_up(store, &local, postgres_at.wal_seq, history_written)?
                };
                (local, changes, history)
            }
            Decision::Load { history } => {
                let recovered = load_from_postgres(store, attaching, &local_at, history).await?;
                (recovered, Changes::new(history_written), history)
            }
        };
    Ok(Attached {
        recovered,
        changes,
        history,
        postgres_seq: postgres_at.wal_seq,
    })
}

/// Loads Postgres's snapshot and commits the new epoch in the attach
/// transaction, then replaces the data directory's state with it: first the
/// old WAL goes (it may run past Postgres's position, and its records, of
/// another history or epoch, must never be replayed onto this state), then
/// the snapshot is written and flushed, and only then the history record.
/// A crash on the way leaves a directory that can never serve a mix: with
/// its old record (refused, or loaded again), without one (loaded again, or
/// at Postgres's position and holding exactly its state, adopting the epoch
/// just committed).
async fn load_from_postgres(
    store: &dyn LogStore,
    attaching: Attaching<'_>,
    local_at: &HistoryPosition,
    history: History,
) -> Result<Recovered, ServeError> {
    let loaded: PostgresSnapshot = attaching.load().await?;
    attaching.commit(&history).await?;
    if local_at.wal_seq > 0 {
        tracing::warn!(
            local = %local_at,
            postgres_wal_seq = loaded.wal_seq,
            new = %history,
            "the data directory's state is discarded: recovering from Postgres"
        );
    }
    // The directory's old mark may be past the loaded position: the log
    // now ends there, and a mark beyond it would read as lost records. It
    // is lowered (and synced) before the log is cut back. A lower mark is
    // left alone: it is a lower bound, and raising it before the snapshot
    // below is written would put it ahead of the log.
    if store
        .durable_mark()?
        .is_some_and(|mark| mark > loaded.wal_seq)
    {
        store.mark_durable(loaded.wal_seq)?;
    }
    store.truncate_through(local_at.wal_seq)?;
    write_snapshot(store, loaded.wal_seq, &loaded.state)?;
    history::write(store, &history)?;
    tracing::info!(
        schools = loaded.state.schools.len(),
        teachers = loaded.state.accounts.len(),
        snapshot_wal_seq = loaded.wal_seq,
        %history,
        "state recovered from Postgres"
    );
    Ok(Recovered {
        state: loaded.state,
        snapshot_seq: loaded.wal_seq,
        last_seq: loaded.wal_seq,
        replayed_records: 0,
        lost: None,
    })
}

fn start_without_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    config: &Config,
    error: String,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let local = recover_local(store.as_ref(), config)?;
    if local.last_seq == 0 {
        return Err(ServeError::NoState(error));
    }
    let local_at = HistoryPosition {
        history: history::read(store.as_ref())?,
        wal_seq: local.last_seq,
    };
    tracing::warn!(
        %error,
        local = %local_at,
        "Postgres does not answer: serving from the data directory; the WAL is kept whole and \
         Postgres is caught up once it answers, if it is at this directory's history"
    );
    let interval = Duration::from_secs(config.postgres_snapshot_interval_s);
    let follower =
        PostgresFollower::start_detached(url.clone(), interval, store.clone(), local_at)?;
    Ok((local, Some(Box::new(follower))))
}

/// What Postgres lacks when the data directory is ahead of it: every school
/// and teacher (rewritten whole) and the usage rows of the WAL records after
/// its position, which the writer reads from the WAL in pieces.
fn catch_up(
    store: &dyn LogStore,
    local: &Recovered,
    pg_seq: u64,
    history_written: std::collections::HashMap<quotad_core::SchoolId, u64>,
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
    Grpc {
        engine,
        analytics,
        wal,
        auth,
    }: Grpc,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<QuotaGateServer<GateService>>().await;
    health.set_serving::<QuotaAdminServer<AdminService>>().await;
    let health_follows_wal = tokio::spawn(follow_wal(health.clone(), wal));
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
    health_follows_wal.abort();
    set_not_serving(&health).await;
    tracing::info!("health: NOT_SERVING, shutting down");
    let _ = stop_tx.send(true);
    end_health_watches(health).await;
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

/// What the gRPC servers answer with.
struct Grpc {
    engine: Engine,
    analytics: Arc<Analytics>,
    /// Followed by the health service.
    wal: Wal,
    auth: AuthMode,
}

/// Every name the health service answers for: the server as a whole ("")
/// and each service.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    <QuotaGateServer<GateService> as NamedService>::NAME,
    <QuotaAdminServer<AdminService> as NamedService>::NAME,
];

/// Says NOT_SERVING once the WAL is poisoned: every change would be refused,
/// so a load balancer should send callers to another node.
async fn follow_wal(health: HealthReporter, wal: Wal) {
    let reason = wal.poisoned().await;
    set_not_serving(&health).await;
    tracing::error!(%reason, "health: NOT_SERVING, the write-ahead log failed");
}

/// For QuotaGate, QuotaAdmin and the server as a whole.
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
    async move {
        // The pool gauges are there from the first scrape: a scrape that
        // comes now waits in the listener's backlog for this first read.
        refresh_pools_once(&engine, schools_max, &pools).await;
        let refresher = refresh_pools(engine, schools_max, refresh, pools.clone());
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
/// every `interval`, the first time one `interval` from now.
async fn refresh_pools(
    engine: Engine,
    schools_max: usize,
    interval: Duration,
    pools: Arc<Mutex<String>>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        refresh_pools_once(&engine, schools_max, &pools).await;
    }
}

/// A failed read keeps the previous text and is logged.
async fn refresh_pools_once(engine: &Engine, schools_max: usize, pools: &Mutex<String>) {
    match engine.pools_of_first_schools(schools_max).await {
        Ok((schools, omitted)) => {
            let text = telemetry::render_pools(&schools, omitted);
            *pools.lock().unwrap_or_else(|p| p.into_inner()) = text;
        }
        Err(error) => tracing::warn!(%error, "the pool gauges were not refreshed"),
    }
}
