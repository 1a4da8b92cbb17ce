//! The log's promises, checked against every store: sled on disk and memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::log::{Entry, LogCall, WrappedLog};
use super::snapshot::{write_snapshot, Snapshotter};
use super::*;
use quotad_core::{Record, RuleLimits, SchoolConfig, SchoolId, ServiceType, Tier};

fn school_record(name: &str) -> Record {
    Record::SchoolCreated {
        config: SchoolConfig {
            id: SchoolId::parse(name).unwrap(),
            name: Arc::from(name),
            tier: Tier::K12,
            anchor: Default::default(),
            borrowing_enabled: false,
            self_service_requests: false,
        },
        cycle_start_ms: 0,
        pools: vec![(ServiceType::parse("claude_messages").unwrap(), 10)],
        change: quotad_core::Change {
            by: Arc::from("t"),
            reason: Arc::from(""),
            at_ms: 0,
        },
    }
}

/// Counts flushes, to see group commit at work.
struct CountingStore<S> {
    inner: S,
    flushes: AtomicUsize,
}

impl<S: LogStore> WrappedLog for CountingStore<S> {
    fn inner(&self) -> &dyn LogStore {
        &self.inner
    }
    fn before(&self, call: LogCall<'_>) -> Result<(), StorageError> {
        if let LogCall::Flush = call {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

fn nothing_recovered() -> Recovered {
    Recovered {
        state: Default::default(),
        snapshot_seq: 0,
        last_seq: 0,
        replayed_records: 0,
        lost: None,
    }
}

/// Runs a test body against sled (in a temp dir) and against memory.
macro_rules! for_each_store {
    ($name:ident, |$store:ident| $body:block) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                let dir = tempfile::tempdir().unwrap();
                let $store: Arc<dyn LogStore> = Arc::new(SledLog::open(dir.path()).unwrap());
                $body
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                let $store: Arc<dyn LogStore> = Arc::new(MemoryLog::default());
                $body
            }
        }
    };
}

for_each_store!(appended_records_are_recovered_in_order, |store| {
    let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
    let mut last = 0;
    for i in 0..20 {
        last = wal.append(&school_record(&format!("s{i}"))).unwrap();
    }
    wal.wait_durable(last).await.unwrap();
    writer.shutdown();
    let recovered = recover(store.as_ref()).unwrap();
    assert_eq!(recovered.last_seq, 20);
    assert_eq!(recovered.replayed_records, 20);
    assert_eq!(recovered.state.schools.len(), 20);
});

for_each_store!(
    a_snapshot_truncates_the_log_and_recovery_resumes_after_it,
    |store| {
        let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        for i in 0..5 {
            let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
            wal.wait_durable(seq).await.unwrap();
        }
        let state = recover(store.as_ref()).unwrap().state;
        write_snapshot(store.as_ref(), 5, &state).unwrap();
        assert!(
            store.read_after(0).unwrap().is_empty(),
            "records up to 5 are truncated"
        );
        let seq = wal.append(&school_record("s5")).unwrap();
        wal.wait_durable(seq).await.unwrap();
        writer.shutdown();
        let recovered = recover(store.as_ref()).unwrap();
        assert_eq!(
            (
                recovered.snapshot_seq,
                recovered.last_seq,
                recovered.replayed_records
            ),
            (5, 6, 1)
        );
        assert_eq!(recovered.state.schools.len(), 6);
    }
);

for_each_store!(a_damaged_record_stops_recovery_with_its_position, |store| {
    store
        .append(&[
            (1, codec::encode(&school_record("a")).unwrap()),
            (2, b"garbage".to_vec()),
        ])
        .unwrap();
    store.flush().unwrap();
    match recover(store.as_ref()) {
        Err(StorageError::Corrupt { wal_seq: 2, .. }) => {}
        other => panic!("expected a corrupt record at 2, got {other:?}"),
    }
});

