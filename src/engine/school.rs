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
use super::views::{
    AllocationView, Durable, PoolView, SchoolView, UsageReportView, UsageRow, UsageView,
};
use super::{Core, EngineError};
use crate::domain::audit::Broken;
use crate::domain::school::SYSTEM_ACTOR;
use crate::domain::{
    AuditEntry, Change, Cycle, Grant, IncreaseRequest, Pool, Record, RequestOutcome, RuleError,
    SchoolState, ServiceType, SliceTerms, TeacherId, TimestampMs,
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
            if let Err(error) = act.expire_requests(now_ms) {
                tracing::warn!(school = %act.school.config.id, %error, "request expiry failed; it is tried again");
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

    fn ensure_teacher(
        &mut self,
        teacher_id: TeacherId,
        ctx: &mut Context<Self>,
    ) -> Addr<TeacherActor> {
        if let Some(addr) = self.teachers.get(&teacher_id) {
            return addr.clone();
        }
        let account = self.school.new_account(teacher_id.clone());
        let addr = self.core.spawn_teacher(account, ctx.address());
        self.teachers.insert(teacher_id, addr.clone());
        addr
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
        let current = self.school.cycle()?;
        if !previous {
            return Ok(current);
        }
        let start_ms = match self.school.previous_cycle_start_ms {
            0 => {
                self.school
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

    /// Pending requests older than a week expire; each expiry is recorded.
    fn expire_requests(&mut self, now_ms: TimestampMs) -> Reply<()> {
        for request_id in self.school.due_expiries(now_ms) {
            let record = Record::RequestDecided {
                school_id: self.school.config.id.clone(),
                request_id,
                outcome: RequestOutcome::Expired,
                change: Change {
                    by: Arc::from(SYSTEM_ACTOR),
                    reason: Arc::from("no decision within 7 days"),
                    at_ms: now_ms,
                },
            };
            self.write(&record)?;
        }
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
        Ok(self.ensure_teacher(teacher_id, ctx))
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

impl Handler<ApplySliceChange> for SchoolActor {
    type Result = Reply<(u64, Record)>;

    fn handle(&mut self, msg: ApplySliceChange, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.core.shared.clock.now_ms();
        self.guarded(ctx, |act| {
            act.roll_if_due(now_ms)?;
            if msg.managed {
                act.school.config.check_managed()?;
            }
            let (school_id, cycle_start_ms) =
                (act.school.config.id.clone(), act.school.cycle_start_ms);
            let record = match msg.change {
                SliceChange::Set {
                    allocated_units,
                    priority,
                    auto_renew,
                    grant,
                } => {
                    if let Some(grant) = grant {
                        let request = act.school.pending_request(grant.request_id)?;
                        if request.teacher_id != msg.teacher_id || request.service != msg.service {
                            return Err(EngineError::Internal(format!(
                                "request {} is not for this slice",
                                grant.request_id
                            )));
                        }
                    }
                    act.school
                        .check_allocation(&msg.teacher_id, &msg.service, allocated_units)?;
                    Record::AllocationSet {
                        school_id,
                        teacher_id: msg.teacher_id,
                        service: msg.service,
                        allocated_units,
                        priority,
                        auto_renew,
                        cycle_start_ms,
                        change: msg.audit,
                        grant,
                    }
                }
                SliceChange::Status(status) => {
                    act.slice_terms(&msg.teacher_id, &msg.service)?;
                    Record::AllocationStatusSet {
                        school_id,
                        teacher_id: msg.teacher_id,
                        service: msg.service,
                        status,
                        cycle_start_ms,
                        change: msg.audit,
                    }
                }
                SliceChange::Remove => {
                    act.slice_terms(&msg.teacher_id, &msg.service)?;
                    Record::AllocationRemoved {
                        school_id,
                        teacher_id: msg.teacher_id,
                        service: msg.service,
                        cycle_start_ms,
                        change: msg.audit,
                    }
                }
            };
            Ok((act.write(&record)?, record))
        })
    }
}

impl Handler<BulkSet> for SchoolActor {
    type Result = Reply<u64>;

    fn handle(&mut self, msg: BulkSet, ctx: &mut Context<Self>) -> Self::Result {
        let now_ms = self.core.shared.clock.now_ms();
        let (wal_seq, record) = self.guarded(ctx, |act| {
            act.roll_if_due(now_ms)?;
            act.school.config.check_managed()?;
            act.school.check_allocations(&msg.slices)?;
            let record = Record::AllocationsSet {
                school_id: act.school.config.id.clone(),
                slices: msg.slices,
                cycle_start_ms: act.school.cycle_start_ms,
                change: msg.change,
            };
            Ok((act.write(&record)?, record))
        })?;
        // Each teacher applies its part of the record after whatever it is
        // doing; its mailbox keeps order, so a later read sees the new terms.
        for (teacher_id, own) in record.allocations_per_teacher() {
            let addr = self.ensure_teacher(teacher_id, ctx);
            addr.do_send(ApplyRecord {
                wal_seq,
                record: own,
            });
        }
        Ok(wal_seq)
    }
}

impl Handler<UpdateSettings> for SchoolActor {
    type Result = Reply<u64>;

    fn handle(&mut self, msg: UpdateSettings, ctx: &mut Context<Self>) -> Self::Result {
        let next_anchor = msg.next_anchor;
        let wal_seq = self.guarded(ctx, |act| {
            let record = Record::SettingsSet {
                school_id: act.school.config.id.clone(),
                name: msg.name,
                borrowing_enabled: msg.borrowing_enabled,
                self_service_requests: msg.self_service_requests,
                next_anchor: msg.next_anchor,
                change: msg.change,
            };
            act.write(&record)
        })?;
        // Teachers roll by themselves too: they must know where the next cycle ends.
        if let Some(anchor) = next_anchor {
            for teacher in self.teachers.values() {
                teacher.do_send(SetNextAnchor(anchor));
            }
        }
        Ok(wal_seq)
    }
}

impl Handler<FileRequest> for SchoolActor {
    type Result = Reply<Durable<IncreaseRequest>>;

    fn handle(&mut self, msg: FileRequest, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act| {
            let request_id = act.school.check_file_request(
                &msg.teacher_id,
                &msg.service,
                msg.units,
                &act.core.shared.limits,
            )?;
            let record = Record::RequestFiled {
                school_id: act.school.config.id.clone(),
                request_id,
                teacher_id: msg.teacher_id,
                service: msg.service,
                units: msg.units,
                change: msg.change,
            };
            let wal_seq = act.write(&record)?;
            Ok(Durable::written(act.request(request_id)?, wal_seq))
        })
    }
}

impl Handler<PrepareGrant> for SchoolActor {
    type Result = Reply<(TeacherId, ServiceType, Grant)>;

    fn handle(&mut self, msg: PrepareGrant, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act| {
            let request = act.school.pending_request(msg.request_id)?;
            let units = SchoolState::grant_units(request, msg.units)?;
            Ok((
                request.teacher_id.clone(),
                request.service.clone(),
                Grant {
                    request_id: request.id,
                    units,
                },
            ))
        })
    }
}

impl Handler<RejectRequest> for SchoolActor {
    type Result = Reply<Durable<IncreaseRequest>>;

    fn handle(&mut self, msg: RejectRequest, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, |act| {
            act.school.pending_request(msg.request_id)?;
            let record = Record::RequestDecided {
                school_id: act.school.config.id.clone(),
                request_id: msg.request_id,
                outcome: RequestOutcome::Rejected,
                change: msg.change,
            };
            let wal_seq = act.write(&record)?;
            Ok(Durable::written(act.request(msg.request_id)?, wal_seq))
        })
    }
}

impl Handler<ListRequests> for SchoolActor {
    type Result = Reply<Vec<IncreaseRequest>>;

    fn handle(&mut self, msg: ListRequests, _: &mut Context<Self>) -> Self::Result {
        Ok(self
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
            .school
            .history
            .page(&msg.filter, msg.after_seq, msg.limit))
    }
}

impl Handler<VerifyHistory> for SchoolActor {
    type Result = Reply<Result<usize, Broken>>;

    fn handle(&mut self, _: VerifyHistory, _: &mut Context<Self>) -> Self::Result {
        Ok(self
            .school
            .history
            .verify()
            .map(|()| self.school.history.len()))
    }
}

impl Handler<ListSlices> for SchoolActor {
    type Result = ResponseFuture<Reply<Vec<AllocationView>>>;

    fn handle(&mut self, msg: ListSlices, _: &mut Context<Self>) -> Self::Result {
        let usages = self.usages_of(msg.teacher_id.as_ref());
        let school_id = self.school.config.id.clone();
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

    fn handle(&mut self, msg: UsageReport, _: &mut Context<Self>) -> Self::Result {
        let cycle = match self.report_cycle(msg.previous) {
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
        let next_anchor = self.school.next_anchor;
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
