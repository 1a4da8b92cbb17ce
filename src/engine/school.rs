//! One actor per school: it holds the pooled totals and is the only place
//! that changes them (cycle units, the sum of slices, what was borrowed). It
//! starts its teachers' actors and tells them when a new cycle begins.
//!
//! The school never waits for a teacher (teachers wait for the school), so the
//! two can never wait for each other.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;
use futures::future::join_all;

use super::messages::*;
use super::teacher::TeacherActor;
use super::views::{Durable, PoolView, SchoolView};
use super::{Core, EngineError};
use crate::domain::{
    Pool, Record, SchoolState, ServiceType, TeacherAccount, TeacherId, TimestampMs,
};
use crate::telemetry;

pub struct SchoolActor {
    school: SchoolState,
    core: Arc<Core>,
    teachers: HashMap<TeacherId, Addr<TeacherActor>>,
}

impl Actor for SchoolActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.core.shared.mailbox_capacity);
        ctx.run_interval(self.core.shared.housekeeping_interval, |act, _| {
            let now_ms = act.core.shared.clock.now_ms();
            if let Err(error) = act.roll_if_due(now_ms) {
                tracing::warn!(school = %act.school.config.id, %error, "rollover failed; it is tried again");
            }
        });
        telemetry::actor_started();
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        telemetry::actor_stopped();
    }
}

impl Supervised for SchoolActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        telemetry::actor_restarted("school");
        tracing::warn!(school = %self.school.config.id, "school actor restarted with its state intact");
    }
}

impl SchoolActor {
    pub fn new(school: SchoolState, core: Arc<Core>) -> Self {
        Self {
            school,
            core,
            teachers: HashMap::new(),
        }
    }

    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut Self) -> Reply<T>,
    ) -> Reply<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!(school = %self.school.config.id, "school actor panicked; restarting it");
                ctx.stop();
                Err(EngineError::Internal(
                    "the school's actor failed and is restarting; retry the call".into(),
                ))
            }
        }
    }

    fn write(&mut self, record: &Record) -> Reply<u64> {
        let wal_seq = self.core.shared.wal.append(record)?;
        self.school.apply(record);
        Ok(wal_seq)
    }

    /// Starts the new cycle when the anchor has passed, records it, and tells
    /// every teacher (who would also roll on their next call).
    fn roll_if_due(&mut self, now_ms: TimestampMs) -> Reply<()> {
        let Some(cycle) = self.school.due_cycle(now_ms)? else {
            return Ok(());
        };
        let record = Record::CycleRolledOver {
            school_id: self.school.config.id.clone(),
            from_start_ms: self.school.cycle_start_ms,
            to_start_ms: cycle.start_ms,
            at_ms: now_ms,
        };
        self.write(&record)?;
        for teacher in self.teachers.values() {
            // A teacher with a full mailbox rolls by itself on its next call.
            let _ = teacher.try_send(RollTo(cycle.start_ms));
        }
        telemetry::rollover();
        tracing::info!(school = %self.school.config.id, cycle_start = %crate::domain::cycle::format_ms(cycle.start_ms), "billing cycle rolled over");
        Ok(())
    }

    /// Used units per service type, summed over the teachers' actors.
    fn used_units(
        &self,
    ) -> impl std::future::Future<Output = Reply<BTreeMap<ServiceType, u64>>> + 'static {
        let requests: Vec<_> = self.teachers.values().map(|t| t.send(GetUsage)).collect();
        async move {
            let mut used = BTreeMap::new();
            for answer in join_all(requests).await {
                for service in answer.map_err(EngineError::mailbox)??.services {
                    *used.entry(service.service).or_insert(0u64) += service.used_units;
                }
            }
            Ok(used)
        }
    }
}

impl Handler<EnsureTeacher> for SchoolActor {
    type Result = Reply<Addr<TeacherActor>>;

    fn handle(
        &mut self,
        EnsureTeacher(teacher_id): EnsureTeacher,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        if let Some(addr) = self.teachers.get(&teacher_id) {
            return Ok(addr.clone());
        }
        let account = TeacherAccount::new(
            self.school.config.id.clone(),
            teacher_id.clone(),
            self.school.config.anchor,
            self.school.cycle_start_ms,
        );
        let addr = self.core.spawn_teacher(account, ctx.address());
        self.teachers.insert(teacher_id, addr.clone());
        Ok(addr)
    }
}

/// Teachers started at recovery, handed to their school.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdoptTeachers(pub Vec<(TeacherId, Addr<TeacherActor>)>);

impl Handler<AdoptTeachers> for SchoolActor {
    type Result = ();

