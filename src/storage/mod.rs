//! Durability: the sled write-ahead log with group commit, the local snapshot,
//! and recovery from both.

pub mod codec;
pub mod log;
pub mod snapshot;
pub mod wal;

#[cfg(test)]
mod tests;

use thiserror::Error;

pub use log::{LogStore, MemoryLog, SledLog};
pub use wal::{Durability, Wal, WalConfig, WalError, WalWriter};

use crate::domain::{ApplyError, Record, State};

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{0}")]
    Io(String),
    #[error("bad bytes: {0}")]
    Codec(String),
    #[error("WAL record {wal_seq} is damaged: {reason}")]
    Corrupt { wal_seq: u64, reason: String },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The state found on disk.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub state: State,
    /// The position the snapshot on disk covers (0: none). Only this much of
    /// `state` is held anywhere but the WAL.
    pub snapshot_seq: u64,
    /// The last position in the log; new records follow it. `state` covers
    /// it, but the records after `snapshot_seq` only by replay.
    pub last_seq: u64,
    pub replayed_records: usize,
}

/// Loads the snapshot and replays the log after it. A damaged record stops
/// recovery with its position: guessing could count usage twice or lose it.
pub fn recover(store: &dyn LogStore) -> Result<Recovered, StorageError> {
    let (snapshot_seq, mut state) = match store.read_snapshot()? {
        Some((seq, bytes)) => (seq, codec::decode::<State>(&bytes)?),
        None => (0, State::default()),
    };
    let mut last_seq = snapshot_seq;
    let entries = store.read_after(snapshot_seq)?;
    let replayed_records = entries.len();
    for (wal_seq, bytes) in entries {
        let record: Record = codec::decode(&bytes).map_err(|e| StorageError::Corrupt {
            wal_seq,
            reason: e.to_string(),
        })?;
        state.apply(wal_seq, &record)?;
        last_seq = wal_seq;
    }
    Ok(Recovered {
        state,
        snapshot_seq,
        last_seq,
        replayed_records,
    })
}
