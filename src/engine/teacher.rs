//! One actor per teacher (a teacher's slices in one school). It alone changes
//! the teacher's account, so checks and charges need no lock. Every change is
//! appended to the WAL and applied in the same handler; the caller waits for
//! durability outside the actor, so the actor never blocks on a flush.
//!
//! A change call answered from memory (a retried event, a second commit or
//! release, a synced event that is a duplicate or rejected) may rest on a
//! record still in flight: the account is applied before its record is
//! durable. Such an answer waits for the last record the account reflects
//! (`TeacherActor::told_from_memory`), so that nothing told "already done"
//! can be undone by a crash. Reads (Check, GetUsage) show the latest state
//! and do not wait: they tell nobody that a change happened.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;

use super::messages::*;
use super::school::SchoolActor;
use super::views::{AllocationView, Decision, Durable, UsageView};
use super::{EngineError, Shared};
use crate::domain::{
    Change, CommitStep, DenyReason, EventEntry, Gate, HoldState, Record, Reservation, RuleError,
    ServiceType, Step, SyncEvent, SyncOutcome, SyncStep, TeacherAccount, TimestampMs,
};
use crate::telemetry;

/// How often idle ids are pruned, at most.
const PRUNE_INTERVAL_MS: i64 = 60_000;

pub struct TeacherActor {
    account: TeacherAccount,
    school: Addr<SchoolActor>,
    shared: Arc<Shared>,
    last_prune_ms: TimestampMs,
    /// The last WAL position the account changed at since start (written
    /// here or by the school): what an answer from memory waits for. What
    /// recovery applied is durable already, so 0 at start.
    last_seq: u64,
}

impl Actor for TeacherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.shared.mailbox_capacity);
        ctx.run_interval(self.shared.housekeeping_interval, |act, _| {
            act.housekeeping()
        });
        telemetry::actor_started();
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        telemetry::actor_stopped();
    }
}

impl Supervised for TeacherActor {
    /// The account is kept as it was: decisions are made on `&self` and only
    /// a finished record is applied, so a panic leaves no half-made change.
    fn restarting(&mut self, _: &mut Context<Self>) {
        telemetry::actor_restarted("teacher");
        match self.account.check_invariants() {
            Ok(()) => {
                tracing::warn!(teacher = %self.account.teacher_id, "teacher actor restarted with its state intact")
            }
            Err(problem) => {
                tracing::error!(teacher = %self.account.teacher_id, %problem, "teacher actor restarted with broken state")
            }
        }
    }
}

/// The first half of a consume: done, or waiting for the school to lend units.
enum ConsumeStart {
    Done(Durable<Decision>),
    NeedsBorrow {
        gate: Gate,
        borrow: u64,
        occurred_at_ms: TimestampMs,
    },
}

impl TeacherActor {
    pub fn new(account: TeacherAccount, school: Addr<SchoolActor>, shared: Arc<Shared>) -> Self {
        Self {
            account,
            school,
            shared,
            last_prune_ms: 0,
            last_seq: 0,
        }
    }

