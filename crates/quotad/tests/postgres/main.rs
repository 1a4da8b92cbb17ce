//! The Postgres schema against a real Postgres: the one `scripts/test` starts
//! (or any named by QUOTAD_TEST_DATABASE_URL). Each test gets a database of
//! its own. Without a Postgres these tests fail and say why; they never skip.

use common::fresh_database;
use quotad::postgres::{connect, migrate, MIGRATIONS};
use tokio_postgres::Client;

mod analytics;
/// The gRPC tests' server and client helpers.
#[allow(dead_code)]
#[path = "../grpc/common.rs"]
mod common;
mod crash_restart;
mod history;
/// Load and checks shared with the gRPC crash-restart tests.
#[allow(dead_code)]
#[path = "../grpc/load.rs"]
mod load;
mod snapshots;
mod tls;

async fn relations(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_create_the_original_tables_and_the_rollup_views_once() {
    let (mut client, _) = fresh_database().await;
    let applied = migrate(&mut client).await.unwrap();
    assert_eq!(
        applied,
        MIGRATIONS.iter().map(|(v, _, _)| *v).collect::<Vec<_>>()
    );
    assert_eq!(
        relations(&client).await,
        [
            "ai_allocation_history",
            "ai_allocation_requests",
            "ai_usage_daily",
            "ai_usage_logs",
            "ai_usage_monthly",
            "quotad_account_state",
            "quotad_schema_migrations",
            "quotad_school_state",
            "quotad_snapshot",
            "school_ai_subscriptions",
            "teacher_ai_allocations",
        ]
    );
    assert!(
        migrate(&mut client).await.unwrap().is_empty(),
        "a second run applies nothing"
    );
}

#[tokio::test]
async fn two_quotads_migrating_at_once_apply_each_migration_once() {
    let (_, url) = fresh_database().await;
    let run = |url: String| async move {
        let mut client = connect(&url).await.unwrap();
        migrate(&mut client).await.unwrap()
    };
    let (a, b) = tokio::join!(run(url.clone()), run(url.clone()));
    assert_eq!(a.len() + b.len(), MIGRATIONS.len(), "{a:?} and {b:?}");
}

#[tokio::test]
async fn the_audit_table_only_grows() {
    let (mut client, _) = fresh_database().await;
    migrate(&mut client).await.unwrap();
    client
        .execute(
            "INSERT INTO ai_allocation_history
                 (school_id, seq, at, actor, action, reason, before, after, prev_hash, hash)
             VALUES ('oak', 1, now(), 'pa', 'pool_set', 'bought', '{}', '{\"cycle_units\": \"10\"}',
                     decode(repeat('00', 32), 'hex'), decode(repeat('ab', 32), 'hex'))",
            &[],
        )
        .await
        .unwrap();
    for statement in [
        "UPDATE ai_allocation_history SET actor = 'someone else'",
        "DELETE FROM ai_allocation_history",
        "TRUNCATE ai_allocation_history",
    ] {
        let refused = client.batch_execute(statement).await.unwrap_err();
        let message = refused
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("append-only"), "{statement}: {refused}");
    }
    let count: i64 = client
        .query_one("SELECT count(*) FROM ai_allocation_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn the_rollups_sum_charged_usage_per_day_and_month() {
    let (mut client, _) = fresh_database().await;
    migrate(&mut client).await.unwrap();
    let rows = [
        (1, "e1", 5, "allowed", "2026-11-02 09:00:00+00"),
        (2, "e2", 7, "allowed", "2026-11-02 23:59:59+00"),
        (3, "e3", 100, "exhausted", "2026-11-02 10:00:00+00"),
        (4, "e4", 3, "committed", "2026-11-03 00:00:00+00"),
        (5, "e5", 11, "allowed", "2026-12-01 00:00:00+00"),
    ];
    for (seq, event, units, decision, at) in rows {
        client
            .execute(
                "INSERT INTO ai_usage_logs (wal_seq, event_id, school_id, teacher_id, service_type, units,
                     decision, cycle_start, occurred_at, recorded_at)
                 VALUES ($1, $2, 'oak', 'ms-lee', 'claude_messages', $3, $4,
                         '2026-11-01 00:00:00+00', $5::text::timestamptz, now())",
                &[&(seq as i64), &event, &(units as i64), &decision, &at],
            )
            .await
            .unwrap();
    }
    let daily: Vec<(String, i64, i64)> = client
        .query(
            "SELECT day::text, units, events FROM ai_usage_daily ORDER BY day",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        daily,
        [
            ("2026-11-02".to_string(), 12, 2),
            ("2026-11-03".to_string(), 3, 1),
            ("2026-12-01".to_string(), 11, 1)
        ]
    );
    let monthly: Vec<(String, i64)> = client
        .query(
            "SELECT month::text, units FROM ai_usage_monthly ORDER BY month",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        monthly,
        [
            ("2026-11-01".to_string(), 15),
            ("2026-12-01".to_string(), 11)
        ]
    );
    // One row per WAL position: a snapshot written twice cannot count twice.
    // (An event id repeats legitimately once the idempotency window has passed.)
    let duplicate = client
        .execute(
            "INSERT INTO ai_usage_logs (wal_seq, event_id, school_id, teacher_id, service_type, units,
                 decision, cycle_start, occurred_at, recorded_at)
             SELECT wal_seq, event_id, school_id, teacher_id, service_type, units, decision,
                    cycle_start, occurred_at, recorded_at
               FROM ai_usage_logs LIMIT 1",
            &[],
        )
        .await;
    assert!(duplicate.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotad_migrate_applies_the_schema_and_says_so() {
    let (_, url) = fresh_database().await;
    let run = |url: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
                .args(["migrate", "--database-url", &url])
                .env("QUOTAD_LOG", "warn")
                .output()
                .unwrap()
        })
    };
    let first = run(url.clone()).await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migrations [1, 2, 3, 4]"));
    let second = run(url).await.unwrap();
    assert!(String::from_utf8_lossy(&second.stdout).contains("up to date"));
    let unreachable = run("postgres://postgres@127.0.0.1:1/none".into())
        .await
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot connect to Postgres"));
}
