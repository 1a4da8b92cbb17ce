//! `school create|get|list|settings` and `pool set`.

use quotad_proto::v1::{
    CreateSchoolRequest, GetSchoolRequest, ListSchoolsRequest, ListSchoolsResponse, Pool,
    PoolUnits, School, SetPoolRequest, UpdateSchoolSettingsRequest,
};
use serde_json::{json, Value};
use tonic::Status;

use super::{next_page_token, too_many_pages, PAGES_MAX, PAGE_SIZE};
use crate::cli::{
    OnOff, PoolSetArgs, SchoolCommand, SchoolCreateArgs, SchoolGetArgs, SchoolListArgs,
    SchoolSettingsArgs,
};
use crate::connect::{AdminClient, Server};
use crate::error::CliError;
use crate::output::{list_json, on_off, plural, show, table, timestamp_text, Render, ToJson};

/// Runs one `school` subcommand.
pub async fn run_school(
    server: &Server,
    command: SchoolCommand,
    json: bool,
) -> Result<String, CliError> {
    let admin = server.admin().await?;
    Ok(match command {
        SchoolCommand::Create(args) => show(create_school(admin, args).await?, json),
        SchoolCommand::Get(args) => show(get_school(admin, args).await?, json),
        SchoolCommand::List(args) => show(list_schools(admin, args).await?, json),
        SchoolCommand::Settings(args) => show(update_school_settings(admin, args).await?, json),
    })
}

async fn create_school(mut admin: AdminClient, args: SchoolCreateArgs) -> Result<School, Status> {
    let pools = args
        .pools
        .into_iter()
        .map(|pool| PoolUnits {
            service_type: pool.service_type,
            cycle_units: pool.cycle_units,
        })
        .collect();
    let request = CreateSchoolRequest {
        school_id: args.school_id,
        name: args.name,
        tier: args.tier.wire_name().to_string(),
        billing_anchor_day: args.anchor_day.unwrap_or(0),
        borrowing_enabled: args.borrowing,
        pools,
        changed_by: args.changed_by.unwrap_or_default(),
        self_service_requests: args.self_service,
    };
    Ok(admin.create_school(request).await?.into_inner())
}

async fn get_school(mut admin: AdminClient, args: SchoolGetArgs) -> Result<School, Status> {
    let request = GetSchoolRequest {
        school_id: args.school_id,
    };
    Ok(admin.get_school(request).await?.into_inner())
}

pub async fn set_pool(mut admin: AdminClient, args: PoolSetArgs) -> Result<Pool, Status> {
    let request = SetPoolRequest {
        school_id: args.school_id,
        service_type: args.service_type,
        cycle_units: args.cycle_units,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_pool(request).await?.into_inner())
}

/// Every page of the listing, as one response.
async fn list_schools(
    mut admin: AdminClient,
    args: SchoolListArgs,
) -> Result<ListSchoolsResponse, CliError> {
    let tier = args
        .tier
        .map_or_else(String::new, |tier| tier.wire_name().to_string());
    let mut schools = Vec::new();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let request = ListSchoolsRequest {
            tier: tier.clone(),
            page_size: PAGE_SIZE,
            page_token: page_token.clone(),
        };
        let page = admin.list_schools(request).await?.into_inner();
        schools.extend(page.schools);
        if page.next_page_token.is_empty() {
            return Ok(ListSchoolsResponse {
                schools,
                next_page_token: String::new(),
            });
        }
        page_token = next_page_token(&page_token, page.next_page_token)?;
    }
    Err(too_many_pages())
}

async fn update_school_settings(
    mut admin: AdminClient,
    args: SchoolSettingsArgs,
) -> Result<School, Status> {
    let request = UpdateSchoolSettingsRequest {
        school_id: args.school_id,
        borrowing_enabled: args.borrowing.map(OnOff::is_on),
        self_service_requests: args.self_service.map(OnOff::is_on),
        billing_anchor_day: args.anchor_day,
        name: args.name,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.update_school_settings(request).await?.into_inner())
}

impl ToJson for Pool {
    fn to_json(&self) -> Value {
        json!({
            "service_type": self.service_type,
            "cycle_units": self.cycle_units,
            "allocated_units": self.allocated_units,
            "borrowed_units": self.borrowed_units,
            "available_units": self.available_units,
            "used_units": self.used_units,
        })
    }
}

impl ToJson for School {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "name": self.name,
            "tier": self.tier,
            "billing_anchor_day": self.billing_anchor_day,
            "next_billing_anchor_day": self.next_billing_anchor_day,
            "borrowing_enabled": self.borrowing_enabled,
            "pools": self.pools.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "cycle_start_ms": self.cycle_start_ms,
            "cycle_end_ms": self.cycle_end_ms,
            "teacher_count": self.teacher_count,
            "self_service_requests": self.self_service_requests,
        })
    }
}

impl ToJson for ListSchoolsResponse {
    /// Every page at once, so there is no page token to show.
    fn to_json(&self) -> Value {
        json!({ "schools": list_json(&self.schools) })
    }
}

impl Render for School {
    fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self.pools.iter().map(pool_row).collect();
        let mut anchor_day = self.billing_anchor_day.to_string();
        if self.next_billing_anchor_day != 0 {
            anchor_day += &format!(" ({} from the next cycle)", self.next_billing_anchor_day);
        }
        format!(
            "school        {} ({})\ntier          {}\nanchor day    {}\nborrowing     {}\n\
             self-service  {}\nteachers      {}\ncycle         {} .. {}\n\n{}",
            self.school_id,
            self.name,
            self.tier,
            anchor_day,
            on_off(self.borrowing_enabled),
            on_off(self.self_service_requests),
            self.teacher_count,
            timestamp_text(self.cycle_start_ms),
            timestamp_text(self.cycle_end_ms),
            table(&POOL_HEADERS, &rows)
        )
    }
}

const POOL_HEADERS: [&str; 6] = [
    "SERVICE",
    "CYCLE",
    "ALLOCATED",
    "BORROWED",
    "AVAILABLE",
    "USED",
];

fn pool_row(pool: &Pool) -> Vec<String> {
    vec![
        pool.service_type.clone(),
        pool.cycle_units.to_string(),
        pool.allocated_units.to_string(),
        pool.borrowed_units.to_string(),
        pool.available_units.to_string(),
        pool.used_units.to_string(),
    ]
}

impl Render for Pool {
    fn render(&self) -> String {
        table(&POOL_HEADERS, &[pool_row(self)])
    }
}

impl Render for ListSchoolsResponse {
    fn render(&self) -> String {
        let headers = [
            "SCHOOL",
            "NAME",
            "TIER",
            "ANCHOR",
            "BORROWING",
            "SELF-SERVICE",
            "TEACHERS",
            "CYCLE END",
        ];
        let rows: Vec<Vec<String>> = self
            .schools
            .iter()
            .map(|school| {
                vec![
                    school.school_id.clone(),
                    school.name.clone(),
                    school.tier.clone(),
                    school.billing_anchor_day.to_string(),
                    on_off(school.borrowing_enabled).to_string(),
                    on_off(school.self_service_requests).to_string(),
                    school.teacher_count.to_string(),
                    timestamp_text(school.cycle_end_ms),
                ]
            })
            .collect();
        format!(
            "{}\n\n{} school{}",
            table(&headers, &rows),
            rows.len(),
            plural(rows.len())
        )
    }
}
