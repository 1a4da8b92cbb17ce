//! The invariants, checked after every step (see `docs/protocol.md`).

use super::world::{
    own_view, school_id, school_now, service, teacher_id, Fact, World, SCHOOLS, TEACHERS,
};
use super::{Protocol, Violation};
use quotad_core::{HoldState, Priority, SchoolState, SliceStatus, TeacherAccount, TimestampMs};

fn broken(invariant: &'static str, detail: String) -> Result<(), Violation> {
    Err(Violation {
        step: 0,
        invariant,
        detail,
    })
}

impl World {
    pub fn check(&self) -> Result<(), Violation> {
        if let Some(found) = &self.found {
            self.keep(Err(found.clone()))?;
        }
        let now_ms = self.now_ms();
        for s in 0..SCHOOLS {
            let live = school_now(&self.schools[s].school, now_ms);
            let replayed_school = self
                .replayed
                .schools
                .get(&school_id(s))
                .map(|school| school_now(school, now_ms));
            let Some(replayed_school) = replayed_school else {
                return broken("I3", format!("school {s} is missing from the replay"));
            };
            self.keep(pools_fit("I1 (school)", s, &live))?;
            self.keep(pools_fit("I1 (replayed school)", s, &replayed_school))?;
            let live_accounts: Vec<Option<TeacherAccount>> = (0..TEACHERS)
                .map(|t| {
                    let node = &self.teachers[s][t];
                    node.idle()
                        .then(|| self.account_now(&node.machine.account, &live, now_ms))
                })
                .collect();
            let replayed_accounts: Vec<TeacherAccount> = (0..TEACHERS)
                .map(|t| {
                    let account = self
                        .replayed
                        .accounts
                        .get(&(school_id(s), teacher_id(t)))
                        .cloned()
                        .unwrap_or_else(|| replayed_school.new_account(teacher_id(t)));
                    self.account_now(&account, &replayed_school, now_ms)
                })
                .collect();
            self.keep(teachers_fit("I1/I2 (teachers)", s, &live, &live_accounts))?;
            let replayed_some: Vec<Option<TeacherAccount>> =
                replayed_accounts.iter().cloned().map(Some).collect();
            self.keep(teachers_fit(
                "I1/I2 (replayed teachers)",
                s,
                &replayed_school,
                &replayed_some,
            ))?;
            if live != replayed_school {
                self.keep(broken(
                    "I3 (live school = replayed school)",
                    format!(
                        "school {s}: live {:?}\n replayed {:?}",
                        brief(&live),
                        brief(&replayed_school)
                    ),
                ))?;
            }
            for t in 0..TEACHERS {
                let Some(account) = &live_accounts[t] else {
                    continue;
                };
                if !account.same_state(&replayed_accounts[t]) {
                    self.keep(broken(
                        "I3 (live teacher = replayed teacher)",
                        format!(
                            "school {s} teacher {t}: live {:?}\n replayed {:?}",
                            account.slices, replayed_accounts[t].slices
                        ),
                    ))?;
                }
                self.keep(terms_not_looser(s, t, account, &live))?;
            }
        }
        self.keep(self.charged_once())
    }

