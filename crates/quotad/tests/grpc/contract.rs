//! The gateway protocols as the other projects define them (issue 12): the
//! real quotad binary, called by Python clients generated from Envoy's own
//! proto files (the `xds-protos` package) and from Limitador's
//! `kuadrantrls.proto` (vendored verbatim in `tests/contract/kuadrant/`, its
//! imports resolved against Envoy's files), not from quotad's copies. The
//! scripts in `tests/contract/` check the answers; this test sets the school
//! up and checks through quotad's own GetUsage what they charged.
//!
//! `scripts/test` makes the Python venv and names its interpreter in
//! `QUOTAD_CONTRACT_PYTHON`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quotad::auth::Role;
use quotad::proto::GetUsageRequest;

use crate::common::{self, *};

const SCHOOL: &str = "contract";
/// How long one script may run: every call in it has a 5 s deadline, and a
/// whole script takes about a second.
const SCRIPT_TIME_MAX: Duration = Duration::from_secs(60);

/// The teachers, by the role the scripts give them, and their slices.
const MAIN: (&str, u64) = ("t-envoy", 5);
const HOLDS: (&str, u64) = ("t-holds", 10);
const MULTI: (&str, u64) = ("t-multi", 10);
const KUADRANT: (&str, u64) = ("t-kuadrant", 10);
const STRANGER: &str = "t-stranger";

/// The domains the scripts call (`[[rls_domains]]` tables of the config file).
const CONFIG: &str = r#"
[[rls_domains]]
name = "gw"
schools = ["contract"]
response_headers = true

[[rls_domains]]
name = "gw-holds"
schools = ["contract"]
holds = true

[[rls_domains]]
name = "gw-open"
schools = ["contract"]
unknown_slice = "allow"

[[rls_domains]]
name = "gw-fixed"
schools = ["contract"]
service_type = "claude_messages"

[[rls_domains]]
name = "gw-other"
schools = ["elsewhere"]
"#;

