//! One actor per school: the actix shell around a [`SchoolMachine`], which
//! holds the pooled totals and the rules that change them. The shell starts
//! the school's teachers' actors, runs the rollover timer and gathers the
//! teachers' usage for the views.
//!
//! The school never waits for a teacher (teachers wait for the school), so the
//! two can never wait for each other.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;
use futures::future::join_all;

use super::machine::{CycleCell, Env, Frozen, SchoolAnswer, SchoolMachine};
use super::messages::*;
use super::teacher::TeacherActor;
use super::views::{
    AllocationView, Durable, PoolView, SchoolView, UsageReportView, UsageRow, UsageView,
};
use super::{Core, EngineError};
use crate::telemetry;
use quotad_core::audit::Broken;
use quotad_core::{AuditEntry, Cycle, Grant, IncreaseRequest, Pool, ServiceType, TeacherId};

pub struct SchoolActor {
    machine: SchoolMachine,
    core: Arc<Core>,
    teachers: HashMap<TeacherId, Addr<TeacherActor>>,
}

impl Actor for SchoolActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.core.shared.mailbox_capacity);
        ctx.run_interval(self.core.shared.housekeeping_interval, |act, ctx| {
            let done = act.guarded(ctx, |machine, env| {
                machine.roll_if_due(env)?;
                machine.expire_requests(env)
            });
            if let Err(error) = done {
                tracing::warn!(school = %act.machine.school.config.id, %error, "rollover or request expiry failed; it is tried again");
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
        tracing::warn!(school = %self.machine.school.config.id, "school actor restarted with its state intact");
    }
}

impl SchoolActor {
    pub fn new(machine: SchoolMachine, core: Arc<Core>) -> Self {
        Self {
            machine,
            core,
            teachers: HashMap::new(),
        }
    }

    /// Runs `f` on the machine with the time and the WAL. A panic becomes an
    /// error for this caller and a restart by the supervisor.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut SchoolMachine, &Env) -> Reply<T>,
    ) -> Reply<T> {
        let shared = self.core.shared.clone();
        let env = Env {
            now_ms: shared.clock.now_ms(),
            journal: &shared.wal,
            limits: &shared.limits,
        };
        let rolled_from = self.machine.school.cycle_start_ms;
        let reply = match catch_unwind(AssertUnwindSafe(|| f(&mut self.machine, &env))) {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!(school = %self.machine.school.config.id, "school actor panicked; restarting it");
                ctx.stop();
                Err(EngineError::Internal(
                    "the school's actor failed and is restarting; retry the call".into(),
                ))
            }
        };
        if self.machine.school.cycle_start_ms != rolled_from {
            telemetry::rollover();
            tracing::info!(school = %self.machine.school.config.id, cycle_start = %quotad_core::cycle::format_ms(self.machine.school.cycle_start_ms), "billing cycle rolled over");
        }
        reply
    }

    fn ensure_teacher(
        &mut self,
        teacher_id: TeacherId,
        ctx: &mut Context<Self>,
    ) -> Addr<TeacherActor> {
        if let Some(addr) = self.teachers.get(&teacher_id) {
            return addr.clone();
        }
        let account = self.machine.school.new_account(teacher_id.clone());
        let addr = self
            .core
            .spawn_teacher(account, self.machine.cycle_cell(), ctx.address());
        self.teachers.insert(teacher_id, addr.clone());
        addr
    }

    /// The usage views of one teacher, or of every teacher of the school.
    fn usages_of(
        &self,
        teacher_id: Option<&TeacherId>,
    ) -> impl std::future::Future<Output = Reply<Vec<UsageView>>> + 'static {
        let requests: Vec<_> = self
            .teachers
            .iter()
            .filter(|(id, _)| teacher_id.is_none_or(|want| *id == want))
            .map(|(_, t)| t.send(GetUsage))
            .collect();
        async move {
            let mut usages = Vec::with_capacity(requests.len());
            for answer in join_all(requests).await {
                usages.push(answer.map_err(EngineError::mailbox)??);
            }
            Ok(usages)
        }
    }

    /// The current cycle, or the one before it.
    fn report_cycle(&self, previous: bool) -> Reply<Cycle> {
        let school = &self.machine.school;
        let current = school.cycle()?;
        if !previous {
            return Ok(current);
        }
        let start_ms = match school.previous_cycle_start_ms {
            0 => {
                school
                    .config
                    .anchor
                    .cycle_at(current.start_ms - 1)?
                    .start_ms
            }
            start_ms => start_ms,
        };
        Ok(Cycle {
            start_ms,
            end_ms: current.start_ms,
        })
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
        Ok(self.ensure_teacher(teacher_id, ctx))
    }
}

impl Handler<EnsureTeachers> for SchoolActor {
    type Result = Reply<Vec<Addr<TeacherActor>>>;

