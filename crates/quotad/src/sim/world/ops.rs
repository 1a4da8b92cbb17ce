//! Client calls: what one is ([`Op`]), making one from the seed, and
//! starting it: the engine message it becomes and the first mailbox it goes
//! to. A bulk change starts by freezing the teachers it names.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{
    change, event_id, hold_id, service, teacher_id, Flow, Msg, Node, SchoolCall, TeacherCall,
    World, SCHOOLS, TEACHERS,
};
use crate::engine::{
    Check, CheckPreviews, Commit, Consume, FileRequest, Release, RemoveSlice, Reserve,
    SetAllocation, SetPool, SetStatus, SliceSpec, UpdateSettings,
};
use crate::sim::{Protocol, Rng};
use quotad_core::{BillingAnchor, HoldRequest, Priority, SliceStatus, SyncEvent, TimestampMs};

/// A client call, with the values it was made with.
#[derive(Debug, Clone)]
pub enum Op {
    Consume {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
        event: u8,
    },
    Check {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
        reserve: bool,
    },
    Reserve {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
        hold: u8,
        ttl_ms: u64,
    },
    Commit {
        call: u64,
        s: usize,
        t: usize,
        hold: u8,
        actual: u64,
    },
    Release {
        call: u64,
        s: usize,
        t: usize,
        hold: u8,
    },
    Sync {
        call: u64,
        s: usize,
        t: usize,
        events: Vec<(u8, u64, i64)>,
    },
    /// Priority and auto-renew: None leaves them out (the slice keeps its own).
    Set {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
        auto_renew: Option<bool>,
        priority: Option<Priority>,
    },
    /// Per teacher: units, auto-renew and priority (None: keep).
    Bulk {
        call: u64,
        s: usize,
        slices: Vec<(usize, u64, Option<bool>, Option<Priority>)>,
    },
    Remove {
        call: u64,
        s: usize,
        t: usize,
    },
    Status {
        call: u64,
        s: usize,
        t: usize,
        suspend: bool,
    },
    File {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
    },
    Approve {
        call: u64,
        s: usize,
        request: u64,
        units: u64,
    },
    Reject {
        call: u64,
        s: usize,
        request: u64,
    },
    Pool {
        call: u64,
        s: usize,
        units: u64,
    },
    Settings {
        call: u64,
        s: usize,
        anchor_day: Option<u8>,
        borrowing: Option<bool>,
    },
}

impl World {
    /// A client call with values from the seed (the call's number is the
    /// next one, whatever the seed).
    pub(super) fn new_op(&mut self, rng: &mut Rng) -> Op {
        let call = self.next_call;
        self.next_call += 1;
        let s = rng.below(SCHOOLS as u64) as usize;
        let t = rng.below(TEACHERS as u64) as usize;
        let units = 1 + rng.below(6);
        let hold = rng.below(6) as u8;
        match rng.below(100) {
            0..=24 => Op::Consume {
                call,
                s,
                t,
                units,
                event: rng.below(16) as u8,
            },
            25..=31 => Op::Check {
                call,
                s,
                t,
                units,
                reserve: self.protocol == Protocol::Current && rng.chance(50),
            },
            32..=41 => Op::Reserve {
                call,
                s,
                t,
                units,
                hold,
                ttl_ms: 200 + rng.below(3000),
            },
            42..=48 => Op::Commit {
                call,
                s,
                t,
                hold,
                actual: rng.below(8),
            },
            49..=52 => Op::Release { call, s, t, hold },
            53..=57 => {
                let events = (0..1 + rng.below(3))
                    .map(|_| {
                        let back_ms = [0, 3_600_000, 3 * 86_400_000][rng.below(3) as usize];
                        (rng.below(16) as u8, 1 + rng.below(4), back_ms)
                    })
                    .collect();
                Op::Sync { call, s, t, events }
            }
            58..=69 => Op::Set {
                call,
                s,
                t,
                units: rng.below(8),
                auto_renew: rng.chance(75).then(|| rng.chance(60)),
                priority: rng.chance(75).then(|| {
                    if rng.chance(40) {
                        Priority::High
                    } else {
                        Priority::Normal
                    }
                }),
            },
            70..=79 => {
                let mut slices = Vec::new();
                for t in 0..TEACHERS {
                    if rng.chance(70) {
                        let auto_renew = rng.chance(75).then(|| rng.chance(60));
                        let priority = rng.chance(30).then_some(Priority::Normal);
                        slices.push((t, rng.below(8), auto_renew, priority));
                    }
                }
                Op::Bulk { call, s, slices }
            }
            80..=82 => Op::Remove { call, s, t },
            83..=86 => Op::Status {
                call,
                s,
                t,
                suspend: rng.chance(50),
            },
            87..=89 => Op::File {
                call,
                s,
                t,
                units: 1 + rng.below(4),
            },
            90..=92 => Op::Approve {
                call,
                s,
                request: 1 + rng.below(4),
                units: rng.below(4),
            },
            93 => Op::Reject {
                call,
                s,
                request: 1 + rng.below(4),
            },
            94..=96 => Op::Pool {
                call,
                s,
                units: 6 + rng.below(10),
            },
            _ => Op::Settings {
                call,
                s,
                anchor_day: rng.chance(50).then(|| [1, 2, 15][rng.below(3) as usize]),
                borrowing: rng.chance(50).then(|| rng.chance(50)),
            },
        }
    }

