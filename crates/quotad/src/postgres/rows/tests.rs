use std::sync::Arc;

use super::*;
use quotad_core::{
    BillingAnchor, Change, EventId, Priority, RuleLimits, SchoolConfig, SliceSet, Tier, Usage,
};

const DAY_MS: i64 = 24 * 3600 * 1000;
const NOV_1: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z

fn id<T>(parsed: Result<T, quotad_core::InvalidInput>) -> T {
    parsed.unwrap()
}

fn change() -> Change {
    Change {
        by: Arc::from("principal"),
        reason: Arc::from("test"),
        at_ms: NOV_1 + DAY_MS,
    }
}

fn school_created() -> Record {
    Record::SchoolCreated {
        config: SchoolConfig {
            id: id(SchoolId::parse("s1")),
            name: Arc::from("School One"),
            tier: Tier::K12,
            anchor: BillingAnchor::new(1).unwrap(),
            borrowing_enabled: false,
            self_service_requests: true,
        },
        cycle_start_ms: NOV_1,
        pools: vec![(id(ServiceType::parse("claude_messages")), 1000)],
        change: change(),
    }
}

fn allocation(teacher: &str, units: u64) -> Record {
    Record::AllocationSet {
        school_id: id(SchoolId::parse("s1")),
        teacher_id: id(TeacherId::parse(teacher)),
        service: id(ServiceType::parse("claude_messages")),
        allocated_units: units,
        priority: Priority::Normal,
        auto_renew: true,
        cycle_start_ms: NOV_1,
        change: change(),
        grant: None,
    }
}

fn charged(teacher: &str, event: &str, units: u64) -> Record {
    Record::UsageCharged(Usage {
        school_id: id(SchoolId::parse("s1")),
        teacher_id: id(TeacherId::parse(teacher)),
        service: id(ServiceType::parse("claude_messages")),
        source: UsageSource::Event(id(EventId::parse(event))),
        units,
        borrowed_units: 0,
        overage_units: 0,
        cycle_start_ms: NOV_1,
        occurred_at_ms: NOV_1 + 2 * DAY_MS,
        recorded_at_ms: NOV_1 + 2 * DAY_MS,
        model: Arc::from("claude"),
    })
}

/// Applies records in order, noting each, as the snapshot thread does.
fn run(state: &mut State, changes: &mut Changes, first_seq: u64, records: &[Record]) -> u64 {
    let mut seq = first_seq;
    for record in records {
        state.apply(seq, record).unwrap();
        changes.note(seq, record, state);
        seq += 1;
    }
    seq - 1
}

#[test]
fn a_delta_holds_the_changed_rows_and_the_usage_of_each_record() {
    let mut state = State::default();
    let mut changes = Changes::default();
    let last = run(
        &mut state,
        &mut changes,
        1,
        &[
            school_created(),
            allocation("t1", 100),
            allocation("t2", 50),
            charged("t1", "e1", 10),
            charged("t1", "e2", 5),
        ],
    );
    let delta = changes.take(&mut state, last).unwrap();
    assert_eq!(delta.wal_seq, 5);
    assert_eq!(delta.subscriptions.len(), 1);
    let pool = &delta.subscriptions[0];
    assert_eq!(
        (
            pool.pool.cycle_units,
            pool.pool.allocated_units,
            pool.used_units
        ),
        (1000, 150, 15)
    );
    assert_eq!(delta.allocations.len(), 2);
    assert_eq!(delta.teachers.len(), 2);
    assert_eq!(
        delta
            .usage
            .iter()
            .map(|u| (u.wal_seq, u.units, u.decision))
            .collect::<Vec<_>>(),
        [(4, 10, "allowed"), (5, 5, "allowed")]
    );
    // School created + two allocations.
    assert_eq!(delta.history.len(), 3);
    assert_eq!(delta.school_states.len(), 1);
    assert_eq!(delta.account_states.len(), 2);
    assert!(changes.is_empty(), "taking the delta starts over");
}

#[test]
fn the_next_delta_holds_only_what_changed_since_and_only_new_audit_entries() {
    let mut state = State::default();
    let mut changes = Changes::default();
    let last = run(
        &mut state,
        &mut changes,
        1,
        &[
            school_created(),
            allocation("t1", 100),
            allocation("t2", 50),
        ],
    );
    changes.take(&mut state, last).unwrap();
    let last = run(
        &mut state,
        &mut changes,
        4,
        &[charged("t2", "e1", 3), allocation("t2", 60)],
    );
    let delta = changes.take(&mut state, last).unwrap();
    assert_eq!(
        delta
            .teachers
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>(),
        ["t2"]
    );
    assert_eq!(delta.history.len(), 1, "only the new allocation's entry");
    assert_eq!(delta.history[0].1.seq, 4);
    assert_eq!(delta.usage.len(), 1);
}

