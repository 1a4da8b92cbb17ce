//! The engine with real actors and a real WAL (in memory), time on a test clock.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::storage::{recover, MemoryLog, WalConfig, WalError, WalWriter};
use quotad_core::{
    BillingAnchor, EventId, HoldRequest, Priority, ReservationId, SliceStatus, SyncEvent,
    SyncOutcome, SyncRejection, Tier,
};

mod protocol;
mod replay;

/// An RFC 3339 time as milliseconds, for readable test set-ups.
fn ms(rfc3339: &str) -> quotad_core::TimestampMs {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("test timestamp")
        .timestamp_millis()
}

const START_MS: i64 = 1_794_000_000_000; // 2026-11-06T...

struct Harness {
    engine: Engine,
    runtime: Option<EngineRuntime>,
    writer: Option<WalWriter>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown();
        }
        if let Some(writer) = self.writer.take() {
            writer.shutdown();
        }
    }
}

async fn start(store: MemoryLog, clock: Clock) -> Harness {
    start_on(Arc::new(store), clock).await
}

async fn start_on(store: Arc<dyn crate::storage::LogStore>, clock: Clock) -> Harness {
    start_configured(store, clock, test_config()).await
}

fn test_config() -> EngineConfig {
    EngineConfig {
        housekeeping_interval: Duration::from_millis(20),
        ..EngineConfig::default()
    }
}

async fn start_configured(
    store: Arc<dyn crate::storage::LogStore>,
    clock: Clock,
    config: EngineConfig,
) -> Harness {
    let recovered = recover(store.as_ref()).unwrap();
    let (wal, writer, _durable) =
        Wal::start(store, WalConfig::default(), recovered.last_seq).unwrap();
    let (engine, runtime) = Engine::start(recovered.state, wal, config, clock)
        .await
        .unwrap();
    Harness {
        engine,
        runtime: Some(runtime),
        writer: Some(writer),
    }
}

/// Waits until a record beyond `before` is written (and so in flight).
async fn wait_written_beyond(store: &crate::storage::log::testing::HeldFlushes, before: usize) {
    for _ in 0..500 {
        if store.written() > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no record was written");
}

fn change() -> Change {
    Change {
        by: Arc::from("principal"),
        reason: Arc::from("test"),
        at_ms: START_MS,
    }
}

fn service() -> ServiceType {
    ServiceType::parse("claude_messages").unwrap()
}

fn teacher(name: &str) -> TeacherRef {
    TeacherRef {
        school_id: SchoolId::parse("school").unwrap(),
        teacher_id: TeacherId::parse(name).unwrap(),
    }
}

fn consume(units: u64, event: &str) -> Consume {
    Consume {
        service: service(),
        units,
        event_id: EventId::parse(event).unwrap(),
        occurred_at_ms: 0,
        model: Arc::from("m"),
    }
}

async fn school(h: &Harness, cycle_units: u64, borrowing: bool) {
    let config = SchoolConfig {
        id: SchoolId::parse("school").unwrap(),
        name: Arc::from("School"),
        tier: Tier::K12,
        anchor: BillingAnchor::new(1).unwrap(),
        borrowing_enabled: borrowing,
        self_service_requests: false,
    };
    h.engine
        .create_school(NewSchool {
            config,
            pools: vec![(service(), cycle_units)],
            change: change(),
        })
        .await
        .unwrap();
}

async fn allocate(
    h: &Harness,
    name: &str,
    units: u64,
    priority: Priority,
) -> Result<AllocationView, EngineError> {
    let msg = SetAllocation {
        service: service(),
        allocated_units: units,
        priority: Some(priority),
        auto_renew: Some(false),
        change: change(),
        managed: true,
    };
    h.engine.set_allocation(&teacher(name), msg).await
}

async fn used(h: &Harness, name: &str) -> (u64, u64, u64) {
    let usage = h.engine.usage(&teacher(name)).await.unwrap();
    let s = &usage.services[0];
    (s.used_units, s.reserved_units, s.borrowed_units)
}

#[actix_rt::test]
async fn a_panicking_teacher_actor_is_restarted_with_its_state_intact() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    assert!(
        h.engine
            .consume(&teacher("t1"), consume(4, "e1"))
            .await
            .unwrap()
            .allowed
    );
    let failed = h.engine.inject_panic(&teacher("t1")).await;
    assert!(
        matches!(failed, Err(EngineError::Internal(_))),
        "{failed:?}"
    );
    assert_eq!(
        used(&h, "t1").await,
        (4, 0, 0),
        "state survived the restart"
    );
    let again = h
        .engine
        .consume(&teacher("t1"), consume(1, "e1"))
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "the ids seen before the panic are still known"
    );
    assert!(
        h.engine
            .consume(&teacher("t1"), consume(6, "e2"))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !h.engine
            .consume(&teacher("t1"), consume(1, "e3"))
            .await
            .unwrap()
            .allowed
    );
}

