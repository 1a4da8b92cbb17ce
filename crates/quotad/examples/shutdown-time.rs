//! How long a graceful stop takes with many idempotency ids in memory: a
//! measurement, not a test. It starts a release quotad, loads `--ids` unique
//! event ids through SyncUsage batches, sends SIGTERM and times the exit;
//! then restarts it (timing recovery), checks that every id counted, and
//! stops it again. quotad's log (at debug for storage) is kept in
//! `--log`, so the phases of the stop can be read from its timestamps.
//!
//! `scripts/measure-shutdown` builds and runs it.
#![deny(clippy::unwrap_used)]

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use quotad::auth::{Authenticator, Role};
use quotad::proto::quota_admin_client::QuotaAdminClient;
use quotad::proto::quota_gate_client::QuotaGateClient;
use quotad::proto::*;
use quotad_proto::BearerToken;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const KEY: &str = "the shutdown-time measurement key, 32+ bytes";
const SCHOOL: &str = "ids";
const SERVICE: &str = "claude_messages";
/// SyncUsage's default batch limit.
const BATCH_EVENTS: usize = 1000;

#[derive(Parser, Debug)]
#[command(about = "Time of a graceful stop with many idempotency ids in memory")]
struct Args {
    #[arg(long, default_value = "target/release/quotad")]
    quotad: PathBuf,
    /// Unique event ids to load.
    #[arg(long, default_value_t = 1_000_000)]
    ids: usize,
    #[arg(long, default_value_t = 100)]
    teachers: usize,
    /// SyncUsage calls in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Local snapshot interval of the measured server.
    #[arg(long, default_value_t = 30)]
    snapshot_interval_s: u64,
    /// Seconds to wait between the load and the SIGTERM.
    #[arg(long, default_value_t = 0)]
    settle_s: u64,
    /// Postgres for snapshots too (postgres://user@host:port/db).
    #[arg(long)]
    database_url: Option<String>,
    /// quotad's log (both runs), appended.
    #[arg(long, default_value = "shutdown-time.log")]
    log: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let token = admin_token()?;

    let server = Server::start(&args, &data)?;
    // For attaching a profiler (perf record -p) before the stop.
    println!("quotad pid {}", server.child.id());
    let channel = server.channel().await?;
    set_up(channel.clone(), &token, args.teachers).await?;
    let started = Instant::now();
    load(channel, &token, &args).await?;
    println!(
        "loaded {} ids in {:.1} s",
        args.ids,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    println!(
        "first stop (SIGTERM to exit): {:.2} s",
        server.terminate()?.as_secs_f64()
    );

    let restarted_at = Instant::now();
    let server = Server::start(&args, &data)?;
    let channel = server.channel().await?;
    println!(
        "restart (start to first answer): {:.2} s",
        restarted_at.elapsed().as_secs_f64()
    );
    let used = used_units(channel, &token, args.teachers).await?;
    println!(
        "units used after the restart: {used} (expected {})",
        args.ids
    );
    println!(
        "second stop, nothing changed: {:.2} s",
        server.terminate()?.as_secs_f64()
    );
    if used != args.ids as u64 {
        return Err(format!("{used} units used, not {}", args.ids).into());
    }
    Ok(())
}

async fn load(channel: Channel, token: &str, args: &Args) -> Result<()> {
    let batches = args.ids.div_ceil(BATCH_EVENTS);
    let concurrency = args.concurrency.max(1);
    let mut senders = Vec::new();
    for s in 0..concurrency {
        let mut gate = QuotaGateClient::with_interceptor(channel.clone(), BearerToken::new(token)?)
            .max_decoding_message_size(16 << 20);
        let (ids, teachers) = (args.ids, args.teachers);
        senders.push(tokio::spawn(async move {
            for b in (s..batches).step_by(concurrency) {
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
                let events = (b * BATCH_EVENTS..((b + 1) * BATCH_EVENTS).min(ids))
                    .map(|n| UsageEvent {
                        event_id: format!("id-{n}"),
                        teacher_id: format!("t{}", n % teachers),
                        service_type: SERVICE.into(),
                        units: 1,
                        model: "claude".into(),
                        occurred_at_ms: now_ms,
                    })
                    .collect();
                let results = gate
                    .sync_usage(SyncUsageRequest {
                        school_id: SCHOOL.into(),
                        events,
                    })
                    .await?
                    .into_inner()
                    .results;
                if let Some(r) = results.iter().find(|r| r.status() != SyncStatus::Accepted) {
                    return Err(format!("event {} was not accepted: {r:?}", r.event_id).into());
                }
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    Ok(())
}

async fn used_units(channel: Channel, token: &str, teachers: usize) -> Result<u64> {
    let mut gate = QuotaGateClient::with_interceptor(channel, BearerToken::new(token)?);
    let mut used = 0;
    for t in 0..teachers {
        let view = gate
            .get_usage(GetUsageRequest {
                school_id: SCHOOL.into(),
                teacher_id: format!("t{t}"),
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

fn admin_token() -> Result<String> {
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(Authenticator::new(KEY.as_bytes())?.mint(
        "shutdown-time",
        Role::Admin,
        &[],
        Duration::from_secs(3600),
        now_s,
    )?)
}

async fn set_up(channel: Channel, token: &str, teachers: usize) -> Result<()> {
    let mut admin = QuotaAdminClient::with_interceptor(channel, BearerToken::new(token)?);
    admin
        .create_school(CreateSchoolRequest {
            school_id: SCHOOL.into(),
            name: "Ids".into(),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![PoolUnits {
                service_type: SERVICE.into(),
                cycle_units: 1_000_000_000_000,
            }],
            changed_by: "shutdown-time".into(),
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
                changed_by: "shutdown-time".into(),
                reason: "measurement".into(),
            })
            .await?;
    }
    Ok(())
}

/// A quotad child process on 127.0.0.1:0, logging to `--log`.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &Args, data: &Path) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?;
        let mut command = Command::new(&args.quotad);
        command.args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--no-rls",
        ]);
        if let Some(url) = &args.database_url {
            command.args(["--database-url", url]);
        }
        let mut child = command
            .arg("--snapshot-interval-s")
            .arg(args.snapshot_interval_s.to_string())
            .arg("--data-dir")
            .arg(data)
            .env("QUOTAD_LOG", "info,quotad::storage=debug")
            .env("QUOTAD_AUTH_KEY", KEY)
            .stdout(Stdio::piped())
            .stderr(log)
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
        let deadline = Instant::now() + Duration::from_secs(300);
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

    /// SIGTERM, then the time until the process has exited (cleanly).
    fn terminate(mut self) -> Result<Duration> {
        let pid = self.child.id().to_string();
        let sent_at = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !sent.success() {
            return Err("kill -TERM failed".into());
        }
        let status = self.child.wait()?;
        let took = sent_at.elapsed();
        if !status.success() {
            return Err(format!("quotad exited with {status}").into());
        }
        Ok(took)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
