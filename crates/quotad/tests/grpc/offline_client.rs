//! The three scenarios of the original fix, with the real quotad binary and
//! the real client library (quotad-client) with journals on disk:
//! cross-device usage, offline usage synced exactly once, and a server
//! killed during a run of consumes. Plus a flush interrupted by a crash,
//! refusals that must not block the rest of the journal, a server with a
//! smaller batch limit than the client's, journals reopened as another
//! teacher, and the background sync.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quotad::auth::Role;
use quotad_client::{ClientConfig, ClientError, ConsumeAnswer, QuotaClient};

use crate::common::*;

const SCHOOL: &str = "s";
const TEACHER: &str = "t1";

fn device(addr: std::net::SocketAddr, journal_dir: &Path) -> QuotaClient {
    device_of(addr, journal_dir, TEACHER)
}

fn device_of(addr: std::net::SocketAddr, journal_dir: &Path, teacher_id: &str) -> QuotaClient {
    let mut config = ClientConfig::new(
        format!("http://{addr}"),
        token("proxy", Role::Service, &[SCHOOL]),
        SCHOOL,
        teacher_id,
        journal_dir,
    );
    // Short waits, so that the retries of a run end quickly; the schedule
    // itself is tested in the client crate.
    config.call_timeout = Duration::from_secs(3);
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(100);
    config.sync_attempts_max = 3;
    QuotaClient::open(config).unwrap()
}

async fn set_up_school(server: &ProcessServer, units: u64) {
    let mut admin = server.admin().await;
    create_school(&mut admin, SCHOOL, units, false).await;
    allocate(&mut admin, SCHOOL, TEACHER, units, "normal")
        .await
        .unwrap();
}

async fn server_used(server: &ProcessServer) -> u64 {
    used_units(&mut server.gate().await, SCHOOL, TEACHER).await
}

fn decided(answer: &ConsumeAnswer) -> &quotad_client::proto::Decision {
    match answer {
        ConsumeAnswer::Decided(decision) => decision,
        other => panic!("expected the server's decision, got {other:?}"),
    }
}

#[tokio::test]
async fn cross_device_a_second_device_sees_the_same_usage_and_remaining_units() {
    let (dir, data) = temp_dir();
    let server = ProcessServer::start(&data, quotad::storage::Durability::Sync);
    set_up_school(&server, 10).await;
    let device_a = device(server.addr, &dir.path().join("device-a"));
    let device_b = device(server.addr, &dir.path().join("device-b"));

    assert!(decided(&device_a.consume(SERVICE, 3, "a-1", "claude").await.unwrap()).allowed);
    assert!(decided(&device_a.consume(SERVICE, 4, "a-2", "claude").await.unwrap()).allowed);

    let seen_by_b = device_b.usage().await.unwrap();
    assert!(seen_by_b.authoritative);
    let service = &seen_by_b.services[0];
    assert_eq!((service.used_units, service.remaining_units), (7, 3));
    assert_eq!(seen_by_b.services, device_a.usage().await.unwrap().services);

    // B cannot exceed the quota A used up: the server decides for both.
    let refused = device_b.consume(SERVICE, 4, "b-1", "claude").await.unwrap();
    assert!(!decided(&refused).allowed);
    assert!(decided(&device_b.consume(SERVICE, 3, "b-2", "claude").await.unwrap()).allowed);
    assert!(!decided(&device_a.consume(SERVICE, 1, "a-3", "claude").await.unwrap()).allowed);
    assert_eq!(server_used(&server).await, 10);
    assert_eq!(device_a.stats().fallback_used, 0);
}

