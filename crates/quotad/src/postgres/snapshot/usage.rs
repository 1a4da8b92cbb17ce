//! The usage log, `ai_usage_logs`, by binary COPY: the rows a delta carries,
//! then those it left in the WAL, read back piece by piece.

use std::pin::Pin;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use super::convert::{db_i64, db_time};
use crate::postgres::rows::{Delta, UsageRow};
use crate::postgres::PostgresError;
use crate::storage::{codec, LogStore};
use quotad_core::Record;

/// WAL records read back per piece when a delta's usage rows are in the WAL only.
pub(super) const WAL_READ_RECORDS_MAX: usize = 10_000;

/// The usage log goes in with binary COPY: it is the one table that grows
/// with traffic, thousands of rows per snapshot under load. Rows the delta
/// did not carry (a catch-up, or more than memory holds) are read from the
/// WAL piece by piece into the same COPY, so memory stays bounded however far
/// behind Postgres is.
pub(super) async fn write_usage(
    tx: &Transaction<'_>,
    delta: &Delta,
    wal: &dyn LogStore,
    wal_read_records_max: usize,
) -> Result<(), PostgresError> {
    if delta.usage.is_empty() && delta.usage_from_wal.is_none() {
        return Ok(());
    }
    let sink = tx
        .copy_in(
            "COPY ai_usage_logs (wal_seq, event_id, reservation_id, school_id, teacher_id,
                 service_type, units, borrowed_units, overage_units, model, decision,
                 cycle_start, occurred_at, recorded_at) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for row in &delta.usage {
        write_usage_row(writer.as_mut(), row).await?;
    }
    if let Some((after, through)) = delta.usage_from_wal {
        copy_usage_from_wal(writer.as_mut(), wal, after, through, wal_read_records_max).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// The usage rows of the WAL records after `after` through `through`, read
/// `wal_read_records_max` records at a time.
async fn copy_usage_from_wal(
    mut writer: Pin<&mut BinaryCopyInWriter>,
    wal: &dyn LogStore,
    after: u64,
    through: u64,
    wal_read_records_max: usize,
) -> Result<(), PostgresError> {
    let mut cursor = after;
    while cursor < through {
        let entries = wal
            .read_range(cursor, wal_read_records_max)
            .map_err(|e| PostgresError::Wal(e.to_string()))?;
        let Some(last) = entries.last().map(|(seq, _)| *seq) else {
            break;
        };
        for (seq, bytes) in entries.iter().filter(|(seq, _)| *seq <= through) {
            let record: Record = codec::decode(bytes)
                .map_err(|e| PostgresError::Wal(format!("record {seq}: {e}")))?;
            if let Some(row) = UsageRow::from_record(*seq, &record) {
                write_usage_row(writer.as_mut(), &row).await?;
            }
        }
        cursor = last;
    }
    Ok(())
}

async fn write_usage_row(
    writer: Pin<&mut BinaryCopyInWriter>,
    row: &UsageRow,
) -> Result<(), PostgresError> {
    let values: [&(dyn ToSql + Sync); 14] = [
        &db_i64(row.wal_seq),
        &row.event_id,
        &row.reservation_id,
        &row.school_id.as_str(),
        &row.teacher_id.as_str(),
        &row.service.as_str(),
        &db_i64(row.units),
        &db_i64(row.borrowed_units),
        &db_i64(row.overage_units),
        &row.model,
        &row.decision,
        &db_time(row.cycle_start_ms),
        &db_time(row.occurred_at_ms),
        &db_time(row.recorded_at_ms),
    ];
    writer.write(&values).await?;
    Ok(())
}
