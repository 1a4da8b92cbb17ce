//! One school's pools and the rules of every call on them. It alone changes
//! the pooled totals (cycle units, the sum of slices, what was lent) and it
//! decides the billing cycle, which it publishes in a [`CycleCell`] for its
//! teachers. It never waits for a teacher: teachers wait for it.

use std::sync::Arc;

use super::teacher::Frozen;
use super::{CycleCell, Env, SchoolAnswer, SchoolAsk, SliceChange};
use crate::engine::messages::{FileRequest, Reply, SetPool, UpdateSettings};
use crate::engine::views::Durable;
use crate::engine::EngineError;
use quotad_core::school::SYSTEM_ACTOR;
use quotad_core::{
    check_bulk_floor, Change, Grant, IncreaseRequest, Record, RequestOutcome, RuleError,
    SchoolState, ServiceType, SliceSet, SliceTerms, TeacherId,
};

#[derive(Debug, Clone)]
pub struct SchoolMachine {
    pub school: SchoolState,
    cycle: Arc<CycleCell>,
}

impl SchoolMachine {
    pub fn new(school: SchoolState) -> Self {
        let cycle = CycleCell::new(school.cycle_info());
        Self { school, cycle }
    }

    /// The cell this school's teachers follow.
    pub fn cycle_cell(&self) -> Arc<CycleCell> {
        self.cycle.clone()
    }

    fn write(&mut self, env: &Env, record: &Record) -> Reply<u64> {
        let wal_seq = env.journal.append(record)?;
        self.school.apply(record);
        // After the record: a teacher that follows the cell never gets ahead
        // of what the log says.
        self.cycle.set(self.school.cycle_info());
        Ok(wal_seq)
    }

    /// Starts the new cycle when the anchor has passed and records it. Every
    /// call that decides anything starts here, so the school is never in an
    /// older cycle than a teacher that asks it (the clock never goes back:
    /// `engine::Clock`). Returns whether it rolled.
    pub fn roll_if_due(&mut self, env: &Env) -> Reply<bool> {
        let Some(cycle) = self.school.due_cycle(env.now_ms)? else {
            return Ok(false);
        };
        let record = Record::CycleRolledOver {
            school_id: self.school.config.id.clone(),
            from_start_ms: self.school.cycle_start_ms,
            to_start_ms: cycle.start_ms,
            at_ms: env.now_ms,
        };
        self.write(env, &record)?;
        Ok(true)
    }

    /// Pending requests older than a week expire; each expiry is recorded.
    pub fn expire_requests(&mut self, env: &Env) -> Reply<()> {
        for request_id in self.school.due_expiries(env.now_ms) {
            let record = Record::RequestDecided {
                school_id: self.school.config.id.clone(),
                request_id,
                outcome: RequestOutcome::Expired,
                change: Change {
                    by: Arc::from(SYSTEM_ACTOR),
                    reason: Arc::from("no decision within 7 days"),
                    at_ms: env.now_ms,
                },
            };
            self.write(env, &record)?;
        }
        Ok(())
    }

    fn slice_terms(&self, teacher_id: &TeacherId, service: &ServiceType) -> Reply<SliceTerms> {
        self.school
            .slices
            .get(&(teacher_id.clone(), service.clone()))
            .copied()
            .ok_or_else(|| {
                EngineError::Rule(RuleError::not_found(format!(
                    "teacher {teacher_id} has no {service} slice"
                )))
            })
    }

    fn request(&self, request_id: u64) -> Reply<IncreaseRequest> {
        self.school
            .requests
            .get(&request_id)
            .cloned()
            .ok_or_else(|| {
                EngineError::Internal(format!("request {request_id} just written is missing"))
            })
    }

    /// Answers a teacher that waits for it.
    pub fn answer(&mut self, ask: SchoolAsk, env: &Env) -> Reply<SchoolAnswer> {
        self.roll_if_due(env)?;
        match ask {
            SchoolAsk::SliceChange {
                teacher_id,
                service,
                change,
                audit,
                managed,
            } => {
                let record = self.slice_record(teacher_id, service, change, audit, managed)?;
                Ok(SchoolAnswer::Written(self.write(env, &record)?, record))
            }
            SchoolAsk::ChargeBorrowed(record) => self.charge_borrowed(record, env),
            SchoolAsk::CanLend { service, units } => Ok(SchoolAnswer::CanLend(
                self.school.can_borrow(&service, units),
            )),
        }
    }

    fn charge_borrowed(&mut self, record: Record, env: &Env) -> Reply<SchoolAnswer> {
        let Record::UsageCharged(usage) = &record else {
            return Err(EngineError::Internal(format!(
                "a loan was asked with a {} record",
                record.kind()
            )));
        };
        if usage.cycle_start_ms != self.school.cycle_start_ms {
            // The cycle rolled between the teacher's decision and this one:
            // its usage figures are the old cycle's. Nothing is written, so
            // the caller's retry decides afresh in the new cycle.
            return Err(EngineError::Unavailable(
                "the billing cycle rolled over during the call; retry it".into(),
            ));
        }
        if !self.school.can_borrow(&usage.service, usage.borrowed_units) {
            return Ok(SchoolAnswer::Refused);
        }
        Ok(SchoolAnswer::Written(self.write(env, &record)?, record))
    }

