//! The whole state as the log describes it: every school and every teacher
//! account. Recovery builds it by replaying records; the snapshotter keeps one
//! up to date with the durable records and writes it down.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::account::TeacherAccount;
use super::cycle::TimestampMs;
use super::ids::{SchoolId, TeacherId};
use super::limits::RuleLimits;
use super::record::Record;
use super::school::SchoolState;

/// A record that cannot belong to the state it is applied to: the log is
/// damaged or out of order. Recovery stops rather than guess.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("record {wal_seq} ({kind}) names school {school_id}, which {problem}")]
pub struct ApplyError {
    pub wal_seq: u64,
    pub kind: &'static str,
    pub school_id: SchoolId,
    pub problem: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub schools: BTreeMap<SchoolId, SchoolState>,
    pub accounts: BTreeMap<(SchoolId, TeacherId), TeacherAccount>,
}

impl State {
    pub fn apply(&mut self, wal_seq: u64, record: &Record) -> Result<(), ApplyError> {
        let error = |problem| ApplyError {
            wal_seq,
            kind: record.kind(),
            school_id: record.school_id().clone(),
            problem,
        };
        if let Record::SchoolCreated {
            config,
            cycle_start_ms,
            pools,
            ..
        } = record
        {
            if self.schools.contains_key(&config.id) {
                return Err(error("exists already"));
            }
            let mut school = SchoolState::new(config.clone(), *cycle_start_ms, pools);
            school.apply(record);
            self.schools.insert(config.id.clone(), school);
            return Ok(());
        }
        let school = self
            .schools
            .get_mut(record.school_id())
            .ok_or_else(|| error("does not exist"))?;
        let cycle_before_ms = school.cycle_start_ms;
        school.apply(record);
        let school_cycle_ms = school.cycle_start_ms;
        match record.teacher_id() {
            Some(teacher_id) => {
                let key = (school.config.id.clone(), teacher_id.clone());
                self.accounts
                    .entry(key)
                    .or_insert_with(|| school.new_account(teacher_id.clone()))
                    .apply(wal_seq, record);
            }
            None => {
                for (teacher_id, own) in record.allocations_per_teacher() {
                    let key = (school.config.id.clone(), teacher_id.clone());
                    self.accounts
                        .entry(key)
                        .or_insert_with(|| school.new_account(teacher_id))
                        .apply(wal_seq, &own);
                }
                if let Record::SettingsSet {
                    next_anchor: Some(anchor),
                    ..
                } = record
                {
                    let id = record.school_id().clone();
                    for account in self.accounts_of_mut(&id) {
                        account.next_anchor = Some(*anchor);
                    }
                }
            }
        }
        // Teachers follow their school's cycle (live, through the cycle
        // cell), so in the replay every account rolls when its school does,
        // whichever record made the school roll.
        if school_cycle_ms != cycle_before_ms {
            let id = record.school_id().clone();
            let info = self
                .schools
                .get(&id)
                .map(SchoolState::cycle_info)
                .ok_or_else(|| error("does not exist"))?;
            for account in self.accounts_of_mut(&id) {
                account.follow_school(info);
            }
        }
        Ok(())
    }

    pub fn accounts_of<'a>(
        &'a self,
        school_id: &'a SchoolId,
    ) -> impl Iterator<Item = &'a TeacherAccount> + 'a {
        self.accounts
            .range((school_id.clone(), min_teacher())..)
            .take_while(move |((s, _), _)| s == school_id)
            .map(|(_, a)| a)
    }

    fn accounts_of_mut<'a>(
        &'a mut self,
        school_id: &'a SchoolId,
    ) -> impl Iterator<Item = &'a mut TeacherAccount> + 'a {
        self.accounts
            .range_mut((school_id.clone(), min_teacher())..)
            .take_while(move |((s, _), _)| s == school_id)
            .map(|(_, a)| a)
    }

    /// Forgets ids older than the idempotency window in every account.
    pub fn prune(&mut self, now_ms: TimestampMs, limits: &RuleLimits) {
        for account in self.accounts.values_mut() {
            account.prune(now_ms, limits);
        }
    }
}

fn min_teacher() -> TeacherId {
    // The smallest valid teacher id: "-" sorts before digits and letters, and
    // a one-character id sorts before any longer one starting with it.
    TeacherId::parse("-").unwrap_or_else(|_| unreachable!("\"-\" is a valid teacher id"))
}
