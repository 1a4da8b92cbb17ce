//! A school's pools: the units bought per service type for the cycle, and how
//! much of them is allocated to teachers or borrowed. The SchoolActor holds
//! this and is the only place that changes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cycle::{BillingAnchor, Cycle, TimestampMs};
use super::error::{add_units, InvalidInput, RuleError};
use super::ids::{SchoolId, ServiceType, TeacherId};
use super::limits::RuleLimits;
use super::record::Record;

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

/// What the school must know of a slice to keep its pool's sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceTerms {
    pub allocated_units: u64,
    pub auto_renew: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchoolState {
    pub config: SchoolConfig,
    pub cycle_start_ms: TimestampMs,
    pub pools: BTreeMap<ServiceType, Pool>,
    pub slices: HashMap<(TeacherId, ServiceType), SliceTerms>,
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
            cycle_start_ms,
            pools,
            slices: HashMap::new(),
        }
    }

    pub fn cycle(&self) -> Result<Cycle, InvalidInput> {
        self.config.anchor.cycle_at(self.cycle_start_ms)
    }

    pub fn pool(&self, service: &ServiceType) -> Result<&Pool, RuleError> {
        self.pools.get(service).ok_or_else(|| {
            RuleError::not_found(format!(
                "service type {service} is not configured for school {}",
                self.config.id
            ))
        })
    }

    /// The cycle that holds `now_ms`, when it is newer than the current one.
    pub fn due_cycle(&self, now_ms: TimestampMs) -> Result<Option<Cycle>, InvalidInput> {
        let cycle = self.config.anchor.cycle_at(now_ms)?;
        Ok((cycle.start_ms > self.cycle_start_ms).then_some(cycle))
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

    /// Grants `units` of the unallocated part to a high priority teacher, if
    /// the school allows borrowing and has them.
    pub fn can_borrow(&self, service: &ServiceType, units: u64) -> bool {
        self.config.borrowing_enabled
            && self
                .pools
                .get(service)
                .is_some_and(|p| p.available_units() >= units)
    }

    pub fn grant_borrow(&mut self, service: &ServiceType, units: u64) -> bool {
        if !self.can_borrow(service, units) {
            return false;
        }
        if let Some(pool) = self.pools.get_mut(service) {
            pool.borrowed_units = pool.borrowed_units.saturating_add(units);
        }
        true
    }

    /// Starts a new cycle: borrowing resets; slices without auto-renew return
    /// their units to the pool.
    pub fn roll_to(&mut self, cycle_start_ms: TimestampMs) {
        if cycle_start_ms <= self.cycle_start_ms {
            return;
        }
        self.cycle_start_ms = cycle_start_ms;
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

    /// Applies a fact to the pools. Usage only matters here for what it borrowed.
    pub fn apply(&mut self, record: &Record) {
        if let Some(cycle_start_ms) = record.cycle_start_ms() {
            self.roll_to(cycle_start_ms);
        }
        match record {
            Record::PoolSet {
                service,
                cycle_units,
                ..
            } => {
                self.pools.entry(service.clone()).or_default().cycle_units = *cycle_units;
            }
            Record::AllocationSet {
                teacher_id,
                service,
                allocated_units,
                auto_renew,
                ..
            } => {
                let key = (teacher_id.clone(), service.clone());
                let old = self.slices.insert(
                    key,
                    SliceTerms {
                        allocated_units: *allocated_units,
                        auto_renew: *auto_renew,
                    },
                );
                let pool = self.pools.entry(service.clone()).or_default();
                pool.allocated_units = pool
                    .allocated_units
                    .saturating_sub(old.map_or(0, |t| t.allocated_units))
                    .saturating_add(*allocated_units);
            }
            Record::UsageCharged(usage) if usage.cycle_start_ms == self.cycle_start_ms => {
                let pool = self.pools.entry(usage.service.clone()).or_default();
                pool.borrowed_units = pool.borrowed_units.saturating_add(usage.borrowed_units);
            }
            _ => {}
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
        Ok(())
    }
}
