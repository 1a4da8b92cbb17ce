//! A teacher taking a message: the call it runs on its machine, the ask it
//! may send its school first (it then waits for the answer), and how a
//! call finishes: its answer is told once its record is durable (I4). The
//! teachers' half of a bulk change (freeze, then thaw or abort) is here too.

use super::{
    error_text, Blocked, Fact, Finish, Flow, Msg, Node, Outcome, SchoolCall, TeacherCall, World,
};
use crate::engine::machine::{Env, Frozen, Started, TeacherMachine};
use crate::engine::{resolve_bulk, AllocationView, Commit, Durable, Release, Reply, Reserve};
use crate::sim::Protocol;
use quotad_core::{EventId, Record, SyncEvent, SyncOutcome};

impl World {
    /// A teacher takes the message at the head of a lane: a call, a
    /// school's answer or thaw, or (seed protocol) a push.
    pub(super) fn deliver_to_teacher(&mut self, from: Node, s: usize, t: usize, msg: Msg) {
        self.sync_own_cell(s, t);
        let (now_ms, limits) = self.env_parts();
        let log = self.log.clone();
        let env = Env {
            now_ms,
            journal: &*log,
            limits: &limits,
        };
        let call = match from {
            Node::Call(call) => Some(call),
            _ => None,
        };
        match msg {
            Msg::Teacher(TeacherCall::Check(check)) => {
                self.check_preview(s, t, &check, &env);
                let started = self.teachers[s][t].machine.check(check, &env);
                self.run_teacher(s, t, call, started, &env, |_, d| {
                    (Fact::Other, d.allowed, None)
                });
            }
            Msg::Teacher(call_msg) => self.teacher_call(s, t, call, call_msg, &env),
            Msg::Answer(answer) => {
                let node = &mut self.teachers[s][t];
                if let Blocked::Asking { call, finish } =
                    std::mem::replace(&mut node.blocked, Blocked::Idle)
                {
                    let outcome = finish(&mut node.machine, answer, &env);
                    self.finish(call, outcome);
                }
            }
            Msg::Thaw(written) => {
                let node = &mut self.teachers[s][t];
                node.machine.thaw(written);
                node.blocked = Blocked::Idle;
            }
            Msg::Push(wal_seq, mut record) => {
                // The seed applied a pushed record's terms whatever cycle it
                // was of: as if written in the teacher's current cycle.
                let own_cycle = self.teachers[s][t].machine.account.cycle_start_ms;
                if let Record::AllocationsSet { cycle_start_ms, .. } = &mut record {
                    *cycle_start_ms = own_cycle;
                }
                self.teachers[s][t].machine.apply(wal_seq, &record);
            }
            Msg::RollTo(start_ms) => self.teachers[s][t].machine.account.roll_to(start_ms),
            Msg::NextAnchor(anchor) => {
                self.teachers[s][t].machine.account.next_anchor = Some(anchor)
            }
            Msg::School(_) | Msg::Ask(_) => {}
        }
    }

    /// A teacher takes a call. Consume and the slice changes may ask the
    /// school first (see `run_teacher`); Reserve, Commit, Release and Sync
    /// answer at once. A Check is taken by `deliver_to_teacher`, which
    /// previews it first.
    fn teacher_call(&mut self, s: usize, t: usize, call: Option<u64>, msg: TeacherCall, env: &Env) {
        let machine = &mut self.teachers[s][t].machine;
        let outcome = match msg {
            TeacherCall::Consume(consume) => {
                let event = consume.event_id.clone();
                let started = machine.consume(consume, env);
                self.run_teacher(s, t, call, started, env, move |_, d| {
                    let fact = Fact::Consumed {
                        s,
                        t,
                        event,
                        allowed: d.value.allowed,
                    };
                    (fact, true, d.wal_seq)
                });
                return;
            }
            TeacherCall::Reserve(reserve) => reserved(machine, s, t, reserve, env),
            TeacherCall::Commit(commit) => committed(machine, s, t, commit, env),
            TeacherCall::Release(release) => released(machine, release, env),
            TeacherCall::Sync(events) => synced(machine, s, t, &events, env),
            TeacherCall::Freeze => {
                self.freeze(s, t, call, env);
                return;
            }
            TeacherCall::Set(msg) => {
                let started = machine.set_allocation(msg, env);
                self.run_slice_change(s, t, call, started, env);
                return;
            }
            TeacherCall::Grant(msg) => {
                let started = machine.grant_increase(msg, env);
                self.run_slice_change(s, t, call, started, env);
                return;
            }
            TeacherCall::Status(msg) => {
                let started = machine.set_status(msg, env);
                self.run_slice_change(s, t, call, started, env);
                return;
            }
            TeacherCall::Remove(msg) => {
                let started = machine.remove_slice(msg, env);
                self.run_slice_change(s, t, call, started, env);
                return;
            }
            TeacherCall::Check(_) => return,
        };
        if let Some(call) = call {
            self.finish_with_log(call, outcome, env);
        }
    }

