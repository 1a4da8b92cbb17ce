//! One teacher's account and the rules of every call on it. It alone
//! changes the account; its terms change only while it waits for its school
//! (a slice change it asked for, or a bulk change it is frozen for), so the
//! terms it enforces are never older than the school's: see
//! `docs/protocol.md`.
//!
//! A change answered from memory (a retried event, a second commit or
//! release, a synced event that is a duplicate or rejected) may rest on a
//! record still in flight: the account is applied before its record is
//! durable. Such an answer waits for the last record the account reflects
//! ([`TeacherMachine::told_from_memory`]), so that nothing told "already
//! done" can be undone by a crash. Reads (Check, GetUsage) show the latest
//! state and do not wait: they tell nobody that a change happened.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{CycleCell, Env, SchoolAnswer, SchoolAsk, SliceChange};
use crate::engine::messages::{
    Check, CheckPreviews, Commit, CommitResult, Consume, GrantIncrease, KeptTerms, Release,
    RemoveSlice, Reply, Reserve, SetAllocation, SetStatus,
};
use crate::engine::views::{AllocationView, Decision, Durable, UsageView};
use crate::engine::EngineError;
use quotad_core::{
    Change, CommitStep, DenyReason, EventEntry, Gate, HoldState, Record, Reservation, RuleError,
    ServiceType, Slice, Step, SyncEvent, SyncOutcome, SyncStep, TeacherAccount, TeacherId,
    TimestampMs,
};

/// How often idle ids are pruned, at most.
const PRUNE_INTERVAL_MS: i64 = 60_000;

/// What a slice change that leaves priority or auto-renew out keeps of `slice`.
fn kept_terms(slice: &Slice) -> KeptTerms {
    KeptTerms {
        priority: slice.priority,
        auto_renew: slice.auto_renew,
    }
}

/// How a call finishes once the school has answered its ask.
pub type Resume<T> =
    Box<dyn FnOnce(&mut TeacherMachine, Reply<SchoolAnswer>, &Env) -> Reply<T> + Send>;

/// A call's first half: answered, or waiting for the school.
pub enum Started<T> {
    Done(T),
    Ask(SchoolAsk, Resume<T>),
}

/// What a teacher frozen for a bulk change tells the school: the least each
/// of its slices may shrink to (used + held, or its units if fewer), in the
/// cycle it counted them, and each slice's priority and auto-renew, which an
/// entry that leaves them out keeps
/// ([`crate::engine::messages::resolve_bulk`]). Frozen, the teacher changes
/// neither until the school has decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    pub teacher_id: TeacherId,
    pub cycle_start_ms: TimestampMs,
    pub floors: BTreeMap<ServiceType, u64>,
    pub terms: BTreeMap<ServiceType, KeptTerms>,
}

#[derive(Debug, Clone)]
pub struct TeacherMachine {
    pub account: TeacherAccount,
    cycle: Arc<CycleCell>,
    last_prune_ms: TimestampMs,
    /// The last WAL position the account changed at since start (written
    /// here or by the school): what an answer from memory waits for. What
    /// recovery applied is durable already, so 0 at start.
    last_seq: u64,
}

impl TeacherMachine {
    pub fn new(account: TeacherAccount, cycle: Arc<CycleCell>) -> Self {
        Self {
            account,
            cycle,
            last_prune_ms: 0,
            last_seq: 0,
        }
    }

    /// Appends a record and applies it. The WAL position is taken before the
    /// state changes, so a refused append changes nothing.
    fn write(&mut self, env: &Env, record: &Record) -> Reply<u64> {
        let wal_seq = env.journal.append(record)?;
        self.apply(wal_seq, record);
        Ok(wal_seq)
    }

    /// Applies a record written here or by the school.
    pub fn apply(&mut self, wal_seq: u64, record: &Record) {
        self.account.apply(wal_seq, record);
        self.last_seq = self.last_seq.max(wal_seq);
    }

    /// An answer read from the account, told once every record the account
    /// reflects is durable (a flush in flight, at most; usually none).
    fn told_from_memory<T>(&self, value: T) -> Durable<T> {
        Durable::written(value, self.last_seq)
    }