    /// Runs `f`; a panic becomes an error for this caller and a restart of the
    /// actor by its supervisor, instead of a lost arbiter thread.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self) -> Reply<T>,
    ) -> Reply<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!(teacher = %self.account.teacher_id, "teacher actor panicked; restarting it");
                ctx.stop();
                Err(EngineError::Internal(
                    "the teacher's actor failed and is restarting; retry the call".into(),
                ))
            }
        }
    }

    /// Asks the school, blocking this actor's mailbox until it answers so that
    /// the teacher's state cannot change in between. The school never waits
    /// for a teacher, so this cannot deadlock.
    fn ask_school<M, T>(
        &mut self,
        ctx: &mut Context<Self>,
        message: M,
        finish: impl FnOnce(&mut Self, Result<M::Result, MailboxError>) -> Reply<T> + 'static,
    ) -> ActorResponse<Self, Reply<T>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        SchoolActor: Handler<M>,
        T: 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = self
            .school
            .send(message)
            .into_actor(self)
            .map(move |answer, act, ctx| {
                let _ = tx.send(act.guarded(ctx, |act| finish(act, answer)));
            });
        ctx.wait(request);
        ActorResponse::r#async(fut::wrap_future(async move {
            rx.await.unwrap_or_else(|_| {
                Err(EngineError::Unavailable(
                    "the teacher's actor stopped".into(),
                ))
            })
        }))
    }

    /// Appends a record and applies it. The WAL position is taken before the
    /// state changes, so a refused append changes nothing.
    fn write(&mut self, record: &Record) -> Reply<u64> {
        let wal_seq = self.shared.wal.append(record)?;
        self.apply(wal_seq, record);
        Ok(wal_seq)
    }

    /// Applies a record written here or by the school.
    fn apply(&mut self, wal_seq: u64, record: &Record) {
        self.account.apply(wal_seq, record);
        self.last_seq = self.last_seq.max(wal_seq);
    }

    /// An answer read from the account, told once every record the account
    /// reflects is durable (a flush in flight, at most; usually none).
    fn told_from_memory<T>(&self, value: T) -> Durable<T> {
        Durable::written(value, self.last_seq)
    }

    /// What is due before any call: a new cycle, expired holds.
    fn housekeep(&mut self, now_ms: TimestampMs) -> Reply<()> {
        if let Some(cycle) = self.account.due_cycle(now_ms)? {
            self.account.roll_to(cycle.start_ms);
            // The school rolls on its own timer too; a full mailbox only delays it.
            let _ = self.school.try_send(RollIfDue);
        }
        for record in self.account.expiry_records(now_ms) {
            self.write(&record)?;
        }
        Ok(())
    }

    fn housekeeping(&mut self) {
        let now_ms = self.shared.clock.now_ms();
        if let Err(error) = self.housekeep(now_ms) {
            tracing::warn!(teacher = %self.account.teacher_id, %error, "housekeeping failed");
        }
        if now_ms - self.last_prune_ms >= PRUNE_INTERVAL_MS {
            self.account.prune(now_ms, &self.shared.limits);
            self.last_prune_ms = now_ms;
        }
    }

    fn decision(
        &self,
        service: &crate::domain::ServiceType,
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
        }
    }

    fn begin_consume(&mut self, msg: &Consume, now_ms: TimestampMs) -> Reply<ConsumeStart> {
        self.housekeep(now_ms)?;
        let occurred_at_ms = self
            .shared
            .limits
            .check_event_time(msg.occurred_at_ms, now_ms)?;
        match self
            .account
            .begin_consume(&msg.service, msg.units, &msg.event_id)?
        {
            Step::Duplicate(entry) => Ok(ConsumeStart::Done(self.repeat(msg, entry))),
            Step::Decide(gate @ Gate::Allow { borrow, .. }) if borrow > 0 => {
                Ok(ConsumeStart::NeedsBorrow {
                    gate,
                    borrow,
                    occurred_at_ms,
                })
            }
            Step::Decide(gate) => self
                .finish_consume(msg, gate, false, occurred_at_ms, now_ms)
                .map(ConsumeStart::Done),
        }
    }

    fn repeat(&self, msg: &Consume, entry: EventEntry) -> Durable<Decision> {
        let mut decision = self.decision(&msg.service, entry.allowed, entry.reason, msg.units);
        decision.borrowed_units = entry.borrowed_units;
        decision.duplicate = true;
        self.told_from_memory(decision)
    }

    fn finish_consume(
        &mut self,
        msg: &Consume,
        gate: Gate,
        borrow_granted: bool,
        occurred_at_ms: TimestampMs,
        now_ms: TimestampMs,
    ) -> Reply<Durable<Decision>> {
        let record = self.account.consume_record(
            &msg.service,
            msg.units,
            &msg.event_id,
            gate,
            borrow_granted,
            occurred_at_ms,
            now_ms,
            &msg.model,
        );
        let wal_seq = self.write(&record)?;
        let decision = match &record {
            Record::UsageCharged(usage) => {
                let mut decision = self.decision(&msg.service, true, None, msg.units);
                decision.borrowed_units = usage.borrowed_units;
                decision
            }
            Record::UsageDenied { reason, .. } => {
                self.decision(&msg.service, false, Some(*reason), msg.units)
            }
            other => unreachable!("a consume produced a {} record", other.kind()),
        };
        Ok(Durable::written(decision, wal_seq))
    }

    fn reservation_decision(&self, reservation: &Reservation) -> (Decision, TimestampMs) {
        match reservation.state {
            HoldState::Denied(reason) => (
                self.decision(&reservation.service, false, Some(reason), reservation.units),
                0,
            ),
            _ => (
                self.decision(&reservation.service, true, None, reservation.units),
                reservation.expires_at_ms,
            ),
        }
    }
}

