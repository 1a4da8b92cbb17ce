//! The gate's rules, seen from a client.

use quotad::proto::*;
use tonic::Code;

use crate::common::{self, *};

#[tokio::test]
async fn consume_until_denied_and_every_view_agrees() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();

    for i in 0..3 {
        let d = decide(&mut gate, consume("oak", "ms-lee", 3, &format!("e{i}"))).await;
        assert!(d.allowed, "consume {i}: {d:?}");
        assert_eq!(d.remaining_units, 10 - 3 * (i + 1));
    }
    let check = gate
        .check(CheckRequest {
            school_id: "oak".into(),
            teacher_id: "ms-lee".into(),
            service_type: SERVICE.into(),
            units: 3,
            previews: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    let denied = decide(&mut gate, consume("oak", "ms-lee", 3, "e3")).await;
    assert!(!denied.allowed);
    assert_eq!(denied.reason(), DenyReason::Exhausted);
    assert_eq!(denied.remaining_units, 1);
    assert!(denied.message.contains("exhausted"), "{}", denied.message);
    assert_eq!(
        (check.allowed, check.reason()),
        (false, DenyReason::Exhausted),
        "check gives consume's answer"
    );

    // The last unit still fits.
    assert!(
        decide(&mut gate, consume("oak", "ms-lee", 1, "e4"))
            .await
            .allowed
    );

    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    let s = &usage.services[0];
    assert_eq!(
        (
            s.allocated_units,
            s.used_units,
            s.reserved_units,
            s.remaining_units
        ),
        (10, 10, 0, 0)
    );
    assert!(usage.cycle_end_ms > usage.cycle_start_ms);

    let school = common::school(&mut admin, "oak").await;
    let pool = school
        .pools
        .iter()
        .find(|p| p.service_type == SERVICE)
        .unwrap();
    assert_eq!(
        (
            pool.cycle_units,
            pool.allocated_units,
            pool.available_units,
            pool.used_units
        ),
        (100, 10, 90, 10)
    );
    server.stop().await;
}

#[tokio::test]
async fn check_charges_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    for _ in 0..5 {
        let d = gate
            .check(CheckRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                service_type: SERVICE.into(),
                units: 10,
                previews: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .decision
            .unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining_units, 10);
    }
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 0);
    server.stop().await;
}

fn reserve(teacher: &str, units: u64, id: &str) -> ReserveRequest {
    ReserveRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        service_type: SERVICE.into(),
        estimate_units: units,
        ttl_ms: 0,
        reservation_id: id.into(),
        model: "claude".into(),
    }
}

fn commit(teacher: &str, id: &str, actual: u64) -> CommitRequest {
    CommitRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        reservation_id: id.into(),
        actual_units: actual,
    }
}

fn release(teacher: &str, id: &str) -> ReleaseRequest {
    ReleaseRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        reservation_id: id.into(),
    }
}

#[tokio::test]
async fn reserve_holds_units_commit_charges_the_actual_and_release_frees() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 1000, false).await;
    allocate(&mut admin, "oak", "ms-lee", 100, "normal")
        .await
        .unwrap();

    let held = gate
        .reserve(reserve("ms-lee", 40, "r1"))
        .await
        .unwrap()
        .into_inner();
    assert!(held.decision.as_ref().unwrap().allowed);
    assert_eq!(held.decision.unwrap().remaining_units, 60);
    assert!(held.expires_at_ms > 0);
    // The hold counts against the slice.
    let d = decide(&mut gate, consume("oak", "ms-lee", 61, "big")).await;
    assert_eq!((d.allowed, d.reason()), (false, DenyReason::Exhausted));

    // The real count is above the estimate: charged all the same.
    let c = gate
        .commit(commit("ms-lee", "r1", 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.charged_units,
            c.overage_units,
            c.duplicate,
            c.remaining_units
        ),
        (50, 0, false, 50)
    );
    let again = gate
        .commit(commit("ms-lee", "r1", 50))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "a retried commit returns the first result");
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 50);
    let gone = gate
        .release(release("ms-lee", "r1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!gone.released, "a committed hold cannot be released");

    gate.reserve(reserve("ms-lee", 30, "r2")).await.unwrap();
    let freed = gate
        .release(release("ms-lee", "r2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((freed.released, freed.released_units), (true, 30));
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].reserved_units
        ),
        (50, 0)
    );

    // Past the slice: the usage already happened, so it is charged and the overage recorded.
    gate.reserve(reserve("ms-lee", 50, "r3")).await.unwrap();
    let over = gate
        .commit(commit("ms-lee", "r3", 70))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (over.charged_units, over.overage_units, over.remaining_units),
        (70, 20, 0)
    );
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].overage_units
        ),
        (120, 20)
    );

    let unknown = gate
        .commit(commit("ms-lee", "never-made", 1))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    server.stop().await;
}