#[tokio::test]
async fn offline_usage_is_journaled_and_reaches_the_server_exactly_once() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 10).await;
    let client = device(addr, &dir.path().join("device"));
    assert!(
        decided(
            &client
                .consume(SERVICE, 2, "online-1", "claude")
                .await
                .unwrap()
        )
        .allowed
    );
    assert!(client.usage().await.unwrap().authoritative);
    server.kill();

    let offline = client
        .consume(SERVICE, 3, "offline-1", "claude")
        .await
        .unwrap();
    assert_eq!(
        offline,
        ConsumeAnswer::RecordedOffline {
            estimated_remaining_units: Some(5)
        }
    );
    assert!(!offline.is_authoritative());
    client
        .consume(SERVICE, 4, "offline-2", "claude")
        .await
        .unwrap();
    let fallback = client.usage().await.unwrap();
    assert!(!fallback.authoritative && fallback.seen_server);
    assert_eq!(fallback.unsynced_events, 2);
    let service = &fallback.services[0];
    assert_eq!(
        (
            service.used_units,
            service.remaining_units,
            service.unsynced_units
        ),
        (9, 1, 7)
    );
    // A run while the server is down keeps everything and says why.
    let failed = client.sync_now().await;
    assert_eq!(failed.still_queued, 2);
    assert!(failed.stopped.is_some());
    assert!(client.stats().sync_retries >= 2);

    let server = ProcessServer::start_at(&data, addr);
    let report = client.sync_now().await;
    assert_eq!(
        (report.accepted, report.duplicates, report.still_queued),
        (2, 0, 0)
    );
    assert_eq!(server_used(&server).await, 9);
    let view = client.usage().await.unwrap();
    assert!(view.authoritative);
    assert_eq!(view.services[0].used_units, 9);
    // Nothing left to send, and a second run changes nothing.
    assert_eq!(client.sync_now().await.accepted, 0);
    assert_eq!(server_used(&server).await, 9);
    let stats = client.stats();
    assert_eq!((stats.synced_events, stats.queued_events), (2, 0));
    assert!(stats.fallback_used >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_consumes_loses_and_doubles_nothing() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 10_000).await;
    let client = device(addr, &dir.path().join("device"));
    let done = Arc::new(AtomicUsize::new(0));
    const TASKS: usize = 8;
    const CONSUMES: usize = 25;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                for n in 0..CONSUMES {
                    let answer = client
                        .consume(SERVICE, 1, &format!("{task}-{n}"), "claude")
                        .await
                        .unwrap();
                    if let ConsumeAnswer::Decided(decision) = &answer {
                        assert!(decision.allowed, "{decision:?}");
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Kill the server while the tasks are in the middle of their run.
    while done.load(Ordering::SeqCst) < TASKS * CONSUMES / 4 {
        tokio::task::yield_now().await;
    }
    server.kill();
    for task in tasks {
        task.await.unwrap();
    }
    let journaled = client.stats().queued_events;
    assert!(journaled > 0, "some consumes ran while the server was down");

    let server = ProcessServer::start_at(&data, addr);
    let report = client.sync_now().await;
    assert_eq!(report.still_queued, 0, "{report:?}");
    assert_eq!(report.rejected, 0, "{report:?}");
    // Acknowledged consumes came back from the WAL, journaled ones from the
    // sync (those that had reached the server before the kill are duplicates).
    assert_eq!(server_used(&server).await, (TASKS * CONSUMES) as u64);
}

#[tokio::test]
async fn a_flush_interrupted_before_the_journal_recorded_it_is_counted_once() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 100).await;
    server.kill();
    let journal_dir = dir.path().join("device");
    let client = device(addr, &journal_dir);
    for n in 0..5 {
        let answer = client
            .consume(SERVICE, 2, &format!("e{n}"), "claude")
            .await
            .unwrap();
        assert!(answer.is_recorded_offline());
    }
    drop(client);
    // The journal as it was when the flush began: if the device dies after
    // the server answered but before the journal noted it, this is what it
    // finds on the next start.
    let before_flush = dir.path().join("before-flush");
    std::fs::create_dir_all(&before_flush).unwrap();
    std::fs::copy(
        journal_dir.join("journal.log"),
        before_flush.join("journal.log"),
    )
    .unwrap();

    let server = ProcessServer::start_at(&data, addr);
    let first = device(addr, &journal_dir).sync_now().await;
    assert_eq!((first.accepted, first.still_queued), (5, 0));
    let restarted = device(addr, &before_flush);
    assert_eq!(restarted.stats().queued_events, 5);
    let again = restarted.sync_now().await;
    assert_eq!(
        (again.accepted, again.duplicates, again.still_queued),
        (0, 5, 0)
    );
    assert_eq!(server_used(&server).await, 10);
}

