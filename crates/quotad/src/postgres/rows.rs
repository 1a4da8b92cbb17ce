//! What one Postgres snapshot writes, worked out from the state alone (no
//! I/O): which schools, teachers and requests changed since the snapshot
//! before, the usage log rows of the records in between, and the exact state
//! of each changed school and teacher, so that a node can recover from
//! Postgres alone.
//!
//! The report tables (`school_ai_subscriptions`, `teacher_ai_allocations`, ...)
//! are what people query. Recovery reads `quotad_school_state` and
//! `quotad_account_state` (the engine's own encoding of a school and of a
//! teacher account) plus the audit rows, because the engine's state holds more
//! than the report tables show: open holds, the ids seen in the idempotency
//! window, the previous cycle's totals.

use std::collections::{BTreeSet, HashMap};

use crate::storage::{codec, StorageError};
use quotad_core::{
    AuditEntry, AuditTrail, Cycle, IncreaseRequest, Pool, Record, SchoolId, SchoolState,
    ServiceType, Slice, State, TeacherId, TimestampMs, UsageSource,
};

/// One `school_ai_subscriptions` row: a school's pool of one service type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRow {
    pub school_id: SchoolId,
    pub service: ServiceType,
    pub school_name: String,
    pub tier: &'static str,
    pub anchor_day: i16,
    pub next_anchor_day: Option<i16>,
    pub borrowing_enabled: bool,
    pub self_service_requests: bool,
    pub cycle: Cycle,
    pub pool: Pool,
    /// Everything the school's teachers used of this service this cycle.
    pub used_units: u64,
}

/// One `teacher_ai_allocations` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRow {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub slice: Slice,
    pub cycle_start_ms: TimestampMs,
}

/// One `ai_usage_logs` row: a usage decision written to the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub wal_seq: u64,
    pub event_id: Option<String>,
    pub reservation_id: Option<String>,
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
    pub service: ServiceType,
    pub units: u64,
    pub borrowed_units: u64,
    pub overage_units: u64,
    pub model: String,
    /// `allowed`, `committed`, or the deny reason.
    pub decision: &'static str,
    pub cycle_start_ms: TimestampMs,
    pub occurred_at_ms: TimestampMs,
    pub recorded_at_ms: TimestampMs,
}

impl UsageRow {
    /// The row a record makes, if it is a usage decision.
    pub fn from_record(wal_seq: u64, record: &Record) -> Option<Self> {
        match record {
            Record::UsageCharged(usage) => {
                let (event_id, reservation_id, decision) = match &usage.source {
                    UsageSource::Event(id) => (Some(id.as_str().to_owned()), None, "allowed"),
                    UsageSource::Reservation { id, .. } => {
                        (None, Some(id.as_str().to_owned()), "committed")
                    }
                };
                Some(Self {
                    wal_seq,
                    event_id,
                    reservation_id,
                    school_id: usage.school_id.clone(),
                    teacher_id: usage.teacher_id.clone(),
                    service: usage.service.clone(),
                    units: usage.units,
                    borrowed_units: usage.borrowed_units,
                    overage_units: usage.overage_units,
                    model: usage.model.to_string(),
                    decision,
                    cycle_start_ms: usage.cycle_start_ms,
                    occurred_at_ms: usage.occurred_at_ms,
                    recorded_at_ms: usage.recorded_at_ms,
                })
            }
            Record::UsageDenied {
                school_id,
                teacher_id,
                service,
                event_id,
                reason,
                occurred_at_ms,
                cycle_start_ms,
                recorded_at_ms,
            } => Some(Self {
                wal_seq,
                event_id: Some(event_id.as_str().to_owned()),
                reservation_id: None,
                school_id: school_id.clone(),
                teacher_id: teacher_id.clone(),
                service: service.clone(),
                // A denial charges nothing; the units asked are not kept.
                units: 0,
                borrowed_units: 0,
                overage_units: 0,
                model: String::new(),
                decision: reason.as_str(),
                cycle_start_ms: *cycle_start_ms,
                occurred_at_ms: *occurred_at_ms,
                recorded_at_ms: *recorded_at_ms,
            }),
            _ => None,
        }
    }
}

