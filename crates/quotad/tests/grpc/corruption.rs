//! Damage to the data directory after a crash is found, never served: every
//! kind of damage ends either in exactly the state that was acknowledged or
//! in a refusal to start that says what is damaged. Served altered state
//! (lost usage, forgotten ids that a retry would charge twice) fails.
//!
//! Each case starts the real binary on a damaged copy of a data directory
//! that a SIGKILL left behind.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quotad::proto::{GetUsageRequest, ListHistoryRequest, VerifyHistoryRequest};
use quotad::storage::Durability;

use crate::common::*;

const EVENTS: usize = 300;

/// A data directory holding EVENTS acknowledged consumes of one unit, left
/// by SIGKILL, with a local snapshot in the middle (so that both a snapshot
/// and log records after it are on disk).
async fn killed_data_dir() -> (tempfile::TempDir, PathBuf) {
    let (dir, data) = temp_dir();
    let server =
        ProcessServer::start_with_args(&data, Durability::Sync, &["--snapshot-interval-s", "1"]);
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1_000_000, false).await;
    allocate(&mut admin, "oak", "ms-lee", 1_000_000, "normal")
        .await
        .unwrap();
    let mut gate = server.gate().await;
    for i in 0..EVENTS {
        if i == EVENTS / 2 {
            // Past the snapshot interval: the first half is in a snapshot.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let decision = decide(&mut gate, consume("oak", "ms-lee", 1, &format!("e-{i}"))).await;
        assert!(decision.allowed && !decision.duplicate);
    }
    server.kill();
    (dir, data)
}

#[derive(Debug)]
enum Outcome {
    /// quotad refused to start; what it said.
    Refused(String),
    /// quotad served exactly what was acknowledged.
    Identical,
}

/// Starts quotad on `data`; when it serves, checks that every acknowledged
/// unit and id is there, and panics (naming `case`) on anything else.
async fn outcome(case: &str, data: &Path, extra: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--no-rls",
        ])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("QUOTAD_LOG", "warn")
        .env("QUOTAD_AUTH_KEY", KEY)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the quotad binary");
    let mut stdout = child.stdout.take().unwrap();
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).to_string()
    });
    let first_line = tokio::time::timeout(Duration::from_secs(30), first_line)
        .await
        .unwrap_or_else(|_| panic!("{case}: quotad neither served nor exited within 30 s"))
        .unwrap();
    // The address is printed before recovery: a refusal comes after it.
    let addr = first_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
    let started = Instant::now();
    let serving = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Err(status);
        }
        if let Some(addr) = addr {
            if probe(addr).await {
                break Ok(addr);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{case}: quotad neither served nor exited within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let addr = match serving {
        Ok(addr) => addr,
        Err(status) => {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(!status.success(), "{case}: quotad exited 0 without serving");
            assert!(
                !stderr.contains("panicked"),
                "{case}: a refusal must be a message, not a panic:\n{stderr}"
            );
            return Outcome::Refused(stderr);
        }
    };
    let (_, mut gate) = clients_as(addr, &admin_token()).await;
    let request = GetUsageRequest {
        school_id: "oak".into(),
        teacher_id: "ms-lee".into(),
    };
    // A school that is gone altogether is altered state too.
    let used = gate.get_usage(request).await.map_or(0, |usage| {
        let services = usage.into_inner().services;
        services.iter().map(|s| s.used_units).sum::<u64>()
    });
    let mut forgotten = Vec::new();
    for i in 0..EVENTS {
        let answer = gate
            .consume(consume("oak", "ms-lee", 1, &format!("e-{i}")))
            .await;
        let duplicate = answer.is_ok_and(|a| a.into_inner().decision.is_some_and(|d| d.duplicate));
        if !duplicate {
            forgotten.push(i);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        used == EVENTS as u64 && forgotten.is_empty(),
        "{case}: quotad served altered state: {used} of {EVENTS} units used, {} acknowledged ids \
         forgotten (first: {:?})",
        forgotten.len(),
        forgotten.first()
    );
    Outcome::Identical
}

/// True once quotad answers calls (a missing school is an answer).
async fn probe(addr: std::net::SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let bearer = quotad_proto::BearerToken::new(&admin_token()).unwrap();
    let mut admin =
        quotad::proto::quota_admin_client::QuotaAdminClient::with_interceptor(channel, bearer);
    let request = quotad::proto::GetSchoolRequest {
        school_id: "probe".into(),
    };
    admin
        .get_school(request)
        .await
        .is_err_and(|s| s.code() == tonic::Code::NotFound)
}

/// A copy of the data directory, to damage.
fn copy_of(data: &Path) -> (tempfile::TempDir, PathBuf) {
    let (dir, copy) = temp_dir();
    copy_dir(data, &copy);
    (dir, copy)
}

fn log_file(data: &Path) -> PathBuf {
    data.join("db")
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Where the log holds data: sled's log file is sparse past what was
/// written, so damage there would only test zeros.
fn written_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1)
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(bytes).unwrap();
}

fn flip_byte(path: &Path, at: u64) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x5a;
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&byte).unwrap();
}