    /// A call's first message goes to the teacher or school it names (a bulk
    /// change's first messages freeze its teachers).
    pub(super) fn start_call(&mut self, op: &Op) {
        let now_ms = self.now_ms();
        let (call, to, msg, flow) = match op {
            Op::Bulk { call, s, slices } => {
                self.start_bulk(*call, *s, slices.clone(), now_ms);
                return;
            }
            Op::Consume { call, s, t, .. }
            | Op::Check { call, s, t, .. }
            | Op::Reserve { call, s, t, .. }
            | Op::Commit { call, s, t, .. }
            | Op::Release { call, s, t, .. }
            | Op::Sync { call, s, t, .. }
            | Op::Set { call, s, t, .. }
            | Op::Remove { call, s, t }
            | Op::Status { call, s, t, .. } => (
                *call,
                Node::Teacher(*s, *t),
                Msg::Teacher(teacher_message(op, now_ms)),
                Flow::One,
            ),
            // An approval takes two messages: the school prepares the grant,
            // then the teacher takes it.
            Op::Approve { call, s, .. } => (
                *call,
                Node::School(*s),
                Msg::School(school_message(op, now_ms)),
                Flow::Approve,
            ),
            Op::File { call, s, .. }
            | Op::Reject { call, s, .. }
            | Op::Pool { call, s, .. }
            | Op::Settings { call, s, .. } => (
                *call,
                Node::School(*s),
                Msg::School(school_message(op, now_ms)),
                Flow::One,
            ),
        };
        self.flows.insert(call, flow);
        self.send(Node::Call(call), to, false, msg);
    }

    /// The engine's bulk change: freeze every teacher named, then the school.
    fn start_bulk(
        &mut self,
        call: u64,
        s: usize,
        slices: Vec<(usize, u64, Option<bool>, Option<Priority>)>,
        now_ms: i64,
    ) {
        if self.bulk_busy[s] || slices.is_empty() {
            return;
        }
        self.bulk_busy[s] = true;
        let specs: Vec<SliceSpec> = slices
            .iter()
            .map(|(t, units, auto_renew, priority)| SliceSpec {
                teacher_id: teacher_id(*t),
                service: service(),
                allocated_units: *units,
                priority: *priority,
                auto_renew: *auto_renew,
            })
            .collect();
        let waiting: BTreeSet<usize> = slices.iter().map(|(t, ..)| *t).collect();
        for t in &waiting {
            self.send(
                Node::Call(call),
                Node::Teacher(s, *t),
                false,
                Msg::Teacher(TeacherCall::Freeze),
            );
        }
        let _ = now_ms;
        self.flows.insert(
            call,
            Flow::Bulk {
                s,
                slices: specs,
                waiting,
                frozen: Vec::new(),
                failed: false,
            },
        );
    }
}