    /// True when the teacher rolled by the clock before its school did: the
    /// actor then nudges the school (which also rolls on its own timer).
    pub fn ahead_of_school(&self) -> bool {
        self.account.cycle_start_ms > self.cycle.get().start_ms
    }

    /// What is due before any call: the school's cycle, expired holds.
    pub fn housekeep(&mut self, env: &Env) -> Reply<()> {
        self.account.follow(self.cycle.get(), env.now_ms)?;
        for record in self.account.expiry_records(env.now_ms) {
            self.write(env, &record)?;
        }
        Ok(())
    }

    /// The timer's call: housekeeping, and forgetting ids past the window.
    pub fn tick(&mut self, env: &Env) -> Reply<()> {
        let done = self.housekeep(env);
        if env.now_ms - self.last_prune_ms >= PRUNE_INTERVAL_MS {
            self.account.prune(env.now_ms, env.limits);
            self.last_prune_ms = env.now_ms;
        }
        done
    }

    fn decision(
        &self,
        service: &ServiceType,
        allowed: bool,
        reason: Option<DenyReason>,
        units: u64,
    ) -> Decision {
        Decision {
            allowed,
            reason,
            remaining_units: self.account.remaining_units(service),
            borrowed_units: 0,
            duplicate: false,
            message: reason
                .map(|r| self.account.explain(service, r, units))
                .unwrap_or_default(),
            allocated_units: self
                .account
                .slices
                .get(service)
                .map_or(0, |slice| slice.allocated_units),
            // An account's cycle is always one its anchor can give; 0 (an
            // unknown end) only if that ever changed.
            cycle_end_ms: self.account.cycle().map_or(0, |cycle| cycle.end_ms),
        }
    }

    pub fn consume(&mut self, msg: Consume, env: &Env) -> Reply<Started<Durable<Decision>>> {
        self.housekeep(env)?;
        let occurred_at_ms = env
            .limits
            .check_event_time(msg.occurred_at_ms, env.now_ms)?;
        let gate = match self
            .account
            .begin_consume(&msg.service, msg.units, &msg.event_id)?
        {
            Step::Duplicate(entry) => return Ok(Started::Done(self.repeat(&msg, entry))),
            Step::Decide(gate) => gate,
        };
        if !matches!(gate, Gate::Allow { borrow, .. } if borrow > 0) {
            let decided = self.finish_consume(&msg, gate, false, occurred_at_ms, env)?;
            return Ok(Started::Done(decided));
        }
        let record = self.account.consume_record(
            &msg.service,
            msg.units,
            &msg.event_id,
            gate,
            true,
            occurred_at_ms,
            env.now_ms,
            &msg.model,
        );
        let resume: Resume<Durable<Decision>> = Box::new(move |act, answer, env| {
            act.finish_borrowed(&msg, gate, occurred_at_ms, answer, env)
        });
        Ok(Started::Ask(SchoolAsk::ChargeBorrowed(record), resume))
    }

    fn repeat(&self, msg: &Consume, entry: EventEntry) -> Durable<Decision> {
        let mut decision = self.decision(&msg.service, entry.allowed, entry.reason, msg.units);
        decision.borrowed_units = entry.borrowed_units;
        decision.duplicate = true;
        self.told_from_memory(decision)
    }

    /// The school wrote the borrowed usage, or could not lend: then the
    /// consume is denied here. An error (the school failed) writes nothing,
    /// so a retry decides afresh.
    fn finish_borrowed(
        &mut self,
        msg: &Consume,
        gate: Gate,
        occurred_at_ms: TimestampMs,
        answer: Reply<SchoolAnswer>,
        env: &Env,
    ) -> Reply<Durable<Decision>> {
        match answer? {
            SchoolAnswer::Written(wal_seq, record) => {
                self.apply(wal_seq, &record);
                Ok(Durable::written(self.charged(msg, &record)?, wal_seq))
            }
            SchoolAnswer::Refused => self.finish_consume(msg, gate, false, occurred_at_ms, env),
            other => Err(EngineError::Internal(format!(
                "the school answered a loan with {other:?}"
            ))),
        }
    }

