//! Loading the state from the latest Postgres snapshot: each school's and
//! each teacher account's encoded state, and each school's audit trail from
//! `ai_allocation_history`, whose chain is verified before it is trusted.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Client;

use super::rows::decode_school;
use super::snapshot::{db_ms, db_u64};
use super::PostgresError;
use crate::domain::audit::Values;
use crate::domain::{
    AuditAction, AuditEntry, AuditTrail, SchoolId, ServiceType, State, TeacherAccount, TeacherId,
};
use crate::storage::codec;

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

/// How many audit entries Postgres holds per school.
pub async fn history_written(client: &Client) -> Result<HashMap<SchoolId, u64>, PostgresError> {
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
    let wal_seq: u64 = tx
        .query_opt("SELECT wal_seq FROM quotad_snapshot WHERE id = 1", &[])
        .await?
        .map_or(0, |row| db_u64(row.get(0)));
    let mut trails = load_history(&tx).await?;
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
    tx.commit().await?;
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
    parsed: Result<T, crate::domain::InvalidInput>,
    what: &str,
) -> Result<T, PostgresError> {
    parsed.map_err(|e| damaged(format!("a {what}: {e}")))
}

fn damaged(what: String) -> PostgresError {
    PostgresError::Damaged(what)
}