    fn slice_record(
        &self,
        teacher_id: TeacherId,
        service: ServiceType,
        change: SliceChange,
        audit: Change,
        managed: bool,
    ) -> Reply<Record> {
        if managed {
            self.school.config.check_managed()?;
        }
        let (school_id, cycle_start_ms) =
            (self.school.config.id.clone(), self.school.cycle_start_ms);
        Ok(match change {
            SliceChange::Set {
                allocated_units,
                priority,
                auto_renew,
                grant,
            } => {
                if let Some(grant) = grant {
                    let request = self.school.pending_request(grant.request_id)?;
                    if request.teacher_id != teacher_id || request.service != service {
                        return Err(EngineError::Internal(format!(
                            "request {} is not for this slice",
                            grant.request_id
                        )));
                    }
                }
                self.school
                    .check_allocation(&teacher_id, &service, allocated_units)?;
                Record::AllocationSet {
                    school_id,
                    teacher_id,
                    service,
                    allocated_units,
                    priority,
                    auto_renew,
                    cycle_start_ms,
                    change: audit,
                    grant,
                }
            }
            SliceChange::Status(status) => {
                self.slice_terms(&teacher_id, &service)?;
                Record::AllocationStatusSet {
                    school_id,
                    teacher_id,
                    service,
                    status,
                    cycle_start_ms,
                    change: audit,
                }
            }
            SliceChange::Remove => {
                self.slice_terms(&teacher_id, &service)?;
                Record::AllocationRemoved {
                    school_id,
                    teacher_id,
                    service,
                    cycle_start_ms,
                    change: audit,
                }
            }
        })
    }

    /// The second half of a bulk change, with every teacher it names frozen:
    /// each slice fits above what its teacher used and holds, and the pools
    /// hold the new sums; then one record sets them all. Returns its position
    /// and each teacher's part, for the teachers to apply as they thaw.
    pub fn bulk_set(
        &mut self,
        slices: Vec<SliceSet>,
        change: Change,
        frozen: &[Frozen],
        env: &Env,
    ) -> Reply<(u64, Vec<(TeacherId, Record)>)> {
        self.roll_if_due(env)?;
        self.school.config.check_managed()?;
        self.school.check_allocations(&slices)?;
        for (i, slice) in slices.iter().enumerate() {
            let teacher = frozen
                .iter()
                .find(|f| f.teacher_id == slice.teacher_id)
                .ok_or_else(|| {
                    EngineError::Internal(format!(
                        "teacher {} was not frozen for the bulk change",
                        slice.teacher_id
                    ))
                })?;
            // Counted in the teacher's cycle: if the school rolled since, the
            // new cycle's usage is smaller, so the floor is only stricter.
            let floor = teacher.floors.get(&slice.service).copied().unwrap_or(0);
            check_bulk_floor(i + 1, slice, floor)?;
        }
        let record = Record::AllocationsSet {
            school_id: self.school.config.id.clone(),
            slices,
            cycle_start_ms: self.school.cycle_start_ms,
            change,
        };
        let wal_seq = self.write(env, &record)?;
        Ok((
            wal_seq,
            record.allocations_per_teacher().into_iter().collect(),
        ))
    }

    pub fn update_settings(&mut self, msg: UpdateSettings, env: &Env) -> Reply<u64> {
        // Roll first: a new anchor never moves a boundary that has passed.
        self.roll_if_due(env)?;
        let record = Record::SettingsSet {
            school_id: self.school.config.id.clone(),
            name: msg.name,
            borrowing_enabled: msg.borrowing_enabled,
            self_service_requests: msg.self_service_requests,
            next_anchor: msg.next_anchor,
            change: msg.change,
        };
        self.write(env, &record)
    }

    pub fn file_request(&mut self, msg: FileRequest, env: &Env) -> Reply<Durable<IncreaseRequest>> {
        let request_id =
            self.school
                .check_file_request(&msg.teacher_id, &msg.service, msg.units, env.limits)?;
        let record = Record::RequestFiled {
            school_id: self.school.config.id.clone(),
            request_id,
            teacher_id: msg.teacher_id,
            service: msg.service,
            units: msg.units,
            change: msg.change,
        };
        let wal_seq = self.write(env, &record)?;
        Ok(Durable::written(self.request(request_id)?, wal_seq))
    }

    /// Validates an approval and says whose slice gets how many units.
    pub fn prepare_grant(
        &self,
        request_id: u64,
        units: u64,
    ) -> Reply<(TeacherId, ServiceType, Grant)> {
        let request = self.school.pending_request(request_id)?;
        let units = SchoolState::grant_units(request, units)?;
        Ok((
            request.teacher_id.clone(),
            request.service.clone(),
            Grant {
                request_id: request.id,
                units,
            },
        ))
    }

    pub fn reject_request(
        &mut self,
        request_id: u64,
        change: Change,
        env: &Env,
    ) -> Reply<Durable<IncreaseRequest>> {
        self.school.pending_request(request_id)?;
        let record = Record::RequestDecided {
            school_id: self.school.config.id.clone(),
            request_id,
            outcome: RequestOutcome::Rejected,
            change,
        };
        let wal_seq = self.write(env, &record)?;
        Ok(Durable::written(self.request(request_id)?, wal_seq))
    }

    pub fn set_pool(&mut self, msg: SetPool, env: &Env) -> Reply<u64> {
        self.roll_if_due(env)?;
        self.school
            .check_set_pool(&msg.service, msg.cycle_units, env.limits)?;
        let record = Record::PoolSet {
            school_id: self.school.config.id.clone(),
            service: msg.service,
            cycle_units: msg.cycle_units,
            cycle_start_ms: self.school.cycle_start_ms,
            change: msg.change,
        };
        self.write(env, &record)
    }
}