#[actix_rt::test]
async fn a_high_priority_teacher_borrows_through_the_school() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 30, true).await;
    allocate(&h, "high", 10, Priority::High).await.unwrap();
    let check = h
        .engine
        .check(
            &teacher("high"),
            Check {
                previews: CheckPreviews::Consume,
                service: service(),
                units: 15,
            },
        )
        .await
        .unwrap();
    assert!(check.allowed && check.borrowed_units == 5);
    assert_eq!(used(&h, "high").await, (0, 0, 0), "check charges nothing");
    let decision = h
        .engine
        .consume(&teacher("high"), consume(15, "e1"))
        .await
        .unwrap();
    assert_eq!((decision.allowed, decision.borrowed_units), (true, 5));
    let view = h
        .engine
        .get_school(&SchoolId::parse("school").unwrap())
        .await
        .unwrap();
    let pool = &view.pools[0];
    assert_eq!(
        (
            pool.allocated_units,
            pool.borrowed_units,
            pool.available_units,
            pool.used_units
        ),
        (10, 5, 15, 15)
    );
    assert!(
        !h.engine
            .consume(&teacher("high"), consume(16, "e2"))
            .await
            .unwrap()
            .allowed
    );
}

#[actix_rt::test]
async fn unknown_school_service_and_teacher_are_told_apart() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 30, false).await;
    let nobody = h
        .engine
        .consume(&teacher("nobody"), consume(1, "e1"))
        .await
        .unwrap();
    assert_eq!(nobody.reason, Some(DenyReason::NoAllocation));
    let mut other = consume(1, "e1");
    other.service = ServiceType::parse("homework_help").unwrap();
    assert!(matches!(
        h.engine.consume(&teacher("t"), other).await,
        Err(EngineError::Rule(RuleError::NotFound(_)))
    ));
    let elsewhere = TeacherRef {
        school_id: SchoolId::parse("elsewhere").unwrap(),
        teacher_id: TeacherId::parse("t").unwrap(),
    };
    assert!(matches!(
        h.engine.consume(&elsewhere, consume(1, "e1")).await,
        Err(EngineError::Rule(RuleError::NotFound(_)))
    ));
}

#[actix_rt::test]
async fn holds_expire_on_the_clock_and_a_rollover_resets_usage() {
    let clock = Clock::manual(ms("2026-11-30T23:59:00Z"));
    let h = start(MemoryLog::default(), clock.clone()).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    let hold = HoldRequest {
        service: service(),
        units: 5,
        ttl_ms: 1_000,
        reservation_id: ReservationId::parse("r1").unwrap(),
        model: Arc::from("m"),
    };
    assert!(
        h.engine
            .reserve(&teacher("t1"), Reserve(hold))
            .await
            .unwrap()
            .0
            .allowed
    );
    h.engine
        .consume(&teacher("t1"), consume(3, "e1"))
        .await
        .unwrap();
    assert_eq!(used(&h, "t1").await, (3, 5, 0));
    clock.advance(1_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(used(&h, "t1").await, (3, 0, 0), "the hold freed itself");
    clock.advance(60_000);
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-01T00:00:00Z"));
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].allocated_units
        ),
        (0, 0),
        "no auto-renew: units went back"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let view = h
        .engine
        .get_school(&SchoolId::parse("school").unwrap())
        .await
        .unwrap();
    assert_eq!(view.pools[0].allocated_units, 0);
}

