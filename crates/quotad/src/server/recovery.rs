//! Start-up recovery: the state from the data directory, from Postgres, or
//! from both (Postgres' snapshot and the WAL records after it), with the
//! operator's say on damage and data loss.

use std::sync::Arc;
use std::time::Duration;

use super::ServeError;
use crate::config::{Config, Secret};
use crate::engine::system_now_ms;
use crate::postgres::recover::{Attaching, PostgresSnapshot};
use crate::postgres::{self, rows::Changes, snapshot::PostgresFollower};
use crate::storage::history::{self, Decision, History, HistoryId, HistoryPosition, RecoverFrom};
use crate::storage::snapshot::{write_snapshot, Follower};
use crate::storage::{recover_with, LogStore, OnDamage, Recovered, StorageError, Wal};
use crate::telemetry;

/// How long start-up waits for Postgres before serving from the data
/// directory alone.
const POSTGRES_START_WAIT: Duration = Duration::from_secs(5);

/// Recovers from the data directory. Damage refuses to start unless the
/// operator accepted the loss for this start; then the state up to the last
/// whole record is written down as the snapshot and everything after it is
/// dropped, so that new records follow it without a gap.
fn recover_local(store: &dyn LogStore, config: &Config) -> Result<Recovered, ServeError> {
    let on_damage = if config.accept_data_loss {
        OnDamage::AcceptLoss
    } else {
        OnDamage::Refuse
    };
    // sled has been seen to panic on a damaged log while reading it.
    let mut recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        recover_with(store, on_damage)
    }))
    .map_err(|panic| {
        StorageError::Damaged(format!(
            "sled panicked while reading the log: {}",
            crate::storage::log::panic_message(&panic)
        ))
    })
    .and_then(|recovered| recovered)
    .map_err(|source| ServeError::Recover { source })?;
    if let Some(lost) = &recovered.lost {
        tracing::error!(
            %lost,
            served_through_wal_seq = recovered.last_seq,
            "DATA LOSS ACCEPTED (--accept-data-loss): serving the state up to the last whole \
             record; every record after it is gone"
        );
        // The lower mark first (it is synced at once): a crash after the
        // cut must not find a mark past the log's new end.
        store.mark_durable(recovered.last_seq)?;
        write_snapshot(store, recovered.last_seq, &recovered.state)?;
        recovered.snapshot_seq = recovered.last_seq;
        store.truncate_through(u64::MAX)?;
        store.flush()?;
    }
    tracing::info!(
        schools = recovered.state.schools.len(),
        teachers = recovered.state.accounts.len(),
        snapshot_wal_seq = recovered.snapshot_seq,
        replayed_records = recovered.replayed_records,
        "state recovered from the data directory"
    );
    Ok(recovered)
}

/// After `--accept-data-loss` served a damaged log: an entry in every
/// school's audit trail, so that principals (and Postgres's history table)
/// see that the state was cut back and why. Written through the WAL like any
/// change, after the snapshotter started (it applies them from the durable
/// batches) and before the engine (which starts from the state with them).
pub(super) async fn audit_accepted_loss(
    wal: &Wal,
    recovered: &mut Recovered,
) -> Result<(), ServeError> {
    let Some(lost) = recovered.lost.clone() else {
        return Ok(());
    };
    let change = quotad_core::Change {
        by: Arc::from("quotad --accept-data-loss"),
        reason: Arc::from("the operator accepted the loss of a damaged write-ahead log"),
        at_ms: system_now_ms(),
    };
    let schools: Vec<_> = recovered.state.schools.keys().cloned().collect();
    for school_id in schools {
        let record = quotad_core::Record::DataLossAccepted {
            school_id,
            served_through_seq: recovered.snapshot_seq,
            lost: Arc::from(lost.as_str()),
            change: change.clone(),
        };
        let wal_seq = wal.append(&record).map_err(ServeError::Audit)?;
        wal.wait_durable(wal_seq).await.map_err(ServeError::Audit)?;
        recovered
            .state
            .apply(wal_seq, &record)
            .map_err(StorageError::from)?;
        recovered.last_seq = wal_seq;
    }
    Ok(())
}

/// Without Postgres, a new data directory starts a history of its own; a
/// directory an older quotad wrote is left without one (nothing here says
/// which history it belongs to; the first start with Postgres decides).
pub(super) fn recover_without_postgres(
    store: &dyn LogStore,
    config: &Config,
) -> Result<Recovered, ServeError> {
    let recovered = recover_local(store, config)?;
    if recovered.last_seq == 0 && history::read(store)?.is_none() {
        let started = History::first(HistoryId::random()?);
        history::write(store, &started)?;
        tracing::info!(history = %started, "a new history starts");
    }
    Ok(recovered)
}

