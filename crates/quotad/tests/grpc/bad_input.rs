//! Bad input gets a clear status naming the field, and changes nothing.

use quotad::proto::*;
use tonic::Code;

use crate::common::{self, *};

/// A school "oak" with ms-lee holding 10 units, and one charged unit to compare against.
async fn setup(server: &TestServer) {
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    gate.consume(consume("oak", "ms-lee", 1, "baseline"))
        .await
        .unwrap();
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, mentions: &str) {
    let status = result.expect_err("bad input must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(mentions),
        "{:?} should mention {mentions:?}",
        status.message()
    );
}

async fn assert_unchanged(server: &TestServer) {
    let mut gate = server.gate().await;
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    let s = &usage.services[0];
    assert_eq!(
        (s.allocated_units, s.used_units, s.reserved_units),
        (10, 1, 0),
        "bad input changed the state"
    );
}

#[tokio::test]
async fn consume_refuses_bad_fields() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;
    let ok = || consume("oak", "ms-lee", 1, "fresh");
    let cases: Vec<(ConsumeRequest, Code, &str)> = vec![
        (
            ConsumeRequest {
                school_id: "".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "school_id",
        ),
        (
            ConsumeRequest {
                teacher_id: "".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "teacher_id",
        ),
        (
            ConsumeRequest {
                event_id: "".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "event_id",
        ),
        (
            ConsumeRequest {
                event_id: "x".repeat(129),
                ..ok()
            },
            Code::InvalidArgument,
            "event_id",
        ),
        (
            ConsumeRequest {
                service_type: "".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "service_type",
        ),
        (
            ConsumeRequest {
                service_type: "Lesson Generation!".into(),
                ..ok()
            },
            Code::InvalidArgument,
            "service_type",
        ),
        (
            ConsumeRequest {
                service_type: "homework_help".into(),
                ..ok()
            },
            Code::NotFound,
            "homework_help",
        ),
        (
            ConsumeRequest {
                school_id: "elm".into(),
                ..ok()
            },
            Code::NotFound,
            "elm",
        ),
        (
            ConsumeRequest { units: 0, ..ok() },
            Code::InvalidArgument,
            "units",
        ),
        (
            ConsumeRequest {
                units: u64::MAX,
                ..ok()
            },
            Code::InvalidArgument,
            "units",
        ),
        (
            ConsumeRequest {
                model: "m".repeat(129),
                ..ok()
            },
            Code::InvalidArgument,
            "model",
        ),
        (
            ConsumeRequest {
                occurred_at_ms: 1_000,
                ..ok()
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
        (
            ConsumeRequest {
                occurred_at_ms: i64::MAX,
                ..ok()
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
        (
            ConsumeRequest {
                occurred_at_ms: -1,
                ..ok()
            },
            Code::InvalidArgument,
            "occurred_at",
        ),
    ];
    for (request, code, mentions) in cases {
        let what = format!("{request:?}");
        let status = gate.consume(request).await.expect_err(&what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(mentions),
            "{what}: {:?} should mention {mentions:?}",
            status.message()
        );
    }
    assert_unchanged(&server).await;
    // None of the refused calls used up the id "fresh".
    let d = gate
        .consume(ok())
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert!(d.allowed && !d.duplicate, "{d:?}");
    server.stop().await;
}

#[tokio::test]
async fn check_reserve_commit_release_and_usage_refuse_bad_fields() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;

    let check = || CheckRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        units: 1,
        previews: 0,
    };
    assert_status(
        gate.check(CheckRequest {
            teacher_id: "".into(),
            ..check()
        })
        .await,
        Code::InvalidArgument,
        "teacher_id",
    );
    assert_status(
        gate.check(CheckRequest {
            units: 0,
            ..check()
        })
        .await,
        Code::InvalidArgument,
        "units",
    );
    assert_status(
        gate.check(CheckRequest {
            service_type: "nope".into(),
            ..check()
        })
        .await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        gate.check(CheckRequest {
            previews: 7,
            ..check()
        })
        .await,
        Code::InvalidArgument,
        "previews",
    );

    let reserve = || ReserveRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        estimate_units: 1,
        ttl_ms: 0,
        reservation_id: "r1".into(),
        model: String::new(),
    };
    assert_status(
        gate.reserve(ReserveRequest {
            reservation_id: "".into(),
            ..reserve()
        })
        .await,
        Code::InvalidArgument,
        "reservation_id",
    );
    assert_status(
        gate.reserve(ReserveRequest {
            estimate_units: 0,
            ..reserve()
        })
        .await,
        Code::InvalidArgument,
        "units",
    );
    assert_status(
        gate.reserve(ReserveRequest {
            estimate_units: u64::MAX,
            ..reserve()
        })
        .await,
        Code::InvalidArgument,
        "units",
    );
    assert_status(
        gate.reserve(ReserveRequest {
            ttl_ms: u64::MAX,
            ..reserve()
        })
        .await,
        Code::InvalidArgument,
        "ttl",
    );
    assert_status(
        gate.reserve(ReserveRequest {
            school_id: "".into(),
            ..reserve()
        })
        .await,
        Code::InvalidArgument,
        "school_id",
    );

    let commit = || CommitRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        reservation_id: "r1".into(),
        actual_units: 1,
    };
    assert_status(
        gate.commit(CommitRequest {
            reservation_id: "".into(),
            ..commit()
        })
        .await,
        Code::InvalidArgument,
        "reservation_id",
    );
    assert_status(
        gate.commit(CommitRequest {
            actual_units: u64::MAX,
            ..commit()
        })
        .await,
        Code::InvalidArgument,
        "units",
    );
    assert_status(gate.commit(commit()).await, Code::NotFound, "r1");

    let release = || ReleaseRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        reservation_id: "r1".into(),
    };
    assert_status(
        gate.release(ReleaseRequest {
            reservation_id: "r".repeat(200),
            ..release()
        })
        .await,
        Code::InvalidArgument,
        "reservation_id",
    );
    assert_status(
        gate.release(ReleaseRequest {
            teacher_id: "".into(),
            ..release()
        })
        .await,
        Code::InvalidArgument,
        "teacher_id",
    );

    assert_status(
        gate.get_usage(GetUsageRequest {
            school_id: "".into(),
            teacher_id: "ms-lee".into(),
        })
        .await,
        Code::InvalidArgument,
        "school_id",
    );
    assert_status(
        gate.get_usage(GetUsageRequest {
            school_id: "elm".into(),
            teacher_id: "ms-lee".into(),
        })
        .await,
        Code::NotFound,
        "elm",
    );
    assert_unchanged(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn admin_calls_refuse_bad_fields() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut admin = server.admin().await;
    let set = || SetAllocationRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        allocated_units: 5,
        priority: "normal".into(),
        auto_renew: Some(false),
        changed_by: "principal".into(),
        reason: "test".into(),
    };
    assert_status(
        admin
            .set_allocation(SetAllocationRequest {
                priority: "urgent".into(),
                ..set()
            })
            .await,
        Code::InvalidArgument,
        "priority",
    );
    assert_status(
        admin
            .set_allocation(SetAllocationRequest {
                teacher_id: "".into(),
                ..set()
            })
            .await,
        Code::InvalidArgument,
        "teacher_id",
    );
    assert_status(
        admin
            .set_allocation(SetAllocationRequest {
                allocated_units: u64::MAX,
                ..set()
            })
            .await,
        Code::InvalidArgument,
        "units",
    );
    assert_status(
        admin
            .set_allocation(SetAllocationRequest {
                service_type: "nope".into(),
                ..set()
            })
            .await,
        Code::NotFound,
        "nope",
    );
    // Below what the teacher already used: refused, the slice stays.
    assert_status(
        admin
            .set_allocation(SetAllocationRequest {
                allocated_units: 0,
                ..set()
            })
            .await,
        Code::FailedPrecondition,
        "",
    );

    let status = SetAllocationStatusRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        status: "paused".into(),
        changed_by: "principal".into(),
        reason: "test".into(),
    };
    assert_status(
        admin.set_allocation_status(status).await,
        Code::InvalidArgument,
        "status",
    );

    let school = |id: &str, tier: &str, day: u32| CreateSchoolRequest {
        school_id: id.into(),
        name: "Elm".into(),
        tier: tier.into(),
        billing_anchor_day: day,
        borrowing_enabled: false,
        pools: vec![],
        changed_by: "test".into(),
        self_service_requests: false,
    };
    assert_status(
        admin.create_school(school("elm", "university", 1)).await,
        Code::InvalidArgument,
        "tier",
    );
    assert_status(
        admin.create_school(school("elm", "k12", 31)).await,
        Code::InvalidArgument,
        "anchor",
    );
    assert_status(
        admin.create_school(school("", "k12", 1)).await,
        Code::InvalidArgument,
        "school_id",
    );
    assert_status(
        admin.create_school(school("oak", "k12", 1)).await,
        Code::AlreadyExists,
        "oak",
    );
    assert_eq!(
        admin
            .get_school(GetSchoolRequest {
                school_id: "elm".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_unchanged(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_before_it_is_read() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;
    // The gate's limit is raised so that a full SyncUsage batch fits; the
    // admin service keeps request_bytes_max.
    let config = quotad::config::Config::default();
    let huge = ConsumeRequest {
        model: "m".repeat(config.gate_request_bytes_max() + 1),
        ..consume("oak", "ms-lee", 1, "huge")
    };
    let status = gate.consume(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{:?}",
        status.message()
    );
    let mut admin = server.admin().await;
    let huge_reason = SetPoolRequest {
        school_id: "oak".into(),
        service_type: SERVICE.into(),
        cycle_units: 1,
        changed_by: String::new(),
        reason: "r".repeat(config.request_bytes_max + 1),
    };
    let status = admin.set_pool(huge_reason).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_unchanged(&server).await;
    server.stop().await;
}

/// BulkIncrement's refusals name its own fields (`counts`, `count`,
/// `feature`), not SyncUsage's, and charge nothing.
#[tokio::test]
async fn bulk_increment_names_its_own_fields() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;
    let bulk = |counts: Vec<FeatureCount>| BulkIncrementRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        batch_id: "b-1".into(),
        counts,
        occurred_at_ms: 0,
        model: "claude".into(),
    };
    assert_status(
        gate.bulk_increment(bulk(vec![])).await,
        Code::InvalidArgument,
        "counts",
    );
    let answer = gate
        .bulk_increment(bulk(vec![
            FeatureCount {
                feature: SERVICE.into(),
                count: 0,
            },
            FeatureCount {
                feature: "Not A Type!".into(),
                count: 1,
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let messages: Vec<&str> = answer.results.iter().map(|r| r.message.as_str()).collect();
    assert!(messages[0].starts_with("count"), "{messages:?}");
    assert!(messages[1].starts_with("feature"), "{messages:?}");
    assert_unchanged(&server).await;
}

/// A denied Reserve says how many units it was asked for, also on a retry.
#[tokio::test]
async fn a_denied_reserve_names_the_units_asked() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;
    let reserve = ReserveRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        estimate_units: 37,
        ttl_ms: 60_000,
        reservation_id: "too-big".into(),
        model: "claude".into(),
    };
    for _ in 0..2 {
        let decision = gate
            .reserve(reserve.clone())
            .await
            .unwrap()
            .into_inner()
            .decision
            .unwrap();
        assert!(!decision.allowed);
        assert!(
            decision.message.contains("37 asked"),
            "{}",
            decision.message
        );
    }
    assert_unchanged(&server).await;
}

/// ListHistory refuses ends before 1970 and empty or reversed ranges, as
/// the other time-range calls do.
#[tokio::test]
async fn list_history_refuses_impossible_ranges() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut admin = server.admin().await;
    let history = |from_ms: i64, to_ms: i64| ListHistoryRequest {
        school_id: "oak".into(),
        teacher_id: String::new(),
        service_type: String::new(),
        from_ms,
        to_ms,
        page_size: 0,
        page_token: String::new(),
    };
    let now = common::now_ms();
    assert_status(
        admin.list_history(history(-1, 0)).await,
        Code::InvalidArgument,
        "from_ms",
    );
    assert_status(
        admin.list_history(history(i64::MIN, 0)).await,
        Code::InvalidArgument,
        "from_ms",
    );
    assert_status(
        admin.list_history(history(0, -2)).await,
        Code::InvalidArgument,
        "to_ms",
    );
    assert_status(
        admin.list_history(history(now, now - 1)).await,
        Code::InvalidArgument,
        "to_ms",
    );
    assert_status(
        admin.list_history(history(now, now)).await,
        Code::InvalidArgument,
        "to_ms",
    );
    let open = admin
        .list_history(history(0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!open.entries.is_empty(), "open ends list everything");
    let bounded = admin
        .list_history(history(1, now + 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bounded.entries.len(), open.entries.len());
    assert_unchanged(&server).await;
}

/// A synced event refused as bad input for a field other than its service
/// type keeps that (configured) service type as its decision's label;
/// only an event whose type is unusable is counted under "(other)".
#[tokio::test]
async fn a_sync_event_refused_for_another_field_is_labelled_by_its_service() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let mut gate = server.gate().await;
    let event = |event_id: &str, service_type: &str| UsageEvent {
        event_id: event_id.into(),
        teacher_id: "ms-lee".into(),
        service_type: service_type.into(),
        units: 1,
        model: "claude".into(),
        occurred_at_ms: common::now_ms(),
    };
    let answer = gate
        .sync_usage(SyncUsageRequest {
            school_id: "oak".into(),
            events: vec![event("", SERVICE), event("e-2", "Not A Type!")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer
        .results
        .iter()
        .all(|r| r.status == SyncStatus::Rejected as i32));
    let scraped = scrape(server.metrics_addr).await;
    let line = |service: &str| {
        scraped.lines().find(|l| {
            l.starts_with("quotad_decisions_total{")
                && l.contains("call=\"sync_usage\"")
                && l.contains("outcome=\"bad_input\"")
                && l.contains(&format!("service=\"{service}\""))
        })
    };
    let by_service = line(SERVICE).unwrap_or_else(|| panic!("no labelled line in:\n{scraped}"));
    assert!(by_service.ends_with(" 1"), "{by_service}");
    let other = line("(other)").unwrap_or_else(|| panic!("no (other) line in:\n{scraped}"));
    assert!(other.ends_with(" 1"), "{other}");
    assert_unchanged(&server).await;
}