#[test]
fn a_school_encoded_without_its_trail_decodes_whole_with_it() {
    let mut state = State::default();
    let mut changes = Changes::default();
    let last = run(
        &mut state,
        &mut changes,
        1,
        &[school_created(), allocation("t1", 100)],
    );
    let delta = changes.take(&mut state, last).unwrap();
    let school = &state.schools[&id(SchoolId::parse("s1"))];
    assert_eq!(school.history.len(), 2, "the state keeps its trail");
    let trail =
        AuditTrail::from_entries(delta.history.iter().map(|(_, e)| e.clone()).collect()).unwrap();
    let decoded = decode_school(&delta.school_states[0].1, trail).unwrap();
    assert_eq!(&decoded, school);
}

#[test]
fn everything_marks_every_school_teacher_and_request() {
    let mut state = State::default();
    let mut changes = Changes::default();
    let last = run(
        &mut state,
        &mut changes,
        1,
        &[
            school_created(),
            allocation("t1", 100),
            allocation("t2", 50),
        ],
    );
    let mut everything = Changes::everything(&state, HashMap::new());
    let delta = everything.take(&mut state, last).unwrap();
    assert_eq!(delta.account_states.len(), 2);
    assert_eq!(delta.history.len(), 3);
    assert!(
        delta.usage.is_empty(),
        "usage rows come from the WAL, not the state"
    );
    let _ = RuleLimits::default();
}

#[test]
fn a_bulk_change_marks_each_teacher_it_names() {
    let mut state = State::default();
    let mut changes = Changes::default();
    run(&mut state, &mut changes, 1, &[school_created()]);
    changes.take(&mut state, 1).unwrap();
    let bulk = Record::AllocationsSet {
        school_id: id(SchoolId::parse("s1")),
        slices: ["a", "b", "c"]
            .iter()
            .map(|t| SliceSet {
                teacher_id: id(TeacherId::parse(t)),
                service: id(ServiceType::parse("claude_messages")),
                allocated_units: 10,
                priority: Priority::Low,
                auto_renew: false,
            })
            .collect(),
        cycle_start_ms: NOV_1,
        change: change(),
    };
    run(&mut state, &mut changes, 2, &[bulk]);
    let delta = changes.take(&mut state, 2).unwrap();
    assert_eq!(delta.account_states.len(), 3);
    assert_eq!(delta.allocations.len(), 3);
}

#[test]
fn past_the_memory_bound_usage_rows_are_left_to_the_wal() {
    let mut state = State::default();
    let mut changes = Changes::default();
    run(
        &mut state,
        &mut changes,
        1,
        &[school_created(), allocation("t1", 100)],
    );
    let record = charged("t1", "e", 1);
    for seq in 0..=USAGE_ROWS_IN_MEMORY_MAX as u64 {
        changes.add_usage(3 + seq, &record);
    }
    assert!(changes.usage_in_wal_only());
    let delta = changes.take(&mut state, 2).unwrap();
    assert!(delta.usage.is_empty(), "the writer reads them from the WAL");
    assert!(
        !changes.usage_in_wal_only(),
        "the next delta starts in memory again"
    );
    changes.add_usage(9, &record);
    assert_eq!(changes.take(&mut state, 9).unwrap().usage.len(), 1);
}

#[test]
fn a_delta_that_cannot_be_built_takes_nothing_so_the_next_try_has_it_all() {
    let mut state = State::default();
    let mut changes = Changes::default();
    let last = run(
        &mut state,
        &mut changes,
        1,
        &[
            school_created(),
            allocation("t1", 100),
            charged("t1", "e1", 10),
        ],
    );
    let school_id = id(SchoolId::parse("s1"));
    let good_start = state.schools[&school_id].cycle_start_ms;
    // A cycle that cannot be computed makes the school's rows fail.
    state.schools.get_mut(&school_id).unwrap().cycle_start_ms = i64::MAX;
    assert!(changes.take(&mut state, last).is_err());
    state.schools.get_mut(&school_id).unwrap().cycle_start_ms = good_start;
    let delta = changes.take(&mut state, last).unwrap();
    assert_eq!(delta.usage.len(), 1, "the usage row was kept");
    assert_eq!(delta.school_states.len(), 1);
    assert_eq!(delta.account_states.len(), 1);
    assert_eq!(delta.history.len(), 2);
}
