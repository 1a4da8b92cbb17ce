//! The simulated world: two schools of three teachers, one service type,
//! small pools; the production machines; mailboxes; a log whose tail a power
//! cut loses; client calls as the engine makes them.
//!
//! This file holds the world's types (the actors, the lanes between them, the
//! messages and the actions a run is made of), its construction, and the two
//! entry points a run uses: [`World::choose`] and [`World::execute`]. The
//! rest is split by what it does:
//!
//! - `choose`: picking the next action from the seed.
//! - `ops`: client calls ([`Op`]): making one and sending its first message.
//! - `teacher`: a teacher taking a message, and how calls finish.
//! - `school`: a school taking a message (asks, admin calls, bulk changes).
//! - `faults`: timers, flushes, panics, snapshots, power cuts and the replay.
//! - `predict`: running a Check's call on copies, to hold Check to it (I6).

mod choose;
mod faults;
mod ops;
mod predict;
mod school;
mod teacher;

pub use ops::Op;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use super::{Protocol, Violation};
use crate::engine::machine::{
    CycleCell, Env, Frozen, Journal, SchoolAnswer, SchoolAsk, SchoolMachine, TeacherMachine,
};
use crate::engine::{
    Check, Clock, Commit, Consume, EngineError, FileRequest, GrantIncrease, Release, RemoveSlice,
    Reply, Reserve, SetAllocation, SetPool, SetStatus, SliceSpec, UpdateSettings,
};
use crate::storage::WalError;
use quotad_core::{
    BillingAnchor, Change, CycleInfo, EventId, Record, ReservationId, RuleLimits, SchoolConfig,
    SchoolId, SchoolState, ServiceType, SliceSet, State, SyncEvent, TeacherId, Tier, TimestampMs,
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
        /// As asked: what an entry leaves out is taken from its teacher's
        /// report once every teacher is frozen.
        slices: Vec<SliceSpec>,
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

    /// Whether the actor at the end of the lane takes its head now: an idle
    /// teacher takes its mailbox only, one asking its school only the
    /// school's answer, a frozen one only a call's one-shot (its thaw).
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

    pub(super) fn charges(&self) -> &BTreeMap<(usize, usize, String), Vec<Charged>> {
        &self.charges
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

/// One charge of an id, as the log has it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Charged {
    /// From when the id is remembered: an event's own time (ids are kept for
    /// the idempotency window after the event happened), a hold's charge.
    pub remembered_from_ms: TimestampMs,
    pub recorded_at_ms: TimestampMs,
}

/// A school's state as it is once its cycle has caught up with the clock.
pub(super) fn school_now(school: &SchoolState, now_ms: TimestampMs) -> SchoolState {
    let mut school = school.clone();
    if let Ok(Some(cycle)) = school.due_cycle(now_ms) {
        school.roll_to(cycle.start_ms);
    }
    school
}