    fn handle(
        &mut self,
        EnsureTeachers(teacher_ids): EnsureTeachers,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        Ok(teacher_ids
            .into_iter()
            .map(|id| self.ensure_teacher(id, ctx))
            .collect())
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

/// The cell a school's teachers follow, for the teachers started at recovery.
#[derive(Message)]
#[rtype(result = "Arc<CycleCell>")]
pub struct GetCycleCell;

impl Handler<GetCycleCell> for SchoolActor {
    type Result = Arc<CycleCell>;

    fn handle(&mut self, _: GetCycleCell, _: &mut Context<Self>) -> Arc<CycleCell> {
        self.machine.cycle_cell()
    }
}

impl Handler<Ask> for SchoolActor {
    type Result = Reply<SchoolAnswer>;

    fn handle(&mut self, Ask(ask): Ask, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |machine, env| machine.answer(ask, env))
    }
}

/// Every teacher named is frozen: the school decides, writes one record, and
/// thaws each teacher with its part (a refusal thaws them unchanged, as the
/// thaws are dropped).
impl Handler<BulkSet> for SchoolActor {
    type Result = Reply<u64>;

    fn handle(&mut self, msg: BulkSet, ctx: &mut Context<Self>) -> Self::Result {
        let (frozen, thaws): (Vec<Frozen>, Vec<Thaw>) = msg.frozen.into_iter().unzip();
        let mut thaws: HashMap<TeacherId, Thaw> = frozen
            .iter()
            .map(|f| f.teacher_id.clone())
            .zip(thaws)
            .collect();
        let (wal_seq, parts) = self.guarded(ctx, |machine, env| {
            machine.bulk_set(msg.slices, msg.change, &frozen, env)
        })?;
        for (teacher_id, record) in parts {
            if let Some(thaw) = thaws.remove(&teacher_id) {
                // A teacher gone meanwhile (stopped) has nothing to apply.
                let _ = thaw.send(Some((wal_seq, record)));
            }
        }
        Ok(wal_seq)
    }
}

impl Handler<UpdateSettings> for SchoolActor {
    type Result = Reply<u64>;

    fn handle(&mut self, msg: UpdateSettings, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |machine, env| machine.update_settings(msg, env))
    }
}

impl Handler<FileRequest> for SchoolActor {
    type Result = Reply<Durable<IncreaseRequest>>;

    fn handle(&mut self, msg: FileRequest, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |machine, env| machine.file_request(msg, env))
    }
}

impl Handler<PrepareGrant> for SchoolActor {
    type Result = Reply<(TeacherId, ServiceType, Grant)>;

    fn handle(&mut self, msg: PrepareGrant, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |machine, _| {
            machine.prepare_grant(msg.request_id, msg.units)
        })
    }
}

impl Handler<RejectRequest> for SchoolActor {
    type Result = Reply<Durable<IncreaseRequest>>;

    fn handle(&mut self, msg: RejectRequest, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |machine, env| {
            machine.reject_request(msg.request_id, msg.change, env)
        })
    }
}

impl Handler<ListRequests> for SchoolActor {
    type Result = Reply<Vec<IncreaseRequest>>;

    fn handle(&mut self, msg: ListRequests, _: &mut Context<Self>) -> Self::Result {
        Ok(self
            .machine
            .school
            .requests
            .values()
            .filter(|r| msg.request_id.is_none_or(|id| r.id == id))
            .filter(|r| msg.teacher_id.as_ref().is_none_or(|t| &r.teacher_id == t))
            .filter(|r| msg.status.is_none_or(|s| r.status.as_str() == s))
            .cloned()
            .collect())
    }
}

impl Handler<ListHistory> for SchoolActor {
    type Result = Reply<(Vec<AuditEntry>, Option<u64>)>;

    fn handle(&mut self, msg: ListHistory, _: &mut Context<Self>) -> Self::Result {
        Ok(self
            .machine
            .school
            .history
            .page(&msg.filter, msg.after_seq, msg.limit))
    }
}

impl Handler<VerifyHistory> for SchoolActor {
    type Result = Reply<Result<usize, Broken>>;

    fn handle(&mut self, _: VerifyHistory, _: &mut Context<Self>) -> Self::Result {
        Ok(self
            .machine
            .school
            .history
            .verify()
            .map(|()| self.machine.school.history.len()))
    }
}

impl Handler<ListSlices> for SchoolActor {
    type Result = ResponseFuture<Reply<Vec<AllocationView>>>;

