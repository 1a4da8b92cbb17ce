//! The administration rules alone: the audit chain, increase requests, bulk
//! slices and individual accounts, driven by records with time passed in.

use std::sync::Arc;

use super::audit::HistoryFilter;
use super::cycle::ms;
use super::requests::REQUEST_TTL_MS;
use super::school::SYSTEM_ACTOR;
use super::*;

const SCHOOL: &str = "oak";

fn school_id() -> SchoolId {
    SchoolId::parse(SCHOOL).unwrap()
}
fn service(name: &str) -> ServiceType {
    ServiceType::parse(name).unwrap()
}
fn teacher(name: &str) -> TeacherId {
    TeacherId::parse(name).unwrap()
}
fn change(by: &str, reason: &str, at_ms: TimestampMs) -> Change {
    Change {
        by: Arc::from(by),
        reason: Arc::from(reason),
        at_ms,
    }
}

fn config(tier: Tier, self_service: bool) -> SchoolConfig {
    SchoolConfig {
        id: school_id(),
        name: Arc::from("Oak"),
        tier,
        anchor: BillingAnchor::new(1).unwrap(),
        borrowing_enabled: false,
        self_service_requests: self_service,
    }
}

/// A state and the records that made it, to replay.
struct Log {
    state: State,
    records: Vec<Record>,
    start_ms: TimestampMs,
}

impl Log {
    fn new(tier: Tier, self_service: bool) -> Self {
        let start_ms = ms("2026-11-01T00:00:00Z");
        let mut log = Log {
            state: State::default(),
            records: Vec::new(),
            start_ms,
        };
        log.apply(Record::SchoolCreated {
            config: config(tier, self_service),
            cycle_start_ms: start_ms,
            pools: vec![
                (service("claude_messages"), 100),
                (service("lesson_generation"), 50),
            ],
            change: change("admin", "new customer", start_ms),
        });
        log
    }

    fn apply(&mut self, record: Record) {
        let seq = self.records.len() as u64 + 1;
        self.state.apply(seq, &record).unwrap();
        self.records.push(record);
    }

    fn school(&self) -> &SchoolState {
        &self.state.schools[&school_id()]
    }

    fn history(&mut self) -> &mut AuditTrail {
        &mut self.state.schools.get_mut(&school_id()).unwrap().history
    }

    fn allocate(
        &mut self,
        name: &str,
        svc: &str,
        units: u64,
        at_ms: TimestampMs,
        grant: Option<Grant>,
    ) {
        self.apply(Record::AllocationSet {
            school_id: school_id(),
            teacher_id: teacher(name),
            service: service(svc),
            allocated_units: units,
            priority: Priority::Normal,
            auto_renew: false,
            cycle_start_ms: self.start_ms,
            change: change("principal", "term plan", at_ms),
            grant,
        });
    }

    fn file(&mut self, id: u64, name: &str, units: u64, at_ms: TimestampMs) {
        self.apply(Record::RequestFiled {
            school_id: school_id(),
            request_id: id,
            teacher_id: teacher(name),
            service: service("claude_messages"),
            units,
            change: change(name, "exam season", at_ms),
        });
    }
}

