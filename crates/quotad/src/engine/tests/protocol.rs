//! The five sequences of issue 11, through the real engine: real actors, a
//! real WAL in memory whose flushes the test can hold, so a record stays in
//! flight while the next message is sent. On the seed's protocol each of
//! these orders overspent a pool, resurrected a slice, kept a teacher in an
//! old cycle or made Check and Reserve disagree; here each asserts the pool
//! stays whole and the live state is the state a restart would rebuild.
//! (`scripts/simulate --protocol seed` finds them all by itself; see
//! docs/protocol.md.)

use super::*;
use crate::storage::log::testing::HeldFlushes;
use crate::storage::LogStore;
use quotad_core::SliceSet;

const SCHOOL: &str = "school";

fn school_id() -> SchoolId {
    SchoolId::parse(SCHOOL).unwrap()
}

fn slice(name: &str, units: u64, auto_renew: bool) -> SliceSpec {
    SliceSet {
        teacher_id: TeacherId::parse(name).unwrap(),
        service: service(),
        allocated_units: units,
        priority: Priority::Normal,
        auto_renew,
    }
    .into()
}

async fn held(clock: Clock) -> (Harness, Arc<HeldFlushes>) {
    let store = Arc::new(HeldFlushes::default());
    let h = start_on(store.clone(), clock).await;
    school(&h, 100, false).await;
    (h, store)
}

/// Units every teacher named has used, as their actors tell it.
async fn used_by(h: &Harness, names: &[&str]) -> u64 {
    let mut total = 0;
    for name in names {
        if let Ok(usage) = h.engine.usage(&teacher(name)).await {
            total += usage.services.iter().map(|s| s.used_units).sum::<u64>();
        }
    }
    total
}

/// Each teacher's (allocated, used) as the school lists them.
async fn allocations(h: &Harness) -> Vec<(String, u64, u64)> {
    let mut all: Vec<(String, u64, u64)> = h
        .engine
        .list_allocations(&school_id(), None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|v| {
            (
                v.teacher_id.as_str().to_string(),
                v.allocated_units,
                v.used_units,
            )
        })
        .collect();
    all.sort();
    all
}

/// The same allocations, as a restart on the same log rebuilds them.
async fn allocations_after_restart(
    store: Arc<HeldFlushes>,
    clock: Clock,
) -> Vec<(String, u64, u64)> {
    let log: Arc<dyn LogStore> = store;
    let h = start_on(log, clock).await;
    allocations(&h).await
}

/// Whatever is left free in the pool goes to a new teacher v, v spends it
/// all, and every other teacher then tries to spend 50.
async fn everyone_spends(h: &Harness, names: &[&str], round: &str) -> u64 {
    let free = h.engine.get_school(&school_id()).await.unwrap().pools[0].available_units;
    if free > 0 {
        allocate(h, "v", free, Priority::Normal).await.unwrap();
        let spent = h
            .engine
            .consume(&teacher("v"), consume(free, &format!("{round}-v")))
            .await
            .unwrap();
        assert!(spent.allowed, "v has the {free} units the school had free");
    }
    for name in names {
        let _ = h
            .engine
            .consume(&teacher(name), consume(50, &format!("{round}-{name}")))
            .await
            .unwrap();
    }
    used_by(h, &[names, &["v"]].concat()).await
}

/// Holds the school's mailbox (a busy school) until the sender is dropped
/// or sent to.
async fn stall_school(h: &Harness) -> tokio::sync::oneshot::Sender<()> {
    let (go, stalled) = tokio::sync::oneshot::channel();
    let school = h.engine.school(&school_id()).unwrap();
    school
        .addr
        .send(super::school::Stall(stalled))
        .await
        .unwrap();
    go
}

/// The time a sent message is given to reach the mailbox it waits in.
const SETTLE: Duration = Duration::from_millis(50);