    /// A bulk change's first message: the teacher freezes (in today's
    /// protocol it then takes nothing but its thaw).
    fn freeze(&mut self, s: usize, t: usize, call: Option<u64>, env: &Env) {
        let frozen = self.teachers[s][t].machine.freeze(env);
        if let (Ok(_), Protocol::Current) = (&frozen, self.protocol) {
            self.teachers[s][t].blocked = Blocked::Frozen;
        }
        if let Some(call) = call {
            self.bulk_frozen(call, t, frozen);
        }
    }

    fn run_slice_change(
        &mut self,
        s: usize,
        t: usize,
        call: Option<u64>,
        started: Reply<Started<Durable<AllocationView>>>,
        env: &Env,
    ) {
        self.run_teacher(s, t, call, started, env, |_, d| {
            (Fact::Other, true, d.wal_seq)
        });
    }

    /// A teacher's answer, or its ask to the school (the teacher then waits).
    fn run_teacher<T: 'static>(
        &mut self,
        s: usize,
        t: usize,
        call: Option<u64>,
        started: Reply<Started<T>>,
        env: &Env,
        fact: impl FnOnce(&TeacherMachine, T) -> (Fact, bool, Option<u64>) + 'static,
    ) {
        let Some(call) = call else { return };
        match started {
            Err(e) => self.finish_with_log(
                call,
                Outcome {
                    result: Err(error_text(&e)),
                    wal_seq: None,
                },
                env,
            ),
            Ok(Started::Done(value)) => {
                let machine = &self.teachers[s][t].machine;
                let (fact, _, wal_seq) = fact(machine, value);
                self.finish_with_log(
                    call,
                    Outcome {
                        result: Ok(fact),
                        wal_seq,
                    },
                    env,
                );
            }
            Ok(Started::Ask(ask, resume)) => {
                let finish: Finish =
                    Box::new(
                        move |machine, answer, env| match resume(machine, answer, env) {
                            Ok(value) => {
                                let (fact, _, wal_seq) = fact(machine, value);
                                Outcome {
                                    result: Ok(fact),
                                    wal_seq,
                                }
                            }
                            Err(e) => Outcome {
                                result: Err(error_text(&e)),
                                wal_seq: None,
                            },
                        },
                    );
                self.teachers[s][t].blocked = Blocked::Asking { call, finish };
                self.send(Node::Teacher(s, t), Node::School(s), false, Msg::Ask(ask));
            }
        }
    }

    /// `finish` while the log is taken out for an `Env`: answers are queued
    /// by position only, so the log is not needed.
    fn finish_with_log(&mut self, call: u64, outcome: Outcome, _env: &Env) {
        self.finish(call, outcome);
    }

    /// A call's last answer: told once its record is durable.
    pub(super) fn finish(&mut self, call: u64, outcome: Outcome) {
        let flow = self.flows.remove(&call);
        if let Some(Flow::Bulk { s, .. }) = flow {
            self.bulk_busy[s] = false;
        }
        let Ok(fact) = outcome.result else { return };
        match outcome.wal_seq {
            Some(seq) if seq > self.log.durable.get() => {
                self.waiting_durable.push((call, seq, fact))
            }
            _ => self.ledger.push(fact),
        }
    }

    /// A teacher a bulk change named has frozen (or failed to): once all
    /// have, the school gets the change, or every frozen teacher thaws.
    pub(super) fn bulk_frozen(&mut self, call: u64, t: usize, frozen: Reply<Frozen>) {
        let Some(Flow::Bulk {
            s,
            waiting,
            frozen: got,
            failed,
            ..
        }) = self.flows.get_mut(&call)
        else {
            return;
        };
        let s = *s;
        waiting.remove(&t);
        match frozen {
            Ok(f) => got.push((t, f)),
            Err(_) => *failed = true,
        }
        if !waiting.is_empty() {
            return;
        }
        if *failed {
            self.abort_bulk(call);
            return;
        }
        let Some(Flow::Bulk { slices, frozen, .. }) = self.flows.get(&call) else {
            return;
        };
        // As the engine does: what an entry left out is its frozen teacher's.
        let resolved = resolve_bulk(slices.clone(), frozen.iter().map(|(_, f)| f));
        let slices = match resolved {
            Ok(slices) => slices,
            Err(_) => {
                self.abort_bulk(call);
                return;
            }
        };
        self.send(
            Node::Call(call),
            Node::School(s),
            false,
            Msg::School(SchoolCall::Bulk(slices)),
        );
    }

    /// A bulk change that failed: every teacher it froze thaws unchanged.
    pub(super) fn abort_bulk(&mut self, call: u64) {
        let Some(Flow::Bulk {
            s,
            waiting,
            frozen,
            failed,
            ..
        }) = self.flows.get_mut(&call)
        else {
            return;
        };
        *failed = true;
        if !waiting.is_empty() {
            return;
        }
        let s = *s;
        let frozen: Vec<usize> = frozen.iter().map(|(t, _)| *t).collect();
        if self.protocol == Protocol::Current {
            for t in frozen {
                self.send(Node::Call(call), Node::Teacher(s, t), true, Msg::Thaw(None));
            }
        }
        self.finish(
            call,
            Outcome {
                result: Err("bulk failed".into()),
                wal_seq: None,
            },
        );
    }
}

