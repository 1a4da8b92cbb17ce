//! How old the acknowledged answers a crash loses in batched mode are: a
//! measurement, not a test. Each run starts a release quotad with
//! `--durability batched`, loads it with consumes (unique event ids, the
//! time of each answer noted), SIGKILLs it, restarts it and retries every
//! acknowledged event: one that is not a duplicate was lost. The age of a
//! lost answer is the time from its answer to the kill; the span, from the
//! oldest lost answer to the newest, says how much traffic was lost.
//!
//! `scripts/measure-batched-loss` builds and runs it; `--help` lists the knobs
//! (CPU and I/O hogs stand in for a loaded machine).
#![deny(clippy::unwrap_used)]

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use quotad::auth::{Authenticator, Role};
use quotad::proto::quota_admin_client::QuotaAdminClient;
use quotad::proto::quota_gate_client::QuotaGateClient;
use quotad::proto::*;
use quotad_proto::BearerToken;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const KEY: &str = "the batched-loss measurement key, 32+ bytes";
const SCHOOL: &str = "loss";
const SERVICE: &str = "claude_messages";

#[derive(Parser, Debug)]
#[command(about = "Age of the acknowledged answers a SIGKILL loses in batched mode")]
struct Args {
    /// The quotad binary to measure.
    #[arg(long, default_value = "target/release/quotad")]
    quotad: PathBuf,
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Load before the kill; each run adds up to 100 ms so that the kill
    /// falls at every point of the flush cycle.
    #[arg(long, default_value_t = 2000)]
    load_ms: u64,
    /// Clients with one consume in flight each.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 64)]
    teachers: usize,
    #[arg(long, default_value_t = 5)]
    batched_flush_interval_ms: u64,
    /// Threads that spin during the load (CPU pressure).
    #[arg(long, default_value_t = 0)]
    cpu_hogs: usize,
    /// Threads that write and fsync a file beside the data directory during
    /// the load (I/O pressure: slower fsyncs).
    #[arg(long, default_value_t = 0)]
    io_hogs: usize,
    /// Local snapshot interval of the measured server.
    #[arg(long, default_value_t = 30)]
    snapshot_interval_s: u64,
}

/// One acknowledged consume.
struct Answer {
    teacher: String,
    event_id: String,
    at: Instant,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut oldest_ms = Vec::new();
    println!("run  acknowledged  lost  oldest_lost_ms  newest_lost_ms  lost_span_ms");
    for run in 0..args.runs {
        let report = measure(&args, run).await?;
        let span = report
            .oldest_lost
            .zip(report.newest_lost)
            .map(|(oldest, newest)| oldest - newest);
        println!(
            "{run:>3}  {:>12}  {:>4}  {:>14}  {:>14}  {:>12}",
            report.acknowledged,
            report.lost,
            format_ms(report.oldest_lost),
            format_ms(report.newest_lost),
            format_ms(span)
        );
        oldest_ms.push(report.oldest_lost.map_or(0.0, |d| d.as_secs_f64() * 1e3));
    }
    oldest_ms.sort_by(f64::total_cmp);
    let median = oldest_ms.get(oldest_ms.len() / 2).copied().unwrap_or(0.0);
    let max = oldest_ms.last().copied().unwrap_or(0.0);
    println!(
        "oldest lost answer over {} runs: median {median:.1} ms, max {max:.1} ms \
         (flush interval {} ms, {} CPU hogs, {} I/O hogs)",
        args.runs, args.batched_flush_interval_ms, args.cpu_hogs, args.io_hogs
    );
    Ok(())
}

fn format_ms(age: Option<Duration>) -> String {
    age.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

struct Report {
    acknowledged: usize,
    lost: usize,
    oldest_lost: Option<Duration>,
    newest_lost: Option<Duration>,
}

async fn measure(args: &Args, run: u32) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let batched = Server::start(args, &data, "batched")?;
    let token = admin_token()?;
    set_up(&batched, &token, args.teachers).await?;

    let stop_hogs = Arc::new(AtomicBool::new(false));
    let hogs = start_hogs(args, dir.path(), &stop_hogs);
    let running = Arc::new(AtomicBool::new(true));
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(batched.channel().await?);
    }
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let channel = channels[w % channels.len()].clone();
        let mut gate = QuotaGateClient::with_interceptor(channel, BearerToken::new(&token)?);
        let (running, teachers) = (running.clone(), args.teachers);
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0.. {
                if !running.load(Ordering::Relaxed) {
                    break;
                }
                let teacher = format!("t{}", (w + i) % teachers);
                let event_id = format!("r{run}-w{w}-{i}");
                match gate.consume(consume(&teacher, &event_id)).await {
                    Ok(_) => answers.push(Answer {
                        teacher,
                        event_id,
                        at: Instant::now(),
                    }),
                    Err(_) => break,
                }
            }
            answers
        }));
    }
    let jitter_ms = u64::from(SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos()) % 100;
    tokio::time::sleep(Duration::from_millis(args.load_ms + jitter_ms)).await;
    let killed_at = Instant::now();
    batched.kill()?;
    running.store(false, Ordering::Relaxed);
    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(worker.await?);
    }
    stop_hogs.store(true, Ordering::Relaxed);
    for hog in hogs {
        let _ = hog.join();
    }

    let restarted = Server::start(args, &data, "sync")?;
    let lost_at = lost_answers(&restarted, &token, args.connections, &answers).await?;
    restarted.kill()?;
    let ages = lost_at
        .iter()
        .map(|at| killed_at.saturating_duration_since(*at));
    Ok(Report {
        acknowledged: answers.len(),
        lost: lost_at.len(),
        oldest_lost: ages.clone().max(),
        newest_lost: ages.min(),
    })
}

