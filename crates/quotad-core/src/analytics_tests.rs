//! The analytics rules on made-up usage histories. The cycle is November
//! 2026 (30 days, anchor the 1st) unless a test says otherwise.

use proptest::prelude::*;

use super::analytics::*;
use super::cycle::ms;
use super::*;

fn cycle() -> Cycle {
    Cycle {
        start_ms: ms("2026-11-01T00:00:00Z"),
        end_ms: ms("2026-12-01T00:00:00Z"),
    }
}

/// The start of November's `day` (1-based).
fn day(day: i64) -> TimestampMs {
    cycle().start_ms + (day - 1) * DAY_MS
}

fn claude() -> ServiceType {
    ServiceType::parse("claude_messages").unwrap()
}

/// A slice with `units` on each of days `from..=to`.
fn slice(teacher: &str, allocated: u64, used: u64, daily: &[(i64, u64)]) -> SliceFacts {
    SliceFacts {
        teacher_id: TeacherId::parse(teacher).unwrap(),
        service: claude(),
        allocated_units: allocated,
        used_units: used,
        status: SliceStatus::Active,
        daily_units: daily.iter().map(|(d, u)| (day(*d), *u)).collect(),
    }
}

fn every_day(from: i64, to: i64, units: u64) -> Vec<(i64, u64)> {
    (from..=to).map(|d| (d, units)).collect()
}

fn facts(now_ms: TimestampMs, slices: Vec<SliceFacts>) -> SchoolFacts {
    SchoolFacts {
        cycle: cycle(),
        now_ms,
        pools: vec![],
        slices,
    }
}

// ---- Cycle position ----

#[test]
fn the_first_day_is_day_1_and_the_last_is_day_30() {
    let first = CyclePosition::of(cycle(), day(1));
    assert_eq!((first.day, first.days, first.elapsed_percent), (1, 30, 0));
    let last = CyclePosition::of(cycle(), cycle().end_ms - 1);
    assert_eq!((last.day, last.days), (30, 30));
    assert_eq!(CyclePosition::of(cycle(), day(16)).elapsed_percent, 50);
}

// ---- Runs out ----

#[test]
fn a_teacher_using_5_a_day_runs_out_on_day_19_of_30() {
    // 55 of 90 used by the start of day 12, 5 a day: 35 left last 7 days.
    let ms_lee = slice("ms-lee", 90, 55, &every_day(1, 11, 5));
    let forecast = run_out(&ms_lee, cycle(), day(12)).unwrap();
    assert_eq!(forecast.run_out_at_ms, day(19));
    assert_eq!(forecast.run_out_day, 19);
    assert_eq!(forecast.units_per_day, 5.0);
    // 19 more days at 5 a day: 55 + 95 = 150 needed, 60 more than the slice.
    assert_eq!(forecast.shortfall_units, 60);
    assert!(
        forecast.explanation.contains("runs out on day 19 of 30"),
        "{}",
        forecast.explanation
    );
    assert!(forecast.explanation.contains("5.0 a day"));
}

#[test]
fn the_burn_rate_looks_at_the_last_7_days_only() {
    // A heavy first week, then 1 a day: the recent rate is 1 a day.
    let mut daily = every_day(1, 7, 20);
    daily.extend(every_day(8, 14, 1));
    let slice = slice("ms-lee", 160, 147, &daily);
    let rate = burn_rate(&slice, cycle(), day(15)).unwrap();
    // Days 9-14 and today (day 15) just begun: 6 units over 6 days.
    assert_eq!((rate.window_units, rate.window_ms), (6, 6 * DAY_MS));
    // 13 left at 1 a day: lasts to day 28, inside the cycle.
    assert_eq!(run_out(&slice, cycle(), day(15)).unwrap().run_out_day, 28);
}

#[test]
fn a_slice_that_lasts_the_cycle_gets_no_forecast() {
    let slice = slice("ms-lee", 300, 55, &every_day(1, 11, 5));
    assert_eq!(run_out(&slice, cycle(), day(12)), None);
}