    fn finish_consume(
        &mut self,
        msg: &Consume,
        gate: Gate,
        borrow_granted: bool,
        occurred_at_ms: TimestampMs,
        env: &Env,
    ) -> Reply<Durable<Decision>> {
        let record = self.account.consume_record(
            &msg.service,
            msg.units,
            &msg.event_id,
            gate,
            borrow_granted,
            occurred_at_ms,
            env.now_ms,
            &msg.model,
        );
        let wal_seq = self.write(env, &record)?;
        Ok(Durable::written(self.charged(msg, &record)?, wal_seq))
    }

    /// The decision a consume's record stands for.
    fn charged(&self, msg: &Consume, record: &Record) -> Reply<Decision> {
        match record {
            Record::UsageCharged(usage) => {
                let mut decision = self.decision(&msg.service, true, None, msg.units);
                decision.borrowed_units = usage.borrowed_units;
                Ok(decision)
            }
            Record::UsageDenied { reason, .. } => {
                Ok(self.decision(&msg.service, false, Some(*reason), msg.units))
            }
            other => Err(EngineError::Internal(format!(
                "a consume produced a {} record",
                other.kind()
            ))),
        }
    }

    /// The answer the call Check previews would give now, charging nothing.
    pub fn check(&mut self, msg: Check, env: &Env) -> Reply<Started<Decision>> {
        self.housekeep(env)?;
        let gate = match msg.previews {
            CheckPreviews::Consume => self.account.gate(&msg.service, msg.units)?,
            CheckPreviews::Reserve => {
                self.account
                    .hold_gate(&msg.service, msg.units, env.limits)?
            }
        };
        let borrow = match gate {
            Gate::Deny(reason) => {
                let denied = self.decision(&msg.service, false, Some(reason), msg.units);
                return Ok(Started::Done(denied));
            }
            Gate::Allow { borrow: 0, .. } => {
                return Ok(Started::Done(self.decision(
                    &msg.service,
                    true,
                    None,
                    msg.units,
                )))
            }
            Gate::Allow { borrow, .. } => borrow,
        };
        let ask = SchoolAsk::CanLend {
            service: msg.service.clone(),
            units: borrow,
        };
        let resume: Resume<Decision> = Box::new(move |act, answer, _| {
            let could = matches!(answer?, SchoolAnswer::CanLend(true));
            let reason = (!could).then_some(DenyReason::Exhausted);
            let mut decision = act.decision(&msg.service, could, reason, msg.units);
            decision.borrowed_units = if could { borrow } else { 0 };
            Ok(decision)
        });
        Ok(Started::Ask(ask, resume))
    }

    /// The answer to a Reserve of `asked_units`, from the hold it made. A
    /// denied hold keeps no units, so its explanation names what the call
    /// (or its retry, which asks the same) asked for.
    fn reservation_decision(
        &self,
        reservation: &Reservation,
        asked_units: u64,
    ) -> (Decision, TimestampMs) {
        match reservation.state {
            HoldState::Denied(reason) => (
                self.decision(&reservation.service, false, Some(reason), asked_units),
                0,
            ),
            _ => (
                self.decision(&reservation.service, true, None, reservation.units),
                reservation.expires_at_ms,
            ),
        }
    }

    pub fn reserve(
        &mut self,
        Reserve(request): Reserve,
        env: &Env,
    ) -> Reply<Durable<(Decision, TimestampMs)>> {
        self.housekeep(env)?;
        let step = self.account.begin_reserve(
            &request.service,
            request.units,
            &request.reservation_id,
            env.limits,
        )?;
        match step {
            Step::Duplicate(reservation) => {
                let (mut decision, expires_at_ms) =
                    self.reservation_decision(&reservation, request.units);
                decision.duplicate = true;
                Ok(self.told_from_memory((decision, expires_at_ms)))
            }
            Step::Decide(gate) => {
                let record = self.account.reserve_record(&request, gate, env.now_ms);
                let wal_seq = self.write(env, &record)?;
                let reservation = self
                    .account
                    .reservations
                    .get(&request.reservation_id)
                    .ok_or_else(|| EngineError::Internal("a hold just written is gone".into()))?;
                Ok(Durable::written(
                    self.reservation_decision(reservation, request.units),
                    wal_seq,
                ))
            }
        }
    }

