//! Envoy's and Kuadrant's rate limit services on the engine: each
//! descriptor that names a slice is a gate call (a check, a consume, a hold,
//! a commit or usage that already happened) on the teacher's actor, answered
//! once durable like every other gate call.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::answer::{response, Outcome, SliceState};
use super::domain::{Domain, Domains};
use super::plan::{plan, EventSource, Item, Phase, Plan, SliceIds, SliceRef, Target, Units};
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
    /// (or charged) on its own, as Envoy's own service does: an answer
    /// OVER_LIMIT for one descriptor still charges the others (Kuadrant's
    /// Reserve is the all-or-none call).
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
            EventSource::Descriptors,
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, method.action(plan.phase))?;
        // Kuadrant's CheckRateLimit only checks, as Limitador's does: the
        // usage comes with Report.
        let check_only = method == Method::CheckRateLimit;
        let outcomes = futures::future::join_all(
            plan.items
                .iter()
                .map(|item| self.outcome(domain, plan.phase, check_only, item)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        count_unknown(domain, &outcomes);
        Ok(response(domain, &outcomes, self.engine.clock().now_ms()))
    }

    async fn outcome(
        &self,
        domain: &Domain,
        phase: Phase,
        check_only: bool,
        item: &Item,
    ) -> Result<Outcome, RlsError> {
        let slice = match &item.target {
            Target::Unmapped => return Ok(Outcome::Ignored),
            Target::Partial => return Ok(Outcome::Unknown),
            Target::Slice(slice) => slice,
        };
        let decided = match phase {
            _ if check_only => self.peek(slice, item.units.max(1)).await,
            Phase::Request => self.decide(domain, slice, item).await,
            Phase::StreamDone => self.report(domain, slice, item).await,
        };
        known_or_unknown(slice, decided)
    }

    /// The request path: a pure check (0 units), a consume, or a hold.
    async fn decide(
        &self,
        domain: &Domain,
        slice: &SliceRef,
        item: &Item,
    ) -> Result<Decision, EngineError> {
        if item.units == 0 {
            return self.peek(slice, 1).await;
        }
        if domain.holds {
            // The plan refuses a holds request without an event id.
            let ids = item.ids.as_ref().ok_or_else(|| {
                EngineError::Internal("a hold was planned without an event id".into())
            })?;
            return self
                .hold(slice, item, ids.hold.clone(), domain.hold_ttl_ms)
                .await;
        }
        let consume = Consume {
            service: slice.service.clone(),
            units: item.units,
            event_id: item
                .ids
                .as_ref()
                .map(|ids| ids.event.clone())
                .unwrap_or_else(fresh_event_id),
            occurred_at_ms: 0,
            model: item.model.clone(),
        };
        self.engine.consume(&slice.teacher, consume).await
    }

    /// A hold of the item's units. A hold the rules cannot make now (the
    /// teacher holds as many as allowed) is a refusal, like an exhausted
    /// slice: to a gateway both are "over the limit".
    async fn hold(
        &self,
        slice: &SliceRef,
        item: &Item,
        reservation_id: ReservationId,
        ttl_ms: u64,
    ) -> Result<Decision, EngineError> {
        let hold = HoldRequest {
            service: slice.service.clone(),
            units: item.units,
            ttl_ms,
            reservation_id,
            model: item.model.clone(),
        };
        match self.engine.reserve(&slice.teacher, Reserve(hold)).await {
            Ok((decision, _)) => Ok(decision),
            Err(EngineError::Rule(RuleError::Precondition(message))) => {
                let mut decision = self.peek(slice, 1).await?;
                if decision.reason != Some(DenyReason::NoAllocation) {
                    decision.allowed = false;
                    decision.message = message;
                }
                Ok(decision)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether `units` may be spent now, charging nothing: a pure check,
    /// and the state a charge of usage that already happened reports.
    async fn peek(&self, slice: &SliceRef, units: u64) -> Result<Decision, EngineError> {
        let check = Check {
            service: slice.service.clone(),
            units,
            previews: CheckPreviews::Consume,
        };
        self.engine.check(&slice.teacher, check).await
    }

    /// The stream-done call (or a Report): usage that already happened,
    /// never refused. On a holds domain the event's hold is committed (or
    /// released, for 0 units); without one (or once it is gone) the usage
    /// is charged as a synced event.
    async fn report(
        &self,
        domain: &Domain,
        slice: &SliceRef,
        item: &Item,
    ) -> Result<Decision, EngineError> {
        let ids = item.ids.as_ref();
        let unknown = match (ids, domain.holds) {
            (Some(ids), true) if item.units == 0 => {
                self.release(slice, ids.hold.clone()).await?;
                None
            }
            (Some(ids), true) => self.commit_or_report(slice, ids, item).await?,
            (_, _) if item.units == 0 => None,
            (_, _) => {
                self.charge_usage(slice, ids.map(|ids| ids.done.clone()), item)
                    .await?
            }
        };
        if let Some(unknown) = unknown {
            return Ok(unknown);
        }
        let mut decision = self.peek(slice, 1).await?;
        if decision.reason != Some(DenyReason::NoAllocation) {
            // Already spent: the answer is only what is left.
            decision.allowed = true;
        }
        Ok(decision)
    }

    /// Ends a hold without charging; one that is gone (or was never made)
    /// is nothing to end. The units it freed.
    async fn release(
        &self,
        slice: &SliceRef,
        reservation_id: ReservationId,
    ) -> Result<u64, EngineError> {
        match self
            .engine
            .release(&slice.teacher, Release { reservation_id })
            .await
        {
            Err(EngineError::Rule(RuleError::NotFound(_))) => Ok(0),
            other => other,
        }
    }

    /// Commits the event's hold with the item's units. A hold quotad cannot
    /// commit (unknown, forgotten, or one that Reserve refused) is charged
    /// as usage that happened instead. Some: the slice is unknown.
    async fn commit_or_report(
        &self,
        slice: &SliceRef,
        ids: &SliceIds,
        item: &Item,
    ) -> Result<Option<Decision>, EngineError> {
        Ok(self.commit_hold(slice, ids, item).await?.1)
    }

    /// [`Self::commit_or_report`], also saying whether a live hold ended.
    async fn commit_hold(
        &self,
        slice: &SliceRef,
        ids: &SliceIds,
        item: &Item,
    ) -> Result<(bool, Option<Decision>), EngineError> {
        let commit = Commit {
            reservation_id: ids.hold.clone(),
            actual_units: item.units,
        };
        match self.engine.commit(&slice.teacher, commit).await {
            Ok(result) => Ok((!result.duplicate && !result.outcome.hold_had_expired, None)),
            Err(EngineError::Rule(RuleError::NotFound(_) | RuleError::Precondition(_))) => Ok((
                false,
                self.charge_usage(slice, Some(ids.done.clone()), item)
                    .await?,
            )),
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
        let synced = self
            .engine
            .sync_usage(&slice.teacher.school_id, vec![Ok((teacher_id, event))])
            .await;
        match synced.map(|outcomes| outcomes.into_iter().next()) {
            // No such school: as unknown as a teacher without a slice.
            Err(EngineError::Rule(RuleError::NotFound(_)))
            | Ok(Some(SyncOutcome::Rejected {
                reason: SyncRejection::UnknownAllocation,
                ..
            })) => Ok(Some(unknown_decision())),
            Ok(Some(SyncOutcome::Rejected { message, .. })) => {
                Err(EngineError::Rule(RuleError::precondition(message)))
            }
            Ok(Some(_)) => Ok(None),
            Ok(None) => Err(EngineError::Internal(
                "a synced event got no outcome".into(),
            )),
            Err(error) => Err(error),
        }
    }

    /// Kuadrant's Reserve: a hold on every slice named, all or none. The
    /// descriptors are read as ShouldRateLimit reads them: one naming no
    /// known slice is answered per the domain's `unknown_slice`.
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
        let fresh = fresh_reservation_id();
        let plan = plan(
            domain,
            &request.descriptors,
            Units::Amount(request.amount),
            Some(Phase::Request),
            EventSource::DescriptorsOr(fresh.as_str()),
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, Action::Reserve)?;
        let tries = futures::future::join_all(plan.items.iter().map(|item| async move {
            let slice = match &item.target {
                Target::Unmapped => return Ok((Outcome::Ignored, None)),
                Target::Partial => return Ok((Outcome::Unknown, None)),
                Target::Slice(slice) => slice,
            };
            let ids = item.ids.as_ref().ok_or_else(|| {
                RlsError::Engine(EngineError::Internal(
                    "a reserve was planned without an id".into(),
                ))
            })?;
            let decided = self.hold(slice, item, ids.hold.clone(), ttl_ms).await;
            let outcome = known_or_unknown(slice, decided)?;
            let held = matches!(&outcome, Outcome::Slice(state) if state.allowed)
                .then(|| (slice, ids.hold.clone()));
            Ok((outcome, held))
        }))
        .await;
        let mut held = Vec::new();
        let mut outcomes = Vec::new();
        let mut failed = None;
        for tried in tries {
            match tried {
                Ok((outcome, hold)) => {
                    outcomes.push(outcome);
                    held.extend(hold);
                }
                Err(error) => failed = failed.or(Some(error)),
            }
        }
        count_unknown(domain, &outcomes);
        let answer = response(domain, &outcomes, self.engine.clock().now_ms());
        if failed.is_some() || answer.overall_code() == Code::OverLimit {
            for (slice, reservation_id) in held {
                self.release(slice, reservation_id).await?;
            }
            if let Some(error) = failed {
                return Err(error);
            }
            return Ok(kuadrant::ReserveResponse {
                code: Code::OverLimit.into(),
                reservation_id: String::new(),
            });
        }
        Ok(kuadrant::ReserveResponse {
            code: Code::Ok.into(),
            reservation_id: plan.event_id.unwrap_or_else(|| fresh.as_str().to_string()),
        })
    }

    /// Kuadrant's Commit: the actual amount on each slice's hold; a hold
    /// that is unknown or gone is charged as a Report. The holds are found
    /// by the reservation id and the slices the descriptors name, in any
    /// order; 0 ends them without charging.
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
            EventSource::Given(&request.reservation_id, "reservation_id"),
            self.units_max(),
        )?;
        self.admit(domain, caller, &plan, Action::Commit)?;
        let ended = futures::future::join_all(plan.slices().map(|(slice, item)| async move {
            let ids = item.ids.as_ref().ok_or_else(|| {
                EngineError::Internal("a commit was planned without an id".into())
            })?;
            if item.units == 0 {
                return Ok((self.release(slice, ids.hold.clone()).await? > 0, None));
            }
            self.commit_hold(slice, ids, item).await
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, EngineError>>()?;
        let mut outcomes: Vec<Outcome> = plan
            .items
            .iter()
            .filter(|item| matches!(item.target, Target::Partial))
            .map(|_| Outcome::Unknown)
            .collect();
        outcomes.extend(
            ended
                .iter()
                .filter(|(_, unknown)| unknown.is_some())
                .map(|_| Outcome::Unknown),
        );
        count_unknown(domain, &outcomes);
        Ok(kuadrant::CommitResponse {
            reservation_released: !ended.is_empty() && ended.iter().all(|(live, _)| *live),
        })
    }

    /// The caller the auth interceptor put on the request (main port only).
    fn caller<T>(&self, request: &Request<T>) -> Option<Caller> {
        match self.trust {
            Trust::Listener => None,
            Trust::Token => request.extensions().get::<Caller>().cloned(),
        }
    }

    /// The `domain` label of a call: a configured domain's name, or
    /// "unknown" (the caller's string would make the labels unbounded).
    fn label(&self, domain: &str) -> &str {
        self.domains
            .get(domain)
            .map_or("unknown", |known| known.name.as_str())
    }

    /// ShouldRateLimit, CheckRateLimit and Report, answered and counted.
    async fn answer_rate_limit(
        &self,
        request: Request<envoy::RateLimitRequest>,
        method: Method,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let label = self.label(&request.domain);
        let result = self.rate_limit(caller.as_ref(), request, method).await;
        self.finish(method, label, result, |r| r.overall_code())
    }

    /// Counts the call and makes its error a status.
    fn finish<T>(
        &self,
        method: Method,
        domain: &str,
        result: Result<T, RlsError>,
        code_of: impl Fn(&T) -> Code,
    ) -> Result<Response<T>, Status> {
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

/// Logs and counts each descriptor that named no known slice.
fn count_unknown(domain: &Domain, outcomes: &[Outcome]) {
    for _ in outcomes.iter().filter(|o| **o == Outcome::Unknown) {
        telemetry::rls_unknown_slice(&domain.name, domain.unknown_slice.as_str());
        tracing::info!(
            domain = %domain.name,
            answer = domain.unknown_slice.as_str(),
            "rate limit descriptor names no known slice"
        );
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
    // The OS's generator does not fail on Linux once booted. If it ever
    // did, the clock and a counter still make the id unique in this process.
    if getrandom::fill(&mut bytes).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&now.to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
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
        self.answer_rate_limit(request, Method::ShouldRateLimit)
            .await
    }
}

#[tonic::async_trait]
impl kuadrant::rate_limit_service_server::RateLimitService for RateLimiter {
    async fn check_rate_limit(
        &self,
        request: Request<envoy::RateLimitRequest>,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        self.answer_rate_limit(request, Method::CheckRateLimit)
            .await
    }

    async fn report(
        &self,
        request: Request<envoy::RateLimitRequest>,
    ) -> Result<Response<envoy::RateLimitResponse>, Status> {
        self.answer_rate_limit(request, Method::Report).await
    }

    async fn reserve(
        &self,
        request: Request<kuadrant::ReserveRequest>,
    ) -> Result<Response<kuadrant::ReserveResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let label = self.label(&request.domain);
        let result = RateLimiter::reserve(self, caller.as_ref(), request).await;
        self.finish(Method::Reserve, label, result, |r| r.code())
    }

    async fn commit(
        &self,
        request: Request<kuadrant::CommitRequest>,
    ) -> Result<Response<kuadrant::CommitResponse>, Status> {
        let caller = self.caller(&request);
        let request = request.into_inner();
        let label = self.label(&request.domain);
        let result = RateLimiter::commit(self, caller.as_ref(), request).await;
        self.finish(Method::Commit, label, result, |_| Code::Ok)
    }
}