#[actix_rt::test]
async fn the_pool_and_the_slice_floor_are_enforced_through_the_actors() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 60, Priority::Normal).await.unwrap();
    assert!(matches!(
        allocate(&h, "t2", 41, Priority::Normal).await,
        Err(EngineError::Rule(RuleError::Precondition(_)))
    ));
    h.engine
        .consume(&teacher("t1"), consume(30, "e1"))
        .await
        .unwrap();
    let err = allocate(&h, "t1", 29, Priority::Normal).await.unwrap_err();
    assert!(err.to_string().contains("cannot shrink below 30"), "{err}");
    allocate(&h, "t1", 30, Priority::Normal).await.unwrap();
    allocate(&h, "t2", 70, Priority::Normal).await.unwrap();
    let status = SetStatus {
        service: service(),
        status: SliceStatus::Suspended,
        change: change(),
    };
    h.engine.set_status(&teacher("t2"), status).await.unwrap();
    let denied = h
        .engine
        .consume(&teacher("t2"), consume(1, "e2"))
        .await
        .unwrap();
    assert_eq!(denied.reason, Some(DenyReason::Suspended));
}

#[actix_rt::test]
async fn recovery_from_the_log_gives_back_the_same_usage_and_ids() {
    let store = MemoryLog::default();
    {
        let h = start(store.clone(), Clock::manual(START_MS)).await;
        school(&h, 100, true).await;
        allocate(&h, "t1", 10, Priority::High).await.unwrap();
        h.engine
            .consume(&teacher("t1"), consume(12, "e1"))
            .await
            .unwrap();
        allocate(&h, "t1", 20, Priority::High).await.unwrap();
        let hold = HoldRequest {
            service: service(),
            units: 3,
            ttl_ms: 60_000,
            reservation_id: ReservationId::parse("r1").unwrap(),
            model: Arc::from("m"),
        };
        h.engine
            .reserve(&teacher("t1"), Reserve(hold))
            .await
            .unwrap();
    }
    let crashed = store.crash();
    let h = start(crashed, Clock::manual(START_MS)).await;
    assert_eq!(used(&h, "t1").await, (12, 3, 2));
    assert!(
        h.engine
            .consume(&teacher("t1"), consume(12, "e1"))
            .await
            .unwrap()
            .duplicate
    );
    let commit = Commit {
        reservation_id: ReservationId::parse("r1").unwrap(),
        actual_units: 4,
    };
    let result = h.engine.commit(&teacher("t1"), commit).await.unwrap();
    assert_eq!(
        (result.outcome.charged_units, result.outcome.overage_units),
        (4, 0)
    );
    assert_eq!(used(&h, "t1").await, (16, 0, 2));
}