#[test]
fn every_admin_change_is_audited_with_who_why_and_the_values_before_and_after() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, true);
    log.allocate("ms-lee", "claude_messages", 10, t0, None);
    log.apply(Record::AllocationStatusSet {
        school_id: school_id(),
        teacher_id: teacher("ms-lee"),
        service: service("claude_messages"),
        status: SliceStatus::Suspended,
        cycle_start_ms: log.start_ms,
        change: change("principal", "review", t0 + 1),
    });
    log.file(1, "ms-lee", 8, t0 + 2);
    log.allocate(
        "ms-lee",
        "claude_messages",
        15,
        t0 + 3,
        Some(Grant {
            request_id: 1,
            units: 5,
        }),
    );
    log.apply(Record::PoolSet {
        school_id: school_id(),
        service: service("claude_messages"),
        cycle_units: 120,
        cycle_start_ms: log.start_ms,
        change: change("principal", "bought more", t0 + 4),
    });
    log.apply(Record::CycleRolledOver {
        school_id: school_id(),
        from_start_ms: log.start_ms,
        to_start_ms: ms("2026-12-01T00:00:00Z"),
        at_ms: ms("2026-12-01T00:00:01Z"),
    });

    let entries = log.school().history.entries();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "school_created",
            "allocation_set",
            "allocation_status_set",
            "request_filed",
            "allocation_set",
            "request_approved",
            "pool_set",
            "cycle_rolled_over"
        ]
    );
    let first_set = &entries[1];
    assert_eq!(
        (first_set.actor.as_ref(), first_set.reason.as_ref()),
        ("principal", "term plan")
    );
    assert!(
        first_set.before.is_empty(),
        "a new slice has nothing before"
    );
    assert_eq!(first_set.after["allocated_units"], "10");
    let grant_set = &entries[4];
    assert_eq!(grant_set.before["allocated_units"], "10");
    assert_eq!(grant_set.after["allocated_units"], "15");
    assert_eq!(
        grant_set.before["status"], "suspended",
        "the status is kept by a change of units"
    );
    let approved = &entries[5];
    assert_eq!(approved.before["requested_units"], "8");
    assert_eq!(approved.after["approved_units"], "5");
    assert_eq!(entries[6].before["cycle_units"], "100");
    assert_eq!(entries[6].after["cycle_units"], "120");
    assert_eq!(entries[7].actor.as_ref(), SYSTEM_ACTOR);
    assert_eq!(
        log.school().requests[&1].status,
        RequestStatus::Approved { units: 5 }
    );
    assert!(log.school().history.verify().is_ok());
}

#[test]
fn replaying_the_records_rebuilds_the_same_chain_hashes_included() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, true);
    log.allocate("ms-lee", "claude_messages", 10, t0, None);
    log.file(1, "ms-lee", 8, t0 + 1);
    log.apply(Record::RequestDecided {
        school_id: school_id(),
        request_id: 1,
        outcome: RequestOutcome::Rejected,
        change: change("principal", "budget is spent", t0 + 2),
    });
    let mut replayed = State::default();
    for (i, record) in log.records.iter().enumerate() {
        replayed.apply(i as u64 + 1, record).unwrap();
    }
    assert_eq!(replayed.schools[&school_id()].history, log.school().history);
    assert_eq!(log.school().requests[&1].status, RequestStatus::Rejected);
    assert_eq!(
        log.school().requests[&1].decision_reason.as_deref(),
        Some("budget is spent")
    );
}

#[test]
fn an_edited_removed_or_reordered_entry_breaks_the_chain_where_it_happened() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let build = || {
        let mut log = Log::new(Tier::K12, false);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            log.allocate(name, "claude_messages", 10, t0 + i as i64, None);
        }
        log
    };

    let mut edited = build();
    edited.history().entries_mut()[2]
        .after
        .insert("allocated_units".into(), "99".into());
    let broken = edited.school().history.verify().unwrap_err();
    assert_eq!(broken.seq, 3);
    assert!(broken.problem.contains("changed"), "{}", broken.problem);

    // Rewriting the entry's own hash does not help: the next entry's link breaks.
    let mut rehashed = build();
    let entry = &mut rehashed.history().entries_mut()[2];
    entry.actor = Arc::from("someone else");
    entry.hash = entry.compute_hash();
    assert_eq!(rehashed.school().history.verify().unwrap_err().seq, 4);

    let mut removed = build();
    removed.history().entries_mut().remove(1);
    assert_eq!(removed.school().history.verify().unwrap_err().seq, 2);

    let mut reordered = build();
    reordered.history().entries_mut().swap(1, 2);
    assert_eq!(reordered.school().history.verify().unwrap_err().seq, 2);
}