impl Handler<Consume> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<Decision>>>;

    fn handle(&mut self, msg: Consume, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        match self.guarded(ctx, |act| act.begin_consume(&msg, now_ms)) {
            Err(error) => ActorResponse::reply(Err(error)),
            Ok(ConsumeStart::Done(reply)) => ActorResponse::reply(Ok(reply)),
            Ok(ConsumeStart::NeedsBorrow {
                gate,
                borrow,
                occurred_at_ms,
            }) => {
                let ask = Borrow {
                    service: msg.service.clone(),
                    units: borrow,
                    dry_run: false,
                };
                self.ask_school(ctx, ask, move |act, granted| {
                    act.finish_consume(&msg, gate, granted.unwrap_or(false), occurred_at_ms, now_ms)
                })
            }
        }
    }
}

impl Handler<Check> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Decision>>;

    fn handle(&mut self, msg: Check, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        let gate = self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            Ok(act.account.gate(&msg.service, msg.units)?)
        });
        match gate {
            Err(error) => ActorResponse::reply(Err(error)),
            Ok(Gate::Deny(reason)) => ActorResponse::reply(Ok(self.decision(
                &msg.service,
                false,
                Some(reason),
                msg.units,
            ))),
            Ok(Gate::Allow { borrow: 0, .. }) => {
                ActorResponse::reply(Ok(self.decision(&msg.service, true, None, msg.units)))
            }
            Ok(Gate::Allow { borrow, .. }) => {
                let ask = Borrow {
                    service: msg.service.clone(),
                    units: borrow,
                    dry_run: true,
                };
                self.ask_school(ctx, ask, move |act, could| {
                    let could = could.unwrap_or(false);
                    let mut decision = act.decision(
                        &msg.service,
                        could,
                        (!could).then_some(DenyReason::Exhausted),
                        msg.units,
                    );
                    decision.borrowed_units = if could { borrow } else { 0 };
                    Ok(decision)
                })
            }
        }
    }
}

impl Handler<Reserve> for TeacherActor {
    type Result = Reply<Durable<(Decision, TimestampMs)>>;

    fn handle(&mut self, Reserve(request): Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let step = act.account.begin_reserve(
                &request.service,
                request.units,
                &request.reservation_id,
                &act.shared.limits,
            )?;
            match step {
                Step::Duplicate(reservation) => {
                    let (mut decision, expires_at_ms) = act.reservation_decision(&reservation);
                    decision.duplicate = true;
                    Ok(act.told_from_memory((decision, expires_at_ms)))
                }
                Step::Decide(gate) => {
                    let record = act.account.reserve_record(&request, gate, now_ms);
                    let wal_seq = act.write(&record)?;
                    let reservation = &act.account.reservations[&request.reservation_id];
                    Ok(Durable::written(
                        act.reservation_decision(reservation),
                        wal_seq,
                    ))
                }
            }
        })
    }
}

impl Handler<Commit> for TeacherActor {
    type Result = Reply<Durable<CommitResult>>;

