//! quotactl's commands end to end against an in-process fake `QuotaAdmin` that answers from
//! canned data: paging, a broken audit trail, refusals, and answers that echo what was asked, so
//! that each test can check what quotactl sent as well as what it printed. A fake rather than the
//! real server (that is `quotactl.rs`) because the real server's new calls are being written in
//! parallel against the same proto. quotactl is the real binary, run as a subprocess, so what is
//! checked is what a person or a script sees: stdout, stderr and the exit code.

use std::process::Output;
use std::sync::{Arc, Mutex};

use quotad::proto::quota_admin_server::{QuotaAdmin, QuotaAdminServer};
use quotad::proto::{
    Alert, Allocation, AllocationMove, ApproveRequestRequest, BulkSetAllocationsRequest,
    BulkSetAllocationsResponse, CreateSchoolRequest, CycleChoice, GetSchoolRequest, HistoryEntry,
    IncreaseRequest, ListAlertsRequest, ListAlertsResponse, ListAllocationsRequest,
    ListAllocationsResponse, ListHistoryRequest, ListHistoryResponse, ListRequestsRequest,
    ListRequestsResponse, ListSchoolsRequest, ListSchoolsResponse, Pool, ProposedAllocation,
    RejectRequestRequest, RemoveAllocationRequest, RequestIncreaseRequest, RunOutForecast, School,
    SetAllocationRequest, SetAllocationStatusRequest, SetPoolRequest, SuggestionsRequest,
    SuggestionsResponse, UpdateSchoolSettingsRequest, UsageReport, UsageReportRequest, UsageRollup,
    UsageRollupsRequest, UsageRollupsResponse, UsageRow, VerifyHistoryRequest,
    VerifyHistoryResponse,
};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::common::quotactl_command;

/// What quotactl asks per page when it lists history: its `PAGE_SIZE`, the most the server gives.
const QUOTACTL_PAGE_SIZE: u32 = 1000;

/// What the fake saw, for the tests to check.
#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    bulk_calls: Vec<BulkSetAllocationsRequest>,
    history_page_sizes: Vec<u32>,
}

#[derive(Clone, Default)]
struct FakeAdmin {
    seen: Arc<Mutex<Seen>>,
    allocations: Arc<Mutex<Vec<Allocation>>>,
}

/// Entries the fake's history holds, and the most it gives per page, so that listings
/// take several pages.
const HISTORY_ENTRIES: u64 = 25;
const FAKE_PAGE_SIZE_MAX: u32 = 10;

impl FakeAdmin {
    fn note<T>(&self, request: &Request<T>) {
        let header = request
            .metadata()
            .get("authorization")
            .map_or("(none)".to_string(), |value| {
                value.to_str().unwrap_or("(not ASCII)").to_string()
            });
        self.seen.lock().unwrap().authorization.push(header);
    }
}