#[test]
fn history_filters_by_teacher_service_and_time_and_pages() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, false);
    for i in 0..5 {
        log.allocate(
            "ms-lee",
            "claude_messages",
            10 + i,
            t0 + i as i64 * 1000,
            None,
        );
        log.allocate(
            "mr-ng",
            "lesson_generation",
            10 + i,
            t0 + i as i64 * 1000,
            None,
        );
    }
    let history = &log.school().history;
    let lee = HistoryFilter {
        teacher_id: Some(teacher("ms-lee")),
        ..HistoryFilter::default()
    };
    let (page, next) = history.page(&lee, 0, 3);
    assert_eq!(page.len(), 3);
    assert!(page.iter().all(|e| e.teacher_id == Some(teacher("ms-lee"))));
    let (rest, end) = history.page(&lee, next.unwrap(), 3);
    assert_eq!((rest.len(), end), (2, None));
    assert!(rest[0].seq > page[2].seq);

    let lessons = HistoryFilter {
        service: Some(service("lesson_generation")),
        from_ms: Some(t0 + 1000),
        to_ms: Some(t0 + 3000),
        ..HistoryFilter::default()
    };
    let (page, _) = history.page(&lessons, 0, 100);
    let units: Vec<&str> = page
        .iter()
        .map(|e| e.after["allocated_units"].as_str())
        .collect();
    assert_eq!(units, ["11", "12"]);
}

#[test]
fn increase_requests_need_self_service_a_known_service_and_a_free_pending_slot() {
    let limits = RuleLimits::default();
    let t0 = ms("2026-11-02T09:00:00Z");
    let off = Log::new(Tier::K12, false);
    let refused = off.school().check_file_request(
        &teacher("ms-lee"),
        &service("claude_messages"),
        5,
        &limits,
    );
    assert!(matches!(refused, Err(RuleError::Precondition(m)) if m.contains("self-service")));

    let mut on = Log::new(Tier::K12, true);
    let unknown =
        on.school()
            .check_file_request(&teacher("ms-lee"), &service("homework_help"), 5, &limits);
    assert!(
        matches!(unknown, Err(RuleError::NotFound(_))),
        "{unknown:?}"
    );
    let zero =
        on.school()
            .check_file_request(&teacher("ms-lee"), &service("claude_messages"), 0, &limits);
    assert!(matches!(zero, Err(RuleError::Invalid(_))), "{zero:?}");
    for id in 1..=3 {
        let next = on
            .school()
            .check_file_request(&teacher("ms-lee"), &service("claude_messages"), 5, &limits)
            .unwrap();
        assert_eq!(next, id);
        on.file(id, "ms-lee", 5, t0);
    }
    let full =
        on.school()
            .check_file_request(&teacher("ms-lee"), &service("claude_messages"), 5, &limits);
    assert!(matches!(full, Err(RuleError::Precondition(m)) if m.contains("3 pending")));
    // Another teacher has slots of their own.
    assert_eq!(
        on.school()
            .check_file_request(&teacher("mr-ng"), &service("claude_messages"), 5, &limits)
            .unwrap(),
        4
    );
}

#[test]
fn approvals_grant_all_or_part_but_never_more_than_asked() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, true);
    log.file(1, "ms-lee", 8, t0);
    let request = log.school().pending_request(1).unwrap().clone();
    assert_eq!(SchoolState::grant_units(&request, 0).unwrap(), 8);
    assert_eq!(SchoolState::grant_units(&request, 3).unwrap(), 3);
    assert!(SchoolState::grant_units(&request, 9).is_err());
    assert!(matches!(
        log.school().pending_request(2),
        Err(RuleError::NotFound(_))
    ));

    log.allocate(
        "ms-lee",
        "claude_messages",
        3,
        t0 + 1,
        Some(Grant {
            request_id: 1,
            units: 3,
        }),
    );
    let decided = log.school().pending_request(1);
    assert!(matches!(decided, Err(RuleError::Precondition(m)) if m.contains("approved")));
}

