//! The analytics RPCs end to end: a real quotad (in this process) configured
//! with a fresh database on the test Postgres, real tonic clients with signed
//! tokens. Usage history is inserted into ai_usage_logs with SQL (wal_seq from
//! 10^12 on, clear of the snapshotter's); allocations and used units come
//! from the server's own state, set through the API.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{Datelike, Utc};
use quotad::auth::Role;
use quotad::config::{Config, Secret};
use quotad::proto::*;
use tokio_postgres::Client;
use tonic::Code;

use crate::common::*;
use crate::fresh_database;

const DAY_MS: i64 = 86_400_000;
static NEXT_WAL_SEQ: AtomicI64 = AtomicI64::new(1_000_000_000_000);

async fn server_with(url: &str, data: &std::path::Path) -> TestServer {
    TestServer::start_with(Config {
        data_dir: data.to_path_buf(),
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret(url.into())),
        alerts_interval_s: 1,
        ..Config::default()
    })
    .await
}

/// One charged (or denied) usage of SERVICE in school `school`.
async fn usage_log(
    client: &Client,
    school: &str,
    teacher: &str,
    units: i64,
    decision: &str,
    at_ms: i64,
) {
    let seq = NEXT_WAL_SEQ.fetch_add(1, Ordering::SeqCst);
    client
        .execute(
            "INSERT INTO ai_usage_logs (wal_seq, event_id, school_id, teacher_id, service_type,
                 units, borrowed_units, decision, cycle_start, occurred_at, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(),
                     to_timestamp($9::bigint / 1000.0), now())",
            &[
                &seq,
                &format!("e{seq}"),
                &school,
                &teacher,
                &SERVICE,
                &units,
                &(units / 10),
                &decision,
                &at_ms,
            ],
        )
        .await
        .unwrap();
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

async fn rollups(
    admin: &mut AdminClient,
    request: UsageRollupsRequest,
) -> Result<UsageRollupsResponse, tonic::Status> {
    admin
        .get_usage_rollups(request)
        .await
        .map(|r| r.into_inner())
}

type Row = (String, String, String, u64, u64, u64);

fn rows(response: &UsageRollupsResponse) -> Vec<Row> {
    response
        .rows
        .iter()
        .map(|r| {
            (
                r.period.clone(),
                r.teacher_id.clone(),
                r.service_type.clone(),
                r.units,
                r.borrowed_units,
                r.events,
            )
        })
        .collect()
}

fn row(period: &str, teacher: &str, service: &str, units: u64, events: u64) -> Row {
    (
        period.into(),
        teacher.into(),
        service.into(),
        units,
        units / 10,
        events,
    )
}