#[tokio::test]
async fn high_priority_teachers_borrow_unallocated_units_when_the_school_allows_it() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 30, true).await;
    allocate(&mut admin, "oak", "high", 10, "high")
        .await
        .unwrap();
    allocate(&mut admin, "oak", "normal", 10, "normal")
        .await
        .unwrap();

    let d = decide(&mut gate, consume("oak", "high", 15, "h1")).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.borrowed_units, 5);
    let d = decide(&mut gate, consume("oak", "normal", 15, "n1")).await;
    assert_eq!(
        (d.allowed, d.reason()),
        (false, DenyReason::Exhausted),
        "normal priority never borrows"
    );
    // 10 unallocated, 5 borrowed: 5 left to borrow.
    let d = decide(&mut gate, consume("oak", "high", 6, "h2")).await;
    assert_eq!((d.allowed, d.reason()), (false, DenyReason::Exhausted));
    let d = decide(&mut gate, consume("oak", "high", 5, "h3")).await;
    assert!(d.allowed && d.borrowed_units == 5, "{d:?}");

    let school = common::school(&mut admin, "oak").await;
    let pool = &school.pools[0];
    assert_eq!(
        (pool.allocated_units, pool.borrowed_units, pool.used_units),
        (20, 10, 20)
    );
    server.stop().await;
}

