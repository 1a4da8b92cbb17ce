//! The live state, held by actix actors: one [`TeacherActor`] per teacher,
//! supervised by one [`SchoolActor`] per school that owns the pooled totals.
//! Actors are spread over one Arbiter (thread) per core; a [`Registry`] finds
//! them on the hot path. [`Engine`] is the handle the API calls: it routes a
//! call to its actor, then waits for the WAL flush that makes the answer
//! durable before returning it.

pub mod machine;
pub mod messages;
pub mod registry;
pub mod school;
pub mod teacher;
pub mod views;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use thiserror::Error;

use crate::storage::{Wal, WalError};
use crate::telemetry;
use quotad_core::audit::Broken;
use quotad_core::{
    AuditEntry, Change, DenyReason, IncreaseRequest, InvalidInput, Priority, Record, RuleError,
    RuleLimits, SchoolConfig, SchoolId, SchoolState, ServiceType, State, SyncEvent, SyncOutcome,
    SyncRejection, TeacherAccount, TeacherId, Tier, TimestampMs,
};

pub use messages::*;
pub use registry::Registry;
pub use school::SchoolActor;
pub use teacher::TeacherActor;
pub use views::*;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The engine cannot answer now (shutting down, an actor gone).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<InvalidInput> for EngineError {
    fn from(error: InvalidInput) -> Self {
        Self::Rule(RuleError::Invalid(error))
    }
}

impl EngineError {
    pub fn mailbox(error: MailboxError) -> Self {
        match error {
            MailboxError::Closed => {
                Self::Unavailable("the actor is stopped (shutting down?)".into())
            }
            MailboxError::Timeout => Self::Unavailable("the actor did not answer in time".into()),
        }
    }
}

/// Where the rules get the time from: the system clock, or a clock a test
/// moves. Never backwards: a reading is at least every reading before it, in
/// every thread, so a school that reads the clock after a teacher did is
/// never in an older billing cycle than that teacher (an NTP step back, or a
/// test's jump back, only makes time stand still until it catches up).
#[derive(Clone, Debug)]
pub struct Clock {
    source: ClockSource,
    /// The latest reading handed out.
    high_ms: Arc<AtomicI64>,
}

#[derive(Clone, Debug)]
enum ClockSource {
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn system() -> Self {
        Self {
            source: ClockSource::System,
            high_ms: Arc::new(AtomicI64::new(TimestampMs::MIN)),
        }
    }

    pub fn manual(start_ms: TimestampMs) -> Self {
        Self {
            source: ClockSource::Manual(Arc::new(AtomicI64::new(start_ms))),
            high_ms: Arc::new(AtomicI64::new(TimestampMs::MIN)),
        }
    }

    pub fn now_ms(&self) -> TimestampMs {
        let source_ms = match &self.source {
            ClockSource::System => system_now_ms(),
            ClockSource::Manual(now) => now.load(Ordering::SeqCst),
        };
        let before = self.high_ms.fetch_max(source_ms, Ordering::SeqCst);
        before.max(source_ms)
    }

    /// Moves a manual clock (back too, which the readings do not follow);
    /// the system clock cannot be moved.
    pub fn advance(&self, by_ms: i64) {
        if let ClockSource::Manual(now) = &self.source {
            now.fetch_add(by_ms, Ordering::SeqCst);
        }
    }
}

pub fn system_now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Threads that run actors (default: one per core).
    pub arbiters: usize,
    /// Messages queued per actor at most; senders wait beyond it.
    pub mailbox_capacity: usize,
    /// How often actors expire holds, prune ids and check for a new cycle.
    pub housekeeping_interval: Duration,
    pub limits: RuleLimits,
    /// Service types a new school gets when it names none.
    pub default_service_types: Vec<ServiceType>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            arbiters: std::thread::available_parallelism().map_or(2, |n| n.get()),
            mailbox_capacity: 1024,
            housekeeping_interval: Duration::from_secs(1),
            limits: RuleLimits::default(),
            default_service_types: quotad_core::DEFAULT_SERVICE_TYPES
                .iter()
                .filter_map(|s| ServiceType::parse(s).ok())
                .collect(),
        }
    }
}

/// What every actor shares.
pub struct Shared {
    pub wal: Wal,
    pub clock: Clock,
    pub limits: RuleLimits,
    pub mailbox_capacity: usize,
    pub housekeeping_interval: Duration,
}