/// Recovers from the data directory or from Postgres, as
/// [`history::decide`] rules from which history and epoch each holds and
/// how far along it is. Serving the directory catches Postgres up from it
/// (the local WAL is never truncated past what Postgres holds, so it is
/// Postgres's snapshot plus the WAL after it). Loading Postgres (a new node,
/// a lost disk, or `--recover-from postgres`) discards the directory's state,
/// writes the loaded one down and continues the WAL after its position, at a
/// new epoch. A directory of another history or epoch is refused. All of it
/// is decided and recorded in Postgres under the snapshot lock, in one
/// transaction ([`Attaching`]).
///
/// When Postgres does not answer at start, a data directory with state is
/// served alone and Postgres is caught up once it answers (if the directory
/// is at its history); an empty one cannot be, and start-up fails.
pub(super) async fn recover_with_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    config: &Config,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let interval = Duration::from_secs(config.postgres_snapshot_interval_s);
    let connected = tokio::time::timeout(POSTGRES_START_WAIT, postgres::prepare(&url.0)).await;
    let answered = match connected {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "no answer within {} s",
            POSTGRES_START_WAIT.as_secs()
        )),
    };
    let mut client = match answered {
        Ok(client) => client,
        // The operator asked for Postgres's state: serving the directory
        // alone (perhaps the very one they meant to discard) is the opposite.
        Err(error) if config.recover_from == RecoverFrom::Postgres => {
            return Err(ServeError::PostgresNeeded(error))
        }
        Err(error) => return start_without_postgres(store, url, config, error),
    };
    let local = recover_local(store.as_ref(), config)?;
    let attached = attach(store.as_ref(), &mut client, local, config).await?;
    telemetry::postgres_snapshot_recovered(attached.postgres_seq);
    tracing::info!(
        history = %attached.history,
        wal_seq = attached.recovered.last_seq,
        "attached to Postgres"
    );
    let follower = PostgresFollower::start(
        url.clone(),
        interval,
        store.clone(),
        attached.postgres_seq,
        attached.changes,
        attached.history,
    )?;
    Ok((attached.recovered, Some(Box::new(follower))))
}

/// What start-up attached to: the state to serve, what Postgres lacks of
/// it, and the history and epoch every snapshot commit will be fenced on.
struct Attached {
    recovered: Recovered,
    changes: Changes,
    history: History,
    /// The position Postgres covers.
    postgres_seq: u64,
}

/// Compares the data directory (`local`, recovered from it) with Postgres
/// and carries out [`history::decide`]'s ruling in the attach transaction.
async fn attach(
    store: &dyn LogStore,
    client: &mut tokio_postgres::Client,
    local: Recovered,
    config: &Config,
) -> Result<Attached, ServeError> {
    let local_at = HistoryPosition {
        history: history::read(store)?,
        wal_seq: local.last_seq,
    };
    let new_id = HistoryId::random()?;
    let attaching = postgres::recover::begin_attach(client).await?;
    let postgres_at = attaching.found;
    let history_written = attaching.history_written().await?;
    let (recovered, changes, history) =
        match history::decide(&local_at, &postgres_at, config.recover_from, new_id) {
            Decision::Refuse(conflict) => {
                // Dropping `attaching` rolls back: Postgres is left as it was.
                return Err(ServeError::History {
                    path: config.data_dir.clone(),
                    conflict,
                });
            }
            Decision::Serve {
                history,
                record_locally,
                ..
            } => {
                if config.recover_from == RecoverFrom::Postgres {
                    tracing::info!(
                        %history,
                        "recover_from = postgres is not needed: the data directory is served (it \
                         is at Postgres's history and epoch, or Postgres has none); nothing is \
                         discarded"
                    );
                }
                if record_locally {
                    // Before the commit: a crash between the two leaves a
                    // directory that names the history and a Postgres that
                    // does not yet, which the next start serves and records.
                    history::write(store, &history)?;
                }
                attaching.commit(&history).await?;
                let changes = if local.last_seq == postgres_at.wal_seq {
                    Changes::new(history_written)
                } else {
                    catch_up(store, &local, postgres_at.wal_seq, history_written)?
                };
                (local, changes, history)
            }
            Decision::Load { history } => {
                let recovered = load_from_postgres(store, attaching, &local_at, history).await?;
                (recovered, Changes::new(history_written), history)
            }
        };
    Ok(Attached {
        recovered,
        changes,
        history,
        postgres_seq: postgres_at.wal_seq,
    })
}

