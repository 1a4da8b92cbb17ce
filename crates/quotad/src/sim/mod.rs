//! A deterministic simulator of the school/teacher protocol, in the manner
//! of FoundationDB's simulation tests and TigerBeetle's VOPR. It runs the
//! production machines (`engine::machine`) with no actix, no threads and no
//! wall clock: one u64 seeds every choice. At each step it delivers one
//! message (keeping only the order actix keeps: FIFO from one sender to one
//! mailbox), starts a client call, runs a timer, flushes the log, or injects
//! a fault (an actor panic that loses the message in hand, a power cut that
//! loses what is not durable, a clock jump either way, a failed flush). After
//! every step it checks the invariants of `docs/protocol.md` (I1-I6). A
//! failure is shrunk by dropping steps and printed as a trace that
//! `scripts/simulate --seed S` replays.
//!
//! [`Protocol::Seed`] drives the same machines the way the first version of
//! quotad did (a bulk change reads usage, then pushes its record to the
//! teachers through their mailboxes; teachers learn of a rollover from a
//! message that a full mailbox drops; Check previews Consume only), so that
//! the simulator can show it finds what that protocol got wrong.

mod check;
mod world;

use std::fmt;

pub use world::{Action, Op, World};

/// Which protocol the machines are driven with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Today's: freezes for bulk changes, the cycle cell, previews.
    Current,
    /// The seed's: reads then pushes, rollover messages, Check = Consume.
    Seed,
}

impl Protocol {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "current" => Some(Self::Current),
            "seed" => Some(Self::Seed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: usize,
    pub protocol: Protocol,
    /// Invariants (name prefixes) to look past, to see what else breaks.
    pub ignore: Vec<String>,
}

/// An invariant that did not hold, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub step: usize,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {}: {} broken: {}",
            self.step, self.invariant, self.detail
        )
    }
}

/// What one seed's run came to.
pub struct Run {
    pub trace: Vec<Action>,
    pub violation: Option<Violation>,
    pub steps_run: usize,
}

/// Runs one seed: picks every step from the seed, checks after each.
pub fn run(config: SimConfig) -> Run {
    let mut world = World::new(config.protocol);
    world.ignore = config.ignore.clone();
    let mut rng = Rng::new(config.seed);
    let mut trace = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        let action = world.choose(&mut rng);
        world.execute(&action);
        trace.push(action);
        if let Err(mut violation) = world.check() {
            violation.step = step;
            return Run {
                trace,
                violation: Some(violation),
                steps_run: step + 1,
            };
        }
    }
    let violation = world.check_at_end().err().map(|mut v| {
        v.step = config.steps;
        v
    });
    Run {
        trace,
        violation,
        steps_run: config.steps,
    }
}

/// Replays a trace of actions (no choices left): the first violation, if any.
pub fn replay(protocol: Protocol, ignore: &[String], trace: &[Action]) -> Option<Violation> {
    let mut world = World::new(protocol);
    world.ignore = ignore.to_vec();
    for (step, action) in trace.iter().enumerate() {
        world.execute(action);
        if let Err(mut violation) = world.check() {
            violation.step = step;
            return Some(violation);
        }
    }
    world.check_at_end().err()
}

/// The shortest trace it finds that still breaks the same invariant: drops
/// chunks of steps, halving the chunk until single steps, while any still
/// goes (at most `replays_max` replays).
pub fn shrink(
    protocol: Protocol,
    ignore: &[String],
    trace: &[Action],
    invariant: &str,
    replays_max: usize,
) -> Vec<Action> {
    let mut best: Vec<Action> = match replay(protocol, ignore, trace) {
        Some(v) => trace[..=v.step.min(trace.len().saturating_sub(1))].to_vec(),
        None => return trace.to_vec(),
    };
    let mut replays = 0;
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut shrunk = false;
        let mut start = 0;
        while start < best.len() && replays < replays_max {
            let end = (start + chunk).min(best.len());
            let mut candidate = best[..start].to_vec();
            candidate.extend_from_slice(&best[end..]);
            replays += 1;
            match replay(protocol, ignore, &candidate) {
                Some(v) if v.invariant == invariant => {
                    let keep = (v.step + 1).min(candidate.len());
                    candidate.truncate(keep);
                    best = candidate;
                    shrunk = true;
                }
                _ => start = end,
            }
        }
        if replays >= replays_max || (chunk == 1 && !shrunk) {
            return best;
        }
        if !shrunk {
            chunk = (chunk / 2).max(1);
        }
    }
}

/// SplitMix64: small, fast and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.below(items.len() as u64) as usize)
    }
}

#[cfg(test)]
mod tests;
