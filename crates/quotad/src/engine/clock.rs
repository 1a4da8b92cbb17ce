//! The engine's one clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use quotad_core::TimestampMs;

/// Where the rules get the time from: the system clock, or a clock a test
/// moves. Never backwards: a reading is at least every reading before it, in
/// every thread, so a school that reads the clock after a teacher did is
/// never in an older billing cycle than that teacher (an NTP step back, or a
/// test's jump back, only makes time stand still until it catches up).
#[derive(Clone, Debug)]
pub struct Clock {
    source: ClockSource,
    /// The latest reading handed out.
    high_ms: Arc<AtomicI64>,
}

#[derive(Clone, Debug)]
enum ClockSource {
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn system() -> Self {
        Self {
            source: ClockSource::System,
            high_ms: Arc::new(AtomicI64::new(TimestampMs::MIN)),
        }
    }

    pub fn manual(start_ms: TimestampMs) -> Self {
        Self {
            source: ClockSource::Manual(Arc::new(AtomicI64::new(start_ms))),
            high_ms: Arc::new(AtomicI64::new(TimestampMs::MIN)),
        }
    }

    pub fn now_ms(&self) -> TimestampMs {
        let source_ms = match &self.source {
            ClockSource::System => system_now_ms(),
            ClockSource::Manual(now) => now.load(Ordering::SeqCst),
        };
        let before = self.high_ms.fetch_max(source_ms, Ordering::SeqCst);
        before.max(source_ms)
    }

    /// Moves a manual clock (back too, which the readings do not follow);
    /// the system clock cannot be moved.
    pub fn advance(&self, by_ms: i64) {
        if let ClockSource::Manual(now) = &self.source {
            now.fetch_add(by_ms, Ordering::SeqCst);
        }
    }
}

pub fn system_now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
