//! Snapshots to Postgres and recovery from it, through a real quotad (in
//! this process or as a child process) and the test Postgres.

use std::path::Path;
use std::time::Duration;

use quotad::config::{Config, Secret};
use quotad::proto::*;
use quotad::storage::{Durability, LogStore, SledLog};
use tokio_postgres::Client;

use crate::common::{self, *};
use crate::fresh_database;

/// An in-process quotad that snapshots to `url` every second.
pub(crate) async fn start_server(data_dir: &Path, url: &str) -> TestServer {
    TestServer::start_with(Config {
        data_dir: data_dir.to_path_buf(),
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret(url.into())),
        postgres_snapshot_interval_s: 1,
        snapshot_interval_s: 1,
        ..Config::default()
    })
    .await
}

/// quotad as a child process (so that it can be killed) snapshotting to `url`.
pub(crate) fn process(data_dir: &Path, url: &str) -> ProcessServer {
    ProcessServer::start_with_args(
        data_dir,
        Durability::Sync,
        &[
            "--database-url",
            url,
            "--postgres-snapshot-interval-s",
            "1",
            "--snapshot-interval-s",
            "1",
        ],
    )
}

pub(crate) async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits (up to 30 s) until `sql` returns `expected` (an error, e.g. a table
/// not created yet, counts as not yet).
pub(crate) async fn wait_for(client: &Client, sql: &str, expected: i64) {
    let mut last = None;
    for _ in 0..300 {
        last = client
            .query_one(sql, &[])
            .await
            .ok()
            .map(|row| row.get::<_, i64>(0));
        if last == Some(expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql} is {last:?}, not {expected}, after 30 s");
}

const LAG: &str = "quotad_postgres_snapshot_lag_records";

/// A school "s1" with 1000 units, a slice of 100 for "t1", and `n` consumes
/// of `units` each by t1 (ids `{prefix}0`, `{prefix}1` ...).
pub(crate) async fn school_with_usage(
    admin: &mut AdminClient,
    gate: &mut GateClient,
    n: usize,
    units: u64,
    prefix: &str,
) {
    create_school(admin, "s1", 1000, false).await;
    allocate(admin, "s1", "t1", 100, "normal").await.unwrap();
    consume_n(gate, n, units, prefix).await;
}

/// `n` allowed consumes of `units` each by s1/t1.
pub(crate) async fn consume_n(gate: &mut GateClient, n: usize, units: u64, prefix: &str) {
    for i in 0..n {
        let decision = decide(
            gate,
            common::consume("s1", "t1", units, &format!("{prefix}{i}")),
        )
        .await;
        assert!(decision.allowed, "{prefix}{i}: {decision:?}");
    }
}

pub(crate) async fn snapshot_seq(client: &Client) -> u64 {
    let seq: i64 = count(
        client,
        "SELECT coalesce(max(wal_seq), 0) FROM quotad_snapshot",
    )
    .await;
    seq as u64
}

/// One school, two teachers, some usage, a denial and an admin change.
async fn some_activity(admin: &mut AdminClient, gate: &mut GateClient) {
    create_school(admin, "s1", 1000, false).await;
    allocate(admin, "s1", "t1", 100, "normal").await.unwrap();
    allocate(admin, "s1", "t2", 50, "high").await.unwrap();
    for i in 0..3 {
        let decision = decide(gate, common::consume("s1", "t1", 10, &format!("e{i}"))).await;
        assert!(decision.allowed);
    }
    let decision = decide(gate, common::consume("s1", "t2", 7, "f0")).await;
    assert!(decision.allowed);
    admin
        .set_allocation_status(SetAllocationStatusRequest {
            school_id: "s1".into(),
            teacher_id: "t2".into(),
            service_type: SERVICE.into(),
            status: "suspended".into(),
            changed_by: String::new(),
            reason: "term break".into(),
        })
        .await
        .unwrap();
    let denied = decide(gate, common::consume("s1", "t2", 1, "f1")).await;
    assert!(!denied.allowed);
}

async fn history_len(admin: &mut AdminClient) -> i64 {
    let page = admin
        .list_history(ListHistoryRequest {
            school_id: "s1".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    page.entries.len() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_fills_the_report_tables_and_the_usage_log() {
    let (db, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = start_server(&data, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    some_activity(&mut admin, &mut gate).await;
    let history = history_len(&mut admin).await;

    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 5).await;
    wait_for(&db, "SELECT count(*) FROM ai_allocation_history", history).await;
    let pool = db
        .query_one(
            "SELECT cycle_units, allocated_units, used_units, tier, school_name
               FROM school_ai_subscriptions WHERE school_id = 's1' AND service_type = $1",
            &[&SERVICE],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            pool.get::<_, i64>(0),
            pool.get::<_, i64>(1),
            pool.get::<_, i64>(2)
        ),
        (1000, 150, 37)
    );
    assert_eq!(
        (pool.get::<_, String>(3), pool.get::<_, String>(4)),
        ("k12".to_string(), "School s1".to_string())
    );
    let t2 = db
        .query_one(
            "SELECT allocated_units, used_units, priority, status FROM teacher_ai_allocations
              WHERE school_id = 's1' AND teacher_id = 't2'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            t2.get::<_, i64>(0),
            t2.get::<_, i64>(1),
            t2.get::<_, String>(2),
            t2.get::<_, String>(3)
        ),
        (50, 7, "high".into(), "suspended".into())
    );
    let decisions: Vec<(String, i64)> = db
        .query(
            "SELECT decision, sum(units)::bigint FROM ai_usage_logs GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        decisions,
        [("allowed".to_string(), 37), ("suspended".to_string(), 0)]
    );
    assert_eq!(
        count(
            &db,
            "SELECT sum(units)::bigint FROM ai_usage_daily WHERE school_id = 's1'"
        )
        .await,
        37
    );
    let model: String = db
        .query_one("SELECT model FROM ai_usage_logs WHERE event_id = 'e0'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(model, "claude");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_after_a_restart_equals_usage_before_from_sled_or_from_postgres() {
    let (db, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = start_server(&data, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    some_activity(&mut admin, &mut gate).await;
    let before = (
        usage(&mut gate, "s1", "t1").await,
        usage(&mut gate, "s1", "t2").await,
        school(&mut admin, "s1").await,
        history_len(&mut admin).await,
    );
    // A graceful stop writes the last changes to Postgres too.
    server.stop().await;
    assert!(snapshot_seq(&db).await > 0);

    // From the data directory (Postgres also holds it).
    let server = start_server(&data, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    let from_sled = (
        usage(&mut gate, "s1", "t1").await,
        usage(&mut gate, "s1", "t2").await,
        school(&mut admin, "s1").await,
        history_len(&mut admin).await,
    );
    assert_eq!(from_sled, before);
    server.stop().await;

    // From Postgres alone: a new node with an empty data directory.
    let (_dir2, empty) = temp_dir();
    let server = start_server(&empty, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    let from_postgres = (
        usage(&mut gate, "s1", "t1").await,
        usage(&mut gate, "s1", "t2").await,
        school(&mut admin, "s1").await,
        history_len(&mut admin).await,
    );
    assert_eq!(from_postgres, before);
    // The ids seen and the audit chain came along.
    let retry = decide(&mut gate, common::consume("s1", "t1", 10, "e0")).await;
    assert!(
        retry.duplicate,
        "an event counted before the move is a duplicate"
    );
    let verified = admin
        .verify_history(VerifyHistoryRequest {
            school_id: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{verified:?}");
    // The new node carries on from the snapshot's position.
    assert!(
        decide(&mut gate, common::consume("s1", "t1", 5, "e-new"))
            .await
            .allowed
    );
    server.stop().await;
    let server = start_server(&empty, &url).await;
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 35);
    server.stop().await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_fails_the_wal_keeps_everything_and_wins_on_restart() {
    let (db, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = process(&data, &url);
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    school_with_usage(&mut admin, &mut gate, 5, 1, "a").await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 5).await;

    // Every snapshot now fails; consumes go on and are acknowledged.
    db.batch_execute("ALTER TABLE ai_usage_logs RENAME TO ai_usage_logs_away")
        .await
        .unwrap();
    let behind = snapshot_seq(&db).await;
    consume_n(&mut gate, 5, 2, "b").await;
    // Long enough for local snapshots (every second) to have run and failed
    // Postgres snapshots to have been retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshot_seq(&db).await, behind, "no snapshot can commit");
    server.kill();

    // The WAL was not truncated past what Postgres holds.
    {
        let store = SledLog::open(&data).unwrap();
        let kept = store.read_after(behind).unwrap();
        assert_eq!(kept.first().map(|(seq, _)| *seq), Some(behind + 1));
        assert!(
            kept.len() >= 5,
            "the 5 unsnapshotted consumes are in the WAL"
        );
    }

    // Postgres is back: the restart uses the WAL after the snapshot and
    // catches Postgres up.
    db.batch_execute("ALTER TABLE ai_usage_logs_away RENAME TO ai_usage_logs")
        .await
        .unwrap();
    let server = process(&data, &url);
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 15);
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 10).await;
    wait_for(
        &db,
        "SELECT used_units FROM teacher_ai_allocations WHERE teacher_id = 't1'",
        15,
    )
    .await;
    server.kill();

    // And Postgres alone now holds all of it.
    let (_dir2, empty) = temp_dir();
    let server = process(&empty, &url);
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 15);
}

/// Polls a gauge (up to 5 s) until `done` holds for it; returns the last value.
async fn wait_for_gauge(addr: std::net::SocketAddr, name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let mut value = f64::NAN;
    for _ in 0..50 {
        value = scrape(addr)
            .await
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0);
        if done(value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_postgres_does_not_stop_consumes_and_the_lag_shows() {
    let (db, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = start_server(&data, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s1", 1000, false).await;
    allocate(&mut admin, "s1", "t1", 500, "normal")
        .await
        .unwrap();
    wait_for(&db, "SELECT count(*) FROM teacher_ai_allocations", 1).await;

    // A transaction holds a lock every snapshot needs: the writer waits on it.
    let mut locker = quotad::postgres::connect(&url).await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE quotad_snapshot IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for i in 0..200 {
        let decision = decide(&mut gate, common::consume("s1", "t1", 1, &format!("c{i}"))).await;
        assert!(decision.allowed, "consume {i} while Postgres is stuck");
    }
    // The lag is reported (refreshed every snapshot interval).
    let lag = wait_for_gauge(server.metrics_addr, LAG, |lag| lag >= 200.0).await;
    assert!(lag >= 200.0, "lag {lag}");

    lock.rollback().await.unwrap();
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 200).await;
    let lag = wait_for_gauge(server.metrics_addr, LAG, |lag| lag == 0.0).await;
    assert_eq!(lag, 0.0);
    server.stop().await;
}

/// A TCP proxy in front of the test Postgres that the test switches on and
/// off: while off, every connection is closed at once, as a Postgres that is
/// down (or unreachable) would look to quotad.
pub(crate) struct Switch {
    pub(crate) url: String,
    pub(crate) on: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub(crate) async fn proxy_to(url: &str) -> Switch {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (head, rest) = url.split_once('@').expect("user@host in the URL");
    let (target, db) = rest.split_once('/').expect("host:port/db in the URL");
    let target = target.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let on = std::sync::Arc::new(AtomicBool::new(false));
    let switch = on.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !switch.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Switch {
        url: format!("{head}@{addr}/{db}"),
        on,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotad_starts_while_postgres_is_down_and_catches_it_up_when_it_answers() {
    use std::sync::atomic::Ordering;
    let (db, url) = fresh_database().await;
    let postgres = proxy_to(&url).await;
    let (_dir, data) = temp_dir();

    // With nothing on disk and Postgres down there is no state to serve.
    let config = Config {
        data_dir: data.clone(),
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret(postgres.url.clone())),
        ..Config::default()
    };
    let listeners = quotad::server::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
        rls: None,
    };
    let refused = quotad::server::serve(listeners, config, std::future::pending()).await;
    let message = refused.expect_err("no state to start from").to_string();
    assert!(message.contains("does not answer"), "{message}");

    // Some state in the data directory, from a run without Postgres.
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    school_with_usage(&mut admin, &mut gate, 5, 1, "a").await;
    server.stop().await;

    // Postgres down: quotad serves from the data directory.
    let server = start_server(&data, &postgres.url).await;
    let mut gate = server.gate().await;
    consume_n(&mut gate, 5, 2, "b").await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 15);

    // Postgres answers: it is migrated and caught up. The usage log gets the
    // records still in the WAL: the 5 of this run (the run without Postgres
    // truncated its own at its last local snapshot; their units are in the
    // state, so in the allocation rows).
    postgres.on.store(true, Ordering::SeqCst);
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 5).await;
    wait_for(
        &db,
        "SELECT used_units FROM teacher_ai_allocations WHERE teacher_id = 't1'",
        15,
    )
    .await;
    server.stop().await;

    let (_dir2, empty) = temp_dir();
    let server = start_server(&empty, &postgres.url).await;
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 15);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_consumes_and_retries_reach_the_usage_log_once_each() {
    let (db, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = start_server(&data, &url).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "s1", 10_000, false).await;
    for t in 0..8 {
        allocate(&mut admin, "s1", &format!("t{t}"), 300, "normal")
            .await
            .unwrap();
    }
    // 32 tasks, 4 per teacher, each sending 40 consumes of 1..=3 units, every
    // one of them twice (a retry), while snapshots run every second.
    let tasks: Vec<_> = (0..32)
        .map(|task| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut gate = clients_as(addr, &admin_token()).await.1;
                let teacher = format!("t{}", task % 8);
                let mut allowed_units = 0;
                for i in 0..40u64 {
                    let request =
                        common::consume("s1", &teacher, 1 + i % 3, &format!("{task}-{i}"));
                    let first = decide(&mut gate, request.clone()).await;
                    let retry = decide(&mut gate, request).await;
                    assert!(retry.duplicate);
                    assert_eq!(first.allowed, retry.allowed);
                    if first.allowed {
                        allowed_units += 1 + i % 3;
                    }
                }
                allowed_units
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    let mut gate = server.gate().await;
    let mut used = 0;
    for t in 0..8 {
        used += used_units(&mut gate, "s1", &format!("t{t}")).await;
    }
    assert_eq!(used, allowed);
    server.stop().await;

    assert_eq!(
        count(
            &db,
            "SELECT coalesce(sum(units), 0)::bigint FROM ai_usage_logs"
        )
        .await,
        allowed as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT event_id FROM ai_usage_logs GROUP BY event_id HAVING count(*) > 1) d"
        )
        .await,
        0,
        "no event is logged twice"
    );
    assert_eq!(
        count(
            &db,
            "SELECT sum(used_units)::bigint FROM teacher_ai_allocations"
        )
        .await,
        allowed as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quotad_recovering_from_postgres_takes_over_and_the_one_it_supersedes_writes_nothing_more(
) {
    let (db, url) = fresh_database().await;
    let (_dir_a, data_a) = temp_dir();
    let a = start_server(&data_a, &url).await;
    let (mut admin, mut gate_a) = (a.admin().await, a.gate().await);
    school_with_usage(&mut admin, &mut gate_a, 3, 1, "a").await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 3).await;

    // B starts from Postgres (its data directory is empty) while A runs on:
    // it takes the history up at a new epoch, and A's snapshots are fenced.
    let (_dir_b, data_b) = temp_dir();
    let b = start_server(&data_b, &url).await;
    let fenced_at = snapshot_seq(&db).await;
    let mut gate_b = b.gate().await;
    assert_eq!(
        count(&db, "SELECT epoch FROM quotad_snapshot").await,
        2,
        "B's recovery is epoch 2"
    );
    consume_n(&mut gate_a, 2, 1, "a-after-b-").await;
    assert!(
        decide(&mut gate_b, common::consume("s1", "t1", 1, "from-b"))
            .await
            .allowed
    );
    wait_for(
        &db,
        "SELECT count(*) FROM ai_usage_logs WHERE event_id = 'from-b'",
        1,
    )
    .await;

    // A's snapshots are refused (it keeps serving); B's go on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    consume_n(&mut gate_b, 1, 1, "b-again-").await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 5).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ai_usage_logs WHERE event_id LIKE 'a-after-b-%'"
        )
        .await,
        0,
        "the superseded writer wrote nothing"
    );
    b.stop().await;
    a.stop().await;
    // A's WAL kept what Postgres never got from it.
    let store = SledLog::open(&data_a).unwrap();
    let kept = store.read_after(fenced_at).unwrap();
    assert!(
        kept.len() >= 2,
        "A's WAL after {fenced_at}: {} records",
        kept.len()
    );
}
