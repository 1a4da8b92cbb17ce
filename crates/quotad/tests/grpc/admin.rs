//! Administration through the real gRPC API: schools, settings, bulk and
//! removed slices, increase requests, the audit trail and usage reports.

use quotad::proto::*;
use tonic::Code;

use crate::common::{self, *};

fn settings(school_id: &str) -> UpdateSchoolSettingsRequest {
    UpdateSchoolSettingsRequest {
        school_id: school_id.into(),
        billing_anchor_day: None,
        borrowing_enabled: None,
        self_service_requests: None,
        name: None,
        changed_by: "principal".into(),
        reason: "test".into(),
    }
}

fn spec(teacher: &str, units: u64) -> AllocationSpec {
    AllocationSpec {
        teacher_id: teacher.into(),
        service_type: SERVICE.into(),
        allocated_units: units,
        priority: String::new(),
        auto_renew: Some(false),
    }
}

fn bulk(school_id: &str, allocations: Vec<AllocationSpec>) -> BulkSetAllocationsRequest {
    BulkSetAllocationsRequest {
        school_id: school_id.into(),
        allocations,
        changed_by: "principal".into(),
        reason: "csv import".into(),
    }
}

fn file(teacher: &str, units: u64) -> RequestIncreaseRequest {
    RequestIncreaseRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        service_type: SERVICE.into(),
        units,
        reason: "exam season".into(),
    }
}

fn approve(request_id: u64, units: u64) -> ApproveRequestRequest {
    ApproveRequestRequest {
        school_id: "oak".into(),
        request_id,
        units,
        changed_by: "principal".into(),
        reason: "ok".into(),
    }
}

