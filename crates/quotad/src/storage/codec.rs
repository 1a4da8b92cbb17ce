//! The byte format of log records and snapshots:
//! `[format version: u8][crc32 of payload: u32 LE][payload: postcard]`.
//! The checksum catches a damaged value; the version lets the format change.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StorageError;

use quotad_core::ids::{ID_BYTES_MAX, SERVICE_TYPE_BYTES_MAX};
use quotad_core::record::{BULK_SLICES_MAX, CHANGE_TEXT_BYTES_MAX};

const FORMAT_VERSION: u8 = 1;
const HEADER_BYTES: usize = 5;

/// postcard writes integers (and enum tags, as u32) as varints: 7 bits a byte.
const U64_BYTES_MAX: usize = 10;
const ENUM_TAG_BYTES_MAX: usize = 5;

/// The bytes of a varint holding `value`.
const fn varint_bytes(value: usize) -> usize {
    let mut bytes = 1;
    let mut rest = value >> 7;
    while rest > 0 {
        bytes += 1;
        rest >>= 7;
    }
    bytes
}

/// A string of at most `len` bytes: its length as a varint, then the bytes.
const fn str_bytes_max(len: usize) -> usize {
    varint_bytes(len) + len
}

/// A [`quotad_core::Change`]: `by` and `reason` (bounded by the API), `at_ms`.
const CHANGE_BYTES_MAX: usize = 2 * str_bytes_max(CHANGE_TEXT_BYTES_MAX) + U64_BYTES_MAX;

/// One [`quotad_core::SliceSet`]: teacher id, service type, units, priority, auto-renew.
const SLICE_SET_BYTES_MAX: usize = str_bytes_max(ID_BYTES_MAX)
    + str_bytes_max(SERVICE_TYPE_BYTES_MAX)
    + U64_BYTES_MAX
    + ENUM_TAG_BYTES_MAX
    + 1;

/// The largest record there is: an `AllocationsSet` of the most slices one
/// BulkSetAllocations call may carry, every id at its longest (about 2.1 MB).
/// Every other record holds a bounded handful of ids and texts: a
/// `SchoolCreated` of 32 pools, the next largest, is a few KiB (the tests
/// build the largest of each and check they fit).
const ALLOCATIONS_SET_BYTES_MAX: usize = ENUM_TAG_BYTES_MAX
    + str_bytes_max(ID_BYTES_MAX)
    + varint_bytes(BULK_SLICES_MAX)
    + BULK_SLICES_MAX * SLICE_SET_BYTES_MAX
    + U64_BYTES_MAX
    + CHANGE_BYTES_MAX;