/// Everything one snapshot transaction writes.
#[derive(Debug, Default)]
pub struct Delta {
    /// The WAL position the snapshot covers: every record up to it is in.
    pub wal_seq: u64,
    pub subscriptions: Vec<SubscriptionRow>,
    /// Teachers whose allocation rows are replaced (a removed slice loses its row).
    pub teachers: Vec<(SchoolId, TeacherId)>,
    pub allocations: Vec<AllocationRow>,
    pub requests: Vec<(SchoolId, IncreaseRequest)>,
    pub history: Vec<(SchoolId, AuditEntry)>,
    pub usage: Vec<UsageRow>,
    /// Set when the usage rows were not kept in memory: the writer reads the
    /// WAL records in `(after, through]` and writes their rows instead.
    pub usage_from_wal: Option<(u64, u64)>,
    /// A school's state without its audit trail (the trail is in the audit table).
    pub school_states: Vec<(SchoolId, Vec<u8>)>,
    pub account_states: Vec<(SchoolId, TeacherId, Vec<u8>)>,
}

impl Delta {
    pub fn rows(&self) -> usize {
        self.subscriptions.len()
            + self.allocations.len()
            + self.requests.len()
            + self.history.len()
            + self.usage.len()
            + self.school_states.len()
            + self.account_states.len()
    }
}

/// Usage rows kept in memory between two snapshots (about 200 bytes each).
/// While Postgres is down they would pile up without end; beyond this many
/// they are dropped and the delta reads them from the WAL instead.
pub const USAGE_ROWS_IN_MEMORY_MAX: usize = 200_000;

/// What changed since the last snapshot was handed to the writer.
#[derive(Debug, Default)]
pub struct Changes {
    schools: BTreeSet<SchoolId>,
    accounts: BTreeSet<(SchoolId, TeacherId)>,
    requests: BTreeSet<(SchoolId, u64)>,
    usage: Vec<UsageRow>,
    /// Set when more usage rows arrived than are kept in memory: they are
    /// then read back from the WAL (which keeps every record after the last
    /// snapshot) when the delta is written. See [`USAGE_ROWS_IN_MEMORY_MAX`].
    usage_in_wal_only: bool,
    /// Per school, the audit entries already handed over.
    history_written: HashMap<SchoolId, u64>,
}

impl Changes {
    /// Nothing changed yet; `history_written` says how much of each school's
    /// trail Postgres already holds.
    pub fn new(history_written: HashMap<SchoolId, u64>) -> Self {
        Self {
            history_written,
            ..Self::default()
        }
    }

    /// Every school, teacher and request of `state` marked changed: used when
    /// Postgres is behind the local state (a first run with Postgres, or one
    /// after quotad ran without it).
    pub fn everything(state: &State, history_written: HashMap<SchoolId, u64>) -> Self {
        let mut changes = Self::new(history_written);
        for (id, school) in &state.schools {
            changes.schools.insert(id.clone());
            for request_id in school.requests.keys() {
                changes.requests.insert((id.clone(), *request_id));
            }
        }
        changes.accounts.extend(state.accounts.keys().cloned());
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.schools.is_empty() && self.usage.is_empty() && !self.usage_in_wal_only
    }

    /// Whether the next delta's usage rows must be read from the WAL.
    pub fn usage_in_wal_only(&self) -> bool {
        self.usage_in_wal_only
    }

    /// The usage rows of the next delta are to be read from the WAL: for a
    /// catch-up, whose records may be far too many to hold.
    pub fn take_usage_from_wal(&mut self) {
        self.usage = Vec::new();
        self.usage_in_wal_only = true;
    }

    /// Adds the usage row of a record whose other changes are already noted.
    fn add_usage(&mut self, wal_seq: u64, record: &Record) {
        if self.usage_in_wal_only {
            return;
        }
        if let Some(row) = UsageRow::from_record(wal_seq, record) {
            if self.usage.len() >= USAGE_ROWS_IN_MEMORY_MAX {
                self.take_usage_from_wal();
                return;
            }
            self.usage.push(row);
        }
    }

    /// Notes a record just applied to `state` at `wal_seq`.
    pub fn note(&mut self, wal_seq: u64, record: &Record, state: &State) {
        let school_id = record.school_id().clone();
        self.add_usage(wal_seq, record);
        if let Some(teacher_id) = record.teacher_id() {
            self.accounts
                .insert((school_id.clone(), teacher_id.clone()));
        }
        match record {
            Record::AllocationsSet { slices, .. } => {
                for slice in slices {
                    self.accounts
                        .insert((school_id.clone(), slice.teacher_id.clone()));
                }
            }
            // These change every account of the school (its cycle or anchor).
            Record::CycleRolledOver { .. } | Record::SettingsSet { .. } => {
                for account in state.accounts_of(&school_id) {
                    self.accounts
                        .insert((school_id.clone(), account.teacher_id.clone()));
                }
            }
            Record::RequestFiled { request_id, .. } | Record::RequestDecided { request_id, .. } => {
                self.requests.insert((school_id.clone(), *request_id));
            }
            Record::AllocationSet {
                grant: Some(grant), ..
            } => {
                self.requests.insert((school_id.clone(), grant.request_id));
            }
            _ => {}
        }
        self.schools.insert(school_id);
    }