/// Issue 11, sequence 5: Check said "allowed, 4 borrowed" and Reserve of the
/// same 4 was denied. A hold never borrows; Check previews the call it names.
#[tokio::test]
async fn check_gives_the_answer_of_the_call_it_previews_for_a_teacher_who_must_borrow() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 30, true).await;
    allocate(&mut admin, "oak", "high", 10, "high")
        .await
        .unwrap();
    assert!(
        decide(&mut gate, consume("oak", "high", 8, "first"))
            .await
            .allowed
    );
    let check = |previews: CheckPreviews| CheckRequest {
        school_id: "oak".into(),
        teacher_id: "high".into(),
        service_type: SERVICE.into(),
        units: 6,
        previews: previews as i32,
    };
    let for_consume = gate.check(check(CheckPreviews::Consume)).await.unwrap();
    let for_consume = for_consume.into_inner().decision.unwrap();
    let for_reserve = gate.check(check(CheckPreviews::Reserve)).await.unwrap();
    let for_reserve = for_reserve.into_inner().decision.unwrap();

    let reserve = gate
        .reserve(ReserveRequest {
            school_id: "oak".into(),
            teacher_id: "high".into(),
            service_type: SERVICE.into(),
            estimate_units: 6,
            ttl_ms: 0,
            reservation_id: "r1".into(),
            model: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(
        (for_reserve.allowed, for_reserve.reason()),
        (reserve.allowed, reserve.reason()),
        "Check(previews = reserve) agrees with Reserve: {for_reserve:?} vs {reserve:?}"
    );
    assert!(!reserve.allowed, "a hold never borrows: {reserve:?}");
    let consumed = decide(&mut gate, consume("oak", "high", 6, "second")).await;
    assert_eq!(
        (for_consume.allowed, for_consume.borrowed_units),
        (consumed.allowed, consumed.borrowed_units),
        "Check(previews = consume) agrees with Consume: {for_consume:?} vs {consumed:?}"
    );
    assert!(
        consumed.allowed && consumed.borrowed_units == 4,
        "{consumed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn borrowing_is_off_unless_the_school_enables_it() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 30, false).await;
    allocate(&mut admin, "oak", "high", 10, "high")
        .await
        .unwrap();
    let d = decide(&mut gate, consume("oak", "high", 11, "h1")).await;
    assert_eq!(
        (d.allowed, d.reason(), d.borrowed_units),
        (false, DenyReason::Exhausted, 0)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_suspended_slice_denies_and_keeps_its_units_until_reactivated() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    let status = |status: &str| SetAllocationStatusRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        status: status.into(),
        changed_by: "principal".into(),
        reason: "test".into(),
    };
    let suspended = admin
        .set_allocation_status(status("suspended"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (suspended.status.as_str(), suspended.allocated_units),
        ("suspended", 10)
    );
    let d = decide(&mut gate, consume("oak", "ms-lee", 1, "e1")).await;
    assert_eq!((d.allowed, d.reason()), (false, DenyReason::Suspended));
    let school = common::school(&mut admin, "oak").await;
    assert_eq!(
        school.pools[0].allocated_units, 10,
        "a suspended slice keeps its units"
    );

    admin.set_allocation_status(status("active")).await.unwrap();
    assert!(
        decide(&mut gate, consume("oak", "ms-lee", 1, "e2"))
            .await
            .allowed
    );
    server.stop().await;
}

#[tokio::test]
async fn a_teacher_without_a_slice_is_denied_with_no_allocation() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    let d = decide(&mut gate, consume("oak", "stranger", 1, "e1")).await;
    assert_eq!((d.allowed, d.reason()), (false, DenyReason::NoAllocation));
    server.stop().await;
}

#[tokio::test]
async fn slices_never_add_up_to_more_than_the_pool() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "a", 60, "normal")
        .await
        .unwrap();
    let refused = allocate(&mut admin, "oak", "b", 41, "normal")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    allocate(&mut admin, "oak", "b", 40, "normal")
        .await
        .unwrap();
    // Shrinking the pool below what is allocated is refused too, and says by how much.
    let shrink = admin
        .set_pool(SetPoolRequest {
            school_id: "oak".into(),
            service_type: SERVICE.into(),
            cycle_units: 90,
            changed_by: "principal".into(),
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(shrink.code(), Code::FailedPrecondition);
    assert!(shrink.message().contains("10"), "{}", shrink.message());
    let school = common::school(&mut admin, "oak").await;
    assert_eq!(
        (school.pools[0].cycle_units, school.pools[0].allocated_units),
        (100, 100)
    );
    server.stop().await;
}

#[tokio::test]
async fn the_metrics_endpoint_reports_the_hot_path() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 1, "normal")
        .await
        .unwrap();
    gate.consume(consume("oak", "ms-lee", 1, "e1"))
        .await
        .unwrap();
    gate.consume(consume("oak", "ms-lee", 1, "e2"))
        .await
        .unwrap();

    let body = scrape(server.metrics_addr).await;
    for name in [
        r#"quotad_grpc_request_duration_seconds_bucket{grpc_service="QuotaGate",rpc="Consume",code="OK""#,
        "quotad_wal_flush_duration_seconds_bucket",
        "quotad_wal_flush_batch_records_bucket",
        "quotad_actors_alive",
    ] {
        assert!(body.contains(name), "no {name} in:\n{body}");
    }
    assert!(
        body.contains(
            r#"quotad_decisions_total{call="consume",outcome="allowed",service="claude_messages"}"#
        ),
        "{body}"
    );
    assert!(
        body.contains(r#"quotad_decisions_total{call="consume",outcome="exhausted",service="claude_messages"}"#),
        "{body}"
    );
    server.stop().await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}