/// Loads Postgres's snapshot and commits the new epoch in the attach
/// transaction, then replaces the data directory's state with it: first the
/// old WAL goes (it may run past Postgres's position, and its records, of
/// another history or epoch, must never be replayed onto this state), then
/// the snapshot is written and flushed, and only then the history record.
/// A crash on the way leaves a directory that can never serve a mix: with
/// its old record (refused, or loaded again), without one (loaded again, or
/// at Postgres's position and holding exactly its state, adopting the epoch
/// just committed).
async fn load_from_postgres(
    store: &dyn LogStore,
    attaching: Attaching<'_>,
    local_at: &HistoryPosition,
    history: History,
) -> Result<Recovered, ServeError> {
    let loaded: PostgresSnapshot = attaching.load().await?;
    attaching.commit(&history).await?;
    if local_at.wal_seq > 0 {
        tracing::warn!(
            local = %local_at,
            postgres_wal_seq = loaded.wal_seq,
            new = %history,
            "the data directory's state is discarded: recovering from Postgres"
        );
    }
    // The directory's old mark may be past the loaded position: the log
    // now ends there, and a mark beyond it would read as lost records. It
    // is lowered (and synced) before the log is cut back. A lower mark is
    // left alone: it is a lower bound, and raising it before the snapshot
    // below is written would put it ahead of the log.
    if store
        .durable_mark()?
        .is_some_and(|mark| mark > loaded.wal_seq)
    {
        store.mark_durable(loaded.wal_seq)?;
    }
    store.truncate_through(local_at.wal_seq)?;
    write_snapshot(store, loaded.wal_seq, &loaded.state)?;
    history::write(store, &history)?;
    tracing::info!(
        schools = loaded.state.schools.len(),
        teachers = loaded.state.accounts.len(),
        snapshot_wal_seq = loaded.wal_seq,
        %history,
        "state recovered from Postgres"
    );
    Ok(Recovered {
        state: loaded.state,
        snapshot_seq: loaded.wal_seq,
        last_seq: loaded.wal_seq,
        replayed_records: 0,
        lost: None,
    })
}

fn start_without_postgres(
    store: &Arc<dyn LogStore>,
    url: &Secret,
    config: &Config,
    error: String,
) -> Result<(Recovered, Option<Box<dyn Follower>>), ServeError> {
    let local = recover_local(store.as_ref(), config)?;
    if local.last_seq == 0 {
        return Err(ServeError::NoState(error));
    }
    let local_at = HistoryPosition {
        history: history::read(store.as_ref())?,
        wal_seq: local.last_seq,
    };
    tracing::warn!(
        %error,
        local = %local_at,
        "Postgres does not answer: serving from the data directory; the WAL is kept whole and \
         Postgres is caught up once it answers, if it is at this directory's history"
    );
    let interval = Duration::from_secs(config.postgres_snapshot_interval_s);
    let follower =
        PostgresFollower::start_detached(url.clone(), interval, store.clone(), local_at)?;
    Ok((local, Some(Box::new(follower))))
}

/// What Postgres lacks when the data directory is ahead of it: every school
/// and teacher (rewritten whole) and the usage rows of the WAL records after
/// its position, which the writer reads from the WAL in pieces.
fn catch_up(
    store: &dyn LogStore,
    local: &Recovered,
    pg_seq: u64,
    history_written: std::collections::HashMap<quotad_core::SchoolId, u64>,
) -> Result<Changes, ServeError> {
    let mut changes = Changes::everything(&local.state, history_written);
    changes.take_usage_from_wal();
    let first = store.read_range(pg_seq, 1)?.first().map(|(seq, _)| *seq);
    if first.is_none_or(|first| first > pg_seq + 1) {
        tracing::warn!(
            postgres_wal_seq = pg_seq,
            local_wal_seq = local.last_seq,
            "the WAL no longer holds every record after the Postgres snapshot (quotad ran \
             without Postgres): the state is written whole, but the usage log rows of the \
             missing records will not be in ai_usage_logs"
        );
    }
    tracing::info!(
        postgres_wal_seq = pg_seq,
        local_wal_seq = local.last_seq,
        "Postgres is behind the data directory; the first snapshot catches it up"
    );
    Ok(changes)
}
