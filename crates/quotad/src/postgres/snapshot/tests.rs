use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

use super::fence::{fence, Fence, Found};
use super::usage::write_usage;
use super::writer::{Writer, BACKOFF_FIRST};
use super::Shared;
use crate::config::Secret;
use crate::postgres::rows::{Delta, UsageRow};
use crate::postgres::{connect, PostgresError};
use crate::storage::history::{History, HistoryId};
use crate::storage::{codec, LogStore, MemoryLog};
use quotad_core::Record;
use quotad_core::{EventId, SchoolId, ServiceType, TeacherId, Usage, UsageSource};

fn history(epoch: u64) -> History {
    History {
        id: HistoryId::parse(&"ab".repeat(16)).unwrap(),
        epoch,
    }
}

/// A `quotad_snapshot` row at `wal_seq`, of epoch 2 of the test history.
fn found(wal_seq: u64, written_by_us: bool) -> Found {
    Found {
        wal_seq,
        written_by_us,
        history: Some(history(2)),
    }
}

/// The fence with this quotad at epoch 2 of the test history.
fn fence_at_2(found: &Found, expected: u64, delta_seq: u64) -> Result<Fence, PostgresError> {
    fence(found, Some(&history(2)), expected, delta_seq)
}

#[test]
fn the_fence_lets_through_only_the_position_this_quotad_wrote() {
    assert_eq!(fence_at_2(&found(7, true), 7, 12).unwrap(), Fence::Write);
    assert_eq!(fence_at_2(&found(7, false), 7, 12).unwrap(), Fence::Write);
    assert_eq!(fence_at_2(&found(0, false), 0, 3).unwrap(), Fence::Write);
    // Our commit of 12 went through but its answer was lost: done already.
    assert_eq!(
        fence_at_2(&found(12, true), 7, 12).unwrap(),
        Fence::AlreadyCommitted
    );
    // Another quotad reached the same position: refused, not taken as ours.
    assert!(matches!(
        fence_at_2(&found(12, false), 7, 12),
        Err(PostgresError::Fenced {
            found: 12,
            expected: 7
        })
    ));
    // Someone else moved it, forward or back.
    assert!(matches!(
        fence_at_2(&found(9, true), 7, 12),
        Err(PostgresError::Fenced {
            found: 9,
            expected: 7
        })
    ));
    assert!(matches!(
        fence_at_2(&found(3, false), 7, 12),
        Err(PostgresError::Fenced { .. })
    ));
}

#[test]
fn the_fence_refuses_a_writer_of_another_epoch_or_history_whatever_the_position() {
    let at_7 = found(7, true);
    // An older epoch: another quotad recovered from Postgres since. Even at
    // the very position this one wrote last, and even for its own lost commit.
    for (expected, delta_seq) in [(7, 12), (3, 7)] {
        let refused = fence(&at_7, Some(&history(1)), expected, delta_seq).unwrap_err();
        assert!(refused.is_fenced());
        let message = refused.to_string();
        assert!(
            message.contains("epoch 2") && message.contains("epoch 1"),
            "{message}"
        );
    }
    // A newer epoch than Postgres's, another history, no history at all.
    assert!(matches!(
        fence(&at_7, Some(&history(3)), 7, 12),
        Err(PostgresError::Superseded { .. })
    ));
    let other = History {
        id: HistoryId::parse(&"cd".repeat(16)).unwrap(),
        epoch: 2,
    };
    assert!(matches!(
        fence(&at_7, Some(&other), 7, 12),
        Err(PostgresError::Superseded { .. })
    ));
    let unnamed = Found {
        history: None,
        ..found(7, true)
    };
    assert!(matches!(
        fence(&unnamed, Some(&history(2)), 7, 12),
        Err(PostgresError::Superseded { .. })
    ));
    assert!(matches!(
        fence(&at_7, None, 7, 12),
        Err(PostgresError::Superseded { .. })
    ));
}

fn usage_record(i: u64) -> Record {
    Record::UsageCharged(Usage {
        school_id: SchoolId::parse("s1").unwrap(),
        teacher_id: TeacherId::parse("t1").unwrap(),
        service: ServiceType::parse("claude_messages").unwrap(),
        source: UsageSource::Event(EventId::parse(&format!("e{i}")).unwrap()),
        units: i,
        borrowed_units: 0,
        overage_units: 0,
        cycle_start_ms: 0,
        occurred_at_ms: 1_000,
        recorded_at_ms: 1_000,
        model: Arc::from("m"),
    })
}