/// Offsets spread over `len`, from a fixed seed (a simple LCG: the test must
/// be the same every run).
fn offsets(len: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % len.max(1)
        })
        .collect()
}

/// A way to damage a data directory.
type Damage = Box<dyn Fn(&Path)>;

/// Runs `damage` on a fresh copy of `data` and returns what quotad did.
async fn damaged(case: &str, data: &Path, damage: impl FnOnce(&Path)) -> Outcome {
    let (_dir, copy) = copy_of(data);
    damage(&copy);
    outcome(case, &copy, &[]).await
}

fn assert_refusal_says_what(case: &str, outcome: &Outcome) {
    if let Outcome::Refused(message) = outcome {
        assert!(
            message.contains("damaged") || message.contains("lost"),
            "{case}: the refusal does not say what is damaged:\n{message}"
        );
        assert!(
            message.contains("--accept-data-loss") && message.contains("Postgres"),
            "{case}: the refusal does not say how to go on:\n{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undamaged_copy_serves_every_acknowledged_unit() {
    let (_dir, data) = killed_data_dir().await;
    let outcome = damaged("undamaged", &data, |_| {}).await;
    assert!(matches!(outcome, Outcome::Identical), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_and_zeroed_blocks_are_found_or_harmless() {
    let (_dir, data) = killed_data_dir().await;
    let written = written_len(&log_file(&data));
    let mut refused = 0;
    for (n, at) in offsets(written, 12, 7).into_iter().enumerate() {
        let case = format!("flipped byte {n} at {at} of {written}");
        let outcome = damaged(&case, &data, |copy| flip_byte(&log_file(copy), at)).await;
        assert_refusal_says_what(&case, &outcome);
        refused += matches!(outcome, Outcome::Refused(_)) as usize;
    }
    for (n, at) in offsets(written, 6, 11).into_iter().enumerate() {
        let at = at / 4096 * 4096;
        let case = format!("zeroed block {n} at {at} of {written}");
        let outcome = damaged(&case, &data, |copy| {
            overwrite(&log_file(copy), at, &[0; 4096])
        })
        .await;
        assert_refusal_says_what(&case, &outcome);
        refused += matches!(outcome, Outcome::Refused(_)) as usize;
    }
    // Most of a small log is live data: damage that is never noticed would
    // mean the checks do not run.
    assert!(refused > 0, "no damage was ever refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_log_is_found_and_appended_garbage_is_harmless() {
    let (_dir, data) = killed_data_dir().await;
    let path = log_file(&data);
    let written = written_len(&path);
    let cases: [(&str, Damage); 3] = [
        (
            "cut half",
            Box::new(move |copy: &Path| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(log_file(copy))
                    .unwrap();
                file.set_len(written / 2).unwrap();
            }),
        ),
        (
            "cut tail",
            Box::new(move |copy: &Path| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(log_file(copy))
                    .unwrap();
                file.set_len(written.saturating_sub(200)).unwrap();
            }),
        ),
        (
            "appended garbage",
            Box::new(|copy: &Path| {
                let path = log_file(copy);
                let len = file_len(&path);
                let garbage: Vec<u8> = offsets(251, 4096, 3).iter().map(|b| *b as u8).collect();
                overwrite(&path, len, &garbage);
            }),
        ),
    ];
    for (case, damage) in cases {
        let outcome = damaged(case, &data, |copy| damage(copy)).await;
        assert_refusal_says_what(case, &outcome);
        if case == "cut half" {
            assert!(
                matches!(outcome, Outcome::Refused(_)),
                "{case}: {outcome:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_or_mark_is_found() {
    let (_dir, data) = killed_data_dir().await;
    // The school's name is in the local snapshot and in the records: damage
    // every copy of it.
    let outcome = damaged("damaged snapshot", &data, |copy| {
        let path = log_file(copy);
        let bytes = std::fs::read(&path).unwrap();
        let name = b"School oak";
        let hits: Vec<usize> = bytes
            .windows(name.len())
            .enumerate()
            .filter(|(_, w)| *w == name)
            .map(|(i, _)| i)
            .collect();
        assert!(!hits.is_empty(), "the school's name is not in the log");
        for at in hits {
            flip_byte(&path, at as u64 + 3);
        }
    })
    .await;
    assert_refusal_says_what("damaged snapshot", &outcome);
    // sled's own snapshot files, when it wrote one.
    for entry in std::fs::read_dir(&data).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.starts_with("snap.") {
            let case = format!("damaged sled snapshot {name}");
            let outcome = damaged(&case, &data, |copy| {
                let path = copy.join(&name);
                flip_byte(&path, file_len(&path) / 2);
            })
            .await;
            assert_refusal_says_what(&case, &outcome);
        }
    }
    let case = "damaged durable mark";
    let outcome = damaged(case, &data, |copy| {
        let path = copy.join(quotad::storage::log::DURABLE_MARK_FILE);
        overwrite(&path, 0, &[0xff; 1024]);
    })
    .await;
    assert!(
        matches!(outcome, Outcome::Refused(_)),
        "{case}: {outcome:?}"
    );
    assert_refusal_says_what(case, &outcome);
}

/// The operator's way out: `--accept-data-loss` serves what the log still
/// holds, once, and the next start (without the flag) serves the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_the_loss_serves_what_is_left_and_stays_consistent() {
    let (_dir, data) = killed_data_dir().await;
    let (_copy_dir, copy) = copy_of(&data);
    let written = written_len(&log_file(&copy));
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(log_file(&copy))
            .unwrap();
        file.set_len(written / 2).unwrap();
    }
    let refused = outcome("cut half", &copy, &[]).await;
    assert!(matches!(refused, Outcome::Refused(_)), "{refused:?}");

    let used_after = |extra: &'static [&'static str]| {
        let copy = copy.clone();
        async move {
            let started = Instant::now();
            let server = ProcessServer::start_with_args(&copy, Durability::Sync, extra);
            let mut gate = server.gate().await;
            let used = used_units(&mut gate, "oak", "ms-lee").await;
            let answer = gate
                .consume(consume("oak", "ms-lee", 1, "after-the-loss"))
                .await;
            server.kill();
            (used, answer.is_ok(), started.elapsed())
        }
    };
    let (used, consumed, _) = used_after(&["--accept-data-loss"]).await;
    assert!(used < EVENTS as u64, "half the log cannot hold every unit");
    assert!(consumed, "a server that accepted the loss serves changes");
    // The accepted state, plus the one consume after it, with no flag now.
    let (used_again, _, _) = used_after(&[]).await;
    assert_eq!(used_again, used + 1);

    // The school's audit trail says so, and its chain is still whole.
    let server = ProcessServer::start(&copy, Durability::Sync);
    let mut admin = server.admin().await;
    let history = admin
        .list_history(ListHistoryRequest {
            school_id: "oak".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let accepted: Vec<_> = history
        .entries
        .iter()
        .filter(|e| e.action == "data_loss_accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{:?}", history.entries);
    assert!(accepted[0].actor.contains("--accept-data-loss"));
    assert!(
        accepted[0]
            .after
            .get("lost")
            .is_some_and(|l| l.contains("damaged") || l.contains("lost")),
        "{:?}",
        accepted[0].after
    );
    let verified = admin
        .verify_history(VerifyHistoryRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{verified:?}");
    server.kill();
}
