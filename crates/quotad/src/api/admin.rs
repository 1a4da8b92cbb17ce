//! `QuotaAdmin`: setting up schools, pools and slices.

use tonic::{Request, Response, Status};

use super::status::{invalid, invalid_entry, to_status};
use super::{analytics, caller_and, convert};
use crate::analytics::Analytics;
use crate::auth::{authorize, authorize_global, Action};
use std::sync::Arc;

use crate::engine::{
    Engine, FileRequest, ListHistory, ListRequests, NewSchool, RejectRequest, RemoveSlice,
    SetAllocation, SetPool, SetStatus, SliceSpec, UpdateSettings,
};
use crate::proto::quota_admin_server::QuotaAdmin;
use crate::proto::*;
use quotad_core::requests::check_reason;
use quotad_core::{
    BillingAnchor, Change, HistoryFilter, InvalidInput, RequestStatus, SchoolConfig, SchoolId,
    ServiceType, SliceStatus, TeacherId, Tier,
};

/// Slices one BulkSetAllocations call may set (the WAL's record limit is sized for it).
const BULK_ALLOCATIONS_MAX: usize = quotad_core::record::BULK_SLICES_MAX;

pub struct AdminService {
    engine: Engine,
    analytics: Arc<Analytics>,
}

impl AdminService {
    pub fn new(engine: Engine, analytics: Arc<Analytics>) -> Self {
        Self { engine, analytics }
    }

    fn now_ms(&self) -> i64 {
        self.engine.clock().now_ms()
    }
}

#[tonic::async_trait]
impl QuotaAdmin for AdminService {
    async fn create_school(
        &self,
        request: Request<CreateSchoolRequest>,
    ) -> Result<Response<School>, Status> {
        let (caller, r) = caller_and(request)?;
        let config = SchoolConfig {
            id: SchoolId::parse(&r.school_id).map_err(invalid)?,
            name: SchoolConfig::check_name(&r.name).map_err(invalid)?,
            tier: Tier::parse(&r.tier).map_err(invalid)?,
            anchor: BillingAnchor::new(r.billing_anchor_day).map_err(invalid)?,
            borrowing_enabled: r.borrowing_enabled,
            self_service_requests: r.self_service_requests,
        };
        authorize(&caller, Action::CreateSchool, &config.id, None)?;
        let mut pools = Vec::with_capacity(r.pools.len());
        for pool in &r.pools {
            let service = convert::service(&pool.service_type).map_err(invalid)?;
            if pools.iter().any(|(s, _)| s == &service) {
                return Err(invalid(InvalidInput::new(
                    "pools",
                    format!("service type {service} is named twice"),
                )));
            }
            pools.push((service, pool.cycle_units));
        }
        let change = convert::change(
            caller.author(&r.changed_by),
            "school created",
            self.now_ms(),
        )
        .map_err(invalid)?;
        let view = self
            .engine
            .create_school(NewSchool {
                config,
                pools,
                change,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::school(view)))
    }

