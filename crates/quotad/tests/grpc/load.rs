//! Concurrent consume load against a quotad child process, and the checks
//! that every acknowledged consume survived: shared by the crash-restart tests
//! here and the Postgres ones (tests/postgres includes this file).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quotad::proto::*;

use crate::common::*;

pub const SCHOOL: &str = "oak";
pub const TEACHERS: usize = 4;
const WORKERS: usize = 16;

/// (teacher, event id) pairs.
pub type Events = BTreeSet<(String, String)>;

/// What the clients saw before the kill.
pub struct Load {
    /// Sent, whether or not an answer came back.
    pub attempted: Events,
    /// Answered "allowed": each must be in every later state.
    pub acknowledged: Events,
}

/// A school of SCHOOL with TEACHERS teachers, enough units for any load.
pub async fn set_up_school(server: &ProcessServer) {
    let mut admin = server.admin().await;
    create_school(&mut admin, SCHOOL, 10_000_000, false).await;
    for t in 0..TEACHERS {
        allocate(&mut admin, SCHOOL, &teacher(t), 1_000_000, "normal")
            .await
            .unwrap();
    }
}

pub fn teacher(t: usize) -> String {
    format!("t{t}")
}

/// WORKERS clients consume 1 unit each, with unique event ids, for `run`;
/// then the server is killed (SIGKILL) under them.
pub async fn consume_until_killed(server: ProcessServer, run: Duration) -> Load {
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut gate = server.gate().await;
        let (attempted, acknowledged) = (attempted.clone(), acknowledged.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let (teacher, event) = (teacher((w + i) % TEACHERS), format!("w{w}-{i}"));
                attempted
                    .lock()
                    .unwrap()
                    .insert((teacher.clone(), event.clone()));
                match gate.consume(consume(SCHOOL, &teacher, 1, &event)).await {
                    Ok(answer) => {
                        assert!(answer.into_inner().decision.unwrap().allowed);
                        acknowledged.lock().unwrap().insert((teacher, event));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(run).await;
    server.kill();
    for worker in workers {
        worker.await.unwrap();
    }
    let load = Load {
        attempted: attempted.lock().unwrap().clone(),
        acknowledged: acknowledged.lock().unwrap().clone(),
    };
    assert!(
        load.acknowledged.len() > 100,
        "the load ran before the kill: {} acknowledged",
        load.acknowledged.len()
    );
    load
}

/// Waits until `server` answers calls, which it does only once recovery (the
/// WAL replay) is done. The call is a read: it changes nothing.
pub async fn wait_answering(server: &mut ProcessServer) {
    let mut admin = server.admin().await;
    for _ in 0..500 {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("quotad exited instead of serving ({status}); its error is on stderr");
        }
        let probe = admin
            .get_school(GetSchoolRequest {
                school_id: "probe".into(),
            })
            .await;
        if probe.is_err_and(|s| s.code() == tonic::Code::NotFound) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("quotad on {} does not answer", server.addr);
}

/// Once `server` answers, SIGTERM; the process must exit cleanly (after its
/// graceful stop).
pub async fn terminate(mut server: ProcessServer) {
    wait_answering(&mut server).await;
    terminate_now(server).await;
}

/// SIGTERM at once (quotad may still be recovering); the process must exit
/// cleanly (after its graceful stop).
pub async fn terminate_now(mut server: ProcessServer) {
    let pid = server.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "quotad exits cleanly on SIGTERM: {status:?}"
    );
}

/// The units each teacher has used, or why they cannot be read (a school
/// lost whole is NOT_FOUND).
pub async fn used_by_teacher(gate: &mut GateClient) -> Result<u64, tonic::Status> {
    let mut used = 0;
    for t in 0..TEACHERS {
        let view = gate
            .get_usage(GetUsageRequest {
                school_id: SCHOOL.into(),
                teacher_id: teacher(t),
            })
            .await?
            .into_inner();
        used += view
            .services
            .iter()
            .find(|s| s.service_type == SERVICE)
            .map_or(0, |s| s.used_units);
    }
    Ok(used)
}

/// Every acknowledged consume is in `server`'s state and none counts twice:
/// the usage is exactly the events that are duplicates on retry, which
/// include every acknowledged one. Retrying charges the rest once, so
/// afterwards every attempted event counts exactly once.
pub async fn assert_every_acknowledged_consume_is_kept(server: &ProcessServer, load: &Load) {
    let mut gate = server.gate().await;
    let used = used_by_teacher(&mut gate)
        .await
        .unwrap_or_else(|status| panic!("the school's usage cannot be read: {status:?}"));
    let acknowledged = load.acknowledged.len() as u64;
    assert!(
        used >= acknowledged,
        "{used} units used < {acknowledged} acknowledged: acknowledged consumes were lost"
    );
    let mut duplicates = 0;
    let mut lost = Vec::new();
    for (teacher, event) in &load.attempted {
        let d = decide(&mut gate, consume(SCHOOL, teacher, 1, event)).await;
        assert!(d.allowed);
        if d.duplicate {
            duplicates += 1;
        } else if load
            .acknowledged
            .contains(&(teacher.clone(), event.clone()))
        {
            lost.push(format!("{teacher}/{event}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged events are not duplicates on retry (lost), e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(used, duplicates, "the usage is the events already counted");
    let total = used_by_teacher(&mut gate).await.unwrap();
    assert_eq!(
        total,
        load.attempted.len() as u64,
        "every attempted event counted exactly once"
    );
}

/// Reads that change nothing: GetUsage and Check for every teacher.
pub async fn read_only_calls(server: &ProcessServer) {
    let mut gate = server.gate().await;
    for round in 0..20 {
        for t in 0..TEACHERS {
            gate.get_usage(GetUsageRequest {
                school_id: SCHOOL.into(),
                teacher_id: teacher(t),
            })
            .await
            .unwrap();
            let check = gate
                .check(CheckRequest {
                    school_id: SCHOOL.into(),
                    teacher_id: teacher(t),
                    service_type: SERVICE.into(),
                    units: 1 + round,
                    previews: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(check.decision.unwrap().allowed);
        }
    }
}
