//! A crash restart, a graceful stop, then a start while Postgres is down: the
//! data directory alone must hold every acknowledged consume. The WAL is
//! truncated through what both the local snapshot and Postgres hold, so a
//! local snapshot position that was never written would let Postgres's
//! position drop records that only the WAL had.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quotad::storage::Durability;
use tokio_postgres::Client;

use crate::common::*;
use crate::fresh_database;
use crate::load::*;
use crate::snapshots::proxy_to;

/// quotad snapshotting to Postgres (at `url`) every second; the local
/// snapshot is left to the graceful stop, so that Postgres is ahead of it.
fn start(data: &Path, url: &str) -> ProcessServer {
    ProcessServer::start_with_args(
        data,
        Durability::Sync,
        &[
            "--database-url",
            url,
            "--postgres-snapshot-interval-s",
            "1",
            "--snapshot-interval-s",
            "3600",
        ],
    )
}

/// Waits (up to 30 s) until Postgres's allocation rows hold `used` units.
async fn wait_for_postgres_usage(db: &Client, used: u64) {
    let sql = "SELECT coalesce(sum(used_units), 0)::bigint FROM teacher_ai_allocations";
    let mut last = None;
    for _ in 0..300 {
        last = db
            .query_one(sql, &[])
            .await
            .ok()
            .map(|r| r.get::<_, i64>(0));
        if last == Some(used as i64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Postgres holds {last:?} units used, not {used}, after 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_restart_and_a_sigterm_then_a_start_with_postgres_down_keeps_every_consume() {
    let (_db, url) = fresh_database().await;
    let postgres = proxy_to(&url).await;
    postgres.on.store(true, Ordering::SeqCst);
    let (_dir, data) = temp_dir();
    let server = start(&data, &postgres.url);
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(2000)).await;

    // Postgres answers the restart, which catches it up; then a graceful stop.
    terminate(start(&data, &postgres.url)).await;

    // Postgres is down: the data directory is all there is.
    postgres.on.store(false, Ordering::SeqCst);
    let mut server = start(&data, &postgres.url);
    wait_answering(&mut server).await;
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_coming_back_between_a_crash_restart_and_a_sigterm_drops_nothing_from_the_wal() {
    let (db, url) = fresh_database().await;
    let postgres = proxy_to(&url).await;
    postgres.on.store(true, Ordering::SeqCst);
    let (_dir, data) = temp_dir();
    let server = start(&data, &postgres.url);
    set_up_school(&server).await;
    let load = consume_until_killed(server, Duration::from_millis(2000)).await;

    // The restart finds Postgres down and serves from the data directory;
    // Postgres comes back and is caught up (reads only meanwhile).
    postgres.on.store(false, Ordering::SeqCst);
    let mut server = start(&data, &postgres.url);
    wait_answering(&mut server).await;
    let used = used_by_teacher(&mut server.gate().await).await.unwrap();
    postgres.on.store(true, Ordering::SeqCst);
    wait_for_postgres_usage(&db, used).await;
    terminate(server).await;

    postgres.on.store(false, Ordering::SeqCst);
    let mut server = start(&data, &postgres.url);
    wait_answering(&mut server).await;
    assert_every_acknowledged_consume_is_kept(&server, &load).await;
}