#[tokio::test]
async fn holds_committed_offline_are_charged_once_whether_the_server_knew_them_or_not() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 100).await;
    let client = device(addr, &dir.path().join("device"));
    let known = client
        .reserve(SERVICE, 5, "r-known", "claude")
        .await
        .unwrap();
    assert!(known.authoritative && known.allowed);
    server.kill();

    // The server holds r-known; r-offline exists only on the device.
    let offline = client
        .reserve(SERVICE, 5, "r-offline", "claude")
        .await
        .unwrap();
    assert!(!offline.authoritative);
    assert!(!client.commit(&known, 6).await.unwrap().is_authoritative());
    assert!(!client.commit(&offline, 7).await.unwrap().is_authoritative());
    assert_eq!(client.stats().queued_events, 2);

    let server = ProcessServer::start_at(&data, addr);
    let report = client.sync_now().await;
    assert_eq!((report.accepted, report.still_queued), (2, 0), "{report:?}");
    let view = usage(&mut server.gate().await, SCHOOL, TEACHER).await;
    let service = &view.services[0];
    assert_eq!((service.used_units, service.reserved_units), (13, 0));
    // Committing the known hold again answers the first result.
    let again = client.commit(&known, 6).await.unwrap();
    assert!(matches!(again, quotad_client::CommitAnswer::Committed(r) if r.duplicate));
    assert_eq!(server_used(&server).await, 13);
}

/// Journals `count` consumes of `units` each through a client whose server
/// is down (nothing listens at a fresh address), then closes it.
async fn journal_offline(journal_dir: &Path, teacher_id: &str, count: usize, units: u64) {
    let client = device_of(free_addr(), journal_dir, teacher_id);
    for n in 0..count {
        let answer = client
            .consume(
                SERVICE,
                units,
                &format!("{teacher_id}-offline-{n}"),
                "claude",
            )
            .await
            .unwrap();
        assert!(answer.is_recorded_offline());
    }
}

#[tokio::test]
async fn a_journaled_commit_the_server_refuses_is_dropped_and_does_not_block_the_rest() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 100).await;
    let client = device(addr, &dir.path().join("device"));
    let hold = client.reserve(SERVICE, 5, "r-bad", "claude").await.unwrap();
    assert!(hold.authoritative);
    server.kill();
    // More units than one call may use: INVALID_ARGUMENT whenever it is replayed.
    assert!(!client
        .commit(&hold, u64::MAX)
        .await
        .unwrap()
        .is_authoritative());
    for n in 0..3 {
        let event = format!("after-{n}");
        assert!(client
            .consume(SERVICE, 2, &event, "claude")
            .await
            .unwrap()
            .is_recorded_offline());
    }

    let server = ProcessServer::start_at(&data, addr);
    let report = client.sync_now().await;
    assert_eq!(
        (
            report.accepted,
            report.rejected,
            report.still_queued,
            report.stopped.as_deref()
        ),
        (3, 1, 0, None),
        "{report:?}"
    );
    assert_eq!(client.stats().rejected_events, 1);
    assert_eq!(server_used(&server).await, 6);
}

#[tokio::test]
async fn a_server_with_a_smaller_batch_limit_still_gets_every_event_once() {
    let (dir, data) = temp_dir();
    let config = dir.path().join("quotad.toml");
    std::fs::write(&config, "sync_events_per_batch_max = 2\n").unwrap();
    let config = config.to_str().unwrap();
    let server = ProcessServer::start_with_args(
        &data,
        quotad::storage::Durability::Sync,
        &["--config", config],
    );
    set_up_school(&server, 100).await;
    let journal_dir = dir.path().join("device");
    journal_offline(&journal_dir, TEACHER, 7, 1).await;

    // The client sends up to 500 events per call; this server takes 2.
    let client = device(server.addr, &journal_dir);
    let report = client.sync_now().await;
    assert_eq!(
        (
            report.accepted,
            report.rejected,
            report.still_queued,
            report.stopped.as_deref()
        ),
        (7, 0, 0, None),
        "{report:?}"
    );
    assert_eq!(server_used(&server).await, 7);
}