    fn handle(&mut self, msg: Commit, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let (outcome, duplicate) =
                match act
                    .account
                    .begin_commit(&msg.reservation_id, msg.actual_units, now_ms)?
                {
                    CommitStep::Duplicate { outcome, .. } => (outcome, true),
                    CommitStep::Charge(record) => {
                        act.write(&record)?;
                        match act
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
            let service = &act.account.reservations[&msg.reservation_id].service;
            let remaining_units = act.account.remaining_units(service);
            // A new commit's record is the last one written; a duplicate's
            // may still be in flight: either way, wait for the last.
            Ok(act.told_from_memory(CommitResult {
                outcome,
                duplicate,
                remaining_units,
            }))
        })
    }
}

impl Handler<Release> for TeacherActor {
    type Result = Reply<Durable<u64>>;

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            // A hold already ended (released, expired, committed) may have
            // ended by a record still in flight.
            let Some(record) = act.account.release_record(&msg.reservation_id, now_ms) else {
                return Ok(act.told_from_memory(0));
            };
            let units = act
                .account
                .reservations
                .get(&msg.reservation_id)
                .map_or(0, |r| r.units);
            Ok(Durable::written(units, act.write(&record)?))
        })
    }
}

impl Handler<GetUsage> for TeacherActor {
    type Result = Reply<UsageView>;

    fn handle(&mut self, _: GetUsage, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            Ok(UsageView {
                school_id: act.account.school_id.clone(),
                teacher_id: act.account.teacher_id.clone(),
                services: act.account.usage(),
                cycle: act.account.cycle()?,
            })
        })
    }
}

impl TeacherActor {
    /// Decides and writes one synced event.
    fn sync_one(&mut self, event: &SyncEvent, now_ms: TimestampMs) -> Reply<SyncOutcome> {
        match self.account.sync_step(event, &self.shared.limits, now_ms) {
            SyncStep::Duplicate(_) => Ok(SyncOutcome::Duplicate),
            SyncStep::Reject(outcome) => Ok(outcome),
            SyncStep::Charge(usage) => {
                let outcome = SyncOutcome::of_charge(&usage);
                self.write(&Record::UsageCharged(usage))?;
                Ok(outcome)
            }
        }
    }
}

/// Appends every record of the batch before anyone waits, so that one group
/// commit covers them all instead of one flush per event. The answer waits
/// for the last record the account reflects: the batch's own, and whatever
/// a duplicate or a rejection rests on (a device drops a rejected event).
impl Handler<SyncUsage> for TeacherActor {
    type Result = Reply<Durable<Vec<SyncOutcome>>>;

    fn handle(&mut self, SyncUsage(events): SyncUsage, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let outcomes = events
                .iter()
                .map(|event| act.sync_one(event, now_ms))
                .collect::<Reply<Vec<_>>>()?;
            Ok(act.told_from_memory(outcomes))
        })
    }
}

impl TeacherActor {
    /// Asks the school to record a change of one of this teacher's slices,
    /// then applies the record it wrote. The mailbox waits meanwhile, so the
    /// checks made here still hold when the school answers.
    fn change_slice(
        &mut self,
        ctx: &mut Context<Self>,
        service: ServiceType,
        change: SliceChange,
        audit: Change,
        managed: bool,
    ) -> ActorResponse<Self, Reply<Durable<AllocationView>>> {
        let ask = ApplySliceChange {
            teacher_id: self.account.teacher_id.clone(),
            service: service.clone(),
            change,
            audit,
            managed,
        };
        self.ask_school(ctx, ask, move |act, answer| {
            let (wal_seq, record) = answer.map_err(EngineError::mailbox)??;
            act.apply(wal_seq, &record);
            // The view shows usage too, which may rest on records of this
            // actor still in flight.
            Ok(act.told_from_memory(AllocationView::of(&act.account, &service)))
        })
    }

    /// The slice, or NOT_FOUND.
    fn slice(&self, service: &ServiceType) -> Reply<&crate::domain::Slice> {
        self.account.slices.get(service).ok_or_else(|| {
            EngineError::Rule(RuleError::not_found(format!(
                "teacher {} has no {service} slice",
                self.account.teacher_id
            )))
        })
    }
}

