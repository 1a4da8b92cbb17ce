//! `quotactl sync`: a JSON-lines file of usage events, every line checked
//! first (all problems reported with their line numbers, nothing sent), then
//! one SyncUsage call; the answer is one result per line.

use std::path::Path;

use quotad_proto::v1::{SyncResult, SyncStatus, SyncUsageRequest, SyncUsageResponse, UsageEvent};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::SyncArgs;
use crate::connect::GateClient;
use crate::error::CliError;
use crate::output::{Render, ToJson};

/// The largest file read: 1,000 events of the longest fields fit in well under it.
const FILE_BYTES_MAX: u64 = 2 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    event_id: String,
    teacher_id: String,
    service_type: String,
    units: u64,
    occurred_at_ms: i64,
    #[serde(default)]
    model: String,
}

pub async fn send(mut gate: GateClient, args: SyncArgs) -> Result<SyncUsageResponse, CliError> {
    let events = parse(&args.file)?;
    let request = SyncUsageRequest {
        school_id: args.school_id,
        events,
    };
    Ok(gate.sync_usage(request).await?.into_inner())
}

fn parse(path: &Path) -> Result<Vec<UsageEvent>, CliError> {
    let read_error = |error| CliError::ReadFile {
        path: path.to_path_buf(),
        error,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > FILE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{} is larger than {FILE_BYTES_MAX} bytes; split it into several files",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let mut events = Vec::new();
    let mut problems = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Line>(line) {
            Ok(l) => events.push(UsageEvent {
                event_id: l.event_id,
                teacher_id: l.teacher_id,
                service_type: l.service_type,
                units: l.units,
                model: l.model,
                occurred_at_ms: l.occurred_at_ms,
            }),
            Err(error) => problems.push(format!("line {}: {error}", index + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: nothing was sent\n{}",
            path.display(),
            problems.join("\n")
        )));
    }
    Ok(events)
}

fn status_text(result: &SyncResult) -> &'static str {
    match result.status() {
        SyncStatus::Accepted => "accepted",
        SyncStatus::AcceptedOverQuota => "accepted_over_quota",
        SyncStatus::Duplicate => "duplicate",
        SyncStatus::Rejected | SyncStatus::Unspecified => "rejected",
    }
}

impl ToJson for SyncUsageResponse {
    fn to_json(&self) -> Value {
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                json!({
                    "event_id": r.event_id,
                    "status": status_text(r),
                    "reason": r.reason().as_str_name(),
                    "message": r.message,
                    "overage_units": r.overage_units,
                    "cycle_start_ms": r.cycle_start_ms,
                })
            })
            .collect();
        json!({ "results": results })
    }
}

impl Render for SyncUsageResponse {
    fn render(&self) -> String {
        let count = |status: &str| {
            self.results
                .iter()
                .filter(|r| status_text(r) == status)
                .count()
        };
        let mut text = format!(
            "{} accepted, {} accepted over quota, {} duplicates, {} rejected",
            count("accepted"),
            count("accepted_over_quota"),
            count("duplicate"),
            count("rejected")
        );
        for r in self.results.iter().filter(|r| status_text(r) == "rejected") {
            text.push_str(&format!(
                "\n{}: rejected ({}): {}",
                r.event_id,
                r.reason().as_str_name(),
                r.message
            ));
        }
        text
    }
}
