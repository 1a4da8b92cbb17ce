//! The analytics reads: rollups of charged usage and the daily usage the
//! suggestion and alert rules look at, summed from `ai_usage_logs` as the
//! views `ai_usage_daily` and `ai_usage_monthly` sum it (see [`CHARGED`] for
//! why not from the views themselves).
//!
//! [`Reader`] holds its own connection, apart from the snapshotter's: a slow
//! report never holds up a write. It connects on first use and again after the
//! connection dropped, and bounds everything: connect and query time, queries
//! at once, rows per answer. The gate never calls it.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Mutex, Semaphore};
use tokio_postgres::Client;

use quotad_core::{SchoolId, ServiceType, TeacherId, TimestampMs};

/// How long connecting may take before the call answers UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one analytics query may take (also the server-side statement_timeout).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Analytics queries in flight at once; more wait their turn (within QUERY_TIMEOUT).
const QUERIES_AT_ONCE_MAX: usize = 4;
/// Daily rows one school's suggestions or alerts may read (teachers x service
/// types x days); a school beyond it gets an error rather than a slow answer.
pub const DAILY_ROWS_MAX: usize = 250_000;
/// Rows one rollup answer may hold.
pub const ROLLUP_ROWS_MAX: usize = 10_000;

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("analytics read from Postgres, which is not configured: set postgres_url (QUOTAD_DATABASE_URL)")]
    NotConfigured,
    #[error("Postgres is unavailable: {0}")]
    Unavailable(String),
    #[error("Postgres refused the analytics query: {0}")]
    Failed(String),
    #[error("{0}")]
    TooLarge(String),
}

impl ReadError {
    /// A database's own error is a failed query; anything else (closed
    /// socket, I/O, timeout) means the server is out of reach.
    /// Classes 08 (connection), 53 (resources) and 57 (operator
    /// intervention, e.g. shutting down) are Postgres out of reach too.
    fn from_postgres(error: tokio_postgres::Error) -> Self {
        match error.as_db_error() {
            Some(db)
                if !["08", "53", "57"]
                    .iter()
                    .any(|c| db.code().code().starts_with(c)) =>
            {
                Self::Failed(db.message().to_string())
            }
            _ => Self::Unavailable(error.to_string()),
        }
    }
}

/// A day or a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Day,
    Month,
}

/// What a rollup row is per, besides its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    TeacherAndService,
    Service,
    Teacher,
    /// The whole school.
    School,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupQuery {
    pub school_id: SchoolId,
    pub granularity: Granularity,
    pub grouping: Grouping,
    /// The first period is the one holding `from_ms`.
    pub from_ms: TimestampMs,
    /// Periods that start before `to_ms`.
    pub to_ms: TimestampMs,
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
    /// At most this many rows (1..=ROLLUP_ROWS_MAX).
    pub rows_max: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    /// 00:00 UTC of the day, or of the month's first day.
    pub period_start_ms: TimestampMs,
    /// Empty when the grouping sums over teachers.
    pub teacher_id: String,
    /// Empty when the grouping sums over service types.
    pub service_type: String,
    pub units: i64,
    pub borrowed_units: i64,
    pub overage_units: i64,
    pub events: i64,
}

/// One teacher's units of one service type on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUnits {
    pub day_start_ms: TimestampMs,
    pub teacher_id: String,
    pub service_type: String,
    pub units: u64,
}

/// Analytics reads over a connection of their own.
pub struct Reader {
    url: String,
    /// Where the connection's I/O task runs: the server's main runtime, not
    /// the actor threads that answer gRPC.
    runtime: tokio::runtime::Handle,
    client: Mutex<Option<Arc<Client>>>,
    permits: Semaphore,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reader { url: <redacted> }")
    }
}