/// Sequence 1 as it was found: the school is busy when a bulk change
/// shrinks a (100, 40 used) to 50, and a consume of 60 reaches a before the
/// school gets to the change. On the seed the bulk change had read a's 40
/// already, and then wrote a = 50 over a's 100 used. Here the change asks
/// for a's floor only once the school is free, sees the 100 and is refused.
#[actix_rt::test]
async fn a_consume_while_the_school_is_busy_with_a_bulk_shrink_is_counted_against_it() {
    let (h, _store) = held(Clock::manual(START_MS)).await;
    allocate(&h, "a", 100, Priority::Normal).await.unwrap();
    h.engine
        .consume(&teacher("a"), consume(40, "a-40"))
        .await
        .unwrap();

    let go = stall_school(&h).await;
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        let slices = vec![slice("a", 50, false), slice("b", 50, false)];
        engine.bulk_set(&school_id(), slices, change()).await
    });
    tokio::time::sleep(SETTLE).await;
    let spend = h
        .engine
        .consume(&teacher("a"), consume(60, "a-60"))
        .await
        .unwrap();
    assert!(
        spend.allowed,
        "a has 60 left of 100 and the school is not asked"
    );
    drop(go);

    let refused = bulk.await.unwrap();
    assert!(refused.is_err(), "a used 100 > 50: {refused:?}");
    let b = h
        .engine
        .consume(&teacher("b"), consume(50, "b-50"))
        .await
        .unwrap();
    assert!(
        !b.allowed,
        "b got nothing: the bulk change was refused whole"
    );
    assert_eq!(used_by(&h, &["a", "b"]).await, 100);
    assert_eq!(allocations(&h).await, vec![("a".into(), 100, 100)]);
}

/// Sequence 2 as it was found: the school is busy while a bulk change
/// setting x = 50 and then x's removal reach it. On the seed the bulk
/// record went to x while x waited for its removal, x applied the removal
/// and then the older record, and held 50 units the school had given back.
/// Here whichever change the school writes last decides x, x enforces just
/// that, the pool is spent once, and a restart rebuilds the same state.
#[actix_rt::test]
async fn a_removal_and_a_bulk_change_queued_at_a_busy_school_agree_on_the_slice() {
    let clock = Clock::manual(START_MS);
    let (h, store) = held(clock.clone()).await;
    allocate(&h, "u", 50, Priority::Normal).await.unwrap();
    allocate(&h, "x", 0, Priority::Normal).await.unwrap();

    let go = stall_school(&h).await;
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        engine
            .bulk_set(&school_id(), vec![slice("x", 50, false)], change())
            .await
    });
    tokio::time::sleep(SETTLE).await;
    let engine = h.engine.clone();
    let removal = tokio::spawn(async move {
        let msg = RemoveSlice {
            service: service(),
            change: change(),
        };
        engine.remove_allocation(&teacher("x"), msg).await
    });
    tokio::time::sleep(SETTLE).await;
    drop(go);
    bulk.await.unwrap().unwrap();
    removal.await.unwrap().unwrap();

    let counted = allocations(&h)
        .await
        .into_iter()
        .find(|(t, _, _)| t == "x")
        .map_or(0, |(_, units, _)| units);
    let enforced = match h.engine.usage(&teacher("x")).await {
        Ok(usage) => usage.services.iter().map(|s| s.allocated_units).sum(),
        Err(_) => 0,
    };
    assert_eq!(enforced, counted, "x enforces what the school counts");
    assert_eq!(everyone_spends(&h, &["u", "x"], "r").await, 100);
    let live = allocations(&h).await;
    drop(h);
    assert_eq!(allocations_after_restart(store, clock).await, live);
}

