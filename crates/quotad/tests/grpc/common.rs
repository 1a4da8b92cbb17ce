//! A real quotad for each test: in-process (`serve` on 127.0.0.1:0, real sled
//! in a temp dir) or as a child process (for crash tests), and real tonic
//! clients over TCP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use quotad::auth::{Authenticator, Role};
use quotad::config::{Config, Secret};
use quotad::proto::quota_admin_client::QuotaAdminClient;
use quotad::proto::quota_gate_client::QuotaGateClient;
use quotad::proto::*;
use quotad::server::{serve, serve_on_clock, serve_on_store, Listeners, ServeError};
use quotad::storage::{Durability, LogStore};
use quotad_core::SchoolId;
use quotad_proto::BearerToken;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const SERVICE: &str = "claude_messages";

/// The key test servers sign tokens with.
pub const KEY: &str = "a test key of at least thirty-two bytes";

pub type Authed = InterceptedService<Channel, BearerToken>;
pub type AdminClient = QuotaAdminClient<Authed>;
pub type GateClient = QuotaGateClient<Authed>;

/// A token for `role` signed with KEY.
pub fn token(subject: &str, role: Role, schools: &[&str]) -> String {
    let schools: Vec<SchoolId> = schools
        .iter()
        .map(|s| SchoolId::parse(s).unwrap())
        .collect();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Authenticator::new(KEY.as_bytes())
        .unwrap()
        .mint(subject, role, &schools, Duration::from_secs(3600), now_s)
        .unwrap()
}

pub fn admin_token() -> String {
    token("test-admin", Role::Admin, &[])
}

