//! Which history a data directory and a Postgres snapshot belong to.
//!
//! A history is one line of WAL records, named by a random id. Its epoch
//! counts the times a data directory took it up from Postgres: recovering
//! from Postgres continues Postgres's history with the next epoch, written
//! into Postgres in the transaction that attaches and into the data
//! directory before serving, and every snapshot commit checks that Postgres
//! is still at the writer's history and epoch. So when a data directory comes
//! back after another node recovered from Postgres and went on (its disk is
//! at an older epoch, possibly at a higher WAL position), it is refused
//! instead of winning on position and writing its older history over
//! Postgres; a quotad still running on it finds its snapshots fenced.
//!
//! The rules that compare the two sides ([`decide`]) are plain functions, so
//! that every case is tested without a disk or a database.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::codec;
use super::log::LogStore;
use super::StorageError;

/// The key of the history record in the data directory's meta values.
const HISTORY_KEY: &str = "history";

/// A history's name: 128 random bits, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryId([u8; 16]);

impl HistoryId {
    /// A new id from the operating system's random source. 128 bits: two
    /// histories never share one by chance.
    pub fn random() -> Result<Self, StorageError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| StorageError::Io(format!("no random bytes for a history id: {e}")))?;
        Ok(Self(bytes))
    }

    /// Reads the 32 hex digits [`HistoryId`]'s `Display` writes.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        <[u8; 16]>::try_from(bytes).ok().map(Self)
    }
}

impl fmt::Display for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A history and the epoch of it that a data directory or Postgres is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub id: HistoryId,
    /// 1 for a new history; one more at every recovery from Postgres.
    pub epoch: u64,
}

impl History {
    /// A new history, at its first epoch.
    pub fn first(id: HistoryId) -> Self {
        Self { id, epoch: 1 }
    }

    /// The same history, taken up again from Postgres.
    pub fn next(self) -> Self {
        Self {
            id: self.id,
            epoch: self.epoch.saturating_add(1),
        }
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "history {} epoch {}", self.id, self.epoch)
    }
}

/// What one side holds: which history (None: none recorded, written by a
/// quotad from before history identity, or nothing at all) up to which WAL
/// position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPosition {
    pub history: Option<History>,
    pub wal_seq: u64,
}

impl fmt::Display for HistoryPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.history {
            Some(history) => write!(f, "{history} at WAL position {}", self.wal_seq),
            None => write!(
                f,
                "no history record (written by a quotad from before history identity) at WAL \
                 position {}",
                self.wal_seq
            ),
        }
    }
}

/// The operator's choice at start (`recover_from`, `--recover-from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecoverFrom {
    /// Serve the data directory when it is at Postgres's history and epoch,
    /// recover from Postgres when the directory is empty or behind, refuse
    /// to start when they belong to different histories or epochs.
    #[default]
    Auto,
    /// As `auto`, except that a data directory `auto` would refuse is
    /// discarded and the state recovered from Postgres (a new epoch). A
    /// directory `auto` would serve is served: leaving this set never throws
    /// away acknowledged changes at a later restart. Postgres must answer at
    /// start (quotad does not start on the directory alone).
    Postgres,
}

impl RecoverFrom {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(Self::Auto),
            "postgres" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// What start-up does with the data directory and Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The data directory holds the whole story: serve it, and catch
    /// Postgres up from it.
    Serve {
        history: History,
        /// The data directory has no record of `history` yet.
        record_locally: bool,
        /// Postgres has no record of `history` yet.
        record_in_postgres: bool,
    },
    /// Load Postgres's snapshot, discarding the data directory's state, and
    /// continue as `history` (recorded on both sides).
    Load { history: History },
    /// Start neither: the two belong to different histories or epochs.
    Refuse(Conflict),
}

/// Why the data directory and Postgres cannot be reconciled on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Postgres moved on to a newer epoch: another quotad recovered from it.
    OlderEpoch,
    /// Postgres is at an older epoch than the directory took from it.
    NewerEpoch,
    OtherHistory,
    /// A directory from before history identity, ahead of a Postgres that has a history.
    UnnamedAhead,
    /// A directory with records of its own history, behind a Postgres from before history identity.
    BehindUnnamed,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::OlderEpoch => {
                "Postgres has moved on to a newer epoch of the same history (another quotad \
                 recovered from it and went on), so this directory's state is stale"
            }
            Problem::NewerEpoch => {
                "Postgres is at an older epoch than this directory took from it (was the \
                 database restored from a backup?)"
            }
            Problem::OtherHistory => "they are different histories",
            Problem::UnnamedAhead => {
                "the directory, written by a quotad from before history identity, is ahead of \
                 Postgres, and nothing shows that it belongs to Postgres's history"
            }
            Problem::BehindUnnamed => {
                "Postgres, written by a quotad from before history identity, is ahead of this \
                 directory's own history, and nothing shows that they are the same"
            }
        })
    }
}

/// A refusal to start, naming both sides and the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "it holds {local}, but Postgres holds {postgres}: {problem}. quotad will not start on it, so \
     that it cannot write that state over Postgres. To discard this data directory's state and \
     recover from Postgres (a new epoch), start with --recover-from postgres (recover_from = \
     \"postgres\", QUOTAD_RECOVER_FROM=postgres); to keep it, point quotad at the database it \
     belongs to"
)]
pub struct Conflict {
    pub local: HistoryPosition,
    pub postgres: HistoryPosition,
    pub problem: Problem,
}