    /// A violation, unless the run was told to look past that invariant.
    fn keep(&self, result: Result<(), Violation>) -> Result<(), Violation> {
        match result {
            Err(v)
                if self
                    .ignore
                    .iter()
                    .any(|p| v.invariant.starts_with(p.as_str())) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Also checked when a run ends: the audit trails and holds add up.
    pub fn check_at_end(&self) -> Result<(), Violation> {
        self.check()?;
        for (s, school) in self.schools.iter().enumerate() {
            if let Err(broken_at) = school.school.history.verify() {
                return broken("audit trail", format!("school {s}: {}", broken_at.problem));
            }
        }
        for (s, teachers) in self.teachers.iter().enumerate() {
            for (t, node) in teachers.iter().enumerate() {
                if let Err(problem) = node.machine.account.check_invariants() {
                    return broken(
                        "teacher account",
                        format!("school {s} teacher {t}: {problem}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// A teacher as it is at its next decision: in the school's cycle (or,
    /// on the seed protocol, in the cycle it knows of), old ids forgotten.
    fn account_now(
        &self,
        account: &TeacherAccount,
        school: &SchoolState,
        now_ms: TimestampMs,
    ) -> TeacherAccount {
        let mut account = account.clone();
        let info = match self.protocol {
            Protocol::Current => school.cycle_info(),
            Protocol::Seed => own_view(&account),
        };
        let _ = account.follow(info, now_ms);
        account.prune(now_ms, &self.limits);
        account
    }

    /// I4: no id is charged again while it is remembered (for the
    /// idempotency window after its event happened). An id reused for an
    /// event older than that is a new event, as the domain rules define.
    fn charged_once(&self) -> Result<(), Violation> {
        for ((s, t, id), charges) in self.charges() {
            for pair in charges.windows(2) {
                let since = pair[1].recorded_at_ms - pair[0].remembered_from_ms;
                if since.abs() < self.limits.idempotency_window_ms {
                    return broken(
                        "I4 (charged at most once)",
                        format!("school {s} teacher {t}: {id} charged twice"),
                    );
                }
            }
        }
        Ok(())
    }

    /// I4 after a restart: every acknowledged fact survived. An id may be
    /// used again once the idempotency window has forgotten it, so only the
    /// latest fact told about each id is held against the state.
    pub(super) fn check_ledger(&self) -> Result<(), Violation> {
        let mut seen = std::collections::BTreeSet::new();
        for fact in self.ledger.iter().rev() {
            let account = |s: usize, t: usize| &self.teachers[s][t].machine.account;
            match fact {
                Fact::Consumed {
                    s,
                    t,
                    event,
                    allowed,
                } => {
                    if !seen.insert((*s, *t, format!("event {}", event.as_str()))) {
                        continue;
                    }
                    let entry = account(*s, *t).events.get(event);
                    if entry.is_none() || (*allowed && !entry.is_some_and(|e| e.allowed)) {
                        return broken(
                            "I4 (acknowledged survives a crash)",
                            format!(
                                "school {s} teacher {t}: consume of {} (allowed={allowed}) is gone",
                                event.as_str()
                            ),
                        );
                    }
                }
                Fact::Synced { s, t, charged } => {
                    for event in charged {
                        if !seen.insert((*s, *t, format!("event {}", event.as_str()))) {
                            continue;
                        }
                        if !account(*s, *t).events.get(event).is_some_and(|e| e.allowed) {
                            return broken(
                                "I4 (acknowledged survives a crash)",
                                format!(
                                    "school {s} teacher {t}: synced {} is gone",
                                    event.as_str()
                                ),
                            );
                        }
                    }
                }
                Fact::Held { s, t, hold } | Fact::Committed { s, t, hold } => {
                    if !seen.insert((*s, *t, format!("hold {}", hold.as_str()))) {
                        continue;
                    }
                    let reservation = account(*s, *t).reservations.get(hold);
                    let committed = matches!(fact, Fact::Committed { .. });
                    let is_committed =
                        reservation.is_some_and(|r| matches!(r.state, HoldState::Committed(_)));
                    if reservation.is_none() || (committed && !is_committed) {
                        return broken(
                            "I4 (acknowledged survives a crash)",
                            format!(
                                "school {s} teacher {t}: hold {} is gone or uncommitted",
                                hold.as_str()
                            ),
                        );
                    }
                }
                Fact::Other => {}
            }
        }
        Ok(())
    }
}

/// I1 on a school's own books: its slices and loans fit in what it bought.
fn pools_fit(invariant: &'static str, s: usize, school: &SchoolState) -> Result<(), Violation> {
    for (service, pool) in &school.pools {
        let sum: u64 = school
            .slices
            .iter()
            .filter(|((_, sv), _)| sv == service)
            .map(|(_, terms)| terms.allocated_units)
            .sum();
        if sum != pool.allocated_units || sum + pool.borrowed_units > pool.cycle_units {
            return broken(
                invariant,
                format!(
                    "school {s} {service}: slices add up to {sum} (pool says {}), +{} lent, of {} bought",
                    pool.allocated_units, pool.borrowed_units, pool.cycle_units
                ),
            );
        }
    }
    Ok(())
}

/// I1 in the teachers' views, and I2: no slice uses more than it has
/// (overage aside), and the pool is never overspent. A teacher waiting on the
/// school (`None`) decides nothing: the school's terms stand in for it.
fn teachers_fit(
    invariant: &'static str,
    s: usize,
    school: &SchoolState,
    accounts: &[Option<TeacherAccount>],
) -> Result<(), Violation> {
    let service = service();
    let Some(pool) = school.pools.get(&service) else {
        return Ok(());
    };
    let mut allocated = 0u64;
    for (t, account) in accounts.iter().enumerate() {
        allocated += match account {
            Some(account) => account
                .slices
                .get(&service)
                .map_or(0, |slice| slice.allocated_units),
            None => school
                .slices
                .get(&(teacher_id(t), service.clone()))
                .map_or(0, |terms| terms.allocated_units),
        };
    }
    if allocated > pool.cycle_units {
        return broken(
            invariant,
            format!(
                "school {s}: teachers enforce {allocated} allocated units of {} bought",
                pool.cycle_units
            ),
        );
    }
    let mut used = 0u64;
    for (t, account) in accounts.iter().enumerate() {
        let Some(account) = account else { continue };
        if account.cycle_start_ms != school.cycle_start_ms {
            continue;
        }
        let Some(slice) = account.slices.get(&service) else {
            continue;
        };
        // Holds made before a rollover are settled at their commit, as overage.
        let held_this_cycle: u64 = account
            .reservations
            .values()
            .filter(|r| r.state == HoldState::Held && r.service == service)
            .filter(|r| r.created_at_ms >= account.cycle_start_ms)
            .map(|r| r.units)
            .sum();
        let within = slice.used_units.saturating_sub(slice.overage_units);
        if within + held_this_cycle > slice.allocated_units {
            return broken(
                invariant,
                format!(
                    "school {s} teacher {t}: used {} (overage {}) + held {held_this_cycle} exceed {} allocated",
                    slice.used_units, slice.overage_units, slice.allocated_units
                ),
            );
        }
        used += within + slice.borrowed_units;
    }
    if used > pool.cycle_units {
        return broken(
            invariant,
            format!(
                "school {s}: the pool is overspent: {used} units used (overage aside) of {} bought",
                pool.cycle_units
            ),
        );
    }
    Ok(())
}

/// I5: a teacher enforces the school's terms for its slice, or stricter.
fn terms_not_looser(
    s: usize,
    t: usize,
    account: &TeacherAccount,
    school: &SchoolState,
) -> Result<(), Violation> {
    // Terms are a cycle's terms: a teacher still counting an older cycle
    // holds the units the school has renewed, returned or moved on.
    if account.cycle_start_ms != school.cycle_start_ms {
        return broken(
            "I5 (teacher in its school's cycle)",
            format!(
                "school {s} teacher {t}: counts the cycle from {}, the school's began at {}",
                account.cycle_start_ms, school.cycle_start_ms
            ),
        );
    }
    // Every slice the teacher enforces is one the school lists (a slice the
    // school does not know of is one it cannot count: a ghost), and no more
    // generous in priority (only High borrows) or renewal. A slice the school
    // lists that the teacher lacks is stricter, and allowed.
    for (service, slice) in &account.slices {
        let terms = school.slices.get(&(teacher_id(t), service.clone()));
        let Some(terms) = terms else {
            return broken(
                "I5 (teacher's slices are the school's)",
                format!("school {s} teacher {t}: has a slice of {service} the school does not list: {slice:?}"),
            );
        };
        let borrows_more = slice.priority == Priority::High && terms.priority != Priority::High;
        let renews_more = slice.auto_renew && !terms.auto_renew;
        if borrows_more || renews_more {
            return broken(
                "I5 (teacher's slices are the school's)",
                format!(
                    "school {s} teacher {t} {service}: enforces priority {:?} auto-renew {}, the school says {:?} {}",
                    slice.priority, slice.auto_renew, terms.priority, terms.auto_renew
                ),
            );
        }
    }
    for (service, slice) in &account.slices {
        let terms = school.slices.get(&(teacher_id(t), service.clone()));
        let looser = match terms {
            None => slice.allocated_units > 0 && slice.status == SliceStatus::Active,
            Some(terms) => {
                slice.allocated_units > terms.allocated_units
                    || (terms.status == SliceStatus::Suspended
                        && slice.status == SliceStatus::Active)
            }
        };
        if looser {
            return broken(
                "I5 (teacher's terms no looser than the school's)",
                format!(
                    "school {s} teacher {t} {service}: enforces {} ({:?}), school says {:?}",
                    slice.allocated_units, slice.status, terms
                ),
            );
        }
    }
    Ok(())
}

/// A school's books in a line.
fn brief(school: &SchoolState) -> String {
    format!(
        "cycle {} pools {:?} slices {:?}",
        school.cycle_start_ms, school.pools, school.slices
    )
}