fn canned_alerts(school_id: String) -> ListAlertsResponse {
    ListAlertsResponse {
        school_id,
        alerts: vec![Alert {
            kind: "slice_threshold".into(),
            teacher_id: "t1".into(),
            service_type: "claude_messages".into(),
            threshold_percent: 80,
            value_units: 85,
            limit_units: 100,
            explanation: "t1 used 85 of 100 claude_messages units (85%)".into(),
        }],
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl QuotaAdmin for FakeAdmin {
    async fn create_school(
        &self,
        _: Request<CreateSchoolRequest>,
    ) -> Result<Response<School>, Status> {
        unimplemented()
    }
    async fn get_school(&self, _: Request<GetSchoolRequest>) -> Result<Response<School>, Status> {
        unimplemented()
    }
    /// Three pages of one school each: "" -> "p2" -> "p3" -> end.
    async fn list_schools(
        &self,
        request: Request<ListSchoolsRequest>,
    ) -> Result<Response<ListSchoolsResponse>, Status> {
        self.note(&request);
        let (school_id, next) = match request.get_ref().page_token.as_str() {
            "" => ("a", "p2"),
            "p2" => ("b", "p3"),
            "p3" => ("c", ""),
            other => return Err(Status::invalid_argument(format!("bad token {other}"))),
        };
        let school = School {
            school_id: school_id.to_string(),
            name: format!("School {school_id}"),
            tier: "k12".to_string(),
            ..School::default()
        };
        Ok(Response::new(ListSchoolsResponse {
            schools: vec![school],
            next_page_token: next.to_string(),
        }))
    }
    async fn update_school_settings(
        &self,
        _: Request<UpdateSchoolSettingsRequest>,
    ) -> Result<Response<School>, Status> {
        unimplemented()
    }
    async fn set_pool(&self, _: Request<SetPoolRequest>) -> Result<Response<Pool>, Status> {
        unimplemented()
    }
    async fn set_allocation(
        &self,
        _: Request<SetAllocationRequest>,
    ) -> Result<Response<Allocation>, Status> {
        unimplemented()
    }
    async fn bulk_set_allocations(
        &self,
        request: Request<BulkSetAllocationsRequest>,
    ) -> Result<Response<BulkSetAllocationsResponse>, Status> {
        self.note(&request);
        let request = request.into_inner();
        let allocations: Vec<Allocation> = request
            .allocations
            .iter()
            .map(|spec| Allocation {
                school_id: request.school_id.clone(),
                teacher_id: spec.teacher_id.clone(),
                service_type: spec.service_type.clone(),
                allocated_units: spec.allocated_units,
                priority: spec.priority.clone(),
                auto_renew: spec.auto_renew.unwrap_or(false),
                status: "active".to_string(),
                ..Allocation::default()
            })
            .collect();
        // Newest last, so the export's sorting is tested too.
        *self.allocations.lock().unwrap() = allocations.iter().rev().cloned().collect();
        self.seen.lock().unwrap().bulk_calls.push(request);
        Ok(Response::new(BulkSetAllocationsResponse { allocations }))
    }
    async fn remove_allocation(
        &self,
        _: Request<RemoveAllocationRequest>,
    ) -> Result<Response<Allocation>, Status> {
        unimplemented()
    }
    async fn set_allocation_status(
        &self,
        _: Request<SetAllocationStatusRequest>,
    ) -> Result<Response<Allocation>, Status> {
        unimplemented()
    }
    async fn list_allocations(
        &self,
        request: Request<ListAllocationsRequest>,
    ) -> Result<Response<ListAllocationsResponse>, Status> {
        self.note(&request);
        let allocations = self.allocations.lock().unwrap().clone();
        Ok(Response::new(ListAllocationsResponse { allocations }))
    }
    async fn request_increase(
        &self,
        request: Request<RequestIncreaseRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        let request = request.into_inner();
        Ok(Response::new(IncreaseRequest {
            school_id: request.school_id,
            request_id: 7,
            teacher_id: request.teacher_id,
            service_type: request.service_type,
            requested_units: request.units,
            reason: request.reason,
            status: "pending".to_string(),
            created_at_ms: 1_756_684_800_000,
            expires_at_ms: 1_757_289_600_000,
            ..IncreaseRequest::default()
        }))
    }
    async fn approve_request(
        &self,
        _: Request<ApproveRequestRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        unimplemented()
    }
    async fn reject_request(
        &self,
        _: Request<RejectRequestRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        Err(Status::failed_precondition("request 7 is not pending"))
    }
    async fn list_requests(
        &self,
        _: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        unimplemented()
    }
    /// Entries 1..=25, at most 10 per page; the token is the next seq.
    async fn list_history(
        &self,
        request: Request<ListHistoryRequest>,
    ) -> Result<Response<ListHistoryResponse>, Status> {
        let request = request.into_inner();
        self.seen
            .lock()
            .unwrap()
            .history_page_sizes
            .push(request.page_size);
        let first: u64 = if request.page_token.is_empty() {
            1
        } else {
            request.page_token.parse().unwrap()
        };
        let count = u64::from(request.page_size.clamp(1, FAKE_PAGE_SIZE_MAX));
        let last = (first + count - 1).min(HISTORY_ENTRIES);
        let entries = (first..=last)
            .map(|seq| HistoryEntry {
                school_id: request.school_id.clone(),
                seq,
                at_ms: 1_756_684_800_000 + seq as i64,
                actor: "alice".to_string(),
                action: "allocation_set".to_string(),
                teacher_id: "t1".to_string(),
                service_type: "claude_messages".to_string(),
                before: [("allocated_units".to_string(), seq.to_string())].into(),
                after: [("allocated_units".to_string(), (seq + 1).to_string())].into(),
                ..HistoryEntry::default()
            })
            .collect();
        let next_page_token = if last < HISTORY_ENTRIES {
            (last + 1).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListHistoryResponse {
            entries,
            next_page_token,
        }))
    }
    /// Broken for the school named "broken".
    async fn verify_history(
        &self,
        request: Request<VerifyHistoryRequest>,
    ) -> Result<Response<VerifyHistoryResponse>, Status> {
        let broken = request.get_ref().school_id == "broken";
        Ok(Response::new(VerifyHistoryResponse {
            intact: !broken,
            entries: 12,
            first_bad_seq: if broken { 5 } else { 0 },
            problem: if broken {
                "hash does not match".to_string()
            } else {
                String::new()
            },
        }))
    }
    async fn get_usage_report(
        &self,
        request: Request<UsageReportRequest>,
    ) -> Result<Response<UsageReport>, Status> {
        let row = |teacher: &str, used| UsageRow {
            teacher_id: teacher.to_string(),
            service_type: "claude_messages".to_string(),
            allocated_units: 100,
            used_units: used,
            ..UsageRow::default()
        };
        let previous = request.get_ref().cycle == i32::from(CycleChoice::Previous);
        Ok(Response::new(UsageReport {
            school_id: request.into_inner().school_id,
            cycle_start_ms: if previous { 1 } else { 1_756_684_800_000 },
            rows: vec![row("t1", 40), row("t2", 2)],
            totals: vec![row("", 42)],
            ..UsageReport::default()
        }))
    }
    async fn get_usage_rollups(
        &self,
        request: Request<UsageRollupsRequest>,
    ) -> Result<Response<UsageRollupsResponse>, Status> {
        let r = request.into_inner();
        // The row echoes what was asked, so that tests see the request.
        Ok(Response::new(UsageRollupsResponse {
            school_id: r.school_id,
            rows: vec![UsageRollup {
                period: format!(
                    "g{}-b{}-f{}-t{}",
                    r.granularity, r.grouping, r.from_ms, r.to_ms
                ),
                teacher_id: r.teacher_id,
                service_type: r.service_type,
                units: 12,
                events: 3,
                ..UsageRollup::default()
            }],
            truncated: r.rows_max == 1,
        }))
    }
    async fn get_suggestions(
        &self,
        request: Request<SuggestionsRequest>,
    ) -> Result<Response<SuggestionsResponse>, Status> {
        Ok(Response::new(SuggestionsResponse {
            school_id: request.into_inner().school_id,
            day_of_cycle: 18,
            cycle_days: 30,
            run_outs: vec![RunOutForecast {
                explanation: "t1 runs out on day 19 of 30".into(),
                ..RunOutForecast::default()
            }],
            moves: vec![AllocationMove {
                explanation: "60 claude_messages units from t2 (idle) to t1".into(),
                ..AllocationMove::default()
            }],
            proposed: vec![ProposedAllocation {
                teacher_id: "t1".into(),
                service_type: "claude_messages".into(),
                allocated_units: 90,
                proposed_units: 150,
                used_units: 80,
            }],
            explanation: "move 60 units".into(),
            ..SuggestionsResponse::default()
        }))
    }
    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        Ok(Response::new(canned_alerts(request.into_inner().school_id)))
    }
}