/// Compares the data directory with Postgres. `new_id` names a history
/// started now, if one is. The rules, in order:
///
/// 1. At Postgres's history and epoch: the directory is served when it is at
///    or beyond Postgres's position (the WAL is never truncated past what
///    Postgres holds, so it holds Postgres's state plus what came after).
///    Behind it (it lost its tail, or a copy of it wrote on), Postgres has
///    more of the same epoch, and it is loaded (a new epoch), as before
///    histories had names.
/// 2. A directory with nothing in it (position 0) has nothing to lose: it
///    loads whatever Postgres holds.
/// 3. Two histories, or two epochs of one: refused. The directory may hold
///    acknowledged changes Postgres never got, and Postgres changes the
///    directory never saw; neither can win on position. The operator
///    chooses (`--recover-from postgres`).
/// 4. A directory without a history record (an older quotad wrote it)
///    facing a Postgres that has one: at the same position it is taken to be
///    the directory the history was named from (the start that named it
///    stopped before writing the directory's record) and adopts it; behind,
///    it loads Postgres as before; ahead, it cannot be shown to belong and is
///    refused.
/// 5. A Postgres without a history (fresh, or written by an older quotad):
///    a directory at or beyond its position is served and Postgres takes up
///    the directory's history (a new one for a directory without a record);
///    a directory behind it loads it as a new history, unless the directory
///    holds records of its own history (refused).
///
/// Between a directory and a database both written by older quotads there
/// is nothing but positions to go by, as before; the first start of this
/// version names the history on both sides.
///
/// `RecoverFrom::Postgres` turns every refusal into a load; it changes
/// nothing else. A load continues Postgres's history at a new epoch, past the
/// directory's too (a database restored from a backup must not hand out an
/// epoch a directory already holds).
pub fn decide(
    local: &HistoryPosition,
    postgres: &HistoryPosition,
    recover_from: RecoverFrom,
    new_id: HistoryId,
) -> Decision {
    let (local_seq, postgres_seq) = (local.wal_seq, postgres.wal_seq);
    let next = postgres
        .history
        .map_or(History::first(new_id), History::next);
    let refuse = |problem, load: History| match recover_from {
        RecoverFrom::Postgres => Decision::Load { history: load },
        RecoverFrom::Auto => Decision::Refuse(Conflict {
            local: *local,
            postgres: *postgres,
            problem,
        }),
    };
    let serve = |history, record_locally, record_in_postgres| Decision::Serve {
        history,
        record_locally,
        record_in_postgres,
    };
    match (local.history, postgres.history) {
        (Some(l), Some(p)) if l == p => match local_seq >= postgres_seq {
            true => serve(l, false, false),
            false => Decision::Load { history: next },
        },
        _ if local_seq == 0 && (postgres_seq > 0 || postgres.history.is_some()) => {
            Decision::Load { history: next }
        }
        (Some(l), Some(p)) => {
            let (problem, past) = match (l.id == p.id, l.epoch < p.epoch) {
                (false, _) => (Problem::OtherHistory, p.epoch),
                (true, true) => (Problem::OlderEpoch, p.epoch),
                (true, false) => (Problem::NewerEpoch, l.epoch),
            };
            let load = History {
                id: p.id,
                epoch: past.saturating_add(1),
            };
            refuse(problem, load)
        }
        (None, Some(p)) if local_seq == postgres_seq => serve(p, true, false),
        (None, Some(_)) if local_seq < postgres_seq => Decision::Load { history: next },
        (None, Some(_)) => refuse(Problem::UnnamedAhead, next),
        (Some(l), None) if local_seq >= postgres_seq => serve(l, false, true),
        (Some(_), None) => refuse(Problem::BehindUnnamed, next),
        (None, None) if local_seq >= postgres_seq => serve(next, true, true),
        (None, None) => Decision::Load { history: next },
    }
}

/// The data directory's history record, or None (a new directory, or one an
/// older quotad wrote).
pub fn read(store: &dyn LogStore) -> Result<Option<History>, StorageError> {
    let Some(bytes) = store.read_meta(HISTORY_KEY)? else {
        return Ok(None);
    };
    let history: History = codec::decode(&bytes)
        .map_err(|e| StorageError::Codec(format!("the history record: {e}")))?;
    if history.epoch == 0 {
        return Err(StorageError::Codec(
            "the history record holds epoch 0, which no history has".into(),
        ));
    }
    Ok(Some(history))
}

/// Records `history` in the data directory durably (flushed), and reads it
/// back: a start that goes on to serve must have it on disk.
pub fn write(store: &dyn LogStore, history: &History) -> Result<(), StorageError> {
    if history.epoch == 0 {
        return Err(StorageError::Codec("a history record of epoch 0".into()));
    }
    store.write_meta(HISTORY_KEY, &codec::encode(history)?)?;
    store.flush()?;
    match read(store)? {
        Some(written) if written == *history => Ok(()),
        other => Err(StorageError::Io(format!(
            "the history record reads back as {other:?}, not {history}"
        ))),
    }
}

#[cfg(test)]
mod tests;
