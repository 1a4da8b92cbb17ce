//! A delta's rows into their tables: the subscriptions, allocations,
//! requests and audit history that mirror the original system's schema, and
//! quotad's own encoded school and account states. Each table takes one
//! statement, its columns sent as arrays and unnested on the server side.

use std::time::SystemTime;

use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

use super::convert::{db_i64, db_time};
use super::usage::{write_usage, WAL_READ_RECORDS_MAX};
use crate::postgres::rows::Delta;
use crate::postgres::PostgresError;
use crate::storage::LogStore;

/// Every row of the delta, one statement per table (arrays unnested on the
/// server side) and COPY for the usage log: a handful of round trips
/// whatever the size of the snapshot.
pub(super) async fn write_delta(
    tx: &Transaction<'_>,
    delta: &Delta,
    wal: &dyn LogStore,
) -> Result<(), PostgresError> {
    write_subscriptions(tx, delta).await?;
    write_allocations(tx, delta).await?;
    write_requests(tx, delta).await?;
    write_history(tx, delta).await?;
    write_usage(tx, delta, wal, WAL_READ_RECORDS_MAX).await?;
    write_states(tx, delta).await
}

async fn write_subscriptions(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.subscriptions;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|r| r.school_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    let name: Vec<&str> = rows.iter().map(|r| r.school_name.as_str()).collect();
    let tier: Vec<&str> = rows.iter().map(|r| r.tier).collect();
    let anchor: Vec<i16> = rows.iter().map(|r| r.anchor_day).collect();
    let next_anchor: Vec<Option<i16>> = rows.iter().map(|r| r.next_anchor_day).collect();
    let borrowing: Vec<bool> = rows.iter().map(|r| r.borrowing_enabled).collect();
    let self_service: Vec<bool> = rows.iter().map(|r| r.self_service_requests).collect();
    let start: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle.start_ms)).collect();
    let end: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle.end_ms)).collect();
    let cycle_units: Vec<i64> = rows.iter().map(|r| db_i64(r.pool.cycle_units)).collect();
    let allocated: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.pool.allocated_units))
        .collect();
    let borrowed: Vec<i64> = rows.iter().map(|r| db_i64(r.pool.borrowed_units)).collect();
    let used: Vec<i64> = rows.iter().map(|r| db_i64(r.used_units)).collect();
    let params: [&(dyn ToSql + Sync); 14] = [
        &school,
        &service,
        &name,
        &tier,
        &anchor,
        &next_anchor,
        &borrowing,
        &self_service,
        &start,
        &end,
        &cycle_units,
        &allocated,
        &borrowed,
        &used,
    ];
    tx.execute(
        "INSERT INTO school_ai_subscriptions (school_id, service_type, school_name, tier,
             billing_anchor_day, next_billing_anchor_day, borrowing_enabled, self_service_requests,
             cycle_start, cycle_end, cycle_units, allocated_units, borrowed_units, used_units)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[],
             $6::int2[], $7::bool[], $8::bool[], $9::timestamptz[], $10::timestamptz[],
             $11::int8[], $12::int8[], $13::int8[], $14::int8[])
         ON CONFLICT (school_id, service_type) DO UPDATE SET
             school_name = EXCLUDED.school_name, tier = EXCLUDED.tier,
             billing_anchor_day = EXCLUDED.billing_anchor_day,
             next_billing_anchor_day = EXCLUDED.next_billing_anchor_day,
             borrowing_enabled = EXCLUDED.borrowing_enabled,
             self_service_requests = EXCLUDED.self_service_requests,
             cycle_start = EXCLUDED.cycle_start, cycle_end = EXCLUDED.cycle_end,
             cycle_units = EXCLUDED.cycle_units, allocated_units = EXCLUDED.allocated_units,
             borrowed_units = EXCLUDED.borrowed_units, used_units = EXCLUDED.used_units,
             updated_at = now()",
        &params,
    )
    .await?;
    Ok(())
}

