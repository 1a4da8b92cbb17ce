//! The rules of synced (late-reported) usage, on the same simulator as the
//! other rule tests: each rule gets a test, and replay must reach the live state.

use super::cycle::ms;
use super::tests::*;
use super::*;

const HOUR_MS: i64 = 3_600_000;

fn sim_with_slice(units: u64) -> Sim {
    let mut sim = Sim::new(100, false, now());
    sim.allocate("t1", units, Priority::Normal, true, now())
        .unwrap();
    sim
}

#[test]
fn a_synced_event_inside_the_slice_is_accepted_and_counted() {
    let mut sim = sim_with_slice(10);
    let outcome = sim.sync("t1", 4, "e1", now() - HOUR_MS, now());
    let cycle_start_ms = sim.account("t1").unwrap().cycle_start_ms;
    assert_eq!(outcome, SyncOutcome::Accepted { cycle_start_ms });
    assert_eq!(sim.slice("t1").used_units, 4);
    assert_eq!(sim.slice("t1").overage_units, 0);
    assert_eq!(sim.replayed(), sim.state);
}

#[test]
fn a_synced_event_past_the_slice_is_charged_whole_with_its_overage_recorded() {
    let mut sim = sim_with_slice(10);
    assert!(sim.consume("t1", 8, "online", now()).allowed);
    let outcome = sim.sync("t1", 5, "offline", now() - HOUR_MS, now());
    assert!(matches!(
        outcome,
        SyncOutcome::AcceptedOverQuota {
            overage_units: 3,
            ..
        }
    ));
    let slice = sim.slice("t1");
    assert_eq!((slice.used_units, slice.overage_units), (13, 3));
    // A consume after it is refused: the slice is spent.
    assert!(!sim.consume("t1", 1, "after", now()).allowed);
    assert_eq!(sim.replayed(), sim.state);
}

#[test]
fn a_suspended_slice_still_counts_usage_that_already_happened() {
    let mut sim = sim_with_slice(10);
    sim.set_status("t1", SliceStatus::Suspended, now());
    let outcome = sim.sync("t1", 2, "e1", now() - HOUR_MS, now());
    assert!(matches!(outcome, SyncOutcome::Accepted { .. }));
    assert_eq!(sim.slice("t1").used_units, 2);
}

#[test]
fn an_event_consumed_online_is_a_duplicate_when_synced() {
    let mut sim = sim_with_slice(10);
    assert!(sim.consume("t1", 3, "e1", now()).allowed);
    let before = sim.slice("t1");
    assert_eq!(
        sim.sync("t1", 3, "e1", now(), now()),
        SyncOutcome::Duplicate
    );
    assert_eq!(
        sim.sync("t1", 3, "e1", now(), now()),
        SyncOutcome::Duplicate
    );
    assert_eq!(sim.slice("t1"), before);
}

#[test]
fn a_synced_event_is_a_duplicate_for_consume_too() {
    let mut sim = sim_with_slice(10);
    sim.sync("t1", 3, "e1", now() - HOUR_MS, now());
    let answer = sim.consume("t1", 3, "e1", now());
    assert!(answer.duplicate);
    assert_eq!(sim.slice("t1").used_units, 3);
}

#[test]
fn an_event_of_last_cycle_is_charged_to_last_cycle() {
    let mut sim = sim_with_slice(10);
    let last_cycle_start_ms = sim.account("t1").unwrap().cycle_start_ms;
    sim.consume("t1", 6, "before-rollover", now());
    let happened_ms = ms("2026-11-30T23:00:00Z");
    let arrived_ms = ms("2026-12-02T09:00:00Z");
    let outcome = sim.sync("t1", 7, "late", happened_ms, arrived_ms);
    assert_eq!(
        outcome,
        SyncOutcome::AcceptedOverQuota {
            cycle_start_ms: last_cycle_start_ms,
            overage_units: 3
        }
    );
    let slice = sim.slice("t1");
    assert_eq!(slice.used_units, 0, "nothing charged to the new cycle");
    assert_eq!(slice.previous.cycle_start_ms, last_cycle_start_ms);
    assert_eq!(slice.previous.used_units, 13);
    assert_eq!(slice.previous.overage_units, 3);
    assert_eq!(sim.replayed(), sim.state);
}

#[test]
fn an_event_of_this_cycle_after_a_rollover_is_charged_to_this_cycle() {
    let mut sim = sim_with_slice(10);
    let arrived_ms = ms("2026-12-02T09:00:00Z");
    let outcome = sim.sync("t1", 2, "e1", ms("2026-12-01T08:00:00Z"), arrived_ms);
    assert_eq!(
        outcome,
        SyncOutcome::Accepted {
            cycle_start_ms: ms("2026-12-01T00:00:00Z")
        }
    );
    assert_eq!(sim.slice("t1").used_units, 2);
}