/// The largest record the log accepts: the largest record any allowed call
/// can make, so a valid call always fits. A larger one is refused
/// (`WalError::RecordTooLarge`), never written and never a panic.
pub const RECORD_BYTES_MAX: usize = HEADER_BYTES + ALLOCATIONS_SET_BYTES_MAX;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut bytes = vec![FORMAT_VERSION, 0, 0, 0, 0];
    let mut bytes = postcard::to_extend(value, std::mem::take(&mut bytes))
        .map_err(|e| StorageError::Codec(format!("encode: {e}")))?;
    let crc = crc32fast::hash(&bytes[HEADER_BYTES..]);
    bytes[1..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    if bytes.len() < HEADER_BYTES {
        return Err(StorageError::Codec(format!(
            "{} bytes is shorter than the header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(StorageError::Codec(format!(
            "format version {} is not {FORMAT_VERSION}",
            bytes[0]
        )));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[1..HEADER_BYTES]);
    let payload = &bytes[HEADER_BYTES..];
    if crc32fast::hash(payload) != u32::from_le_bytes(crc) {
        return Err(StorageError::Codec("checksum mismatch".into()));
    }
    postcard::from_bytes(payload).map_err(|e| StorageError::Codec(format!("decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use quotad_core::school::SCHOOL_NAME_BYTES_MAX;
    use quotad_core::{
        BillingAnchor, Change, Priority, Record, ReservationId, SchoolConfig, SchoolId,
        ServiceType, SliceSet, TeacherId, Tier, Usage, UsageSource,
    };

    /// An id of `len` bytes, distinct for each `i`.
    fn long(i: usize, len: usize) -> String {
        format!("{i:0>len$}")
    }

    fn longest_change() -> Change {
        let text: Arc<str> = Arc::from("x".repeat(CHANGE_TEXT_BYTES_MAX));
        Change {
            by: text.clone(),
            reason: text,
            at_ms: i64::MIN,
        }
    }

    fn longest_school_id() -> SchoolId {
        SchoolId::parse(&long(0, ID_BYTES_MAX)).unwrap()
    }

    /// The largest BulkSetAllocations an API call may make.
    fn largest_allocations_set() -> Record {
        let slices = (0..BULK_SLICES_MAX)
            .map(|i| SliceSet {
                teacher_id: TeacherId::parse(&long(i, ID_BYTES_MAX)).unwrap(),
                service: ServiceType::parse(&long(i, SERVICE_TYPE_BYTES_MAX)).unwrap(),
                allocated_units: u64::MAX,
                priority: Priority::High,
                auto_renew: true,
            })
            .collect();
        Record::AllocationsSet {
            school_id: longest_school_id(),
            slices,
            cycle_start_ms: i64::MIN,
            change: longest_change(),
        }
    }

    /// A school of the most service types, every name at its longest.
    fn largest_school_created() -> Record {
        let pools = (0..quotad_core::RuleLimits::default().service_types_per_school_max)
            .map(|i| {
                (
                    ServiceType::parse(&long(i, SERVICE_TYPE_BYTES_MAX)).unwrap(),
                    u64::MAX,
                )
            })
            .collect();
        Record::SchoolCreated {
            config: SchoolConfig {
                id: longest_school_id(),
                name: Arc::from("n".repeat(SCHOOL_NAME_BYTES_MAX)),
                tier: Tier::Individual,
                anchor: BillingAnchor::new(28).unwrap(),
                borrowing_enabled: true,
                self_service_requests: true,
            },
            cycle_start_ms: i64::MIN,
            pools,
            change: longest_change(),
        }
    }

    /// A usage with every id and the model at their longest.
    fn largest_usage() -> Record {
        Record::UsageCharged(Usage {
            school_id: longest_school_id(),
            teacher_id: TeacherId::parse(&long(0, ID_BYTES_MAX)).unwrap(),
            service: ServiceType::parse(&long(0, SERVICE_TYPE_BYTES_MAX)).unwrap(),
            source: UsageSource::Reservation {
                id: ReservationId::parse(&long(0, ID_BYTES_MAX)).unwrap(),
                held_units: u64::MAX,
                hold_had_expired: true,
            },
            units: u64::MAX,
            borrowed_units: u64::MAX,
            overage_units: u64::MAX,
            cycle_start_ms: i64::MIN,
            occurred_at_ms: i64::MIN,
            recorded_at_ms: i64::MIN,
            model: Arc::from("m".repeat(quotad_core::ids::MODEL_BYTES_MAX)),
        })
    }

    #[test]
    fn the_largest_record_an_allowed_call_makes_fits_the_limit() {
        let largest = encode(&largest_allocations_set()).unwrap();
        assert!(
            largest.len() <= RECORD_BYTES_MAX,
            "{} > {RECORD_BYTES_MAX}",
            largest.len()
        );
        // The bound is derived, not guessed: it stays close to the real size.
        assert!(
            largest.len() * 100 >= RECORD_BYTES_MAX * 95,
            "{} is far below {RECORD_BYTES_MAX}: the derivation no longer matches the record",
            largest.len()
        );
        assert_eq!(
            decode::<Record>(&largest).unwrap(),
            largest_allocations_set()
        );
        for other in [largest_school_created(), largest_usage()] {
            let bytes = encode(&other).unwrap();
            assert!(
                bytes.len() * 100 < largest.len(),
                "a {} record of {} bytes",
                other.kind(),
                bytes.len()
            );
        }
    }

    fn record() -> Record {
        Record::CycleRolledOver {
            school_id: SchoolId::parse("s").unwrap(),
            from_start_ms: 1,
            to_start_ms: 2,
            at_ms: 3,
        }
    }

    #[test]
    fn records_round_trip() {
        let bytes = encode(&record()).unwrap();
        assert_eq!(decode::<Record>(&bytes).unwrap(), record());
    }

    #[test]
    fn damage_is_detected() {
        let bytes = encode(&record()).unwrap();
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(
                decode::<Record>(&damaged).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert!(decode::<Record>(&bytes[..3]).is_err());
        assert!(decode::<Record>(&bytes[..bytes.len() - 1]).is_err());
    }
}