impl Handler<SetAllocation> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: SetAllocation, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        let checked = self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let current = act.account.slices.get(&msg.service);
            if let Some(slice) = current {
                let floor_units = slice.used_units.saturating_add(slice.reserved_units);
                if msg.allocated_units < floor_units {
                    return Err(EngineError::Rule(RuleError::precondition(format!(
                        "teacher {} has used {} and holds {} units of {} this cycle; the slice cannot shrink below {floor_units}",
                        act.account.teacher_id, slice.used_units, slice.reserved_units, msg.service
                    ))));
                }
            }
            Ok(msg.priority.or(current.map(|s| s.priority)).unwrap_or_default())
        });
        let priority = match checked {
            Ok(priority) => priority,
            Err(error) => return ActorResponse::reply(Err(error)),
        };
        let change = SliceChange::Set {
            allocated_units: msg.allocated_units,
            priority,
            auto_renew: msg.auto_renew,
            grant: None,
        };
        self.change_slice(ctx, msg.service, change, msg.change, msg.managed)
    }
}

impl Handler<GrantIncrease> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: GrantIncrease, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        let checked = self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let current = act.account.slices.get(&msg.service);
            let allocated = current.map_or(0, |s| s.allocated_units);
            let allocated_units =
                crate::domain::error::add_units("units", allocated, msg.grant.units)?;
            Ok(SliceChange::Set {
                allocated_units,
                priority: current.map(|s| s.priority).unwrap_or_default(),
                auto_renew: current.is_some_and(|s| s.auto_renew),
                grant: Some(msg.grant),
            })
        });
        match checked {
            Ok(change) => self.change_slice(ctx, msg.service, change, msg.change, true),
            Err(error) => ActorResponse::reply(Err(error)),
        }
    }
}

impl Handler<SetStatus> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: SetStatus, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        let checked = self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            act.slice(&msg.service).map(|_| ())
        });
        match checked {
            Ok(()) => self.change_slice(
                ctx,
                msg.service,
                SliceChange::Status(msg.status),
                msg.change,
                true,
            ),
            Err(error) => ActorResponse::reply(Err(error)),
        }
    }
}

impl Handler<RemoveSlice> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: RemoveSlice, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.shared.clock.now_ms();
        let checked = self.guarded(ctx, |act| {
            act.housekeep(now_ms)?;
            let slice = act.slice(&msg.service)?;
            if slice.total_used_units() > 0 || slice.reserved_units > 0 {
                return Err(EngineError::Rule(RuleError::precondition(format!(
                    "teacher {} has used {} and holds {} units of {} this cycle; set the slice to what is used instead of removing it",
                    act.account.teacher_id,
                    slice.total_used_units(),
                    slice.reserved_units,
                    msg.service
                ))));
            }
            Ok(())
        });
        match checked {
            Ok(()) => self.change_slice(ctx, msg.service, SliceChange::Remove, msg.change, true),
            Err(error) => ActorResponse::reply(Err(error)),
        }
    }
}

impl Handler<SetNextAnchor> for TeacherActor {
    type Result = ();

    fn handle(&mut self, SetNextAnchor(anchor): SetNextAnchor, _: &mut Context<Self>) {
        self.account.next_anchor = Some(anchor);
    }
}

impl Handler<ApplyRecord> for TeacherActor {
    type Result = ();

    fn handle(&mut self, msg: ApplyRecord, _: &mut Context<Self>) {
        self.apply(msg.wal_seq, &msg.record);
    }
}

impl Handler<RollTo> for TeacherActor {
    type Result = ();

    fn handle(&mut self, RollTo(cycle_start_ms): RollTo, _: &mut Context<Self>) {
        self.account.roll_to(cycle_start_ms);
    }
}

impl Handler<InjectPanic> for TeacherActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |_| panic!("injected panic"))
    }
}
