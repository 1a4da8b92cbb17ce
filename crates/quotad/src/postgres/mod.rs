//! Postgres, quotad's long-term store: the schema (with the original system's
//! table names) and its migrations, the snapshots written to it and recovery
//! from it. Migrations are applied in order, each once, in one transaction; a
//! lock keeps two quotads from migrating at the same time. Every connection
//! is made by [`open`] (or [`connect`]), which honours the URL's `sslmode`.

mod connect;
pub mod recover;
pub mod rows;
pub mod snapshot;

use thiserror::Error;
use tokio_postgres::Client;

pub mod analytics;

pub use analytics::{ReadError, Reader};
pub use connect::{check_url, open, ConnectError, ConnectionTask, SslMode};

/// Every migration, in order. Append only: a shipped migration never changes.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "schema", include_str!("migrations/0001_schema.sql")),
    (
        2,
        "snapshot_state",
        include_str!("migrations/0002_snapshot_state.sql"),
    ),
    (
        3,
        "snapshot_writer",
        include_str!("migrations/0003_snapshot_writer.sql"),
    ),
    (4, "history", include_str!("migrations/0004_history.sql")),
];

/// An arbitrary, fixed key for `pg_advisory_xact_lock`.
const MIGRATION_LOCK: i64 = 0x7175_6f74_6164; // "quotad"

#[derive(Debug, Error)]
pub enum PostgresError {
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] ConnectError),
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("Postgres: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error(
        "the database has migration {found}, newer than this quotad knows ({known}): run a newer quotad"
    )]
    TooNew { found: i32, known: i32 },
    #[error(
        "the database holds a snapshot of WAL position {found}, but this quotad last wrote {expected}: \
         is another quotad writing to the same database?"
    )]
    Fenced { found: u64, expected: u64 },
    #[error(
        "Postgres holds {found}, but this quotad writes {ours}: another quotad has taken the \
         history up from Postgres since, so this one's snapshots would write older state over it"
    )]
    Superseded { found: String, ours: String },
    #[error("the snapshot in Postgres is damaged: {0}")]
    Damaged(String),
    #[error("cannot encode a snapshot row: {0}")]
    Encode(String),
    #[error("the Postgres writer: {0}")]
    Thread(String),
    #[error("cannot read the WAL for a snapshot: {0}")]
    Wal(String),
}

impl PostgresError {
    /// Another writer holds the database: retrying cannot help, and this
    /// quotad must write no more snapshots.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. } | Self::Superseded { .. })
    }
}

/// Connects and applies missing migrations: what the server does on start.
pub async fn prepare(url: &str) -> Result<Client, PostgresError> {
    let mut client = connect(url).await?;
    migrate(&mut client).await?;
    Ok(client)
}

/// Connects ([`open`]); the connection is driven by a task on the current
/// runtime.
pub async fn connect(url: &str) -> Result<Client, PostgresError> {
    let (client, connection) = open(url).await.map_err(PostgresError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "Postgres connection ended");
        }
    });
    Ok(client)
}

/// Applies the migrations the database does not have yet, all in one
/// transaction under an advisory lock (two quotads starting together take
/// turns); returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, PostgresError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS quotad_schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let known = MIGRATIONS.last().map_or(0, |(v, _, _)| *v);
    let newest: Option<i32> = tx
        .query_one("SELECT max(version) FROM quotad_schema_migrations", &[])
        .await?
        .get(0);
    if let Some(found) = newest.filter(|found| *found > known) {
        return Err(PostgresError::TooNew { found, known });
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if newest.is_some_and(|newest| version <= newest) {
            continue;
        }
        let failed = |source| PostgresError::Migration {
            version,
            name,
            source,
        };
        tx.batch_execute(sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO quotad_schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(failed)?;
        applied.push(version);
    }
    tx.commit().await?;
    for version in &applied {
        tracing::info!(version, "Postgres migration applied");
    }
    Ok(applied)
}