#[actix_rt::test]
async fn many_concurrent_consumers_never_overspend_and_each_event_counts_once() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 1_000, false).await;
    for t in 0..4 {
        allocate(&h, &format!("t{t}"), 50, Priority::Normal)
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let engine = h.engine.clone();
            tokio::spawn(async move {
                let mut allowed = 0u64;
                for n in 0..20 {
                    // Every event is sent twice (a retry): it must count once.
                    let msg = consume(1, &format!("{task}-{n}"));
                    let who = teacher(&format!("t{}", task % 4));
                    let first = engine.consume(&who, msg.clone()).await.unwrap();
                    let retry = engine.consume(&who, msg).await.unwrap();
                    assert_eq!(first.allowed, retry.allowed);
                    allowed += u64::from(first.allowed);
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    assert_eq!(allowed, 200, "4 slices of 50");
    for t in 0..4 {
        assert_eq!(used(&h, &format!("t{t}")).await.0, 50);
    }
}

#[actix_rt::test]
async fn a_failed_flush_stops_acknowledging_and_says_unavailable() {
    let store = MemoryLog::default();
    let h = start(store.clone(), Clock::manual(START_MS)).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    assert!(
        h.engine
            .consume(&teacher("t1"), consume(1, "e1"))
            .await
            .unwrap()
            .allowed
    );

    store.fail_writes();
    let failed = h.engine.consume(&teacher("t1"), consume(1, "e2")).await;
    let status = crate::api::status::to_status(
        failed.expect_err("a change that is not durable is never acknowledged"),
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("injected"),
        "{}",
        status.message()
    );
    // From now on every change is refused the same way, not half-applied.
    let again = h.engine.consume(&teacher("t1"), consume(1, "e3")).await;
    assert!(
        matches!(again, Err(EngineError::Wal(WalError::Poisoned(_)))),
        "{again:?}"
    );
    let admin = allocate(&h, "t1", 20, Priority::Normal).await;
    assert!(
        matches!(admin, Err(EngineError::Wal(WalError::Poisoned(_)))),
        "{admin:?}"
    );

    // What survives is exactly what was acknowledged.
    let recovered = recover(&store.crash()).unwrap();
    let account = &recovered.state.accounts[&(
        SchoolId::parse("school").unwrap(),
        TeacherId::parse("t1").unwrap(),
    )];
    assert_eq!(account.usage()[0].used_units, 1);
}

#[actix_rt::test]
async fn a_pending_request_expires_after_seven_days_on_the_timer_and_is_audited() {
    use quotad_core::requests::REQUEST_TTL_MS;
    let clock = Clock::manual(START_MS);
    let store = MemoryLog::default();
    let h = start(store.clone(), clock.clone()).await;
    school(&h, 100, false).await;
    let school_id = SchoolId::parse("school").unwrap();
    let settings = UpdateSettings {
        name: None,
        borrowing_enabled: None,
        self_service_requests: Some(true),
        next_anchor: None,
        change: change(),
    };
    h.engine
        .update_settings(&school_id, settings)
        .await
        .unwrap();
    let file = FileRequest {
        teacher_id: TeacherId::parse("t1").unwrap(),
        service: service(),
        units: 5,
        change: change(),
    };
    let request = h.engine.file_request(file, &school_id).await.unwrap();
    let pending = || ListRequests {
        teacher_id: None,
        status: Some("pending"),
        request_id: None,
    };

    clock.advance(REQUEST_TTL_MS - 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.engine
            .list_requests(&school_id, pending())
            .await
            .unwrap()
            .len(),
        1
    );

    clock.advance(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h
        .engine
        .list_requests(&school_id, pending())
        .await
        .unwrap()
        .is_empty());
    let approve = h
        .engine
        .approve_request(&school_id, request.id, 0, change())
        .await;
    assert!(
        matches!(approve, Err(EngineError::Rule(RuleError::Precondition(m))) if m.contains("expired"))
    );
    let history = ListHistory {
        filter: quotad_core::HistoryFilter::default(),
        after_seq: 0,
        limit: 100,
    };
    let (entries, _) = h.engine.history(&school_id, history).await.unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last.action, quotad_core::AuditAction::RequestExpired);
    assert_eq!(last.at_ms, START_MS + REQUEST_TTL_MS);

    // The expiry is in the log: a recovered state has it too.
    let recovered = recover(&store.crash()).unwrap();
    let school = &recovered.state.schools[&school_id];
    assert_eq!(
        school.requests[&request.id].status,
        quotad_core::RequestStatus::Expired
    );
    assert_eq!(school.history.entries(), entries.as_slice());
}

#[actix_rt::test]
async fn the_previous_cycle_report_shows_what_was_used_before_the_rollover() {
    let clock = Clock::manual(ms("2026-11-30T12:00:00Z"));
    let h = start(MemoryLog::default(), clock.clone()).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    h.engine
        .consume(&teacher("t1"), consume(4, "e1"))
        .await
        .unwrap();
    clock.advance(24 * 3600 * 1000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let school_id = SchoolId::parse("school").unwrap();
    let report = |previous| UsageReport {
        teacher_id: None,
        service: None,
        previous,
    };
    let now = h
        .engine
        .usage_report(&school_id, report(false))
        .await
        .unwrap();
    assert_eq!(now.cycle.start_ms, ms("2026-12-01T00:00:00Z"));
    assert_eq!(
        (now.rows[0].allocated_units, now.rows[0].used_units),
        (0, 0)
    );
    let before = h
        .engine
        .usage_report(&school_id, report(true))
        .await
        .unwrap();
    assert_eq!(before.cycle.start_ms, ms("2026-11-01T00:00:00Z"));
    assert_eq!(before.cycle.end_ms, now.cycle.start_ms);
    assert_eq!(
        (before.rows[0].allocated_units, before.rows[0].used_units),
        (10, 4)
    );
}

#[actix_rt::test]
async fn a_changed_anchor_moves_the_next_rollover_and_teachers_follow() {
    let clock = Clock::manual(ms("2026-11-20T12:00:00Z"));
    let h = start(MemoryLog::default(), clock.clone()).await;
    school(&h, 100, false).await;
    let msg = SetAllocation {
        service: service(),
        allocated_units: 10,
        priority: Some(Priority::Normal),
        auto_renew: Some(true),
        change: change(),
        managed: true,
    };
    h.engine.set_allocation(&teacher("t1"), msg).await.unwrap();
    h.engine
        .consume(&teacher("t1"), consume(4, "e1"))
        .await
        .unwrap();
    let school_id = SchoolId::parse("school").unwrap();
    let settings = UpdateSettings {
        name: None,
        borrowing_enabled: None,
        self_service_requests: None,
        next_anchor: Some(BillingAnchor::new(15).unwrap()),
        change: change(),
    };
    let view = h
        .engine
        .update_settings(&school_id, settings)
        .await
        .unwrap();
    assert_eq!(
        view.cycle.end_ms,
        ms("2026-12-01T00:00:00Z"),
        "November is not cut short"
    );
    assert_eq!(view.next_anchor.map(BillingAnchor::day), Some(15));

    clock.advance(ms("2026-12-01T01:00:00Z") - ms("2026-11-20T12:00:00Z"));
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(
        (usage.cycle.start_ms, usage.cycle.end_ms),
        (ms("2026-12-01T00:00:00Z"), ms("2026-12-15T00:00:00Z"))
    );
    assert_eq!(usage.services[0].used_units, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let view = h.engine.get_school(&school_id).await.unwrap();
    assert_eq!((view.config.anchor.day(), view.next_anchor), (15, None));
    assert_eq!(view.cycle.end_ms, ms("2026-12-15T00:00:00Z"));

    h.engine
        .consume(&teacher("t1"), consume(2, "e2"))
        .await
        .unwrap();
    clock.advance(ms("2026-12-15T00:00:01Z") - ms("2026-12-01T01:00:00Z"));
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-15T00:00:00Z"));
    assert_eq!(usage.cycle.end_ms, ms("2027-01-15T00:00:00Z"));
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].previous.used_units
        ),
        (0, 2)
    );
}

fn synced(
    teacher: &str,
    units: u64,
    event: &str,
    occurred_at_ms: i64,
) -> Result<(TeacherId, SyncEvent), BadEvent> {
    Ok((
        TeacherId::parse(teacher).unwrap(),
        SyncEvent {
            service: service(),
            units,
            event_id: EventId::parse(event).unwrap(),
            occurred_at_ms,
            model: Arc::from("m"),
        },
    ))
}

#[actix_rt::test]
async fn a_late_event_is_charged_to_last_cycle_and_recovery_keeps_it_there() {
    let store = MemoryLog::default();
    let november_ms = ms("2026-11-30T20:00:00Z");
    let clock = Clock::manual(november_ms);
    let school_id = SchoolId::parse("school").unwrap();
    let report = |previous| UsageReport {
        teacher_id: None,
        service: None,
        previous,
    };
    {
        let h = start(store.clone(), clock.clone()).await;
        school(&h, 100, false).await;
        allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
        h.engine
            .consume(&teacher("t1"), consume(8, "online"))
            .await
            .unwrap();
        clock.advance(2 * 24 * 3600 * 1000);
        let outcomes = h
            .engine
            .sync_usage(
                &school_id,
                vec![synced("t1", 5, "offline", november_ms + 1)],
            )
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![SyncOutcome::AcceptedOverQuota {
                cycle_start_ms: ms("2026-11-01T00:00:00Z"),
                overage_units: 3
            }]
        );
    }
    let h = start(store.crash(), clock).await;
    let before = h
        .engine
        .usage_report(&school_id, report(true))
        .await
        .unwrap();
    assert_eq!(
        (before.rows[0].used_units, before.rows[0].overage_units),
        (13, 3)
    );
    let now = h
        .engine
        .usage_report(&school_id, report(false))
        .await
        .unwrap();
    assert_eq!(now.rows[0].used_units, 0);
}

