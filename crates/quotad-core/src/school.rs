//! A school's pools: the units bought per service type for the cycle, and how
//! much of them is allocated to teachers or borrowed. The SchoolActor holds
//! this and is the only place that changes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::account::TeacherAccount;
use super::audit::{AuditAction, AuditTrail, Draft};
use super::cycle::{following_start, next_cycle, BillingAnchor, Cycle, CycleInfo, TimestampMs};
use super::error::{add_units, InvalidInput, RuleError};
use super::ids::{SchoolId, ServiceType, TeacherId};
use super::limits::RuleLimits;
use super::record::{Change, Grant, Record, SliceSet};
use super::requests::{
    IncreaseRequest, RequestOutcome, RequestStatus, PENDING_REQUESTS_PER_TEACHER_MAX,
};
use super::slice::{Priority, SliceStatus};

/// Who the audit trail names for changes quotad makes by itself (rollover, expiry).
pub const SYSTEM_ACTOR: &str = "quotad";

/// Longest school name, in bytes.
pub const SCHOOL_NAME_BYTES_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tier {
    /// Preschools, on the Pro+ plan.
    Preschool,
    /// K-12 schools, on the Enterprise plan.
    K12,
    /// A user without a school: a school of one.
    Individual,
}

impl Tier {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        match value {
            "preschool" => Ok(Self::Preschool),
            "k12" => Ok(Self::K12),
            "individual" => Ok(Self::Individual),
            other => Err(InvalidInput::new(
                "tier",
                format!("is {other:?}; it must be preschool, k12 or individual"),
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preschool => "preschool",
            Self::K12 => "k12",
            Self::Individual => "individual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchoolConfig {
    pub id: SchoolId,
    pub name: Arc<str>,
    pub tier: Tier,
    pub anchor: BillingAnchor,
    pub borrowing_enabled: bool,
    /// Teachers may file increase requests.
    pub self_service_requests: bool,
}

impl SchoolConfig {
    pub fn check_name(name: &str) -> Result<Arc<str>, InvalidInput> {
        if name.trim().is_empty() {
            return Err(InvalidInput::new("name", "must not be empty"));
        }
        if name.len() > SCHOOL_NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                "name",
                format!("must be at most {SCHOOL_NAME_BYTES_MAX} bytes without control characters"),
            ));
        }
        Ok(Arc::from(name))
    }

    /// An individual user's school has one allocation, the whole pool, that
    /// nobody manages: allocation calls on it are refused.
    pub fn check_managed(&self) -> Result<(), RuleError> {
        if self.tier == Tier::Individual {
            return Err(RuleError::precondition(format!(
                "{} is an individual account: its only allocation is the whole pool, which follows the subscription",
                self.id
            )));
        }
        Ok(())
    }

    /// The teacher id of an individual account's owner: the school id itself.
    pub fn owner(&self) -> Option<TeacherId> {
        individual_owner(self.tier, &self.id)
    }
}

/// An individual account is a school of one: its owner is the teacher with
/// the school's id. Other tiers have no owner.
pub fn individual_owner(tier: Tier, school_id: &SchoolId) -> Option<TeacherId> {
    (tier == Tier::Individual)
        .then(|| TeacherId::parse(school_id.as_str()).ok())
        .flatten()
}

/// The terms of an individual owner's only slice: the whole pool, renewed
/// every cycle. The slice follows every change of the pool.
pub fn owner_slice_terms(pool_units: u64) -> SliceTerms {
    SliceTerms {
        allocated_units: pool_units,
        auto_renew: true,
        priority: Priority::Normal,
        status: SliceStatus::Active,
    }
}

/// When an individual's pool changes, which moves first so that the slice
/// always fits the pool: a shrinking pool shrinks the slice first, a growing
/// one grows it after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerSliceOrder {
    SliceThenPool,
    PoolThenSlice,
}

pub fn owner_slice_order(pool_units_now: u64, pool_units_next: u64) -> OwnerSliceOrder {
    if pool_units_next < pool_units_now {
        OwnerSliceOrder::SliceThenPool
    } else {
        OwnerSliceOrder::PoolThenSlice
    }
}

/// A call names a service type the school has no pool for.
pub fn service_not_configured(school_id: &SchoolId, service: &ServiceType) -> RuleError {
    RuleError::not_found(format!(
        "service type {service} is not configured for school {school_id}"
    ))
}