for_each_store!(
    the_snapshotter_writes_what_is_durable_and_a_restart_resumes,
    |store| {
        let (wal, writer, durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        let snapshotter = Snapshotter::start(
            store.clone(),
            durable,
            nothing_recovered(),
            Duration::from_millis(20),
            RuleLimits::default(),
            || 0,
            None,
        )
        .unwrap();
        for i in 0..50 {
            let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
            wal.wait_durable(seq).await.unwrap();
        }
        writer.shutdown();
        snapshotter.join();
        let recovered = recover(store.as_ref()).unwrap();
        assert_eq!(
            recovered.snapshot_seq, 50,
            "the final snapshot covers everything"
        );
        assert_eq!(recovered.replayed_records, 0);
        assert_eq!(recovered.state.schools.len(), 50);
        let (wal, writer, _durable) =
            Wal::start(store.clone(), WalConfig::default(), recovered.last_seq).unwrap();
        assert_eq!(wal.append(&school_record("next")).unwrap(), 51);
        writer.shutdown();
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flush_covers_every_record_that_arrived_meanwhile() {
    let store = Arc::new(CountingStore {
        inner: MemoryLog::default(),
        flushes: AtomicUsize::new(0),
    });
    let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let wal = wal.clone();
            tokio::spawn(async move {
                let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
                wal.wait_durable(seq).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let flushes = store.flushes.load(Ordering::SeqCst);
    assert!(flushes < 200, "200 records took {flushes} flushes");
    writer.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_a_crash() {
    let store = MemoryLog::default();
    let (wal, writer, _durable) =
        Wal::start(Arc::new(store.clone()), WalConfig::default(), 0).unwrap();
    let mut acknowledged = 0;
    for i in 0..30 {
        let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
        wal.wait_durable(seq).await.unwrap();
        acknowledged += 1;
    }
    let crashed = store.crash();
    drop(writer);
    let recovered = recover(&crashed).unwrap();
    assert_eq!(recovered.state.schools.len(), acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_refuses_every_later_change() {
    let store = MemoryLog::default();
    let (wal, writer, _durable) =
        Wal::start(Arc::new(store.clone()), WalConfig::default(), 0).unwrap();
    let seq = wal.append(&school_record("before")).unwrap();
    wal.wait_durable(seq).await.unwrap();
    store.fail_writes();
    let seq = wal.append(&school_record("during")).unwrap();
    let waited = wal.wait_durable(seq).await;
    assert!(
        matches!(waited, Err(WalError::Poisoned(ref reason)) if reason.contains("injected")),
        "{waited:?}"
    );
    assert!(matches!(
        wal.append(&school_record("after")),
        Err(WalError::Poisoned(_))
    ));
    assert!(!wal.is_durable(seq));
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_acknowledges_at_once_and_flushes_within_the_interval() {
    let store = MemoryLog::default();
    let config = WalConfig {
        durability: Durability::Batched,
        batched_flush_interval_ms: 20,
        ..WalConfig::default()
    };
    let (wal, writer, _durable) = Wal::start(Arc::new(store.clone()), config, 0).unwrap();
    let seq = wal.append(&school_record("a")).unwrap();
    wal.wait_durable(seq).await.unwrap();
    for _ in 0..200 {
        if wal.is_durable(seq) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(wal.is_durable(seq), "flushed by the interval");
    assert_eq!(recover(&store.crash()).unwrap().state.schools.len(), 1);
    drop(writer);
}

/// A follower whose floor the test sets, standing in for Postgres.
struct Floor {
    floor: Arc<std::sync::atomic::AtomicU64>,
    applied: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl super::snapshot::Follower for Floor {
    fn applied(&mut self, _: u64, _: &Record, _: &quotad_core::State) {
        self.applied.fetch_add(1, Ordering::SeqCst);
    }
    fn interval(&self) -> Duration {
        Duration::from_millis(10)
    }
    fn tick(&mut self, _: &mut quotad_core::State, _: u64) {}
    fn truncate_floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }
    fn finish(&mut self, _: &mut quotad_core::State, _: u64) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

for_each_store!(
    the_log_is_truncated_only_through_what_the_follower_holds,
    |store| {
        let floor = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (applied, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let follower = Floor {
            floor: floor.clone(),
            applied: applied.clone(),
            finished: finished.clone(),
        };
        let (wal, writer, durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        let snapshotter = Snapshotter::start(
            store.clone(),
            durable,
            nothing_recovered(),
            Duration::from_millis(10),
            RuleLimits::default(),
            || 0,
            Some(Box::new(follower)),
        )
        .unwrap();
        for i in 0..20 {
            let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
            wal.wait_durable(seq).await.unwrap();
        }
        floor.store(7, Ordering::SeqCst);
        writer.shutdown();
        snapshotter.join();
        assert_eq!(
            applied.load(Ordering::SeqCst),
            20,
            "every durable record, once"
        );
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let recovered = recover(store.as_ref()).unwrap();
        assert_eq!(
            recovered.snapshot_seq, 20,
            "the local snapshot covers everything"
        );
        let kept: Vec<u64> = store
            .read_after(0)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(
            kept,
            (8..=20).collect::<Vec<_>>(),
            "records after the floor stay"
        );
    }
);

for_each_store!(
    a_restart_that_replayed_the_log_writes_it_into_the_next_snapshot_before_truncating,
    |store| {
        // A first run: a snapshot at 3, then records 4..=10 in the WAL only
        // (as a kill -9 leaves them).
        let (wal, writer, _durable) = Wal::start(store.clone(), WalConfig::default(), 0).unwrap();
        for i in 0..10 {
            let seq = wal.append(&school_record(&format!("s{i}"))).unwrap();
            wal.wait_durable(seq).await.unwrap();
            if seq == 3 {
                let state = recover(store.as_ref()).unwrap().state;
                write_snapshot(store.as_ref(), 3, &state).unwrap();
            }
        }
        writer.shutdown();
        let recovered = recover(store.as_ref()).unwrap();
        assert_eq!((recovered.snapshot_seq, recovered.last_seq), (3, 10));

        // The restart stops before any new record: the replayed records must
        // reach a snapshot, and none may be dropped before one holds them.
        let floor = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let follower = Floor {
            floor: floor.clone(),
            applied: Arc::default(),
            finished: Arc::default(),
        };
        let (_wal, writer, durable) = Wal::start(store.clone(), WalConfig::default(), 10).unwrap();
        let snapshotter = Snapshotter::start(
            store.clone(),
            durable,
            recovered,
            Duration::from_secs(3600),
            RuleLimits::default(),
            || 0,
            Some(Box::new(follower)),
        )
        .unwrap();
        // Several follower ticks (every 10 ms) pass with no snapshot written.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let kept: Vec<u64> = store
            .read_after(3)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(
            kept,
            (4..=10).collect::<Vec<_>>(),
            "no snapshot holds them yet"
        );
        writer.shutdown();
        snapshotter.join();

        let again = recover(store.as_ref()).unwrap();
        assert_eq!(
            again.snapshot_seq, 10,
            "the stop wrote the replayed records"
        );
        assert_eq!(again.state.schools.len(), 10);
        assert!(store.read_after(0).unwrap().is_empty());
    }
);

/// Notes how many records each truncation drops.
#[derive(Default)]
struct TruncationSizes {
    inner: MemoryLog,
    dropped: std::sync::Mutex<Vec<usize>>,
}

impl WrappedLog for TruncationSizes {
    fn inner(&self) -> &dyn LogStore {
        &self.inner
    }
    fn before(&self, call: LogCall<'_>) -> Result<(), StorageError> {
        if let LogCall::TruncateThrough(wal_seq) = call {
            let dropped = self.inner.read_after(0)?;
            let dropped = dropped.iter().filter(|(seq, _)| *seq <= wal_seq).count();
            self.dropped.lock().unwrap().push(dropped);
        }
        Ok(())
    }
}

/// Dropping a sled record costs ~13 us; a WAL of a million records dropped
/// in one call held the snapshot thread (and so, once its queue filled, the
/// WAL writer) for 13 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_is_truncated_in_bounded_steps() {
    let store = Arc::new(TruncationSizes::default());
    let records: Vec<Entry> = (1..=20_000)
        .map(|seq| {
            (
                seq,
                codec::encode(&school_record(&format!("s{seq}"))).unwrap(),
            )
        })
        .collect();
    store.append(&records).unwrap();
    store.flush().unwrap();
    let recovered = recover(store.as_ref()).unwrap();
    let state = recovered.state.clone();
    store
        .write_snapshot(20_000, &codec::encode(&state).unwrap())
        .unwrap();
    let recovered = Recovered {
        snapshot_seq: 20_000,
        ..recovered
    };
    let (_wal, writer, durable) = Wal::start(store.clone(), WalConfig::default(), 20_000).unwrap();
    let snapshotter = Snapshotter::start(
        store.clone(),
        durable,
        recovered,
        Duration::from_secs(3600),
        RuleLimits::default(),
        || 0,
        None,
    )
    .unwrap();
    for _ in 0..500 {
        if store.read_after(0).unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.shutdown();
    snapshotter.join();
    assert!(store.read_after(0).unwrap().is_empty(), "all dropped");
    let dropped = store.dropped.lock().unwrap().clone();
    assert_eq!(dropped.iter().sum::<usize>(), 20_000);
    assert!(
        dropped.iter().all(|n| *n <= 4_096),
        "at most one step's records at a time: {dropped:?}"
    );
    assert_eq!(recover(store.as_ref()).unwrap().state.schools.len(), 20_000);
}
