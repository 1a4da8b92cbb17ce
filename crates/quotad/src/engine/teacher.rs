//! One actor per teacher (a teacher's slices in one school): the actix shell
//! around a [`TeacherMachine`], which holds the account and the rules. The
//! shell gives the machine the time and the WAL, sends its asks to the
//! school while holding the mailbox, and holds it while the teacher is
//! frozen for a bulk change. The caller waits for durability outside the
//! actor, so the actor never blocks on a flush.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;

use super::machine::{CycleCell, Env, Frozen, Started, TeacherMachine};
use super::messages::*;
use super::school::SchoolActor;
use super::views::{AllocationView, Decision, Durable, UsageView};
use super::{EngineError, Shared};
use crate::telemetry;
use quotad_core::{SyncOutcome, TeacherAccount, TimestampMs};

pub struct TeacherActor {
    machine: TeacherMachine,
    school: Addr<SchoolActor>,
    shared: Arc<Shared>,
}

impl Actor for TeacherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.shared.mailbox_capacity);
        ctx.run_interval(self.shared.housekeeping_interval, |act, ctx| {
            let done = act.guarded(ctx, |act, env| act.machine.tick(env));
            if let Err(error) = done {
                tracing::warn!(teacher = %act.machine.account.teacher_id, %error, "housekeeping failed");
            }
            act.nudge_school();
        });
        telemetry::actor_started();
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        telemetry::actor_stopped();
    }
}

impl Supervised for TeacherActor {
    /// The account is kept as it was: decisions are made before anything is
    /// written and only a finished record is applied, so a panic leaves no
    /// half-made change.
    fn restarting(&mut self, _: &mut Context<Self>) {
        telemetry::actor_restarted("teacher");
        let account = &self.machine.account;
        match account.check_invariants() {
            Ok(()) => {
                tracing::warn!(teacher = %account.teacher_id, "teacher actor restarted with its state intact")
            }
            Err(problem) => {
                tracing::error!(teacher = %account.teacher_id, %problem, "teacher actor restarted with broken state")
            }
        }
    }
}

impl TeacherActor {
    pub fn new(
        account: TeacherAccount,
        cycle: Arc<CycleCell>,
        school: Addr<SchoolActor>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            machine: TeacherMachine::new(account, cycle),
            school,
            shared,
        }
    }

    /// Runs `f` on the machine with the time and the WAL; a panic becomes an
    /// error for this caller and a restart of the actor by its supervisor,
    /// instead of a lost arbiter thread.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self, &Env) -> Reply<T>,
    ) -> Reply<T> {
        let shared = self.shared.clone();
        let env = Env {
            now_ms: shared.clock.now_ms(),
            journal: &shared.wal,
            limits: &shared.limits,
        };
        match catch_unwind(AssertUnwindSafe(|| f(self, &env))) {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!(teacher = %self.machine.account.teacher_id, "teacher actor panicked; restarting it");
                ctx.stop();
                Err(EngineError::Internal(
                    "the teacher's actor failed and is restarting; retry the call".into(),
                ))
            }
        }
    }

    /// A teacher that rolled by the clock first tells its school (which also
    /// rolls on its own timer; a full mailbox only delays it).
    fn nudge_school(&self) {
        if self.machine.ahead_of_school() {
            let _ = self.school.try_send(RollIfDue);
        }
    }

    /// Answers at once, or asks the school and finishes when it answers. The
    /// mailbox waits meanwhile (`ctx.wait`), so the teacher's state cannot
    /// change in between. The school never waits for a teacher, so this
    /// cannot deadlock.
    fn run<T: Send + 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        started: Reply<Started<T>>,
    ) -> ActorResponse<Self, Reply<T>> {
        self.nudge_school();
        let (ask, resume) = match started {
            Err(error) => return ActorResponse::reply(Err(error)),
            Ok(Started::Done(value)) => return ActorResponse::reply(Ok(value)),
            Ok(Started::Ask(ask, resume)) => (ask, resume),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = self
            .school
            .send(Ask(ask))
            .into_actor(self)
            .map(move |answer, act, ctx| {
                let answer = answer.map_err(EngineError::mailbox).and_then(|a| a);
                let finished = act.guarded(ctx, |act, env| resume(&mut act.machine, answer, env));
                let _ = tx.send(finished);
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
}

impl Handler<Consume> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<Decision>>>;

    fn handle(&mut self, msg: Consume, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.consume(msg, env));
        self.run(ctx, started)
    }
}

impl Handler<Check> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Decision>>;

    fn handle(&mut self, msg: Check, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.check(msg, env));
        self.run(ctx, started)
    }
}

impl Handler<Reserve> for TeacherActor {
    type Result = Reply<Durable<(Decision, TimestampMs)>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act, env| act.machine.reserve(msg, env))
    }
}

impl Handler<Commit> for TeacherActor {
    type Result = Reply<Durable<CommitResult>>;

    fn handle(&mut self, msg: Commit, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act, env| act.machine.commit(msg, env))
    }
}

impl Handler<Release> for TeacherActor {
    type Result = Reply<Durable<u64>>;

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act, env| act.machine.release(msg, env))
    }
}

impl Handler<GetUsage> for TeacherActor {
    type Result = Reply<UsageView>;

    fn handle(&mut self, _: GetUsage, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act, env| act.machine.usage(env))
    }
}

impl Handler<SyncUsage> for TeacherActor {
    type Result = Reply<Durable<Vec<SyncOutcome>>>;

    fn handle(&mut self, SyncUsage(events): SyncUsage, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act, env| act.machine.sync(&events, env))
    }
}

impl Handler<SetAllocation> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: SetAllocation, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.set_allocation(msg, env));
        self.run(ctx, started)
    }
}

impl Handler<GrantIncrease> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: GrantIncrease, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.grant_increase(msg, env));
        self.run(ctx, started)
    }
}

impl Handler<SetStatus> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: SetStatus, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.set_status(msg, env));
        self.run(ctx, started)
    }
}

impl Handler<RemoveSlice> for TeacherActor {
    type Result = ActorResponse<Self, Reply<Durable<AllocationView>>>;

    fn handle(&mut self, msg: RemoveSlice, ctx: &mut Context<Self>) -> Self::Result {
        let started = self.guarded(ctx, |act, env| act.machine.remove_slice(msg, env));
        self.run(ctx, started)
    }
}

/// Reports the floors and holds the mailbox until the school's record (or
/// its refusal, or the end of the bulk call) comes back through the thaw.
impl Handler<Freeze> for TeacherActor {
    type Result = Reply<(Frozen, Thaw)>;

    fn handle(&mut self, _: Freeze, ctx: &mut Context<Self>) -> Self::Result {
        let frozen = self.guarded(ctx, |act, env| act.machine.freeze(env))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thawed = fut::wrap_future::<_, Self>(rx).map(|written, act, ctx| {
            let _ = act.guarded(ctx, |act, _| {
                act.machine.thaw(written.ok().flatten());
                Ok(())
            });
        });
        ctx.wait(thawed);
        Ok((frozen, tx))
    }
}

impl Handler<InjectPanic> for TeacherActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |_, _| panic!("injected panic"))
    }
}

/// Tests only: the teacher answers nothing until `0` resolves, as a teacher
/// working through a large sync batch would; its mailbox fills meanwhile.
#[cfg(test)]
impl Handler<super::school::Stall> for TeacherActor {
    type Result = ();

    fn handle(&mut self, msg: super::school::Stall, ctx: &mut Context<Self>) {
        ctx.wait(
            async move {
                let _ = msg.0.await;
            }
            .into_actor(self),
        );
    }
}
