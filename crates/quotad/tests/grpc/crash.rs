//! SIGKILL under load: every acknowledged consume survives, none counts twice.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quotad::storage::Durability;

use crate::common::*;

const TEACHERS: usize = 4;
const WORKERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_keeps_every_acknowledged_consume_and_counts_none_twice() {
    let (_dir, data) = temp_dir();
    let server = ProcessServer::start(&data, Durability::Sync);
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 10_000_000, false).await;
    for t in 0..TEACHERS {
        allocate(&mut admin, "oak", &format!("t{t}"), 1_000_000, "normal")
            .await
            .unwrap();
    }

    // Workers consume until the server dies under them.
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut gate = server.gate().await;
        let (attempted, acked) = (attempted.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let (teacher, event) = (format!("t{}", (w + i) % TEACHERS), format!("w{w}-{i}"));
                attempted
                    .lock()
                    .unwrap()
                    .insert((teacher.clone(), event.clone()));
                match gate.consume(consume("oak", &teacher, 1, &event)).await {
                    Ok(answer) => {
                        assert!(answer.into_inner().decision.unwrap().allowed);
                        acked.lock().unwrap().insert((teacher, event));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill();
    for worker in workers {
        worker.await.unwrap();
    }
    let (attempted, acked) = (
        attempted.lock().unwrap().clone(),
        acked.lock().unwrap().clone(),
    );
    assert!(
        acked.len() > 100,
        "the load ran before the kill: {} acked",
        acked.len()
    );

    let server = ProcessServer::start(&data, Durability::Sync);
    let mut gate = server.gate().await;
    let mut recovered = 0;
    for t in 0..TEACHERS {
        recovered += used_units(&mut gate, "oak", &format!("t{t}")).await;
    }
    assert!(
        recovered >= acked.len() as u64,
        "{recovered} recovered < {} acknowledged",
        acked.len()
    );
    assert!(recovered <= attempted.len() as u64);

    // Retrying every attempt: the acknowledged ones are duplicates, the rest count now, once.
    for (teacher, event) in &attempted {
        let d = decide(&mut gate, consume("oak", teacher, 1, event)).await;
        assert!(d.allowed);
        if acked.contains(&(teacher.clone(), event.clone())) {
            assert!(d.duplicate, "{teacher}/{event} was acknowledged before the kill but is not in the recovered state");
        }
    }
    let mut total = 0;
    for t in 0..TEACHERS {
        total += used_units(&mut gate, "oak", &format!("t{t}")).await;
    }
    assert_eq!(
        total,
        attempted.len() as u64,
        "every attempted event counted exactly once"
    );

    // And once more across a second kill, with no load: recovery is repeatable.
    server.kill();
    let server = ProcessServer::start(&data, Durability::Sync);
    let mut gate = server.gate().await;
    let mut again = 0;
    for t in 0..TEACHERS {
        again += used_units(&mut gate, "oak", &format!("t{t}")).await;
    }
    assert_eq!(again, total);
}

/// With batched durability an acknowledged consume may still sit in memory;
/// SIGTERM must flush it before the process exits. The periodic flush is set
/// to a minute, so only the shutdown's flush can have written them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_what_batched_mode_acknowledged() {
    let (_dir, data) = temp_dir();
    let slow_flush = [
        "--batched-flush-interval-ms",
        "60000",
        "--snapshot-interval-s",
        "3600",
    ];
    let server = ProcessServer::start_with_args(&data, Durability::Batched, &slow_flush);
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 1000, false).await;
    allocate(&mut admin, "oak", "t1", 1000, "normal")
        .await
        .unwrap();
    for i in 0..200 {
        let d = gate
            .consume(consume("oak", "t1", 1, &format!("e{i}")))
            .await
            .unwrap();
        assert!(d.into_inner().decision.unwrap().allowed);
    }
    crate::load::terminate_now(server).await;

    let server = ProcessServer::start(&data, Durability::Batched);
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "oak", "t1").await, 200);
}