impl Reader {
    /// Connects lazily, on the first read; the connection task runs on the
    /// runtime this is called on.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            runtime: tokio::runtime::Handle::current(),
            client: Mutex::new(None),
            permits: Semaphore::new(QUERIES_AT_ONCE_MAX),
        }
    }

    /// The live client, connecting again if there is none or it closed; true
    /// when the connection is new.
    async fn client(&self) -> Result<(Arc<Client>, bool), ReadError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((client.clone(), false));
        }
        *slot = None;
        let connecting = super::open(&self.url);
        let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ReadError::Unavailable("connecting took longer than 5 s".into()))?
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        self.runtime.spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "the analytics Postgres connection ended");
            }
        });
        let timeout = format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis());
        client
            .batch_execute(&timeout)
            .await
            .map_err(ReadError::from_postgres)?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok((client, true))
    }

    /// Drops `client` if it is still the one in use: it failed, so the next
    /// read connects again. (Its `is_closed` can lag behind the failure.)
    async fn forget(&self, client: &Arc<Client>) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *slot = None;
        }
    }

    /// Runs `sql` with a permit, within QUERY_TIMEOUT (waiting included). A
    /// connection that was fine before and fails now (Postgres restarted, an
    /// idle connection cut) is replaced and the read tried once more: reads
    /// change nothing, so trying again is safe.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ReadError> {
        let run = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| ReadError::Unavailable("the analytics reader is closed".into()))?;
            loop {
                let (client, fresh) = self.client().await?;
                let error = match client.query(sql, params).await {
                    Ok(rows) => return Ok(rows),
                    Err(error) => ReadError::from_postgres(error),
                };
                if !matches!(error, ReadError::Unavailable(_)) {
                    return Err(error);
                }
                self.forget(&client).await;
                if fresh {
                    return Err(error);
                }
            }
        };
        tokio::time::timeout(QUERY_TIMEOUT, run)
            .await
            .map_err(|_| {
                ReadError::Unavailable("the analytics query took longer than 10 s".into())
            })?
    }

    /// Charged usage per period (and teacher / service type, by `grouping`),
    /// in period, teacher, service order; true when more rows than
    /// `rows_max` matched (the answer holds the first `rows_max`).
    pub async fn rollups(&self, q: &RollupQuery) -> Result<(Vec<RollupRow>, bool), ReadError> {
        let sql = rollup_sql(q.granularity, q.grouping);
        let limit = i64::try_from(q.rows_max.min(ROLLUP_ROWS_MAX) + 1).unwrap_or(i64::MAX);
        let teacher = q.teacher_id.as_ref().map(|t| t.as_str());
        let service = q.service.as_ref().map(|s| s.as_str());
        let rows = self
            .query(
                &sql,
                &[
                    &q.school_id.as_str(),
                    &q.from_ms,
                    &q.to_ms,
                    &teacher,
                    &service,
                    &limit,
                ],
            )
            .await?;
        let mut rows: Vec<RollupRow> = rows
            .iter()
            .map(|r| RollupRow {
                period_start_ms: r.get(0),
                teacher_id: r.get(1),
                service_type: r.get(2),
                units: r.get(3),
                borrowed_units: r.get(4),
                overage_units: r.get(5),
                events: r.get(6),
            })
            .collect();
        let truncated = rows.len() > q.rows_max;
        rows.truncate(q.rows_max);
        Ok((rows, truncated))
    }

    /// Every teacher's charged units per UTC day of `school_id`, from the day
    /// holding `from_ms` on.
    pub async fn daily_units(
        &self,
        school_id: &SchoolId,
        from_ms: TimestampMs,
    ) -> Result<Vec<DailyUnits>, ReadError> {
        let limit = i64::try_from(DAILY_ROWS_MAX + 1).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {period}, teacher_id, service_type, sum(units)::bigint
               FROM ai_usage_logs
              WHERE school_id = $1 AND {CHARGED} AND occurred_at >= {from}
              GROUP BY 1, 2, 3
              LIMIT $3",
            period = period_start_ms("day"),
            from = first_period_start("day"),
        );
        let rows = self
            .query(&sql, &[&school_id.as_str(), &from_ms, &limit])
            .await?;
        if rows.len() > DAILY_ROWS_MAX {
            return Err(ReadError::TooLarge(format!(
                "school {school_id} has more than {DAILY_ROWS_MAX} daily usage rows in the \
                 analytics window; its suggestions and alerts are not computed"
            )));
        }
        Ok(rows
            .iter()
            .map(|r| DailyUnits {
                day_start_ms: r.get(0),
                teacher_id: r.get(1),
                service_type: r.get(2),
                units: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            })
            .collect())
    }
}

// The reads sum ai_usage_logs the way the views ai_usage_daily and
// ai_usage_monthly (migration 0001) do, with the same charged decisions and
// the same UTC periods (a test checks they agree), but bound `occurred_at`
// itself: the views only expose the period, so a range on them cannot use the
// (school_id, teacher_id, occurred_at) index and reads the school's whole
// history (measured: 250 ms against 14 ms for a school with 10,000 rows a
// year, 15 daily rows wanted, cold cache).

/// Usage that was charged; denials count nothing (as in the views).
const CHARGED: &str = "decision IN ('allowed', 'committed')";

/// The UTC start of the row's day or month, in ms.
fn period_start_ms(unit: &str) -> String {
    format!(
        "(extract(epoch FROM date_trunc('{unit}', occurred_at AT TIME ZONE 'UTC')) * 1000)::bigint"
    )
}

/// The UTC start of the day or month holding $2 (ms), as a timestamptz.
fn first_period_start(unit: &str) -> String {
    format!(
        "(date_trunc('{unit}', to_timestamp($2::bigint / 1000.0) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
    )
}

/// The rollup statement: only fixed fragments chosen by the enums go into it;
/// every value is a parameter ($1 school, $2 from ms, $3 to ms, $4 teacher or
/// NULL, $5 service type or NULL, $6 limit). Periods that start before $3 are
/// whole: the range ends where the period holding $3 - 1 ms ends.
fn rollup_sql(granularity: Granularity, grouping: Grouping) -> String {
    let unit = match granularity {
        Granularity::Day => "day",
        Granularity::Month => "month",
    };
    let (teacher, service) = match grouping {
        Grouping::TeacherAndService => ("teacher_id", "service_type"),
        Grouping::Service => ("''::text", "service_type"),
        Grouping::Teacher => ("teacher_id", "''::text"),
        Grouping::School => ("''::text", "''::text"),
    };
    format!(
        "SELECT {period}, {teacher}, {service},
                sum(units)::bigint, sum(borrowed_units)::bigint, sum(overage_units)::bigint,
                count(*)
           FROM ai_usage_logs
          WHERE school_id = $1
            AND {CHARGED}
            AND occurred_at >= {from}
            AND occurred_at < ((date_trunc('{unit}', to_timestamp(($3::bigint - 1) / 1000.0)
                                  AT TIME ZONE 'UTC') + interval '1 {unit}') AT TIME ZONE 'UTC')
            AND ($4::text IS NULL OR teacher_id = $4)
            AND ($5::text IS NULL OR service_type = $5)
          GROUP BY 1, 2, 3
          ORDER BY 1, 2, 3
          LIMIT $6",
        period = period_start_ms(unit),
        from = first_period_start(unit),
    )
}
