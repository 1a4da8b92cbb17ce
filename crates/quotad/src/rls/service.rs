//! Envoy's and Kuadrant's rate limit services on the engine: each
//! descriptor that names a slice is a gate call (a check, a consume, a hold,
//! a commit or usage that already happened) on the teacher's actor, answered
//! once durable like every other gate call.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::answer::{response, Outcome, SliceState};
use super::domain::{Domain, Domains};
use super::plan::{derived_id, done_id, plan, Item, Phase, Plan, SliceRef, Target, Units};
use super::RlsError;
use crate::api::status::rls_status;
use crate::auth::{authorize, Action, Caller};
use crate::engine::{
    Check, CheckPreviews, Commit, Consume, Decision, Engine, EngineError, Release, Reserve,
};
use crate::telemetry;
use quotad_core::{
    DenyReason, EventId, HoldRequest, ReservationId, RuleError, SyncEvent, SyncOutcome,
    SyncRejection,
};
use quotad_proto::envoy::service::ratelimit::v3 as envoy;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use quotad_proto::kuadrant::service::ratelimit::v1 as kuadrant;

/// Who may call: which listener the service is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The RLS listener: trusted callers (loopback or a private network),
    /// no tokens; each domain charges only its own schools.
    Listener,
    /// The main port: a bearer token too, allowed to meter the school.
    Token,
}

/// Both services: they share the domains and the engine.
#[derive(Clone)]
pub struct RateLimiter {
    engine: Engine,
    domains: Arc<Domains>,
    trust: Trust,
}

/// The calls, for metrics and for what each one may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    ShouldRateLimit,
    CheckRateLimit,
    Report,
    Reserve,
    Commit,
}

impl Method {
    fn protocol(self) -> &'static str {
        match self {
            Self::ShouldRateLimit => "envoy",
            _ => "kuadrant",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::ShouldRateLimit => "ShouldRateLimit",
            Self::CheckRateLimit => "CheckRateLimit",
            Self::Report => "Report",
            Self::Reserve => "Reserve",
            Self::Commit => "Commit",
        }
    }

    /// The gate call whose permission a token must carry.
    fn action(self, phase: Phase) -> Action {
        match (self, phase) {
            (Self::Reserve, _) => Action::Reserve,
            (Self::Commit, _) => Action::Commit,
            (_, Phase::StreamDone) => Action::SyncUsage,
            (_, Phase::Request) => Action::Consume,
        }
    }
}

/// A domain name as it may appear in a message: the caller's, so bounded.
fn shown(domain: &str) -> String {
    domain.chars().take(64).collect()
}

impl RateLimiter {
    pub fn new(engine: Engine, domains: Arc<Domains>, trust: Trust) -> Self {
        Self {
            engine,
            domains,
            trust,
        }
    }

    fn domain(&self, name: &str) -> Result<&Domain, RlsError> {
        self.domains
            .get(name)
            .ok_or_else(|| RlsError::UnknownDomain(shown(name)))
    }

    fn units_max(&self) -> u64 {
        self.engine.limits().units_per_call_max
    }

    /// Every slice the plan charges must be the domain's, and (on the main
    /// port) the token's to meter. Checked before anything is charged.
    fn admit(
        &self,
        domain: &Domain,
        caller: Option<&Caller>,
        plan: &Plan,
        action: Action,
    ) -> Result<(), RlsError> {
        for (slice, _) in plan.slices() {
            let school = &slice.teacher.school_id;
            if !domain.schools.allows(school) {
                return Err(RlsError::SchoolNotInDomain {
                    domain: domain.name.clone(),
                    school: school.clone(),
                });
            }
            if self.trust == Trust::Token {
                let caller = caller.ok_or(RlsError::NoCaller)?;
                authorize(caller, action, school, Some(&slice.teacher.teacher_id))?;
            }
        }
        Ok(())
    }