    async fn get_school(
        &self,
        request: Request<GetSchoolRequest>,
    ) -> Result<Response<School>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::GetSchool, &school_id, None)?;
        let view = self
            .engine
            .get_school(&school_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::school(view)))
    }

    async fn set_pool(&self, request: Request<SetPoolRequest>) -> Result<Response<Pool>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::SetPool, &school_id, None)?;
        let msg = SetPool {
            service: convert::service(&r.service_type).map_err(invalid)?,
            cycle_units: r.cycle_units,
            change: convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
                .map_err(invalid)?,
        };
        let view = self
            .engine
            .set_pool(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::pool(view)))
    }

    async fn set_allocation(
        &self,
        request: Request<SetAllocationRequest>,
    ) -> Result<Response<Allocation>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::SetAllocation,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        // Whatever is left out keeps the slice's current value (the teacher's
        // actor knows it): an empty priority, an unset auto_renew.
        let msg = SetAllocation {
            service: convert::service(&r.service_type).map_err(invalid)?,
            allocated_units: r.allocated_units,
            priority: convert::priority(&r.priority).map_err(invalid)?,
            auto_renew: r.auto_renew,
            change: convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
                .map_err(invalid)?,
            managed: true,
        };
        let view = self
            .engine
            .set_allocation(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::allocation(view)))
    }

    async fn set_allocation_status(
        &self,
        request: Request<SetAllocationStatusRequest>,
    ) -> Result<Response<Allocation>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::SetAllocationStatus,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = SetStatus {
            service: convert::service(&r.service_type).map_err(invalid)?,
            status: SliceStatus::parse(&r.status).map_err(invalid)?,
            change: convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
                .map_err(invalid)?,
        };
        let view = self
            .engine
            .set_status(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::allocation(view)))
    }

    async fn list_schools(
        &self,
        request: Request<ListSchoolsRequest>,
    ) -> Result<Response<ListSchoolsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        authorize_global(&caller, Action::ListSchools)?;
        let tier = match r.tier.as_str() {
            "" => None,
            tier => Some(Tier::parse(tier).map_err(invalid)?),
        };
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(SchoolId::parse(token).map_err(|_| {
                invalid(InvalidInput::new(
                    "page_token",
                    "not a token from a previous answer",
                ))
            })?),
        };
        let limit = convert::page_size(r.page_size).map_err(invalid)?;
        let (views, next) = self
            .engine
            .list_schools(tier, after.as_ref(), limit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ListSchoolsResponse {
            schools: views.into_iter().map(convert::school).collect(),
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn update_school_settings(
        &self,
        request: Request<UpdateSchoolSettingsRequest>,
    ) -> Result<Response<School>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::UpdateSchoolSettings, &school_id, None)?;
        let name = match &r.name {
            Some(name) => Some(SchoolConfig::check_name(name).map_err(invalid)?),
            None => None,
        };
        let next_anchor = match r.billing_anchor_day {
            Some(day) if day != 0 => Some(BillingAnchor::new(day).map_err(invalid)?),
            Some(_) => {
                return Err(invalid(InvalidInput::new(
                    "billing_anchor_day",
                    "must be between 1 and 28",
                )))
            }
            None => None,
        };
        if name.is_none()
            && r.borrowing_enabled.is_none()
            && r.self_service_requests.is_none()
            && next_anchor.is_none()
        {
            return Err(invalid(InvalidInput::new("settings", "nothing to change (set name, borrowing_enabled, self_service_requests or billing_anchor_day)")));
        }
        let msg = UpdateSettings {
            name,
            borrowing_enabled: r.borrowing_enabled,
            self_service_requests: r.self_service_requests,
            next_anchor,
            change: convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
                .map_err(invalid)?,
        };
        let view = self
            .engine
            .update_settings(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::school(view)))
    }

    async fn bulk_set_allocations(
        &self,
        request: Request<BulkSetAllocationsRequest>,
    ) -> Result<Response<BulkSetAllocationsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::BulkSetAllocations, &school_id, None)?;
        if r.allocations.is_empty() {
            return Err(invalid(InvalidInput::new(
                "allocations",
                "must not be empty",
            )));
        }
        if r.allocations.len() > BULK_ALLOCATIONS_MAX {
            return Err(invalid(InvalidInput::new(
                "allocations",
                format!(
                    "{} entries; at most {BULK_ALLOCATIONS_MAX} per call",
                    r.allocations.len()
                ),
            )));
        }
        let mut slices = Vec::with_capacity(r.allocations.len());
        for (i, a) in r.allocations.iter().enumerate() {
            let entry = |e: InvalidInput| invalid_entry("allocations", i + 1, e);
            // As in SetAllocation, what is left out keeps the slice's value.
            slices.push(SliceSpec {
                teacher_id: TeacherId::parse(&a.teacher_id).map_err(entry)?,
                service: convert::service(&a.service_type).map_err(entry)?,
                allocated_units: a.allocated_units,
                priority: convert::priority(&a.priority).map_err(entry)?,
                auto_renew: a.auto_renew,
            });
        }
        let change = convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
            .map_err(invalid)?;
        let views = self
            .engine
            .bulk_set(&school_id, slices, change)
            .await
            .map_err(to_status)?;
        Ok(Response::new(BulkSetAllocationsResponse {
            allocations: views.into_iter().map(convert::allocation).collect(),
        }))
    }

    async fn remove_allocation(
        &self,
        request: Request<RemoveAllocationRequest>,
    ) -> Result<Response<Allocation>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::RemoveAllocation,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = RemoveSlice {
            service: convert::service(&r.service_type).map_err(invalid)?,
            change: convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
                .map_err(invalid)?,
        };
        let view = self
            .engine
            .remove_allocation(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::allocation(view)))
    }

    async fn list_allocations(
        &self,
        request: Request<ListAllocationsRequest>,
    ) -> Result<Response<ListAllocationsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        let teacher_id = convert::optional(&r.teacher_id, TeacherId::parse).map_err(invalid)?;
        authorize(
            &caller,
            Action::ListAllocations,
            &school_id,
            teacher_id.as_ref(),
        )?;
        let service = convert::optional(&r.service_type, ServiceType::parse).map_err(invalid)?;
        let views = self
            .engine
            .list_allocations(&school_id, teacher_id, service)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ListAllocationsResponse {
            allocations: views.into_iter().map(convert::allocation).collect(),
        }))
    }

    async fn request_increase(
        &self,
        request: Request<RequestIncreaseRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::RequestIncrease,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let reason = check_reason("reason", &r.reason).map_err(invalid)?;
        let msg = FileRequest {
            teacher_id: teacher.teacher_id.clone(),
            service: convert::service(&r.service_type).map_err(invalid)?,
            units: r.units,
            change: Change {
                by: Arc::from(caller.author(teacher.teacher_id.as_str())),
                reason,
                at_ms: self.now_ms(),
            },
        };
        let view = self
            .engine
            .file_request(msg, &teacher.school_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::request(&teacher.school_id, view)))
    }

    async fn approve_request(
        &self,
        request: Request<ApproveRequestRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::ApproveRequest, &school_id, None)?;
        let change = convert::change(caller.author(&r.changed_by), &r.reason, self.now_ms())
            .map_err(invalid)?;
        let view = self
            .engine
            .approve_request(&school_id, r.request_id, r.units, change)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::request(&school_id, view)))
    }

    async fn reject_request(
        &self,
        request: Request<RejectRequestRequest>,
    ) -> Result<Response<IncreaseRequest>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::RejectRequest, &school_id, None)?;
        let reason = check_reason("reason", &r.reason).map_err(invalid)?;
        let mut change =
            convert::change(caller.author(&r.changed_by), "", self.now_ms()).map_err(invalid)?;
        change.reason = reason;
        let msg = RejectRequest {
            request_id: r.request_id,
            change,
        };
        let view = self
            .engine
            .reject_request(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::request(&school_id, view)))
    }

    async fn list_requests(
        &self,
        request: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        let teacher_filter = convert::optional(&r.teacher_id, TeacherId::parse).map_err(invalid)?;
        authorize(
            &caller,
            Action::ListRequests,
            &school_id,
            teacher_filter.as_ref(),
        )?;
        let msg = ListRequests {
            teacher_id: teacher_filter,
            status: convert::optional(&r.status, RequestStatus::parse_filter).map_err(invalid)?,
            request_id: None,
        };
        let views = self
            .engine
            .list_requests(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ListRequestsResponse {
            requests: views
                .into_iter()
                .map(|v| convert::request(&school_id, v))
                .collect(),
        }))
    }

    async fn list_history(
        &self,
        request: Request<ListHistoryRequest>,
    ) -> Result<Response<ListHistoryResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        let teacher_filter = convert::optional(&r.teacher_id, TeacherId::parse).map_err(invalid)?;
        authorize(
            &caller,
            Action::ListHistory,
            &school_id,
            teacher_filter.as_ref(),
        )?;
        let after_seq = match r.page_token.as_str() {
            "" => 0,
            token => token.parse::<u64>().map_err(|_| {
                invalid(InvalidInput::new(
                    "page_token",
                    "not a token from a previous answer",
                ))
            })?,
        };
        let (from_ms, to_ms) = HistoryFilter::range(r.from_ms, r.to_ms).map_err(invalid)?;
        let filter = HistoryFilter {
            teacher_id: teacher_filter,
            service: convert::optional(&r.service_type, ServiceType::parse).map_err(invalid)?,
            from_ms,
            to_ms,
        };
        let msg = ListHistory {
            filter,
            after_seq,
            limit: convert::page_size(r.page_size).map_err(invalid)?,
        };
        let (entries, next) = self
            .engine
            .history(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ListHistoryResponse {
            entries: entries
                .into_iter()
                .map(|e| convert::history_entry(&school_id, e))
                .collect(),
            next_page_token: next.map(|seq| seq.to_string()).unwrap_or_default(),
        }))
    }

    async fn verify_history(
        &self,
        request: Request<VerifyHistoryRequest>,
    ) -> Result<Response<VerifyHistoryResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        authorize(&caller, Action::VerifyHistory, &school_id, None)?;
        let verified = self
            .engine
            .verify_history(&school_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(match verified {
            Ok(entries) => VerifyHistoryResponse {
                intact: true,
                entries: entries as u64,
                first_bad_seq: 0,
                problem: String::new(),
            },
            Err(broken) => {
                tracing::error!(school = %school_id, seq = broken.seq, problem = %broken.problem, "audit trail does not verify");
                VerifyHistoryResponse {
                    intact: false,
                    entries: 0,
                    first_bad_seq: broken.seq,
                    problem: broken.problem,
                }
            }
        }))
    }

    async fn get_usage_report(
        &self,
        request: Request<UsageReportRequest>,
    ) -> Result<Response<UsageReport>, Status> {
        let (caller, r) = caller_and(request)?;
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        let teacher_filter = convert::optional(&r.teacher_id, TeacherId::parse).map_err(invalid)?;
        authorize(
            &caller,
            Action::GetUsageReport,
            &school_id,
            teacher_filter.as_ref(),
        )?;
        let previous = match CycleChoice::try_from(r.cycle) {
            Ok(CycleChoice::Current) => false,
            Ok(CycleChoice::Previous) => true,
            Err(_) => {
                return Err(invalid(InvalidInput::new(
                    "cycle",
                    format!("{} is neither CURRENT (0) nor PREVIOUS (1)", r.cycle),
                )))
            }
        };
        let msg = crate::engine::UsageReport {
            teacher_id: teacher_filter,
            service: convert::optional(&r.service_type, ServiceType::parse).map_err(invalid)?,
            previous,
        };
        let view = self
            .engine
            .usage_report(&school_id, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::usage_report(&school_id, view)))
    }

    async fn get_usage_rollups(
        &self,
        request: Request<UsageRollupsRequest>,
    ) -> Result<Response<UsageRollupsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        analytics::rollups(&self.analytics, &caller, r, self.now_ms())
            .await
            .map(Response::new)
    }

    async fn get_suggestions(
        &self,
        request: Request<SuggestionsRequest>,
    ) -> Result<Response<SuggestionsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        analytics::suggestions(&self.analytics, &caller, r)
            .await
            .map(Response::new)
    }

    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        analytics::alerts(&self.analytics, &caller, r)
            .await
            .map(Response::new)
    }
}