#[test]
fn no_history_no_forecast() {
    let slice = slice("ms-lee", 90, 80, &[]);
    assert_eq!(run_out(&slice, cycle(), day(20)), None);
}

#[test]
fn on_the_cycles_first_day_there_is_no_forecast() {
    // 80 of 90 in the first hours: one day says too little.
    let slice = slice("ms-lee", 90, 80, &[(1, 80)]);
    assert_eq!(run_out(&slice, cycle(), day(1) + 3_600_000), None);
    assert!(run_out(&slice, cycle(), day(2)).is_some());
}

#[test]
fn an_exhausted_slice_runs_out_today() {
    let slice = slice("ms-lee", 50, 50, &every_day(1, 9, 5));
    let forecast = run_out(&slice, cycle(), day(10) + 1000).unwrap();
    assert_eq!(forecast.run_out_day, 10);
}

#[test]
fn suspended_and_empty_slices_get_no_forecast() {
    let mut suspended = slice("ms-lee", 90, 55, &every_day(1, 11, 5));
    suspended.status = SliceStatus::Suspended;
    assert_eq!(run_out(&suspended, cycle(), day(12)), None);
    let empty = slice("ms-lee", 0, 0, &every_day(1, 11, 5));
    assert_eq!(run_out(&empty, cycle(), day(12)), None);
}

// ---- Idle ----

#[test]
fn a_slice_barely_used_late_in_the_cycle_is_idle_and_keeps_its_projected_need() {
    // 10 of 100 on day 21: 10%, with 2/3 of the cycle gone; 1 a day recently.
    let mr_ng = slice("mr-ng", 100, 10, &every_day(11, 20, 1));
    let idle = idle_slice(&mr_ng, cycle(), day(21)).unwrap();
    // Needs 10 + 10 more days at 1 a day = 20, plus 20% margin: keeps 24.
    assert_eq!(idle.spare_units, 76);
    assert!(
        idle.explanation.contains("10 of 100"),
        "{}",
        idle.explanation
    );
    assert!(
        idle.explanation.contains("day 21 of 30"),
        "{}",
        idle.explanation
    );
}

#[test]
fn idle_needs_late_in_the_cycle_and_little_used() {
    let unused = slice("mr-ng", 100, 0, &[]);
    assert_eq!(idle_slice(&unused, cycle(), day(15)), None, "before half");
    assert!(idle_slice(&unused, cycle(), day(16)).is_some(), "at half");
    let quarter = slice("mr-ng", 100, 25, &[]);
    assert_eq!(
        idle_slice(&quarter, cycle(), day(25)),
        None,
        "25% is not idle"
    );
    let mut suspended = unused.clone();
    suspended.status = SliceStatus::Suspended;
    assert_eq!(idle_slice(&suspended, cycle(), day(25)), None);
    assert_eq!(idle_slice(&slice("z", 0, 0, &[]), cycle(), day(25)), None);
}

#[test]
fn an_unused_slice_without_history_can_give_everything() {
    let idle = idle_slice(&slice("mr-ng", 40, 0, &[]), cycle(), day(25)).unwrap();
    assert_eq!(idle.spare_units, 40);
}

// ---- Redistribution ----

#[test]
fn units_move_from_the_idle_to_those_who_run_out_and_the_total_stays() {
    let ms_lee = slice("ms-lee", 90, 80, &every_day(10, 17, 10));
    let mr_ng = slice("mr-ng", 100, 5, &[(3, 5)]);
    let suggestions = suggestions(&facts(day(18), vec![ms_lee, mr_ng]));
    assert_eq!(suggestions.idle.len(), 1);
    assert_eq!(suggestions.run_outs.len(), 1);
    // ms-lee: 10 a day, 13 days left: needs 80 + 130 = 210, 120 more than 90.
    // mr-ng keeps 5 (no recent usage) + 20% = 6, spares 94.
    assert_eq!(suggestions.run_outs[0].shortfall_units, 120);
    assert_eq!(suggestions.moves.len(), 1);
    let step = &suggestions.moves[0];
    assert_eq!(
        (
            step.from_teacher_id.as_str(),
            step.to_teacher_id.as_str(),
            step.units
        ),
        ("mr-ng", "ms-lee", 94)
    );
    let proposed: Vec<(&str, u64, u64)> = suggestions
        .proposed
        .iter()
        .map(|p| (p.teacher_id.as_str(), p.allocated_units, p.proposed_units))
        .collect();
    assert_eq!(proposed, [("mr-ng", 100, 6), ("ms-lee", 90, 184)]);
    assert!(suggestions.explanation.contains("move 94 units"));
}