#[actix_rt::test]
async fn concurrent_syncs_of_the_same_events_count_each_once() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 1_000, false).await;
    for t in 0..4 {
        allocate(&h, &format!("t{t}"), 50, Priority::Normal)
            .await
            .unwrap();
    }
    let school_id = SchoolId::parse("school").unwrap();
    // 32 tasks send overlapping batches: every event is in 4 of them, and
    // half are also consumed online. Each must count once.
    let tasks: Vec<_> = (0..32)
        .map(|task| {
            let (engine, school_id) = (h.engine.clone(), school_id.clone());
            tokio::spawn(async move {
                let batch: Vec<_> = (0..40)
                    .map(|n| {
                        let event = (task / 4) * 40 + n;
                        synced(
                            &format!("t{}", event % 4),
                            1,
                            &format!("e{event}"),
                            START_MS,
                        )
                    })
                    .collect();
                if task % 2 == 0 {
                    let who = teacher(&format!("t{}", task % 4));
                    engine
                        .consume(&who, consume(1, &format!("e{task}")))
                        .await
                        .unwrap();
                }
                engine.sync_usage(&school_id, batch).await.unwrap()
            })
        })
        .collect();
    let mut counted = 0;
    for task in tasks {
        let outcomes = task.await.unwrap();
        counted += outcomes
            .iter()
            .filter(|o| !matches!(o, SyncOutcome::Duplicate))
            .count();
    }
    // 8 distinct batches of 40 events; consumes of e0..e31 overlap them.
    let mut total = 0;
    for t in 0..4 {
        total += used(&h, &format!("t{t}")).await.0;
    }
    assert_eq!(total, 320, "320 distinct events of 1 unit");
    assert!(counted <= 320, "{counted} synced answers charged");
}

