//! The admin calls: schools, pools, allocations (one or in bulk), increase
//! requests, history and reports. Each is routed to the actor that owns the
//! fact it changes (docs/protocol.md) and answered once durable.

use crate::telemetry;
use quotad_core::audit::Broken;
use quotad_core::{
    individual_owner, owner_slice_order, owner_slice_terms, AuditEntry, Change, IncreaseRequest,
    InvalidInput, OwnerSliceOrder, Record, RuleError, SchoolId, SchoolState, ServiceType,
    TeacherId, Tier,
};

use super::messages::*;
use super::views::*;
use super::{machine, registry, Engine, EngineError, NewSchool, TeacherRef};

impl Engine {
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
        pool_units: u64,
        change: &Change,
    ) -> Result<AllocationView, EngineError> {
        let terms = owner_slice_terms(pool_units);
        let msg = SetAllocation {
            service: service.clone(),
            allocated_units: terms.allocated_units,
            priority: Some(terms.priority),
            auto_renew: Some(terms.auto_renew),
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
        let owner = individual_owner(school.tier, school_id).map(|teacher_id| TeacherRef {
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
        // An individual's slice follows the pool, and always fits it.
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
        let order = owner_slice_order(current, units);
        if order == OwnerSliceOrder::SliceThenPool {
            self.set_owner_slice(&owner, &service, units, &change)
                .await?;
        }
        let durable = school
            .addr
            .send(msg)
            .await
            .map_err(EngineError::mailbox)??;
        let view = self.settle(durable).await?;
        if order == OwnerSliceOrder::PoolThenSlice {
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
        school.require_service(&teacher.school_id, &msg.service)?;
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
                pools: view.pools.into_iter().map(PoolView::gauges).collect(),
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
    /// first (it reports its floors and terms and answers nothing else), then
    /// the school decides with those floors and thaws each teacher with the
    /// record, so no consume can slip between the check and the change. An
    /// entry's priority or auto-renew left out is the frozen teacher's own,
    /// which cannot change before the school writes it.
    /// One bulk change per school at a time: two freezing the same teachers
    /// in parallel could each hold one the other waits for.
    pub async fn bulk_set(
        &self,
        school_id: &SchoolId,
        slices: Vec<SliceSpec>,
        change: Change,
    ) -> Result<Vec<AllocationView>, EngineError> {
        let school = self.school(school_id)?;
        for (i, slice) in slices.iter().enumerate() {
            self.limits()
                .check_pool_units("allocated_units", slice.allocated_units)
                .map_err(|e| InvalidInput::new("allocations", format!("entry {}: {}", i + 1, e)))?;
            school.require_service(school_id, &slice.service)?;
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
        // An error here drops the thaws unsent, which thaws every teacher unchanged.
        let slices = resolve_bulk(slices, frozen.iter().map(|(f, _)| f))?;
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
            school.require_service(school_id, service)?;
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
            school.require_service(school_id, service)?;
        }
        school.addr.send(msg).await.map_err(EngineError::mailbox)?
    }
}
