//! SyncUsage and BulkIncrement through the real gRPC API: per-event answers,
//! limits, and the request size a full batch needs.

use quotad::auth::Role;
use quotad::proto::*;
use tonic::Code;

use crate::common::*;

const DAY_MS: i64 = 24 * 3600 * 1000;

fn event(teacher_id: &str, units: u64, event_id: &str, occurred_at_ms: i64) -> UsageEvent {
    UsageEvent {
        event_id: event_id.into(),
        teacher_id: teacher_id.into(),
        service_type: SERVICE.into(),
        units,
        model: "claude".into(),
        occurred_at_ms,
    }
}

fn sync(school_id: &str, events: Vec<UsageEvent>) -> SyncUsageRequest {
    SyncUsageRequest {
        school_id: school_id.into(),
        events,
    }
}

fn statuses(results: &[SyncResult]) -> Vec<(SyncStatus, SyncRejectReason)> {
    results.iter().map(|r| (r.status(), r.reason())).collect()
}

#[tokio::test]
async fn a_batch_gets_the_right_answer_for_each_event() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s", 100, false).await;
    allocate(&mut admin, "s", "t1", 10, "normal").await.unwrap();
    decide(&mut gate, consume("s", "t1", 2, "online")).await;
    let now = now_ms();
    let mut bad = event("t1", 1, "", now);
    bad.event_id.clear();
    let mut other_service = event("t1", 1, "other-service", now);
    other_service.service_type = "homework_help".into();
    let batch = vec![
        event("t1", 3, "a", now - 60_000),
        event("t1", 3, "online", now),
        event("t1", 3, "a", now),
        event("t1", 6, "b", now),
        event("stranger", 1, "c", now),
        other_service,
        event("t1", 1, "old", now - 9 * DAY_MS),
        event("t1", 1, "future", now + DAY_MS),
        bad,
    ];
    let results = gate
        .sync_usage(sync("s", batch))
        .await
        .unwrap()
        .into_inner()
        .results;
    use SyncRejectReason as R;
    use SyncStatus as S;
    assert_eq!(
        statuses(&results),
        vec![
            (S::Accepted, R::Unspecified),
            (S::Duplicate, R::Unspecified),
            (S::Duplicate, R::Unspecified),
            (S::AcceptedOverQuota, R::Unspecified),
            (S::Rejected, R::UnknownAllocation),
            (S::Rejected, R::UnknownAllocation),
            (S::Rejected, R::TooOld),
            (S::Rejected, R::BadInput),
            (S::Rejected, R::BadInput),
        ]
    );
    assert_eq!(results[3].overage_units, 1, "2 + 3 + 6 of 10");
    assert!(
        results[8].message.contains("event_id"),
        "{}",
        results[8].message
    );
    assert!(results[6].message.contains("idempotency window"));
    let view = usage(&mut gate, "s", "t1").await;
    let slice = &view.services[0];
    assert_eq!(slice.used_units, 11);
    assert_eq!(slice.overage_units, 1);
    assert_eq!(results[0].cycle_start_ms, view.cycle_start_ms);

    // The same batch again changes nothing: everything charged is a duplicate.
    let again = gate
        .sync_usage(sync(
            "s",
            vec![event("t1", 3, "a", now), event("t1", 4, "b", now)],
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(again.iter().all(|r| r.status() == S::Duplicate));
    assert_eq!(used_units(&mut gate, "s", "t1").await, 11);
    // And a consume of a synced id is a duplicate too.
    assert!(
        decide(&mut gate, consume("s", "t1", 3, "a"))
            .await
            .duplicate
    );
}

#[tokio::test]
async fn a_batch_over_the_limit_or_naming_another_school_is_refused_whole() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s", 100, false).await;
    create_school(&mut admin, "other", 100, false).await;
    allocate(&mut admin, "s", "t1", 10, "normal").await.unwrap();
    let now = now_ms();
    let too_many: Vec<_> = (0..1001)
        .map(|n| event("t1", 1, &format!("e{n}"), now))
        .collect();
    let refused = gate.sync_usage(sync("s", too_many)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("at most 1000"),
        "{}",
        refused.message()
    );
    let empty = gate.sync_usage(sync("s", vec![])).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let missing = gate
        .sync_usage(sync("nowhere", vec![event("t1", 1, "e1", now)]))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let (_, mut other_proxy) =
        clients_as(server.addr, &token("proxy", Role::Service, &["other"])).await;
    let denied = other_proxy
        .sync_usage(sync("s", vec![event("t1", 1, "e1", now)]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(used_units(&mut gate, "s", "t1").await, 0, "nothing changed");
}

#[tokio::test]
async fn a_full_batch_of_long_events_fits_the_gate_request_limit() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s", 1_000_000, false).await;
    let teacher = "t".repeat(128);
    allocate(&mut admin, "s", &teacher, 500_000, "normal")
        .await
        .unwrap();
    let now = now_ms();
    let batch: Vec<_> = (0..1000)
        .map(|n| UsageEvent {
            model: "m".repeat(128),
            ..event(&teacher, 1, &format!("{n:0>128}"), now)
        })
        .collect();
    let results = gate
        .sync_usage(sync("s", batch))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r.status() == SyncStatus::Accepted));
    assert_eq!(used_units(&mut gate, "s", &teacher).await, 1000);
}

