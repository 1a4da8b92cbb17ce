//! The byte format of log records and snapshots:
//! `[format version: u8][crc32 of payload: u32 LE][payload: postcard]`.
//! The checksum catches a damaged value; the version lets the format change.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StorageError;

const FORMAT_VERSION: u8 = 1;
const HEADER_BYTES: usize = 5;
/// The largest record the log accepts; a record is a few hundred bytes, so a
/// larger one is a bug, not data.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;

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
    use crate::domain::{Record, SchoolId};

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