    /// ShouldRateLimit, CheckRateLimit and Report: each descriptor decided
    /// (or charged) on its own, as Envoy's own service does.
    async fn rate_limit(
        &self,
        caller: Option<&Caller>,
        request: envoy::RateLimitRequest,
        method: Method,
    ) -> Result<envoy::RateLimitResponse, RlsError> {
        let domain = self.domain(&request.domain)?;
        let phase = match method {
            Method::CheckRateLimit => Some(Phase::Request),
            Method::Report => Some(Phase::StreamDone),
            _ => None,
        };
        let plan = plan(
            domain,
            &request.descriptors,
            Units::Hits(request.hits_addend),
            phase,
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, method.action(plan.phase))?;
        let mut outcomes = Vec::with_capacity(plan.items.len());
        for item in &plan.items {
            let outcome = match &item.target {
                Target::Unmapped => Outcome::Ignored,
                Target::Partial => Outcome::Unknown,
                Target::Slice(slice) => {
                    let decided = match plan.phase {
                        Phase::Request => self.decide(domain, slice, item).await,
                        Phase::StreamDone => self.report(domain, slice, item).await,
                    };
                    known_or_unknown(slice, decided)?
                }
            };
            if outcome == Outcome::Unknown {
                telemetry::rls_unknown_slice(&domain.name, domain.unknown_slice.as_str());
                tracing::info!(
                    domain = %domain.name,
                    answer = domain.unknown_slice.as_str(),
                    "rate limit descriptor names no known slice"
                );
            }
            outcomes.push(outcome);
        }
        Ok(response(domain, &outcomes, self.engine.clock().now_ms()))
    }

    /// The request path: a pure check (0 units), a consume, or a hold.
    async fn decide(
        &self,
        domain: &Domain,
        slice: &SliceRef,
        item: &Item,
    ) -> Result<Decision, EngineError> {
        if item.units == 0 {
            return self.peek(slice).await;
        }
        if domain.holds {
            let hold = HoldRequest {
                service: slice.service.clone(),
                units: item.units,
                ttl_ms: domain.hold_ttl_ms,
                reservation_id: item.hold_id.clone().unwrap_or_else(fresh_reservation_id),
                model: item.model.clone(),
            };
            let (decision, _) = self.engine.reserve(&slice.teacher, Reserve(hold)).await?;
            return Ok(decision);
        }
        let consume = Consume {
            service: slice.service.clone(),
            units: item.units,
            event_id: item.event_id.clone().unwrap_or_else(fresh_event_id),
            occurred_at_ms: 0,
            model: item.model.clone(),
        };
        self.engine.consume(&slice.teacher, consume).await
    }

    /// Whether one more unit may be spent now: what a pure check answers,
    /// and the state a charge of usage that already happened reports.
    async fn peek(&self, slice: &SliceRef) -> Result<Decision, EngineError> {
        let check = Check {
            service: slice.service.clone(),
            units: 1,
            previews: CheckPreviews::Consume,
        };
        self.engine.check(&slice.teacher, check).await
    }

    /// The stream-done call (or a Report): usage that already happened,
    /// never refused. With holds, the event's hold is committed; without
    /// one (or once it is gone), the usage is charged as a synced event.
    async fn report(
        &self,
        domain: &Domain,
        slice: &SliceRef,
        item: &Item,
    ) -> Result<Decision, EngineError> {
        if item.units > 0 {
            let committed = match (&item.hold_id, domain.holds) {
                (Some(hold_id), true) => {
                    self.commit_or_report(slice, hold_id, item.event_id.clone(), item)
                        .await?
                }
                _ => {
                    self.charge_usage(slice, item.event_id.clone(), item)
                        .await?
                }
            };
            if let Some(unknown) = committed {
                return Ok(unknown);
            }
        }
        let mut decision = self.peek(slice).await?;
        if decision.reason != Some(DenyReason::NoAllocation) {
            // Already spent: the answer is only what is left.
            decision.allowed = true;
        }
        Ok(decision)
    }

