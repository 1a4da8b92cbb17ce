//! An event id counts once: on retry, on another connection, after a restart.

use quotad::proto::*;

use crate::common::{self, *};

#[tokio::test]
async fn a_retried_event_returns_the_first_decision_and_charges_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();

    let mut phone = server.gate().await;
    let mut laptop = server.gate().await;
    let first = decide(&mut phone, consume("oak", "ms-lee", 4, "evt-1")).await;
    assert!(first.allowed && !first.duplicate);
    let retry = decide(&mut laptop, consume("oak", "ms-lee", 4, "evt-1")).await;
    assert!(retry.allowed && retry.duplicate, "{retry:?}");
    assert_eq!(retry.remaining_units, first.remaining_units);
    assert_eq!(used_units(&mut phone, "oak", "ms-lee").await, 4);

    // A denial is a decision too: its retry is denied again even after room frees up.
    allocate(&mut admin, "oak", "ms-lee", 5, "normal")
        .await
        .unwrap();
    let denied = decide(&mut phone, consume("oak", "ms-lee", 3, "evt-2")).await;
    assert!(!denied.allowed);
    allocate(&mut admin, "oak", "ms-lee", 50, "normal")
        .await
        .unwrap();
    let again = decide(&mut phone, consume("oak", "ms-lee", 3, "evt-2")).await;
    assert!(!again.allowed && again.duplicate, "{again:?}");

    // Ids belong to a teacher: another teacher's same id is another event.
    allocate(&mut admin, "oak", "mr-ng", 10, "normal")
        .await
        .unwrap();
    let other = decide(&mut phone, consume("oak", "mr-ng", 4, "evt-1")).await;
    assert!(other.allowed && !other.duplicate);
    server.stop().await;
}

#[tokio::test]
async fn ids_survive_a_graceful_restart() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    gate.reserve(ReserveRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        estimate_units: 2,
        ttl_ms: 600_000,
        reservation_id: "hold-1".into(),
        model: String::new(),
    })
    .await
    .unwrap();
    for i in 0..5 {
        gate.consume(consume("oak", "ms-lee", 1, &format!("evt-{i}")))
            .await
            .unwrap();
    }
    server.stop().await;

    let server = TestServer::start(&data).await;
    let mut gate = server.gate().await;
    for i in 0..5 {
        let d = decide(&mut gate, consume("oak", "ms-lee", 1, &format!("evt-{i}"))).await;
        assert!(d.allowed && d.duplicate, "evt-{i} after restart: {d:?}");
    }
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].reserved_units
        ),
        (5, 2)
    );
    let committed = gate
        .commit(CommitRequest {
            school_id: "oak".into(),
            teacher_id: "ms-lee".into(),
            reservation_id: "hold-1".into(),
            actual_units: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !committed.duplicate && committed.charged_units == 2,
        "the hold survived the restart: {committed:?}"
    );
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 7);
    server.stop().await;
}