    pub fn commit(&mut self, msg: Commit, env: &Env) -> Reply<Durable<CommitResult>> {
        self.housekeep(env)?;
        let step = self
            .account
            .begin_commit(&msg.reservation_id, msg.actual_units, env.now_ms)?;
        let (outcome, duplicate) = match step {
            CommitStep::Duplicate { outcome, .. } => (outcome, true),
            CommitStep::Charge(record) => {
                self.write(env, &record)?;
                match self
                    .account
                    .reservations
                    .get(&msg.reservation_id)
                    .map(|r| r.state)
                {
                    Some(HoldState::Committed(outcome)) => (outcome, false),
                    other => {
                        return Err(EngineError::Internal(format!(
                            "a commit left the reservation {other:?}"
                        )))
                    }
                }
            }
        };
        let remaining_units = self
            .account
            .reservations
            .get(&msg.reservation_id)
            .map_or(0, |r| self.account.remaining_units(&r.service));
        // A new commit's record is the last one written; a duplicate's may
        // still be in flight: either way, wait for the last.
        Ok(self.told_from_memory(CommitResult {
            outcome,
            duplicate,
            remaining_units,
        }))
    }

    pub fn release(&mut self, msg: Release, env: &Env) -> Reply<Durable<u64>> {
        self.housekeep(env)?;
        // A hold already ended (released, expired, committed) may have ended
        // by a record still in flight.
        let Some(record) = self.account.release_record(&msg.reservation_id, env.now_ms) else {
            return Ok(self.told_from_memory(0));
        };
        let units = self
            .account
            .reservations
            .get(&msg.reservation_id)
            .map_or(0, |r| r.units);
        Ok(Durable::written(units, self.write(env, &record)?))
    }

    pub fn usage(&mut self, env: &Env) -> Reply<UsageView> {
        self.housekeep(env)?;
        Ok(UsageView {
            school_id: self.account.school_id.clone(),
            teacher_id: self.account.teacher_id.clone(),
            services: self.account.usage(),
            cycle: self.account.cycle()?,
        })
    }

    /// Appends every record of the batch before anyone waits, so that one
    /// group commit covers them all instead of one flush per event. The
    /// answer waits for the last record the account reflects: the batch's
    /// own, and whatever a duplicate or a rejection rests on.
    pub fn sync(&mut self, events: &[SyncEvent], env: &Env) -> Reply<Durable<Vec<SyncOutcome>>> {
        self.housekeep(env)?;
        let outcomes = events
            .iter()
            .map(|event| self.sync_one(event, env))
            .collect::<Reply<Vec<_>>>()?;
        Ok(self.told_from_memory(outcomes))
    }

    fn sync_one(&mut self, event: &SyncEvent, env: &Env) -> Reply<SyncOutcome> {
        match self.account.sync_step(event, env.limits, env.now_ms) {
            SyncStep::Duplicate(_) => Ok(SyncOutcome::Duplicate),
            SyncStep::Reject(outcome) => Ok(outcome),
            SyncStep::Charge(usage) => {
                let outcome = SyncOutcome::of_charge(&usage);
                self.write(env, &Record::UsageCharged(usage))?;
                Ok(outcome)
            }
        }
    }

    /// Asks the school to record a change of one of this teacher's slices;
    /// the teacher applies the record the school wrote.
    fn change_slice(
        &self,
        service: ServiceType,
        change: SliceChange,
        audit: Change,
        managed: bool,
    ) -> Started<Durable<AllocationView>> {
        let ask = SchoolAsk::SliceChange {
            teacher_id: self.account.teacher_id.clone(),
            service: service.clone(),
            change,
            audit,
            managed,
        };
        Started::Ask(
            ask,
            Box::new(move |act, answer, _| match answer? {
                SchoolAnswer::Written(wal_seq, record) => {
                    act.apply(wal_seq, &record);
                    // The view shows usage too, which may rest on records of
                    // this teacher still in flight.
                    Ok(act.told_from_memory(AllocationView::of(&act.account, &service)))
                }
                other => Err(EngineError::Internal(format!(
                    "the school answered a slice change with {other:?}"
                ))),
            }),
        )
    }

