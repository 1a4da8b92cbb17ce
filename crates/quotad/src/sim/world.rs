//! The simulated world: two schools of three teachers, one service type,
//! small pools; the production machines; mailboxes; a log whose tail a power
//! cut loses; client calls as the engine makes them.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use super::{Protocol, Rng, Violation};
use crate::engine::machine::{
    CycleCell, Env, Frozen, Journal, SchoolAnswer, SchoolAsk, SchoolMachine, Started,
    TeacherMachine,
};
use crate::engine::{
    Check, CheckPreviews, Clock, Commit, Consume, EngineError, FileRequest, GrantIncrease, Release,
    RemoveSlice, Reply, Reserve, SetAllocation, SetPool, SetStatus, UpdateSettings,
};
use crate::storage::WalError;
use quotad_core::{
    BillingAnchor, Change, CycleInfo, EventId, HoldRequest, Priority, Record, ReservationId,
    RuleLimits, SchoolConfig, SchoolId, SchoolState, ServiceType, SliceSet, SliceStatus, State,
    SyncEvent, TeacherId, Tier, TimestampMs,
};

pub const SCHOOLS: usize = 2;
pub const TEACHERS: usize = 3;
/// The pool each school starts with.
const POOL_UNITS: u64 = 10;
/// 2026-11-30T22:00:00Z: two hours before a cycle boundary.
const START_MS: TimestampMs = 1_796_076_000_000;
/// Every action takes this long on the simulated clock.
const STEP_MS: i64 = 10;

/// An actor, or one client call (each call is its own sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Call(u64),
    School(usize),
    Teacher(usize, usize),
}