/// Entry `entry` (1-based) of a bulk change may not shrink its slice below
/// `floor_units`, what its teacher used and holds ([`crate::Slice::floor_units`]).
pub fn check_bulk_floor(entry: usize, slice: &SliceSet, floor_units: u64) -> Result<(), RuleError> {
    if slice.allocated_units < floor_units {
        return Err(RuleError::precondition(format!(
            "nothing was changed: teacher {} has used and holds {floor_units} units of {}; entry {entry} asks for {}",
            slice.teacher_id, slice.service, slice.allocated_units
        )));
    }
    Ok(())
}

/// One service type's pool in the current cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pool {
    pub cycle_units: u64,
    /// The sum of the teachers' slices.
    pub allocated_units: u64,
    /// Units high priority teachers took from the unallocated part this cycle.
    pub borrowed_units: u64,
}

impl Pool {
    /// Units neither allocated nor borrowed.
    pub fn available_units(&self) -> u64 {
        self.cycle_units
            .saturating_sub(self.allocated_units.saturating_add(self.borrowed_units))
    }
}

/// What the school knows of a slice: its terms, not its usage (the teacher's
/// actor counts that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceTerms {
    pub allocated_units: u64,
    pub auto_renew: bool,
    pub priority: Priority,
    pub status: SliceStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchoolState {
    pub config: SchoolConfig,
    /// A billing anchor that takes effect when the next cycle starts.
    pub next_anchor: Option<BillingAnchor>,
    pub cycle_start_ms: TimestampMs,
    /// When the cycle before the current one started (0 before the first rollover).
    pub previous_cycle_start_ms: TimestampMs,
    pub pools: BTreeMap<ServiceType, Pool>,
    pub slices: BTreeMap<(TeacherId, ServiceType), SliceTerms>,
    pub requests: BTreeMap<u64, IncreaseRequest>,
    pub history: AuditTrail,
}

impl SchoolState {
    pub fn new(
        config: SchoolConfig,
        cycle_start_ms: TimestampMs,
        pools: &[(ServiceType, u64)],
    ) -> Self {
        let pools = pools
            .iter()
            .map(|(service, units)| {
                (
                    service.clone(),
                    Pool {
                        cycle_units: *units,
                        ..Pool::default()
                    },
                )
            })
            .collect();
        Self {
            config,
            next_anchor: None,
            cycle_start_ms,
            previous_cycle_start_ms: 0,
            pools,
            slices: BTreeMap::new(),
            requests: BTreeMap::new(),
            history: AuditTrail::default(),
        }
    }

    pub fn cycle(&self) -> Result<Cycle, InvalidInput> {
        self.config.anchor.cycle_from(self.cycle_start_ms)
    }

    /// What the school's teachers follow (see [`TeacherAccount::follow`]).
    pub fn cycle_info(&self) -> CycleInfo {
        CycleInfo {
            start_ms: self.cycle_start_ms,
            previous_start_ms: self.previous_cycle_start_ms,
            anchor: self.config.anchor,
            next_anchor: self.next_anchor,
        }
    }

    /// A new account for a teacher of this school, in the school's cycle.
    pub fn new_account(&self, teacher_id: TeacherId) -> TeacherAccount {
        let mut account = TeacherAccount::new(
            self.config.id.clone(),
            teacher_id,
            self.config.anchor,
            self.cycle_start_ms,
        );
        account.next_anchor = self.next_anchor;
        account
    }

    pub fn pool(&self, service: &ServiceType) -> Result<&Pool, RuleError> {
        self.pools
            .get(service)
            .ok_or_else(|| service_not_configured(&self.config.id, service))
    }

    /// The cycle that holds `now_ms`, when it is newer than the current one.
    pub fn due_cycle(&self, now_ms: TimestampMs) -> Result<Option<Cycle>, InvalidInput> {
        next_cycle(
            self.cycle()?,
            self.next_anchor.unwrap_or(self.config.anchor),
            now_ms,
        )
    }

