//! Many clients at once through gRPC: no overspend, each event counted once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quotad::proto::*;

use crate::common::{self, *};

const CLIENTS: usize = 64;
const TEACHERS: usize = 8;
const SLICE: u64 = 100;
const POOL: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_get_exactly_the_allocated_units() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", POOL, true).await;
    // Half the teachers may borrow the 200 unallocated units, half may not.
    for t in 0..TEACHERS {
        let priority = if t % 2 == 0 { "high" } else { "normal" };
        allocate(&mut admin, "oak", &format!("t{t}"), SLICE, priority)
            .await
            .unwrap();
    }

    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..TEACHERS).map(|_| AtomicU64::new(0)).collect());
    let channels: Vec<_> = futures::future::join_all((0..8).map(|_| server.gate())).await;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut gate = channels[c % channels.len()].clone();
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let t = (c * 7 + i) % TEACHERS;
                let request = consume("oak", &format!("t{t}"), 1, &format!("c{c}-{i}"));
                let first = gate
                    .consume(request.clone())
                    .await
                    .unwrap()
                    .into_inner()
                    .decision
                    .unwrap();
                assert!(!first.duplicate, "a fresh id is never a duplicate");
                if first.allowed {
                    allowed[t].fetch_add(1, Ordering::Relaxed);
                }
                if i % 3 == 0 {
                    // A retry, racing the other clients: the same answer, nothing charged.
                    let retry = gate
                        .consume(request)
                        .await
                        .unwrap()
                        .into_inner()
                        .decision
                        .unwrap();
                    assert!(
                        retry.duplicate && retry.allowed == first.allowed,
                        "{first:?} then {retry:?}"
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let mut gate = server.gate().await;
    let mut high_total = 0;
    for t in 0..TEACHERS {
        let used = used_units(&mut gate, "oak", &format!("t{t}")).await;
        assert_eq!(
            used,
            allowed[t].load(Ordering::Relaxed),
            "t{t}: used equals what was allowed"
        );
        if t % 2 == 0 {
            assert!(used >= SLICE, "t{t} high priority filled its slice: {used}");
            high_total += used;
        } else {
            assert_eq!(used, SLICE, "t{t} normal priority gets its slice exactly");
        }
    }
    // 2560 asks for 1000 units: every unit of the pool went out, not one more.
    assert_eq!(
        high_total,
        SLICE * (TEACHERS as u64 / 2) + (POOL - SLICE * TEACHERS as u64)
    );
    let school = common::school(&mut admin, "oak").await;
    let pool = &school.pools[0];
    assert_eq!(
        (pool.used_units, pool.borrowed_units, pool.available_units),
        (POOL, 200, 0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_hold_more_than_the_slice() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", POOL, false).await;
    allocate(&mut admin, "oak", "ms-lee", SLICE, "normal")
        .await
        .unwrap();

    let held = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut gate = server.gate().await;
        let held = held.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                let id = format!("c{c}-{i}");
                let answer = gate
                    .reserve(ReserveRequest {
                        school_id: "oak".into(),
                        teacher_id: "ms-lee".into(),
                        service_type: SERVICE.into(),
                        estimate_units: 3,
                        ttl_ms: 600_000,
                        reservation_id: id.clone(),
                        model: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if answer.decision.unwrap().allowed {
                    held.fetch_add(3, Ordering::Relaxed);
                    if i % 2 == 0 {
                        let r = ReleaseRequest {
                            school_id: "oak".into(),
                            teacher_id: "ms-lee".into(),
                            reservation_id: id,
                        };
                        let released = gate.release(r).await.unwrap().into_inner();
                        assert!(released.released);
                        held.fetch_sub(3, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut gate = server.gate().await;
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    let reserved = usage.services[0].reserved_units;
    assert_eq!(reserved, held.load(Ordering::Relaxed));
    assert!(
        reserved <= SLICE && reserved > SLICE - 3,
        "held {reserved} of {SLICE}"
    );
    server.stop().await;
}