#[test]
fn a_pending_request_expires_seven_days_after_it_was_filed() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, true);
    log.file(1, "ms-lee", 8, t0);
    log.file(2, "mr-ng", 8, t0 + 3_600_000);
    assert!(log
        .school()
        .due_expiries(t0 + REQUEST_TTL_MS - 1)
        .is_empty());
    assert_eq!(log.school().due_expiries(t0 + REQUEST_TTL_MS), [1]);
    log.apply(Record::RequestDecided {
        school_id: school_id(),
        request_id: 1,
        outcome: RequestOutcome::Expired,
        change: change(
            SYSTEM_ACTOR,
            "no decision within 7 days",
            t0 + REQUEST_TTL_MS,
        ),
    });
    assert_eq!(log.school().requests[&1].status, RequestStatus::Expired);
    assert!(
        log.school().due_expiries(t0 + REQUEST_TTL_MS).is_empty(),
        "an expired request expires once"
    );
    let last = log.school().history.entries().last().unwrap();
    assert_eq!(
        (last.action, last.actor.as_ref()),
        (AuditAction::RequestExpired, SYSTEM_ACTOR)
    );
}

#[test]
fn bulk_slices_are_checked_together_and_refused_whole() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, false);
    log.allocate("a", "claude_messages", 60, t0, None);
    let slice = |name: &str, svc: &str, units| SliceSet {
        teacher_id: teacher(name),
        service: service(svc),
        allocated_units: units,
        priority: Priority::Normal,
        auto_renew: false,
    };
    // a shrinks from 60 to 20, which makes room for b and c: fits.
    let fits = [
        slice("a", "claude_messages", 20),
        slice("b", "claude_messages", 40),
        slice("c", "claude_messages", 40),
    ];
    log.school().check_allocations(&fits).unwrap();
    let over = [
        slice("b", "claude_messages", 30),
        slice("c", "claude_messages", 11),
        slice("d", "lesson_generation", 50),
    ];
    let refused = log.school().check_allocations(&over).unwrap_err();
    assert!(
        matches!(&refused, RuleError::Precondition(m) if m.contains("1 over") && m.contains("claude_messages")),
        "{refused:?}"
    );
    let twice = [
        slice("b", "claude_messages", 1),
        slice("b", "claude_messages", 2),
    ];
    assert!(matches!(
        log.school().check_allocations(&twice),
        Err(RuleError::Invalid(_))
    ));
    let unknown = [slice("b", "homework_help", 1)];
    assert!(matches!(
        log.school().check_allocations(&unknown),
        Err(RuleError::NotFound(_))
    ));

    log.apply(Record::AllocationsSet {
        school_id: school_id(),
        slices: fits.to_vec(),
        cycle_start_ms: log.start_ms,
        change: change("principal", "import", t0 + 1),
    });
    let school = log.school();
    assert_eq!(
        school.pools[&service("claude_messages")].allocated_units,
        100
    );
    assert_eq!(
        log.state.accounts[&(school_id(), teacher("c"))].slices[&service("claude_messages")]
            .allocated_units,
        40
    );
    assert!(school.check_invariants().is_ok());
    assert_eq!(
        school.history.len(),
        1 + 1 + 3,
        "one entry per slice of the bulk change"
    );
}

#[test]
fn an_individual_account_refuses_allocation_management_and_requests() {
    let individual = Log::new(Tier::Individual, true);
    let config = &individual.school().config;
    assert!(
        matches!(config.check_managed(), Err(RuleError::Precondition(m)) if m.contains("individual"))
    );
    assert_eq!(config.owner(), Some(teacher(SCHOOL)));
    let request = individual.school().check_file_request(
        &teacher(SCHOOL),
        &service("claude_messages"),
        5,
        &RuleLimits::default(),
    );
    assert!(matches!(request, Err(RuleError::Precondition(_))));
    let k12 = Log::new(Tier::K12, true);
    assert!(k12.school().config.check_managed().is_ok());
    assert_eq!(k12.school().config.owner(), None);
}