    /// Checks a new cycle size for a pool: more types than allowed, or fewer
    /// units than are already allocated or borrowed, are refused.
    pub fn check_set_pool(
        &self,
        service: &ServiceType,
        cycle_units: u64,
        limits: &RuleLimits,
    ) -> Result<(), RuleError> {
        let Some(pool) = self.pools.get(service) else {
            if self.pools.len() >= limits.service_types_per_school_max {
                return Err(RuleError::precondition(format!(
                    "school {} has {} service types, the most allowed",
                    self.config.id,
                    self.pools.len()
                )));
            }
            return Ok(());
        };
        let committed = add_units("cycle_units", pool.allocated_units, pool.borrowed_units)?;
        if cycle_units < committed {
            return Err(RuleError::precondition(format!(
                "{service} has {} units allocated and {} borrowed; {cycle_units} cycle units would be {} short",
                pool.allocated_units,
                pool.borrowed_units,
                committed - cycle_units
            )));
        }
        Ok(())
    }

    /// Checks a slice's new size against the pool: the sum of slices (plus
    /// what was borrowed) never exceeds the cycle units.
    pub fn check_allocation(
        &self,
        teacher: &TeacherId,
        service: &ServiceType,
        allocated_units: u64,
    ) -> Result<(), RuleError> {
        let pool = self.pool(service)?;
        let current = self
            .slices
            .get(&(teacher.clone(), service.clone()))
            .map_or(0, |t| t.allocated_units);
        let others = pool.allocated_units.saturating_sub(current);
        let wanted = add_units("allocated_units", others, allocated_units)?;
        let wanted = add_units("allocated_units", wanted, pool.borrowed_units)?;
        if wanted > pool.cycle_units {
            return Err(RuleError::precondition(format!(
                "the {service} pool of school {} has {} units available for this slice; {allocated_units} asked ({} over)",
                self.config.id,
                pool.cycle_units.saturating_sub(others + pool.borrowed_units),
                wanted - pool.cycle_units
            )));
        }
        Ok(())
    }