/// An answer as the ledger takes it: the fact learned and the record's
/// position, or the error's text.
fn outcome_of(result: Reply<(Fact, Option<u64>)>) -> Outcome {
    match result {
        Ok((fact, wal_seq)) => Outcome {
            result: Ok(fact),
            wal_seq,
        },
        Err(e) => Outcome {
            result: Err(error_text(&e)),
            wal_seq: None,
        },
    }
}

fn reserved(
    machine: &mut TeacherMachine,
    s: usize,
    t: usize,
    reserve: Reserve,
    env: &Env,
) -> Outcome {
    let hold = reserve.0.reservation_id.clone();
    outcome_of(machine.reserve(reserve, env).map(|d| {
        // Allowed or denied, the decision is kept for the id.
        (Fact::Held { s, t, hold }, d.wal_seq)
    }))
}

fn committed(
    machine: &mut TeacherMachine,
    s: usize,
    t: usize,
    commit: Commit,
    env: &Env,
) -> Outcome {
    let hold = commit.reservation_id.clone();
    outcome_of(
        machine
            .commit(commit, env)
            .map(|d| (Fact::Committed { s, t, hold }, d.wal_seq)),
    )
}

fn released(machine: &mut TeacherMachine, release: Release, env: &Env) -> Outcome {
    outcome_of(
        machine
            .release(release, env)
            .map(|d| (Fact::Other, d.wal_seq)),
    )
}

/// A sync's answer: which of its events were charged (I4 holds them).
fn synced(
    machine: &mut TeacherMachine,
    s: usize,
    t: usize,
    events: &[SyncEvent],
    env: &Env,
) -> Outcome {
    let ids: Vec<EventId> = events.iter().map(|e| e.event_id.clone()).collect();
    outcome_of(machine.sync(events, env).map(|d| {
        let charged = ids
            .into_iter()
            .zip(&d.value)
            .filter(|(_, o)| is_charged(o))
            .map(|(id, _)| id)
            .collect();
        (Fact::Synced { s, t, charged }, d.wal_seq)
    }))
}

fn is_charged(outcome: &SyncOutcome) -> bool {
    matches!(
        outcome,
        SyncOutcome::Accepted { .. } | SyncOutcome::AcceptedOverQuota { .. }
    )
}