/// A new database on the test Postgres (scripts/test starts one), migrated,
/// and its URL.
async fn fresh_database() -> (Client, String) {
    let url = std::env::var("QUOTAD_TEST_DATABASE_URL").expect(
        "QUOTAD_TEST_DATABASE_URL: run the tests with scripts/test, which starts a Postgres",
    );
    let admin = connect(&url).await.unwrap();
    let name = format!(
        "quotad_unit_{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    (super::super::prepare(&url).await.unwrap(), url)
}

#[tokio::test]
async fn usage_rows_left_in_the_wal_are_copied_piece_by_piece_up_to_the_snapshot() {
    let (mut client, _) = fresh_database().await;
    let wal = MemoryLog::default();
    let entries: Vec<_> = (1..=25)
        .map(|i| (i, codec::encode(&usage_record(i)).unwrap()))
        .collect();
    wal.append(&entries).unwrap();
    wal.truncate_through(4).unwrap();
    let delta = Delta {
        wal_seq: 20,
        usage_from_wal: Some((4, 20)),
        ..Delta::default()
    };
    let tx = client.transaction().await.unwrap();
    // Pieces of 3 records: 16 rows take 6 reads.
    write_usage(&tx, &delta, &wal, 3).await.unwrap();
    tx.commit().await.unwrap();
    let seqs: Vec<i64> = client
        .query("SELECT wal_seq FROM ai_usage_logs ORDER BY wal_seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(seqs, (5..=20).collect::<Vec<i64>>());
    let units: i64 = client
        .query_one("SELECT sum(units)::bigint FROM ai_usage_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(units, (5..=20).sum::<i64>());
}

async fn snapshot_row(client: &Client) -> (i64, String, String, i64) {
    let row = client
        .query_one(
            "SELECT wal_seq, writer, history_id, epoch FROM quotad_snapshot WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test]
async fn a_writer_of_an_older_epoch_writes_nothing_and_stops_without_retrying() {
    let (client, url) = fresh_database().await;
    // This quotad wrote position 5 at epoch 1; then another recovered from
    // Postgres (epoch 2) and has not written yet, so the position alone
    // would still let the old writer through.
    let current = history(2);
    client
        .execute(
            "INSERT INTO quotad_snapshot (id, wal_seq, taken_at, writer, history_id, epoch)
             VALUES (1, 5, now(), 'old-writer', $1, 2)",
            &[&current.id.to_string()],
        )
        .await
        .unwrap();
    let shared = Arc::new(Shared {
        committed_seq: AtomicU64::new(5),
        ..Shared::default()
    });
    let mut writer = Writer {
        writer_id: "old-writer".into(),
        history: Some(history(1)),
        url: Secret(url),
        client: None,
        shared: shared.clone(),
        store: Arc::new(MemoryLog::default()),
    };
    let delta = Delta {
        wal_seq: 6,
        usage: vec![UsageRow::from_record(6, &usage_record(6)).unwrap()],
        ..Delta::default()
    };
    let started = Instant::now();
    assert!(!writer.write_until_done(&delta).await, "the writer stops");
    assert!(
        started.elapsed() < BACKOFF_FIRST,
        "a fence is not retried: {:?}",
        started.elapsed()
    );
    assert!(shared.stopped.load(Ordering::Acquire));
    assert_eq!(shared.committed_seq.load(Ordering::Acquire), 5);
    let logged: i64 = client
        .query_one("SELECT count(*) FROM ai_usage_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "the stale writer wrote nothing");
    assert_eq!(
        snapshot_row(&client).await,
        (5, "old-writer".into(), current.id.to_string(), 2)
    );

    // The epoch is what stopped it: at the current one the same delta goes in.
    writer.history = Some(current);
    shared.stopped.store(false, Ordering::Release);
    assert!(writer.write_until_done(&delta).await);
    assert_eq!(shared.committed_seq.load(Ordering::Acquire), 6);
    assert_eq!(
        snapshot_row(&client).await,
        (6, "old-writer".into(), current.id.to_string(), 2)
    );
}
