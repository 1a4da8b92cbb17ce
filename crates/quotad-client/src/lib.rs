//! quotad's client for a device or a proxy.
//!
//! The server is the single source of truth: [`QuotaClient::consume`],
//! [`QuotaClient::reserve`] and [`QuotaClient::commit`] write through to it.
//! Only when it cannot be reached does a usage go into a local durable
//! [`journal`] (fsync'd before the call returns), and the answer says so:
//! it is not authoritative. [`QuotaClient::usage`] shows the server's view
//! whenever the server answers, and only otherwise the view last seen plus
//! the usage still in the journal, flagged as such.
//!
//! [`QuotaClient::sync_now`] flushes the journal with SyncUsage in batches,
//! retrying with exponential backoff and jitter a bounded number of times;
//! [`QuotaClient::start_background_sync`] does so at once and then on an
//! interval. An entry leaves the journal only after the server answered for
//! it; ids are the server's idempotency keys, so a flush interrupted by a
//! crash is re-sent and counted once.
//!
//! Known limitation: a commit of a hold the server knows, journaled while
//! the server was unreachable, is replayed with Commit, which charges the
//! billing cycle current at replay time. A commit made before a cycle
//! rollover and synced after it lands in the new cycle.
#![deny(clippy::unwrap_used)]

mod client;
pub mod journal;
mod sync;

/// The wire contract's types (from `quotad-proto`, compiled once for server and clients).
pub use quotad_proto::v1 as proto;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{
    CommitAnswer, ConsumeAnswer, Hold, QuotaClient, ServiceUsage, Stats, UsageAnswer,
};
pub use sync::{backoff_delay, SyncReport};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The journal could not be read or written: nothing was recorded.
    #[error("the local journal failed: {0}")]
    Journal(String),
    /// The journal holds its maximum of pending entries; the usage was not recorded.
    #[error(
        "the local journal is full ({entries_max} pending entries); sync before recording more"
    )]
    JournalFull { entries_max: usize },
    /// Another client (in this process or another) has the journal directory open.
    #[error("the journal directory {} is in use by another client; one client per journal_dir", dir.display())]
    JournalInUse { dir: PathBuf },
    /// The server answered with a refusal (bad input, not found, denied...).
    #[error("the server refused the call: {0}")]
    Server(tonic::Status),
    #[error("bad client configuration: {0}")]
    Config(String),
}

/// Where the client talks to and keeps its journal. Every limit has a default.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// A bearer token (the service role) sent with every call.
    pub token: String,
    /// The device's user: every call is about this teacher.
    pub school_id: String,
    pub teacher_id: String,
    /// The directory of the journal and of the usage view last seen.
    pub journal_dir: PathBuf,
    /// How long one call may take before the server counts as unreachable (default 5 s).
    pub call_timeout: Duration,
    /// Events per SyncUsage call (default 500; the server's default limit is 1,000).
    pub sync_batch_events_max: usize,
    /// The first retry's delay (default 1 s); each next one doubles, with jitter.
    pub backoff_initial: Duration,
    /// The longest delay between retries (default 60 s).
    pub backoff_max: Duration,
    /// Attempts per SyncUsage batch in one flush run (default 6).
    pub sync_attempts_max: u32,
    /// Pending entries the journal may hold (default 100,000); beyond it
    /// offline usage is refused rather than dropped.
    pub journal_entries_max: usize,
}

impl ClientConfig {
    pub fn new(
        endpoint: impl Into<String>,
        token: impl Into<String>,
        school_id: impl Into<String>,
        teacher_id: impl Into<String>,
        journal_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            token: token.into(),
            school_id: school_id.into(),
            teacher_id: teacher_id.into(),
            journal_dir: journal_dir.into(),
            call_timeout: Duration::from_secs(5),
            sync_batch_events_max: 500,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            sync_attempts_max: 6,
            journal_entries_max: 100_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_outside_a_runtime_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClientConfig::new("http://127.0.0.1:1", "token", "s", "t", dir.path());
        let refused = QuotaClient::open(config).err().unwrap();
        assert!(refused.to_string().contains("Tokio runtime"), "{refused}");
    }

    #[tokio::test]
    async fn a_bad_endpoint_or_token_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad_endpoint = ClientConfig::new("not a uri", "token", "s", "t", dir.path());
        assert!(matches!(
            QuotaClient::open(bad_endpoint),
            Err(ClientError::Config(_))
        ));
        let bad_token =
            ClientConfig::new("http://127.0.0.1:1", "line\nbreak", "s", "t", dir.path());
        assert!(matches!(
            QuotaClient::open(bad_token),
            Err(ClientError::Config(_))
        ));
    }

    /// Nothing listens on port 1: every call finds the server unreachable.
    #[tokio::test]
    async fn without_a_server_usage_is_journaled_kept_across_restarts_and_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ClientConfig::new("http://127.0.0.1:1", "token", "s", "t", dir.path());
        config.backoff_initial = Duration::from_millis(1);
        config.sync_attempts_max = 2;
        let client = QuotaClient::open(config.clone()).unwrap();
        let answer = client
            .consume("claude_messages", 3, "e1", "m")
            .await
            .unwrap();
        assert_eq!(
            answer,
            ConsumeAnswer::RecordedOffline {
                estimated_remaining_units: None
            }
        );
        let usage = client.usage().await.unwrap();
        assert!(!usage.authoritative && !usage.seen_server);
        assert_eq!(usage.services[0].used_units, 3);
        let report = client.sync_now().await;
        assert_eq!(report.still_queued, 1);
        assert!(report.stopped.unwrap().contains("could not be reached"));
        let stats = client.stats();
        assert_eq!(
            (stats.sync_retries, stats.queued_events, stats.fallback_used),
            (1, 1, 2)
        );
        drop(client);
        let reopened = QuotaClient::open(config).unwrap();
        assert_eq!(reopened.stats().queued_events, 1);
    }
}
