//! An answer read from memory (a retried event, a second commit or release,
//! the release of a hold that already ended) must not go out before the
//! record it rests on is durable: told "already released" or "duplicate", a
//! client stops retrying, and a crash before the flush would undo what it
//! was told. The log here holds every flush until the test lets go, so the
//! records stay in flight while the replay is asked.

use std::future::Future;

use super::*;
use crate::storage::log::testing::HeldFlushes;

/// How long a replay is given to (wrongly) answer while its record is in flight.
const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(150);

async fn started(clock: Clock) -> (Harness, Arc<HeldFlushes>) {
    let store = Arc::new(HeldFlushes::default());
    let h = start_on(store.clone(), clock).await;
    school(&h, 100, false).await;
    allocate(&h, "t1", 50, Priority::Normal).await.unwrap();
    (h, store)
}

fn hold_request(id: &str, ttl_ms: u64) -> Reserve {
    Reserve(HoldRequest {
        service: service(),
        units: 5,
        ttl_ms,
        reservation_id: ReservationId::parse(id).unwrap(),
        model: Arc::from("m"),
    })
}

fn release(id: &str) -> Release {
    Release {
        reservation_id: ReservationId::parse(id).unwrap(),
    }
}

fn commit(id: &str) -> Commit {
    Commit {
        reservation_id: ReservationId::parse(id).unwrap(),
        actual_units: 4,
    }
}

/// Asks `replay` while the record before it is still in flight: it may not
/// answer until the flush is let go, and then it must.
async fn assert_waits_for_the_flush<T: Send + 'static>(
    store: &HeldFlushes,
    replay: impl Future<Output = T> + Send + 'static,
) -> T {
    let replay = tokio::spawn(replay);
    tokio::time::sleep(EARLY_ANSWER_WAIT).await;
    let early = replay.is_finished();
    store.let_go();
    assert!(!early, "answered before the record it rests on was durable");
    tokio::time::timeout(Duration::from_secs(5), replay)
        .await
        .expect("answered once the flush went through")
        .unwrap()
}

#[actix_rt::test]
async fn a_second_release_answers_only_once_the_first_release_is_durable() {
    let (h, store) = started(Clock::manual(START_MS)).await;
    let t1 = teacher("t1");
    h.engine
        .reserve(&t1, hold_request("r1", 60_000))
        .await
        .unwrap();
    store.hold();
    let before = store.written();
    let (engine, t) = (h.engine.clone(), t1.clone());
    let first = tokio::spawn(async move { engine.release(&t, release("r1")).await });
    wait_written_beyond(&store, before).await;
    let (engine, t) = (h.engine.clone(), t1.clone());
    let second =
        assert_waits_for_the_flush(
            &store,
            async move { engine.release(&t, release("r1")).await },
        )
        .await;
    assert_eq!(second.unwrap(), 0, "already released: nothing more freed");
    assert_eq!(first.await.unwrap().unwrap(), 5);
}

#[actix_rt::test]
async fn releasing_a_hold_that_expired_answers_only_once_the_expiry_is_durable() {
    let clock = Clock::manual(START_MS);
    let (h, store) = started(clock.clone()).await;
    let t1 = teacher("t1");
    h.engine
        .reserve(&t1, hold_request("r1", 1_000))
        .await
        .unwrap();
    store.hold();
    let before = store.written();
    clock.advance(1_000);
    // Housekeeping (every 20 ms here) writes the expiry; it stays in flight.
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let released =
        assert_waits_for_the_flush(
            &store,
            async move { engine.release(&t1, release("r1")).await },
        )
        .await;
    assert_eq!(released.unwrap(), 0);
}

#[actix_rt::test]
async fn a_second_commit_answers_only_once_the_first_commit_is_durable() {
    let (h, store) = started(Clock::manual(START_MS)).await;
    let t1 = teacher("t1");
    h.engine
        .reserve(&t1, hold_request("r1", 60_000))
        .await
        .unwrap();
    store.hold();
    let before = store.written();
    let (engine, t) = (h.engine.clone(), t1.clone());
    let first = tokio::spawn(async move { engine.commit(&t, commit("r1")).await });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let second =
        assert_waits_for_the_flush(
            &store,
            async move { engine.commit(&t1, commit("r1")).await },
        )
        .await
        .unwrap();
    assert!(second.duplicate && second.outcome.charged_units == 4);
    assert!(!first.await.unwrap().unwrap().duplicate);
}

#[actix_rt::test]
async fn a_retried_event_answers_only_once_its_first_record_is_durable() {
    let (h, store) = started(Clock::manual(START_MS)).await;
    let t1 = teacher("t1");
    store.hold();
    let before = store.written();
    let (engine, t) = (h.engine.clone(), t1.clone());
    let first = tokio::spawn(async move { engine.consume(&t, consume(3, "e1")).await });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let retry = assert_waits_for_the_flush(&store, async move {
        engine.consume(&t1, consume(3, "e1")).await
    })
    .await
    .unwrap();
    assert!(retry.duplicate && retry.allowed);
    assert!(!first.await.unwrap().unwrap().duplicate);
}

#[actix_rt::test]
async fn a_synced_duplicate_answers_only_once_its_first_record_is_durable() {
    let (h, store) = started(Clock::manual(START_MS)).await;
    let t1 = teacher("t1");
    store.hold();
    let before = store.written();
    let (engine, t) = (h.engine.clone(), t1.clone());
    let first = tokio::spawn(async move { engine.consume(&t, consume(3, "e1")).await });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let synced = assert_waits_for_the_flush(&store, async move {
        let events = vec![synced("t1", 3, "e1", START_MS)];
        engine.sync_usage(&t1.school_id, events).await
    })
    .await
    .unwrap();
    assert_eq!(synced, [SyncOutcome::Duplicate]);
    assert!(first.await.unwrap().unwrap().allowed);
}

/// A rejection is final for a device (it drops the event), so it must not
/// rest on a change that a crash could still undo: here, a slice removal.
#[actix_rt::test]
async fn a_synced_rejection_answers_only_once_the_change_behind_it_is_durable() {
    let (h, store) = started(Clock::manual(START_MS)).await;
    allocate(&h, "t2", 10, Priority::Normal).await.unwrap();
    let t2 = teacher("t2");
    store.hold();
    let before = store.written();
    let (engine, t) = (h.engine.clone(), t2.clone());
    let removal = RemoveSlice {
        service: service(),
        change: change(),
    };
    let removed = tokio::spawn(async move { engine.remove_allocation(&t, removal).await });
    wait_written_beyond(&store, before).await;
    let engine = h.engine.clone();
    let synced = assert_waits_for_the_flush(&store, async move {
        let events = vec![synced("t2", 3, "late", START_MS)];
        engine.sync_usage(&t2.school_id, events).await
    })
    .await
    .unwrap();
    assert!(
        matches!(
            &synced[0],
            SyncOutcome::Rejected {
                reason: SyncRejection::UnknownAllocation,
                ..
            }
        ),
        "{synced:?}"
    );
    removed.await.unwrap().unwrap();
}
