//! The `/metrics` endpoint: the Prometheus recorder, installed once per
//! process, and the pool gauges, rendered from the engine in the background.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::conn::{incoming, Conn, ConnGate};
use super::tls::Tls;

use super::ServeError;
use crate::config::Config;
use crate::engine::Engine;
use crate::telemetry;

/// The process-wide Prometheus recorder, installed once (tests start many servers).
pub(super) fn prometheus() -> Result<PrometheusHandle, ServeError> {
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
pub(super) fn serve_metrics(
    listener: TcpListener,
    tls: Option<Tls>,
    handle: PrometheusHandle,
    engine: Engine,
    config: &Config,
) -> impl Future<Output = ()> + Send + 'static {
    let conn_limits = config.conn_limits();
    let tls_reload = Duration::from_secs(config.tls_reload_interval_s);
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
        let served = match tls {
            None => axum::serve(listener, app).await,
            Some(tls) => {
                background.spawn(tls.clone().follow(tls_reload));
                let local = listener.local_addr();
                let incoming = incoming(listener, Some(tls), ConnGate::new(conn_limits));
                match local {
                    Ok(local) => axum::serve(TlsListener { incoming, local }, app).await,
                    Err(error) => Err(error),
                }
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    }
}

/// The metrics endpoint over TLS: the connections the gRPC listeners' own
/// accept loop admits and handshakes (HTTP/1.1 or h2).
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.remote().unwrap_or(self.local);
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop ended: the endpoint is being stopped.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.local)
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