/// Replaces the rows of every changed teacher: a slice removed since the last
/// snapshot loses its row.
async fn write_allocations(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    if delta.teachers.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = delta.teachers.iter().map(|(s, _)| s.as_str()).collect();
    let teacher: Vec<&str> = delta.teachers.iter().map(|(_, t)| t.as_str()).collect();
    tx.execute(
        "DELETE FROM teacher_ai_allocations a
          USING unnest($1::text[], $2::text[]) AS d(school_id, teacher_id)
          WHERE a.school_id = d.school_id AND a.teacher_id = d.teacher_id",
        &[&school, &teacher],
    )
    .await?;
    let rows = &delta.allocations;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|r| r.school_id.as_str()).collect();
    let teacher: Vec<&str> = rows.iter().map(|r| r.teacher_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    let allocated: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.allocated_units))
        .collect();
    let used: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.total_used_units()))
        .collect();
    let reserved: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.reserved_units))
        .collect();
    let borrowed: Vec<i64> = rows
        .iter()
        .map(|r| db_i64(r.slice.borrowed_units))
        .collect();
    let overage: Vec<i64> = rows.iter().map(|r| db_i64(r.slice.overage_units)).collect();
    let priority: Vec<&str> = rows.iter().map(|r| r.slice.priority.as_str()).collect();
    let auto_renew: Vec<bool> = rows.iter().map(|r| r.slice.auto_renew).collect();
    let status: Vec<&str> = rows.iter().map(|r| r.slice.status.as_str()).collect();
    let start: Vec<SystemTime> = rows.iter().map(|r| db_time(r.cycle_start_ms)).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &school,
        &teacher,
        &service,
        &allocated,
        &used,
        &reserved,
        &borrowed,
        &overage,
        &priority,
        &auto_renew,
        &status,
        &start,
    ];
    tx.execute(
        "INSERT INTO teacher_ai_allocations (school_id, teacher_id, service_type, allocated_units,
             used_units, reserved_units, borrowed_units, overage_units, priority, auto_renew,
             status, cycle_start)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[],
             $6::int8[], $7::int8[], $8::int8[], $9::text[], $10::bool[], $11::text[],
             $12::timestamptz[])",
        &params,
    )
    .await?;
    Ok(())
}

async fn write_requests(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.requests;
    if rows.is_empty() {
        return Ok(());
    }
    let school: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    let id: Vec<i64> = rows.iter().map(|(_, r)| db_i64(r.id)).collect();
    let teacher: Vec<&str> = rows.iter().map(|(_, r)| r.teacher_id.as_str()).collect();
    let service: Vec<&str> = rows.iter().map(|(_, r)| r.service.as_str()).collect();
    let units: Vec<i64> = rows.iter().map(|(_, r)| db_i64(r.units)).collect();
    let reason: Vec<&str> = rows.iter().map(|(_, r)| &*r.reason).collect();
    let status: Vec<&str> = rows.iter().map(|(_, r)| r.status.as_str()).collect();
    let approved: Vec<i64> = rows
        .iter()
        .map(|(_, r)| match r.status {
            quotad_core::RequestStatus::Approved { units } => db_i64(units),
            _ => 0,
        })
        .collect();
    let decision_reason: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, r)| r.decision_reason.as_deref())
        .collect();
    let decided_by: Vec<Option<&str>> = rows.iter().map(|(_, r)| r.decided_by.as_deref()).collect();
    let created: Vec<SystemTime> = rows.iter().map(|(_, r)| db_time(r.created_at_ms)).collect();
    let decided: Vec<Option<SystemTime>> = rows
        .iter()
        .map(|(_, r)| r.decided_at_ms.map(db_time))
        .collect();
    let expires: Vec<SystemTime> = rows
        .iter()
        .map(|(_, r)| db_time(r.expires_at_ms()))
        .collect();
    let params: [&(dyn ToSql + Sync); 13] = [
        &school,
        &id,
        &teacher,
        &service,
        &units,
        &reason,
        &status,
        &approved,
        &decision_reason,
        &decided_by,
        &created,
        &decided,
        &expires,
    ];
    tx.execute(
        "INSERT INTO ai_allocation_requests (school_id, request_id, teacher_id, service_type,
             requested_units, reason, status, approved_units, decision_reason, decided_by,
             created_at, decided_at, expires_at)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[],
             $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::timestamptz[],
             $12::timestamptz[], $13::timestamptz[])
         ON CONFLICT (school_id, request_id) DO UPDATE SET
             status = EXCLUDED.status, approved_units = EXCLUDED.approved_units,
             decision_reason = EXCLUDED.decision_reason, decided_by = EXCLUDED.decided_by,
             decided_at = EXCLUDED.decided_at",
        &params,
    )
    .await?;
    Ok(())
}