/// The engine's parts, shared by the handle and the school actors.
pub struct Core {
    pub registry: Registry,
    pub shared: Arc<Shared>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
}

impl Core {
    fn arbiter(&self) -> &ArbiterHandle {
        let i = self.next_arbiter.fetch_add(1, Ordering::Relaxed);
        &self.arbiters[i % self.arbiters.len()]
    }

    /// Starts a supervised teacher actor on the next arbiter and registers it.
    pub fn spawn_teacher(
        &self,
        account: TeacherAccount,
        cycle: Arc<machine::CycleCell>,
        school: Addr<SchoolActor>,
    ) -> Addr<TeacherActor> {
        let key = (account.school_id.clone(), account.teacher_id.clone());
        let shared = self.shared.clone();
        let addr = Supervisor::start_in_arbiter(self.arbiter(), move |_| {
            TeacherActor::new(account, cycle, school, shared)
        });
        self.registry.teachers.insert(key, addr.clone());
        addr
    }

    fn spawn_school(self: &Arc<Self>, school: machine::SchoolMachine) -> Addr<SchoolActor> {
        let core = self.clone();
        Supervisor::start_in_arbiter(self.arbiter(), move |_| SchoolActor::new(school, core))
    }
}

/// The actix system on its own thread, with its arbiters.
pub struct EngineRuntime {
    system: System,
    thread: Option<JoinHandle<()>>,
}

impl EngineRuntime {
    /// Stops every actor and waits for the actor threads to end.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the actor system thread panicked");
            }
        }
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A teacher, as every gate call names one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TeacherRef {
    pub school_id: SchoolId,
    pub teacher_id: TeacherId,
}

/// A new school, validated.
#[derive(Debug, Clone)]
pub struct NewSchool {
    pub config: SchoolConfig,
    /// Empty: the default service types with 0 units.
    pub pools: Vec<(ServiceType, u64)>,
    pub change: Change,
}

/// The handle the API calls. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    core: Arc<Core>,
    config: Arc<EngineConfig>,
}

fn start_actor_threads(
    arbiters: usize,
) -> Result<(System, Vec<ArbiterHandle>, JoinHandle<()>), EngineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("quotad-actors".into())
        .spawn(move || {
            let system = System::new();
            let arbiters: Vec<Arbiter> = (0..arbiters.max(1)).map(|_| Arbiter::new()).collect();
            let handles = arbiters.iter().map(Arbiter::handle).collect();
            if tx.send((System::current(), handles)).is_err() {
                return;
            }
            if let Err(error) = system.run() {
                tracing::error!(%error, "the actor system stopped with an error");
            }
            for arbiter in arbiters {
                arbiter.stop();
                let _ = arbiter.join();
            }
        })
        .map_err(|e| EngineError::Internal(format!("start the actor thread: {e}")))?;
    let (system, handles) = rx
        .recv()
        .map_err(|_| EngineError::Internal("the actor thread ended before it started".into()))?;
    Ok((system, handles, thread))
}

impl Engine {
    /// Starts the actors for a recovered state. Returns once every actor is
    /// registered, so the first call finds them.
    pub async fn start(
        state: State,
        wal: Wal,
        config: EngineConfig,
        clock: Clock,
    ) -> Result<(Engine, EngineRuntime), EngineError> {
        let (system, arbiters, thread) = start_actor_threads(config.arbiters)?;
        let shared = Arc::new(Shared {
            wal,
            clock,
            limits: config.limits,
            mailbox_capacity: config.mailbox_capacity,
            housekeeping_interval: config.housekeeping_interval,
        });
        let core = Arc::new(Core {
            registry: Registry::default(),
            shared,
            arbiters,
            next_arbiter: AtomicUsize::new(0),
        });
        let runtime = EngineRuntime {
            system,
            thread: Some(thread),
        };
        let mut accounts: BTreeMap<SchoolId, Vec<TeacherAccount>> = BTreeMap::new();
        for ((school_id, _), account) in state.accounts {
            accounts.entry(school_id).or_default().push(account);
        }
        for (school_id, school) in state.schools {
            let services: Vec<_> = school.pools.keys().cloned().collect();
            let tier = school.config.tier;
            let school = machine::SchoolMachine::new(school);
            let cycle = school.cycle_cell();
            let addr = core.spawn_school(school);
            let teachers: Vec<_> = accounts
                .remove(&school_id)
                .unwrap_or_default()
                .into_iter()
                .map(|account| {
                    (
                        account.teacher_id.clone(),
                        core.spawn_teacher(account, cycle.clone(), addr.clone()),
                    )
                })
                .collect();
            addr.send(school::AdoptTeachers(teachers))
                .await
                .map_err(EngineError::mailbox)?;
            core.registry
                .schools
                .insert(school_id, registry::SchoolHandle::new(addr, tier, services));
        }
        Ok((
            Engine {
                core,
                config: Arc::new(config),
            },
            runtime,
        ))
    }

