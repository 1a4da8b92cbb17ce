//! The Prometheus endpoint after real traffic on every RPC: `promtool check
//! metrics` accepts it, the decision and latency families carry their labels,
//! and the per-school pool gauges stop at `metrics_schools_max`. Before any
//! traffic, the first scrape already has every metric the README documents.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use quotad::auth::Action;
use quotad::config::{Config, Secret};
use quotad::telemetry;

use crate::common::*;

/// One sample line's name, labels and value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

impl Sample {
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name
            && labels
                .iter()
                .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// The total of the samples of `name` with these labels (None: no such sample).
fn total(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.has(name, labels))
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn label_values(samples: &[Sample], name: &str, label: &str) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == label))
        .map(|(_, v)| v.clone())
        .collect()
}

fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|candidate| candidate.is_file())
}

/// Consumes that end allowed, duplicate and exhausted; a call without a
/// token; the health check; then every RPC once on school "c" (some refused
/// by a rule, which is traffic too; CreateSchool makes a fourth school, "c-new").
async fn drive_traffic(server: &TestServer) {
    let (mut admin, mut gate) = clients_as(server.addr, &admin_token()).await;
    for school in ["c", "a", "b"] {
        create_school(&mut admin, school, 1000, false).await;
        allocate(&mut admin, school, "t1", 100, "normal")
            .await
            .unwrap();
    }
    assert!(decide(&mut gate, consume("a", "t1", 5, "e1")).await.allowed);
    assert!(
        decide(&mut gate, consume("a", "t1", 5, "e1"))
            .await
            .duplicate
    );
    let exhausted = decide(&mut gate, consume("a", "t1", 500, "e2")).await;
    assert!(!exhausted.allowed);
    let (_, mut anonymous) = clients_as(server.addr, "").await;
    let refused = anonymous.consume(consume("a", "t1", 1, "e3")).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    for rpc in Action::ALL.iter().copied() {
        let _ = crate::tenants::call(rpc, "c", &mut admin, &mut gate).await;
    }
}

/// Scrapes until the pool gauges have been refreshed since the schools were made.
async fn scrape_after_pool_refresh(server: &TestServer) -> String {
    for _ in 0..400 {
        let text = scrape(server.metrics_addr).await;
        let postgres_written = text.contains("quotad_postgres_snapshot_wal_seq")
            && text.contains("quotad_postgres_snapshot_rows_total")
            && text.contains("quotad_alerts_active");
        if text.contains("quotad_pool_schools_omitted 2") && postgres_written {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the pool gauges, a Postgres snapshot or an alert pass never showed");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_traffic_on_every_rpc_the_metrics_show_every_family_and_pass_promtool() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(Config {
        data_dir: data,
        auth_key: Some(Secret(KEY.into())),
        metrics_schools_max: 2,
        metrics_refresh_interval_ms: 20,
        // With Postgres, so that the snapshot and alert families are linted too.
        postgres_url: Some(Secret(fresh_database().await.1)),
        postgres_snapshot_interval_s: 1,
        alerts_interval_s: 1,
        ..Config::default()
    })
    .await;
    drive_traffic(&server).await;
    let text = scrape_after_pool_refresh(&server).await;
    let all = samples(&text);
    assert_decisions(&all);
    assert_rpc_latencies(&all);
    assert_pools(&all);
    let wal_flushes = total(&all, "quotad_wal_flush_batch_bytes_count", &[]).unwrap();
    assert!(wal_flushes >= 1.0);
    assert!(total(&all, telemetry::ACTORS_ALIVE, &[]).unwrap() >= 6.0);
    for sample in &all {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.name.strip_suffix(suffix))
            .filter(|family| telemetry::ALL_NAMES.contains(family))
            .unwrap_or(&sample.name);
        assert!(
            telemetry::ALL_NAMES.contains(&family),
            "{} is not in telemetry::ALL_NAMES",
            sample.name
        );
    }
    check_with_promtool(&text);
    server.stop().await;
}

/// The metric names of the README's metrics tables (the first cell of each
/// row), so that what is documented and what is exported cannot drift.
fn documented_metrics() -> BTreeSet<String> {
    let readme = include_str!("../../../../README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Metrics section in README.md");
    let mut names = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `quotad_")) {
        let first_cell = row.split('|').nth(1).unwrap();
        for name in first_cell.split('`').filter(|w| w.starts_with("quotad_")) {
            names.insert(name.to_string());
        }
    }
    names
}

