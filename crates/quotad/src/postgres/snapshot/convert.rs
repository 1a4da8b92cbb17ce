//! Conversions between quotad's values and Postgres column types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quotad_core::TimestampMs;

/// Units, positions and counters are u64 in quotad and bigint in Postgres;
/// quotad caps units far below 2^63, so the clamp never bites in practice.
pub(crate) fn db_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn db_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn db_time(at_ms: TimestampMs) -> SystemTime {
    let magnitude = Duration::from_millis(at_ms.unsigned_abs());
    if at_ms >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn db_ms(at: SystemTime) -> TimestampMs {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}