    /// Commits `hold_id` with the item's units; a hold that is unknown
    /// (never made, or forgotten) is charged as usage instead. Some: the
    /// slice is unknown.
    async fn commit_or_report(
        &self,
        slice: &SliceRef,
        hold_id: &ReservationId,
        event_id: Option<EventId>,
        item: &Item,
    ) -> Result<Option<Decision>, EngineError> {
        let commit = Commit {
            reservation_id: hold_id.clone(),
            actual_units: item.units,
        };
        match self.engine.commit(&slice.teacher, commit).await {
            Ok(_) => Ok(None),
            Err(EngineError::Rule(RuleError::NotFound(_))) => {
                self.charge_usage(slice, event_id, item).await
            }
            Err(error) => Err(error),
        }
    }

    /// Charges the item's units as a synced event (overage recorded, never
    /// refused). Some: the slice is unknown.
    async fn charge_usage(
        &self,
        slice: &SliceRef,
        event_id: Option<EventId>,
        item: &Item,
    ) -> Result<Option<Decision>, EngineError> {
        let event = SyncEvent {
            service: slice.service.clone(),
            units: item.units,
            event_id: event_id.unwrap_or_else(fresh_event_id),
            occurred_at_ms: self.engine.clock().now_ms(),
            model: item.model.clone(),
        };
        let teacher_id = slice.teacher.teacher_id.clone();
        let outcomes = self
            .engine
            .sync_usage(&slice.teacher.school_id, vec![Ok((teacher_id, event))])
            .await?;
        match outcomes.into_iter().next() {
            Some(SyncOutcome::Rejected {
                reason: SyncRejection::UnknownAllocation,
                ..
            }) => Ok(Some(unknown_decision())),
            Some(SyncOutcome::Rejected { message, .. }) => {
                Err(EngineError::Rule(RuleError::precondition(message)))
            }
            Some(_) => Ok(None),
            None => Err(EngineError::Internal(
                "a synced event got no outcome".into(),
            )),
        }
    }

    /// Kuadrant's Reserve: a hold on every slice named, all or none.
    async fn reserve(
        &self,
        caller: Option<&Caller>,
        request: kuadrant::ReserveRequest,
    ) -> Result<kuadrant::ReserveResponse, RlsError> {
        let domain = self.domain(&request.domain)?;
        if request.amount == 0 {
            return Err(RlsError::Invalid {
                field: "amount".into(),
                problem: "must be at least 1".into(),
            });
        }
        let ttl_ms = ttl_ms(request.ttl.as_ref(), domain.hold_ttl_ms)?;
        // Checked here to name Kuadrant's field; the engine checks it again.
        self.engine
            .limits()
            .check_ttl(ttl_ms)
            .map_err(|e| RlsError::Invalid {
                field: "ttl".into(),
                problem: e.problem,
            })?;
        let plan = plan(
            domain,
            &request.descriptors,
            Units::Amount(request.amount),
            Some(Phase::Request),
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, Action::Reserve)?;
        let base = plan
            .event_id
            .clone()
            .unwrap_or_else(|| fresh_reservation_id().as_str().to_string());
        let mut held = Vec::new();
        let mut refused = false;
        for (k, (slice, item)) in plan.slices().enumerate() {
            let reservation_id = reservation_id(&base, k)?;
            let hold = HoldRequest {
                service: slice.service.clone(),
                units: item.units,
                ttl_ms,
                reservation_id: reservation_id.clone(),
                model: item.model.clone(),
            };
            let decided = self.engine.reserve(&slice.teacher, Reserve(hold)).await;
            match known_or_unknown(slice, decided.map(|(decision, _)| decision))? {
                Outcome::Slice(state) if state.allowed => held.push((slice, reservation_id)),
                Outcome::Slice(_) => refused = true,
                _ => {
                    telemetry::rls_unknown_slice(&domain.name, domain.unknown_slice.as_str());
                    refused |= domain.unknown_slice == super::UnknownSlice::Deny;
                }
            }
            if refused {
                break;
            }
        }
        if refused {
            for (slice, reservation_id) in held {
                self.engine
                    .release(&slice.teacher, Release { reservation_id })
                    .await?;
            }
            return Ok(kuadrant::ReserveResponse {
                code: Code::OverLimit.into(),
                reservation_id: String::new(),
            });
        }
        Ok(kuadrant::ReserveResponse {
            code: Code::Ok.into(),
            reservation_id: base,
        })
    }

