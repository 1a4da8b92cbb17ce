//! Write-through calls with an offline fallback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quotad_proto::BearerToken;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::journal::{Journal, PendingKind, PendingUsage};
use crate::proto::quota_gate_client::QuotaGateClient;
use crate::proto::{self, GetUsageRequest};
use crate::{ClientConfig, ClientError};

pub(crate) type Gate = QuotaGateClient<InterceptedService<Channel, BearerToken>>;

const LAST_SEEN_FILE: &str = "last_usage.json";

/// The answer to a consume.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumeAnswer {
    /// The server decided: authoritative.
    Decided(proto::Decision),
    /// The server could not be reached: the usage is in the journal and will
    /// be synced. NOT authoritative: the estimate is the view last seen minus
    /// what is still unsynced.
    RecordedOffline {
        estimated_remaining_units: Option<u64>,
    },
}

impl ConsumeAnswer {
    pub fn is_authoritative(&self) -> bool {
        matches!(self, Self::Decided(_))
    }
    pub fn is_recorded_offline(&self) -> bool {
        !self.is_authoritative()
    }
}

/// A hold made by [`QuotaClient::reserve`]; pass it to [`QuotaClient::commit`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub reservation_id: String,
    pub service_type: String,
    pub model: String,
    pub estimate_units: u64,
    /// False when the server could not be reached: the hold exists only on
    /// this device and its commit goes to the journal as a usage event.
    pub authoritative: bool,
    /// The server's decision (always true for an offline hold).
    pub allowed: bool,
    pub message: String,
}

/// The answer to a commit.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitAnswer {
    Committed(proto::CommitResponse),
    /// In the journal, to be synced; not authoritative.
    RecordedOffline,
}

impl CommitAnswer {
    pub fn is_authoritative(&self) -> bool {
        matches!(self, Self::Committed(_))
    }
}

/// One service type's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUsage {
    pub service_type: String,
    pub allocated_units: u64,
    pub used_units: u64,
    pub remaining_units: u64,
    pub overage_units: u64,
    /// Units in the journal not yet synced (already inside used_units when
    /// the answer is not authoritative).
    pub unsynced_units: u64,
}

/// The usage view: the server's, or the fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageAnswer {
    /// True: the server's own figures. False: the server could not be
    /// reached; the view last seen plus the journal's unsynced usage.
    pub authoritative: bool,
    /// False when no server view was ever seen (the fallback is the journal alone).
    pub seen_server: bool,
    pub services: Vec<ServiceUsage>,
    pub unsynced_events: usize,
}

/// What the client counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Journal entries the server answered for (and that left the journal).
    pub synced_events: u64,
    /// Retries of a sync call after the server could not be reached.
    pub sync_retries: u64,
    /// Entries still in the journal.
    pub queued_events: usize,
    /// Calls answered from the fallback (journal or last seen view).
    pub fallback_used: u64,
    /// Synced entries the server rejected (logged with its reason).
    pub rejected_events: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub synced_events: AtomicU64,
    pub sync_retries: AtomicU64,
    pub fallback_used: AtomicU64,
    pub rejected_events: AtomicU64,
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    pub gate: Gate,
    pub journal: Arc<Mutex<Journal>>,
    /// The server's view last seen, per service type.
    last_seen: Mutex<Option<BTreeMap<String, ServiceUsage>>>,
    pub counters: Counters,
    /// One flush run at a time.
    pub sync_running: tokio::sync::Mutex<()>,
}

/// The client. Cheap to clone; clones share the journal and the counters.
#[derive(Clone)]
pub struct QuotaClient {
    pub(crate) inner: Arc<Inner>,
}