#[tokio::test]
async fn bulk_increment_counts_a_batch_once_by_its_batch_id() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s", 100, false).await;
    allocate(&mut admin, "s", "t1", 10, "normal").await.unwrap();
    let bulk = |batch_id: &str, count| BulkIncrementRequest {
        school_id: "s".into(),
        teacher_id: "t1".into(),
        batch_id: batch_id.into(),
        counts: vec![
            FeatureCount {
                feature: SERVICE.into(),
                count,
            },
            FeatureCount {
                feature: "no_such_feature".into(),
                count: 1,
            },
        ],
        occurred_at_ms: 0,
        model: String::new(),
    };
    let first = gate
        .bulk_increment(bulk("b-1", 4))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(first[0].status(), SyncStatus::Accepted);
    assert!(first[0].event_id.starts_with("bulk-"));
    assert_eq!(first[1].reason(), SyncRejectReason::UnknownAllocation);
    let resent = gate
        .bulk_increment(bulk("b-1", 4))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(resent[0].status(), SyncStatus::Duplicate);
    assert_eq!(resent[0].event_id, first[0].event_id);
    let next = gate
        .bulk_increment(bulk("b-2", 3))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(next[0].status(), SyncStatus::Accepted);
    assert_eq!(used_units(&mut gate, "s", "t1").await, 7);
    let bad = gate.bulk_increment(bulk("", 1)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("batch_id"), "{}", bad.message());
}

/// Many clients sync and consume overlapping events at once through the real
/// server: each distinct event is counted exactly once, whoever sent it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_syncs_and_consumes_of_overlapping_events_count_each_once() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "s", 100_000, false).await;
    for t in 0..4 {
        allocate(&mut admin, "s", &format!("t{t}"), 10_000, "normal")
            .await
            .unwrap();
    }
    const TASKS: usize = 16;
    const EVENTS: usize = 200;
    let now = now_ms();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let addr = server.addr;
            tokio::spawn(async move {
                let (_, mut gate) = clients_as(addr, &admin_token()).await;
                // Tasks 0-3 send all events in batches of 50; the others
                // consume a quarter of them one by one, in another order.
                if task < 4 {
                    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(50) {
                        let batch = chunk
                            .iter()
                            .map(|n| event(&format!("t{}", n % 4), 1, &format!("e{n}"), now))
                            .collect();
                        gate.sync_usage(sync("s", batch)).await.unwrap();
                    }
                } else {
                    for n in (task % 4..EVENTS).step_by(4).rev() {
                        decide(
                            &mut gate,
                            consume("s", &format!("t{}", n % 4), 1, &format!("e{n}")),
                        )
                        .await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut gate = server.gate().await;
    let mut total = 0;
    for t in 0..4 {
        total += used_units(&mut gate, "s", &format!("t{t}")).await;
    }
    assert_eq!(total, EVENTS as u64);
}
