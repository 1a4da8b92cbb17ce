//! Holding Check to what it previews (I6): before a teacher takes a Check,
//! the Check and the call it previews are both run on copies of the
//! teacher and its school, against a scratch log, and must agree.

use std::cell::Cell;
use std::sync::Arc;

use super::World;
use crate::engine::machine::{Env, Journal, SchoolMachine, Started, TeacherMachine};
use crate::engine::{Check, CheckPreviews, Consume, Reserve};
use crate::sim::{Protocol, Violation};
use crate::storage::WalError;
use quotad_core::{EventId, HoldRequest, Record, ReservationId};

/// A log for predictions on copies: positions that mean nothing.
#[derive(Default)]
struct Scratch(Cell<u64>);

impl Journal for Scratch {
    fn append(&self, _: &Record) -> Result<u64, WalError> {
        self.0.set(self.0.get() + 1);
        Ok(u64::MAX / 2 + self.0.get())
    }
}

impl World {
    /// I6: a Check answers what the call it previews would answer now (on
    /// copies of the teacher and school, in the same state). The seed's
    /// Check previewed Consume, and is held to agree with Reserve.
    pub(super) fn check_preview(&mut self, s: usize, t: usize, check: &Check, env: &Env) {
        let scratch = Scratch::default();
        let scratch_env = Env {
            now_ms: env.now_ms,
            journal: &scratch,
            limits: env.limits,
        };
        let previewed = match (self.protocol, check.previews) {
            (Protocol::Seed, _) | (_, CheckPreviews::Reserve) => CheckPreviews::Reserve,
            (Protocol::Current, CheckPreviews::Consume) => CheckPreviews::Consume,
        };
        let said = self.predict_check(s, t, check.clone(), &scratch_env);
        let would = self.predict_call(s, t, check, previewed, &scratch_env);
        if let (Some(said), Some(would)) = (said, would) {
            if said != would {
                self.found.get_or_insert(Violation {
                    step: 0,
                    invariant: "I6 (Check agrees with the call it previews)",
                    detail: format!(
                        "school {s} teacher {t}: Check of {} units said allowed={said}, {previewed:?} would say allowed={would}",
                        check.units
                    ),
                });
            }
        }
    }

    /// The teacher and its school as they are, to run a call on.
    fn copies(&self, s: usize, t: usize) -> (TeacherMachine, SchoolMachine) {
        (
            self.teachers[s][t].machine.clone(),
            SchoolMachine::new(self.schools[s].school.clone()),
        )
    }

    /// What the Check says, run on copies.
    fn predict_check(&self, s: usize, t: usize, check: Check, env: &Env) -> Option<bool> {
        let (mut teacher, mut school) = self.copies(s, t);
        match teacher.check(check, env).ok()? {
            Started::Done(d) => Some(d.allowed),
            Started::Ask(ask, resume) => {
                let answer = school.answer(ask, env);
                resume(&mut teacher, answer, env).ok().map(|d| d.allowed)
            }
        }
    }

    /// What the call a Check previews would say, run on copies.
    fn predict_call(
        &self,
        s: usize,
        t: usize,
        check: &Check,
        call: CheckPreviews,
        env: &Env,
    ) -> Option<bool> {
        let (mut teacher, mut school) = self.copies(s, t);
        match call {
            CheckPreviews::Consume => {
                let consume = Consume {
                    service: check.service.clone(),
                    units: check.units,
                    event_id: EventId::parse("sim-preview").ok()?,
                    occurred_at_ms: 0,
                    model: Arc::from("m"),
                };
                match teacher.consume(consume, env).ok()? {
                    Started::Done(d) => Some(d.value.allowed),
                    Started::Ask(ask, resume) => {
                        let answer = school.answer(ask, env);
                        resume(&mut teacher, answer, env)
                            .ok()
                            .map(|d| d.value.allowed)
                    }
                }
            }
            CheckPreviews::Reserve => {
                let hold = HoldRequest {
                    service: check.service.clone(),
                    units: check.units,
                    ttl_ms: 1_000,
                    reservation_id: ReservationId::parse("sim-preview").ok()?,
                    model: Arc::from("m"),
                };
                teacher
                    .reserve(Reserve(hold), env)
                    .ok()
                    .map(|d| d.value.0.allowed)
            }
        }
    }
}
