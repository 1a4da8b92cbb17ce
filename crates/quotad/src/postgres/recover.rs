//! Loading the state from the latest Postgres snapshot: each school's and
//! each teacher account's encoded state, and each school's audit trail from
//! `ai_allocation_history`, whose chain is verified before it is trusted.
//! And the attach transaction ([`Attaching`]), in which start-up reads which
//! history, epoch and position Postgres is at and records what it decided.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::{Client, GenericClient, Transaction};

use super::rows::decode_school;
use super::snapshot::{db_i64, db_ms, db_u64, SNAPSHOT_LOCK};
use super::PostgresError;
use crate::storage::codec;
use crate::storage::history::{History, HistoryId, HistoryPosition};
use quotad_core::audit::Values;
use quotad_core::{
    AuditAction, AuditEntry, AuditTrail, SchoolId, ServiceType, State, TeacherAccount, TeacherId,
};

/// The snapshot Postgres holds.
#[derive(Debug)]
pub struct PostgresSnapshot {
    /// The WAL position it covers (0: Postgres holds no snapshot).
    pub wal_seq: u64,
    pub state: State,
}

/// The WAL position the latest snapshot covers (0 when there is none).
pub async fn snapshot_seq(client: &Client) -> Result<u64, PostgresError> {
    let seq: Option<i64> = client
        .query_opt("SELECT wal_seq FROM quotad_snapshot WHERE id = 1", &[])
        .await?
        .map(|row| row.get(0));
    Ok(seq.map_or(0, db_u64))
}

/// The attach transaction: it holds the snapshot lock from the moment it
/// reads which history, epoch and position Postgres is at until it commits
/// what start-up decided, so no snapshot commit can come in between. A
/// recovery from Postgres loads the state and sets the new epoch in it: from
/// that commit on, a quotad still writing the older epoch is fenced, and the
/// state loaded is exactly the one the new epoch starts from. Dropping it
/// without [`Attaching::commit`] rolls back and changes nothing.
pub struct Attaching<'a> {
    tx: Transaction<'a>,
    /// What Postgres holds.
    pub found: HistoryPosition,
}

pub async fn begin_attach(client: &mut Client) -> Result<Attaching<'_>, PostgresError> {
    // Read committed (the default), not repeatable read: that would take its
    // view before the lock is granted, and miss a snapshot that committed
    // while this waited for it. Under the lock, no snapshot can commit.
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SNAPSHOT_LOCK])
        .await?;
    let found = match tx
        .query_opt(
            "SELECT wal_seq, history_id, epoch FROM quotad_snapshot WHERE id = 1",
            &[],
        )
        .await?
    {
        Some(row) => HistoryPosition {
            history: history_from_row(row.get(1), row.get(2))?,
            wal_seq: db_u64(row.get(0)),
        },
        None => HistoryPosition {
            history: None,
            wal_seq: 0,
        },
    };
    Ok(Attaching { tx, found })
}