#[test]
fn the_earliest_to_run_out_is_served_first_from_the_most_spare() {
    let early = slice("a-early", 20, 18, &every_day(4, 10, 2));
    let late = slice("b-late", 40, 30, &every_day(4, 10, 2));
    let big = slice("c-big", 50, 0, &[]);
    let small = slice("d-small", 10, 0, &[]);
    let s = suggestions(&facts(day(11), vec![late, small, early, big]));
    // Day 11 is before the cycle's half: nothing is idle yet.
    assert!(s.idle.is_empty() && s.moves.is_empty());
    assert!(
        s.explanation.contains("no slice sits idle"),
        "{}",
        s.explanation
    );

    let early = slice("a-early", 20, 18, &every_day(10, 16, 1));
    let late = slice("b-late", 20, 16, &every_day(10, 16, 1));
    let big = slice("c-big", 50, 0, &[]);
    let small = slice("d-small", 10, 0, &[]);
    let s = suggestions(&facts(day(17), vec![late, small, early, big]));
    let moves: Vec<(&str, &str, u64)> = s
        .moves
        .iter()
        .map(|m| {
            (
                m.from_teacher_id.as_str(),
                m.to_teacher_id.as_str(),
                m.units,
            )
        })
        .collect();
    // a-early runs out on day 19 and needs 32 - 20 = 12; b-late on day 21, needs 30 - 20 = 10.
    assert_eq!(moves, [("c-big", "a-early", 12), ("c-big", "b-late", 10)]);
}

#[test]
fn units_never_move_across_service_types() {
    let runs_out = slice("ms-lee", 90, 80, &every_day(10, 17, 10));
    let mut idle_elsewhere = slice("mr-ng", 100, 0, &[]);
    idle_elsewhere.service = ServiceType::parse("homework_help").unwrap();
    let s = suggestions(&facts(day(18), vec![runs_out, idle_elsewhere]));
    assert_eq!((s.idle.len(), s.run_outs.len()), (1, 1));
    assert!(s.moves.is_empty());
    assert!(
        s.explanation.contains("nothing to spare"),
        "{}",
        s.explanation
    );
}

#[test]
fn nothing_to_suggest_for_a_school_without_slices() {
    let s = suggestions(&facts(day(20), vec![]));
    assert!(s.idle.is_empty() && s.run_outs.is_empty() && s.moves.is_empty());
    assert!(s.explanation.contains("nothing to move"));
}

// ---- Alerts ----

fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, u32)> {
    alerts
        .iter()
        .map(|a| (a.kind, a.threshold_percent))
        .collect()
}

#[test]
fn a_slice_alerts_at_the_highest_threshold_it_crossed() {
    let thresholds = AlertThresholds::default();
    let at = |used| {
        alerts(
            &facts(day(10), vec![slice("t", 100, used, &[])]),
            &thresholds,
        )
    };
    assert!(at(79).is_empty());
    assert_eq!(kinds(&at(80)), [(AlertKind::SliceThreshold, 80)]);
    assert_eq!(kinds(&at(99)), [(AlertKind::SliceThreshold, 80)]);
    assert_eq!(kinds(&at(100)), [(AlertKind::SliceThreshold, 100)]);
    assert_eq!(kinds(&at(130)), [(AlertKind::SliceThreshold, 100)]);
    let alert = &at(85)[0];
    assert_eq!((alert.value_units, alert.limit_units), (85, 100));
    assert!(
        alert.explanation.contains("85 of 100"),
        "{}",
        alert.explanation
    );
}

