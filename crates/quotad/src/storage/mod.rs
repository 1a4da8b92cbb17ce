//! Durability: the sled write-ahead log with group commit, the local snapshot,
//! and recovery from both.

pub mod codec;
pub mod history;
pub mod log;
pub mod snapshot;
pub mod wal;

#[cfg(test)]
mod tests;

use thiserror::Error;

pub use log::{LogCall, LogStore, MemoryLog, SledLog, WrappedLog};
pub use wal::{Durability, Wal, WalConfig, WalError, WalWriter};

use quotad_core::{ApplyError, Record, State};

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
    /// Damage found at open or while reading: sled's own checks, a panic
    /// inside sled, a damaged durable mark or local snapshot.
    #[error("the data directory is damaged: {0}")]
    Damaged(String),
    #[error("the log ends at record {last_seq}, but every record up to {mark_seq} was acknowledged \
             as durable: records {first_missing}..={mark_seq} are damaged or lost", first_missing = last_seq + 1)]
    LogEndsEarly { last_seq: u64, mark_seq: u64 },
    #[error("the log skips from record {after_seq} to {next_seq}: the records between are damaged or lost")]
    LogGap { after_seq: u64, next_seq: u64 },
    #[error("the data directory is locked by another process (is another quotad using it?): {0}")]
    Locked(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// What recovery does when the log does not hold everything it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDamage {
    /// Refuse to start, saying what is damaged (the default).
    #[default]
    Refuse,
    /// Serve the state up to the last whole record: the operator said so
    /// (`--accept-data-loss`), and the server logs and audits it.
    AcceptLoss,
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
    /// Set when damage was found and accepted: what was lost.
    pub lost: Option<String>,
}

/// Loads the snapshot and replays the log after it. The log must hold every
/// position from the snapshot on, without a gap, up to at least the durable
/// mark: anything less means a damaged or lost record, and serving it would
/// lose acknowledged usage and forget ids (a retry would be charged twice).
/// A torn tail after the mark (records never acknowledged) is cut silently
/// by sled, as a torn write should be.
pub fn recover(store: &dyn LogStore) -> Result<Recovered, StorageError> {
    recover_with(store, OnDamage::Refuse)
}

/// [`recover`], choosing what damage does.
pub fn recover_with(store: &dyn LogStore, on_damage: OnDamage) -> Result<Recovered, StorageError> {
    let (snapshot_seq, mut state) = match store.read_snapshot()? {
        Some((seq, bytes)) => {
            let state = codec::decode::<State>(&bytes).map_err(|e| {
                StorageError::Damaged(format!(
                    "the local snapshot (at record {seq}) is unreadable: {e}"
                ))
            })?;
            (seq, state)
        }
        None => (0, State::default()),
    };
    let mut last_seq = snapshot_seq;
    let mut replayed_records = 0;
    let mut damage = None;
    for (wal_seq, bytes) in store.read_after(snapshot_seq)? {
        if wal_seq != last_seq + 1 {
            damage = Some(StorageError::LogGap {
                after_seq: last_seq,
                next_seq: wal_seq,
            });
            break;
        }
        let record: Record = match codec::decode(&bytes) {
            Ok(record) => record,
            Err(e) => {
                damage = Some(StorageError::Corrupt {
                    wal_seq,
                    reason: e.to_string(),
                });
                break;
            }
        };
        state.apply(wal_seq, &record)?;
        last_seq = wal_seq;
        replayed_records += 1;
    }
    let damage = damage.or(match store.durable_mark() {
        Ok(Some(mark_seq)) if last_seq < mark_seq => {
            Some(StorageError::LogEndsEarly { last_seq, mark_seq })
        }
        Ok(_) => None,
        Err(e) => Some(e),
    });
    let lost = match (damage, on_damage) {
        (None, _) => None,
        (Some(damage), OnDamage::Refuse) => return Err(damage),
        (Some(damage), OnDamage::AcceptLoss) => Some(damage.to_string()),
    };
    Ok(Recovered {
        state,
        snapshot_seq,
        last_seq,
        replayed_records,
        lost,
    })
}