#[tokio::test]
async fn envoy_and_kuadrant_clients_generated_from_their_own_protos() {
    let python = std::env::var_os("QUOTAD_CONTRACT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "QUOTAD_CONTRACT_PYTHON is not set: run scripts/test, which makes the contract \
                 test's Python venv (crates/quotad/tests/contract/requirements.txt) and sets it"
            )
        });
    assert_eq!(
        SERVICE, "claude_messages",
        "CONFIG's gw-fixed names SERVICE"
    );
    let (dir, data) = temp_dir();
    let config = dir.path().join("quotad.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let server = RlsServer::start(&config, &data);

    let (mut admin, mut gate) = clients_as(server.grpc, &admin_token()).await;
    create_school(&mut admin, SCHOOL, 1000, false).await;
    for (teacher, units) in [MAIN, HOLDS, MULTI, KUADRANT] {
        allocate(&mut admin, SCHOOL, teacher, units, "normal")
            .await
            .unwrap();
    }

    let stubs = dir.path().join("kuadrant-stubs");
    let mut scripts = Scripts {
        python,
        logs: dir.path().to_path_buf(),
        scenario: scenario_args(&server, &stubs),
        failures: Vec::new(),
    };
    scripts.run("kuadrant_stubs.py", &[stubs.to_str().unwrap()]);
    assert!(scripts.failures.is_empty(), "{}", scripts.failures[0]);
    // Every script runs even after one failed, so that one run names every
    // mismatch.
    for script in [
        "envoy_contract.py",
        "kuadrant_contract.py",
        "reflection_contract.py",
    ] {
        scripts.run_scenario(script);
    }
    let mut failures = scripts.failures;

    // What the scripts' calls charged, as (used, reserved, overage) units;
    // None: not checked (see each script for the calls).
    let expected = [
        // 1, then the rest of the slice (4), then stream_done 2 past it.
        (MAIN.0, 7, 0, Some(2)),
        // hold-1 committed at 4; hold-2 still held (2).
        (HOLDS.0, 4, 2, None),
        // 1 + 2 in one request (its retry nothing), gw-fixed 1.
        (MULTI.0, 4, 0, None),
        // CheckRateLimit nothing (it only checks), Commit 5 (of a hold of 3),
        // Commit 1, Report 5 and the Commit of an unknown hold 2.
        (KUADRANT.0, 13, 0, None),
        // No slice: nothing.
        (STRANGER, 0, 0, Some(0)),
    ];
    for (teacher, used, reserved, overage) in expected {
        let got = service_usage(&mut gate, teacher).await;
        let want = (used, reserved, overage.unwrap_or(got.2));
        if got != want {
            failures.push(format!(
                "GetUsage {teacher}: (used, reserved, overage) units {got:?}, expected {want:?}"
            ));
        }
    }
    let pool_used: u64 = common::school(&mut admin, SCHOOL)
        .await
        .pools
        .iter()
        .map(|pool| pool.used_units)
        .sum();
    if pool_used != 7 + 4 + 4 + 13 {
        failures.push(format!(
            "GetSchool: the pool's used_units {pool_used}, expected {}",
            7 + 4 + 4 + 13
        ));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// `deploy/envoy/`: Envoy's bootstrap parses with Envoy's own protos and
/// sends the descriptors its quotad.toml maps (check_config.py), and that
/// quotad.toml is a config quotad starts with.
#[test]
fn the_envoy_deployment_parses_with_envoys_protos_and_its_quotad_config_is_valid() {
    let python = std::env::var_os("QUOTAD_CONTRACT_PYTHON")
        .map(PathBuf::from)
        .expect("QUOTAD_CONTRACT_PYTHON is not set: run scripts/test");
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/envoy");
    let checked = Command::new(python)
        .arg(deploy.join("check_config.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "check_config.py: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let config = quotad::config::Config::from_file(&deploy.join("quotad.toml")).unwrap();
    config.validate().unwrap();
    let domains = config.rls_domains().unwrap();
    assert!(domains.get("ai-gateway").is_some(), "envoy.yaml's domain");
}

/// The arguments every scenario script takes (contract_common.py).
fn scenario_args(server: &RlsServer, stubs: &Path) -> Vec<String> {
    let token = common::token("contract-gateway", Role::Service, &[SCHOOL]);
    let mut args = vec![
        format!("--rls={}", server.rls),
        format!("--grpc={}", server.grpc),
        format!("--token={token}"),
        format!("--school={SCHOOL}"),
        format!("--service={SERVICE}"),
        format!("--stubs-dir={}", stubs.display()),
    ];
    for (role, (teacher, units)) in [
        ("main", MAIN),
        ("holds", HOLDS),
        ("multi", MULTI),
        ("kuadrant", KUADRANT),
        ("stranger", (STRANGER, 0)),
    ] {
        args.push(format!("--teacher={role}={teacher}:{units}"));
    }
    args
}

/// (used, reserved, overage) units of SERVICE; zeros when the teacher has no
/// slice of it.
async fn service_usage(gate: &mut GateClient, teacher: &str) -> (u64, u64, u64) {
    let answer = gate
        .get_usage(GetUsageRequest {
            school_id: SCHOOL.into(),
            teacher_id: teacher.into(),
        })
        .await;
    let usage = match answer {
        Ok(usage) => usage.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => return (0, 0, 0),
        Err(status) => panic!("GetUsage {teacher}: {status}"),
    };
    usage
        .services
        .iter()
        .find(|s| s.service_type == SERVICE)
        .map_or((0, 0, 0), |s| {
            (s.used_units, s.reserved_units, s.overage_units)
        })
}

/// The Python side: each script run to its end (or killed after
/// SCRIPT_TIME_MAX), its output kept in a file and shown when it fails.
struct Scripts {
    python: PathBuf,
    logs: PathBuf,
    scenario: Vec<String>,
    /// One entry per script that failed, with its output.
    failures: Vec<String>,
}

impl Scripts {
    fn run_scenario(&mut self, script: &str) {
        let args = self.scenario.clone();
        self.run(script, &args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    fn run(&mut self, script: &str, args: &[&str]) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/contract")
            .join(script);
        let log_path = self.logs.join(format!("{script}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(&self.python)
            .arg(&path)
            .args(args)
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run {} {}: {e}", self.python.display(), path.display()));
        let status = wait_at_most(&mut child, SCRIPT_TIME_MAX);
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        match status {
            Some(status) if status.success() => {
                println!("{script}: {}", output.lines().last().unwrap_or_default());
            }
            Some(status) => self
                .failures
                .push(format!("{script} failed ({status}):\n{output}")),
            None => self.failures.push(format!(
                "{script} did not finish in {SCRIPT_TIME_MAX:?}:\n{output}"
            )),
        }
    }
}

fn wait_at_most(child: &mut Child, time_max: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + time_max;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The quotad binary with the config file and both listeners on free ports.
struct RlsServer {
    child: Child,
    grpc: SocketAddr,
    rls: SocketAddr,
}

impl RlsServer {
    fn start(config: &Path, data_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quotad"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--grpc-addr", "127.0.0.1:0", "--no-metrics"])
            .args(["--rls-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("QUOTAD_AUTH_KEY", KEY)
            .env("QUOTAD_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the quotad binary");
        let stdout = child.stdout.take().expect("quotad's stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("quotad's first line");
        let address = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name))
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("no {name}ADDR in quotad's first line {line:?}"))
        };
        let (grpc, rls) = (address("grpc="), address("rls="));
        Self { child, grpc, rls }
    }
}

impl Drop for RlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
