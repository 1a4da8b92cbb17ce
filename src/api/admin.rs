//! `QuotaAdmin`: setting up schools, pools and slices.

use tonic::{Request, Response, Status};

use super::convert;
use super::status::{invalid, to_status};
use crate::domain::{BillingAnchor, Priority, SchoolConfig, SchoolId, SliceStatus, Tier};
use crate::engine::{Engine, NewSchool, SetAllocation, SetPool, SetStatus};
use crate::proto::quota_admin_server::QuotaAdmin;
use crate::proto::*;

pub struct AdminService {
    engine: Engine,
}

impl AdminService {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
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
        let r = request.into_inner();
        let config = SchoolConfig {
            id: SchoolId::parse(&r.school_id).map_err(invalid)?,
            name: SchoolConfig::check_name(&r.name).map_err(invalid)?,
            tier: Tier::parse(&r.tier).map_err(invalid)?,
            anchor: BillingAnchor::new(r.billing_anchor_day).map_err(invalid)?,
            borrowing_enabled: r.borrowing_enabled,
        };
        let mut pools = Vec::with_capacity(r.pools.len());
        for pool in &r.pools {
            let service = convert::service(&pool.service_type).map_err(invalid)?;
            if pools.iter().any(|(s, _)| s == &service) {
                return Err(Status::invalid_argument(format!(
                    "pools: service type {service} is named twice"
                )));
            }
            pools.push((service, pool.cycle_units));
        }
        let change =
            convert::change(&r.changed_by, "school created", self.now_ms()).map_err(invalid)?;
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
        let school_id = SchoolId::parse(&request.into_inner().school_id).map_err(invalid)?;
        let view = self
            .engine
            .get_school(&school_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::school(view)))
    }

    async fn set_pool(&self, request: Request<SetPoolRequest>) -> Result<Response<Pool>, Status> {
        let r = request.into_inner();
        let school_id = SchoolId::parse(&r.school_id).map_err(invalid)?;
        let msg = SetPool {
            service: convert::service(&r.service_type).map_err(invalid)?,
            cycle_units: r.cycle_units,
            change: convert::change(&r.changed_by, &r.reason, self.now_ms()).map_err(invalid)?,
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
        let r = request.into_inner();
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        let priority = match r.priority.as_str() {
            "" => None,
            other => Some(Priority::parse(other).map_err(invalid)?),
        };
        let msg = SetAllocation {
            service: convert::service(&r.service_type).map_err(invalid)?,
            allocated_units: r.allocated_units,
            priority,
            auto_renew: r.auto_renew,
            change: convert::change(&r.changed_by, &r.reason, self.now_ms()).map_err(invalid)?,
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
        let r = request.into_inner();
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        let msg = SetStatus {
            service: convert::service(&r.service_type).map_err(invalid)?,
            status: SliceStatus::parse(&r.status).map_err(invalid)?,
            change: convert::change(&r.changed_by, &r.reason, self.now_ms()).map_err(invalid)?,
        };
        let view = self
            .engine
            .set_status(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::allocation(view)))
    }
}