    pub fn limits(&self) -> &RuleLimits {
        &self.core.shared.limits
    }

    pub fn clock(&self) -> &Clock {
        &self.core.shared.clock
    }

    /// The actor threads. The gRPC server runs on them too, so that a call
    /// and the actor that answers it often share a thread (no wake-up hop).
    pub fn arbiters(&self) -> &[ArbiterHandle] {
        &self.core.arbiters
    }

    pub fn actors_alive(&self) -> usize {
        self.core.registry.actors()
    }

    /// Waits until the value's record is durable, then hands the value out.
    async fn settle<T>(&self, durable: Durable<T>) -> Result<T, EngineError> {
        if let Some(wal_seq) = durable.wal_seq {
            self.core.shared.wal.wait_durable(wal_seq).await?;
        }
        Ok(durable.value)
    }

    fn school(&self, school_id: &SchoolId) -> Result<registry::SchoolHandle, EngineError> {
        self.core
            .registry
            .schools
            .get(school_id)
            .map(|h| h.clone())
            .ok_or_else(|| {
                RuleError::not_found(format!("school {school_id} does not exist")).into()
            })
    }

    /// Sends a change to the teacher's actor (NOT_FOUND when the teacher has
    /// no slice) and answers once the change is durable.
    async fn change_teacher<M, T>(
        &self,
        teacher: &TeacherRef,
        service: &ServiceType,
        msg: M,
    ) -> Result<T, EngineError>
    where
        M: Message<Result = Reply<Durable<T>>> + Send + 'static,
        TeacherActor: Handler<M>,
        T: Send + 'static,
    {
        let addr = self
            .route(teacher, Some(service))?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    /// Asks the school's actor (NOT_FOUND when there is no such school).
    async fn ask_school<M, T>(&self, school_id: &SchoolId, msg: M) -> Result<T, EngineError>
    where
        M: Message<Result = Reply<T>> + Send + 'static,
        SchoolActor: Handler<M>,
        T: Send + 'static,
    {
        let school = self.school(school_id)?;
        school.addr.send(msg).await.map_err(EngineError::mailbox)?
    }

    /// The teacher's actor, or None when the teacher has no slice in the school.
    fn route(
        &self,
        teacher: &TeacherRef,
        service: Option<&ServiceType>,
    ) -> Result<Option<Addr<TeacherActor>>, EngineError> {
        let school = self.school(&teacher.school_id)?;
        if let Some(service) = service {
            if !school.has_service(service) {
                return Err(RuleError::not_found(format!(
                    "service type {service} is not configured for school {}",
                    teacher.school_id
                ))
                .into());
            }
        }
        let key = (teacher.school_id.clone(), teacher.teacher_id.clone());
        Ok(self.core.registry.teachers.get(&key).map(|a| a.clone()))
    }

    fn no_allocation(teacher: &TeacherRef, service: &ServiceType) -> Decision {
        Decision {
            allowed: false,
            reason: Some(DenyReason::NoAllocation),
            remaining_units: 0,
            borrowed_units: 0,
            duplicate: false,
            message: format!(
                "teacher {} has no {service} slice in school {}",
                teacher.teacher_id, teacher.school_id
            ),
        }
    }

    fn teacher_not_found(teacher: &TeacherRef) -> EngineError {
        RuleError::not_found(format!(
            "teacher {} has no allocation in school {}",
            teacher.teacher_id, teacher.school_id
        ))
        .into()
    }

    pub async fn consume(
        &self,
        teacher: &TeacherRef,
        msg: Consume,
    ) -> Result<Decision, EngineError> {
        self.limits().check_units("units", msg.units)?;
        let service = msg.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("consume", DenyReason::NoAllocation.as_str(), &service);
            return Ok(Self::no_allocation(teacher, &service));
        };
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        let decision = self.settle(durable).await?;
        telemetry::decision("consume", outcome(&decision), &service);
        Ok(decision)
    }

