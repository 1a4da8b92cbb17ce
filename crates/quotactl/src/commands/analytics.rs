//! The reports: `report` (usage this or last cycle), `rollups` (charged usage per day or month),
//! `suggest` (idle slices, run-outs, moves) and `alerts`.

use quotad_proto::v1::{
    Alert, AllocationMove, CycleChoice, IdleSlice, ListAlertsRequest, ListAlertsResponse,
    ProposedAllocation, RollupGranularity, RollupGrouping, RunOutForecast, SuggestionsRequest,
    SuggestionsResponse, UsageReport, UsageReportRequest, UsageRollup, UsageRollupsRequest,
    UsageRollupsResponse, UsageRow,
};
use serde_json::{json, Value};
use tonic::Status;

use crate::cli::{AlertsArgs, ReportArgs, RollupBy, RollupsArgs, SuggestArgs};
use crate::connect::AdminClient;
use crate::output::{list_json, table, timestamp_text, Render, ToJson};

pub async fn usage_report(mut admin: AdminClient, args: ReportArgs) -> Result<UsageReport, Status> {
    let cycle = if args.previous {
        CycleChoice::Previous
    } else {
        CycleChoice::Current
    };
    let request = UsageReportRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
        cycle: cycle.into(),
    };
    Ok(admin.get_usage_report(request).await?.into_inner())
}

pub async fn rollups(
    mut admin: AdminClient,
    args: RollupsArgs,
) -> Result<UsageRollupsResponse, Status> {
    let granularity = if args.monthly {
        RollupGranularity::Month
    } else {
        RollupGranularity::Day
    };
    let grouping = match args.by {
        RollupBy::TeacherService => RollupGrouping::TeacherAndService,
        RollupBy::Service => RollupGrouping::Service,
        RollupBy::Teacher => RollupGrouping::Teacher,
        RollupBy::School => RollupGrouping::School,
    };
    let request = UsageRollupsRequest {
        school_id: args.school_id,
        granularity: granularity.into(),
        grouping: grouping.into(),
        from_ms: args.from.unwrap_or(0),
        to_ms: args.to.unwrap_or(0),
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
        rows_max: args.rows_max.unwrap_or(0),
    };
    Ok(admin.get_usage_rollups(request).await?.into_inner())
}

pub async fn suggest(
    mut admin: AdminClient,
    args: SuggestArgs,
) -> Result<SuggestionsResponse, Status> {
    let request = SuggestionsRequest {
        school_id: args.school_id,
        service_type: args.service_type.unwrap_or_default(),
    };
    Ok(admin.get_suggestions(request).await?.into_inner())
}

pub async fn alerts(
    mut admin: AdminClient,
    args: AlertsArgs,
) -> Result<ListAlertsResponse, Status> {
    let request = ListAlertsRequest {
        school_id: args.school_id,
    };
    Ok(admin.list_alerts(request).await?.into_inner())
}

impl ToJson for UsageRow {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
        })
    }
}

impl ToJson for UsageReport {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "rows": list_json(&self.rows),
            "totals": list_json(&self.totals),
        })
    }
}

impl ToJson for UsageRollup {
    fn to_json(&self) -> Value {
        json!({
            "period_start_ms": self.period_start_ms,
            "period": self.period,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "units": self.units,
            "borrowed_units": self.borrowed_units,
            "overage_units": self.overage_units,
            "events": self.events,
        })
    }
}

impl ToJson for UsageRollupsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "rows": list_json(&self.rows),
            "truncated": self.truncated,
        })
    }
}

impl ToJson for IdleSlice {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "spare_units": self.spare_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for RunOutForecast {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "units_per_day": self.units_per_day,
            "run_out_at_ms": self.run_out_at_ms,
            "run_out_day": self.run_out_day,
            "shortfall_units": self.shortfall_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for AllocationMove {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "from_teacher_id": self.from_teacher_id,
            "to_teacher_id": self.to_teacher_id,
            "units": self.units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for ProposedAllocation {
    fn to_json(&self) -> Value {
        json!({
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "proposed_units": self.proposed_units,
            "used_units": self.used_units,
        })
    }
}

impl ToJson for SuggestionsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "now_ms": self.now_ms,
            "day_of_cycle": self.day_of_cycle,
            "cycle_days": self.cycle_days,
            "idle_slices": list_json(&self.idle_slices),
            "run_outs": list_json(&self.run_outs),
            "moves": list_json(&self.moves),
            "proposed": list_json(&self.proposed),
            "explanation": self.explanation,
        })
    }
}

