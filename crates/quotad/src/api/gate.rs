//! `QuotaGate`: the calls an AI proxy makes on its hot path.

use tonic::{Request, Response, Status};

use super::status::{invalid, to_status};
use super::{caller_and, convert};
use crate::auth::{authorize, Action};
use crate::engine::{Check, Commit, Consume, Engine, Release, Reserve};
use crate::proto::quota_gate_server::QuotaGate;
use crate::proto::*;
use quotad_core::HoldRequest;

pub struct GateService {
    engine: Engine,
}

impl GateService {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl QuotaGate for GateService {
    async fn consume(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<ConsumeResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::Consume,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = Consume {
            service: convert::service(&r.service_type).map_err(invalid)?,
            units: r.units,
            event_id: convert::event_id(&r.event_id).map_err(invalid)?,
            occurred_at_ms: r.occurred_at_ms,
            model: convert::model(&r.model).map_err(invalid)?,
        };
        let decision = self
            .engine
            .consume(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ConsumeResponse {
            decision: Some(convert::decision(decision)),
        }))
    }

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::Check,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = Check {
            service: convert::service(&r.service_type).map_err(invalid)?,
            units: r.units,
            previews: convert::check_previews(r.previews).map_err(invalid)?,
        };
        let decision = self.engine.check(&teacher, msg).await.map_err(to_status)?;
        Ok(Response::new(CheckResponse {
            decision: Some(convert::decision(decision)),
        }))
    }

    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::Reserve,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let hold = HoldRequest {
            service: convert::service(&r.service_type).map_err(invalid)?,
            units: r.estimate_units,
            ttl_ms: r.ttl_ms,
            reservation_id: convert::reservation_id(&r.reservation_id).map_err(invalid)?,
            model: convert::model(&r.model).map_err(invalid)?,
        };
        let (decision, expires_at_ms) = self
            .engine
            .reserve(&teacher, Reserve(hold))
            .await
            .map_err(to_status)?;
        Ok(Response::new(ReserveResponse {
            decision: Some(convert::decision(decision)),
            expires_at_ms,
        }))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::Commit,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = Commit {
            reservation_id: convert::reservation_id(&r.reservation_id).map_err(invalid)?,
            actual_units: r.actual_units,
        };
        let result = self.engine.commit(&teacher, msg).await.map_err(to_status)?;
        Ok(Response::new(CommitResponse {
            charged_units: result.outcome.charged_units,
            overage_units: result.outcome.overage_units,
            duplicate: result.duplicate,
            hold_had_expired: result.outcome.hold_had_expired,
            remaining_units: result.remaining_units,
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::Release,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let msg = Release {
            reservation_id: convert::reservation_id(&r.reservation_id).map_err(invalid)?,
        };
        let released_units = self
            .engine
            .release(&teacher, msg)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ReleaseResponse {
            released: released_units > 0,
            released_units,
        }))
    }

    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        let teacher = convert::teacher(&r.school_id, &r.teacher_id).map_err(invalid)?;
        authorize(
            &caller,
            Action::GetUsage,
            &teacher.school_id,
            Some(&teacher.teacher_id),
        )?;
        let view = self.engine.usage(&teacher).await.map_err(to_status)?;
        Ok(Response::new(convert::usage(view)))
    }

    async fn sync_usage(
        &self,
        request: Request<SyncUsageRequest>,
    ) -> Result<Response<SyncUsageResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        super::sync::sync_usage(&self.engine, &caller, r)
            .await
            .map(Response::new)
    }

    async fn bulk_increment(
        &self,
        request: Request<BulkIncrementRequest>,
    ) -> Result<Response<BulkIncrementResponse>, Status> {
        let (caller, r) = caller_and(request)?;
        super::sync::bulk_increment(&self.engine, &caller, r)
            .await
            .map(Response::new)
    }
}