    /// Checks slices set together: each names a configured service type once,
    /// and per service type the pool holds the new sum. Nothing is applied
    /// unless every slice fits.
    pub fn check_allocations(&self, slices: &[SliceSet]) -> Result<(), RuleError> {
        let mut allocated: BTreeMap<&ServiceType, u64> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, slice) in slices.iter().enumerate() {
            let pool = self.pool(&slice.service)?;
            if !seen.insert((&slice.teacher_id, &slice.service)) {
                return Err(InvalidInput::new(
                    "allocations",
                    format!(
                        "entry {} sets teacher {}'s {} slice a second time",
                        i + 1,
                        slice.teacher_id,
                        slice.service
                    ),
                )
                .into());
            }
            let sum = allocated
                .entry(&slice.service)
                .or_insert(pool.allocated_units);
            let current = self
                .slices
                .get(&(slice.teacher_id.clone(), slice.service.clone()))
                .map_or(0, |t| t.allocated_units);
            *sum = add_units(
                "allocated_units",
                sum.saturating_sub(current),
                slice.allocated_units,
            )?;
        }
        let mut short = Vec::new();
        for (service, sum) in allocated {
            let pool = self.pool(service)?;
            let wanted = add_units("allocated_units", sum, pool.borrowed_units)?;
            if wanted > pool.cycle_units {
                short.push(format!(
                    "{service}: slices would add up to {sum} (+{} borrowed) of {} cycle units, {} over",
                    pool.borrowed_units,
                    pool.cycle_units,
                    wanted - pool.cycle_units
                ));
            }
        }
        if !short.is_empty() {
            return Err(RuleError::precondition(format!(
                "nothing was changed; the pools of school {} are too small: {}",
                self.config.id,
                short.join("; ")
            )));
        }
        Ok(())
    }

    /// Checks a new increase request and returns its id.
    pub fn check_file_request(
        &self,
        teacher: &TeacherId,
        service: &ServiceType,
        units: u64,
        limits: &RuleLimits,
    ) -> Result<u64, RuleError> {
        self.config.check_managed()?;
        if !self.config.self_service_requests {
            return Err(RuleError::precondition(format!(
                "school {} does not take increase requests from teachers (self-service is off)",
                self.config.id
            )));
        }
        self.pool(service)?;
        limits.check_units("units", units)?;
        limits.check_pool_units("units", units)?;
        let pending = self
            .requests
            .values()
            .filter(|r| r.is_pending() && &r.teacher_id == teacher)
            .count();
        if pending >= PENDING_REQUESTS_PER_TEACHER_MAX {
            return Err(RuleError::precondition(format!(
                "teacher {teacher} has {pending} pending requests, the most allowed; wait for a decision"
            )));
        }
        Ok(self.requests.last_key_value().map_or(1, |(id, _)| id + 1))
    }

    /// A request that can still be decided.
    pub fn pending_request(&self, id: u64) -> Result<&IncreaseRequest, RuleError> {
        let request = self.requests.get(&id).ok_or_else(|| {
            RuleError::not_found(format!("school {} has no request {id}", self.config.id))
        })?;
        if !request.is_pending() {
            return Err(RuleError::precondition(format!(
                "request {id} is {} already",
                request.status.as_str()
            )));
        }
        Ok(request)
    }

    /// The units an approval grants: 0 means all that was asked; more than
    /// was asked is refused.
    pub fn grant_units(request: &IncreaseRequest, units: u64) -> Result<u64, InvalidInput> {
        match units {
            0 => Ok(request.units),
            u if u <= request.units => Ok(u),
            u => Err(InvalidInput::new(
                "units",
                format!(
                    "is {u}; request {} asked for {}, the most that can be granted",
                    request.id, request.units
                ),
            )),
        }
    }

    /// Pending requests whose week has run out.
    pub fn due_expiries(&self, now_ms: TimestampMs) -> Vec<u64> {
        self.requests
            .values()
            .filter(|r| r.is_due_to_expire(now_ms))
            .map(|r| r.id)
            .collect()
    }

    /// Grants `units` of the unallocated part to a high priority teacher, if
    /// the school allows borrowing and has them.
    pub fn can_borrow(&self, service: &ServiceType, units: u64) -> bool {
        self.config.borrowing_enabled
            && self
                .pools
                .get(service)
                .is_some_and(|p| p.available_units() >= units)
    }

    /// Starts a new cycle: borrowing resets; slices without auto-renew return
    /// their units to the pool.
    /// Every cycle in between is passed through (see [`next_cycle`]), so the
    /// previous cycle is the one just before, however late the roll.
    pub fn roll_to(&mut self, cycle_start_ms: TimestampMs) {
        if cycle_start_ms <= self.cycle_start_ms {
            return;
        }
        while self.cycle_start_ms < cycle_start_ms {
            let step_ms = following_start(self.cycle_start_ms, self.config.anchor)
                .filter(|next| *next < cycle_start_ms)
                .unwrap_or(cycle_start_ms);
            self.previous_cycle_start_ms = self.cycle_start_ms;
            self.cycle_start_ms = step_ms;
            if let Some(anchor) = self.next_anchor.take() {
                self.config.anchor = anchor;
            }
        }
        for terms in self.slices.values_mut() {
            if !terms.auto_renew {
                terms.allocated_units = 0;
            }
        }
        for pool in self.pools.values_mut() {
            pool.borrowed_units = 0;
        }
        self.recount_allocated();
    }

    fn recount_allocated(&mut self) {
        for pool in self.pools.values_mut() {
            pool.allocated_units = 0;
        }
        for ((_, service), terms) in &self.slices {
            if let Some(pool) = self.pools.get_mut(service) {
                pool.allocated_units = pool.allocated_units.saturating_add(terms.allocated_units);
            }
        }
    }

    /// Applies a fact to the pools, the slices' terms, the requests and the
    /// audit trail. Never decides: the record says what happened.
    pub fn apply(&mut self, record: &Record) {
        if let Some(cycle_start_ms) = record.cycle_start_ms() {
            self.roll_to(cycle_start_ms);
        }
        // A record of a cycle that has ended here (written by an actor that
        // had not seen the rollover) is applied as that rollover would have
        // left it.
        let late = record
            .cycle_start_ms()
            .is_some_and(|c| c < self.cycle_start_ms);
        match record {
            Record::SchoolCreated {
                config,
                pools,
                change,
                ..
            } => {
                let mut draft = Draft::new(AuditAction::SchoolCreated, change)
                    .after("name", &config.name)
                    .after("tier", config.tier.as_str())
                    .after("billing_anchor_day", config.anchor.day())
                    .after("borrowing_enabled", config.borrowing_enabled)
                    .after("self_service_requests", config.self_service_requests);
                for (service, units) in pools {
                    draft = draft.after(&format!("cycle_units.{service}"), units);
                }
                self.history.append(draft);
            }
            Record::PoolSet {
                service,
                cycle_units,
                change,
                ..
            } => {
                let pool = self.pools.entry(service.clone()).or_default();
                let before = pool.cycle_units;
                pool.cycle_units = *cycle_units;
                self.history.append(
                    Draft::new(AuditAction::PoolSet, change)
                        .service(service)
                        .before("cycle_units", before)
                        .after("cycle_units", cycle_units),
                );
            }
            Record::AllocationSet {
                teacher_id,
                service,
                allocated_units,
                priority,
                auto_renew,
                change,
                grant,
                ..
            } => {
                let slice = SliceSet {
                    teacher_id: teacher_id.clone(),
                    service: service.clone(),
                    allocated_units: *allocated_units,
                    priority: *priority,
                    auto_renew: *auto_renew,
                };
                self.set_slice(&slice, change, late);
                if let Some(grant) = grant {
                    self.approve(grant, change);
                }
            }
            Record::AllocationsSet { slices, change, .. } => {
                for slice in slices {
                    self.set_slice(slice, change, late);
                }
            }
            Record::AllocationStatusSet {
                teacher_id,
                service,
                status,
                change,
                ..
            } => {
                if let Some(terms) = self.slices.get_mut(&(teacher_id.clone(), service.clone())) {
                    let before = terms.status;
                    terms.status = *status;
                    self.history.append(
                        Draft::new(AuditAction::AllocationStatusSet, change)
                            .slice(teacher_id, service)
                            .before("status", before.as_str())
                            .after("status", status.as_str()),
                    );
                }
            }
            Record::AllocationRemoved {
                teacher_id,
                service,
                change,
                ..
            } => {
                if let Some(old) = self.slices.remove(&(teacher_id.clone(), service.clone())) {
                    if let Some(pool) = self.pools.get_mut(service) {
                        pool.allocated_units =
                            pool.allocated_units.saturating_sub(old.allocated_units);
                    }
                    self.history.append(
                        terms_values(
                            Draft::new(AuditAction::AllocationRemoved, change),
                            Some(&old),
                            true,
                        )
                        .slice(teacher_id, service),
                    );
                }
            }
            Record::DataLossAccepted {
                served_through_seq,
                lost,
                change,
                ..
            } => {
                let draft = Draft::new(AuditAction::DataLossAccepted, change)
                    .after("served_through_wal_seq", served_through_seq)
                    .after("lost", lost);
                self.history.append(draft);
            }
            Record::SettingsSet {
                name,
                borrowing_enabled,
                self_service_requests,
                next_anchor,
                change,
                ..
            } => {
                let mut draft = Draft::new(AuditAction::SettingsSet, change);
                if let Some(anchor) = next_anchor {
                    draft = draft
                        .before("billing_anchor_day", self.config.anchor.day())
                        .after("next_billing_anchor_day", anchor.day());
                    self.next_anchor = Some(*anchor);
                }
                if let Some(name) = name {
                    draft = draft.before("name", &self.config.name).after("name", name);
                    self.config.name = name.clone();
                }
                if let Some(on) = borrowing_enabled {
                    draft = draft
                        .before("borrowing_enabled", self.config.borrowing_enabled)
                        .after("borrowing_enabled", on);
                    self.config.borrowing_enabled = *on;
                }
                if let Some(on) = self_service_requests {
                    draft = draft
                        .before("self_service_requests", self.config.self_service_requests)
                        .after("self_service_requests", on);
                    self.config.self_service_requests = *on;
                }
                self.history.append(draft);
            }
            Record::RequestFiled {
                request_id,
                teacher_id,
                service,
                units,
                change,
                ..
            } => {
                self.requests.insert(
                    *request_id,
                    IncreaseRequest {
                        id: *request_id,
                        teacher_id: teacher_id.clone(),
                        service: service.clone(),
                        units: *units,
                        reason: change.reason.clone(),
                        filed_by: change.by.clone(),
                        created_at_ms: change.at_ms,
                        status: RequestStatus::Pending,
                        decided_by: None,
                        decision_reason: None,
                        decided_at_ms: None,
                    },
                );
                self.history.append(
                    Draft::new(AuditAction::RequestFiled, change)
                        .slice(teacher_id, service)
                        .after("request_id", request_id)
                        .after("requested_units", units)
                        .after("status", "pending"),
                );
            }
            Record::RequestDecided {
                request_id,
                outcome,
                change,
                ..
            } => {
                let (status, action) = match outcome {
                    RequestOutcome::Rejected => {
                        (RequestStatus::Rejected, AuditAction::RequestRejected)
                    }
                    RequestOutcome::Expired => {
                        (RequestStatus::Expired, AuditAction::RequestExpired)
                    }
                };
                self.decide(*request_id, status, action, change);
            }
            Record::UsageCharged(usage) if usage.cycle_start_ms == self.cycle_start_ms => {
                let pool = self.pools.entry(usage.service.clone()).or_default();
                pool.borrowed_units = pool.borrowed_units.saturating_add(usage.borrowed_units);
            }
            Record::CycleRolledOver {
                from_start_ms,
                to_start_ms,
                at_ms,
                ..
            } => {
                let change = Change {
                    by: Arc::from(SYSTEM_ACTOR),
                    reason: Arc::from("billing cycle ended"),
                    at_ms: *at_ms,
                };
                self.history.append(
                    Draft::new(AuditAction::CycleRolledOver, &change)
                        .before("cycle_start", crate::cycle::format_ms(*from_start_ms))
                        .after("cycle_start", crate::cycle::format_ms(*to_start_ms)),
                );
            }
            _ => {}
        }
    }

    fn set_slice(&mut self, slice: &SliceSet, change: &Change, late: bool) {
        let key = (slice.teacher_id.clone(), slice.service.clone());
        let old = self.slices.get(&key).copied();
        let terms = SliceTerms {
            allocated_units: slice.allocated_units,
            auto_renew: slice.auto_renew,
            priority: slice.priority,
            status: old.map_or(SliceStatus::Active, |t| t.status),
        };
        let kept = SliceTerms {
            allocated_units: if late && !slice.auto_renew {
                0
            } else {
                slice.allocated_units
            },
            ..terms
        };
        self.slices.insert(key, kept);
        let pool = self.pools.entry(slice.service.clone()).or_default();
        pool.allocated_units = pool
            .allocated_units
            .saturating_sub(old.map_or(0, |t| t.allocated_units))
            .saturating_add(kept.allocated_units);
        let draft = terms_values(
            Draft::new(AuditAction::AllocationSet, change),
            old.as_ref(),
            true,
        );
        let draft = terms_values(draft, Some(&terms), false);
        self.history
            .append(draft.slice(&slice.teacher_id, &slice.service));
    }

    fn approve(&mut self, grant: &Grant, change: &Change) {
        self.decide(
            grant.request_id,
            RequestStatus::Approved { units: grant.units },
            AuditAction::RequestApproved,
            change,
        );
    }

    fn decide(&mut self, id: u64, status: RequestStatus, action: AuditAction, change: &Change) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        request.status = status;
        request.decided_by = Some(change.by.clone());
        request.decision_reason = Some(change.reason.clone());
        request.decided_at_ms = Some(change.at_ms);
        let mut draft = Draft::new(action, change)
            .slice(&request.teacher_id, &request.service)
            .after("request_id", id)
            .before("status", "pending")
            .after("status", status.as_str());
        if let RequestStatus::Approved { units } = status {
            draft = draft
                .before("requested_units", request.units)
                .after("approved_units", units);
        }
        self.history.append(draft);
    }

    /// The pool invariant: slices and borrowing fit in the cycle units.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (service, pool) in &self.pools {
            let sum: u64 = self
                .slices
                .iter()
                .filter(|((_, s), _)| s == service)
                .map(|(_, t)| t.allocated_units)
                .sum();
            if sum != pool.allocated_units {
                return Err(format!(
                    "{service}: allocated {} but slices add up to {sum}",
                    pool.allocated_units
                ));
            }
            if pool.allocated_units + pool.borrowed_units > pool.cycle_units {
                return Err(format!(
                    "{service}: {} allocated + {} borrowed exceed {} cycle units",
                    pool.allocated_units, pool.borrowed_units, pool.cycle_units
                ));
            }
        }
        self.history
            .verify()
            .map_err(|broken| format!("audit trail: {}", broken.problem))
    }
}

/// A slice's terms as audit values (`before` or `after`).
fn terms_values(draft: Draft, terms: Option<&SliceTerms>, before: bool) -> Draft {
    let Some(t) = terms else {
        return draft;
    };
    let values = [
        ("allocated_units", t.allocated_units.to_string()),
        ("priority", t.priority.as_str().to_string()),
        ("auto_renew", t.auto_renew.to_string()),
        ("status", t.status.as_str().to_string()),
    ];
    values.into_iter().fold(draft, |d, (name, value)| {
        if before {
            d.before(name, value)
        } else {
            d.after(name, value)
        }
    })
}