#[tokio::test]
async fn a_journal_reopened_as_another_teacher_still_charges_the_teacher_who_used_it() {
    let (dir, data) = temp_dir();
    let server = ProcessServer::start(&data, quotad::storage::Durability::Sync);
    let mut admin = server.admin().await;
    create_school(&mut admin, SCHOOL, 100, false).await;
    for teacher_id in [TEACHER, "t2"] {
        allocate(&mut admin, SCHOOL, teacher_id, 50, "normal")
            .await
            .unwrap();
    }
    let journal_dir = dir.path().join("shared-device");
    journal_offline(&journal_dir, TEACHER, 2, 3).await;

    let second_teacher = device_of(server.addr, &journal_dir, "t2");
    let token = token("proxy", Role::Service, &[SCHOOL]);
    let endpoint = format!("http://{}", server.addr);
    let first_teacher = ClientConfig::new(endpoint, token, SCHOOL, TEACHER, &journal_dir);
    let refused = QuotaClient::open(first_teacher).err().unwrap();
    assert!(
        matches!(refused, ClientError::JournalInUse { .. }),
        "a second client on the same journal is refused: {refused}"
    );
    let report = second_teacher.sync_now().await;
    assert_eq!((report.accepted, report.still_queued), (2, 0), "{report:?}");
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, SCHOOL, TEACHER).await, 6);
    assert_eq!(used_units(&mut gate, SCHOOL, "t2").await, 0);
}

#[tokio::test]
async fn the_background_sync_delivers_offline_usage_exactly_once_when_the_server_comes_back() {
    let (dir, data) = temp_dir();
    let addr = free_addr();
    let server = ProcessServer::start_at(&data, addr);
    set_up_school(&server, 100).await;
    server.kill();
    let client = device(addr, &dir.path().join("device"));
    for n in 0..4 {
        let event = format!("bg-{n}");
        assert!(client
            .consume(SERVICE, 3, &event, "claude")
            .await
            .unwrap()
            .is_recorded_offline());
    }
    let interval = Duration::from_millis(50);
    let background = client.start_background_sync(interval);

    let server = ProcessServer::start_at(&data, addr);
    // Wait (bounded) for the task to flush the journal: no sync_now here.
    for _ in 0..1200 {
        if client.stats().queued_events == 0 {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    assert_eq!(client.stats().queued_events, 0, "{:?}", client.stats());
    // Later runs find nothing to send: the usage stays counted once.
    tokio::time::sleep(interval * 10).await;
    assert!(!background.is_finished(), "the task keeps running");
    background.abort();
    assert_eq!(server_used(&server).await, 12);
    assert_eq!(client.stats().synced_events, 4);
}

#[tokio::test]
async fn a_caller_the_server_refuses_keeps_the_whole_journal_for_a_later_run() {
    let (dir, data) = temp_dir();
    let server = ProcessServer::start(&data, quotad::storage::Durability::Sync);
    set_up_school(&server, 100).await;
    let journal_dir = dir.path().join("device");
    journal_offline(&journal_dir, TEACHER, 3, 2).await;

    // A token for another school: PERMISSION_DENIED is about the caller,
    // not the entries, so nothing is dropped.
    let mut wrong_token = ClientConfig::new(
        format!("http://{}", server.addr),
        token("proxy", Role::Service, &["other-school"]),
        SCHOOL,
        TEACHER,
        &journal_dir,
    );
    wrong_token.sync_attempts_max = 1;
    let refused = QuotaClient::open(wrong_token).unwrap();
    let report = refused.sync_now().await;
    assert_eq!((report.rejected, report.still_queued), (0, 3), "{report:?}");
    assert!(
        report
            .stopped
            .as_deref()
            .unwrap()
            .contains("PermissionDenied"),
        "{report:?}"
    );
    drop(refused);

    let report = device(server.addr, &journal_dir).sync_now().await;
    assert_eq!((report.accepted, report.still_queued), (3, 0), "{report:?}");
    assert_eq!(server_used(&server).await, 6);
}