/// Clients that send `token` with every call ("": no authorization header).
pub async fn clients_as(addr: SocketAddr, token: &str) -> (AdminClient, GateClient) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = match token {
        "" => BearerToken::none(),
        token => BearerToken::new(token).unwrap(),
    };
    (
        QuotaAdminClient::with_interceptor(channel.clone(), bearer.clone()),
        QuotaGateClient::with_interceptor(channel, bearer),
    )
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The rate limit listener (Envoy's and Kuadrant's protocols, no tokens).
    pub rls_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(Config {
            data_dir: data_dir.to_path_buf(),
            auth_key: Some(Secret(KEY.into())),
            ..Config::default()
        })
        .await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::launch(config, None, None).await
    }

    /// quotad on `store` instead of the sled log in `config.data_dir`: for
    /// tests that make the log fail or panic.
    pub async fn start_on_store(config: Config, store: Arc<dyn LogStore>) -> Self {
        Self::launch(config, Some(store), None).await
    }

    /// quotad whose rules run on `clock` (a manual one the test moves).
    pub async fn start_on_clock(config: Config, clock: quotad::engine::Clock) -> Self {
        let store = quotad::storage::SledLog::open(&config.data_dir).unwrap();
        Self::launch(config, Some(Arc::new(store)), Some(clock)).await
    }

    async fn launch(
        config: Config,
        store: Option<Arc<dyn LogStore>>,
        clock: Option<quotad::engine::Clock>,
    ) -> Self {
        let tls = config.tls_cert_file.is_some();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rls = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
        let rls_addr = rls.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let listeners = Listeners {
            grpc,
            metrics: Some(metrics),
            rls: Some(rls),
        };
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = match (store, clock) {
            (None, _) => tokio::spawn(serve(listeners, config, shutdown)),
            (Some(store), None) => tokio::spawn(serve_on_store(listeners, config, store, shutdown)),
            (Some(store), Some(clock)) => {
                tokio::spawn(serve_on_clock(listeners, config, store, clock, shutdown))
            }
        };
        let server = Self {
            addr,
            metrics_addr,
            rls_addr,
            shutdown: Some(tx),
            task: Some(task),
        };
        // A TLS server is probed by its test, which alone has the CA.
        if !tls {
            server.wait_ready().await;
        }
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            let channel = Channel::from_shared(format!("http://{}", self.addr)).unwrap();
            if let Ok(channel) = channel.connect().await {
                let bearer = BearerToken::new(&admin_token()).unwrap();
                let mut admin = QuotaAdminClient::with_interceptor(channel, bearer);
                let probe = admin
                    .get_school(GetSchoolRequest {
                        school_id: "probe".into(),
                    })
                    .await;
                if probe.is_err_and(|s| s.code() == tonic::Code::NotFound) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("quotad did not start on {}", self.addr);
    }

    pub async fn gate(&self) -> GateClient {
        clients_as(self.addr, &admin_token()).await.1
    }

    pub async fn admin(&self) -> AdminClient {
        clients_as(self.addr, &admin_token()).await.0
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        self.stopped().await.unwrap();
    }

    /// Sends the stop signal, as SIGTERM does, without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops (if not yet signalled) and says how `serve` ended.
    pub async fn stopped(mut self) -> Result<(), ServeError> {
        self.signal_stop();
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// quotad as a child process, so that a test can SIGKILL it.
pub struct ProcessServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ProcessServer {
    pub fn start(data_dir: &Path, durability: Durability) -> Self {
        Self::start_with_args(data_dir, durability, &[])
    }

    pub fn start_with_args(data_dir: &Path, durability: Durability, extra: &[&str]) -> Self {
        Self::spawn(data_dir, durability, "127.0.0.1:0", extra)
    }

    /// quotad on a fixed address, so that a client can find it again after
    /// a restart (see [`free_addr`]).
    pub fn start_at(data_dir: &Path, addr: SocketAddr) -> Self {
        Self::spawn(data_dir, Durability::Sync, &addr.to_string(), &[])
    }

    fn spawn(data_dir: &Path, durability: Durability, grpc_addr: &str, extra: &[&str]) -> Self {
        let durability = match durability {
            Durability::Sync => "sync",
            Durability::Batched => "batched",
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_quotad"))
            .args([
                "serve",
                "--grpc-addr",
                grpc_addr,
                "--no-metrics",
                "--no-rls",
                "--durability",
                durability,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("QUOTAD_LOG", "warn")
            .env("QUOTAD_AUTH_KEY", KEY)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the quotad binary");
        let stdout = child.stdout.take().expect("quotad's stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("quotad's first line");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr }
    }

    pub async fn gate(&self) -> GateClient {
        clients_as(self.addr, &admin_token()).await.1
    }

    pub async fn admin(&self) -> AdminClient {
        clients_as(self.addr, &admin_token()).await.0
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    (dir, data)
}

/// A copy of a data directory, files and subdirectories (a disk that comes
/// back later, or one to damage).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A school with one pool of `cycle_units` units of SERVICE.
pub async fn create_school(
    admin: &mut AdminClient,
    school_id: &str,
    cycle_units: u64,
    borrowing: bool,
) {
    admin
        .create_school(CreateSchoolRequest {
            school_id: school_id.into(),
            name: format!("School {school_id}"),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: borrowing,
            pools: vec![PoolUnits {
                service_type: SERVICE.into(),
                cycle_units,
            }],
            changed_by: "test".into(),
            self_service_requests: false,
        })
        .await
        .unwrap();
}

pub async fn allocate(
    admin: &mut AdminClient,
    school_id: &str,
    teacher_id: &str,
    units: u64,
    priority: &str,
) -> Result<Allocation, tonic::Status> {
    admin
        .set_allocation(SetAllocationRequest {
            school_id: school_id.into(),
            teacher_id: teacher_id.into(),
            service_type: SERVICE.into(),
            allocated_units: units,
            priority: priority.into(),
            auto_renew: Some(false),
            changed_by: "principal".into(),
            reason: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub fn consume(school_id: &str, teacher_id: &str, units: u64, event_id: &str) -> ConsumeRequest {
    ConsumeRequest {
        school_id: school_id.into(),
        teacher_id: teacher_id.into(),
        service_type: SERVICE.into(),
        units,
        event_id: event_id.into(),
        occurred_at_ms: 0,
        model: "claude".into(),
    }
}

pub async fn used_units(gate: &mut GateClient, school_id: &str, teacher_id: &str) -> u64 {
    let usage = gate
        .get_usage(GetUsageRequest {
            school_id: school_id.into(),
            teacher_id: teacher_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    usage
        .services
        .iter()
        .find(|s| s.service_type == SERVICE)
        .map_or(0, |s| s.used_units)
}

/// A school of any tier with one pool of SERVICE.
pub async fn create_school_of(
    admin: &mut AdminClient,
    school_id: &str,
    tier: &str,
    cycle_units: u64,
) {
    admin
        .create_school(CreateSchoolRequest {
            school_id: school_id.into(),
            name: format!("School {school_id}"),
            tier: tier.into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![PoolUnits {
                service_type: SERVICE.into(),
                cycle_units,
            }],
            changed_by: "test".into(),
            self_service_requests: false,
        })
        .await
        .unwrap();
}

/// A teacher's usage view (the call must succeed).
pub async fn usage(gate: &mut GateClient, school_id: &str, teacher_id: &str) -> GetUsageResponse {
    gate.get_usage(GetUsageRequest {
        school_id: school_id.into(),
        teacher_id: teacher_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// A school with its pools (the call must succeed).
pub async fn school(admin: &mut AdminClient, school_id: &str) -> School {
    admin
        .get_school(GetSchoolRequest {
            school_id: school_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The decision of a consume (the call must succeed).
pub async fn decide(gate: &mut GateClient, request: ConsumeRequest) -> Decision {
    gate.consume(request)
        .await
        .unwrap()
        .into_inner()
        .decision
        .expect("a consume answer carries a decision")
}

/// `GET /metrics` over plain HTTP/1.0: the body, after a 200.
pub async fn scrape(metrics_addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: quotad\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_string()
}

/// The wall clock in milliseconds, for the times synced events carry.
pub fn now_ms() -> i64 {
    quotad::engine::system_now_ms()
}

/// A local address nothing listens on now (bound, then released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A new, empty database on the test server, and its URL.
pub async fn fresh_database() -> (tokio_postgres::Client, String) {
    let url = std::env::var("QUOTAD_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "QUOTAD_TEST_DATABASE_URL is not set: run the tests with scripts/test, which starts a \
             throwaway Postgres, or point it at a Postgres you own"
        )
    });
    let admin = quotad::postgres::connect(&url)
        .await
        .expect("connect to the test Postgres");
    let name = format!(
        "quotad_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = url
        .rsplit_once('/')
        .expect("a database name at the end of the URL");
    let url = format!("{base}/{name}");
    (quotad::postgres::connect(&url).await.unwrap(), url)
}

/// The `quotactl` binary (crate `quotactl`), which a test of this crate cannot
/// name with `CARGO_BIN_EXE_*`: it is built beside this test's own binary
/// (`target/<profile>/`) whenever the whole workspace is, as `scripts/test`
/// does. QUOTACTL_BIN names another.
pub fn quotactl_command() -> std::process::Command {
    let binary = std::env::var_os("QUOTACTL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let test_binary = std::env::current_exe().expect("this test's own path");
            // target/<profile>/deps/<test> -> target/<profile>/quotactl
            let profile_dir = test_binary
                .parent()
                .and_then(std::path::Path::parent)
                .expect("a test binary lives in target/<profile>/deps");
            profile_dir.join(format!("quotactl{}", std::env::consts::EXE_SUFFIX))
        });
    assert!(
        binary.is_file(),
        "no quotactl at {}: build the workspace (`cargo build --workspace`, as scripts/test does) \
         or set QUOTACTL_BIN",
        binary.display()
    );
    std::process::Command::new(binary)
}