#[tokio::test]
async fn rollups_sum_charged_usage_per_day_and_month_per_teacher_service_or_school() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    create_school(&mut admin, "elm", 1000, false).await;
    for (teacher, units, decision, at) in [
        ("t1", 10, "allowed", "2026-09-30T23:59:59Z"),
        ("t1", 20, "allowed", "2026-10-02T08:00:00Z"),
        ("t1", 30, "committed", "2026-10-02T23:00:00Z"),
        ("t1", 500, "exhausted", "2026-10-02T09:00:00Z"),
        ("t2", 40, "allowed", "2026-10-02T10:00:00Z"),
        ("t2", 50, "allowed", "2026-10-03T00:00:00Z"),
        ("t2", 60, "allowed", "2026-11-01T00:00:00Z"),
    ] {
        usage_log(&client, "oak", teacher, units, decision, ms(at)).await;
    }
    usage_log(
        &client,
        "elm",
        "t1",
        70,
        "allowed",
        ms("2026-10-02T08:00:00Z"),
    )
    .await;
    let october = UsageRollupsRequest {
        school_id: "oak".into(),
        from_ms: ms("2026-10-01T00:00:00Z"),
        to_ms: ms("2026-11-01T00:00:00Z"),
        ..Default::default()
    };
    let daily = rollups(&mut admin, october.clone()).await.unwrap();
    assert!(!daily.truncated);
    assert_eq!(
        rows(&daily),
        [
            row("2026-10-02", "t1", SERVICE, 50, 2),
            row("2026-10-02", "t2", SERVICE, 40, 1),
            row("2026-10-03", "t2", SERVICE, 50, 1),
        ],
        "September, the denial and the other school are left out"
    );
    assert_eq!(daily.rows[0].period_start_ms, ms("2026-10-02T00:00:00Z"));
    // The same sums as the views of migration 0001, day and month.
    for (view, period, granularity) in [
        ("ai_usage_daily", "day", RollupGranularity::Day),
        ("ai_usage_monthly", "month", RollupGranularity::Month),
    ] {
        let from_view: Vec<(i64, String, i64, i64)> = client
            .query(
                &format!(
                    "SELECT (extract(epoch FROM {period}::timestamp AT TIME ZONE 'UTC') * 1000)::bigint,
                            teacher_id, units, events
                       FROM {view} WHERE school_id = 'oak' ORDER BY 1, 2"
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let everything = UsageRollupsRequest {
            granularity: granularity.into(),
            from_ms: ms("2026-09-01T00:00:00Z"),
            to_ms: ms("2026-12-01T00:00:00Z"),
            ..october.clone()
        };
        let ours: Vec<(i64, String, i64, i64)> = rollups(&mut admin, everything)
            .await
            .unwrap()
            .rows
            .iter()
            .map(|r| {
                (
                    r.period_start_ms,
                    r.teacher_id.clone(),
                    r.units as i64,
                    r.events as i64,
                )
            })
            .collect();
        assert_eq!(ours, from_view, "{view}");
    }

    let by_service = rollups(
        &mut admin,
        UsageRollupsRequest {
            grouping: RollupGrouping::Service.into(),
            ..october.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&by_service),
        [
            (
                String::from("2026-10-02"),
                String::new(),
                SERVICE.into(),
                90,
                9,
                3
            ),
            (
                String::from("2026-10-03"),
                String::new(),
                SERVICE.into(),
                50,
                5,
                1
            ),
        ]
    );

    let monthly_school = rollups(
        &mut admin,
        UsageRollupsRequest {
            granularity: RollupGranularity::Month.into(),
            grouping: RollupGrouping::School.into(),
            from_ms: ms("2026-09-15T00:00:00Z"),
            ..october.clone()
        },
    )
    .await
    .unwrap();
    let months: Vec<(String, u64)> = monthly_school
        .rows
        .iter()
        .map(|r| (r.period.clone(), r.units))
        .collect();
    assert_eq!(
        months,
        [("2026-09".to_string(), 10), ("2026-10".to_string(), 140)],
        "a month is whole from the one holding from_ms"
    );

    let one_teacher = rollups(
        &mut admin,
        UsageRollupsRequest {
            teacher_id: "t2".into(),
            grouping: RollupGrouping::Teacher.into(),
            granularity: RollupGranularity::Month.into(),
            ..october.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&one_teacher),
        [(
            String::from("2026-10"),
            "t2".into(),
            String::new(),
            90,
            9,
            2
        )]
    );

    let limited = rollups(
        &mut admin,
        UsageRollupsRequest {
            rows_max: 2,
            ..october.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!((limited.rows.len(), limited.truncated), (2, true));

    // A teacher reads their own rollups, not another's nor the school's.
    let (mut as_t2, _) = clients_as(server.addr, &token("t2", Role::Teacher, &["oak"])).await;
    let own = UsageRollupsRequest {
        teacher_id: "t2".into(),
        ..october.clone()
    };
    assert_eq!(rollups(&mut as_t2, own).await.unwrap().rows.len(), 2);
    let everyone = rollups(&mut as_t2, october).await.unwrap_err();
    assert_eq!(everyone.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn bad_rollup_requests_name_the_field_and_unknown_things_are_not_found() {
    let (_client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    let good = UsageRollupsRequest {
        school_id: "oak".into(),
        from_ms: ms("2026-10-01T00:00:00Z"),
        to_ms: ms("2026-11-01T00:00:00Z"),
        ..Default::default()
    };
    let cases = [
        (
            "granularity",
            UsageRollupsRequest {
                granularity: 7,
                ..good.clone()
            },
        ),
        (
            "grouping",
            UsageRollupsRequest {
                grouping: 9,
                ..good.clone()
            },
        ),
        (
            "rows_max",
            UsageRollupsRequest {
                rows_max: 10_001,
                ..good.clone()
            },
        ),
        (
            "from_ms",
            UsageRollupsRequest {
                from_ms: -1,
                ..good.clone()
            },
        ),
        (
            "to_ms",
            UsageRollupsRequest {
                to_ms: good.from_ms,
                ..good.clone()
            },
        ),
        (
            "to_ms",
            UsageRollupsRequest {
                from_ms: 1,
                ..good.clone()
            },
        ),
        (
            "teacher_id",
            UsageRollupsRequest {
                teacher_id: "bad id".into(),
                ..good.clone()
            },
        ),
        (
            "service_type",
            UsageRollupsRequest {
                service_type: "Bad".into(),
                ..good.clone()
            },
        ),
        (
            "school_id",
            UsageRollupsRequest {
                school_id: String::new(),
                ..good.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let refused = rollups(&mut admin, request).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{field}: {refused:?}"
        );
        assert!(
            refused.message().starts_with(field),
            "{field}: {}",
            refused.message()
        );
    }
    let missing = UsageRollupsRequest {
        school_id: "nowhere".into(),
        ..good
    };
    assert_eq!(
        rollups(&mut admin, missing).await.unwrap_err().code(),
        Code::NotFound
    );
    let unknown_service = admin
        .get_suggestions(SuggestionsRequest {
            school_id: "oak".into(),
            service_type: "homework_help".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        unknown_service.code(),
        Code::NotFound,
        "{unknown_service:?}"
    );
    server.stop().await;
}

/// An anchor day that puts today 16 to 20 days into its cycle: past the half
/// of any month, with at least a week left.
fn anchor_day_past_the_half() -> u32 {
    let today = Utc::now().date_naive();
    (16..=20)
        .map(|back| (today - chrono::Duration::days(back)).day())
        .find(|day| *day <= 28)
        .expect("five days in a row cannot all be the 29th to the 31st")
}

fn today_start_ms() -> i64 {
    let now = Utc::now().timestamp_millis();
    now - now.rem_euclid(DAY_MS)
}

async fn school_late_in_its_cycle(admin: &mut AdminClient, school: &str, cycle_units: u64) {
    admin
        .create_school(CreateSchoolRequest {
            school_id: school.into(),
            name: school.into(),
            tier: "k12".into(),
            billing_anchor_day: anchor_day_past_the_half(),
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

#[tokio::test]
async fn suggestions_and_alerts_from_live_allocations_and_postgres_history() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    let mut gate = server.gate().await;
    school_late_in_its_cycle(&mut admin, "oak", 1000).await;
    for (teacher, units) in [("t-runs", 100), ("t-idle", 200), ("t-spike", 500)] {
        allocate(&mut admin, "oak", teacher, units, "normal")
            .await
            .unwrap();
    }
    // t-runs: 90 of 100 used, 10 a day over the last week: out within about a day.
    let decision = decide(&mut gate, consume("oak", "t-runs", 90, "runs-1")).await;
    assert!(decision.allowed, "{decision:?}");
    // t-spike: 200 of 500 used (neither idle nor running out), 2 a day, then 50 today.
    let decision = decide(&mut gate, consume("oak", "t-spike", 200, "spike-1")).await;
    assert!(decision.allowed, "{decision:?}");
    let today = today_start_ms();
    for back in 1..=7 {
        usage_log(
            &client,
            "oak",
            "t-runs",
            10,
            "allowed",
            today - back * DAY_MS + 1,
        )
        .await;
        usage_log(
            &client,
            "oak",
            "t-spike",
            2,
            "allowed",
            today - back * DAY_MS + 1,
        )
        .await;
    }
    usage_log(&client, "oak", "t-spike", 50, "allowed", today + 1).await;

    let suggestions = admin
        .get_suggestions(SuggestionsRequest {
            school_id: "oak".into(),
            service_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (17..=21).contains(&suggestions.day_of_cycle),
        "{suggestions:?}"
    );
    let idle: Vec<&str> = suggestions
        .idle_slices
        .iter()
        .map(|i| i.teacher_id.as_str())
        .collect();
    assert_eq!(idle, ["t-idle"], "{suggestions:?}");
    assert_eq!(suggestions.run_outs.len(), 1, "{suggestions:?}");
    let runs = &suggestions.run_outs[0];
    assert_eq!(runs.teacher_id, "t-runs");
    // 10 units left at about 9 a day: out in just over a day, which late in
    // the evening (UTC) falls on the day after tomorrow.
    assert!(runs.run_out_day <= suggestions.day_of_cycle + 2, "{runs:?}");
    assert!(
        runs.explanation.contains(&format!(
            "runs out on day {} of {}",
            runs.run_out_day, suggestions.cycle_days
        )),
        "{}",
        runs.explanation
    );
    assert_eq!(suggestions.moves.len(), 1);
    let step = &suggestions.moves[0];
    assert_eq!(
        (step.from_teacher_id.as_str(), step.to_teacher_id.as_str()),
        ("t-idle", "t-runs")
    );
    assert_eq!(step.units, runs.shortfall_units);
    let before: u64 = suggestions.proposed.iter().map(|p| p.allocated_units).sum();
    let after: u64 = suggestions.proposed.iter().map(|p| p.proposed_units).sum();
    assert_eq!(before, after, "the pool's allocated total stays");

    let alerts = admin
        .list_alerts(ListAlertsRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    let found: Vec<(&str, &str, u32)> = alerts
        .iter()
        .map(|a| (a.kind.as_str(), a.teacher_id.as_str(), a.threshold_percent))
        .collect();
    assert_eq!(
        found,
        [
            ("slice_threshold", "t-runs", 80),
            ("usage_anomaly", "t-spike", 300)
        ],
        "{alerts:?}"
    );
    assert_eq!(alerts[1].value_units, 50);

    // A pool used up: pool and slice alerts; the gauges count every school.
    school_late_in_its_cycle(&mut admin, "elm", 10).await;
    allocate(&mut admin, "elm", "t1", 10, "normal")
        .await
        .unwrap();
    decide(&mut gate, consume("elm", "t1", 10, "elm-1")).await;
    let elm = admin
        .list_alerts(ListAlertsRequest {
            school_id: "elm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    let kinds: Vec<(&str, u32)> = elm
        .iter()
        .map(|a| (a.kind.as_str(), a.threshold_percent))
        .collect();
    assert_eq!(kinds, [("slice_threshold", 100), ("pool_exhausting", 90)]);
    let expected = [
        r#"quotad_alerts_active{kind="slice_threshold"} 2"#,
        r#"quotad_alerts_active{kind="pool_exhausting"} 1"#,
        r#"quotad_alerts_active{kind="usage_anomaly"} 1"#,
    ];
    // The gauges are recomputed every second (alerts_interval_s); wait for a pass that saw elm.
    let mut body = String::new();
    for _ in 0..100 {
        body = scrape(server.metrics_addr).await;
        if expected.iter().all(|line| body.contains(line)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for line in expected {
        assert!(body.contains(line), "{line} not in\n{body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn without_postgres_analytics_say_it_must_be_configured() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    let refused = admin
        .list_alerts(ListAlertsRequest {
            school_id: "oak".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("postgres_url"),
        "{}",
        refused.message()
    );
    let refused = rollups(
        &mut admin,
        UsageRollupsRequest {
            school_id: "oak".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn with_postgres_gone_analytics_are_unavailable_and_the_gate_carries_on() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    let mut gate = server.gate().await;
    create_school(&mut admin, "oak", 1000, false).await;
    allocate(&mut admin, "oak", "t1", 100, "normal")
        .await
        .unwrap();
    let alerts = ListAlertsRequest {
        school_id: "oak".into(),
    };
    admin.list_alerts(alerts.clone()).await.unwrap();
    // The database disappears under the server's connection.
    let (admin_url, name) = url.rsplit_once('/').unwrap();
    let maintenance = quotad::postgres::connect(&format!("{admin_url}/postgres"))
        .await
        .unwrap();
    drop(client);
    maintenance
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    for _ in 0..2 {
        // Once on the dropped connection, once trying to connect again.
        let refused = admin.list_alerts(alerts.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    }
    let decision = decide(&mut gate, consume("oak", "t1", 5, "after-drop")).await;
    assert!(decision.allowed, "{decision:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_server_migrates_its_database_on_start() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let version: i32 = client
        .query_one("SELECT max(version) FROM quotad_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, quotad::postgres::MIGRATIONS.len() as i32);
    server.stop().await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn the_reader_connects_again_after_its_connection_was_cut() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    let alerts = ListAlertsRequest {
        school_id: "oak".into(),
    };
    admin.list_alerts(alerts.clone()).await.unwrap();
    // Every other connection to the database is cut, the reader's among them.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    // The next calls meet the cut connection, connect again and are answered.
    for _ in 0..3 {
        admin.list_alerts(alerts.clone()).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_at_once_share_the_reader_and_get_the_same_answer() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1000, false).await;
    for (i, teacher) in ["t1", "t2", "t3"].iter().enumerate() {
        for day in 1..=20 {
            let at = ms("2026-10-01T12:00:00Z") + day * DAY_MS;
            usage_log(&client, "oak", teacher, (i as i64 + 1) * day, "allowed", at).await;
        }
    }
    let request = UsageRollupsRequest {
        school_id: "oak".into(),
        from_ms: ms("2026-10-01T00:00:00Z"),
        to_ms: ms("2026-11-01T00:00:00Z"),
        ..Default::default()
    };
    let expected = rows(&rollups(&mut admin, request.clone()).await.unwrap());
    assert_eq!(expected.len(), 60);
    // More callers than the reader runs queries at once: the rest wait their turn.
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let (mut admin, request) = (admin.clone(), request.clone());
            tokio::spawn(async move { rows(&rollups(&mut admin, request).await.unwrap()) })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap(), expected);
    }
    server.stop().await;
}

async fn quotactl(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    let mut command = quotactl_command();
    command
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .arg("--token")
        .arg(admin_token())
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run quotactl"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotactl_shows_rollups_suggestions_and_alerts_from_a_real_server() {
    let (client, url) = fresh_database().await;
    let (_dir, data) = temp_dir();
    let server = server_with(&url, &data).await;
    let mut admin = server.admin().await;
    let mut gate = server.gate().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    decide(&mut gate, consume("oak", "ms-lee", 9, "lee-1")).await;
    usage_log(
        &client,
        "oak",
        "ms-lee",
        7,
        "allowed",
        ms("2026-10-05T10:00:00Z"),
    )
    .await;
    usage_log(
        &client,
        "oak",
        "mr-ng",
        3,
        "allowed",
        ms("2026-10-20T10:00:00Z"),
    )
    .await;

    let args = [
        "rollups",
        "oak",
        "--monthly",
        "--by",
        "school",
        "--from",
        "2026-10-01",
        "--to",
        "2026-11-01",
    ];
    let out = quotactl(server.addr, &args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("2026-10  *        *        10"), "{stdout}");

    let json_args = [
        "--json",
        "rollups",
        "oak",
        "--from",
        "2026-10-01",
        "--to",
        "2026-11-01",
    ];
    let out = quotactl(server.addr, &json_args).await;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["rows"][0]["period"], "2026-10-05");
    assert_eq!(value["rows"][1]["teacher_id"], "mr-ng");

    let out = quotactl(server.addr, &["alerts", "oak"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("slice_threshold  ms-lee"), "{stdout}");
    assert!(stdout.contains("ms-lee used 9 of 10"), "{stdout}");

    let out = quotactl(server.addr, &["suggest", "oak"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("oak  day "), "{stdout}");
    server.stop().await;

    // Without Postgres: refused, exit code 2, and the reason on stderr.
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    create_school(&mut server.admin().await, "oak", 100, false).await;
    let out = quotactl(server.addr, &["alerts", "oak"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("postgres_url"), "{stderr}");
    server.stop().await;
}