    fn handle(&mut self, msg: ListSlices, _: &mut Context<Self>) -> Self::Result {
        let usages = self.usages_of(msg.teacher_id.as_ref());
        let school_id = self.machine.school.config.id.clone();
        Box::pin(async move {
            let mut views = Vec::new();
            for usage in usages.await? {
                for s in usage.services {
                    if msg.service.as_ref().is_some_and(|want| want != &s.service) {
                        continue;
                    }
                    views.push(AllocationView {
                        school_id: school_id.clone(),
                        teacher_id: usage.teacher_id.clone(),
                        service: s.service,
                        allocated_units: s.allocated_units,
                        used_units: s.used_units,
                        reserved_units: s.reserved_units,
                        priority: s.priority,
                        auto_renew: s.auto_renew,
                        status: s.status,
                    });
                }
            }
            views.sort_by(|a, b| (&a.teacher_id, &a.service).cmp(&(&b.teacher_id, &b.service)));
            Ok(views)
        })
    }
}

impl Handler<UsageReport> for SchoolActor {
    type Result = ResponseFuture<Reply<UsageReportView>>;

    fn handle(&mut self, msg: UsageReport, ctx: &mut Context<Self>) -> Self::Result {
        // Roll first, so that "this cycle" is the cycle the teachers count in.
        let rolled = self.guarded(ctx, |machine, env| machine.roll_if_due(env));
        let cycle = match rolled.and_then(|_| self.report_cycle(msg.previous)) {
            Ok(cycle) => cycle,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let usages = self.usages_of(msg.teacher_id.as_ref());
        Box::pin(async move {
            let mut rows = Vec::new();
            for usage in usages.await? {
                for s in usage.services {
                    if msg.service.as_ref().is_some_and(|want| want != &s.service) {
                        continue;
                    }
                    let row = if msg.previous {
                        if s.previous.cycle_start_ms != cycle.start_ms {
                            continue;
                        }
                        UsageRow {
                            teacher_id: usage.teacher_id.clone(),
                            service: s.service,
                            allocated_units: s.previous.allocated_units,
                            used_units: s
                                .previous
                                .used_units
                                .saturating_add(s.previous.borrowed_units),
                            borrowed_units: s.previous.borrowed_units,
                            overage_units: s.previous.overage_units,
                        }
                    } else {
                        UsageRow {
                            teacher_id: usage.teacher_id.clone(),
                            service: s.service,
                            allocated_units: s.allocated_units,
                            used_units: s.used_units,
                            borrowed_units: s.borrowed_units,
                            overage_units: s.overage_units,
                        }
                    };
                    rows.push(row);
                }
            }
            rows.sort_by(|a, b| (&a.teacher_id, &a.service).cmp(&(&b.teacher_id, &b.service)));
            Ok(UsageReportView { cycle, rows })
        })
    }
}

impl Handler<SetPool> for SchoolActor {
    type Result = ResponseFuture<Reply<Durable<PoolView>>>;

    fn handle(&mut self, msg: SetPool, ctx: &mut Context<Self>) -> Self::Result {
        let service = msg.service.clone();
        let written = self.guarded(ctx, |machine, env| machine.set_pool(msg, env));
        let wal_seq = match written {
            Ok(wal_seq) => wal_seq,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        self.core
            .registry
            .add_service(&self.machine.school.config.id, &service);
        let used = self.used_units();
        let pools: BTreeMap<_, _> = self
            .machine
            .school
            .pools
            .range(service.clone()..=service)
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
        let teacher_count = self.teachers.len();
        let header = self.guarded(ctx, |machine, env| {
            machine.roll_if_due(env)?;
            Ok((machine.school.config.clone(), machine.school.cycle()?))
        });
        let (config, cycle) = match header {
            Ok(header) => header,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let used = self.used_units();
        let pools = self.machine.school.pools.clone();
        let next_anchor = self.machine.school.next_anchor;
        Box::pin(async move {
            let pools = pool_views(&pools, &used.await?);
            Ok(SchoolView {
                config,
                next_anchor,
                cycle,
                pools,
                teacher_count,
            })
        })
    }
}

impl Handler<RollIfDue> for SchoolActor {
    type Result = ();

    fn handle(&mut self, _: RollIfDue, ctx: &mut Context<Self>) {
        if let Err(error) = self.guarded(ctx, |machine, env| machine.roll_if_due(env)) {
            tracing::warn!(school = %self.machine.school.config.id, %error, "rollover failed; it is tried again");
        }
    }
}

impl Handler<InjectPanic> for SchoolActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |_, _| panic!("injected panic"))
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

/// Tests only: the school answers nothing until `0` resolves, as if a long
/// message (an audit trail being verified) held it. Its mailbox fills in the
/// order messages arrive, so a test can line them up the way a busy school
/// would see them.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stall(pub tokio::sync::oneshot::Receiver<()>);

#[cfg(test)]
impl Handler<Stall> for SchoolActor {
    type Result = ();

    fn handle(&mut self, msg: Stall, ctx: &mut Context<Self>) {
        ctx.wait(
            async move {
                let _ = msg.0.await;
            }
            .into_actor(self),
        );
    }
}