    fn handle(&mut self, AdoptTeachers(teachers): AdoptTeachers, _: &mut Context<Self>) {
        self.teachers.extend(teachers);
    }
}

impl Handler<ApplyAllocation> for SchoolActor {
    type Result = Reply<(u64, Record)>;

    fn handle(&mut self, msg: ApplyAllocation, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.core.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.roll_if_due(now_ms)?;
            act.school
                .check_allocation(&msg.teacher_id, &msg.service, msg.allocated_units)?;
            let record = Record::AllocationSet {
                school_id: act.school.config.id.clone(),
                teacher_id: msg.teacher_id,
                service: msg.service,
                allocated_units: msg.allocated_units,
                priority: msg.priority,
                auto_renew: msg.auto_renew,
                cycle_start_ms: act.school.cycle_start_ms,
                change: msg.change,
            };
            Ok((act.write(&record)?, record))
        })
    }
}

impl Handler<Borrow> for SchoolActor {
    type Result = bool;

    fn handle(&mut self, msg: Borrow, _: &mut Context<Self>) -> bool {
        let now_ms = self.core.shared.clock.now_ms();
        if self.roll_if_due(now_ms).is_err() {
            return false;
        }
        if msg.dry_run {
            self.school.can_borrow(&msg.service, msg.units)
        } else {
            self.school.grant_borrow(&msg.service, msg.units)
        }
    }
}

impl Handler<SetPool> for SchoolActor {
    type Result = ResponseFuture<Reply<Durable<PoolView>>>;

    fn handle(&mut self, msg: SetPool, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.core.shared.clock.now_ms();
        let written = self.guarded(ctx, |act| {
            act.roll_if_due(now_ms)?;
            act.school
                .check_set_pool(&msg.service, msg.cycle_units, &act.core.shared.limits)?;
            let record = Record::PoolSet {
                school_id: act.school.config.id.clone(),
                service: msg.service.clone(),
                cycle_units: msg.cycle_units,
                cycle_start_ms: act.school.cycle_start_ms,
                change: msg.change,
            };
            let wal_seq = act.write(&record)?;
            act.core
                .registry
                .add_service(&act.school.config.id, &msg.service);
            Ok(wal_seq)
        });
        let wal_seq = match written {
            Ok(wal_seq) => wal_seq,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let used = self.used_units();
        let pools: BTreeMap<_, _> = self
            .school
            .pools
            .range(msg.service.clone()..=msg.service)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        Box::pin(async move {
            let view = pool_views(&pools, &used.await?).pop();
            let view =
                view.ok_or_else(|| EngineError::Internal("the pool just set is missing".into()))?;
            Ok(Durable::written(view, wal_seq))
        })
    }
}

impl Handler<GetSchool> for SchoolActor {
    type Result = ResponseFuture<Reply<SchoolView>>;

    fn handle(&mut self, _: GetSchool, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.core.shared.clock.now_ms();
        let header = self.guarded(ctx, |act| {
            act.roll_if_due(now_ms)?;
            Ok((
                act.school.config.clone(),
                act.school.cycle()?,
                act.teachers.len(),
            ))
        });
        let (config, cycle, teacher_count) = match header {
            Ok(header) => header,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let used = self.used_units();
        let pools = self.school.pools.clone();
        Box::pin(async move {
            let pools = pool_views(&pools, &used.await?);
            Ok(SchoolView {
                config,
                cycle,
                pools,
                teacher_count,
            })
        })
    }
}

impl Handler<RollIfDue> for SchoolActor {
    type Result = ();

    fn handle(&mut self, _: RollIfDue, _: &mut Context<Self>) {
        let now_ms = self.core.shared.clock.now_ms();
        if let Err(error) = self.roll_if_due(now_ms) {
            tracing::warn!(school = %self.school.config.id, %error, "rollover failed; it is tried again");
        }
    }
}

impl Handler<InjectPanic> for SchoolActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |_| panic!("injected panic"))
    }
}

/// The pools as the API shows them, with the usage summed over the teachers.
fn pool_views(
    pools: &BTreeMap<ServiceType, Pool>,
    used: &BTreeMap<ServiceType, u64>,
) -> Vec<PoolView> {
    pools
        .iter()
        .map(|(service, pool)| PoolView {
            service: service.clone(),
            cycle_units: pool.cycle_units,
            allocated_units: pool.allocated_units,
            borrowed_units: pool.borrowed_units,
            available_units: pool.available_units(),
            used_units: used.get(service).copied().unwrap_or(0),
        })
        .collect()
}