    /// The rows of everything changed, as of `wal_seq` (the position `state`
    /// is at); the changes start over empty. On an error nothing is taken:
    /// the changes stay for the next try.
    pub fn take(&mut self, state: &mut State, wal_seq: u64) -> Result<Delta, StorageError> {
        let mut delta = Delta {
            wal_seq,
            ..Delta::default()
        };
        let mut history_written = Vec::new();
        for school_id in &self.schools {
            let Some(school) = state.schools.get_mut(school_id) else {
                continue;
            };
            let written = self.history_written.get(school_id).copied().unwrap_or(0);
            delta.history.extend(
                school
                    .history
                    .entries()
                    .iter()
                    .filter(|e| e.seq > written)
                    .map(|e| (school_id.clone(), e.clone())),
            );
            history_written.push((school_id.clone(), school.history.len() as u64));
            delta
                .school_states
                .push((school_id.clone(), encode_without_history(school)?));
        }
        for school_id in delta.school_states.iter().map(|(id, _)| id) {
            if let Some(school) = state.schools.get(school_id) {
                delta.subscriptions.extend(subscriptions(school, state)?);
            }
        }
        for (school_id, teacher_id) in &self.accounts {
            let Some(account) = state.accounts.get(&(school_id.clone(), teacher_id.clone())) else {
                continue;
            };
            for (service, slice) in &account.slices {
                delta.allocations.push(AllocationRow {
                    school_id: school_id.clone(),
                    teacher_id: teacher_id.clone(),
                    service: service.clone(),
                    slice: slice.clone(),
                    cycle_start_ms: account.cycle_start_ms,
                });
            }
            delta.account_states.push((
                school_id.clone(),
                teacher_id.clone(),
                codec::encode(account)?,
            ));
            delta.teachers.push((school_id.clone(), teacher_id.clone()));
        }
        for (school_id, request_id) in &self.requests {
            if let Some(request) = state
                .schools
                .get(school_id)
                .and_then(|s| s.requests.get(request_id))
            {
                delta.requests.push((school_id.clone(), request.clone()));
            }
        }
        // Everything that could fail is done: now the changes are taken.
        delta.usage = std::mem::take(&mut self.usage);
        self.usage_in_wal_only = false;
        self.schools.clear();
        self.accounts.clear();
        self.requests.clear();
        self.history_written.extend(history_written);
        Ok(delta)
    }
}

/// Encodes a school without its audit trail, which has its own table: the
/// trail only grows, and writing all of it on every change would make each
/// snapshot as large as the school's whole history.
fn encode_without_history(school: &mut SchoolState) -> Result<Vec<u8>, StorageError> {
    let history = std::mem::take(&mut school.history);
    let encoded = codec::encode(&*school);
    school.history = history;
    encoded
}

/// Puts a school decoded from `quotad_school_state` back together with its trail.
pub fn decode_school(bytes: &[u8], history: AuditTrail) -> Result<SchoolState, StorageError> {
    let mut school: SchoolState = codec::decode(bytes)?;
    school.history = history;
    Ok(school)
}

fn subscriptions(
    school: &SchoolState,
    state: &State,
) -> Result<Vec<SubscriptionRow>, StorageError> {
    let cycle = school
        .cycle()
        .map_err(|e| StorageError::Codec(format!("school {}: {e}", school.config.id)))?;
    let mut used: HashMap<&ServiceType, u64> = HashMap::new();
    for account in state.accounts_of(&school.config.id) {
        for (service, slice) in &account.slices {
            let total = used.entry(service).or_default();
            *total = total.saturating_add(slice.total_used_units());
        }
    }
    Ok(school
        .pools
        .iter()
        .map(|(service, pool)| SubscriptionRow {
            school_id: school.config.id.clone(),
            service: service.clone(),
            school_name: school.config.name.to_string(),
            tier: school.config.tier.as_str(),
            anchor_day: anchor_day(school.config.anchor.day()),
            next_anchor_day: school.next_anchor.map(|a| anchor_day(a.day())),
            borrowing_enabled: school.config.borrowing_enabled,
            self_service_requests: school.config.self_service_requests,
            cycle,
            pool: *pool,
            used_units: used.get(service).copied().unwrap_or(0),
        })
        .collect())
}

fn anchor_day(day: u32) -> i16 {
    // An anchor day is 1..=28.
    i16::try_from(day).unwrap_or(i16::MAX)
}

#[cfg(test)]
mod tests;