    /// Kuadrant's Commit: the actual amount on each slice's hold; a hold
    /// that is unknown or gone is charged as a Report.
    async fn commit(
        &self,
        caller: Option<&Caller>,
        request: kuadrant::CommitRequest,
    ) -> Result<kuadrant::CommitResponse, RlsError> {
        let domain = self.domain(&request.domain)?;
        if request.reservation_id.is_empty() {
            return Err(RlsError::Invalid {
                field: "reservation_id".into(),
                problem: "must not be empty".into(),
            });
        }
        let plan = plan(
            domain,
            &request.descriptors,
            Units::Amount(request.actual_amount),
            Some(Phase::StreamDone),
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, Action::Commit)?;
        let mut released = 0;
        let mut slices = 0;
        for (k, (slice, item)) in plan.slices().enumerate() {
            slices += 1;
            let reservation_id = reservation_id(&request.reservation_id, k)?;
            let event_id = EventId::parse(&done_id(reservation_id.as_str())).map_err(|e| {
                RlsError::Invalid {
                    field: "reservation_id".into(),
                    problem: e.problem,
                }
            })?;
            if item.units == 0 {
                let release = Release { reservation_id };
                match self.engine.release(&slice.teacher, release).await {
                    Ok(units) => released += usize::from(units > 0),
                    Err(EngineError::Rule(RuleError::NotFound(_))) => {}
                    Err(error) => return Err(error.into()),
                }
                continue;
            }
            let commit = Commit {
                reservation_id: reservation_id.clone(),
                actual_units: item.units,
            };
            match self.engine.commit(&slice.teacher, commit).await {
                Ok(result) => {
                    released += usize::from(!result.duplicate && !result.outcome.hold_had_expired)
                }
                Err(EngineError::Rule(RuleError::NotFound(_))) => {
                    if self
                        .charge_usage(slice, Some(event_id), item)
                        .await?
                        .is_some()
                    {
                        telemetry::rls_unknown_slice(&domain.name, domain.unknown_slice.as_str());
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(kuadrant::CommitResponse {
            reservation_released: slices > 0 && released == slices,
        })
    }

    /// The caller the auth interceptor put on the request (main port only).
    fn caller<T>(&self, request: &Request<T>) -> Option<Caller> {
        match self.trust {
            Trust::Listener => None,
            Trust::Token => request.extensions().get::<Caller>().cloned(),
        }
    }

    /// Counts the call and makes its error a status.
    fn finish<T>(
        &self,
        method: Method,
        domain: &str,
        result: Result<T, RlsError>,
        code_of: impl Fn(&T) -> Code,
    ) -> Result<Response<T>, Status> {
        let domain = match self.domains.get(domain) {
            Some(known) => known.name.as_str(),
            None => "unknown",
        };
        let code = match &result {
            Ok(answer) => match code_of(answer) {
                Code::OverLimit => "over_limit",
                _ => "ok",
            },
            Err(RlsError::Invalid { .. }) => "invalid",
            Err(_) => "error",
        };
        telemetry::rls_request(method.protocol(), method.as_str(), domain, code);
        result.map(Response::new).map_err(rls_status)
    }
}

/// A decision, or Unknown when the slice does not exist (no allocation, an
/// unknown school or service type): the domain says how to answer that.
fn known_or_unknown(
    slice: &SliceRef,
    decided: Result<Decision, EngineError>,
) -> Result<Outcome, RlsError> {
    match decided {
        Ok(decision) if decision.reason == Some(DenyReason::NoAllocation) => Ok(Outcome::Unknown),
        Ok(decision) => Ok(Outcome::Slice(SliceState {
            allowed: decision.allowed,
            name: format!("quotad:{}/{}", slice.teacher.school_id, slice.service),
            allocated_units: decision.allocated_units,
            remaining_units: decision.remaining_units,
            cycle_end_ms: decision.cycle_end_ms,
        })),
        Err(EngineError::Rule(RuleError::NotFound(_))) => Ok(Outcome::Unknown),
        Err(error) => Err(error.into()),
    }
}

fn unknown_decision() -> Decision {
    Decision {
        allowed: false,
        reason: Some(DenyReason::NoAllocation),
        remaining_units: 0,
        borrowed_units: 0,
        duplicate: false,
        message: String::new(),
        allocated_units: 0,
        cycle_end_ms: 0,
    }
}

fn reservation_id(base: &str, k: usize) -> Result<ReservationId, RlsError> {
    ReservationId::parse(&derived_id(base, k)).map_err(|e| RlsError::Invalid {
        field: "reservation_id".into(),
        problem: e.problem,
    })
}

/// Kuadrant's ttl: unset or 0 is the domain's (then the server's) default.
fn ttl_ms(ttl: Option<&prost_types::Duration>, domain_ttl_ms: u64) -> Result<u64, RlsError> {
    let Some(ttl) = ttl else {
        return Ok(domain_ttl_ms);
    };
    if ttl.seconds < 0 || ttl.nanos < 0 {
        return Err(RlsError::Invalid {
            field: "ttl".into(),
            problem: "must not be negative".into(),
        });
    }
    let ms = (ttl.seconds as u64)
        .saturating_mul(1000)
        .saturating_add(ttl.nanos as u64 / 1_000_000);
    Ok(if ms == 0 { domain_ttl_ms } else { ms })
}

fn fresh_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    // The OS's generator does not fail on Linux once booted; a fixed id
    // would only lose idempotency between two calls that carry none anyway.
    let _ = getrandom::fill(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

fn fresh_event_id() -> EventId {
    EventId::parse(&fresh_id("rls-")).unwrap_or_else(|_| unreachable!("36 hex characters"))
}

fn fresh_reservation_id() -> ReservationId {
    ReservationId::parse(&fresh_id("rls-")).unwrap_or_else(|_| unreachable!("36 hex characters"))
}

#[tonic::async_trait]
impl envoy::rate_limit_service_server::RateLimitService for RateLimiter {
    async fn should_rate_limit(
        &self,
        request: Request<envoy::RateLimitRequest>,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let domain = request.domain.clone();
        let method = Method::ShouldRateLimit;
        let result = self.rate_limit(caller.as_ref(), request, method).await;
        self.finish(method, &domain, result, |r| r.overall_code())
    }
}

#[tonic::async_trait]
impl kuadrant::rate_limit_service_server::RateLimitService for RateLimiter {
    async fn check_rate_limit(
        &self,
        request: Request<envoy::RateLimitRequest>,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let domain = request.domain.clone();
        let method = Method::CheckRateLimit;
        let result = self.rate_limit(caller.as_ref(), request, method).await;
        self.finish(method, &domain, result, |r| r.overall_code())
    }

    async fn report(
        &self,
        request: Request<envoy::RateLimitRequest>,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let domain = request.domain.clone();
        let method = Method::Report;
        let result = self.rate_limit(caller.as_ref(), request, method).await;
        self.finish(method, &domain, result, |r| r.overall_code())
    }

    async fn reserve(
        &self,
        request: Request<kuadrant::ReserveRequest>,
    ) -> Result<Response<kuadrant::ReserveResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let domain = request.domain.clone();
        let result = RateLimiter::reserve(self, caller.as_ref(), request).await;
        self.finish(Method::Reserve, &domain, result, |r| r.code())
    }

    async fn commit(
        &self,
        request: Request<kuadrant::CommitRequest>,
    ) -> Result<Response<kuadrant::CommitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let domain = request.domain.clone();
        let result = RateLimiter::commit(self, caller.as_ref(), request).await;
        self.finish(Method::Commit, &domain, result, |_| Code::Ok)
    }
}
