//! The quotactl binary against a real server: the walkthrough, CSV import
//! (all or nothing, every bad line reported) and an export that round-trips.

use std::path::Path;
use std::process::Output;

use quotad::auth::Role;

use crate::common::*;

async fn quotactl(addr: std::net::SocketAddr, token: &str, args: &[&str]) -> Output {
    let mut command = quotactl_command();
    command
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .arg("--token")
        .arg(token)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run quotactl"))
        .await
        .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_and_a_csv_round_trip_work_end_to_end() {
    let (dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let admin = admin_token();
    let ok = |o: &Output| assert!(o.status.success(), "{:?}", text(o));

    ok(&quotactl(
        server.addr,
        &admin,
        &[
            "school",
            "create",
            "oak",
            "--name",
            "Oak",
            "--tier",
            "k12",
            "--pool",
            "claude_messages=100",
            "--pool",
            "lesson_generation=50",
        ],
    )
    .await);
    let good = write(
        dir.path(),
        "good.csv",
        "teacher_id,service_type,allocated_units,priority,auto_renew\nms-lee,claude_messages,30,high,true\nmr-ng,claude_messages,20,,\nmr-ng,lesson_generation,50,low,false\n",
    );
    ok(&quotactl(
        server.addr,
        &admin,
        &["alloc", "import", "oak", &good, "--reason", "term plan"],
    )
    .await);

    // The principal consumes nothing but sees the slices; usage as JSON for scripts.
    let principal = token("pa", Role::Principal, &["oak"]);
    let export = quotactl(server.addr, &principal, &["alloc", "export", "oak"]).await;
    ok(&export);
    let (csv, _) = text(&export);
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines.remove(0),
        "teacher_id,service_type,allocated_units,priority,auto_renew"
    );
    lines.sort();
    assert_eq!(
        lines,
        [
            "mr-ng,claude_messages,20,normal,false",
            "mr-ng,lesson_generation,50,low,false",
            "ms-lee,claude_messages,30,high,true"
        ]
    );
    // --json prints the same slices as JSON, not CSV: an array of objects
    // with the CSV's columns as keys, in the same order.
    let json_export = quotactl(
        server.addr,
        &principal,
        &["--json", "alloc", "export", "oak"],
    )
    .await;
    ok(&json_export);
    let slices: serde_json::Value = serde_json::from_slice(&json_export.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", text(&json_export)));
    let slice = |teacher: &str, service: &str, units: u64, priority: &str, renew: bool| {
        serde_json::json!({
            "teacher_id": teacher,
            "service_type": service,
            "allocated_units": units,
            "priority": priority,
            "auto_renew": renew,
        })
    };
    assert_eq!(
        slices,
        serde_json::json!([
            slice("mr-ng", "claude_messages", 20, "normal", false),
            slice("mr-ng", "lesson_generation", 50, "low", false),
            slice("ms-lee", "claude_messages", 30, "high", true),
        ])
    );
    // Export, then import of the same file, changes nothing.
    let again = write(dir.path(), "again.csv", &csv);
    ok(&quotactl(server.addr, &principal, &["alloc", "import", "oak", &again]).await);
    let (csv_again, _) =
        text(&quotactl(server.addr, &principal, &["alloc", "export", "oak"]).await);
    assert_eq!(csv_again, csv);

    let service = token("proxy", Role::Service, &["oak"]);
    for i in 0..3 {
        ok(&quotactl(
            server.addr,
            &service,
            &[
                "consume",
                "oak",
                "ms-lee",
                "claude_messages",
                "10",
                "--event-id",
                &format!("e{i}"),
            ],
        )
        .await);
    }
    let denied = quotactl(
        server.addr,
        &service,
        &[
            "consume",
            "oak",
            "ms-lee",
            "claude_messages",
            "10",
            "--event-id",
            "e3",
        ],
    )
    .await;
    ok(&denied);
    assert!(text(&denied).0.contains("exhausted"), "{:?}", text(&denied));
    let usage = quotactl(server.addr, &service, &["--json", "usage", "oak", "ms-lee"]).await;
    ok(&usage);
    let usage: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(
        usage.to_string().matches("\"used_units\":30").count(),
        1,
        "{usage}"
    );

    let verify = quotactl(server.addr, &principal, &["history", "verify", "oak"]).await;
    ok(&verify);
    // `alloc set` without --priority or --auto-renew keeps both (ms-lee is
    // high and auto-renewing); --auto-renew off turns it off, and only it.
    let slice_of = |output: &Output| -> serde_json::Value {
        assert!(output.status.success(), "{:?}", text(output));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let set = |extra: &'static [&'static str]| {
        let mut args = vec![
            "--json",
            "alloc",
            "set",
            "oak",
            "ms-lee",
            "claude_messages",
            "40",
        ];
        args.extend_from_slice(extra);
        args
    };
    let kept = slice_of(&quotactl(server.addr, &principal, &set(&[])).await);
    assert_eq!(
        (
            &kept["allocated_units"],
            &kept["priority"],
            &kept["auto_renew"]
        ),
        (&40.into(), &"high".into(), &true.into()),
        "{kept}"
    );
    let off = slice_of(&quotactl(server.addr, &principal, &set(&["--auto-renew", "off"])).await);
    assert_eq!(
        (&off["priority"], &off["auto_renew"]),
        (&"high".into(), &false.into()),
        "{off}"
    );
    let on = slice_of(&quotactl(server.addr, &principal, &set(&["--auto-renew"])).await);
    assert_eq!(on["auto_renew"], true, "{on}");
    // A teacher may not manage allocations: a clear refusal and exit code 2.
    let teacher = token("ms-lee", Role::Teacher, &["oak"]);
    let refused = quotactl(
        server.addr,
        &teacher,
        &["alloc", "set", "oak", "ms-lee", "claude_messages", "99"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(2), "{:?}", text(&refused));
    assert!(
        text(&refused).1.contains("PermissionDenied") || text(&refused).1.contains("permission"),
        "{:?}",
        text(&refused)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_with_bad_lines_is_refused_whole_with_every_line_named() {
    let (dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let admin = admin_token();
    let created = quotactl(
        server.addr,
        &admin,
        &[
            "school",
            "create",
            "oak",
            "--name",
            "Oak",
            "--tier",
            "k12",
            "--pool",
            "claude_messages=100",
        ],
    )
    .await;
    assert!(created.status.success());
    let bad = write(
        dir.path(),
        "bad.csv",
        "teacher_id,service_type,allocated_units,priority,auto_renew\n\
         ok-1,claude_messages,10,normal,false\n\
         ok-2,Claude Messages,10,normal,false\n\
         ok-3,claude_messages,ten,normal,false\n\
         ok-4,claude_messages,10,urgent,false\n\
         ok-1,claude_messages,5,normal,false\n",
    );
    let refused = quotactl(server.addr, &admin, &["alloc", "import", "oak", &bad]).await;
    assert_eq!(refused.status.code(), Some(2));
    let (_, stderr) = text(&refused);
    for line in ["line 3", "line 4", "line 5", "line 6"] {
        assert!(stderr.contains(line), "{line} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("line 2:"), "line 2 is good:\n{stderr}");

    // Valid lines that do not fit the pool: the server refuses the whole file.
    let too_big = write(
        dir.path(),
        "big.csv",
        "teacher_id,service_type,allocated_units,priority,auto_renew\na,claude_messages,60,,\nb,claude_messages,41,,\n",
    );
    let refused = quotactl(server.addr, &admin, &["alloc", "import", "oak", &too_big]).await;
    assert_eq!(refused.status.code(), Some(2), "{:?}", text(&refused));
    let (csv, _) = text(&quotactl(server.addr, &admin, &["alloc", "export", "oak"]).await);
    assert_eq!(csv.lines().count(), 1, "nothing was imported: {csv}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_a_file_of_events_and_reports_each_answer() {
    let (dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    let now = now_ms();
    let line = |id: &str, teacher: &str, units: u64| {
        format!(
            r#"{{"event_id":"{id}","teacher_id":"{teacher}","service_type":"{SERVICE}","units":{units},"occurred_at_ms":{now}}}"#
        )
    };
    let bad = write(
        dir.path(),
        "bad.jsonl",
        &format!("{}\n{{\"units\":1}}\n", line("e1", "ms-lee", 1)),
    );
    let refused = quotactl(
        server.addr,
        &admin_token(),
        &["sync", "--school-id", "oak", &bad],
    )
    .await;
    assert_eq!(refused.status.code(), Some(2), "{:?}", text(&refused));
    assert!(text(&refused).1.contains("line 2"), "{:?}", text(&refused));
    assert_eq!(
        used_units(&mut server.gate().await, "oak", "ms-lee").await,
        0
    );

    let body = [
        line("e1", "ms-lee", 4),
        line("e1", "ms-lee", 4),
        line("e2", "nobody", 1),
    ]
    .join("\n");
    let file = write(dir.path(), "events.jsonl", &body);
    let output = quotactl(
        server.addr,
        &admin_token(),
        &["sync", "--school-id", "oak", &file],
    )
    .await;
    assert!(output.status.success(), "{:?}", text(&output));
    let (stdout, _) = text(&output);
    assert!(
        stdout.starts_with("1 accepted, 0 accepted over quota, 1 duplicates, 1 rejected"),
        "{stdout}"
    );
    assert!(
        stdout.contains("e2: rejected (SYNC_REJECT_REASON_UNKNOWN_ALLOCATION)"),
        "{stdout}"
    );
    let json = quotactl(
        server.addr,
        &admin_token(),
        &["--json", "sync", "--school-id", "oak", &file],
    )
    .await;
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answer["results"][0]["status"], "duplicate");
    assert_eq!(
        used_units(&mut server.gate().await, "oak", "ms-lee").await,
        4
    );
}