async fn start(fake: FakeAdmin) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(QuotaAdminServer::new(fake))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

/// Runs quotactl against `addr` and waits for it on a blocking thread, so that the fake, on this
/// test's runtime, answers meanwhile. QUOTAD_TOKEN and QUOTAD_ADDR are not inherited: a test
/// that sends a token says so with --token.
async fn quotactl(addr: &str, args: &[&str]) -> Output {
    let mut command = quotactl_command();
    command
        .env_remove("QUOTAD_TOKEN")
        .env_remove("QUOTAD_ADDR")
        .arg("--addr")
        .arg(addr)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run quotactl"))
        .await
        .unwrap()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The stdout of a run that succeeded.
fn stdout_of(output: Output) -> String {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        stderr_of(&output)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn school_list_reads_every_page_and_sends_the_token_each_time() {
    let fake = FakeAdmin::default();
    let addr = start(fake.clone()).await;
    let text = stdout_of(quotactl(&addr, &["--token", "t0k", "school", "list"]).await);
    assert!(text.starts_with("SCHOOL  NAME      TIER"), "{text}");
    assert!(text.contains("\nc       School c  k12"), "{text}");
    assert!(text.ends_with("3 schools\n"), "{text}");
    assert_eq!(
        fake.seen.lock().unwrap().authorization,
        vec!["Bearer t0k"; 3]
    );

    let json = stdout_of(quotactl(&addr, &["--json", "school", "list"]).await);
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["schools"][2]["school_id"], "c");
    assert_eq!(fake.seen.lock().unwrap().authorization[3], "(none)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sends_one_call_and_export_then_import_round_trips() {
    let fake = FakeAdmin::default();
    let addr = start(fake.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.csv");
    std::fs::write(
        &file,
        "teacher_id,service_type,allocated_units,priority,auto_renew\n\
         t2,claude_messages,5,,\nt1,claude_messages,100,high,yes\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    let text = stdout_of(quotactl(&addr, &["alloc", "import", "s1", file_arg]).await);
    assert!(text.ends_with("set 2 slices in one call\n"), "{text}");

    let exported = stdout_of(quotactl(&addr, &["alloc", "export", "s1"]).await);
    assert_eq!(
        exported,
        "teacher_id,service_type,allocated_units,priority,auto_renew\n\
         t1,claude_messages,100,high,true\nt2,claude_messages,5,normal,false\n"
    );
    let out = dir.path().join("out.csv");
    let out_arg = out.to_str().unwrap();
    let summary = quotactl(&addr, &["alloc", "export", "s1", "--output", out_arg]).await;
    assert!(stdout_of(summary).starts_with("wrote 2 slices to "));
    stdout_of(
        quotactl(
            &addr,
            &[
                "alloc", "bulk", "s1", "--file", out_arg, "--reason", "again",
            ],
        )
        .await,
    );

    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.bulk_calls.len(), 2);
    let mut first = seen.bulk_calls[0].allocations.clone();
    first.sort_by(|a, b| a.teacher_id.cmp(&b.teacher_id));
    assert_eq!(first, seen.bulk_calls[1].allocations);
    assert_eq!(seen.bulk_calls[1].reason, "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.csv");
    std::fs::write(
        &file,
        "teacher_id,service_type,allocated_units,priority,auto_renew\n\
         t1,claude_messages,ten,,\nt2,claude_messages,5,,\nt3,Claude,5,,\n",
    )
    .unwrap();
    // Nothing listens on port 1: reaching the server would be a Connect error instead.
    let output = quotactl(
        "http://127.0.0.1:1",
        &["alloc", "import", "s1", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    // One line per bad line of the file, then the error itself.
    let stderr = stderr_of(&output);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].ends_with(
            "bad.csv line 2: allocated_units is \"ten\"; \
             expected a whole number of units (0 to 18446744073709551615)"
        ),
        "{stderr}"
    );
    assert!(
        lines[1].contains("bad.csv line 4: service_type contains 'C'"),
        "{stderr}"
    );
    assert!(
        lines[2].ends_with("bad.csv: 2 bad lines; nothing was sent to the server"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_list_pages_and_stops_at_the_limit() {
    let fake = FakeAdmin::default();
    let addr = start(fake.clone()).await;
    let json = stdout_of(quotactl(&addr, &["--json", "history", "list", "s1"]).await);
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["entries"].as_array().unwrap().len(), 25);
    assert_eq!(value["more"], false);
    assert_eq!(value["entries"][0]["after"]["allocated_units"], "2");

    let text = quotactl(
        &addr,
        &[
            "history",
            "list",
            "s1",
            "--limit",
            "12",
            "--from",
            "2025-09-01T00:00:00Z",
        ],
    );
    let text = stdout_of(text.await);
    assert!(text.contains("allocated_units 12 -> 13"), "{text}");
    assert!(!text.contains("allocated_units 13 -> 14"), "{text}");
    assert!(
        text.ends_with("12 entries (--limit reached; more entries follow)\n"),
        "{text}"
    );
    let sizes = fake.seen.lock().unwrap().history_page_sizes.clone();
    let page = QUOTACTL_PAGE_SIZE;
    assert_eq!(sizes, vec![page, page, page, 12, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_history_is_exit_code_4() {
    let addr = start(FakeAdmin::default()).await;
    let intact = stdout_of(quotactl(&addr, &["history", "verify", "s1"]).await);
    assert_eq!(intact, "intact: 12 entries, every hash and link matches\n");

    let output = quotactl(&addr, &["history", "verify", "broken"]).await;
    assert!(output.stdout.is_empty());
    assert_eq!(output.status.code(), Some(4));
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("first bad entry 5 (of 12): hash does not match"),
        "{stderr}"
    );

    let output = quotactl(&addr, &["--json", "history", "verify", "broken"]).await;
    let value: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(value["first_bad_seq"], 5);
    assert_eq!(output.status.code(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_requests_and_server_refusals() {
    let addr = start(FakeAdmin::default()).await;
    let report = stdout_of(quotactl(&addr, &["report", "s1"]).await);
    assert!(
        report.contains("t2       claude_messages  100        2"),
        "{report}"
    );
    assert!(
        report.contains("TOTALS\nSERVICE          ALLOCATED  USED"),
        "{report}"
    );
    assert!(
        report.contains("\nclaude_messages  100        42"),
        "{report}"
    );

    let filed = quotactl(
        &addr,
        &[
            "request",
            "file",
            "s1",
            "t1",
            "claude_messages",
            "50",
            "--reason",
            "exams",
        ],
    );
    let filed = stdout_of(filed.await);
    assert!(filed.contains("asked     50 units: exams"), "{filed}");
    assert!(filed.contains("expires   2025-09-08T00:00:00Z"), "{filed}");

    let refused = quotactl(&addr, &["request", "reject", "s1", "7", "--reason", "no"]).await;
    assert_eq!(
        stderr_of(&refused),
        "quotactl: FailedPrecondition: request 7 is not pending\n"
    );
    assert_eq!(refused.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_suggest_and_alerts_send_what_was_asked_and_show_it() {
    let addr = start(FakeAdmin::default()).await;
    let args = [
        "rollups",
        "s1",
        "--monthly",
        "--by",
        "school",
        "--from",
        "2026-10-01",
        "--to",
        "2026-11-01",
        "--teacher",
        "t1",
        "--rows-max",
        "1",
    ];
    let text = stdout_of(quotactl(&addr, &args).await);
    // The fake echoes the request: months, by school, and each day as 00:00 UTC in milliseconds
    // (2026-10-01 is 1_790_812_800_000).
    let asked = "g1-b3-f1790812800000-t1793491200000";
    assert!(text.contains(&format!("{asked}  t1       *")), "{text}");
    assert!(text.contains("narrow the range"), "{text}");
    // A day that does not exist is refused on the command line.
    let bad_day = quotactl(&addr, &["rollups", "s1", "--from", "2026-13-01"]).await;
    assert_eq!(bad_day.status.code(), Some(2));
    assert!(
        stderr_of(&bad_day).contains("\"2026-13-01\" is not a day written YYYY-MM-DD"),
        "{}",
        stderr_of(&bad_day)
    );

    let text = stdout_of(quotactl(&addr, &["suggest", "s1"]).await);
    assert!(text.contains("s1  day 18 of 30"), "{text}");
    assert!(text.contains("IDLE SLICES: none"), "{text}");
    assert!(
        text.contains("RUNS OUT\n- t1 runs out on day 19 of 30"),
        "{text}"
    );
    assert!(
        text.contains("t1       claude_messages  90         150"),
        "{text}"
    );

    let text = stdout_of(quotactl(&addr, &["alerts", "s1"]).await);
    assert!(
        text.contains("slice_threshold  t1       claude_messages  80%"),
        "{text}"
    );
    let json = stdout_of(quotactl(&addr, &["--json", "alerts", "s1"]).await);
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["alerts"][0]["value_units"], 85);
}
