//! Wires the parts together: storage and recovery, the engine, the gRPC
//! services and the metrics endpoint. Tests call [`serve`] with listeners
//! bound to 127.0.0.1:0 and their own shutdown signal, or [`serve_on_store`]
//! with a log store that fails when they say so.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::analytics::Analytics;
use crate::auth::AuthMode;
use crate::config::{Config, ConfigError};
use crate::engine::{system_now_ms, Clock, Engine, EngineError, EngineRuntime};
use crate::postgres::{PostgresError, Reader};
use crate::storage::history;
use crate::storage::snapshot::Snapshotter;
use crate::storage::{LogStore, SledLog, StorageError, Wal, WalWriter};
use crate::telemetry;

pub mod conn;
mod grpc;
mod metrics;
mod recovery;
pub mod tls;

use grpc::{serve_grpc, Grpc};
use metrics::{prometheus, serve_metrics};
use recovery::{audit_accepted_loss, recover_with_postgres, recover_without_postgres};

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
    #[error("TLS: {0}")]
    Tls(tls::TlsError),
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

pub struct Listeners {
    pub grpc: TcpListener,
    /// None: no metrics endpoint.
    pub metrics: Option<TcpListener>,
    /// The gateways' rate limit protocols without tokens; None: only on
    /// the gRPC port.
    pub rls: Option<TcpListener>,
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
    warn_if_rls_public(listeners.rls.as_ref());
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
    let metrics_tls = config
        .metrics_tls_files()?
        .map(tls::Tls::load)
        .transpose()
        .map_err(ServeError::Tls)?;
    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(serve_metrics(
            listener,
            metrics_tls.clone(),
            metrics,
            engine.clone(),
            &config,
        ))
    });
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
        domains: Arc::new(config.rls_domains()?),
    };
    let served = serve_grpc(listeners.grpc, listeners.rls, grpc, &config, shutdown).await;
    for task in [metrics_task, alerts_task].into_iter().flatten() {
        task.abort();
    }
    stop_in_order(runtime, writer, snapshotter).await;
    served?;
    wal.poisoned_because()
        .map_or(Ok(()), |reason| Err(ServeError::WalPoisoned(reason)))
}

/// A rate limit listener that anyone may reach charges without a token.
fn warn_if_rls_public(listener: Option<&TcpListener>) {
    let Some(addr) = listener.and_then(|l| l.local_addr().ok()) else {
        return;
    };
    if !crate::config::is_private(addr.ip()) {
        tracing::warn!(
            %addr,
            "the rate limit listener takes no tokens and is bound to a public address \
             (rls_allow_public): whoever reaches it may charge the domains' schools"
        );
    }
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

/// With a Postgres URL, the analytics reader: its connection (made when first
/// needed, remade when lost) runs on this (the main) runtime, away from the
/// actor threads that answer the gate. The schema is brought up to date by
/// recovery, before it.
fn analytics_reader(config: &Config) -> Option<Arc<Reader>> {
    let url = config.postgres_url.as_ref()?;
    Some(Arc::new(Reader::new(&url.0)))
}