    pub async fn check(&self, teacher: &TeacherRef, msg: Check) -> Result<Decision, EngineError> {
        self.limits().check_units("units", msg.units)?;
        let service = msg.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("check", DenyReason::NoAllocation.as_str(), &service);
            return Ok(Self::no_allocation(teacher, &service));
        };
        let decision = addr.send(msg).await.map_err(EngineError::mailbox)??;
        telemetry::decision("check", outcome(&decision), &service);
        Ok(decision)
    }

    pub async fn reserve(
        &self,
        teacher: &TeacherRef,
        mut msg: Reserve,
    ) -> Result<(Decision, TimestampMs), EngineError> {
        msg.0.units = self.limits().check_units("estimate_units", msg.0.units)?;
        msg.0.ttl_ms = self.limits().check_ttl(msg.0.ttl_ms)?;
        let service = msg.0.service.clone();
        let Some(addr) = self.route(teacher, Some(&service))? else {
            telemetry::decision("reserve", DenyReason::NoAllocation.as_str(), &service);
            return Ok((Self::no_allocation(teacher, &service), 0));
        };
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        let answer = self.settle(durable).await?;
        telemetry::decision("reserve", outcome(&answer.0), &service);
        Ok(answer)
    }

    pub async fn commit(
        &self,
        teacher: &TeacherRef,
        msg: Commit,
    ) -> Result<CommitResult, EngineError> {
        self.limits()
            .check_units("actual_units", msg.actual_units)?;
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    pub async fn release(&self, teacher: &TeacherRef, msg: Release) -> Result<u64, EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    pub async fn usage(&self, teacher: &TeacherRef) -> Result<UsageView, EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        addr.send(GetUsage).await.map_err(EngineError::mailbox)?
    }

    /// Charges usage that already happened (a device's journal, an old
    /// client's counts): one outcome per event, in the batch's order. Each
    /// teacher's events go to its actor in one message; the answer waits for
    /// the last record any of them needs, so every outcome told is durable.
    pub async fn sync_usage(
        &self,
        school_id: &SchoolId,
        events: Vec<Result<(TeacherId, SyncEvent), BadEvent>>,
    ) -> Result<Vec<SyncOutcome>, EngineError> {
        self.limits().check_sync_batch("events", events.len())?;
        let school = self.school(school_id)?;
        let event_count = events.len();
        // Decisions are labelled by service type only for the school's own
        // types: a device naming any type it likes must not take a label.
        let services: Vec<Option<ServiceType>> = events
            .iter()
            .map(|e| {
                match e {
                    Ok((_, event)) => Some(&event.service),
                    Err(bad) => bad.service.as_ref(),
                }
                .filter(|service| school.has_service(service))
                .cloned()
            })
            .collect();
        let (mut outcomes, by_teacher) = group_sync_events(&school, school_id, events);
        let sends = by_teacher
            .into_iter()
            .map(|(teacher_id, (indexes, batch))| {
                let teacher = TeacherRef {
                    school_id: school_id.clone(),
                    teacher_id,
                };
                async move { (indexes, self.sync_teacher(&teacher, batch).await) }
            });
        let mut last_seq = 0;
        for (indexes, answer) in futures::future::join_all(sends).await {
            let durable = answer?;
            // Answers are matched to events by position: a short answer
            // would shift them, so it is refused rather than trusted.
            if durable.value.len() != indexes.len() {
                return Err(EngineError::Internal(format!(
                    "a teacher actor answered {} outcomes for {} synced events",
                    durable.value.len(),
                    indexes.len()
                )));
            }
            last_seq = last_seq.max(durable.wal_seq.unwrap_or(0));
            for (index, outcome) in indexes.into_iter().zip(durable.value) {
                outcomes[index] = Some(outcome);
            }
        }
        self.core.shared.wal.wait_durable(last_seq).await?;
        let outcomes: Vec<SyncOutcome> = outcomes.into_iter().flatten().collect();
        if outcomes.len() != event_count {
            return Err(EngineError::Internal(
                "a synced event got no outcome".into(),
            ));
        }
        for (outcome, service) in outcomes.iter().zip(&services) {
            match service {
                Some(service) => telemetry::decision("sync_usage", outcome.as_str(), service),
                None => telemetry::decision_of_no_service("sync_usage", outcome.as_str()),
            }
        }
        Ok(outcomes)
    }

    /// One teacher's share of a sync batch. A teacher without any slice in
    /// the school has no actor: each event is an unknown allocation.
    async fn sync_teacher(
        &self,
        teacher: &TeacherRef,
        events: Vec<SyncEvent>,
    ) -> Result<Durable<Vec<SyncOutcome>>, EngineError> {
        let Some(addr) = self.route(teacher, None)? else {
            let unknown = SyncOutcome::rejected(
                SyncRejection::UnknownAllocation,
                format!(
                    "teacher {} has no allocation in school {}",
                    teacher.teacher_id, teacher.school_id
                ),
            );
            return Ok(Durable::read(vec![unknown; events.len()]));
        };
        addr.send(SyncUsage(events))
            .await
            .map_err(EngineError::mailbox)?
    }

    /// Creates a school and its actor. The record is written before the
    /// school is visible, so no call can reach a school the log does not hold.
    pub async fn create_school(&self, new: NewSchool) -> Result<SchoolView, EngineError> {
        let mut pools = new.pools;
        for (_, units) in &pools {
            self.limits().check_pool_units("cycle_units", *units)?;
        }
        if pools.is_empty() {
            pools = self
                .config
                .default_service_types
                .iter()
                .map(|s| (s.clone(), 0))
                .collect();
        }
        if pools.len() > self.limits().service_types_per_school_max {
            return Err(InvalidInput::new(
                "pools",
                format!(
                    "names {} service types; at most {} are allowed",
                    pools.len(),
                    self.limits().service_types_per_school_max
                ),
            )
            .into());
        }
        let now_ms = self.clock().now_ms();
        let cycle = new.config.anchor.cycle_at(now_ms)?;
        let change = new.change.clone();
        let record = Record::SchoolCreated {
            config: new.config.clone(),
            cycle_start_ms: cycle.start_ms,
            pools: pools.clone(),
            change: new.change,
        };
        let addr = {
            let entry = match self.core.registry.schools.entry(new.config.id.clone()) {
                dashmap::Entry::Occupied(_) => {
                    return Err(RuleError::AlreadyExists(format!(
                        "school {} exists already",
                        new.config.id
                    ))
                    .into())
                }
                dashmap::Entry::Vacant(entry) => entry,
            };
            let wal_seq = self.core.shared.wal.append(&record)?;
            let mut school = SchoolState::new(new.config.clone(), cycle.start_ms, &pools);
            school.apply(&record);
            let addr = self.core.spawn_school(machine::SchoolMachine::new(school));
            entry.insert(registry::SchoolHandle::new(
                addr.clone(),
                new.config.tier,
                pools.iter().map(|(s, _)| s.clone()),
            ));
            (addr, wal_seq)
        };
        self.core.shared.wal.wait_durable(addr.1).await?;
        if let Some(owner) = new.config.owner() {
            // An individual's only slice is the whole pool.
            let teacher = TeacherRef {
                school_id: new.config.id.clone(),
                teacher_id: owner,
            };
            for (service, units) in &pools {
                self.set_owner_slice(&teacher, service, *units, &change)
                    .await?;
            }
        }
        addr.0.send(GetSchool).await.map_err(EngineError::mailbox)?
    }

    /// Sets an individual account's slice to the whole pool.
    async fn set_owner_slice(
        &self,
        owner: &TeacherRef,
        service: &ServiceType,
        units: u64,
        change: &Change,
    ) -> Result<AllocationView, EngineError> {
        let msg = SetAllocation {
            service: service.clone(),
            allocated_units: units,
            priority: Some(Priority::Normal),
            auto_renew: true,
            change: change.clone(),
            managed: false,
        };
        self.set_allocation(owner, msg).await
    }

    pub async fn get_school(&self, school_id: &SchoolId) -> Result<SchoolView, EngineError> {
        self.ask_school(school_id, GetSchool).await
    }

    pub async fn set_pool(
        &self,
        school_id: &SchoolId,
        msg: SetPool,
    ) -> Result<PoolView, EngineError> {
        self.limits()
            .check_pool_units("cycle_units", msg.cycle_units)?;
        let school = self.school(school_id)?;
        let owner = (school.tier == Tier::Individual)
            .then(|| TeacherId::parse(school_id.as_str()).ok())
            .flatten()
            .map(|teacher_id| TeacherRef {
                school_id: school_id.clone(),
                teacher_id,
            });
        let Some(owner) = owner else {
            let durable = school
                .addr
                .send(msg)
                .await
                .map_err(EngineError::mailbox)??;
            return self.settle(durable).await;
        };
        // An individual's slice follows the pool: shrink the slice before the
        // pool, grow it after, so the slice always fits.
        let current = school
            .addr
            .send(GetSchool)
            .await
            .map_err(EngineError::mailbox)??
            .pools
            .iter()
            .find(|p| p.service == msg.service)
            .map_or(0, |p| p.cycle_units);
        let (service, units, change) = (msg.service.clone(), msg.cycle_units, msg.change.clone());
        if units < current {
            self.set_owner_slice(&owner, &service, units, &change)
                .await?;
        }
        let durable = school
            .addr
            .send(msg)
            .await
            .map_err(EngineError::mailbox)??;
        let view = self.settle(durable).await?;
        if units >= current {
            self.set_owner_slice(&owner, &service, units, &change)
                .await?;
        }
        Ok(view)
    }

    pub async fn set_allocation(
        &self,
        teacher: &TeacherRef,
        msg: SetAllocation,
    ) -> Result<AllocationView, EngineError> {
        self.limits()
            .check_pool_units("allocated_units", msg.allocated_units)?;
        let school = self.school(&teacher.school_id)?;
        if !school.has_service(&msg.service) {
            return Err(RuleError::not_found(format!(
                "service type {} is not configured for school {}",
                msg.service, teacher.school_id
            ))
            .into());
        }
        let addr = school
            .addr
            .send(EnsureTeacher(teacher.teacher_id.clone()))
            .await
            .map_err(EngineError::mailbox)??;
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await
    }

    pub async fn set_status(
        &self,
        teacher: &TeacherRef,
        msg: SetStatus,
    ) -> Result<AllocationView, EngineError> {
        let service = msg.service.clone();
        self.change_teacher(teacher, &service, msg).await
    }

    /// Schools in id order, optionally of one tier: a page after `after`.
    pub async fn list_schools(
        &self,
        tier: Option<Tier>,
        after: Option<&SchoolId>,
        limit: usize,
    ) -> Result<(Vec<SchoolView>, Option<SchoolId>), EngineError> {
        let mut ids: Vec<SchoolId> = self
            .core
            .registry
            .schools
            .iter()
            .filter(|h| tier.is_none_or(|t| h.tier == t))
            .filter(|h| after.is_none_or(|a| h.key() > a))
            .map(|h| h.key().clone())
            .collect();
        ids.sort();
        let more = ids.len() > limit;
        ids.truncate(limit);
        let mut views = Vec::with_capacity(ids.len());
        for id in &ids {
            views.push(self.get_school(id).await?);
        }
        let next = if more { ids.last().cloned() } else { None };
        Ok((views, next))
    }

    /// The pools of the first `schools_max` schools in id order, and how many
    /// schools were left out: the pool gauges' bounded view.
    pub async fn pools_of_first_schools(
        &self,
        schools_max: usize,
    ) -> Result<(Vec<telemetry::SchoolPools>, usize), EngineError> {
        let schools_total = self.core.registry.schools.len();
        let (views, _) = self.list_schools(None, None, schools_max).await?;
        let omitted = schools_total.saturating_sub(views.len());
        let schools = views
            .into_iter()
            .map(|view| telemetry::SchoolPools {
                school_id: view.config.id,
                pools: view.pools,
            })
            .collect();
        Ok((schools, omitted))
    }

    pub async fn update_settings(
        &self,
        school_id: &SchoolId,
        msg: UpdateSettings,
    ) -> Result<SchoolView, EngineError> {
        let school = self.school(school_id)?;
        let wal_seq = school
            .addr
            .send(msg)
            .await
            .map_err(EngineError::mailbox)??;
        self.core.shared.wal.wait_durable(wal_seq).await?;
        self.get_school(school_id).await
    }

    /// Sets many slices at once: all of them or none. A slice may not shrink
    /// below what its teacher used and holds. Every teacher named is frozen
    /// first (it reports its floors and answers nothing else), then the
    /// school decides with those floors and thaws each teacher with the
    /// record, so no consume can slip between the check and the change.
    /// One bulk change per school at a time: two freezing the same teachers
    /// in parallel could each hold one the other waits for.
    pub async fn bulk_set(
        &self,
        school_id: &SchoolId,
        slices: Vec<quotad_core::SliceSet>,
        change: Change,
    ) -> Result<Vec<AllocationView>, EngineError> {
        let school = self.school(school_id)?;
        for (i, slice) in slices.iter().enumerate() {
            self.limits()
                .check_pool_units("allocated_units", slice.allocated_units)
                .map_err(|e| InvalidInput::new("allocations", format!("entry {}: {}", i + 1, e)))?;
            if !school.has_service(&slice.service) {
                return Err(RuleError::not_found(format!(
                    "service type {} is not configured for school {school_id}",
                    slice.service
                ))
                .into());
            }
        }
        let _one_at_a_time = school.bulk_changes.lock().await;
        let teacher_ids: Vec<TeacherId> = slices
            .iter()
            .map(|s| s.teacher_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let addrs = school
            .addr
            .send(EnsureTeachers(teacher_ids))
            .await
            .map_err(EngineError::mailbox)??;
        let freezes = addrs.iter().map(|addr| addr.send(Freeze));
        let mut frozen = Vec::with_capacity(addrs.len());
        for answer in futures::future::join_all(freezes).await {
            frozen.push(answer.map_err(EngineError::mailbox)??);
        }
        let msg = BulkSet {
            slices,
            change,
            frozen,
        };
        let wanted: Vec<(TeacherId, ServiceType)> = msg
            .slices
            .iter()
            .map(|s| (s.teacher_id.clone(), s.service.clone()))
            .collect();
        let wal_seq = school
            .addr
            .send(msg)
            .await
            .map_err(EngineError::mailbox)??;
        self.core.shared.wal.wait_durable(wal_seq).await?;
        let all = self.list_allocations(school_id, None, None).await?;
        Ok(wanted
            .iter()
            .filter_map(|(t, s)| {
                all.iter()
                    .find(|v| &v.teacher_id == t && &v.service == s)
                    .cloned()
            })
            .collect())
    }

    pub async fn remove_allocation(
        &self,
        teacher: &TeacherRef,
        msg: RemoveSlice,
    ) -> Result<AllocationView, EngineError> {
        let service = msg.service.clone();
        self.change_teacher(teacher, &service, msg).await
    }

    pub async fn list_allocations(
        &self,
        school_id: &SchoolId,
        teacher_id: Option<TeacherId>,
        service: Option<ServiceType>,
    ) -> Result<Vec<AllocationView>, EngineError> {
        let school = self.school(school_id)?;
        if let Some(service) = &service {
            self.route_service(&school, school_id, service)?;
        }
        let msg = ListSlices {
            teacher_id,
            service,
        };
        school.addr.send(msg).await.map_err(EngineError::mailbox)?
    }

    pub async fn file_request(
        &self,
        msg: FileRequest,
        school_id: &SchoolId,
    ) -> Result<IncreaseRequest, EngineError> {
        let durable = self.ask_school(school_id, msg).await?;
        self.settle(durable).await
    }

    /// Grants all or part of a pending request, as an allocation change
    /// (subject to the pool). The request stays pending if the pool is short.
    pub async fn approve_request(
        &self,
        school_id: &SchoolId,
        request_id: u64,
        units: u64,
        change: Change,
    ) -> Result<IncreaseRequest, EngineError> {
        let school = self.school(school_id)?;
        let (teacher_id, service, grant) = school
            .addr
            .send(PrepareGrant { request_id, units })
            .await
            .map_err(EngineError::mailbox)??;
        let addr = school
            .addr
            .send(EnsureTeacher(teacher_id))
            .await
            .map_err(EngineError::mailbox)??;
        let msg = GrantIncrease {
            service,
            grant,
            change,
        };
        let durable = addr.send(msg).await.map_err(EngineError::mailbox)??;
        self.settle(durable).await?;
        self.request(&school, request_id).await
    }

    pub async fn reject_request(
        &self,
        school_id: &SchoolId,
        msg: RejectRequest,
    ) -> Result<IncreaseRequest, EngineError> {
        let durable = self.ask_school(school_id, msg).await?;
        self.settle(durable).await
    }

    async fn request(
        &self,
        school: &registry::SchoolHandle,
        request_id: u64,
    ) -> Result<IncreaseRequest, EngineError> {
        let msg = ListRequests {
            teacher_id: None,
            status: None,
            request_id: Some(request_id),
        };
        school
            .addr
            .send(msg)
            .await
            .map_err(EngineError::mailbox)??
            .pop()
            .ok_or_else(|| EngineError::Internal(format!("request {request_id} is gone")))
    }

    pub async fn list_requests(
        &self,
        school_id: &SchoolId,
        msg: ListRequests,
    ) -> Result<Vec<IncreaseRequest>, EngineError> {
        self.ask_school(school_id, msg).await
    }

    pub async fn history(
        &self,
        school_id: &SchoolId,
        msg: ListHistory,
    ) -> Result<(Vec<AuditEntry>, Option<u64>), EngineError> {
        self.ask_school(school_id, msg).await
    }

    pub async fn verify_history(
        &self,
        school_id: &SchoolId,
    ) -> Result<Result<usize, Broken>, EngineError> {
        self.ask_school(school_id, VerifyHistory).await
    }

    pub async fn usage_report(
        &self,
        school_id: &SchoolId,
        msg: UsageReport,
    ) -> Result<UsageReportView, EngineError> {
        let school = self.school(school_id)?;
        if let Some(service) = &msg.service {
            self.route_service(&school, school_id, service)?;
        }
        school.addr.send(msg).await.map_err(EngineError::mailbox)?
    }

    fn route_service(
        &self,
        school: &registry::SchoolHandle,
        school_id: &SchoolId,
        service: &ServiceType,
    ) -> Result<(), EngineError> {
        if !school.has_service(service) {
            return Err(RuleError::not_found(format!(
                "service type {service} is not configured for school {school_id}"
            ))
            .into());
        }
        Ok(())
    }

    /// Makes a teacher's actor panic (tests of supervision).
    pub async fn inject_panic(&self, teacher: &TeacherRef) -> Result<(), EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        addr.send(InjectPanic).await.map_err(EngineError::mailbox)?
    }
}

