use std::sync::Arc;

use super::*;
use crate::domain::{EventId, SchoolId, ServiceType, TeacherId, Usage, UsageSource};
use crate::storage::MemoryLog;

#[test]
fn the_fence_lets_through_only_the_position_this_quotad_wrote() {
    assert_eq!(fence(7, true, 7, 12).unwrap(), Fence::Write);
    assert_eq!(fence(7, false, 7, 12).unwrap(), Fence::Write);
    assert_eq!(fence(0, false, 0, 3).unwrap(), Fence::Write);
    // Our commit of 12 went through but its answer was lost: done already.
    assert_eq!(fence(12, true, 7, 12).unwrap(), Fence::AlreadyCommitted);
    // Another quotad reached the same position: refused, not taken as ours.
    assert!(matches!(
        fence(12, false, 7, 12),
        Err(PostgresError::Fenced {
            found: 12,
            expected: 7
        })
    ));
    // Someone else moved it, forward or back.
    assert!(matches!(
        fence(9, true, 7, 12),
        Err(PostgresError::Fenced {
            found: 9,
            expected: 7
        })
    ));
    assert!(matches!(
        fence(3, false, 7, 12),
        Err(PostgresError::Fenced { .. })
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

/// A new database on the test Postgres (scripts/test starts one), migrated.
async fn fresh_database() -> Client {
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
    super::super::prepare(&format!("{base}/{name}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn usage_rows_left_in_the_wal_are_copied_piece_by_piece_up_to_the_snapshot() {
    let mut client = fresh_database().await;
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