#[test]
fn events_older_than_the_window_are_rejected_as_too_old() {
    let mut sim = sim_with_slice(10);
    let window_ms = sim.limits.idempotency_window_ms;
    let outcome = sim.sync("t1", 1, "old", now() - window_ms - 1, now());
    assert!(
        matches!(&outcome, SyncOutcome::Rejected { reason: SyncRejection::TooOld, message } if message.contains("idempotency window")),
        "{outcome:?}"
    );
    assert_eq!(sim.slice("t1").used_units, 0);
}

#[test]
fn events_before_the_previous_cycle_are_rejected_as_too_old() {
    let mut sim = sim_with_slice(10);
    sim.limits.idempotency_window_ms = 100 * 24 * HOUR_MS;
    sim.consume("t1", 1, "nov", now());
    sim.consume("t1", 1, "dec", ms("2026-12-05T00:00:00Z"));
    let outcome = sim.sync(
        "t1",
        1,
        "oct",
        ms("2026-10-30T00:00:00Z"),
        ms("2027-01-02T00:00:00Z"),
    );
    assert!(matches!(
        outcome,
        SyncOutcome::Rejected {
            reason: SyncRejection::TooOld,
            ..
        }
    ));
}

#[test]
fn events_in_the_future_or_without_a_time_are_bad_input() {
    let mut sim = sim_with_slice(10);
    let future_ms = now() + sim.limits.clock_skew_ms_max + 1;
    for occurred_at_ms in [future_ms, 0, -5] {
        let outcome = sim.sync("t1", 1, "e1", occurred_at_ms, now());
        assert!(
            matches!(
                outcome,
                SyncOutcome::Rejected {
                    reason: SyncRejection::BadInput,
                    ..
                }
            ),
            "{occurred_at_ms}: {outcome:?}"
        );
    }
    let zero_units = sim.sync("t1", 0, "e2", now(), now());
    assert!(matches!(
        zero_units,
        SyncOutcome::Rejected {
            reason: SyncRejection::BadInput,
            ..
        }
    ));
    assert_eq!(sim.slice("t1").used_units, 0);
}

#[test]
fn a_teacher_without_a_slice_in_the_events_cycle_is_an_unknown_allocation() {
    let mut sim = Sim::new(100, false, now());
    sim.allocate("t1", 10, Priority::Normal, true, now())
        .unwrap();
    // t2 gets a slice only in December: a November event has no slice to go to.
    sim.allocate("t2", 10, Priority::Normal, true, ms("2026-12-01T10:00:00Z"))
        .unwrap();
    let outcome = sim.sync(
        "t2",
        1,
        "e1",
        ms("2026-11-30T10:00:00Z"),
        ms("2026-12-02T10:00:00Z"),
    );
    assert!(matches!(
        outcome,
        SyncOutcome::Rejected {
            reason: SyncRejection::UnknownAllocation,
            ..
        }
    ));
}

#[test]
fn an_account_idle_through_a_cycle_counts_a_late_event_in_that_cycle_not_in_an_older_one() {
    let mut sim = sim_with_slice(10);
    sim.limits.idempotency_window_ms = 100 * 24 * HOUR_MS;
    // The account counts in November, then nothing until January. It rolls
    // through December as its school did (cycles follow each other whenever
    // the rollover is noticed), so December is its previous cycle: a
    // December event is charged there, and November's totals are not touched.
    sim.consume("t1", 1, "nov", now());
    let outcome = sim.sync(
        "t1",
        1,
        "dec",
        ms("2026-12-20T00:00:00Z"),
        ms("2027-01-02T00:00:00Z"),
    );
    assert_eq!(
        outcome,
        SyncOutcome::Accepted {
            cycle_start_ms: ms("2026-12-01T00:00:00Z")
        }
    );
    let previous = sim.slice("t1").previous;
    assert_eq!(previous.cycle_start_ms, ms("2026-12-01T00:00:00Z"));
    assert_eq!(previous.used_units, 1, "the December event, not November's");
}

#[test]
fn an_event_denied_online_is_charged_when_synced_because_the_device_went_ahead() {
    let mut sim = sim_with_slice(10);
    assert!(sim.consume("t1", 8, "before", now()).allowed);
    // Denied, but the answer never reached the device, which journaled it.
    assert!(!sim.consume("t1", 5, "lost-answer", now()).allowed);
    let outcome = sim.sync("t1", 5, "lost-answer", now(), now());
    assert!(matches!(
        outcome,
        SyncOutcome::AcceptedOverQuota {
            overage_units: 3,
            ..
        }
    ));
    assert_eq!(sim.slice("t1").used_units, 13);
    // Charged once: a second sync and a consume retry are duplicates now.
    assert_eq!(
        sim.sync("t1", 5, "lost-answer", now(), now()),
        SyncOutcome::Duplicate
    );
    assert!(sim.consume("t1", 5, "lost-answer", now()).duplicate);
    assert_eq!(sim.slice("t1").used_units, 13);
    assert_eq!(sim.replayed(), sim.state);
}