/// Sequence 1, the bulk change first: its record is written and still in
/// flight when a consume reaches the slice it shrinks. The consume must be
/// judged against the new 50, not the old 100.
#[actix_rt::test]
async fn a_consume_behind_a_bulk_shrink_is_judged_against_the_shrunk_slice() {
    let (h, store) = held(Clock::manual(START_MS)).await;
    allocate(&h, "a", 100, Priority::Normal).await.unwrap();
    h.engine
        .consume(&teacher("a"), consume(40, "a-40"))
        .await
        .unwrap();

    store.hold();
    let before = store.written();
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        let slices = vec![slice("a", 50, false), slice("b", 50, false)];
        engine.bulk_set(&school_id(), slices, change()).await
    });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let racing =
        tokio::spawn(async move { engine.consume(&teacher("a"), consume(60, "a-60")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.let_go();

    bulk.await.unwrap().expect("a's 40 used fit in 50");
    let decision = racing.await.unwrap().unwrap();
    assert!(!decision.allowed, "40 used + 60 > the 50 a now has");
    let b = h
        .engine
        .consume(&teacher("b"), consume(50, "b-50"))
        .await
        .unwrap();
    assert!(b.allowed);
    assert_eq!(used_by(&h, &["a", "b"]).await, 90);
    assert_eq!(
        allocations(&h).await,
        vec![("a".into(), 50, 40), ("b".into(), 50, 50)]
    );
}

/// Sequence 1, the consume first: it is in flight when the bulk change
/// asks for a's floor, which is then 100 and refuses the shrink to 50.
#[actix_rt::test]
async fn a_bulk_shrink_behind_a_consume_sees_its_usage_and_is_refused() {
    let (h, store) = held(Clock::manual(START_MS)).await;
    allocate(&h, "a", 100, Priority::Normal).await.unwrap();
    h.engine
        .consume(&teacher("a"), consume(40, "a-40"))
        .await
        .unwrap();

    store.hold();
    let before = store.written();
    let engine = h.engine.clone();
    let racing =
        tokio::spawn(async move { engine.consume(&teacher("a"), consume(60, "a-60")).await });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        let slices = vec![slice("a", 50, false), slice("b", 50, false)];
        engine.bulk_set(&school_id(), slices, change()).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.let_go();

    assert!(racing.await.unwrap().unwrap().allowed);
    let refused = bulk.await.unwrap().unwrap_err();
    assert!(
        refused.to_string().contains("used"),
        "the refusal names the usage: {refused}"
    );
    let b = h
        .engine
        .consume(&teacher("b"), consume(50, "b-50"))
        .await
        .unwrap();
    assert!(
        !b.allowed,
        "b got nothing: the bulk change was refused whole"
    );
    assert_eq!(used_by(&h, &["a", "b"]).await, 100);
}

/// Sequence 1 with no order forced: the bulk change and the consume race,
/// round after round, and however they land the pool holds.
#[actix_rt::test]
async fn a_bulk_shrink_and_a_consume_in_any_order_never_overspend() {
    for round in 0..40 {
        let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
        school(&h, 100, false).await;
        allocate(&h, "a", 100, Priority::Normal).await.unwrap();
        h.engine
            .consume(&teacher("a"), consume(40, "a-40"))
            .await
            .unwrap();
        let engine = h.engine.clone();
        let bulk = tokio::spawn(async move {
            let slices = vec![slice("a", 50, false), slice("b", 50, false)];
            engine.bulk_set(&school_id(), slices, change()).await
        });
        let engine = h.engine.clone();
        let racing =
            tokio::spawn(async move { engine.consume(&teacher("a"), consume(60, "a-60")).await });
        let (bulk, racing) = (bulk.await.unwrap(), racing.await.unwrap().unwrap());
        assert!(
            bulk.is_ok() != racing.allowed,
            "round {round}: exactly one of the shrink and the consume wins (bulk {bulk:?}, consume {racing:?})"
        );
        let _ = h
            .engine
            .consume(&teacher("b"), consume(50, "b-50"))
            .await
            .unwrap();
        let spent = used_by(&h, &["a", "b"]).await;
        assert!(spent <= 100, "round {round}: {spent} units spent of 100");
    }
}

/// Sequence 2: a removal sent while an older bulk record for the same slice
/// is in flight. The removal wins (it is newer), the slice stays gone, the
/// live state is the replayed one, and the freed units are spent only once.
#[actix_rt::test]
async fn a_removal_after_a_bulk_change_in_flight_does_not_bring_the_slice_back() {
    let clock = Clock::manual(START_MS);
    let (h, store) = held(clock.clone()).await;
    allocate(&h, "u", 50, Priority::Normal).await.unwrap();
    allocate(&h, "x", 0, Priority::Normal).await.unwrap();

    store.hold();
    let before = store.written();
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        engine
            .bulk_set(&school_id(), vec![slice("x", 50, false)], change())
            .await
    });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let removal = tokio::spawn(async move {
        let msg = RemoveSlice {
            service: service(),
            change: change(),
        };
        engine.remove_allocation(&teacher("x"), msg).await
    });
    // Its record queues behind the held flush (the log writer is inside it,
    // so it is not counted as written yet): give it the time to get there.
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.let_go();
    bulk.await.unwrap().unwrap();
    removal.await.unwrap().unwrap();

    let live = allocations(&h).await;
    assert!(
        !live.iter().any(|(t, units, _)| t == "x" && *units > 0),
        "x was removed after the bulk change: {live:?}"
    );
    assert_eq!(everyone_spends(&h, &["u", "x"], "r").await, 100);
    let live = allocations(&h).await;
    drop(h);
    assert_eq!(allocations_after_restart(store, clock).await, live);
}