/// What a teacher's call asks of its teacher.
fn teacher_message(op: &Op, now_ms: TimestampMs) -> TeacherCall {
    match op.clone() {
        Op::Consume { units, event, .. } => TeacherCall::Consume(Consume {
            service: service(),
            units,
            event_id: event_id(event),
            occurred_at_ms: 0,
            model: Arc::from("m"),
        }),
        Op::Check { units, reserve, .. } => TeacherCall::Check(Check {
            service: service(),
            units,
            previews: if reserve {
                CheckPreviews::Reserve
            } else {
                CheckPreviews::Consume
            },
        }),
        Op::Reserve {
            units,
            hold,
            ttl_ms,
            ..
        } => TeacherCall::Reserve(Reserve(HoldRequest {
            service: service(),
            units,
            ttl_ms,
            reservation_id: hold_id(hold),
            model: Arc::from("m"),
        })),
        Op::Commit { hold, actual, .. } => TeacherCall::Commit(Commit {
            reservation_id: hold_id(hold),
            actual_units: actual,
        }),
        Op::Release { hold, .. } => TeacherCall::Release(Release {
            reservation_id: hold_id(hold),
        }),
        Op::Sync { events, .. } => TeacherCall::Sync(
            events
                .into_iter()
                .map(|(event, units, back_ms)| SyncEvent {
                    service: service(),
                    units,
                    event_id: event_id(event),
                    occurred_at_ms: now_ms - back_ms,
                    model: Arc::from("m"),
                })
                .collect(),
        ),
        Op::Set {
            units,
            auto_renew,
            priority,
            ..
        } => TeacherCall::Set(SetAllocation {
            service: service(),
            allocated_units: units,
            priority,
            auto_renew,
            change: change(now_ms),
            managed: true,
        }),
        Op::Remove { .. } => TeacherCall::Remove(RemoveSlice {
            service: service(),
            change: change(now_ms),
        }),
        Op::Status { suspend, .. } => TeacherCall::Status(SetStatus {
            service: service(),
            status: if suspend {
                SliceStatus::Suspended
            } else {
                SliceStatus::Active
            },
            change: change(now_ms),
        }),
        Op::File { .. }
        | Op::Approve { .. }
        | Op::Reject { .. }
        | Op::Pool { .. }
        | Op::Settings { .. }
        | Op::Bulk { .. } => unreachable!("a school's call"),
    }
}

/// What a school's call asks of its school.
fn school_message(op: &Op, now_ms: TimestampMs) -> SchoolCall {
    match op.clone() {
        Op::File { t, units, .. } => SchoolCall::File(FileRequest {
            teacher_id: teacher_id(t),
            service: service(),
            units,
            change: change(now_ms),
        }),
        Op::Approve { request, units, .. } => SchoolCall::Prepare {
            request_id: request,
            units,
        },
        Op::Reject { request, .. } => SchoolCall::Reject {
            request_id: request,
        },
        Op::Pool { units, .. } => SchoolCall::Pool(SetPool {
            service: service(),
            cycle_units: units,
            change: change(now_ms),
        }),
        Op::Settings {
            anchor_day,
            borrowing,
            ..
        } => SchoolCall::Settings(UpdateSettings {
            name: None,
            borrowing_enabled: borrowing,
            self_service_requests: None,
            next_anchor: anchor_day.and_then(|d| BillingAnchor::new(u32::from(d)).ok()),
            change: change(now_ms),
        }),
        Op::Consume { .. }
        | Op::Check { .. }
        | Op::Reserve { .. }
        | Op::Commit { .. }
        | Op::Release { .. }
        | Op::Sync { .. }
        | Op::Set { .. }
        | Op::Remove { .. }
        | Op::Status { .. }
        | Op::Bulk { .. } => unreachable!("a teacher's call, or a bulk change"),
    }
}
