//! Roles and tenant isolation: every role, another school's principal,
//! another teacher, a service of another school, no token and bad tokens,
//! against every RPC. A refused call changes nothing and reveals nothing.

use quotad::auth::Role;
use quotad::proto::quota_admin_client::QuotaAdminClient;
use quotad::proto::*;
use tonic::Code;

use crate::common::*;

/// Every RPC, by the names the authorization rules use.
use quotad::auth::Action as Rpc;

/// Each call aims at school "a" and its teacher "t1".
pub(crate) async fn call(
    rpc: Rpc,
    school: &str,
    admin: &mut AdminClient,
    gate: &mut GateClient,
) -> Result<(), tonic::Status> {
    let s = || school.to_string();
    let t1 = || "t1".to_string();
    let svc = || SERVICE.to_string();
    match rpc {
        Rpc::Consume => gate
            .consume(consume(school, "t1", 1, "matrix"))
            .await
            .map(drop),
        Rpc::Check => gate
            .check(CheckRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: svc(),
                units: 1,
                previews: 0,
            })
            .await
            .map(drop),
        Rpc::Reserve => gate
            .reserve(ReserveRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: svc(),
                estimate_units: 1,
                ttl_ms: 0,
                reservation_id: "matrix".into(),
                model: String::new(),
            })
            .await
            .map(drop),
        Rpc::Commit => gate
            .commit(CommitRequest {
                school_id: s(),
                teacher_id: t1(),
                reservation_id: "never".into(),
                actual_units: 1,
            })
            .await
            .map(drop),
        Rpc::Release => gate
            .release(ReleaseRequest {
                school_id: s(),
                teacher_id: t1(),
                reservation_id: "never".into(),
            })
            .await
            .map(drop),
        Rpc::GetUsage => gate
            .get_usage(GetUsageRequest {
                school_id: s(),
                teacher_id: t1(),
            })
            .await
            .map(drop),
        Rpc::SyncUsage => gate
            .sync_usage(SyncUsageRequest {
                school_id: s(),
                events: vec![UsageEvent {
                    event_id: "matrix-sync".into(),
                    teacher_id: t1(),
                    service_type: svc(),
                    units: 1,
                    model: String::new(),
                    occurred_at_ms: now_ms(),
                }],
            })
            .await
            .map(drop),
        Rpc::BulkIncrement => gate
            .bulk_increment(BulkIncrementRequest {
                school_id: s(),
                teacher_id: t1(),
                batch_id: "matrix-bulk".into(),
                counts: vec![FeatureCount {
                    feature: svc(),
                    count: 1,
                }],
                occurred_at_ms: 0,
                model: String::new(),
            })
            .await
            .map(drop),
        Rpc::CreateSchool => admin
            .create_school(CreateSchoolRequest {
                school_id: format!("{school}-new"),
                name: "New".into(),
                tier: "k12".into(),
                billing_anchor_day: 1,
                borrowing_enabled: false,
                pools: vec![],
                changed_by: String::new(),
                self_service_requests: false,
            })
            .await
            .map(drop),
        Rpc::GetSchool => admin
            .get_school(GetSchoolRequest { school_id: s() })
            .await
            .map(drop),
        Rpc::ListSchools => admin
            .list_schools(ListSchoolsRequest {
                tier: String::new(),
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .map(drop),
        Rpc::UpdateSchoolSettings => admin
            .update_school_settings(UpdateSchoolSettingsRequest {
                school_id: s(),
                billing_anchor_day: None,
                borrowing_enabled: Some(false),
                self_service_requests: None,
                name: None,
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::SetPool => admin
            .set_pool(SetPoolRequest {
                school_id: s(),
                service_type: svc(),
                cycle_units: 1000,
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::SetAllocation => allocate(admin, school, "t1", 10, "normal").await.map(drop),
        Rpc::BulkSetAllocations => admin
            .bulk_set_allocations(BulkSetAllocationsRequest {
                school_id: s(),
                allocations: vec![AllocationSpec {
                    teacher_id: t1(),
                    service_type: svc(),
                    allocated_units: 10,
                    priority: String::new(),
                    auto_renew: Some(false),
                }],
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::RemoveAllocation => admin
            .remove_allocation(RemoveAllocationRequest {
                school_id: s(),
                teacher_id: "t9".into(),
                service_type: svc(),
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::SetAllocationStatus => admin
            .set_allocation_status(SetAllocationStatusRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: svc(),
                status: "active".into(),
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::ListAllocations => admin
            .list_allocations(ListAllocationsRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: String::new(),
            })
            .await
            .map(drop),
        Rpc::RequestIncrease => admin
            .request_increase(RequestIncreaseRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: svc(),
                units: 1,
                reason: "more".into(),
            })
            .await
            .map(drop),
        Rpc::ApproveRequest => admin
            .approve_request(ApproveRequestRequest {
                school_id: s(),
                request_id: 1000,
                units: 0,
                changed_by: String::new(),
                reason: String::new(),
            })
            .await
            .map(drop),
        Rpc::RejectRequest => admin
            .reject_request(RejectRequestRequest {
                school_id: s(),
                request_id: 1000,
                changed_by: String::new(),
                reason: "no".into(),
            })
            .await
            .map(drop),
        Rpc::ListRequests => admin
            .list_requests(ListRequestsRequest {
                school_id: s(),
                teacher_id: t1(),
                status: String::new(),
            })
            .await
            .map(drop),
        Rpc::ListHistory => admin
            .list_history(ListHistoryRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: String::new(),
                from_ms: 0,
                to_ms: 0,
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .map(drop),
        Rpc::VerifyHistory => admin
            .verify_history(VerifyHistoryRequest { school_id: s() })
            .await
            .map(drop),
        Rpc::GetUsageReport => admin
            .get_usage_report(UsageReportRequest {
                school_id: s(),
                teacher_id: t1(),
                service_type: String::new(),
                cycle: 0,
            })
            .await
            .map(drop),
        Rpc::GetUsageRollups => admin
            .get_usage_rollups(UsageRollupsRequest {
                school_id: s(),
                teacher_id: t1(),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::GetSuggestions => admin
            .get_suggestions(SuggestionsRequest {
                school_id: s(),
                service_type: String::new(),
            })
            .await
            .map(drop),
        Rpc::ListAlerts => admin
            .list_alerts(ListAlertsRequest { school_id: s() })
            .await
            .map(drop),
    }
}

/// What a caller may do, per RPC.
type Rights = Box<dyn Fn(Rpc) -> Expect>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Past authorization (the call itself may still be refused by a rule).
    Allowed,
    Denied,
    Unauthenticated,
}

fn gate_call(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::Consume
            | Rpc::Check
            | Rpc::Reserve
            | Rpc::Commit
            | Rpc::Release
            | Rpc::GetUsage
            | Rpc::SyncUsage
            | Rpc::BulkIncrement
    )
}

fn teacher_may(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::GetUsage
            | Rpc::ListAllocations
            | Rpc::RequestIncrease
            | Rpc::ListRequests
            | Rpc::ListHistory
            | Rpc::GetUsageReport
            | Rpc::GetUsageRollups
    )
}

fn principal_may(rpc: Rpc) -> bool {
    !matches!(rpc, Rpc::CreateSchool | Rpc::ListSchools)
        && (!gate_call(rpc) || rpc == Rpc::GetUsage)
}

fn outcome(result: &Result<(), tonic::Status>) -> Expect {
    match result {
        Err(s) if s.code() == Code::PermissionDenied => Expect::Denied,
        Err(s) if s.code() == Code::Unauthenticated => Expect::Unauthenticated,
        _ => Expect::Allowed,
    }
}

async fn history_len(admin: &mut AdminClient) -> u64 {
    admin
        .verify_history(VerifyHistoryRequest {
            school_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn every_role_gets_exactly_its_rights_on_every_rpc() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut root = server.admin().await;
    for school in ["a", "b"] {
        create_school(&mut root, school, 1000, false).await;
        allocate(&mut root, school, "t1", 100, "normal")
            .await
            .unwrap();
        root.update_school_settings(UpdateSchoolSettingsRequest {
            school_id: school.into(),
            billing_anchor_day: None,
            borrowing_enabled: None,
            self_service_requests: Some(true),
            name: None,
            changed_by: String::new(),
            reason: String::new(),
        })
        .await
        .unwrap();
    }
    let wrong_key = quotad::auth::Authenticator::new(b"another key that is thirty-two bytes long")
        .unwrap()
        .mint(
            "mallory",
            Role::Admin,
            &[],
            std::time::Duration::from_secs(60),
            2_000_000_000 - 100,
        )
        .unwrap();
    let callers: Vec<(&str, String, Rights)> = vec![
        (
            "principal of b",
            token("pb", Role::Principal, &["b"]),
            Box::new(|_| Expect::Denied),
        ),
        (
            "teacher t2 of a",
            token("t2", Role::Teacher, &["a"]),
            Box::new(|_| Expect::Denied),
        ),
        (
            "teacher t1 of b",
            token("t1", Role::Teacher, &["b"]),
            Box::new(|_| Expect::Denied),
        ),
        (
            "service of b",
            token("proxy-b", Role::Service, &["b"]),
            Box::new(|_| Expect::Denied),
        ),
        (
            "no token",
            String::new(),
            Box::new(|_| Expect::Unauthenticated),
        ),
        (
            "another key",
            wrong_key,
            Box::new(|_| Expect::Unauthenticated),
        ),
        (
            "garbage",
            "not.a.token".into(),
            Box::new(|_| Expect::Unauthenticated),
        ),
        // Those that may act on school a come last, so that the refusals above
        // are checked against a state nobody allowed has changed yet.
        (
            "teacher t1 of a",
            token("t1", Role::Teacher, &["a"]),
            Box::new(|rpc| {
                if teacher_may(rpc) {
                    Expect::Allowed
                } else {
                    Expect::Denied
                }
            }),
        ),
        (
            "service of a",
            token("proxy-a", Role::Service, &["a"]),
            Box::new(|rpc| {
                if gate_call(rpc) {
                    Expect::Allowed
                } else {
                    Expect::Denied
                }
            }),
        ),
        (
            "principal of a",
            token("pa", Role::Principal, &["a"]),
            Box::new(|rpc| {
                if principal_may(rpc) {
                    Expect::Allowed
                } else {
                    Expect::Denied
                }
            }),
        ),
        ("admin", admin_token(), Box::new(|_| Expect::Allowed)),
    ];

    let mut mismatches = Vec::new();
    for (who, token, expect) in &callers {
        let before = history_len(&mut root).await;
        let (mut admin, mut gate) = clients_as(server.addr, token).await;
        for &rpc in Rpc::ALL {
            let got = outcome(&call(rpc, "a", &mut admin, &mut gate).await);
            if got != expect(rpc) {
                mismatches.push(format!(
                    "{who} {rpc:?}: expected {:?}, got {got:?}",
                    expect(rpc)
                ));
            }
        }
        if !matches!(
            *who,
            "teacher t1 of a" | "service of a" | "principal of a" | "admin"
        ) {
            assert_eq!(
                history_len(&mut root).await,
                before,
                "{who}'s refused calls changed school a"
            );
            assert_eq!(
                used_units(&mut server.gate().await, "a", "t1").await,
                0,
                "{who} consumed"
            );
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn another_tenant_cannot_tell_whether_a_school_exists() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut root = server.admin().await;
    create_school(&mut root, "a", 100, false).await;
    let (mut admin, mut gate) =
        clients_as(server.addr, &token("pb", Role::Principal, &["b"])).await;
    let mut answers = Vec::new();
    for school in ["a", "does-not-exist"] {
        let got = admin
            .get_school(GetSchoolRequest {
                school_id: school.into(),
            })
            .await
            .unwrap_err();
        let usage = gate
            .get_usage(GetUsageRequest {
                school_id: school.into(),
                teacher_id: "t1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (got.code(), usage.code()),
            (Code::PermissionDenied, Code::PermissionDenied),
            "{school}"
        );
        answers.push((got.message().to_string(), usage.message().to_string()));
    }
    assert_eq!(
        answers[0], answers[1],
        "an existing and a missing school get the same refusal"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_and_says_so() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let expired = quotad::auth::Authenticator::new(KEY.as_bytes())
        .unwrap()
        .mint(
            "old",
            Role::Admin,
            &[],
            std::time::Duration::from_secs(60),
            1_000_000,
        )
        .unwrap();
    let (mut admin, _) = clients_as(server.addr, &expired).await;
    let got = admin
        .get_school(GetSchoolRequest {
            school_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated);
    assert!(got.message().contains("expired"), "{}", got.message());
    server.stop().await;
}

#[tokio::test]
async fn the_server_refuses_to_start_without_a_key_unless_told_it_is_a_dev_laptop() {
    let (_dir, data) = temp_dir();
    let config = quotad::config::Config {
        data_dir: data.clone(),
        ..quotad::config::Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = quotad::server::serve(
        quotad::server::Listeners {
            grpc: listener,
            metrics: None,
            rls: None,
        },
        config,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("insecure-dev"), "{refused}");

    // --insecure-dev: no token needed, every caller is an admin.
    let server = TestServer::start_with(quotad::config::Config {
        data_dir: data,
        insecure_dev: true,
        ..quotad::config::Config::default()
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = QuotaAdminClient::new(channel);
    let created = admin
        .create_school(CreateSchoolRequest {
            school_id: "dev".into(),
            name: "Dev".into(),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![],
            changed_by: "me".into(),
            self_service_requests: false,
        })
        .await;
    assert!(created.is_ok(), "{created:?}");
    server.stop().await;
}