#[test]
fn a_removed_slice_returns_its_units_to_the_pool() {
    let t0 = ms("2026-11-02T09:00:00Z");
    let mut log = Log::new(Tier::K12, false);
    log.allocate("a", "claude_messages", 60, t0, None);
    log.apply(Record::AllocationRemoved {
        school_id: school_id(),
        teacher_id: teacher("a"),
        service: service("claude_messages"),
        cycle_start_ms: log.start_ms,
        change: change("principal", "left the school", t0 + 1),
    });
    assert_eq!(
        log.school().pools[&service("claude_messages")].allocated_units,
        0
    );
    assert!(!log.state.accounts[&(school_id(), teacher("a"))]
        .slices
        .contains_key(&service("claude_messages")));
    let last = log.school().history.entries().last().unwrap();
    assert_eq!(last.before["allocated_units"], "60");
    assert!(last.after.is_empty());
}

#[test]
fn a_new_anchor_takes_effect_when_the_current_cycle_ends() {
    use super::cycle::next_cycle;
    let anchor_1 = BillingAnchor::new(1).unwrap();
    let anchor_15 = BillingAnchor::new(15).unwrap();
    let november = anchor_1.cycle_at(ms("2026-11-20T00:00:00Z")).unwrap();
    // No change: the same cycles as the anchor alone gives.
    assert_eq!(
        next_cycle(november, anchor_1, ms("2026-11-30T23:59:59Z")).unwrap(),
        None
    );
    assert_eq!(
        next_cycle(november, anchor_1, ms("2026-12-01T00:00:00Z")).unwrap(),
        Some(anchor_1.cycle_at(ms("2026-12-01T00:00:00Z")).unwrap())
    );
    // From the 1st to the 15th: November runs out whole, then a short cycle to the 15th.
    let switch = next_cycle(november, anchor_15, ms("2026-12-01T00:00:00Z"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (switch.start_ms, switch.end_ms),
        (ms("2026-12-01T00:00:00Z"), ms("2026-12-15T00:00:00Z"))
    );
    let after = next_cycle(switch, anchor_15, ms("2026-12-15T00:00:00Z"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (after.start_ms, after.end_ms),
        (ms("2026-12-15T00:00:00Z"), ms("2027-01-15T00:00:00Z"))
    );
    // Nobody called for weeks: the cycle that holds now, never one that starts before November ended.
    let late = next_cycle(november, anchor_15, ms("2026-12-20T00:00:00Z"))
        .unwrap()
        .unwrap();
    assert_eq!(late.start_ms, ms("2026-12-15T00:00:00Z"));

    // Through the records: the school and its accounts switch together, and it is audited.
    let mut log = Log::new(Tier::K12, false);
    log.allocate(
        "ms-lee",
        "claude_messages",
        10,
        ms("2026-11-02T00:00:00Z"),
        None,
    );
    log.apply(Record::SettingsSet {
        school_id: school_id(),
        name: None,
        borrowing_enabled: None,
        self_service_requests: None,
        next_anchor: Some(anchor_15),
        change: change(
            "principal",
            "align with the fiscal month",
            ms("2026-11-20T00:00:00Z"),
        ),
    });
    assert_eq!(log.school().next_anchor, Some(anchor_15));
    assert_eq!(
        log.school().cycle().unwrap(),
        november,
        "the current cycle is not cut short"
    );
    let account = &log.state.accounts[&(school_id(), teacher("ms-lee"))];
    assert_eq!(account.next_anchor, Some(anchor_15));
    let last = log.school().history.entries().last().unwrap();
    assert_eq!(
        (
            last.before["billing_anchor_day"].as_str(),
            last.after["next_billing_anchor_day"].as_str()
        ),
        ("1", "15")
    );
    log.apply(Record::CycleRolledOver {
        school_id: school_id(),
        from_start_ms: november.start_ms,
        to_start_ms: switch.start_ms,
        at_ms: switch.start_ms,
    });
    assert_eq!(
        (log.school().config.anchor, log.school().next_anchor),
        (anchor_15, None)
    );
    assert_eq!(log.school().cycle().unwrap(), switch);
    assert_eq!(log.school().previous_cycle_start_ms, november.start_ms);
    let account = &log.state.accounts[&(school_id(), teacher("ms-lee"))];
    assert_eq!(
        (account.anchor, account.cycle().unwrap()),
        (anchor_15, switch)
    );
}