/// Sequence 2 the other way: the removal first, then a bulk change that
/// sets the slice again. The newer bulk change gives x its 50, and nothing
/// else may have them.
#[actix_rt::test]
async fn a_bulk_change_after_a_removal_in_flight_sets_the_slice_again() {
    let clock = Clock::manual(START_MS);
    let (h, store) = held(clock.clone()).await;
    allocate(&h, "u", 50, Priority::Normal).await.unwrap();
    allocate(&h, "x", 10, Priority::Normal).await.unwrap();

    store.hold();
    let before = store.written();
    let engine = h.engine.clone();
    let removal = tokio::spawn(async move {
        let msg = RemoveSlice {
            service: service(),
            change: change(),
        };
        engine.remove_allocation(&teacher("x"), msg).await
    });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        engine
            .bulk_set(&school_id(), vec![slice("x", 50, false)], change())
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.let_go();
    removal.await.unwrap().unwrap();
    bulk.await.unwrap().unwrap();

    let live = allocations(&h).await;
    assert!(live.contains(&("x".into(), 50, 0)), "{live:?}");
    assert_eq!(everyone_spends(&h, &["u", "x"], "r").await, 100);
    let live = allocations(&h).await;
    drop(h);
    assert_eq!(allocations_after_restart(store, clock).await, live);
}

