//! Choosing the next step of a run from the seed: which lane delivers,
//! which call a client makes, when timers fire, flushes happen and faults
//! strike. Only choosing draws from the seed (here, and `new_op` in `ops`
//! for a call's values): executing an action is deterministic.

use super::{Action, Chan, Msg, Node, World, SCHOOLS, TEACHERS};
use crate::sim::Rng;

impl World {
    /// Lanes whose head the actor at their end could take now.
    fn deliverable(&self) -> Vec<Chan> {
        self.lanes
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .filter(|(chan, _)| self.can_take(chan))
            .map(|(chan, _)| *chan)
            .collect()
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
}
