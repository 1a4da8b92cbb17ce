//! The WAL alone: encode and append a consume record, and the group commit
//! that makes it durable in sled.
//!
//! cargo bench --bench wal

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quotad::storage::{Durability, SledLog, Wal, WalConfig, WalWriter};
use quotad_core::{EventId, Record, SchoolId, ServiceType, TeacherId, Usage, UsageSource};

fn record(n: u64) -> Record {
    Record::UsageCharged(Usage {
        school_id: SchoolId::parse("bench").expect("a school id"),
        teacher_id: TeacherId::parse("t1").expect("a teacher id"),
        service: ServiceType::parse("claude_messages").expect("a service type"),
        source: UsageSource::Event(EventId::parse(&format!("e{n}")).expect("an event id")),
        units: 1,
        borrowed_units: 0,
        overage_units: 0,
        occurred_at_ms: 1_794_000_000_000,
        recorded_at_ms: 1_794_000_000_000,
        cycle_start_ms: 1_793_577_600_000,
        model: Arc::from("claude"),
    })
}

struct Log {
    wal: Wal,
    writer: Option<WalWriter>,
    _dir: tempfile::TempDir,
}

impl Log {
    fn open(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Arc::new(SledLog::open(dir.path()).expect("open sled"));
        let config = WalConfig {
            durability,
            ..WalConfig::default()
        };
        let (wal, writer, durable) = Wal::start(store, config, 0).expect("start the WAL");
        drop(durable);
        Self {
            wal,
            writer: Some(writer),
            _dir: dir,
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.shutdown();
        }
    }
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Elements(1));
    let mut n = 0;
    let log = Log::open(Durability::Sync);
    group.bench_function("append_and_wait_durable_c1", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let seq = log.wal.append(&record(n)).expect("append");
            let wal = &log.wal;
            async move { wal.wait_durable(seq).await.expect("durable") }
        })
    });
    for callers in [16u64, 64] {
        group.throughput(Throughput::Elements(callers));
        group.bench_function(
            BenchmarkId::new("append_and_wait_durable", format!("c{callers}")),
            |b| {
                b.to_async(&rt).iter(|| {
                    let seqs: Vec<u64> = (0..callers)
                        .map(|_| {
                            n += 1;
                            log.wal.append(&record(n)).expect("append")
                        })
                        .collect();
                    let wal = &log.wal;
                    async move {
                        for seq in seqs {
                            wal.wait_durable(seq).await.expect("durable");
                        }
                    }
                })
            },
        );
    }
    drop(log);

    // Last: it leaves a large log behind, whose teardown would disturb the others.
    group.throughput(Throughput::Elements(1));
    let log = Log::open(Durability::Batched);
    group.bench_function("append_no_wait", |b| {
        b.iter(|| {
            n += 1;
            log.wal.append(&record(n)).expect("append")
        })
    });
    drop(log);

    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