/// Sequence 3: a bulk record written in the last minute of a cycle reaches
/// its teacher after the teacher rolled into the next one. A slice that
/// does not renew starts the new cycle at 0, as it would had the record
/// arrived in time; the school has its units back and gives them to v.
#[actix_rt::test]
async fn a_bulk_record_that_lands_after_the_rollover_gives_a_non_renewing_slice_nothing() {
    let clock = Clock::manual(ms("2026-11-30T23:59:00Z"));
    let (h, store) = held(clock.clone()).await;
    allocate(&h, "u", 0, Priority::Normal).await.unwrap();
    allocate(&h, "x", 0, Priority::Normal).await.unwrap();

    store.hold();
    let before = store.written();
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        engine
            .bulk_set(&school_id(), vec![slice("x", 50, false)], change())
            .await
    });
    wait_written_beyond(&store, before).await;
    clock.advance(2 * 60_000);
    let engine = h.engine.clone();
    let hold = tokio::spawn(async move {
        let msg = Reserve(HoldRequest {
            service: service(),
            units: 10,
            ttl_ms: 60_000,
            reservation_id: ReservationId::parse("x-hold").unwrap(),
            model: Arc::from("m"),
        });
        engine.reserve(&teacher("x"), msg).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.let_go();
    bulk.await.unwrap().unwrap();
    let (decision, _) = hold.await.unwrap().unwrap();
    assert!(!decision.allowed, "x has nothing in December");

    let usage = h.engine.usage(&teacher("x")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-01T00:00:00Z"));
    assert_eq!(usage.services[0].allocated_units, 0);
    let view = h.engine.get_school(&school_id()).await.unwrap();
    assert_eq!(
        view.pools[0].allocated_units, 0,
        "the school took x's 50 back"
    );
    assert_eq!(everyone_spends(&h, &["u", "x"], "dec").await, 100);
    let live = allocations(&h).await;
    drop(h);
    assert_eq!(allocations_after_restart(store, clock).await, live);
}

/// Holds t1's mailbox and fills it: what a teacher busy with a large sync
/// batch looks like to everyone who sends it something. Returns the go
/// signal and the consumes waiting to get in.
async fn stall_and_fill(
    h: &Harness,
    round: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    Vec<tokio::task::JoinHandle<Result<Decision, EngineError>>>,
) {
    let (go, stalled) = tokio::sync::oneshot::channel();
    let addr = h.engine.route(&teacher("t1"), None).unwrap().unwrap();
    addr.send(super::school::Stall(stalled)).await.unwrap();
    let waiting = (0..10)
        .map(|i| {
            let engine = h.engine.clone();
            tokio::spawn(async move {
                engine
                    .consume(&teacher("t1"), consume(1, &format!("{round}-{i}")))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(SETTLE).await;
    (go, waiting)
}

async fn all_allowed(waiting: Vec<tokio::task::JoinHandle<Result<Decision, EngineError>>>) {
    for answer in futures::future::join_all(waiting).await {
        assert!(answer.unwrap().unwrap().allowed);
    }
}

/// A school whose teachers have a mailbox of 2, and t1 with 500 units
/// that renew.
async fn small_mailbox_school(clock: Clock) -> Harness {
    let config = EngineConfig {
        mailbox_capacity: 2,
        ..test_config()
    };
    let h = start_configured(Arc::new(MemoryLog::default()), clock, config).await;
    school(&h, 1000, false).await;
    let msg = SetAllocation {
        service: service(),
        allocated_units: 500,
        priority: Some(Priority::Normal),
        auto_renew: Some(true),
        change: change(),
        managed: true,
    };
    h.engine.set_allocation(&teacher("t1"), msg).await.unwrap();
    h
}

fn anchor_moves_to_the_15th() -> UpdateSettings {
    UpdateSettings {
        name: None,
        borrowing_enabled: None,
        self_service_requests: None,
        next_anchor: Some(BillingAnchor::new(15).unwrap()),
        change: change(),
    }
}

/// Sequence 4: the seed told teachers of a new anchor and of each rollover
/// with messages that a full mailbox dropped, and a teacher that missed
/// them never rolled at the new anchor. Here a teacher reads its school's
/// cycle itself: with its mailbox (of 2) full while the anchor changes and
/// again while the school rolls, it still rolls at the new anchor, and
/// every consume is charged to the cycle it was made in.
#[actix_rt::test]
async fn a_teacher_with_a_full_mailbox_rolls_at_a_changed_anchor() {
    let clock = Clock::manual(ms("2026-11-20T12:00:00Z"));
    let h = small_mailbox_school(clock.clone()).await;

    let (go, waiting) = stall_and_fill(&h, "nov").await;
    let settings = anchor_moves_to_the_15th();
    // The school changes the anchor while t1 is full; the call's answer
    // (a view with every teacher's usage) waits for t1.
    let engine = h.engine.clone();
    let changed = tokio::spawn(async move { engine.update_settings(&school_id(), settings).await });
    tokio::time::sleep(SETTLE).await;
    drop(go);
    all_allowed(waiting).await;
    changed.await.unwrap().unwrap();

    let (go, waiting) = stall_and_fill(&h, "dec").await;
    clock.advance(ms("2026-12-01T00:00:01Z") - ms("2026-11-20T12:00:00Z"));
    // The school's timer (every 20 ms) rolls it while t1 is full.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(go);
    all_allowed(waiting).await;
    let view = h.engine.get_school(&school_id()).await.unwrap();
    assert_eq!(view.cycle.start_ms, ms("2026-12-01T00:00:00Z"));

    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(
        (usage.cycle.start_ms, usage.cycle.end_ms),
        (ms("2026-12-01T00:00:00Z"), ms("2026-12-15T00:00:00Z"))
    );
    // The November consumes were made before the clock moved, the December
    // ones after; each counts in its own cycle.
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].previous.used_units
        ),
        (10, 10)
    );
    clock.advance(ms("2026-12-15T00:00:01Z") - ms("2026-12-01T00:00:01Z"));
    let (go, waiting) = stall_and_fill(&h, "mid-dec").await;
    drop(go);
    all_allowed(waiting).await;
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-15T00:00:00Z"));
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].previous.used_units
        ),
        (10, 10)
    );
}

