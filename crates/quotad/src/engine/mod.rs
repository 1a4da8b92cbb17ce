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

mod admin;
mod clock;
mod error;
mod gate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::owned_thread::OwnedThread;
use crate::storage::Wal;
use quotad_core::{
    Change, DenyReason, RuleError, RuleLimits, SchoolConfig, SchoolId, ServiceType, State,
    TeacherAccount, TeacherId,
};

pub use messages::*;
pub use registry::Registry;
pub use school::SchoolActor;
pub use teacher::TeacherActor;
pub use views::*;

pub use clock::{system_now_ms, Clock};
pub use error::EngineError;
pub use gate::BadEvent;

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

/// The actix system on its own thread, with its arbiters. Dropping it
/// stops every actor, as [`EngineRuntime::shutdown`] does.
pub struct EngineRuntime {
    thread: OwnedThread,
}

impl EngineRuntime {
    /// Stops every actor and waits for the actor threads to end.
    pub fn shutdown(mut self) {
        self.thread.stop();
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
) -> Result<(Vec<ArbiterHandle>, EngineRuntime), EngineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = OwnedThread::spawn("quotad-actors", move || {
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
    let thread = thread.stopped_by(move || system.stop());
    Ok((handles, EngineRuntime { thread }))
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
        let (arbiters, runtime) = start_actor_threads(config.arbiters)?;
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
            school.require_service(&teacher.school_id, service)?;
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
            allocated_units: 0,
            cycle_end_ms: 0,
        }
    }

    fn teacher_not_found(teacher: &TeacherRef) -> EngineError {
        RuleError::not_found(format!(
            "teacher {} has no allocation in school {}",
            teacher.teacher_id, teacher.school_id
        ))
        .into()
    }

    /// Makes a teacher's actor panic (tests of supervision).
    pub async fn inject_panic(&self, teacher: &TeacherRef) -> Result<(), EngineError> {
        let addr = self
            .route(teacher, None)?
            .ok_or_else(|| Self::teacher_not_found(teacher))?;
        addr.send(InjectPanic).await.map_err(EngineError::mailbox)?
    }
}