    /// The slice, or NOT_FOUND.
    fn slice(&self, service: &ServiceType) -> Reply<&Slice> {
        self.account.slices.get(service).ok_or_else(|| {
            EngineError::Rule(RuleError::not_found(format!(
                "teacher {} has no {service} slice",
                self.account.teacher_id
            )))
        })
    }

    /// Shrinking is the teacher's decision: only it knows what it used and
    /// holds, and it answers nothing else until the school has recorded the
    /// change.
    pub fn set_allocation(
        &mut self,
        msg: SetAllocation,
        env: &Env,
    ) -> Reply<Started<Durable<AllocationView>>> {
        self.housekeep(env)?;
        self.account
            .check_shrink(&msg.service, msg.allocated_units)?;
        let current = self.account.slices.get(&msg.service).map(kept_terms);
        let terms = KeptTerms::after(current, msg.priority, msg.auto_renew);
        let change = SliceChange::Set {
            allocated_units: msg.allocated_units,
            priority: terms.priority,
            auto_renew: terms.auto_renew,
            grant: None,
        };
        Ok(self.change_slice(msg.service, change, msg.change, msg.managed))
    }

    pub fn grant_increase(
        &mut self,
        msg: GrantIncrease,
        env: &Env,
    ) -> Reply<Started<Durable<AllocationView>>> {
        self.housekeep(env)?;
        let current = self.account.slices.get(&msg.service);
        let allocated = current.map_or(0, |s| s.allocated_units);
        let allocated_units = quotad_core::error::add_units("units", allocated, msg.grant.units)?;
        let change = SliceChange::Set {
            allocated_units,
            priority: current.map(|s| s.priority).unwrap_or_default(),
            auto_renew: current.is_some_and(|s| s.auto_renew),
            grant: Some(msg.grant),
        };
        Ok(self.change_slice(msg.service, change, msg.change, true))
    }

    pub fn set_status(
        &mut self,
        msg: SetStatus,
        env: &Env,
    ) -> Reply<Started<Durable<AllocationView>>> {
        self.housekeep(env)?;
        self.slice(&msg.service)?;
        let change = SliceChange::Status(msg.status);
        Ok(self.change_slice(msg.service, change, msg.change, true))
    }

    pub fn remove_slice(
        &mut self,
        msg: RemoveSlice,
        env: &Env,
    ) -> Reply<Started<Durable<AllocationView>>> {
        self.housekeep(env)?;
        let slice = self.slice(&msg.service)?;
        if slice.total_used_units() > 0 || slice.reserved_units > 0 {
            return Err(EngineError::Rule(RuleError::precondition(format!(
                "teacher {} has used {} and holds {} units of {} this cycle; set the slice to what is used instead of removing it",
                self.account.teacher_id,
                slice.total_used_units(),
                slice.reserved_units,
                msg.service
            ))));
        }
        Ok(self.change_slice(msg.service, SliceChange::Remove, msg.change, true))
    }

    /// The first half of a bulk change: the teacher reports what its slices
    /// may shrink to and then answers nothing until [`Self::thaw`], so the
    /// floors still hold when the school decides.
    pub fn freeze(&mut self, env: &Env) -> Reply<Frozen> {
        self.housekeep(env)?;
        Ok(Frozen {
            teacher_id: self.account.teacher_id.clone(),
            cycle_start_ms: self.account.cycle_start_ms,
            floors: self.account.floors(),
            terms: self
                .account
                .slices
                .iter()
                .map(|(service, slice)| (service.clone(), kept_terms(slice)))
                .collect(),
        })
    }

    /// The end of a freeze: the school's record of the bulk change, or None
    /// when it refused it (or never decided).
    pub fn thaw(&mut self, written: Option<(u64, Record)>) {
        if let Some((wal_seq, record)) = written {
            self.apply(wal_seq, &record);
        }
    }
}
