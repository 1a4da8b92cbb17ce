//! The fence around every snapshot commit: the `quotad_snapshot` row (the
//! history, epoch and WAL position Postgres holds, and who wrote it), what a
//! snapshot transaction finds there, whether it may write, and the position
//! it leaves.

use tokio_postgres::Transaction;

use super::convert::{db_i64, db_u64};
use crate::postgres::recover::history_from_row;
use crate::postgres::PostgresError;
use crate::storage::history::History;

/// What a snapshot transaction finds at its start.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fence {
    Write,
    /// An earlier attempt of this very snapshot committed, but its answer was
    /// lost with the connection: nothing to write again.
    AlreadyCommitted,
}

/// What `quotad_snapshot` holds when a snapshot transaction starts.
#[derive(Debug, Default)]
pub(super) struct Found {
    pub(super) wal_seq: u64,
    /// `writer` is this process's id.
    pub(super) written_by_us: bool,
    pub(super) history: Option<History>,
}

impl Found {
    /// Reads the row. The caller has taken [`super::SNAPSHOT_LOCK`] in `tx`,
    /// so no other writer moves the row before `tx` ends. `writer_id` is
    /// this process's.
    pub(super) async fn read(tx: &Transaction<'_>, writer_id: &str) -> Result<Self, PostgresError> {
        let found = match tx
            .query_opt(
                "SELECT wal_seq, writer, history_id, epoch FROM quotad_snapshot WHERE id = 1",
                &[],
            )
            .await?
        {
            Some(row) => Found {
                wal_seq: db_u64(row.get(0)),
                written_by_us: row.get::<_, &str>(1) == writer_id,
                history: history_from_row(row.get(2), row.get(3))?,
            },
            None => Found::default(),
        };
        Ok(found)
    }
}

/// Postgres must be at this quotad's history and epoch (`ours`): another one
/// means another quotad took the history up from Postgres since (or started
/// another), and this one's state is older than what Postgres holds. It must
/// also hold the position this quotad committed last (`expected`); another
/// position means another writer of the same epoch. Either way nothing is
/// written. The one exception is this very snapshot, written by this process
/// (`written_by_us`): an earlier attempt committed and its answer was lost.
pub(super) fn fence(
    found: &Found,
    ours: Option<&History>,
    expected: u64,
    delta_seq: u64,
) -> Result<Fence, PostgresError> {
    if ours.is_none() || found.history.as_ref() != ours {
        let name = |h: Option<&History>| h.map_or_else(|| "no history".into(), History::to_string);
        return Err(PostgresError::Superseded {
            found: name(found.history.as_ref()),
            ours: name(ours),
        });
    }
    let found_seq = found.wal_seq;
    if found_seq == expected {
        Ok(Fence::Write)
    } else if found_seq == delta_seq && found_seq > expected && found.written_by_us {
        Ok(Fence::AlreadyCommitted)
    } else {
        Err(PostgresError::Fenced {
            found: found_seq,
            expected,
        })
    }
}

/// The position this snapshot covers, and who wrote it: what the next
/// snapshot's fence expects to find.
pub(super) async fn record_position(
    tx: &Transaction<'_>,
    wal_seq: u64,
    writer_id: &str,
) -> Result<(), PostgresError> {
    tx.execute(
        "INSERT INTO quotad_snapshot (id, wal_seq, taken_at, writer) VALUES (1, $1, now(), $2)
         ON CONFLICT (id) DO UPDATE SET wal_seq = EXCLUDED.wal_seq,
             taken_at = EXCLUDED.taken_at, writer = EXCLUDED.writer",
        &[&db_i64(wal_seq), &writer_id],
    )
    .await?;
    Ok(())
}
