//! Time, durability and faults: timers firing, group commits (and failed
//! ones), actor panics, snapshots, power cuts with the restart that
//! follows, and the replay of the log that the invariants compare the live
//! state with.

use std::collections::VecDeque;

use super::{
    school_id, teacher_of, Chan, Charged, Flow, Msg, Node, Outcome, SchoolCall, TeacherCall, World,
    SCHOOLS,
};
use crate::engine::machine::Env;
use crate::engine::{Clock, EngineError};
use crate::sim::Violation;
use quotad_core::{Record, UsageSource};

impl World {
    /// An actor's housekeeping timer: a school rolls its cycle over if due
    /// and expires old requests; an idle teacher does its housekeeping.
    pub(super) fn tick(&mut self, node: Node) {
        let (now_ms, limits) = self.env_parts();
        let log = self.log.clone();
        let env = Env {
            now_ms,
            journal: &*log,
            limits: &limits,
        };
        match node {
            Node::School(s) => {
                let before = self.schools[s].school.cycle_start_ms;
                let _ = self.schools[s].roll_if_due(&env);
                let _ = self.schools[s].expire_requests(&env);
                self.after_school(s, before, None);
            }
            Node::Teacher(s, t) if self.teachers[s][t].idle() => {
                self.sync_own_cell(s, t);
                let _ = self.teachers[s][t].machine.tick(&env);
            }
            _ => {}
        }
    }

    /// A group commit: the log is durable to its end and the answers that
    /// waited for it are told (or, if the flush fails, none of them is).
    pub(super) fn flush(&mut self) {
        if self.log.poisoned.get() {
            return;
        }
        if self.fail_next_flush {
            self.fail_next_flush = false;
            self.log.poisoned.set(true);
            // Every answer that waited for the failed flush gets an error.
            self.waiting_durable.clear();
            return;
        }
        let end = self.log.records.borrow().len() as u64;
        self.log.durable.set(end);
        let (told, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_durable)
            .into_iter()
            .partition(|(_, seq, _)| *seq <= end);
        self.waiting_durable = waiting;
        self.ledger
            .extend(told.into_iter().map(|(_, _, fact)| fact));
    }

    /// An actor panics on the message at the head of a lane: the message is
    /// lost and its sender gets an error; the actor keeps its state.
    pub(super) fn panic(&mut self, chan: Chan) {
        if chan.oneshot || !self.can_take(&chan) {
            return;
        }
        let Some(msg) = self.lanes.get_mut(&chan).and_then(VecDeque::pop_front) else {
            return;
        };
        match (chan.from, msg) {
            (Node::Call(call), Msg::Teacher(TeacherCall::Freeze)) => {
                if let Node::Teacher(_, t) = chan.to {
                    self.bulk_frozen(call, t, Err(EngineError::Internal("panic".into())));
                }
            }
            (Node::Call(call), Msg::School(SchoolCall::Bulk(_))) => {
                if let Some(Flow::Bulk { waiting, .. }) = self.flows.get_mut(&call) {
                    waiting.clear();
                }
                self.abort_bulk(call);
            }
            (Node::Call(call), _) => {
                self.finish(
                    call,
                    Outcome {
                        result: Err("panic".into()),
                        wal_seq: None,
                    },
                );
            }
            (Node::Teacher(s, t), Msg::Ask(_)) => {
                // The teacher's wait ends with the mailbox error.
                self.send(
                    Node::School(s),
                    Node::Teacher(s, t),
                    true,
                    Msg::Answer(Err(EngineError::Internal("the school panicked".into()))),
                );
            }
            _ => {}
        }
    }

    /// The snapshotter writes the durable state: the last snapshot plus the
    /// durable records after it.
    pub(super) fn take_snapshot(&mut self) {
        let durable = self.log.durable.get();
        let mut state = self.snapshot.0.clone();
        let records = self.log.records.borrow();
        for seq in self.snapshot.1 + 1..=durable {
            let _ = state.apply(seq, &records[(seq - 1) as usize]);
        }
        drop(records);
        self.snapshot = (state, durable);
    }

    /// A power cut and a restart: the log keeps its durable prefix, the state
    /// is the snapshot plus the log after it, every actor starts anew.
    pub(super) fn crash(&mut self) {
        let durable = self.log.durable.get();
        self.log.records.borrow_mut().truncate(durable as usize);
        self.log.poisoned.set(false);
        self.fail_next_flush = false;
        let mut state = self.snapshot.0.clone();
        {
            let records = self.log.records.borrow();
            for seq in self.snapshot.1 + 1..=durable {
                if let Err(e) = state.apply(seq, &records[(seq - 1) as usize]) {
                    self.found.get_or_insert(Violation {
                        step: 0,
                        invariant: "I3 (recovery)",
                        detail: format!("the durable log does not replay: {e}"),
                    });
                }
            }
        }
        self.lanes.clear();
        self.flows.clear();
        self.waiting_durable.clear();
        self.bulk_busy = [false; SCHOOLS];
        // A new process: its clock starts from the source again.
        let source_ms = self.clock.now_ms();
        self.clock = Clock::manual(source_ms);
        self.start_actors(&state);
        self.replayed = state;
        self.replayed_through = durable;
        self.charges.retain(|_, _| true);
        self.rebuild_charges();
        if let Err(v) = self.check_ledger() {
            self.found.get_or_insert(v);
        }
    }

    /// After every step: the records appended since are applied to the
    /// replayed state (what a restart would see) and their charges counted.
    pub(super) fn catch_up_replay(&mut self) {
        let records = self.log.records.borrow();
        let end = records.len() as u64;
        for seq in self.replayed_through + 1..=end {
            let record = &records[(seq - 1) as usize];
            if let Err(e) = self.replayed.apply(seq, record) {
                self.found.get_or_insert(Violation {
                    step: 0,
                    invariant: "I3 (replay)",
                    detail: format!("record {seq} does not replay: {e}"),
                });
            }
            if let Some((key, at_ms)) = charge_key(record) {
                self.charges.entry(key).or_default().push(at_ms);
            }
        }
        drop(records);
        self.replayed_through = end;
    }

    /// The charges of the log as a restart has it.
    fn rebuild_charges(&mut self) {
        self.charges.clear();
        let records = self.log.records.borrow();
        for record in records.iter() {
            if let Some((key, at_ms)) = charge_key(record) {
                self.charges.entry(key).or_default().push(at_ms);
            }
        }
    }
}

/// A charge's id (event or hold) and when it was made.
fn charge_key(record: &Record) -> Option<((usize, usize, String), Charged)> {
    let Record::UsageCharged(usage) = record else {
        return None;
    };
    let s = (0..SCHOOLS).find(|s| school_id(*s) == usage.school_id)?;
    let t = teacher_of(s, &usage.teacher_id)?;
    let (id, remembered_from_ms) = match &usage.source {
        UsageSource::Event(e) => (format!("event {}", e.as_str()), usage.occurred_at_ms),
        UsageSource::Reservation { id, .. } => {
            (format!("hold {}", id.as_str()), usage.recorded_at_ms)
        }
    };
    let charged = Charged {
        remembered_from_ms,
        recorded_at_ms: usage.recorded_at_ms,
    };
    Some(((s, t, id), charged))
}