/// Per teacher: the positions in the batch of its events, and the events.
type SyncByTeacher = BTreeMap<TeacherId, (Vec<usize>, Vec<SyncEvent>)>;

/// The outcomes already known (bad input, a service type the school lacks)
/// and, per teacher, the events left for its actor.
/// A synced event refused before it reached a teacher, with its service
/// type when that much of it was valid (its decision is labelled by it).
#[derive(Debug, Clone)]
pub struct BadEvent {
    pub service: Option<ServiceType>,
    pub error: InvalidInput,
}

impl From<InvalidInput> for BadEvent {
    fn from(error: InvalidInput) -> Self {
        Self {
            service: None,
            error,
        }
    }
}

fn group_sync_events(
    school: &registry::SchoolHandle,
    school_id: &SchoolId,
    events: Vec<Result<(TeacherId, SyncEvent), BadEvent>>,
) -> (Vec<Option<SyncOutcome>>, SyncByTeacher) {
    let mut outcomes: Vec<Option<SyncOutcome>> = vec![None; events.len()];
    let mut by_teacher = SyncByTeacher::new();
    for (index, item) in events.into_iter().enumerate() {
        match item {
            Err(bad) => outcomes[index] = Some(SyncOutcome::bad_input(&bad.error)),
            Ok((_, event)) if !school.has_service(&event.service) => {
                outcomes[index] = Some(SyncOutcome::rejected(
                    SyncRejection::UnknownAllocation,
                    format!(
                        "service type {} is not configured for school {school_id}",
                        event.service
                    ),
                ))
            }
            Ok((teacher_id, event)) => {
                let (indexes, batch) = by_teacher.entry(teacher_id).or_default();
                indexes.push(index);
                batch.push(event);
            }
        }
    }
    (outcomes, by_teacher)
}

fn outcome(decision: &Decision) -> &'static str {
    match (decision.duplicate, decision.reason) {
        (true, _) => "duplicate",
        (false, None) => "allowed",
        (false, Some(reason)) => reason.as_str(),
    }
}
