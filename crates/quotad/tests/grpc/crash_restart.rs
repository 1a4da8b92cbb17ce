//! SIGKILL under load, a restart that replays the WAL, then a graceful stop
//! (SIGTERM) soon after: the stop must not drop the replayed records. The
//! state they rebuilt exists only in memory and in the WAL until a snapshot
//! holds it, so the WAL may be truncated only through a snapshot written
//! after the restart.

use std::time::Duration;

use quotad::storage::Durability;

use crate::common::*;
use crate::load::*;

/// Local snapshots every `interval_s`; Sync durability.
fn start(data: &std::path::Path, interval_s: &str) -> ProcessServer {
    ProcessServer::start_with_args(
        data,
        Durability::Sync,
        &["--snapshot-interval-s", interval_s],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigterm_right_after_a_crash_restart_keeps_every_acknowledged_consume() {
    let (_dir, data) = temp_dir();
    let server = start(&data, "3600");
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(700)).await;

    // The restart replays the WAL; nothing changes before the SIGTERM.
    terminate(start(&data, "3600")).await;

    let server = start(&data, "3600");
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}

/// The SIGTERM comes as soon as quotad says it listens, which it does before
/// recovering: the stop waits for the replay, then stops gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigterm_during_a_crash_restarts_recovery_stops_it_gracefully_and_keeps_everything() {
    let (_dir, data) = temp_dir();
    let server = start(&data, "3600");
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(700)).await;

    terminate_now(start(&data, "3600")).await;

    let server = start(&data, "3600");
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_between_a_crash_restart_and_a_sigterm_keep_every_acknowledged_consume() {
    let (_dir, data) = temp_dir();
    let server = start(&data, "3600");
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(700)).await;

    // GetUsage and Check write no record: the state is still only the replay's.
    let server = start(&data, "3600");
    read_only_calls(&server).await;
    terminate(server).await;

    let server = start(&data, "3600");
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}

/// With snapshots every second, the load leaves a snapshot behind the last
/// acknowledged consume; after the restart the interval passes (idle) before
/// the SIGTERM, so a periodic snapshot has its chance too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idling_past_the_snapshot_interval_after_a_crash_restart_keeps_every_acknowledged_consume()
{
    let (_dir, data) = temp_dir();
    let server = start(&data, "1");
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(1500)).await;

    let server = start(&data, "1");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    terminate(server).await;

    let server = start(&data, "1");
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}

/// And a second crash right after the graceful stop's restart: whatever the
/// stop wrote or truncated, a kill -9 of the next run loses nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_a_crash_restart_and_a_sigterm_keeps_every_acknowledged_consume() {
    let (_dir, data) = temp_dir();
    let server = start(&data, "1");
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(1500)).await;

    terminate(start(&data, "1")).await;
    start(&data, "1").kill();

    let server = start(&data, "1");
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}
