//! The gRPC health service follows the WAL: SERVING while changes can be made
//! durable, NOT_SERVING (QuotaGate, QuotaAdmin and the server as a whole) as
//! soon as the WAL is poisoned, by a failed write or by a dead writer thread,
//! and while shutting down. A poisoned WAL also makes `serve` end in an error,
//! so that the process exits non-zero. The real server runs on a log store
//! that fails or panics when the test says so (`serve_on_store`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quotad::config::{Config, Secret};
use quotad::server::ServeError;
use quotad::storage::{LogCall, LogStore, MemoryLog, StorageError, WrappedLog};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::*;

/// The server as a whole, then each service.
const SERVICES: [&str; 3] = ["", "quotad.v1.QuotaGate", "quotad.v1.QuotaAdmin"];

/// How long a poisoned WAL may take to show: it is told at once, so this
/// only bounds a failing test.
const PROMPTLY: Duration = Duration::from_secs(5);

fn config(data: &Path) -> Config {
    Config {
        data_dir: data.to_path_buf(),
        auth_key: Some(Secret(KEY.into())),
        ..Config::default()
    }
}

async fn health_client(server: &TestServer) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn statuses(client: &mut HealthClient<Channel>) -> Vec<ServingStatus> {
    let mut statuses = Vec::new();
    for service in SERVICES {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let answer = client.check(request).await.unwrap().into_inner();
        statuses.push(answer.status());
    }
    statuses
}

async fn wait_for_all(client: &mut HealthClient<Channel>, wanted: ServingStatus) {
    let started = std::time::Instant::now();
    loop {
        let now = statuses(client).await;
        if now.iter().all(|s| *s == wanted) {
            return;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "health is {now:?}, not {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_poisoned_gauge(server: &TestServer) {
    let text = scrape(server.metrics_addr).await;
    assert!(
        text.lines().any(|l| l == "quotad_wal_poisoned 1"),
        "quotad_wal_poisoned is not 1:\n{text}"
    );
}

/// A change is refused as UNAVAILABLE, promptly, with the WAL's reason.
async fn assert_change_refused(admin: &mut AdminClient, teacher: &str, said: &str) {
    let refused = tokio::time::timeout(PROMPTLY, allocate(admin, "oak", teacher, 10, "normal"))
        .await
        .expect("refused at once, not at the client's deadline")
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(said), "{}", refused.message());
}

async fn assert_serve_failed(server: TestServer, said: &str) {
    match server.stopped().await {
        Err(ServeError::WalPoisoned(reason)) if reason.contains(said) => {}
        other => panic!("serve ended with {other:?}, not a poisoned WAL"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_write_turns_health_to_not_serving_and_serve_fails() {
    let (_dir, data) = temp_dir();
    let store = MemoryLog::default();
    let server = TestServer::start_on_store(config(&data), Arc::new(store.clone())).await;
    let mut health = health_client(&server).await;
    assert_eq!(statuses(&mut health).await, [ServingStatus::Serving; 3]);
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;

    store.fail_writes();
    assert_change_refused(&mut admin, "t1", "injected").await;
    wait_for_all(&mut health, ServingStatus::NotServing).await;
    assert_poisoned_gauge(&server).await;
    assert_change_refused(&mut admin, "t2", "injected").await;
    assert_serve_failed(server, "injected").await;
}

/// A memory log whose flush panics once armed, as a bug inside sled would.
#[derive(Default)]
struct PanickingFlush {
    inner: MemoryLog,
    armed: AtomicBool,
}

impl WrappedLog for PanickingFlush {
    fn inner(&self) -> &dyn LogStore {
        &self.inner
    }
    fn before(&self, call: LogCall<'_>) -> Result<(), StorageError> {
        if let LogCall::Flush = call {
            assert!(
                !self.armed.load(Ordering::SeqCst),
                "injected panic in flush"
            );
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_wal_writer_fails_the_call_in_flight_at_once_and_turns_health_to_not_serving() {
    let (_dir, data) = temp_dir();
    let store = Arc::new(PanickingFlush::default());
    let server = TestServer::start_on_store(config(&data), store.clone()).await;
    let mut health = health_client(&server).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;

    store.armed.store(true, Ordering::SeqCst);
    assert_change_refused(&mut admin, "t1", "panicked").await;
    // Not "shut down": the reason stays the panic for every later change.
    assert_change_refused(&mut admin, "t2", "injected panic in flush").await;
    wait_for_all(&mut health, ServingStatus::NotServing).await;
    assert_poisoned_gauge(&server).await;
    assert_serve_failed(server, "panicked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_on_shutdown_and_an_open_watch_does_not_hold_the_stop() {
    let (_dir, data) = temp_dir();
    let mut server = TestServer::start(&data).await;
    let mut health = health_client(&server).await;
    assert_eq!(statuses(&mut health).await, [ServingStatus::Serving; 3]);
    let request = HealthCheckRequest {
        service: "quotad.v1.QuotaGate".into(),
    };
    let mut watch = health.watch(request).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.signal_stop();
    let next = tokio::time::timeout(PROMPTLY, watch.message())
        .await
        .expect("the watcher hears of the shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The watch stream is still open here: the stop must not wait for it.
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.stopped()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "the stop hung or failed: {stopped:?}"
    );
    drop(watch);
}
