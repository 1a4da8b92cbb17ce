//! History identity and epochs through real quotad processes and the test
//! Postgres. Finding 2 of issue 10: a data directory whose old disk comes
//! back after another node recovered from Postgres and went on is further
//! along in WAL positions, and must still not win over Postgres.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use quotad::config::{Config, Secret};
use quotad::storage::history::{self, History, HistoryPosition};
use quotad::storage::{recover, Durability, LogStore, SledLog};
use tokio_postgres::Client;

use crate::common::{self, *};
use crate::fresh_database;
use crate::snapshots::{
    consume_n, count, process, proxy_to, school_with_usage, snapshot_seq, start_server, wait_for,
};

/// Like [`process`], with more flags.
fn process_with(data_dir: &Path, url: &str, extra: &[&str]) -> ProcessServer {
    let mut args = vec![
        "--database-url",
        url,
        "--postgres-snapshot-interval-s",
        "1",
        "--snapshot-interval-s",
        "1",
    ];
    args.extend_from_slice(extra);
    ProcessServer::start_with_args(data_dir, Durability::Sync, &args)
}

/// Runs `quotad serve` on `data_dir` and waits (up to 30 s) for it to exit,
/// as it must when it refuses the directory; its status and stderr.
fn start_expecting_refusal(data_dir: &Path, url: &str) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--no-rls",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--database-url", url])
        .env("QUOTAD_LOG", "warn")
        .env("QUOTAD_AUTH_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the quotad binary");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "quotad started on {} instead of refusing it",
                data_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// What the data directory holds: its history record and WAL position. It
/// must not be in use.
fn local_position(data_dir: &Path) -> HistoryPosition {
    let store = SledLog::open(data_dir).unwrap();
    HistoryPosition {
        history: history::read(&store).unwrap(),
        wal_seq: recover(&store).unwrap().last_seq,
    }
}

async fn postgres_history(db: &Client) -> History {
    let row = db
        .query_one("SELECT history_id, epoch FROM quotad_snapshot", &[])
        .await
        .unwrap();
    History {
        id: history::HistoryId::parse(row.get(0)).expect("a history id in Postgres"),
        epoch: row.get::<_, i64>(1) as u64,
    }
}

