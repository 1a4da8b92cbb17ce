//! The in-process hot path: registry lookup, the teacher actor's decision,
//! the WAL append and (with sync durability) the wait for the group commit.
//! No gRPC here: `quotad-bench` measures the same path over the network.
//!
//! cargo bench --bench consume

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quotad::engine::{
    Check, Clock, Consume, Engine, EngineConfig, EngineRuntime, NewSchool, SetAllocation,
    TeacherRef,
};
use quotad::storage::{
    recover, Durability, LogStore, MemoryLog, SledLog, Wal, WalConfig, WalWriter,
};
use quotad_core::{
    BillingAnchor, Change, EventId, Priority, SchoolConfig, SchoolId, ServiceType, TeacherId, Tier,
};

const TEACHERS: usize = 1_000;

struct Bench {
    engine: Engine,
    teachers: Vec<TeacherRef>,
    service: ServiceType,
    next_event: AtomicU64,
    parts: Option<(EngineRuntime, WalWriter)>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some((runtime, writer)) = self.parts.take() {
            runtime.shutdown();
            writer.shutdown();
        }
    }
}

impl Bench {
    async fn start(sled: bool, durability: Durability) -> Self {
        let (store, dir): (Arc<dyn LogStore>, _) = if sled {
            let dir = tempfile::tempdir().expect("a temp dir");
            (
                Arc::new(SledLog::open(dir.path()).expect("open sled")),
                Some(dir),
            )
        } else {
            (Arc::new(MemoryLog::default()), None)
        };
        let recovered = recover(store.as_ref()).expect("recover an empty log");
        let wal_config = WalConfig {
            durability,
            ..WalConfig::default()
        };
        let (wal, writer, durable) =
            Wal::start(store, wal_config, recovered.last_seq).expect("start the WAL");
        drop(durable);
        let (engine, runtime) = Engine::start(
            recovered.state,
            wal,
            EngineConfig::default(),
            Clock::system(),
        )
        .await
        .expect("start the engine");
        let service = ServiceType::parse("claude_messages").expect("a service type");
        let school_id = SchoolId::parse("bench").expect("a school id");
        let change = || Change {
            by: Arc::from("bench"),
            reason: Arc::from("bench"),
            at_ms: 0,
        };
        let config = SchoolConfig {
            id: school_id.clone(),
            name: Arc::from("Bench"),
            tier: Tier::K12,
            anchor: BillingAnchor::new(1).expect("an anchor"),
            borrowing_enabled: false,
            self_service_requests: false,
        };
        let pool = 1_000_000_000 * TEACHERS as u64;
        engine
            .create_school(NewSchool {
                config,
                pools: vec![(service.clone(), pool)],
                change: change(),
            })
            .await
            .expect("create the school");
        let mut teachers = Vec::new();
        for t in 0..TEACHERS {
            let teacher = TeacherRef {
                school_id: school_id.clone(),
                teacher_id: TeacherId::parse(&format!("t{t}")).expect("a teacher id"),
            };
            let msg = SetAllocation {
                service: service.clone(),
                allocated_units: 1_000_000_000,
                priority: Some(Priority::Normal),
                auto_renew: Some(false),
                change: change(),
                managed: true,
            };
            engine
                .set_allocation(&teacher, msg)
                .await
                .expect("allocate");
            teachers.push(teacher);
        }
        Self {
            engine,
            teachers,
            service,
            next_event: AtomicU64::new(0),
            parts: Some((runtime, writer)),
            _dir: dir,
        }
    }

    async fn consume(&self) {
        let n = self.next_event.fetch_add(1, Ordering::Relaxed);
        let teacher = &self.teachers[n as usize % TEACHERS];
        let msg = Consume {
            service: self.service.clone(),
            units: 1,
            event_id: EventId::parse(&format!("e{n}")).expect("an event id"),
            occurred_at_ms: 0,
            model: Arc::from(""),
        };
        let decision = self.engine.consume(teacher, msg).await.expect("consume");
        assert!(decision.allowed);
    }

    async fn check(&self) {
        let n = self.next_event.fetch_add(1, Ordering::Relaxed);
        let teacher = &self.teachers[n as usize % TEACHERS];
        let msg = Check {
            service: self.service.clone(),
            units: 1,
            previews: quotad::engine::CheckPreviews::Consume,
        };
        self.engine.check(teacher, msg).await.expect("check");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn one_at_a_time(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("consume_c1");
    group.throughput(Throughput::Elements(1));
    for (name, sled, durability) in [
        ("memory_log", false, Durability::Sync),
        ("sled_sync", true, Durability::Sync),
        ("sled_batched", true, Durability::Batched),
    ] {
        let bench = rt.block_on(Bench::start(sled, durability));
        group.bench_function(BenchmarkId::new("consume", name), |b| {
            b.to_async(&rt).iter(|| bench.consume())
        });
        if !sled {
            group.bench_function(BenchmarkId::new("check", name), |b| {
                b.to_async(&rt).iter(|| bench.check())
            });
        }
        drop(bench);
    }
    group.finish();
}

/// 64 callers at once, as behind a busy proxy: what group commit buys.
fn sixty_four_at_once(c: &mut Criterion) {
    const CALLERS: u64 = 64;
    let rt = runtime();
    let mut group = c.benchmark_group("consume_c64");
    group.throughput(Throughput::Elements(CALLERS));
    for (name, sled, durability) in [
        ("memory_log", false, Durability::Sync),
        ("sled_sync", true, Durability::Sync),
        ("sled_batched", true, Durability::Batched),
    ] {
        let bench = Arc::new(rt.block_on(Bench::start(sled, durability)));
        group.bench_function(BenchmarkId::new("consume", name), |b| {
            b.to_async(&rt).iter(|| {
                let bench = bench.clone();
                async move {
                    let calls: Vec<_> = (0..CALLERS)
                        .map(|_| {
                            let bench = bench.clone();
                            tokio::spawn(async move { bench.consume().await })
                        })
                        .collect();
                    for call in calls {
                        call.await.expect("a consume task");
                    }
                }
            })
        });
        drop(bench);
    }
    group.finish();
}

criterion_group!(benches, one_at_a_time, sixty_four_at_once);
criterion_main!(benches);