/// Documented families with no series on a fresh server, and why: their
/// labels name things that do not exist yet.
const ONLY_AFTER_USE: [(&str, &str); 7] = [
    (
        telemetry::DECISIONS_TOTAL,
        "labelled by service type, which only schools have; a series per decision made",
    ),
    (
        telemetry::GRPC_REQUEST_DURATION_SECONDS,
        "a series per (rpc, status code) that occurred; 30 x 17 empty ones would bloat every scrape",
    ),
    (telemetry::POOL_CYCLE_UNITS, "labelled by school: none yet"),
    (telemetry::POOL_ALLOCATED_UNITS, "labelled by school: none yet"),
    (telemetry::POOL_USED_UNITS, "labelled by school: none yet"),
    (
        telemetry::RLS_REQUESTS_TOTAL,
        "labelled by domain and answer: a series per kind of rate limit call answered",
    ),
    (
        telemetry::RLS_UNKNOWN_SLICE_TOTAL,
        "labelled by domain: a series once a descriptor named no known slice",
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn the_first_scrape_of_a_fresh_server_has_every_documented_metric() {
    let documented = documented_metrics();
    let known: BTreeSet<String> = telemetry::ALL_NAMES.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        documented, known,
        "README's metrics tables and telemetry::ALL_NAMES"
    );
    for (name, _why) in ONLY_AFTER_USE {
        assert!(documented.contains(name), "{name} is no longer documented");
    }
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(Config {
        data_dir: data,
        auth_key: Some(Secret(KEY.into())),
        // With Postgres: the snapshot and alert families exist only with it.
        postgres_url: Some(Secret(fresh_database().await.1)),
        ..Config::default()
    })
    .await;
    let all = samples(&scrape(server.metrics_addr).await);
    let exported: BTreeSet<&str> = all
        .iter()
        .map(|s| s.name.strip_suffix("_count").unwrap_or(&s.name))
        .collect();
    let missing: Vec<&String> = documented
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .filter(|name| !ONLY_AFTER_USE.iter().any(|(n, _)| n == name))
        .collect();
    assert!(missing.is_empty(), "not in the first scrape: {missing:?}");
    assert_eq!(total(&all, telemetry::WAL_POISONED, &[]), Some(0.0));
    for actor in telemetry::ACTOR_KINDS {
        let restarts = total(&all, telemetry::ACTOR_RESTARTS_TOTAL, &[("actor", actor)]);
        assert_eq!(restarts, Some(0.0), "{actor}");
    }
    assert_eq!(total(&all, telemetry::ROLLOVERS_TOTAL, &[]), Some(0.0));
    assert_eq!(total(&all, telemetry::POOL_SCHOOLS_OMITTED, &[]), Some(0.0));
    server.stop().await;
}

fn assert_decisions(all: &[Sample]) {
    let decisions = |outcome| {
        total(
            all,
            telemetry::DECISIONS_TOTAL,
            &[
                ("call", "consume"),
                ("outcome", outcome),
                ("service", SERVICE),
            ],
        )
    };
    assert!(decisions("allowed").unwrap() >= 1.0);
    assert!(decisions("duplicate").unwrap() >= 1.0);
    assert!(decisions("exhausted").unwrap() >= 1.0);
    let calls = label_values(all, telemetry::DECISIONS_TOTAL, "call");
    assert!(calls.is_superset(
        &["check", "consume", "reserve", "sync_usage"]
            .map(String::from)
            .into()
    ));
}

fn assert_rpc_latencies(all: &[Sample]) {
    let count = "quotad_grpc_request_duration_seconds_count";
    for (service, method) in telemetry::RPCS {
        if *method == "Watch" {
            continue; // a stream nobody opened
        }
        if !service.starts_with("quotad.") && !service.starts_with("grpc.health.") {
            continue; // the gateways' protocols and reflection: see rls.rs
        }
        let short = service.rsplit('.').next().unwrap();
        let calls = total(all, count, &[("grpc_service", short), ("rpc", method)]);
        assert!(
            calls.is_some_and(|n| n >= 1.0),
            "no latency for {service}/{method}"
        );
    }
    let consume = |code| total(all, count, &[("rpc", "Consume"), ("code", code)]);
    assert!(consume("OK").unwrap() >= 3.0);
    assert!(consume("UNAUTHENTICATED").unwrap() >= 1.0);
    let codes = label_values(all, count, "code");
    assert!(codes
        .iter()
        .all(|c| telemetry::GRPC_CODES.contains(&c.as_str())));
    assert!(codes.len() >= 3, "refused calls count too: {codes:?}");
}

fn assert_pools(all: &[Sample]) {
    for gauge in [
        telemetry::POOL_CYCLE_UNITS,
        telemetry::POOL_ALLOCATED_UNITS,
        telemetry::POOL_USED_UNITS,
    ] {
        let schools = label_values(all, gauge, "school");
        assert_eq!(
            schools,
            ["a", "b"].map(String::from).into(),
            "the first 2 schools by id, of 4"
        );
    }
    let pool = |gauge, school| total(all, gauge, &[("school", school), ("service", SERVICE)]);
    assert_eq!(pool(telemetry::POOL_CYCLE_UNITS, "a"), Some(1000.0));
    assert_eq!(pool(telemetry::POOL_ALLOCATED_UNITS, "a"), Some(100.0));
    assert!(pool(telemetry::POOL_USED_UNITS, "a").unwrap() >= 5.0);
    assert_eq!(total(all, telemetry::POOL_SCHOOLS_OMITTED, &[]), Some(2.0));
}

/// promtool's lint of the scrape must be silent. Without promtool the check
/// is skipped, loudly, except on CI, where it must be there.
fn check_with_promtool(text: &str) {
    let Some(promtool) = promtool() else {
        let warning = "PROMTOOL NOT FOUND: `promtool check metrics` was NOT run \
                       (apt-get install prometheus, or run scripts/test as root)";
        assert!(std::env::var_os("CI").is_none(), "{warning}");
        eprintln!("\n!!!!!!!!!! {warning} !!!!!!!!!!\n");
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {:?}\n{said}\n--- scrape ---\n{text}",
        output.status
    );
}