/// Appends audit entries. An entry already there (a snapshot retried after
/// a commit whose answer was lost) is left alone: the table is append-only.
async fn write_history(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let rows = &delta.history;
    if rows.is_empty() {
        return Ok(());
    }
    let json =
        |values| serde_json::to_string(values).map_err(|e| PostgresError::Encode(e.to_string()));
    let school: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    let seq: Vec<i64> = rows.iter().map(|(_, e)| db_i64(e.seq)).collect();
    let at: Vec<SystemTime> = rows.iter().map(|(_, e)| db_time(e.at_ms)).collect();
    let actor: Vec<&str> = rows.iter().map(|(_, e)| &*e.actor).collect();
    let action: Vec<&str> = rows.iter().map(|(_, e)| e.action.as_str()).collect();
    let teacher: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, e)| e.teacher_id.as_ref().map(|t| t.as_str()))
        .collect();
    let service: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, e)| e.service.as_ref().map(|s| s.as_str()))
        .collect();
    let reason: Vec<&str> = rows.iter().map(|(_, e)| &*e.reason).collect();
    let before = rows
        .iter()
        .map(|(_, e)| json(&e.before))
        .collect::<Result<Vec<String>, _>>()?;
    let after = rows
        .iter()
        .map(|(_, e)| json(&e.after))
        .collect::<Result<Vec<String>, _>>()?;
    let prev_hash: Vec<&[u8]> = rows.iter().map(|(_, e)| &e.prev_hash[..]).collect();
    let hash: Vec<&[u8]> = rows.iter().map(|(_, e)| &e.hash[..]).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &school, &seq, &at, &actor, &action, &teacher, &service, &reason, &before, &after,
        &prev_hash, &hash,
    ];
    tx.execute(
        "INSERT INTO ai_allocation_history (school_id, seq, at, actor, action, teacher_id,
             service_type, reason, before, after, prev_hash, hash)
         SELECT s, q, a, ac, act, t, sv, r, b::jsonb, af::jsonb, ph, h
           FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[],
                $12::bytea[]) AS u(s, q, a, ac, act, t, sv, r, b, af, ph, h)
         ON CONFLICT (school_id, seq) DO NOTHING",
        &params,
    )
    .await?;
    Ok(())
}

async fn write_states(tx: &Transaction<'_>, delta: &Delta) -> Result<(), PostgresError> {
    let seq = db_i64(delta.wal_seq);
    if !delta.school_states.is_empty() {
        let school: Vec<&str> = delta
            .school_states
            .iter()
            .map(|(s, _)| s.as_str())
            .collect();
        let state: Vec<&[u8]> = delta.school_states.iter().map(|(_, b)| &b[..]).collect();
        tx.execute(
            "INSERT INTO quotad_school_state (school_id, wal_seq, state)
             SELECT s, $3, b FROM unnest($1::text[], $2::bytea[]) AS u(s, b)
             ON CONFLICT (school_id) DO UPDATE SET wal_seq = EXCLUDED.wal_seq, state = EXCLUDED.state",
            &[&school, &state, &seq],
        )
        .await?;
    }
    if !delta.account_states.is_empty() {
        let rows = &delta.account_states;
        let school: Vec<&str> = rows.iter().map(|(s, _, _)| s.as_str()).collect();
        let teacher: Vec<&str> = rows.iter().map(|(_, t, _)| t.as_str()).collect();
        let state: Vec<&[u8]> = rows.iter().map(|(_, _, b)| &b[..]).collect();
        tx.execute(
            "INSERT INTO quotad_account_state (school_id, teacher_id, wal_seq, state)
             SELECT s, t, $4, b FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(s, t, b)
             ON CONFLICT (school_id, teacher_id) DO UPDATE SET
                 wal_seq = EXCLUDED.wal_seq, state = EXCLUDED.state",
            &[&school, &teacher, &state, &seq],
        )
        .await?;
    }
    Ok(())
}