impl ToJson for Alert {
    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "threshold_percent": self.threshold_percent,
            "value_units": self.value_units,
            "limit_units": self.limit_units,
            "explanation": self.explanation,
        })
    }
}

impl ToJson for ListAlertsResponse {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "alerts": list_json(&self.alerts),
        })
    }
}

const USAGE_ROW_HEADERS: [&str; 6] = [
    "TEACHER",
    "SERVICE",
    "ALLOCATED",
    "USED",
    "BORROWED",
    "OVERAGE",
];

fn usage_row(row: &UsageRow) -> Vec<String> {
    vec![
        row.teacher_id.clone(),
        row.service_type.clone(),
        row.allocated_units.to_string(),
        row.used_units.to_string(),
        row.borrowed_units.to_string(),
        row.overage_units.to_string(),
    ]
}

impl Render for UsageReport {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self.rows.iter().map(usage_row).collect();
        // A total has no teacher: its rows drop the first column.
        let totals: Vec<Vec<String>> = self
            .totals
            .iter()
            .map(|total| usage_row(total).split_off(1))
            .collect();
        format!(
            "{}  cycle {} .. {}\n\n{}\n\nTOTALS\n{}",
            self.school_id,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&USAGE_ROW_HEADERS, &rows),
            table(&USAGE_ROW_HEADERS[1..], &totals)
        )
    }
}

/// A column a rollup sums over shows "*".
fn or_all(value: &str) -> String {
    if value.is_empty() {
        "*".to_string()
    } else {
        value.to_string()
    }
}

impl Render for UsageRollupsResponse {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.period.clone(),
                    or_all(&r.teacher_id),
                    or_all(&r.service_type),
                    r.units.to_string(),
                    r.borrowed_units.to_string(),
                    r.overage_units.to_string(),
                    r.events.to_string(),
                ]
            })
            .collect();
        let headers = [
            "PERIOD", "TEACHER", "SERVICE", "UNITS", "BORROWED", "OVERAGE", "EVENTS",
        ];
        let mut text = format!("{}\n\n{}", self.school_id, table(&headers, &rows));
        if self.truncated {
            text.push_str("\n\nmore rows matched: narrow the range or raise --rows-max");
        }
        text
    }
}

fn bullets(title: &str, lines: impl Iterator<Item = String>) -> String {
    let lines: Vec<String> = lines.map(|line| format!("- {line}")).collect();
    if lines.is_empty() {
        format!("{title}: none")
    } else {
        format!("{title}\n{}", lines.join("\n"))
    }
}

impl Render for SuggestionsResponse {
    fn render(&self) -> String {
        let proposed: Vec<Vec<String>> = self
            .proposed
            .iter()
            .map(|p| {
                vec![
                    p.teacher_id.clone(),
                    p.service_type.clone(),
                    p.allocated_units.to_string(),
                    p.proposed_units.to_string(),
                    p.used_units.to_string(),
                ]
            })
            .collect();
        let mut text = format!(
            "{}  day {} of {}  cycle {} .. {}\n\n{}\n\n{}\n\n{}",
            self.school_id,
            self.day_of_cycle,
            self.cycle_days,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            bullets(
                "IDLE SLICES",
                self.idle_slices.iter().map(|i| i.explanation.clone())
            ),
            bullets(
                "RUNS OUT",
                self.run_outs.iter().map(|r| r.explanation.clone())
            ),
            bullets("MOVES", self.moves.iter().map(|m| m.explanation.clone())),
        );
        if !proposed.is_empty() {
            let headers = ["TEACHER", "SERVICE", "ALLOCATED", "PROPOSED", "USED"];
            text.push_str(&format!("\n\n{}", table(&headers, &proposed)));
        }
        format!("{text}\n\n{}", self.explanation)
    }
}

impl Render for ListAlertsResponse {
    fn render(&self) -> String {
        if self.alerts.is_empty() {
            return format!("{}: no active alerts", self.school_id);
        }
        let rows: Vec<Vec<String>> = self
            .alerts
            .iter()
            .map(|a| {
                vec![
                    a.kind.clone(),
                    or_all(&a.teacher_id),
                    a.service_type.clone(),
                    format!("{}%", a.threshold_percent),
                    a.value_units.to_string(),
                    a.limit_units.to_string(),
                ]
            })
            .collect();
        let headers = ["KIND", "TEACHER", "SERVICE", "THRESHOLD", "VALUE", "LIMIT"];
        format!(
            "{}\n\n{}\n\n{}",
            self.school_id,
            table(&headers, &rows),
            bullets("WHY", self.alerts.iter().map(|a| a.explanation.clone()))
        )
    }
}
