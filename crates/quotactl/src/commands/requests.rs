//! `request file|approve|reject|list`: teachers' requests for more units.

use quotad_proto::v1::{
    ApproveRequestRequest, IncreaseRequest, ListRequestsRequest, ListRequestsResponse,
    RejectRequestRequest, RequestIncreaseRequest,
};
use serde_json::{json, Value};
use tonic::Status;

use crate::cli::{
    RequestApproveArgs, RequestCommand, RequestFileArgs, RequestListArgs, RequestRejectArgs,
};
use crate::connect::{AdminClient, Server};
use crate::error::CliError;
use crate::output::{cell, list_json, plural, show, table, timestamp_text, Render, ToJson};

/// Runs one `request` subcommand.
pub async fn run_request(
    server: &Server,
    command: RequestCommand,
    json: bool,
) -> Result<String, CliError> {
    let admin = server.admin().await?;
    Ok(match command {
        RequestCommand::File(args) => show(request_increase(admin, args).await?, json),
        RequestCommand::Approve(args) => show(approve_request(admin, args).await?, json),
        RequestCommand::Reject(args) => show(reject_request(admin, args).await?, json),
        RequestCommand::List(args) => show(list_requests(admin, args).await?, json),
    })
}

async fn request_increase(
    mut admin: AdminClient,
    args: RequestFileArgs,
) -> Result<IncreaseRequest, Status> {
    let request = RequestIncreaseRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        units: args.units,
        reason: args.reason,
    };
    Ok(admin.request_increase(request).await?.into_inner())
}

async fn approve_request(
    mut admin: AdminClient,
    args: RequestApproveArgs,
) -> Result<IncreaseRequest, Status> {
    let request = ApproveRequestRequest {
        school_id: args.school_id,
        request_id: args.request_id,
        // 0 grants all that was asked.
        units: args.units.unwrap_or(0),
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.approve_request(request).await?.into_inner())
}

async fn reject_request(
    mut admin: AdminClient,
    args: RequestRejectArgs,
) -> Result<IncreaseRequest, Status> {
    let request = RejectRequestRequest {
        school_id: args.school_id,
        request_id: args.request_id,
        changed_by: args.changed_by.unwrap_or_default(),
        reason: args.reason,
    };
    Ok(admin.reject_request(request).await?.into_inner())
}

async fn list_requests(
    mut admin: AdminClient,
    args: RequestListArgs,
) -> Result<ListRequestsResponse, Status> {
    let request = ListRequestsRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        status: args
            .status
            .map_or_else(String::new, |status| status.wire_name().to_string()),
    };
    Ok(admin.list_requests(request).await?.into_inner())
}

impl ToJson for IncreaseRequest {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "request_id": self.request_id,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "requested_units": self.requested_units,
            "reason": self.reason,
            "status": self.status,
            "approved_units": self.approved_units,
            "decision_reason": self.decision_reason,
            "decided_by": self.decided_by,
            "created_at_ms": self.created_at_ms,
            "decided_at_ms": self.decided_at_ms,
            "expires_at_ms": self.expires_at_ms,
        })
    }
}

impl ToJson for ListRequestsResponse {
    fn to_json(&self) -> Value {
        json!({ "requests": list_json(&self.requests) })
    }
}

impl Render for IncreaseRequest {
    fn render(&self) -> String {
        let mut lines = vec![
            format!("request   {} ({})", self.request_id, self.school_id),
            format!("teacher   {}", self.teacher_id),
            format!("service   {}", self.service_type),
            format!("asked     {} units: {}", self.requested_units, self.reason),
            format!("filed     {}", timestamp_text(self.created_at_ms)),
            format!("status    {}", self.status),
        ];
        if self.status == "pending" {
            lines.push(format!("expires   {}", timestamp_text(self.expires_at_ms)));
        }
        if self.status == "approved" {
            lines.push(format!("granted   {} units", self.approved_units));
        }
        if self.decided_at_ms != 0 {
            lines.push(format!(
                "decided   {} by {}",
                timestamp_text(self.decided_at_ms),
                cell(&self.decided_by)
            ));
        }
        if !self.decision_reason.is_empty() {
            lines.push(format!("note      {}", self.decision_reason));
        }
        lines.join("\n")
    }
}

impl Render for ListRequestsResponse {
    fn render(&self) -> String {
        let headers = [
            "ID", "TEACHER", "SERVICE", "ASKED", "STATUS", "GRANTED", "FILED", "DECIDED", "BY",
            "REASON", "NOTE",
        ];
        let rows: Vec<Vec<String>> = self
            .requests
            .iter()
            .map(|request| {
                vec![
                    request.request_id.to_string(),
                    request.teacher_id.clone(),
                    request.service_type.clone(),
                    request.requested_units.to_string(),
                    request.status.clone(),
                    request.approved_units.to_string(),
                    timestamp_text(request.created_at_ms),
                    timestamp_text(request.decided_at_ms),
                    cell(&request.decided_by),
                    cell(&request.reason),
                    cell(&request.decision_reason),
                ]
            })
            .collect();
        let count = rows.len();
        format!(
            "{}\n\n{count} request{}",
            table(&headers, &rows),
            plural(count)
        )
    }
}
