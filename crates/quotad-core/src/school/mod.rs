//! A school's pools: the units bought per service type for the cycle, and how
//! much of them is allocated to teachers or borrowed. The SchoolActor holds
//! this and is the only place that changes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::account::TeacherAccount;
use super::audit::AuditTrail;
use super::cycle::{following_start, next_cycle, BillingAnchor, Cycle, CycleInfo, TimestampMs};
use super::error::{add_units, InvalidInput, RuleError};
use super::ids::{SchoolId, ServiceType, TeacherId};
use super::limits::RuleLimits;
use super::record::SliceSet;
use super::requests::{IncreaseRequest, PENDING_REQUESTS_PER_TEACHER_MAX};
use super::slice::{Priority, SliceStatus};

mod apply;

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
/// `floor_units`, what its teacher used and holds, or the slice's units now
/// if they are fewer ([`crate::Slice::lowest_allowed_units`]).
pub fn check_bulk_floor(entry: usize, slice: &SliceSet, floor_units: u64) -> Result<(), RuleError> {
    if slice.allocated_units < floor_units {
        return Err(RuleError::precondition(format!(
            "nothing was changed: the slice of teacher {} of {} cannot shrink below {floor_units} units (what was used and is held of it this cycle, or its units now if fewer); entry {entry} asks for {}",
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