/// Sequence 5: for a high priority teacher short of units, Check answers
/// what the call it previews would: Consume may borrow, a hold never does.
#[actix_rt::test]
async fn check_answers_what_the_call_it_previews_answers_for_a_teacher_who_must_borrow() {
    let h = start(MemoryLog::default(), Clock::manual(START_MS)).await;
    school(&h, 30, true).await;
    allocate(&h, "high", 10, Priority::High).await.unwrap();
    let check = |previews| {
        let engine = h.engine.clone();
        async move {
            let msg = Check {
                service: service(),
                units: 14,
                previews,
            };
            engine.check(&teacher("high"), msg).await.unwrap()
        }
    };
    let as_reserve = check(CheckPreviews::Reserve).await;
    let (reserved, _) = h
        .engine
        .reserve(
            &teacher("high"),
            Reserve(HoldRequest {
                service: service(),
                units: 14,
                ttl_ms: 60_000,
                reservation_id: ReservationId::parse("h1").unwrap(),
                model: Arc::from("m"),
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            as_reserve.allowed,
            as_reserve.reason,
            as_reserve.borrowed_units
        ),
        (reserved.allowed, reserved.reason, reserved.borrowed_units)
    );
    assert!(!reserved.allowed, "a hold never borrows");

    let as_consume = check(CheckPreviews::Consume).await;
    let consumed = h
        .engine
        .consume(&teacher("high"), consume(14, "e1"))
        .await
        .unwrap();
    assert_eq!(
        (as_consume.allowed, as_consume.borrowed_units),
        (consumed.allowed, consumed.borrowed_units)
    );
    assert_eq!((consumed.allowed, consumed.borrowed_units), (true, 4));
}

/// Sequence 3, the order the seed lost: x is waiting for the school (a
/// status change, no new terms) when the school takes a bulk change for x in
/// the last minute of November, and the school answers x only after it
/// rolled into December. On the seed the bulk record (November's) reached x
/// behind that December answer and gave the non-renewing slice its 50 in
/// December, while the school had rolled them back into the pool. Whatever
/// cycle the school writes the change in, x enforces what the school counts,
/// the pool is spent once, and a restart rebuilds the same state.
#[actix_rt::test]
async fn a_bulk_change_at_a_busy_school_across_the_rollover_leaves_teacher_and_school_agreed() {
    let clock = Clock::manual(ms("2026-11-30T23:59:00Z"));
    let (h, store) = held(clock.clone()).await;
    allocate(&h, "u", 0, Priority::Normal).await.unwrap();
    allocate(&h, "x", 0, Priority::Normal).await.unwrap();

    let go = stall_school(&h).await;
    let engine = h.engine.clone();
    let bulk = tokio::spawn(async move {
        engine
            .bulk_set(&school_id(), vec![slice("x", 50, false)], change())
            .await
    });
    tokio::time::sleep(SETTLE).await;
    // The school will be busy again right after the bulk change.
    let (go_again, stalled_again) = tokio::sync::oneshot::channel();
    h.engine
        .school(&school_id())
        .unwrap()
        .addr
        .do_send(super::school::Stall(stalled_again));
    let engine = h.engine.clone();
    let status = tokio::spawn(async move {
        let msg = SetStatus {
            service: service(),
            status: SliceStatus::Active,
            change: change(),
        };
        engine.set_status(&teacher("x"), msg).await
    });
    tokio::time::sleep(SETTLE).await;
    // The school writes the bulk record in November, then is busy.
    drop(go);
    tokio::time::sleep(SETTLE).await;
    clock.advance(2 * 60_000);
    // It rolls into December, then records x's status change.
    drop(go_again);
    bulk.await.unwrap().unwrap();
    status.await.unwrap().unwrap();

    let usage = h.engine.usage(&teacher("x")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-01T00:00:00Z"));
    let view = h.engine.get_school(&school_id()).await.unwrap();
    assert_eq!(view.cycle.start_ms, ms("2026-12-01T00:00:00Z"));
    assert_eq!(
        usage.services[0].allocated_units, view.pools[0].allocated_units,
        "x enforces what the school counts for it (u has 0)"
    );
    assert_eq!(everyone_spends(&h, &["u", "x"], "dec").await, 100);
    let live = allocations(&h).await;
    drop(h);
    assert_eq!(allocations_after_restart(store, clock).await, live);
}

/// Sequence 4, the order the old protocol lost: the anchor changes while
/// t1's mailbox is full and the month ends before t1 gets to the news. t1
/// rolls on its own at December 1 by the anchor it knew, learns of the new
/// anchor only after, and the rollover message the school sent was dropped:
/// t1 must still end December's first cycle on the 15th, as the school
/// does, and roll there.
#[actix_rt::test]
async fn a_teacher_that_hears_of_a_new_anchor_after_the_month_ended_rolls_at_it() {
    let clock = Clock::manual(ms("2026-11-20T12:00:00Z"));
    let h = small_mailbox_school(clock.clone()).await;

    let (go, waiting) = stall_and_fill(&h, "dec").await;
    let settings = anchor_moves_to_the_15th();
    let engine = h.engine.clone();
    let changed = tokio::spawn(async move { engine.update_settings(&school_id(), settings).await });
    tokio::time::sleep(SETTLE).await;
    // November ends while t1 is still full; the school's timer rolls it.
    clock.advance(ms("2026-12-01T00:00:01Z") - ms("2026-11-20T12:00:00Z"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(go);
    all_allowed(waiting).await;
    changed.await.unwrap().unwrap();

    let view = h.engine.get_school(&school_id()).await.unwrap();
    assert_eq!(
        (view.cycle.start_ms, view.cycle.end_ms),
        (ms("2026-12-01T00:00:00Z"), ms("2026-12-15T00:00:00Z"))
    );
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(
        (usage.cycle.start_ms, usage.cycle.end_ms),
        (view.cycle.start_ms, view.cycle.end_ms),
        "t1 is in the school's cycle"
    );
    assert_eq!(usage.services[0].used_units, 10);

    clock.advance(ms("2026-12-15T00:00:01Z") - ms("2026-12-01T00:00:01Z"));
    let (go, waiting) = stall_and_fill(&h, "mid-dec").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(go);
    all_allowed(waiting).await;
    let usage = h.engine.usage(&teacher("t1")).await.unwrap();
    assert_eq!(usage.cycle.start_ms, ms("2026-12-15T00:00:00Z"));
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].previous.used_units
        ),
        (10, 10)
    );
}