/// A mailbox lane from one sender to one actor (FIFO), or a one-shot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chan {
    pub from: Node,
    pub to: Node,
    pub oneshot: bool,
}

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
    Set {
        call: u64,
        s: usize,
        t: usize,
        units: u64,
        auto_renew: bool,
        high: bool,
    },
    Bulk {
        call: u64,
        s: usize,
        slices: Vec<(usize, u64, bool)>,
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

/// One step of a run.
#[derive(Debug, Clone)]
pub enum Action {
    /// A client makes a call.
    Client(Op),
    /// The actor at the end of the lane takes the message at its head.
    Deliver(Chan),
    /// An actor's housekeeping timer fires.
    Tick(Node),
    /// A group commit: everything appended is durable.
    Flush,
    /// The actor panics on the message at the head of the lane: the message
    /// is lost, its sender gets an error, the supervisor restarts the actor
    /// with its state.
    Panic(Chan),
    /// Power cut: what is not durable is lost; quotad restarts from the
    /// snapshot and the log.
    Crash,
    /// The snapshotter writes the durable state.
    Snapshot,
    /// The clock's source jumps (back too).
    Clock(i64),
    /// The next flush fails: the log is poisoned until a restart.
    FailFlush,
    /// Seed protocol only: a rollover message meets a full mailbox.
    DropPush(Chan),
}

enum Msg {
    Teacher(TeacherCall),
    School(SchoolCall),
    Ask(SchoolAsk),
    Answer(Reply<SchoolAnswer>),
    Thaw(Option<(u64, Record)>),
    /// Seed protocol: the school pushes a bulk record to a teacher.
    Push(u64, Record),
    /// Seed protocol: the school tells a teacher a cycle began.
    RollTo(TimestampMs),
    /// Seed protocol: the school tells a teacher the next anchor.
    NextAnchor(BillingAnchor),
}

enum TeacherCall {
    Consume(Consume),
    Check(Check),
    Reserve(Reserve),
    Commit(Commit),
    Release(Release),
    Sync(Vec<SyncEvent>),
    Set(SetAllocation),
    Grant(GrantIncrease),
    Status(SetStatus),
    Remove(RemoveSlice),
    Freeze,
}

enum SchoolCall {
    Bulk(Vec<SliceSet>),
    Pool(SetPool),
    Settings(UpdateSettings),
    File(FileRequest),
    Prepare { request_id: u64, units: u64 },
    Reject { request_id: u64 },
}

/// What a call learned, for the ledger of acknowledged facts (I4).
#[derive(Debug, Clone)]
pub(super) enum Fact {
    Consumed {
        s: usize,
        t: usize,
        event: EventId,
        allowed: bool,
    },
    Held {
        s: usize,
        t: usize,
        hold: ReservationId,
    },
    Committed {
        s: usize,
        t: usize,
        hold: ReservationId,
    },
    Synced {
        s: usize,
        t: usize,
        charged: Vec<EventId>,
    },
    Other,
}

type Finish = Box<dyn FnOnce(&mut TeacherMachine, Reply<SchoolAnswer>, &Env) -> Outcome>;

struct Outcome {
    result: Result<Fact, String>,
    wal_seq: Option<u64>,
}

enum Blocked {
    Idle,
    Asking { call: u64, finish: Finish },
    Frozen,
}

pub(super) struct TeacherNode {
    pub machine: TeacherMachine,
    blocked: Blocked,
    /// Seed protocol: the teacher's own view of the cycle (no shared cell).
    own_cell: Option<Arc<CycleCell>>,
}

impl TeacherNode {
    pub fn idle(&self) -> bool {
        matches!(self.blocked, Blocked::Idle)
    }
}

/// A call that takes more than one message.
enum Flow {
    One,
    Approve,
    Bulk {
        s: usize,
        slices: Vec<SliceSet>,
        waiting: BTreeSet<usize>,
        frozen: Vec<(usize, Frozen)>,
        failed: bool,
    },
}

/// The log: positions from 1, a durable prefix, a poisoned flag.
#[derive(Default)]
pub struct SimLog {
    pub records: RefCell<Vec<Record>>,
    pub durable: Cell<u64>,
    pub poisoned: Cell<bool>,
}

impl Journal for SimLog {
    fn append(&self, record: &Record) -> Result<u64, WalError> {
        if self.poisoned.get() {
            return Err(WalError::Poisoned("a simulated flush failed".into()));
        }
        let mut records = self.records.borrow_mut();
        records.push(record.clone());
        Ok(records.len() as u64)
    }
}

/// A log for predictions on copies: positions that mean nothing.
#[derive(Default)]
struct Scratch(Cell<u64>);

impl Journal for Scratch {
    fn append(&self, _: &Record) -> Result<u64, WalError> {
        self.0.set(self.0.get() + 1);
        Ok(u64::MAX / 2 + self.0.get())
    }
}

pub struct World {
    pub(super) protocol: Protocol,
    pub(super) clock: Clock,
    pub(super) limits: RuleLimits,
    pub(super) log: Rc<SimLog>,
    pub(super) schools: Vec<SchoolMachine>,
    pub(super) teachers: Vec<Vec<TeacherNode>>,
    lanes: BTreeMap<Chan, VecDeque<Msg>>,
    flows: BTreeMap<u64, Flow>,
    /// Answers waiting for their record to be durable: (call, position, fact).
    waiting_durable: Vec<(u64, u64, Fact)>,
    /// A bulk change in flight per school (the engine's lock).
    bulk_busy: [bool; SCHOOLS],
    next_call: u64,
    fail_next_flush: bool,
    /// The durable state the snapshotter wrote, and through which position.
    snapshot: (State, u64),
    /// Every record appended so far, applied in order (what a restart replays).
    pub(super) replayed: State,
    replayed_through: u64,
    /// Acknowledged facts: what a crash may not undo.
    pub(super) ledger: Vec<Fact>,
    /// Charges per id: (school, teacher, id) -> times recorded.
    charges: BTreeMap<(usize, usize, String), Vec<Charged>>,
    /// A violation found while executing (I4 at a restart, I6 at a Check).
    pub(super) found: Option<Violation>,
    /// Invariants (name prefixes) the run looks past.
    pub(super) ignore: Vec<String>,
}

pub(super) fn school_id(s: usize) -> SchoolId {
    SchoolId::parse(&format!("s{s}")).unwrap_or_else(|_| unreachable!("a valid id"))
}

pub(super) fn teacher_id(t: usize) -> TeacherId {
    TeacherId::parse(&format!("t{t}")).unwrap_or_else(|_| unreachable!("a valid id"))
}

pub(super) fn service() -> ServiceType {
    ServiceType::parse("chat").unwrap_or_else(|_| unreachable!("a valid id"))
}

fn event_id(n: u8) -> EventId {
    EventId::parse(&format!("e{n}")).unwrap_or_else(|_| unreachable!("a valid id"))
}

fn hold_id(n: u8) -> ReservationId {
    ReservationId::parse(&format!("h{n}")).unwrap_or_else(|_| unreachable!("a valid id"))
}

fn change(at_ms: TimestampMs) -> Change {
    Change {
        by: Arc::from("principal"),
        reason: Arc::from("sim"),
        at_ms,
    }
}

fn teacher_of(s: usize, id: &TeacherId) -> Option<usize> {
    (0..TEACHERS)
        .find(|t| &teacher_id(*t) == id)
        .filter(|_| s < SCHOOLS)
}

fn error_text(error: &EngineError) -> String {
    error.to_string()
}

impl World {
    pub fn new(protocol: Protocol) -> Self {
        let clock = Clock::manual(START_MS);
        let log = SimLog::default();
        let mut state = State::default();
        let now_ms = clock.now_ms();
        for s in 0..SCHOOLS {
            let config = SchoolConfig {
                id: school_id(s),
                name: Arc::from(format!("school {s}")),
                tier: Tier::K12,
                anchor: BillingAnchor::default(),
                borrowing_enabled: s == 0,
                self_service_requests: true,
            };
            let cycle = config
                .anchor
                .cycle_at(now_ms)
                .unwrap_or_else(|_| unreachable!("the start is in range"));
            let record = Record::SchoolCreated {
                config,
                cycle_start_ms: cycle.start_ms,
                pools: vec![(service(), POOL_UNITS)],
                change: change(now_ms),
            };
            let seq = log
                .append(&record)
                .unwrap_or_else(|_| unreachable!("a fresh log"));
            state
                .apply(seq, &record)
                .unwrap_or_else(|e| unreachable!("a new school applies: {e}"));
        }
        log.durable.set(log.records.borrow().len() as u64);
        let through = log.durable.get();
        let mut world = Self {
            protocol,
            clock,
            limits: RuleLimits::default(),
            log: Rc::new(log),
            schools: Vec::new(),
            teachers: Vec::new(),
            lanes: BTreeMap::new(),
            flows: BTreeMap::new(),
            waiting_durable: Vec::new(),
            bulk_busy: [false; SCHOOLS],
            next_call: 1,
            fail_next_flush: false,
            snapshot: (state.clone(), through),
            replayed: state.clone(),
            replayed_through: through,
            ledger: Vec::new(),
            charges: BTreeMap::new(),
            found: None,
            ignore: Vec::new(),
        };
        world.start_actors(&state);
        world
    }

    /// The actors of a recovered state, as `Engine::start` makes them.
    fn start_actors(&mut self, state: &State) {
        self.schools.clear();
        self.teachers.clear();
        for s in 0..SCHOOLS {
            let school = state
                .schools
                .get(&school_id(s))
                .cloned()
                .unwrap_or_else(|| unreachable!("every school is created at the start"));
            let machine = SchoolMachine::new(school);
            let mut teachers = Vec::new();
            for t in 0..TEACHERS {
                let account = state
                    .accounts
                    .get(&(school_id(s), teacher_id(t)))
                    .cloned()
                    .unwrap_or_else(|| machine.school.new_account(teacher_id(t)));
                let (cell, own_cell) = match self.protocol {
                    Protocol::Current => (machine.cycle_cell(), None),
                    Protocol::Seed => {
                        let own = CycleCell::new(own_view(&account));
                        (own.clone(), Some(own))
                    }
                };
                teachers.push(TeacherNode {
                    machine: TeacherMachine::new(account, cell),
                    blocked: Blocked::Idle,
                    own_cell,
                });
            }
            self.schools.push(machine);
            self.teachers.push(teachers);
        }
    }

    pub(super) fn now_ms(&self) -> TimestampMs {
        self.clock.now_ms()
    }

    // ---- choosing --------------------------------------------------------

    fn deliverable(&self) -> Vec<Chan> {
        self.lanes
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .filter(|(chan, _)| self.can_take(chan))
            .map(|(chan, _)| *chan)
            .collect()
    }

    fn can_take(&self, chan: &Chan) -> bool {
        match chan.to {
            Node::Teacher(s, t) => {
                let node = &self.teachers[s][t];
                match (&node.blocked, chan.oneshot) {
                    (Blocked::Idle, oneshot) => !oneshot,
                    (Blocked::Asking { .. }, true) => chan.from == Node::School(s),
                    (Blocked::Frozen, true) => matches!(chan.from, Node::Call(_)),
                    _ => false,
                }
            }
            _ => true,
        }
    }

    /// Mailbox lanes whose head an actor could panic on.
    fn panickable(&self) -> Vec<Chan> {
        self.deliverable()
            .into_iter()
            .filter(|c| !c.oneshot)
            .collect()
    }

    pub fn choose(&mut self, rng: &mut Rng) -> Action {
        loop {
            let roll = rng.below(1000);
            let action = match roll {
                0..=449 => rng.pick(&self.deliverable()).map(|c| Action::Deliver(*c)),
                450..=699 => Some(Action::Client(self.new_op(rng))),
                700..=799 => Some(Action::Flush),
                800..=879 => Some(self.tick_action(rng)),
                880..=919 => Some(Action::Clock(self.clock_jump(rng))),
                920..=939 => Some(Action::Snapshot),
                940..=964 => rng.pick(&self.panickable()).map(|c| Action::Panic(*c)),
                965..=979 => Some(Action::Crash),
                980..=984 => Some(Action::FailFlush),
                _ => self.droppable_push(rng),
            };
            if let Some(action) = action {
                if self.log.poisoned.get() && rng.chance(20) {
                    return Action::Crash;
                }
                return action;
            }
        }
    }

    /// Jumps of every size, both ways; a third of them to just before a
    /// school's next boundary, where rollovers race everything else.
    fn clock_jump(&self, rng: &mut Rng) -> i64 {
        const HOUR: i64 = 3_600_000;
        if rng.chance(33) {
            let s = rng.below(SCHOOLS as u64) as usize;
            if let Ok(cycle) = self.schools[s].school.cycle() {
                let before_ms = [1_000, 60_000][rng.below(2) as usize];
                return (cycle.end_ms - before_ms - self.now_ms()).max(0);
            }
        }
        let jumps = [
            2_000,
            60_000,
            HOUR,
            6 * HOUR,
            24 * HOUR,
            10 * 24 * HOUR,
            -HOUR,
            -24 * HOUR,
        ];
        jumps[rng.below(jumps.len() as u64) as usize]
    }

    fn tick_action(&self, rng: &mut Rng) -> Action {
        let s = rng.below(SCHOOLS as u64) as usize;
        if rng.chance(40) {
            Action::Tick(Node::School(s))
        } else {
            Action::Tick(Node::Teacher(s, rng.below(TEACHERS as u64) as usize))
        }
    }

    fn droppable_push(&self, rng: &mut Rng) -> Option<Action> {
        let pushes: Vec<Chan> = self
            .lanes
            .iter()
            .filter(|(_, q)| matches!(q.front(), Some(Msg::RollTo(_))))
            .map(|(c, _)| *c)
            .collect();
        rng.pick(&pushes).map(|c| Action::DropPush(*c))
    }

    fn new_op(&mut self, rng: &mut Rng) -> Op {
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
                auto_renew: rng.chance(60),
                high: rng.chance(40),
            },
            70..=79 => {
                let mut slices = Vec::new();
                for t in 0..TEACHERS {
                    if rng.chance(70) {
                        slices.push((t, rng.below(8), rng.chance(60)));
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

    // ---- executing -------------------------------------------------------

    pub fn execute(&mut self, action: &Action) {
        self.clock.advance(STEP_MS);
        match action {
            Action::Client(op) => self.start_call(op),
            Action::Deliver(chan) => self.deliver(*chan),
            Action::Tick(node) => self.tick(*node),
            Action::Flush => self.flush(),
            Action::Panic(chan) => self.panic(*chan),
            Action::Crash => self.crash(),
            Action::Snapshot => self.take_snapshot(),
            Action::Clock(by_ms) => self.clock.advance(*by_ms),
            Action::FailFlush => self.fail_next_flush = true,
            Action::DropPush(chan) => {
                if let Some(queue) = self.lanes.get_mut(chan) {
                    if matches!(queue.front(), Some(Msg::RollTo(_))) {
                        queue.pop_front();
                    }
                }
            }
        }
        self.catch_up_replay();
    }

    fn send(&mut self, from: Node, to: Node, oneshot: bool, msg: Msg) {
        self.lanes
            .entry(Chan { from, to, oneshot })
            .or_default()
            .push_back(msg);
    }

    fn start_call(&mut self, op: &Op) {
        let now_ms = self.now_ms();
        let from = |call: &u64| Node::Call(*call);
        let (call, to, msg, flow) = match op.clone() {
            Op::Consume {
                call,
                s,
                t,
                units,
                event,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Consume(Consume {
                    service: service(),
                    units,
                    event_id: event_id(event),
                    occurred_at_ms: 0,
                    model: Arc::from("m"),
                })),
                Flow::One,
            ),
            Op::Check {
                call,
                s,
                t,
                units,
                reserve,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Check(Check {
                    service: service(),
                    units,
                    previews: if reserve {
                        CheckPreviews::Reserve
                    } else {
                        CheckPreviews::Consume
                    },
                })),
                Flow::One,
            ),
            Op::Reserve {
                call,
                s,
                t,
                units,
                hold,
                ttl_ms,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Reserve(Reserve(HoldRequest {
                    service: service(),
                    units,
                    ttl_ms,
                    reservation_id: hold_id(hold),
                    model: Arc::from("m"),
                }))),
                Flow::One,
            ),
            Op::Commit {
                call,
                s,
                t,
                hold,
                actual,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Commit(Commit {
                    reservation_id: hold_id(hold),
                    actual_units: actual,
                })),
                Flow::One,
            ),
            Op::Release { call, s, t, hold } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Release(Release {
                    reservation_id: hold_id(hold),
                })),
                Flow::One,
            ),
            Op::Sync { call, s, t, events } => {
                let events = events
                    .into_iter()
                    .map(|(event, units, back_ms)| SyncEvent {
                        service: service(),
                        units,
                        event_id: event_id(event),
                        occurred_at_ms: now_ms - back_ms,
                        model: Arc::from("m"),
                    })
                    .collect();
                (
                    call,
                    Node::Teacher(s, t),
                    Msg::Teacher(TeacherCall::Sync(events)),
                    Flow::One,
                )
            }
            Op::Set {
                call,
                s,
                t,
                units,
                auto_renew,
                high,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Set(SetAllocation {
                    service: service(),
                    allocated_units: units,
                    priority: Some(if high {
                        Priority::High
                    } else {
                        Priority::Normal
                    }),
                    auto_renew,
                    change: change(now_ms),
                    managed: true,
                })),
                Flow::One,
            ),
            Op::Remove { call, s, t } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Remove(RemoveSlice {
                    service: service(),
                    change: change(now_ms),
                })),
                Flow::One,
            ),
            Op::Status {
                call,
                s,
                t,
                suspend,
            } => (
                call,
                Node::Teacher(s, t),
                Msg::Teacher(TeacherCall::Status(SetStatus {
                    service: service(),
                    status: if suspend {
                        SliceStatus::Suspended
                    } else {
                        SliceStatus::Active
                    },
                    change: change(now_ms),
                })),
                Flow::One,
            ),
            Op::File { call, s, t, units } => (
                call,
                Node::School(s),
                Msg::School(SchoolCall::File(FileRequest {
                    teacher_id: teacher_id(t),
                    service: service(),
                    units,
                    change: change(now_ms),
                })),
                Flow::One,
            ),
            Op::Approve {
                call,
                s,
                request,
                units,
            } => (
                call,
                Node::School(s),
                Msg::School(SchoolCall::Prepare {
                    request_id: request,
                    units,
                }),
                Flow::Approve,
            ),
            Op::Reject { call, s, request } => (
                call,
                Node::School(s),
                Msg::School(SchoolCall::Reject {
                    request_id: request,
                }),
                Flow::One,
            ),
            Op::Pool { call, s, units } => (
                call,
                Node::School(s),
                Msg::School(SchoolCall::Pool(SetPool {
                    service: service(),
                    cycle_units: units,
                    change: change(now_ms),
                })),
                Flow::One,
            ),
            Op::Settings {
                call,
                s,
                anchor_day,
                borrowing,
            } => (
                call,
                Node::School(s),
                Msg::School(SchoolCall::Settings(UpdateSettings {
                    name: None,
                    borrowing_enabled: borrowing,
                    self_service_requests: None,
                    next_anchor: anchor_day.and_then(|d| BillingAnchor::new(u32::from(d)).ok()),
                    change: change(now_ms),
                })),
                Flow::One,
            ),
            Op::Bulk { call, s, slices } => {
                self.start_bulk(call, s, slices, now_ms);
                return;
            }
        };
        self.flows.insert(call, flow);
        self.send(from(&call), to, false, msg);
    }

    /// The engine's bulk change: freeze every teacher named, then the school.
    fn start_bulk(&mut self, call: u64, s: usize, slices: Vec<(usize, u64, bool)>, now_ms: i64) {
        if self.bulk_busy[s] || slices.is_empty() {
            return;
        }
        self.bulk_busy[s] = true;
        let sets: Vec<SliceSet> = slices
            .iter()
            .map(|(t, units, auto_renew)| SliceSet {
                teacher_id: teacher_id(*t),
                service: service(),
                allocated_units: *units,
                priority: Priority::Normal,
                auto_renew: *auto_renew,
            })
            .collect();
        let waiting: BTreeSet<usize> = slices.iter().map(|(t, _, _)| *t).collect();
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
                slices: sets,
                waiting,
                frozen: Vec::new(),
                failed: false,
            },
        );
    }

    fn deliver(&mut self, chan: Chan) {
        if !self.can_take(&chan) {
            return;
        }
        let Some(msg) = self.lanes.get_mut(&chan).and_then(VecDeque::pop_front) else {
            return;
        };
        match chan.to {
            Node::Teacher(s, t) => self.deliver_to_teacher(chan.from, s, t, msg),
            Node::School(s) => self.deliver_to_school(chan.from, s, msg),
            Node::Call(_) => {}
        }
    }

    fn env_parts(&self) -> (TimestampMs, RuleLimits) {
        (self.now_ms(), self.limits)
    }

    /// Seed protocol: a teacher knows only what it was told.
    fn sync_own_cell(&self, s: usize, t: usize) {
        let node = &self.teachers[s][t];
        if let Some(cell) = &node.own_cell {
            cell.set(own_view(&node.machine.account));
        }
    }

    fn deliver_to_teacher(&mut self, from: Node, s: usize, t: usize, msg: Msg) {
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

    fn teacher_call(&mut self, s: usize, t: usize, call: Option<u64>, msg: TeacherCall, env: &Env) {
        let machine = &mut self.teachers[s][t].machine;
        let done = |result: Reply<(Fact, Option<u64>)>| match result {
            Ok((fact, wal_seq)) => Outcome {
                result: Ok(fact),
                wal_seq,
            },
            Err(e) => Outcome {
                result: Err(error_text(&e)),
                wal_seq: None,
            },
        };
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
            TeacherCall::Reserve(reserve) => {
                let hold = reserve.0.reservation_id.clone();
                done(machine.reserve(reserve, env).map(|d| {
                    // Allowed or denied, the decision is kept for the id.
                    (Fact::Held { s, t, hold }, d.wal_seq)
                }))
            }
            TeacherCall::Commit(commit) => {
                let hold = commit.reservation_id.clone();
                done(
                    machine
                        .commit(commit, env)
                        .map(|d| (Fact::Committed { s, t, hold }, d.wal_seq)),
                )
            }
            TeacherCall::Release(release) => done(
                machine
                    .release(release, env)
                    .map(|d| (Fact::Other, d.wal_seq)),
            ),
            TeacherCall::Sync(events) => {
                let ids: Vec<EventId> = events.iter().map(|e| e.event_id.clone()).collect();
                done(machine.sync(&events, env).map(|d| {
                    let charged = ids
                        .into_iter()
                        .zip(&d.value)
                        .filter(|(_, o)| is_charged(o))
                        .map(|(id, _)| id)
                        .collect();
                    (Fact::Synced { s, t, charged }, d.wal_seq)
                }))
            }
            TeacherCall::Freeze => {
                let frozen = machine.freeze(env);
                if let (Ok(_), Protocol::Current) = (&frozen, self.protocol) {
                    self.teachers[s][t].blocked = Blocked::Frozen;
                }
                if let Some(call) = call {
                    self.bulk_frozen(call, t, frozen);
                }
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

    fn run_slice_change(
        &mut self,
        s: usize,
        t: usize,
        call: Option<u64>,
        started: Reply<Started<crate::engine::Durable<crate::engine::AllocationView>>>,
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
    fn finish(&mut self, call: u64, outcome: Outcome) {
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

    fn bulk_frozen(&mut self, call: u64, t: usize, frozen: Reply<Frozen>) {
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
        let Some(Flow::Bulk { slices, .. }) = self.flows.get(&call) else {
            return;
        };
        let slices = slices.clone();
        self.send(
            Node::Call(call),
            Node::School(s),
            false,
            Msg::School(SchoolCall::Bulk(slices)),
        );
    }

    /// A bulk change that failed: every teacher it froze thaws unchanged.
    fn abort_bulk(&mut self, call: u64) {
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

    fn deliver_to_school(&mut self, from: Node, s: usize, msg: Msg) {
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
                let plain = |r: Reply<u64>| match r {
                    Ok(seq) => Outcome {
                        result: Ok(Fact::Other),
                        wal_seq: Some(seq),
                    },
                    Err(e) => Outcome {
                        result: Err(error_text(&e)),
                        wal_seq: None,
                    },
                };
                let outcome = match school_call {
                    SchoolCall::Pool(msg) => plain(machine.set_pool(msg, &env)),
                    SchoolCall::Settings(msg) => {
                        let r = machine.update_settings(msg, &env);
                        if r.is_err() {
                            next_anchor = None;
                        }
                        plain(r)
                    }
                    SchoolCall::File(msg) => plain(
                        machine
                            .file_request(msg, &env)
                            .map(|d| d.wal_seq.unwrap_or(0)),
                    ),
                    SchoolCall::Reject { request_id } => plain(
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
                        plain(Ok(0))
                    }
                    SchoolCall::Bulk(slices) => {
                        if let Some(call) = call {
                            self.bulk_at_school(call, s, slices, now_ms, &limits);
                            self.after_school(s, cycle_before, None);
                            return;
                        }
                        plain(Ok(0))
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
        prepared: Reply<(TeacherId, ServiceType, quotad_core::Grant)>,
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
    fn after_school(
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

    fn tick(&mut self, node: Node) {
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

    fn flush(&mut self) {
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

    fn panic(&mut self, chan: Chan) {
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

    fn take_snapshot(&mut self) {
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
    fn crash(&mut self) {
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

    fn catch_up_replay(&mut self) {
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

    fn rebuild_charges(&mut self) {
        self.charges.clear();
        let records = self.log.records.borrow();
        for record in records.iter() {
            if let Some((key, at_ms)) = charge_key(record) {
                self.charges.entry(key).or_default().push(at_ms);
            }
        }
    }

    pub(super) fn charges(&self) -> &BTreeMap<(usize, usize, String), Vec<Charged>> {
        &self.charges
    }

    /// I6: a Check answers what the call it previews would answer now (on
    /// copies of the teacher and school, in the same state). The seed's
    /// Check previewed Consume, and is held to agree with Reserve.
    fn check_preview(&mut self, s: usize, t: usize, check: &Check, env: &Env) {
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

    fn copies(&self, s: usize, t: usize) -> (TeacherMachine, SchoolMachine) {
        (
            self.teachers[s][t].machine.clone(),
            SchoolMachine::new(self.schools[s].school.clone()),
        )
    }

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

/// What a teacher of the seed protocol knew of its cycle: its own account.
pub(super) fn own_view(account: &quotad_core::TeacherAccount) -> CycleInfo {
    CycleInfo {
        start_ms: account.cycle_start_ms,
        previous_start_ms: 0,
        anchor: account.anchor,
        next_anchor: account.next_anchor,
    }
}

fn is_charged(outcome: &quotad_core::SyncOutcome) -> bool {
    matches!(
        outcome,
        quotad_core::SyncOutcome::Accepted { .. }
            | quotad_core::SyncOutcome::AcceptedOverQuota { .. }
    )
}

/// One charge of an id, as the log has it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Charged {
    /// From when the id is remembered: an event's own time (ids are kept for
    /// the idempotency window after the event happened), a hold's charge.
    pub remembered_from_ms: TimestampMs,
    pub recorded_at_ms: TimestampMs,
}

/// A charge's id (event or hold) and when it was made.
fn charge_key(record: &Record) -> Option<((usize, usize, String), Charged)> {
    let Record::UsageCharged(usage) = record else {
        return None;
    };
    let s = (0..SCHOOLS).find(|s| school_id(*s) == usage.school_id)?;
    let t = teacher_of(s, &usage.teacher_id)?;
    let (id, remembered_from_ms) = match &usage.source {
        quotad_core::UsageSource::Event(e) => {
            (format!("event {}", e.as_str()), usage.occurred_at_ms)
        }
        quotad_core::UsageSource::Reservation { id, .. } => {
            (format!("hold {}", id.as_str()), usage.recorded_at_ms)
        }
    };
    let charged = Charged {
        remembered_from_ms,
        recorded_at_ms: usage.recorded_at_ms,
    };
    Some(((s, t, id), charged))
}

/// A school's state as it is once its cycle has caught up with the clock.
pub(super) fn school_now(school: &SchoolState, now_ms: TimestampMs) -> SchoolState {
    let mut school = school.clone();
    if let Ok(Some(cycle)) = school.due_cycle(now_ms) {
        school.roll_to(cycle.start_ms);
    }
    school
}