/// Everything a recovery reads from Postgres, and the report rows, in one
/// string: equal strings, equal contents.
async fn postgres_contents(db: &Client) -> String {
    let queries = [
        "SELECT wal_seq || ' ' || writer || ' ' || history_id || ' ' || epoch FROM quotad_snapshot",
        "SELECT coalesce(md5(string_agg(school_id || encode(state, 'hex'), ',' ORDER BY school_id)), '')
           FROM quotad_school_state",
        "SELECT coalesce(md5(string_agg(school_id || teacher_id || encode(state, 'hex'), ','
                ORDER BY school_id, teacher_id)), '') FROM quotad_account_state",
        "SELECT coalesce(string_agg(teacher_id || '=' || used_units, ',' ORDER BY teacher_id), '')
           FROM teacher_ai_allocations",
        "SELECT count(*) || ' ' || coalesce(max(wal_seq), 0) FROM ai_usage_logs",
        "SELECT count(*)::text FROM ai_allocation_history",
    ];
    let mut contents = Vec::new();
    for sql in queries {
        contents.push(db.query_one(sql, &[]).await.unwrap().get::<_, String>(0));
    }
    contents.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_an_old_disk_that_comes_back_after_another_node_recovered_is_refused() {
    let (db, url) = fresh_database().await;
    let (_root, root) = temp_dir();
    let (dir_a, old_a, dir_b) = (root.join("a"), root.join("a-old"), root.join("b"));

    // Node A: 5 acknowledged consumes of 1 unit, in Postgres.
    let a = process(&dir_a, &url);
    let (mut admin, mut gate) = (a.admin().await, a.gate().await);
    school_with_usage(&mut admin, &mut gate, 5, 1, "a").await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 5).await;
    let first = postgres_history(&db).await;
    assert_eq!(first.epoch, 1, "a new history starts at epoch 1");
    // Then 10 more, acknowledged, that Postgres never gets (its snapshots
    // fail meanwhile), and A is SIGKILLed: its disk is further along than
    // Postgres, and stays so.
    db.batch_execute("ALTER TABLE ai_usage_logs RENAME TO ai_usage_logs_away")
        .await
        .unwrap();
    consume_n(&mut gate, 10, 1, "a-late-").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill();
    db.batch_execute("ALTER TABLE ai_usage_logs_away RENAME TO ai_usage_logs")
        .await
        .unwrap();
    copy_dir(&dir_a, &old_a);

    // Node B, empty: recovers from Postgres (5 units), a new epoch, and goes
    // on with 3 consumes of 10 units, which reach Postgres.
    let b = process(&dir_b, &url);
    let mut gate = b.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 5);
    consume_n(&mut gate, 3, 10, "b-").await;
    wait_for(&db, "SELECT count(*) FROM ai_usage_logs", 8).await;
    wait_for(
        &db,
        "SELECT used_units FROM teacher_ai_allocations WHERE teacher_id = 't1'",
        35,
    )
    .await;
    b.kill();
    let second = postgres_history(&db).await;
    assert_eq!(
        second,
        first.next(),
        "B's recovery is the history's next epoch"
    );
    let postgres_seq = snapshot_seq(&db).await;
    let before = postgres_contents(&db).await;

    // A's old disk: further along (positions alone would let it win and
    // write its 15 units over B's 35), of the older epoch. Refused.
    let old = local_position(&old_a);
    assert_eq!(old.history, Some(first));
    assert!(old.wal_seq > postgres_seq, "{old} vs {postgres_seq}");
    let (status, stderr) = start_expecting_refusal(&old_a, &url);
    assert!(!status.success(), "{status}: {stderr}");
    for named in [
        old.to_string(),
        format!("{second} at WAL position {postgres_seq}"),
        "--recover-from postgres".to_string(),
    ] {
        assert!(stderr.contains(&named), "{named:?} is not in: {stderr}");
    }
    assert_eq!(
        postgres_contents(&db).await,
        before,
        "Postgres is untouched"
    );

    // With the operator's flag, A's old disk is discarded and recovered from
    // Postgres: B's state, at the next epoch; A writes from now on.
    let a = process_with(&old_a, &url, &["--recover-from", "postgres"]);
    let mut gate = a.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 35);
    let again = decide(&mut gate, common::consume("s1", "t1", 10, "b-0")).await;
    assert!(again.duplicate, "B's events came along: {again:?}");
    assert_eq!(postgres_history(&db).await, second.next());
    consume_n(&mut gate, 1, 1, "a-recovered-").await;
    wait_for(
        &db,
        "SELECT used_units FROM teacher_ai_allocations WHERE teacher_id = 't1'",
        36,
    )
    .await;
    // An acknowledged consume, then SIGKILL: leaving the flag set discards
    // nothing at the next start (the directory is Postgres's epoch now).
    consume_n(&mut gate, 1, 1, "a-last-").await;
    a.kill();
    let a = process_with(&old_a, &url, &["--recover-from", "postgres"]);
    let mut gate = a.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 37);
    assert_eq!(postgres_history(&db).await, second.next(), "no new epoch");
    wait_for(
        &db,
        "SELECT used_units FROM teacher_ai_allocations WHERE teacher_id = 't1'",
        37,
    )
    .await;
    a.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_a_data_directory_of_another_history_is_refused_and_postgres_keeps_its_own() {
    let (db, url) = fresh_database().await;
    let (_dir_x, data_x) = temp_dir();
    let x = start_server(&data_x, &url).await;
    let (mut admin, mut gate) = (x.admin().await, x.gate().await);
    school_with_usage(&mut admin, &mut gate, 2, 1, "x").await;
    x.stop().await;
    let theirs = postgres_history(&db).await;
    let before = postgres_contents(&db).await;

    // A directory that began its own history without Postgres, further along.
    let (_dir_y, data_y) = temp_dir();
    let y = TestServer::start(&data_y).await;
    let (mut admin, mut gate) = (y.admin().await, y.gate().await);
    school_with_usage(&mut admin, &mut gate, 9, 1, "y").await;
    y.stop().await;
    let ours = local_position(&data_y);
    assert_ne!(ours.history.map(|h| h.id), Some(theirs.id));

    let config = Config {
        data_dir: data_y.clone(),
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret(url.clone())),
        ..Config::default()
    };
    let listeners = quotad::server::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
        rls: None,
    };
    let refused = quotad::server::serve(listeners, config, std::future::pending()).await;
    let message = refused.expect_err("another history").to_string();
    for named in [
        ours.to_string(),
        theirs.to_string(),
        "different histories".into(),
    ] {
        assert!(message.contains(&named), "{named:?} is not in: {message}");
    }
    assert_eq!(
        postgres_contents(&db).await,
        before,
        "Postgres is untouched"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM ai_usage_logs").await, 2);
    assert_eq!(local_position(&data_y), ours, "nor is the directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_an_old_disk_served_while_postgres_was_down_never_writes_to_it() {
    use std::sync::atomic::Ordering;
    let (db, url) = fresh_database().await;
    let postgres = proxy_to(&url).await;
    let (_root, root) = temp_dir();
    let (dir_x, old_x, dir_y) = (root.join("x"), root.join("x-old"), root.join("y"));
    let x = start_server(&dir_x, &url).await;
    let (mut admin, mut gate) = (x.admin().await, x.gate().await);
    school_with_usage(&mut admin, &mut gate, 3, 1, "x").await;
    x.stop().await;
    copy_dir(&dir_x, &old_x);
    // Y recovers from Postgres (epoch 2) and goes on.
    let y = start_server(&dir_y, &url).await;
    let mut gate = y.gate().await;
    consume_n(&mut gate, 2, 5, "y-").await;
    y.stop().await;
    let before = postgres_contents(&db).await;

    // X's old disk starts while Postgres does not answer: quotad cannot
    // tell, and serves it (as it serves any directory then). It goes further
    // along than Postgres, which on position alone would let it win.
    let x = start_server(&old_x, &postgres.url).await;
    let mut gate = x.gate().await;
    assert_eq!(used_units(&mut gate, "s1", "t1").await, 3);
    consume_n(&mut gate, 4, 1, "x-stale-").await;
    // Postgres answers: the writer finds an older epoch and writes nothing.
    postgres.on.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    consume_n(&mut gate, 2, 1, "x-stale-later-").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        postgres_contents(&db).await,
        before,
        "Postgres is untouched"
    );
    x.stop().await;
    assert_eq!(
        postgres_contents(&db).await,
        before,
        "even by the final snapshot"
    );
    let stale = local_position(&old_x);
    assert!(stale.wal_seq > snapshot_seq(&db).await, "{stale}");
    // Its WAL was not truncated: the stale consumes are all still there.
    let kept = SledLog::open(&old_x).unwrap();
    let records = kept.read_after(0).unwrap();
    assert!(records.len() >= 6, "{} records kept", records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_recovering_from_postgres_needs_postgres_to_answer() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    school_with_usage(&mut admin, &mut gate, 1, 1, "a").await;
    server.stop().await;
    let config = Config {
        data_dir: data.clone(),
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret("postgres://quotad@127.0.0.1:1/none".into())),
        recover_from: history::RecoverFrom::Postgres,
        ..Config::default()
    };
    let listeners = quotad::server::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
        rls: None,
    };
    let refused = quotad::server::serve(listeners, config, std::future::pending()).await;
    let message = refused.expect_err("nothing to recover from").to_string();
    assert!(message.contains("does not answer"), "{message}");
}