#[actix_rt::test]
async fn a_sync_batch_is_limited_and_an_unknown_school_is_not_found() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 100, false).await;
    let school_id = SchoolId::parse("school").unwrap();
    let limit = h.engine.limits().sync_events_per_batch_max;
    let too_many: Vec<_> = (0..=limit)
        .map(|n| synced("t1", 1, &format!("e{n}"), START_MS))
        .collect();
    let error = h.engine.sync_usage(&school_id, too_many).await.unwrap_err();
    assert!(error.to_string().contains("at most 1000"), "{error}");
    let error = h.engine.sync_usage(&school_id, vec![]).await.unwrap_err();
    assert!(error.to_string().contains("at least one"), "{error}");
    let nowhere = SchoolId::parse("nowhere").unwrap();
    let error = h
        .engine
        .sync_usage(&nowhere, vec![synced("t1", 1, "e1", START_MS)])
        .await
        .unwrap_err();
    assert!(matches!(error, EngineError::Rule(RuleError::NotFound(_))));
}

fn hold(id: &str, units: u64, ttl_ms: u64) -> Reserve {
    Reserve(HoldRequest {
        service: service(),
        units,
        ttl_ms,
        reservation_id: ReservationId::parse(id).unwrap(),
        model: Arc::from("m"),
    })
}

fn commit_of(id: &str, actual_units: u64) -> Commit {
    Commit {
        reservation_id: ReservationId::parse(id).unwrap(),
        actual_units,
    }
}

/// A denied hold held nothing: committing it is refused, names the hold and
/// charges nothing (a retried Reserve tells the client it was denied).
#[actix_rt::test]
async fn a_commit_of_a_denied_hold_is_refused_and_charges_nothing() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    let (denied, _) = h
        .engine
        .reserve(&teacher("t1"), hold("r1", 11, 60_000))
        .await
        .unwrap();
    assert!(!denied.allowed);
    let refused = h.engine.commit(&teacher("t1"), commit_of("r1", 500)).await;
    match refused {
        Err(EngineError::Rule(RuleError::Precondition(message))) => {
            assert!(
                message.contains("\"r1\"") && message.contains("denied"),
                "{message}"
            );
        }
        other => panic!("a denied hold was committed: {other:?}"),
    }
    assert_eq!(used(&h, "t1").await, (0, 0, 0));
}

/// A hold that expired may be committed late, as usage that happened, but
/// not into a slice removed since: that would bring the slice back at the
/// teacher while the school no longer has it.
#[actix_rt::test]
async fn a_late_commit_into_a_removed_slice_is_refused_and_the_slice_stays_gone() {
    let clock = Clock::manual(START_MS);
    let h = start(MemoryLog::default(), clock.clone()).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 10, Priority::Normal).await.unwrap();
    let (held, _) = h
        .engine
        .reserve(&teacher("t1"), hold("r1", 5, 1_000))
        .await
        .unwrap();
    assert!(held.allowed);
    clock.advance(2_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(used(&h, "t1").await, (0, 0, 0), "the hold expired");
    let msg = RemoveSlice {
        service: service(),
        change: change(),
    };
    h.engine
        .remove_allocation(&teacher("t1"), msg)
        .await
        .unwrap();
    let refused = h.engine.commit(&teacher("t1"), commit_of("r1", 5)).await;
    match refused {
        Err(EngineError::Rule(RuleError::Precondition(message))) => {
            assert!(message.contains("no longer has a slice"), "{message}");
        }
        other => panic!("a removed slice was charged: {other:?}"),
    }
    let listed = h
        .engine
        .list_allocations(&SchoolId::parse("school").unwrap(), None, None)
        .await
        .unwrap();
    assert!(listed.is_empty(), "the slice stays gone: {listed:?}");
}