/// The answer times of the acknowledged events that are not duplicates now.
async fn lost_answers(
    server: &Server,
    token: &str,
    connections: usize,
    answers: &[Answer],
) -> Result<Vec<Instant>> {
    let connections = connections.max(1);
    let mut checkers = Vec::new();
    for c in 0..connections {
        let channel = server.channel().await?;
        let mut gate = QuotaGateClient::with_interceptor(channel, BearerToken::new(token)?);
        let mine: Vec<(String, String, Instant)> = answers
            .iter()
            .skip(c)
            .step_by(connections)
            .map(|a| (a.teacher.clone(), a.event_id.clone(), a.at))
            .collect();
        checkers.push(tokio::spawn(async move {
            let mut lost = Vec::new();
            for (teacher, event_id, at) in mine {
                let answer = gate.consume(consume(&teacher, &event_id)).await?;
                let duplicate = answer.into_inner().decision.is_some_and(|d| d.duplicate);
                if !duplicate {
                    lost.push(at);
                }
            }
            Ok::<_, tonic::Status>(lost)
        }));
    }
    let mut lost = Vec::new();
    for checker in checkers {
        lost.extend(checker.await??);
    }
    Ok(lost)
}

fn consume(teacher: &str, event_id: &str) -> ConsumeRequest {
    ConsumeRequest {
        school_id: SCHOOL.into(),
        teacher_id: teacher.into(),
        service_type: SERVICE.into(),
        units: 1,
        event_id: event_id.into(),
        occurred_at_ms: 0,
        model: "claude".into(),
    }
}

fn admin_token() -> Result<String> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(Authenticator::new(KEY.as_bytes())?.mint(
        "batched-loss",
        Role::Admin,
        &[],
        Duration::from_secs(3600),
        now_s,
    )?)
}

async fn set_up(server: &Server, token: &str, teachers: usize) -> Result<()> {
    let channel = server.channel().await?;
    let mut admin = QuotaAdminClient::with_interceptor(channel, BearerToken::new(token)?);
    admin
        .create_school(CreateSchoolRequest {
            school_id: SCHOOL.into(),
            name: "Loss".into(),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![PoolUnits {
                service_type: SERVICE.into(),
                cycle_units: 1_000_000_000_000,
            }],
            changed_by: "batched-loss".into(),
            self_service_requests: false,
        })
        .await?;
    for t in 0..teachers {
        admin
            .set_allocation(SetAllocationRequest {
                school_id: SCHOOL.into(),
                teacher_id: format!("t{t}"),
                service_type: SERVICE.into(),
                allocated_units: 1_000_000_000,
                priority: "normal".into(),
                auto_renew: Some(false),
                changed_by: "batched-loss".into(),
                reason: "measurement".into(),
            })
            .await?;
    }
    Ok(())
}

fn start_hogs(args: &Args, dir: &Path, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let mut hogs = Vec::new();
    for _ in 0..args.cpu_hogs {
        let stop = stop.clone();
        hogs.push(std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }));
    }
    for h in 0..args.io_hogs {
        let (stop, path) = (stop.clone(), dir.join(format!("io-hog-{h}")));
        hogs.push(std::thread::spawn(move || {
            let block = vec![0x5au8; 1 << 20];
            let Ok(mut file) = std::fs::File::create(&path) else {
                return;
            };
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Keep the file at 64 MiB so the hog does not fill the disk.
                if i % 64 == 0 && file.set_len(0).is_err() {
                    break;
                }
                if file.write_all(&block).is_err() || file.sync_data().is_err() {
                    break;
                }
            }
        }));
    }
    hogs
}

/// A quotad child process on 127.0.0.1:0.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &Args, data: &Path, durability: &str) -> Result<Self> {
        let mut child = Command::new(&args.quotad)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--no-metrics",
                "--no-rls",
            ])
            .args(["--durability", durability])
            .arg("--batched-flush-interval-ms")
            .arg(args.batched_flush_interval_ms.to_string())
            .arg("--snapshot-interval-s")
            .arg(args.snapshot_interval_s.to_string())
            .arg("--data-dir")
            .arg(data)
            .env("QUOTAD_LOG", "warn")
            .env("QUOTAD_AUTH_KEY", KEY)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {}: {e}", args.quotad.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .ok_or_else(|| format!("no address in {line:?}"))?
            .to_string();
        Ok(Self { child, addr })
    }

    /// A connection once the server answers (recovery done).
    async fn channel(&self) -> Result<Channel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let endpoint = Channel::from_shared(format!("http://{}", self.addr))?;
            if let Ok(channel) = endpoint.connect().await {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                let probe = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                if probe.is_ok() {
                    return Ok(channel);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("quotad on {} does not answer", self.addr).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
