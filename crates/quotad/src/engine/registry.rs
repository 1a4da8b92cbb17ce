//! Finds actors on the hot path without asking any actor: a concurrent map
//! from school to its actor and service types, and from teacher to theirs.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use actix::Addr;
use dashmap::DashMap;

use super::school::SchoolActor;
use super::teacher::TeacherActor;
use quotad_core::{service_not_configured, RuleError, SchoolId, ServiceType, TeacherId, Tier};

#[derive(Clone)]
pub struct SchoolHandle {
    pub addr: Addr<SchoolActor>,
    /// Fixed when the school is created.
    pub tier: Tier,
    /// The school's service types; written only by its actor, read on every call.
    services: Arc<RwLock<BTreeSet<ServiceType>>>,
    /// Held by a bulk change from its first freeze to its end (see `Engine::bulk_set`).
    pub bulk_changes: Arc<tokio::sync::Mutex<()>>,
}

impl SchoolHandle {
    pub fn new(
        addr: Addr<SchoolActor>,
        tier: Tier,
        services: impl IntoIterator<Item = ServiceType>,
    ) -> Self {
        Self {
            addr,
            tier,
            services: Arc::new(RwLock::new(services.into_iter().collect())),
            bulk_changes: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The school has a pool of `service`, or the rule's NOT_FOUND.
    pub fn require_service(
        &self,
        school_id: &SchoolId,
        service: &ServiceType,
    ) -> Result<(), RuleError> {
        if self.has_service(service) {
            Ok(())
        } else {
            Err(service_not_configured(school_id, service))
        }
    }

    pub fn has_service(&self, service: &ServiceType) -> bool {
        // A poisoned lock only means a writer panicked between two inserts of
        // a set; the set itself is still a valid set.
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(service)
    }
}

#[derive(Default)]
pub struct Registry {
    pub schools: DashMap<SchoolId, SchoolHandle>,
    pub teachers: DashMap<(SchoolId, TeacherId), Addr<TeacherActor>>,
}

impl Registry {
    pub fn add_service(&self, school_id: &SchoolId, service: &ServiceType) {
        if let Some(handle) = self.schools.get(school_id) {
            handle
                .services
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(service.clone());
        }
    }

    pub fn actors(&self) -> usize {
        self.schools.len() + self.teachers.len()
    }
}