async fn allocations(admin: &mut AdminClient, school_id: &str) -> Vec<(String, u64)> {
    admin
        .list_allocations(ListAllocationsRequest {
            school_id: school_id.into(),
            teacher_id: String::new(),
            service_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .allocations
        .into_iter()
        .map(|a| (a.teacher_id, a.allocated_units))
        .collect()
}

async fn history(admin: &mut AdminClient, teacher: &str) -> Vec<HistoryEntry> {
    admin
        .list_history(ListHistoryRequest {
            school_id: "oak".into(),
            teacher_id: teacher.into(),
            service_type: String::new(),
            from_ms: 0,
            to_ms: 0,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn schools_are_listed_by_tier_a_page_at_a_time() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    for id in ["s1", "s2", "s3", "s4", "s5"] {
        create_school(&mut admin, id, 10, false).await;
    }
    create_school_of(&mut admin, "p1", "preschool", 10).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_schools(ListSchoolsRequest {
                tier: "k12".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.schools.len() <= 2);
        seen.extend(page.schools.into_iter().map(|s| s.school_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["s1", "s2", "s3", "s4", "s5"]);
    let preschools = admin
        .list_schools(ListSchoolsRequest {
            tier: "preschool".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preschools.schools.len(), 1);
    assert_eq!(preschools.schools[0].tier, "preschool");
    let bad = admin
        .list_schools(ListSchoolsRequest {
            tier: "college".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn settings_change_borrowing_and_self_service_and_are_audited() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "high", 10, "high")
        .await
        .unwrap();
    let denied = decide(&mut gate, consume("oak", "high", 11, "e1")).await;
    assert!(!denied.allowed);

    let school = admin
        .update_school_settings(UpdateSchoolSettingsRequest {
            borrowing_enabled: Some(true),
            self_service_requests: Some(true),
            name: Some("Oak Primary".into()),
            ..settings("oak")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(school.borrowing_enabled && school.self_service_requests);
    assert_eq!(school.name, "Oak Primary");
    let allowed = decide(&mut gate, consume("oak", "high", 11, "e2")).await;
    assert!(
        allowed.allowed && allowed.borrowed_units == 1,
        "{allowed:?}"
    );

    let entries = history(&mut admin, "").await;
    let set = entries.iter().find(|e| e.action == "settings_set").unwrap();
    assert_eq!(set.before["borrowing_enabled"], "false");
    assert_eq!(set.after["borrowing_enabled"], "true");
    assert_eq!(set.after["name"], "Oak Primary");
    let nothing = admin
        .update_school_settings(settings("oak"))
        .await
        .unwrap_err();
    assert_eq!(nothing.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn bulk_allocation_is_all_or_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "a", 50, "normal")
        .await
        .unwrap();

    // 50 + 30 + 21 > 100: refused, and nothing of it is applied.
    let refused = admin
        .bulk_set_allocations(bulk("oak", vec![spec("b", 30), spec("c", 21)]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("1 over"),
        "{}",
        refused.message()
    );
    assert_eq!(
        allocations(&mut admin, "oak").await,
        [("a".to_string(), 50)]
    );

    let bad_line = admin
        .bulk_set_allocations(bulk(
            "oak",
            vec![
                spec("b", 10),
                AllocationSpec {
                    priority: "urgent".into(),
                    ..spec("c", 1)
                },
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_line.code(), Code::InvalidArgument);
    assert!(
        bad_line.message().contains("allocations[2]"),
        "{}",
        bad_line.message()
    );
    assert_eq!(allocations(&mut admin, "oak").await.len(), 1);

    // Shrinking a to 20 makes room for b and c in the same call.
    let set = admin
        .bulk_set_allocations(bulk(
            "oak",
            vec![spec("a", 20), spec("b", 40), spec("c", 40)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.allocations.len(), 3);
    assert_eq!(
        allocations(&mut admin, "oak").await,
        [
            ("a".to_string(), 20),
            ("b".to_string(), 40),
            ("c".to_string(), 40)
        ]
    );
    let school = common::school(&mut admin, "oak").await;
    assert_eq!(school.pools[0].allocated_units, 100);
    // The teachers' actors have the new terms: c can spend its 40.
    let mut gate = server.gate().await;
    let d = decide(&mut gate, consume("oak", "c", 40, "c1")).await;
    assert!(d.allowed, "{d:?}");
    server.stop().await;
}

/// A slice's (priority, auto_renew) as the server answers it.
fn terms(allocation: &Allocation) -> (&str, bool) {
    (allocation.priority.as_str(), allocation.auto_renew)
}

/// SetAllocation and every entry of BulkSetAllocations treat a field left
/// out the same way: an empty priority and an unset auto_renew keep the
/// slice's own; a new slice starts at normal, without auto-renew.
#[tokio::test]
async fn fields_left_out_keep_the_slices_priority_and_auto_renew() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    let set = |units: u64, priority: &str, auto_renew: Option<bool>| SetAllocationRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
        service_type: SERVICE.into(),
        allocated_units: units,
        priority: priority.into(),
        auto_renew,
        changed_by: "principal".into(),
        reason: "test".into(),
    };
    let mut set_allocation = async |request: SetAllocationRequest| {
        admin.set_allocation(request).await.unwrap().into_inner()
    };
    // A new slice with nothing named: the defaults.
    let new = set_allocation(set(10, "", None)).await;
    assert_eq!(terms(&new), ("normal", false));
    let named = set_allocation(set(10, "high", Some(true))).await;
    assert_eq!(terms(&named), ("high", true));
    // Only the units: priority and auto-renew stay (auto-renew was turned
    // off here before proto3 optional).
    let kept = set_allocation(set(12, "", None)).await;
    assert_eq!((kept.allocated_units, terms(&kept)), (12, ("high", true)));
    // An explicit false turns it off, and keeps the priority.
    let off = set_allocation(set(12, "", Some(false))).await;
    assert_eq!(terms(&off), ("high", false));

    let entry =
        |teacher: &str, units: u64, priority: &str, auto_renew: Option<bool>| AllocationSpec {
            teacher_id: teacher.into(),
            service_type: SERVICE.into(),
            allocated_units: units,
            priority: priority.into(),
            auto_renew,
        };
    let answer = admin
        .bulk_set_allocations(bulk(
            "oak",
            vec![
                entry("ms-lee", 5, "", Some(true)),
                entry("mr-ng", 5, "", None),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    // ms-lee keeps "high" (a bulk entry's empty priority used to set
    // "normal"); mr-ng is new: the defaults.
    assert_eq!(terms(&answer.allocations[0]), ("high", true));
    assert_eq!(terms(&answer.allocations[1]), ("normal", false));
    let answer = admin
        .bulk_set_allocations(bulk(
            "oak",
            vec![entry("ms-lee", 6, "", None), entry("mr-ng", 6, "low", None)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(terms(&answer.allocations[0]), ("high", true));
    assert_eq!(terms(&answer.allocations[1]), ("low", false));
    // What the answers said is what the slices are (the teachers' actors
    // enforce the same terms the school recorded).
    let listed = admin
        .list_allocations(ListAllocationsRequest {
            school_id: "oak".into(),
            teacher_id: String::new(),
            service_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .allocations;
    let listed: Vec<(&str, (&str, bool))> = listed
        .iter()
        .map(|a| (a.teacher_id.as_str(), terms(a)))
        .collect();
    assert_eq!(
        listed,
        [("mr-ng", ("low", false)), ("ms-lee", ("high", true))]
    );
    let mut gate = server.gate().await;
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (
            usage.services[0].priority.as_str(),
            usage.services[0].auto_renew
        ),
        ("high", true)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_removed_slice_returns_its_units_unless_it_was_used() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "a", 60, "normal")
        .await
        .unwrap();
    allocate(&mut admin, "oak", "b", 40, "normal")
        .await
        .unwrap();
    gate.consume(consume("oak", "b", 1, "b1")).await.unwrap();
    let remove = |teacher: &str| RemoveAllocationRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        service_type: SERVICE.into(),
        changed_by: "principal".into(),
        reason: "left".into(),
    };
    let used = admin.remove_allocation(remove("b")).await.unwrap_err();
    assert_eq!(used.code(), Code::FailedPrecondition, "{used:?}");
    admin.remove_allocation(remove("a")).await.unwrap();
    let school = common::school(&mut admin, "oak").await;
    assert_eq!(
        (
            school.pools[0].allocated_units,
            school.pools[0].available_units
        ),
        (40, 60)
    );
    let d = decide(&mut gate, consume("oak", "a", 1, "a1")).await;
    assert_eq!(d.reason(), DenyReason::NoAllocation);
    let again = admin.remove_allocation(remove("a")).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn increase_requests_are_filed_approved_in_part_or_rejected_with_a_reason() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    let off = admin
        .request_increase(file("ms-lee", 20))
        .await
        .unwrap_err();
    assert_eq!(off.code(), Code::FailedPrecondition);
    assert!(off.message().contains("self-service"), "{}", off.message());
    admin
        .update_school_settings(UpdateSchoolSettingsRequest {
            self_service_requests: Some(true),
            ..settings("oak")
        })
        .await
        .unwrap();

    let filed = admin
        .request_increase(file("ms-lee", 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (filed.status.as_str(), filed.requested_units),
        ("pending", 20)
    );
    assert!(filed.expires_at_ms > filed.created_at_ms);
    let no_reason = admin
        .request_increase(RequestIncreaseRequest {
            reason: " ".into(),
            ..file("ms-lee", 5)
        })
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);

    let too_much = admin
        .approve_request(approve(filed.request_id, 21))
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::InvalidArgument);
    let approved = admin
        .approve_request(approve(filed.request_id, 15))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (approved.status.as_str(), approved.approved_units),
        ("approved", 15)
    );
    assert_eq!(
        allocations(&mut admin, "oak").await,
        [("ms-lee".to_string(), 25)]
    );
    let twice = admin
        .approve_request(approve(filed.request_id, 1))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);

    // More than the pool has left: refused, and the request stays pending.
    let big = admin
        .request_increase(file("ms-lee", 80))
        .await
        .unwrap()
        .into_inner();
    let short = admin
        .approve_request(approve(big.request_id, 0))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::FailedPrecondition, "{short:?}");
    let pending = admin
        .list_requests(ListRequestsRequest {
            school_id: "oak".into(),
            teacher_id: String::new(),
            status: "pending".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(
        pending.iter().map(|r| r.request_id).collect::<Vec<_>>(),
        [big.request_id]
    );

    let reject = |reason: &str| RejectRequestRequest {
        school_id: "oak".into(),
        request_id: big.request_id,
        changed_by: "principal".into(),
        reason: reason.into(),
    };
    assert_eq!(
        admin.reject_request(reject("")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let rejected = admin
        .reject_request(reject("the budget is spent"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rejected.status.as_str(), rejected.decision_reason.as_str()),
        ("rejected", "the budget is spent")
    );

    let actions: Vec<String> = history(&mut admin, "ms-lee")
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "allocation_set",
            "request_filed",
            "allocation_set",
            "request_approved",
            "request_filed",
            "request_rejected"
        ]
    );
    let unknown = admin.approve_request(approve(99, 0)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn the_audit_trail_pages_filters_and_verifies() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    for i in 1..=25 {
        allocate(&mut admin, "oak", "ms-lee", i, "normal")
            .await
            .unwrap();
        allocate(&mut admin, "oak", "mr-ng", i, "normal")
            .await
            .unwrap();
    }
    let mut lee = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_history(ListHistoryRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                service_type: SERVICE.into(),
                from_ms: 0,
                to_ms: 0,
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        lee.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(lee.len(), 25);
    // Who: the token's subject, not the `changed_by` the client claimed.
    assert!(lee
        .iter()
        .all(|e| e.teacher_id == "ms-lee" && e.actor == "test-admin"));
    assert!(lee.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(lee[24].before["allocated_units"], "24");
    assert_eq!(lee[24].after["allocated_units"], "25");
    assert_eq!(lee[0].hash.len(), 64);

    let verified = admin
        .verify_history(VerifyHistoryRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{verified:?}");
    assert_eq!(verified.entries, 51);
    server.stop().await;
}

#[tokio::test]
async fn an_entry_edited_on_disk_is_found_by_verify() {
    use quotad::storage::{codec, LogStore, SledLog};
    use quotad_core::State;

    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    for units in [10, 20, 30] {
        allocate(&mut admin, "oak", "ms-lee", units, "normal")
            .await
            .unwrap();
    }
    drop(admin);
    server.stop().await; // writes the final snapshot

    {
        let store = SledLog::open(&data).unwrap();
        let (seq, bytes) = store
            .read_snapshot()
            .unwrap()
            .expect("a snapshot after a graceful stop");
        let mut state: State = codec::decode(&bytes).unwrap();
        let school = state.schools.values_mut().next().unwrap();
        // Someone "corrects" the second allocation in place.
        school.history.entries_mut()[2]
            .after
            .insert("allocated_units".into(), "200".into());
        store
            .write_snapshot(seq, &codec::encode(&state).unwrap())
            .unwrap();
        store.flush().unwrap();
    }

    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    let verified = admin
        .verify_history(VerifyHistoryRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!verified.intact);
    assert_eq!(verified.first_bad_seq, 3);
    assert!(verified.problem.contains("changed"), "{}", verified.problem);
    server.stop().await;
}

#[tokio::test]
async fn an_individual_account_has_the_whole_pool_and_no_allocation_management() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school_of(&mut admin, "sam", "individual", 50).await;
    let usage = common::usage(&mut gate, "sam", "sam").await;
    assert_eq!(
        (
            usage.services[0].allocated_units,
            usage.services[0].auto_renew
        ),
        (50, true)
    );
    let d = decide(&mut gate, consume("sam", "sam", 50, "e1")).await;
    assert!(d.allowed);

    let refused = allocate(&mut admin, "sam", "sam", 60, "normal")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("individual"),
        "{}",
        refused.message()
    );
    let bulk_refused = admin
        .bulk_set_allocations(bulk("sam", vec![spec("sam", 10)]))
        .await
        .unwrap_err();
    assert_eq!(bulk_refused.code(), Code::FailedPrecondition);
    let status = admin
        .set_allocation_status(SetAllocationStatusRequest {
            school_id: "sam".into(),
            teacher_id: "sam".into(),
            service_type: SERVICE.into(),
            status: "suspended".into(),
            changed_by: "x".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // The slice follows the subscription, up and down (not below what was used).
    let set_pool = |units| SetPoolRequest {
        school_id: "sam".into(),
        service_type: SERVICE.into(),
        cycle_units: units,
        changed_by: "billing".into(),
        reason: "plan change".into(),
    };
    admin.set_pool(set_pool(80)).await.unwrap();
    assert_eq!(
        allocations(&mut admin, "sam").await,
        [("sam".to_string(), 80)]
    );
    admin.set_pool(set_pool(60)).await.unwrap();
    assert_eq!(
        allocations(&mut admin, "sam").await,
        [("sam".to_string(), 60)]
    );
    let below_used = admin.set_pool(set_pool(40)).await.unwrap_err();
    assert_eq!(below_used.code(), Code::FailedPrecondition);
    server.stop().await;
}

/// Found by the fuzz suite (tests/fuzz): an individual account whose usage
/// ran past its slice (late usage is charged as overage) could not follow
/// a growing pool: the pool grew, then the slice's change was refused, and
/// the refused SetPool had changed the pool. A change that keeps or grows a
/// slice is never refused for what was used; a shrink below it is refused
/// and changes nothing.
#[tokio::test]
async fn a_slice_that_ran_over_may_grow_and_a_refused_change_leaves_the_pool_as_it_was() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school_of(&mut admin, "sam", "individual", 10).await;
    let synced = gate
        .sync_usage(SyncUsageRequest {
            school_id: "sam".into(),
            events: vec![UsageEvent {
                event_id: "offline-1".into(),
                teacher_id: "sam".into(),
                service_type: SERVICE.into(),
                units: 15,
                model: "claude".into(),
                occurred_at_ms: common::now_ms(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        synced.results[0].status,
        SyncStatus::AcceptedOverQuota as i32
    );
    let set_pool = |units| SetPoolRequest {
        school_id: "sam".into(),
        service_type: SERVICE.into(),
        cycle_units: units,
        changed_by: "billing".into(),
        reason: "plan change".into(),
    };
    let pool_and_slice = async |admin: &mut AdminClient| {
        let pool = common::school(admin, "sam").await.pools[0].cycle_units;
        (pool, allocations(admin, "sam").await)
    };
    // Used 15 of 10: growing to 12 is allowed, pool and slice together.
    admin.set_pool(set_pool(12)).await.unwrap();
    assert_eq!(
        pool_and_slice(&mut admin).await,
        (12, vec![("sam".to_string(), 12)])
    );
    let entries = async |admin: &mut AdminClient| {
        let request = ListHistoryRequest {
            school_id: "sam".into(),
            teacher_id: String::new(),
            service_type: String::new(),
            from_ms: 0,
            to_ms: 0,
            page_size: 1000,
            page_token: String::new(),
        };
        admin
            .list_history(request)
            .await
            .unwrap()
            .into_inner()
            .entries
            .len()
    };
    let entries_before = entries(&mut admin).await;
    let refused = admin.set_pool(set_pool(5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        pool_and_slice(&mut admin).await,
        (12, vec![("sam".to_string(), 12)]),
        "a refused change changed the pool or the slice"
    );
    assert_eq!(entries(&mut admin).await, entries_before);
    server.stop().await;
}

#[tokio::test]
async fn the_usage_report_sums_per_teacher_and_service() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "a", 30, "normal")
        .await
        .unwrap();
    allocate(&mut admin, "oak", "b", 20, "normal")
        .await
        .unwrap();
    gate.consume(consume("oak", "a", 7, "a1")).await.unwrap();
    gate.consume(consume("oak", "b", 5, "b1")).await.unwrap();
    let report = |teacher: &str, cycle: CycleChoice| UsageReportRequest {
        school_id: "oak".into(),
        teacher_id: teacher.into(),
        service_type: String::new(),
        cycle: cycle.into(),
    };
    let now = admin
        .get_usage_report(report("", CycleChoice::Current))
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<(&str, u64, u64)> = now
        .rows
        .iter()
        .map(|r| (r.teacher_id.as_str(), r.allocated_units, r.used_units))
        .collect();
    assert_eq!(rows, [("a", 30, 7), ("b", 20, 5)]);
    assert_eq!(
        (now.totals[0].allocated_units, now.totals[0].used_units),
        (50, 12)
    );
    assert!(now.cycle_end_ms > now.cycle_start_ms);
    let one = admin
        .get_usage_report(report("b", CycleChoice::Current))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.rows.len(), 1);
    let previous = admin
        .get_usage_report(report("", CycleChoice::Previous))
        .await
        .unwrap()
        .into_inner();
    assert!(
        previous.rows.is_empty(),
        "nothing was used before this cycle"
    );
    assert_eq!(previous.cycle_end_ms, now.cycle_start_ms);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admin_changes_and_consumes_never_over_allocate_the_pool() {
    const POOL: u64 = 500;
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", POOL, false).await;
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let (mut admin, mut gate) = (server.admin().await, server.gate().await);
        tasks.push(tokio::spawn(async move {
            for i in 0..30u64 {
                let teacher = format!("t{}", (w + i) % 8);
                let units = (w * 7 + i * 13) % 120;
                match i % 3 {
                    0 => {
                        let _ = admin
                            .bulk_set_allocations(bulk(
                                "oak",
                                vec![
                                    spec(&teacher, units),
                                    spec(&format!("t{}", (w + i + 1) % 8), units / 2),
                                ],
                            ))
                            .await;
                    }
                    1 => {
                        let _ = allocate(&mut admin, "oak", &teacher, units, "normal").await;
                    }
                    _ => {
                        let _ = gate
                            .consume(consume("oak", &teacher, 1, &format!("w{w}-{i}")))
                            .await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let school = common::school(&mut admin, "oak").await;
    let listed: u64 = allocations(&mut admin, "oak")
        .await
        .iter()
        .map(|(_, u)| u)
        .sum();
    assert!(school.pools[0].allocated_units <= POOL);
    assert_eq!(
        listed, school.pools[0].allocated_units,
        "the teachers' slices add up to the pool's count"
    );
    let verified = admin
        .verify_history(VerifyHistoryRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact);
    server.stop().await;
}