#[test]
fn slice_thresholds_are_configurable() {
    let thresholds = AlertThresholds {
        slice_used_percents: vec![50],
        ..AlertThresholds::default()
    };
    let alerts = alerts(&facts(day(10), vec![slice("t", 100, 60, &[])]), &thresholds);
    assert_eq!(kinds(&alerts), [(AlertKind::SliceThreshold, 50)]);
}

#[test]
fn suspended_and_empty_slices_raise_no_slice_alert() {
    let mut suspended = slice("t", 100, 100, &[]);
    suspended.status = SliceStatus::Suspended;
    let borrowed_only = slice("u", 0, 30, &[]);
    let got = alerts(
        &facts(day(10), vec![suspended, borrowed_only]),
        &AlertThresholds::default(),
    );
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn a_pool_alerts_when_its_used_units_reach_the_threshold() {
    let pool = |used, bought| PoolFacts {
        service: claude(),
        cycle_units: bought,
        used_units: used,
    };
    let at = |p: PoolFacts| {
        alerts(
            &SchoolFacts {
                pools: vec![p],
                ..facts(day(20), vec![])
            },
            &AlertThresholds::default(),
        )
    };
    assert!(at(pool(899, 1000)).is_empty());
    let alert = at(pool(900, 1000));
    assert_eq!(kinds(&alert), [(AlertKind::PoolExhausting, 90)]);
    assert!(
        alert[0].explanation.contains("100 are left"),
        "{}",
        alert[0].explanation
    );
    assert!(
        at(pool(0, 0)).is_empty(),
        "an empty pool has nothing to exhaust"
    );
}

#[test]
fn a_day_far_above_the_recent_average_is_an_anomaly() {
    // 5 a day on days 3-9, then today (day 10): above 3 x 5 = 15 alerts.
    let history = |today| {
        let mut daily = every_day(3, 9, 5);
        daily.push((10, today));
        daily
    };
    let at = |today| {
        alerts(
            &facts(
                day(10) + 3_600_000,
                vec![slice("t", 1000, 50, &history(today))],
            ),
            &AlertThresholds::default(),
        )
    };
    assert!(at(15).is_empty(), "exactly 3 times is not above");
    let alert = at(16);
    assert_eq!(kinds(&alert), [(AlertKind::UsageAnomaly, 300)]);
    assert_eq!((alert[0].value_units, alert[0].limit_units), (16, 15));
    assert!(
        alert[0].explanation.contains("average of 5.0"),
        "{}",
        alert[0].explanation
    );
}

#[test]
fn an_anomaly_needs_a_baseline_and_enough_units() {
    let thresholds = AlertThresholds::default();
    // Used on only 2 of the 7 days before: no average to compare with.
    let sparse = slice("t", 1000, 50, &[(7, 1), (8, 1), (10, 40)]);
    assert!(alerts(&facts(day(10) + 1, vec![sparse]), &thresholds).is_empty());
    // 1 a day, then 9: nine times the average, but under 10 units.
    let mut small = every_day(3, 9, 1);
    small.push((10, 9));
    let small = slice("t", 1000, 50, &small);
    assert!(alerts(&facts(day(10) + 1, vec![small]), &thresholds).is_empty());
}

#[test]
fn the_anomaly_baseline_reaches_into_the_previous_cycle() {
    // Today is the cycle's first day; the 7 days before are October's last.
    let mut daily: Vec<(i64, u64)> = (-6..=0).map(|d| (d, 4)).collect();
    daily.push((1, 40));
    let got = alerts(
        &facts(day(1) + 1, vec![slice("t", 1000, 40, &daily)]),
        &AlertThresholds::default(),
    );
    assert_eq!(kinds(&got), [(AlertKind::UsageAnomaly, 300)]);
}

#[test]
fn thresholds_are_validated() {
    assert!(AlertThresholds::default().validate().is_ok());
    let bad = [
        AlertThresholds {
            slice_used_percents: vec![],
            ..Default::default()
        },
        AlertThresholds {
            slice_used_percents: vec![100, 80],
            ..Default::default()
        },
        AlertThresholds {
            slice_used_percents: vec![0],
            ..Default::default()
        },
        AlertThresholds {
            pool_used_percent: 101,
            ..Default::default()
        },
        AlertThresholds {
            anomaly_factor_percent: 100,
            ..Default::default()
        },
    ];
    for thresholds in bad {
        assert!(thresholds.validate().is_err(), "{thresholds:?}");
    }
}

// ---- Properties ----

fn arbitrary_slice() -> impl Strategy<Value = SliceFacts> {
    (
        0usize..6,
        0u64..500,
        0u64..600,
        any::<bool>(),
        proptest::collection::vec((-10i64..=30, 0u64..80), 0..30),
        0usize..2,
    )
        .prop_map(
            |(teacher, allocated, used, active, daily, service)| SliceFacts {
                teacher_id: TeacherId::parse(&format!("t{teacher}")).unwrap(),
                service: ServiceType::parse(["claude_messages", "homework_help"][service]).unwrap(),
                allocated_units: allocated,
                used_units: used,
                status: if active {
                    SliceStatus::Active
                } else {
                    SliceStatus::Suspended
                },
                daily_units: daily.into_iter().map(|(d, u)| (day(d), u)).collect(),
            },
        )
}

fn allocated_by_service(
    slices: &[SliceFacts],
    proposed: &[ProposedSlice],
) -> std::collections::BTreeMap<ServiceType, (u64, u64)> {
    let mut totals = std::collections::BTreeMap::<ServiceType, (u64, u64)>::new();
    for s in slices {
        let after = proposed
            .iter()
            .find(|p| p.teacher_id == s.teacher_id && p.service == s.service)
            .map_or(s.allocated_units, |p| p.proposed_units);
        let total = totals.entry(s.service.clone()).or_default();
        total.0 += s.allocated_units;
        total.1 += after;
    }
    totals
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the histories: the redistribution keeps every pool's allocated
    /// total, never takes a slice below what it used, takes only from idle
    /// slices and gives only to slices that run out.
    #[test]
    fn redistribution_keeps_the_pool_total_and_what_was_used(
        slices in proptest::collection::vec(arbitrary_slice(), 0..8),
        now_offset_ms in 0i64..30 * DAY_MS,
    ) {
        // One slice per (teacher, service), as in a school.
        let mut seen = std::collections::BTreeSet::new();
        let slices: Vec<SliceFacts> = slices
            .into_iter()
            .filter(|s| seen.insert((s.teacher_id.clone(), s.service.clone())))
            .collect();
        let s = suggestions(&facts(cycle().start_ms + now_offset_ms, slices.clone()));
        for (service, (before, after)) in allocated_by_service(&slices, &s.proposed) {
            prop_assert_eq!(before, after, "{}", service);
        }
        for p in &s.proposed {
            let original = slices
                .iter()
                .find(|x| x.teacher_id == p.teacher_id && x.service == p.service)
                .unwrap();
            prop_assert!(
                p.proposed_units >= original.used_units.min(original.allocated_units),
                "{:?}", p
            );
            if p.proposed_units < p.allocated_units {
                prop_assert!(p.proposed_units >= p.used_units, "{:?}", p);
            }
        }
        for m in &s.moves {
            prop_assert!(m.units > 0);
            prop_assert!(s.idle.iter().any(|i| i.teacher_id == m.from_teacher_id && i.service == m.service));
            prop_assert!(s.run_outs.iter().any(|r| r.teacher_id == m.to_teacher_id && r.service == m.service));
        }
    }

    /// Alerts are deterministic and name only active slices.
    #[test]
    fn alerts_are_deterministic(
        slices in proptest::collection::vec(arbitrary_slice(), 0..8),
        now_offset_ms in 0i64..30 * DAY_MS,
    ) {
        let f = facts(cycle().start_ms + now_offset_ms, slices.clone());
        let first = alerts(&f, &AlertThresholds::default());
        prop_assert_eq!(&first, &alerts(&f, &AlertThresholds::default()));
        for alert in &first {
            let teacher = alert.teacher_id.as_ref().unwrap();
            prop_assert!(slices.iter().any(|s| &s.teacher_id == teacher
                && s.service == alert.service
                && s.status == SliceStatus::Active));
        }
    }
}