impl Attaching<'_> {
    /// How many audit entries Postgres holds per school.
    pub async fn history_written(&self) -> Result<HashMap<SchoolId, u64>, PostgresError> {
        history_written(&self.tx).await
    }

    /// The whole state at [`Attaching::found`]'s position.
    pub async fn load(&self) -> Result<PostgresSnapshot, PostgresError> {
        let snapshot = load_in(&self.tx).await?;
        if snapshot.wal_seq != self.found.wal_seq {
            // Cannot happen under the lock; if it did, the new epoch would
            // start from a state other than the one it claims.
            return Err(damaged(format!(
                "the snapshot moved from position {} to {} under the snapshot lock",
                self.found.wal_seq, snapshot.wal_seq
            )));
        }
        Ok(snapshot)
    }

    /// Records `history` as Postgres's (when it is not already) and commits.
    pub async fn commit(self, history: &History) -> Result<(), PostgresError> {
        if self.found.history != Some(*history) {
            // A database without a snapshot gets its row now, at position
            // 0, so that the first snapshot's fence finds the history.
            self.tx
                .execute(
                    "INSERT INTO quotad_snapshot (id, wal_seq, taken_at, history_id, epoch)
                     VALUES (1, $1, now(), $2, $3)
                     ON CONFLICT (id) DO UPDATE SET
                         history_id = EXCLUDED.history_id, epoch = EXCLUDED.epoch",
                    &[
                        &db_i64(self.found.wal_seq),
                        &history.id.to_string(),
                        &db_i64(history.epoch),
                    ],
                )
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// The history a `quotad_snapshot` row names; None for '' (written by a
/// quotad from before history identity).
pub(crate) fn history_from_row(id: &str, epoch: i64) -> Result<Option<History>, PostgresError> {
    if id.is_empty() {
        return Ok(None);
    }
    let id = HistoryId::parse(id).ok_or_else(|| {
        damaged(format!(
            "quotad_snapshot.history_id {id:?} is not 32 hex digits"
        ))
    })?;
    if epoch < 1 {
        return Err(damaged(format!(
            "quotad_snapshot.epoch {epoch} for history {id}"
        )));
    }
    Ok(Some(History {
        id,
        epoch: db_u64(epoch),
    }))
}

/// How many audit entries Postgres holds per school.
pub async fn history_written(
    client: &impl GenericClient,
) -> Result<HashMap<SchoolId, u64>, PostgresError> {
    let rows = client
        .query(
            "SELECT school_id, max(seq) FROM ai_allocation_history GROUP BY school_id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let id: &str = row.get(0);
            let seq: i64 = row.get(1);
            Ok((parse_id(SchoolId::parse(id), "school_id")?, db_u64(seq)))
        })
        .collect()
}

/// Loads the whole state as of the latest snapshot. Everything it reads was
/// written by one snapshot transaction or an earlier one, so it is the state
/// after WAL position `wal_seq`.
pub async fn load(client: &mut Client) -> Result<PostgresSnapshot, PostgresError> {
    // One repeatable-read transaction: a snapshot committing meanwhile
    // cannot mix two positions.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let snapshot = load_in(&tx).await?;
    tx.commit().await?;
    Ok(snapshot)
}

/// [`load`], in a transaction whose view no snapshot commit can change: a
/// repeatable-read one, or the attach transaction under the snapshot lock.
async fn load_in(tx: &Transaction<'_>) -> Result<PostgresSnapshot, PostgresError> {
    let wal_seq: u64 = tx
        .query_opt("SELECT wal_seq FROM quotad_snapshot WHERE id = 1", &[])
        .await?
        .map_or(0, |row| db_u64(row.get(0)));
    let mut trails = load_history(tx).await?;
    let mut state = State::default();
    for row in tx
        .query("SELECT school_id, state FROM quotad_school_state", &[])
        .await?
    {
        let id = parse_id(SchoolId::parse(row.get(0)), "school_id")?;
        let trail = trails.remove(&id).unwrap_or_default();
        let school = decode_school(row.get(1), trail)
            .map_err(|e| damaged(format!("the state of school {id}: {e}")))?;
        if school.config.id != id {
            return Err(damaged(format!(
                "the row of school {id} holds school {}",
                school.config.id
            )));
        }
        state.schools.insert(id, school);
    }
    if let Some(orphan) = trails.keys().next() {
        return Err(damaged(format!(
            "audit entries of school {orphan}, which has no state"
        )));
    }
    for row in tx
        .query(
            "SELECT school_id, teacher_id, state FROM quotad_account_state",
            &[],
        )
        .await?
    {
        let school_id = parse_id(SchoolId::parse(row.get(0)), "school_id")?;
        let teacher_id = parse_id(TeacherId::parse(row.get(1)), "teacher_id")?;
        let account: TeacherAccount = codec::decode(row.get(2))
            .map_err(|e| damaged(format!("the account of {school_id}/{teacher_id}: {e}")))?;
        if account.school_id != school_id || account.teacher_id != teacher_id {
            return Err(damaged(format!(
                "the row of {school_id}/{teacher_id} holds the account of {}/{}",
                account.school_id, account.teacher_id
            )));
        }
        state.accounts.insert((school_id, teacher_id), account);
    }
    Ok(PostgresSnapshot { wal_seq, state })
}

async fn load_history(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<BTreeMap<SchoolId, AuditTrail>, PostgresError> {
    let rows = tx
        .query(
            "SELECT school_id, seq, at, actor, action, teacher_id, service_type, reason,
                    before::text, after::text, prev_hash, hash
               FROM ai_allocation_history ORDER BY school_id, seq",
            &[],
        )
        .await?;
    let mut entries: BTreeMap<SchoolId, Vec<AuditEntry>> = BTreeMap::new();
    for row in &rows {
        let school_id = parse_id(SchoolId::parse(row.get(0)), "school_id")?;
        let entry = AuditEntry {
            seq: db_u64(row.get(1)),
            at_ms: db_ms(row.get(2)),
            actor: row.get::<_, &str>(3).into(),
            action: AuditAction::parse(row.get(4))
                .ok_or_else(|| damaged(format!("audit action {:?}", row.get::<_, &str>(4))))?,
            teacher_id: row
                .get::<_, Option<&str>>(5)
                .map(|t| parse_id(TeacherId::parse(t), "teacher_id"))
                .transpose()?,
            service: row
                .get::<_, Option<&str>>(6)
                .map(|s| parse_id(ServiceType::parse(s), "service_type"))
                .transpose()?,
            reason: row.get::<_, &str>(7).into(),
            before: values(row.get(8))?,
            after: values(row.get(9))?,
            prev_hash: hash(row.get(10))?,
            hash: hash(row.get(11))?,
        };
        entries.entry(school_id).or_default().push(entry);
    }
    entries
        .into_iter()
        .map(|(id, entries)| {
            let trail = AuditTrail::from_entries(entries).map_err(|broken| {
                damaged(format!(
                    "the audit trail of school {id}: {}",
                    broken.problem
                ))
            })?;
            Ok((id, trail))
        })
        .collect()
}

fn values(text: &str) -> Result<Values, PostgresError> {
    serde_json::from_str(text).map_err(|e| damaged(format!("audit values {text:?}: {e}")))
}

fn hash(bytes: &[u8]) -> Result<[u8; 32], PostgresError> {
    bytes
        .try_into()
        .map_err(|_| damaged(format!("an audit hash of {} bytes", bytes.len())))
}

fn parse_id<T>(
    parsed: Result<T, quotad_core::InvalidInput>,
    what: &str,
) -> Result<T, PostgresError> {
    parsed.map_err(|e| damaged(format!("a {what}: {e}")))
}

fn damaged(what: String) -> PostgresError {
    PostgresError::Damaged(what)
}
