//! A school taking a message: a teacher's ask (answered on a one-shot
//! lane), or a call: pools, settings, requests and their approval, and the
//! school's half of a bulk change. In the seed protocol the school then
//! tells its teachers of a rollover or a new anchor through their mailboxes.

use super::{change, error_text, teacher_of, Fact, Flow, Msg, Node, Outcome, SchoolCall, World};
use super::{teacher_id, TeacherCall, TEACHERS};
use crate::engine::machine::{Env, Frozen};
use crate::engine::{GrantIncrease, Reply};
use crate::sim::Protocol;
use quotad_core::{
    BillingAnchor, Grant, RuleLimits, ServiceType, SliceSet, TeacherId, TimestampMs,
};

impl World {
    /// A school takes the message at the head of a lane: a teacher's ask,
    /// or a call (admin changes, requests, a bulk change's decision).
    pub(super) fn deliver_to_school(&mut self, from: Node, s: usize, msg: Msg) {
        let (now_ms, limits) = self.env_parts();
        let log = self.log.clone();
        let env = Env {
            now_ms,
            journal: &*log,
            limits: &limits,
        };
        let cycle_before = self.schools[s].school.cycle_start_ms;
        let call = match from {
            Node::Call(call) => Some(call),
            _ => None,
        };
        let mut next_anchor = None;
        match msg {
            Msg::Ask(ask) => {
                let answer = self.schools[s].answer(ask, &env);
                if let Node::Teacher(_, t) = from {
                    self.send(
                        Node::School(s),
                        Node::Teacher(s, t),
                        true,
                        Msg::Answer(answer),
                    );
                }
            }
            Msg::School(school_call) => {
                if let SchoolCall::Settings(settings) = &school_call {
                    next_anchor = settings.next_anchor;
                }
                let machine = &mut self.schools[s];
                let outcome = match school_call {
                    SchoolCall::Pool(msg) => recorded(machine.set_pool(msg, &env)),
                    SchoolCall::Settings(msg) => {
                        let r = machine.update_settings(msg, &env);
                        if r.is_err() {
                            next_anchor = None;
                        }
                        recorded(r)
                    }
                    SchoolCall::File(msg) => recorded(
                        machine
                            .file_request(msg, &env)
                            .map(|d| d.wal_seq.unwrap_or(0)),
                    ),
                    SchoolCall::Reject { request_id } => recorded(
                        machine
                            .reject_request(request_id, change(now_ms), &env)
                            .map(|d| d.wal_seq.unwrap_or(0)),
                    ),
                    SchoolCall::Prepare { request_id, units } => {
                        let prepared = machine.prepare_grant(request_id, units);
                        if let Some(call) = call {
                            self.granted(call, s, prepared, now_ms);
                            return;
                        }
                        recorded(Ok(0))
                    }
                    SchoolCall::Bulk(slices) => {
                        if let Some(call) = call {
                            self.bulk_at_school(call, s, slices, now_ms, &limits);
                            self.after_school(s, cycle_before, None);
                            return;
                        }
                        recorded(Ok(0))
                    }
                };
                if let Some(call) = call {
                    self.finish(call, outcome);
                }
            }
            _ => {}
        }
        self.after_school(s, cycle_before, next_anchor);
    }

    /// A bulk change at its school, once every teacher it names is frozen:
    /// decided against their floors, then each teacher thaws with its part
    /// (the seed protocol pushes the part through the mailbox instead).
    fn bulk_at_school(
        &mut self,
        call: u64,
        s: usize,
        slices: Vec<SliceSet>,
        now_ms: i64,
        limits: &RuleLimits,
    ) {
        let Some(Flow::Bulk { frozen, .. }) = self.flows.get(&call) else {
            return;
        };
        let frozen_teachers: Vec<usize> = frozen.iter().map(|(t, _)| *t).collect();
        let floors: Vec<Frozen> = frozen.iter().map(|(_, f)| f.clone()).collect();
        let log = self.log.clone();
        let env = Env {
            now_ms,
            journal: &*log,
            limits,
        };
        let decided = self.schools[s].bulk_set(slices, change(now_ms), &floors, &env);
        match decided {
            Ok((wal_seq, parts)) => {
                for t in frozen_teachers {
                    let part = parts
                        .iter()
                        .find(|(id, _)| *id == teacher_id(t))
                        .map(|(_, r)| (wal_seq, r.clone()));
                    match self.protocol {
                        Protocol::Current => {
                            self.send(Node::Call(call), Node::Teacher(s, t), true, Msg::Thaw(part))
                        }
                        Protocol::Seed => {
                            if let Some((seq, record)) = part {
                                self.send(
                                    Node::School(s),
                                    Node::Teacher(s, t),
                                    false,
                                    Msg::Push(seq, record),
                                );
                            }
                        }
                    }
                }
                self.finish(
                    call,
                    Outcome {
                        result: Ok(Fact::Other),
                        wal_seq: Some(wal_seq),
                    },
                );
            }
            Err(_) => self.abort_bulk(call),
        }
    }

    /// The second half of an approval: the grant goes to the teacher.
    fn granted(
        &mut self,
        call: u64,
        s: usize,
        prepared: Reply<(TeacherId, ServiceType, Grant)>,
        now_ms: i64,
    ) {
        let Ok((teacher, service, grant)) = prepared else {
            self.finish(
                call,
                Outcome {
                    result: Err("not pending".into()),
                    wal_seq: None,
                },
            );
            return;
        };
        let Some(t) = teacher_of(s, &teacher) else {
            self.finish(
                call,
                Outcome {
                    result: Err("unknown teacher".into()),
                    wal_seq: None,
                },
            );
            return;
        };
        debug_assert!(matches!(self.flows.get(&call), Some(Flow::Approve)));
        self.flows.insert(call, Flow::One);
        let msg = GrantIncrease {
            service,
            grant,
            change: change(now_ms),
        };
        self.send(
            Node::Call(call),
            Node::Teacher(s, t),
            false,
            Msg::Teacher(TeacherCall::Grant(msg)),
        );
    }

    /// Seed protocol: the school tells its teachers of a rollover (a message
    /// a full mailbox drops) and of a new anchor.
    pub(super) fn after_school(
        &mut self,
        s: usize,
        cycle_before: TimestampMs,
        next_anchor: Option<BillingAnchor>,
    ) {
        if self.protocol != Protocol::Seed {
            return;
        }
        let now = self.schools[s].school.cycle_start_ms;
        for t in 0..TEACHERS {
            if now != cycle_before {
                self.send(
                    Node::School(s),
                    Node::Teacher(s, t),
                    false,
                    Msg::RollTo(now),
                );
            }
            if let Some(anchor) = next_anchor {
                self.send(
                    Node::School(s),
                    Node::Teacher(s, t),
                    false,
                    Msg::NextAnchor(anchor),
                );
            }
        }
    }
}

/// A school call's answer: the position of the record it wrote (0 when
/// it wrote none), or the error's text.
fn recorded(result: Reply<u64>) -> Outcome {
    match result {
        Ok(seq) => Outcome {
            result: Ok(Fact::Other),
            wal_seq: Some(seq),
        },
        Err(e) => Outcome {
            result: Err(error_text(&e)),
            wal_seq: None,
        },
    }
}