/// Codes that are the server's answer about the call. Anything else (no
/// connection, timeout, reset, overloaded, failed WAL) means the server could
/// not be asked: the usage is journaled, which is safe because its id makes
/// a second delivery a duplicate.
pub(crate) fn is_unreachable(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the journal half-written:
    // its state changes only after a write succeeded.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl QuotaClient {
    /// Opens the journal and prepares the connection (made on first use, and
    /// again after the server comes back). Runs inside a Tokio runtime, which
    /// drives the connection. One client per `journal_dir`: the journal
    /// file has one writer, so a second open (here or in another process)
    /// fails with [`ClientError::JournalInUse`] until the first client and
    /// all its clones (the background sync task holds one) are dropped.
    pub fn open(config: ClientConfig) -> Result<Self, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::Config(
                "QuotaClient::open must be called inside a Tokio runtime".into(),
            ));
        }
        let journal = Journal::open(&config.journal_dir, config.journal_entries_max)?;
        let token = BearerToken::new(&config.token)
            .map_err(|e| ClientError::Config(format!("token: {e}")))?;
        let channel = Channel::from_shared(config.endpoint.clone())
            .map_err(|e| ClientError::Config(format!("endpoint {:?}: {e}", config.endpoint)))?
            .connect_timeout(config.call_timeout)
            .timeout(config.call_timeout)
            .connect_lazy();
        let last_seen = read_last_seen(&config);
        let inner = Inner {
            gate: QuotaGateClient::with_interceptor(channel, token),
            journal: Arc::new(Mutex::new(journal)),
            last_seen: Mutex::new(last_seen),
            counters: Counters::default(),
            sync_running: tokio::sync::Mutex::new(()),
            config,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            synced_events: c.synced_events.load(Ordering::Relaxed),
            sync_retries: c.sync_retries.load(Ordering::Relaxed),
            queued_events: lock(&self.inner.journal).len(),
            fallback_used: c.fallback_used.load(Ordering::Relaxed),
            rejected_events: c.rejected_events.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn gate(&self) -> Gate {
        self.inner.gate.clone()
    }

    /// Checks and charges `units` on the server; offline, journals them.
    pub async fn consume(
        &self,
        service_type: &str,
        units: u64,
        event_id: &str,
        model: &str,
    ) -> Result<ConsumeAnswer, ClientError> {
        let config = &self.inner.config;
        let occurred_at_ms = now_ms();
        let request = proto::ConsumeRequest {
            school_id: config.school_id.clone(),
            teacher_id: config.teacher_id.clone(),
            service_type: service_type.into(),
            units,
            event_id: event_id.into(),
            // Online, the server's clock dates the usage (a device's clock
            // may be off); the device's time is kept only if it is journaled.
            occurred_at_ms: 0,
            model: model.into(),
        };
        match self.gate().consume(request).await {
            Ok(response) => {
                let decision = response.into_inner().decision.unwrap_or_default();
                if decision.allowed && !decision.duplicate {
                    self.seen_charge(service_type, units, decision.remaining_units);
                }
                Ok(ConsumeAnswer::Decided(decision))
            }
            Err(status) if is_unreachable(&status) => {
                let pending = PendingUsage {
                    kind: PendingKind::Event,
                    school_id: config.school_id.clone(),
                    teacher_id: config.teacher_id.clone(),
                    id: event_id.into(),
                    service_type: service_type.into(),
                    units,
                    model: model.into(),
                    occurred_at_ms,
                };
                self.record_offline("consume", pending, &status).await?;
                let estimate = self.estimated_remaining(service_type);
                Ok(ConsumeAnswer::RecordedOffline {
                    estimated_remaining_units: estimate,
                })
            }
            Err(status) => Err(ClientError::Server(status)),
        }
    }

    /// Holds `estimate_units` on the server. Offline, the hold exists only
    /// on this device (nothing is journaled until it is committed).
    pub async fn reserve(
        &self,
        service_type: &str,
        estimate_units: u64,
        reservation_id: &str,
        model: &str,
    ) -> Result<Hold, ClientError> {
        let config = &self.inner.config;
        let request = proto::ReserveRequest {
            school_id: config.school_id.clone(),
            teacher_id: config.teacher_id.clone(),
            service_type: service_type.into(),
            estimate_units,
            ttl_ms: 0,
            reservation_id: reservation_id.into(),
            model: model.into(),
        };
        let mut hold = Hold {
            reservation_id: reservation_id.into(),
            service_type: service_type.into(),
            model: model.into(),
            estimate_units,
            authoritative: true,
            allowed: true,
            message: String::new(),
        };
        match self.gate().reserve(request).await {
            Ok(response) => {
                let decision = response.into_inner().decision.unwrap_or_default();
                hold.allowed = decision.allowed;
                hold.message = decision.message;
            }
            Err(status) if is_unreachable(&status) => {
                self.inner
                    .counters
                    .fallback_used
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reservation_id, %status, "server unreachable: the hold is kept on this device only");
                hold.authoritative = false;
            }
            Err(status) => return Err(ClientError::Server(status)),
        }
        Ok(hold)
    }

    /// Charges the real units of a hold. A hold the server knows is
    /// committed there (or journaled as a commit, replayed by the sync); an
    /// offline hold is journaled as a usage event with the reservation id.
    ///
    /// A commit journaled offline is replayed with Commit, which charges the
    /// billing cycle current at replay time: one made before a cycle
    /// rollover and synced after it lands in the new cycle (known limitation).
    pub async fn commit(
        &self,
        hold: &Hold,
        actual_units: u64,
    ) -> Result<CommitAnswer, ClientError> {
        let mut pending = PendingUsage {
            kind: PendingKind::Commit,
            school_id: self.inner.config.school_id.clone(),
            teacher_id: self.inner.config.teacher_id.clone(),
            id: hold.reservation_id.clone(),
            service_type: hold.service_type.clone(),
            units: actual_units,
            model: hold.model.clone(),
            occurred_at_ms: now_ms(),
        };
        if !hold.authoritative {
            pending.kind = PendingKind::Event;
            let offline = Status::unavailable("the hold was made offline");
            self.record_offline("commit", pending, &offline).await?;
            return Ok(CommitAnswer::RecordedOffline);
        }
        let request = proto::CommitRequest {
            school_id: self.inner.config.school_id.clone(),
            teacher_id: self.inner.config.teacher_id.clone(),
            reservation_id: hold.reservation_id.clone(),
            actual_units,
        };
        match self.gate().commit(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if !response.duplicate {
                    self.seen_charge(&hold.service_type, actual_units, response.remaining_units);
                }
                Ok(CommitAnswer::Committed(response))
            }
            Err(status) if is_unreachable(&status) => {
                self.record_offline("commit", pending, &status).await?;
                Ok(CommitAnswer::RecordedOffline)
            }
            Err(status) => Err(ClientError::Server(status)),
        }
    }

    /// The server's view; when it cannot be reached, the view last seen plus
    /// the journal's unsynced usage, flagged as not authoritative.
    pub async fn usage(&self) -> Result<UsageAnswer, ClientError> {
        let request = GetUsageRequest {
            school_id: self.inner.config.school_id.clone(),
            teacher_id: self.inner.config.teacher_id.clone(),
        };
        let unsynced = self.unsynced_by_service();
        let unsynced_events = lock(&self.inner.journal).len();
        match self.gate().get_usage(request).await {
            Ok(response) => {
                let view = server_view(response.into_inner(), &unsynced);
                self.remember_seen(view.clone());
                Ok(UsageAnswer {
                    authoritative: true,
                    seen_server: true,
                    services: view.into_values().collect(),
                    unsynced_events,
                })
            }
            Err(status) if is_unreachable(&status) => {
                self.inner
                    .counters
                    .fallback_used
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%status, "server unreachable: usage shown from the last view and the journal");
                Ok(self.fallback_view(unsynced, unsynced_events))
            }
            Err(status) => Err(ClientError::Server(status)),
        }
    }

    fn fallback_view(
        &self,
        unsynced: BTreeMap<String, u64>,
        unsynced_events: usize,
    ) -> UsageAnswer {
        let seen = lock(&self.inner.last_seen).clone();
        let seen_server = seen.is_some();
        let mut view = seen.unwrap_or_default();
        for (service_type, units) in unsynced {
            let entry = view.entry(service_type.clone()).or_insert(ServiceUsage {
                service_type,
                allocated_units: 0,
                used_units: 0,
                remaining_units: 0,
                overage_units: 0,
                unsynced_units: 0,
            });
            entry.unsynced_units = units;
            entry.used_units = entry.used_units.saturating_add(units);
            entry.remaining_units = entry.remaining_units.saturating_sub(units);
        }
        UsageAnswer {
            authoritative: false,
            seen_server,
            services: view.into_values().collect(),
            unsynced_events,
        }
    }

    /// Journals a usage (fsync'd) before answering `recorded_offline`.
    async fn record_offline(
        &self,
        call: &str,
        pending: PendingUsage,
        status: &Status,
    ) -> Result<(), ClientError> {
        self.inner
            .counters
            .fallback_used
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(call, id = %pending.id, units = pending.units, %status, "server unreachable: usage recorded in the local journal");
        let journal = self.inner.journal.clone();
        tokio::task::spawn_blocking(move || lock(&journal).record(pending))
            .await
            .map_err(|e| ClientError::Journal(format!("the journal task failed: {e}")))?
    }

    fn unsynced_by_service(&self) -> BTreeMap<String, u64> {
        let mut units: BTreeMap<String, u64> = BTreeMap::new();
        for pending in lock(&self.inner.journal).pending() {
            let sum = units.entry(pending.service_type.clone()).or_default();
            *sum = sum.saturating_add(pending.units);
        }
        units
    }

    fn estimated_remaining(&self, service_type: &str) -> Option<u64> {
        let seen = lock(&self.inner.last_seen)
            .as_ref()?
            .get(service_type)?
            .remaining_units;
        let unsynced = self
            .unsynced_by_service()
            .get(service_type)
            .copied()
            .unwrap_or(0);
        Some(seen.saturating_sub(unsynced))
    }

    /// Keeps the view last seen current with what the server just charged,
    /// so the fallback does not forget usage made online after it.
    fn seen_charge(&self, service_type: &str, units: u64, remaining_units: u64) {
        let mut seen = lock(&self.inner.last_seen);
        if let Some(service) = seen.as_mut().and_then(|v| v.get_mut(service_type)) {
            service.used_units = service.used_units.saturating_add(units);
            service.remaining_units = remaining_units;
        }
    }

    fn remember_seen(&self, view: BTreeMap<String, ServiceUsage>) {
        let path = self.inner.config.journal_dir.join(LAST_SEEN_FILE);
        let written = serde_json::to_vec(&view)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path))
            });
        if let Err(error) = written {
            tracing::warn!(%error, "the last usage view could not be saved; the fallback will not survive a restart");
        }
        *lock(&self.inner.last_seen) = Some(view);
    }

    /// Flushes the journal now, then every `interval`, until the task is aborted.
    pub fn start_background_sync(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let client = self.clone();
        tokio::spawn(async move {
            loop {
                let report = client.sync_now().await;
                tracing::info!(?report, "journal sync run finished");
                tokio::time::sleep(interval).await;
            }
        })
    }
}

fn server_view(
    response: proto::GetUsageResponse,
    unsynced: &BTreeMap<String, u64>,
) -> BTreeMap<String, ServiceUsage> {
    response
        .services
        .into_iter()
        .map(|s| {
            let usage = ServiceUsage {
                unsynced_units: unsynced.get(&s.service_type).copied().unwrap_or(0),
                service_type: s.service_type.clone(),
                allocated_units: s.allocated_units,
                used_units: s.used_units,
                remaining_units: s.remaining_units,
                overage_units: s.overage_units,
            };
            (s.service_type, usage)
        })
        .collect()
}

fn read_last_seen(config: &ClientConfig) -> Option<BTreeMap<String, ServiceUsage>> {
    let bytes = std::fs::read(config.journal_dir.join(LAST_SEEN_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
