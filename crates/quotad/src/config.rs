//! quotad's settings: defaults, then a TOML file, then environment variables
//! (`QUOTAD_*`), then command-line flags, each overriding the one before.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use std::sync::Arc;

use crate::auth::{AuthMode, Authenticator};
use crate::engine::EngineConfig;
use crate::rls::{DomainConfig, Domains};
use crate::storage::history::RecoverFrom;
use crate::storage::{Durability, WalConfig};
use quotad_core::analytics::AlertThresholds;
use quotad_core::{RuleLimits, ServiceType};

/// The most schools whose pools may be exported as gauges: about a million
/// series at 32 service types each, already more than one scrape should carry.
pub const METRICS_SCHOOLS_MAX: usize = 10_000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("setting {setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

/// The largest encoded `UsageEvent`: four strings at their maximum length
/// (128 + 128 + 64 + 128 bytes), two integers and the field tags, rounded up.
pub const SYNC_EVENT_BYTES_MAX: usize = 512;
/// The largest `sync_events_per_batch_max` accepted (5 MiB requests at most).
pub const SYNC_EVENTS_PER_BATCH_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC services listen.
    pub grpc_addr: SocketAddr,
    /// Where Prometheus scrapes `/metrics`.
    pub metrics_addr: SocketAddr,
    /// Where the gateways' rate limit protocols (Envoy's, Kuadrant's) are
    /// served without bearer tokens, for trusted callers: loopback or a
    /// private address unless `rls_allow_public`. (They are served on
    /// `grpc_addr` too, with tokens.)
    pub rls_addr: SocketAddr,
    /// Let `rls_addr` be a public (or unspecified, 0.0.0.0) address: anyone
    /// who reaches it may charge the domains' schools.
    pub rls_allow_public: bool,
    /// How each rate limit domain's descriptors name a slice (README,
    /// "Behind an AI gateway").
    pub rls_domains: Vec<DomainConfig>,
    /// Schools whose pools are exported as gauges (the first ones in id
    /// order); the rest are counted in `quotad_pool_schools_omitted`. Bounds
    /// those gauges to 3 x this x 32 service types series.
    pub metrics_schools_max: usize,
    /// How often the pool gauges are read from the engine.
    pub metrics_refresh_interval_ms: u64,
    /// The sled database (WAL and local snapshot).
    pub data_dir: PathBuf,
    /// `sync` (acknowledge after the flush) or `batched` (acknowledge at once).
    pub durability: Durability,
    pub batched_flush_interval_ms: u64,
    pub snapshot_interval_s: u64,
    pub idempotency_window_s: u64,
    /// Threads that run the actors and the gRPC server; 0 means one per core.
    pub actor_threads: usize,
    pub mailbox_capacity: usize,
    pub housekeeping_interval_ms: u64,
    pub hold_ttl_ms_default: u64,
    pub hold_ttl_ms_max: u64,
    /// The largest gRPC request accepted, in bytes. The gate service accepts
    /// up to [`Config::gate_request_bytes_max`], so a full sync batch fits.
    pub request_bytes_max: usize,
    /// The most events one SyncUsage (or BulkIncrement) batch may carry.
    pub sync_events_per_batch_max: usize,
    pub wal_queue_records_max: usize,
    pub wal_batch_records_max: usize,
    /// Service types a new school gets when it names none.
    pub default_service_types: Vec<String>,
    /// A file holding the key that signs bearer tokens (HS256, at least 32
    /// bytes; surrounding whitespace is ignored). `QUOTAD_AUTH_KEY` may give
    /// the key itself instead.
    pub auth_key_file: Option<PathBuf>,
    /// Accept every call without a token, as an admin. For a first run on a
    /// laptop only; logged loudly.
    pub insecure_dev: bool,
    /// The signing key itself (from `QUOTAD_AUTH_KEY`; never from the file).
    #[serde(skip)]
    pub auth_key: Option<Secret>,
    /// Serve what a damaged log still holds instead of refusing to start.
    /// Only from the command line (`--accept-data-loss`), for one start: in a
    /// config file it would silently accept every later loss too.
    #[serde(skip)]
    pub accept_data_loss: bool,
    /// Postgres, the long-term store (`postgres://user@host:port/db`). None:
    /// sled alone, no analytics.
    pub postgres_url: Option<Secret>,
    /// How often what changed is written to Postgres.
    pub postgres_snapshot_interval_s: u64,
    /// `auto`, or `postgres`: a data directory of another history or an
    /// older epoch than Postgres's, which `auto` refuses to start on, is
    /// discarded and the state recovered from Postgres.
    pub recover_from: RecoverFrom,
    /// A slice alerts at the highest of these shares of its units it reached
    /// (percent, ascending, at most 8).
    pub alert_slice_used_percents: Vec<u32>,
    /// A pool alerts once this share of its units bought is used (percent).
    pub alert_pool_used_percent: u32,
    /// A teacher's units today above this share of their recent daily
    /// average are an anomaly (percent: 300 is more than 3 times).
    pub alert_anomaly_factor_percent: u32,
    /// How often the active-alert gauges are recomputed (with Postgres only).
    pub alerts_interval_s: u64,
}

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    fn default() -> Self {
        let limits = RuleLimits::default();
        let wal = WalConfig::default();
        let alerts = AlertThresholds::default();
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            rls_addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            rls_allow_public: false,
            rls_domains: Vec::new(),
            metrics_schools_max: 100,
            metrics_refresh_interval_ms: 10_000,
            data_dir: PathBuf::from("./data"),
            durability: Durability::Sync,
            batched_flush_interval_ms: wal.batched_flush_interval_ms,
            snapshot_interval_s: 30,
            idempotency_window_s: (limits.idempotency_window_ms / 1000) as u64,
            actor_threads: 0,
            mailbox_capacity: 1024,
            housekeeping_interval_ms: 1000,
            hold_ttl_ms_default: limits.hold_ttl_ms_default,
            hold_ttl_ms_max: limits.hold_ttl_ms_max,
            request_bytes_max: 64 * 1024,
            sync_events_per_batch_max: limits.sync_events_per_batch_max,
            wal_queue_records_max: wal.queue_records_max,
            wal_batch_records_max: wal.batch_records_max,
            default_service_types: quotad_core::DEFAULT_SERVICE_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            auth_key_file: None,
            insecure_dev: false,
            accept_data_loss: false,
            auth_key: None,
            postgres_url: None,
            postgres_snapshot_interval_s: 10,
            recover_from: RecoverFrom::Auto,
            alert_slice_used_percents: alerts.slice_used_percents,
            alert_pool_used_percent: alerts.pool_used_percent,
            alert_anomaly_factor_percent: alerts.anomaly_factor_percent,
            alerts_interval_s: 60,
        }
    }
}

/// Loopback, or an address of a private network (RFC 1918, link-local,
/// IPv6 unique local): where the rate limit listener may be bound by default.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        problem: problem.into(),
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })
    }

    /// Checks every setting; the server refuses to start on a bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("batched_flush_interval_ms", self.batched_flush_interval_ms),
            ("snapshot_interval_s", self.snapshot_interval_s),
            (
                "postgres_snapshot_interval_s",
                self.postgres_snapshot_interval_s,
            ),
            ("idempotency_window_s", self.idempotency_window_s),
            ("housekeeping_interval_ms", self.housekeeping_interval_ms),
            ("hold_ttl_ms_max", self.hold_ttl_ms_max),
            ("hold_ttl_ms_default", self.hold_ttl_ms_default),
            (
                "metrics_refresh_interval_ms",
                self.metrics_refresh_interval_ms,
            ),
            ("alerts_interval_s", self.alerts_interval_s),
        ];
        for (setting, value) in positive {
            if value == 0 {
                return Err(invalid(setting, "must be greater than 0"));
            }
        }
        if self.hold_ttl_ms_default > self.hold_ttl_ms_max {
            return Err(invalid(
                "hold_ttl_ms_default",
                "must not exceed hold_ttl_ms_max",
            ));
        }
        if self.mailbox_capacity == 0
            || self.wal_queue_records_max == 0
            || self.wal_batch_records_max == 0
        {
            return Err(invalid(
                "mailbox_capacity / wal_*_records_max",
                "must be greater than 0",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.request_bytes_max) {
            return Err(invalid(
                "request_bytes_max",
                "must be between 1 KiB and 16 MiB",
            ));
        }
        if self.metrics_schools_max > METRICS_SCHOOLS_MAX {
            return Err(invalid(
                "metrics_schools_max",
                format!("must be at most {METRICS_SCHOOLS_MAX} (each school adds up to 96 series)"),
            ));
        }
        if !(1..=SYNC_EVENTS_PER_BATCH_LIMIT).contains(&self.sync_events_per_batch_max) {
            return Err(invalid(
                "sync_events_per_batch_max",
                format!("must be between 1 and {SYNC_EVENTS_PER_BATCH_LIMIT}"),
            ));
        }
        if self.idempotency_window_s > 366 * 24 * 3600 {
            return Err(invalid("idempotency_window_s", "must be at most a year"));
        }
        if self.recover_from == RecoverFrom::Postgres && self.postgres_url.is_none() {
            return Err(invalid(
                "recover_from",
                "\"postgres\" needs a Postgres to recover from: set postgres_url (--database-url)",
            ));
        }
        self.service_types()?;
        self.rls_domains()?;
        if !self.rls_allow_public && !is_private(self.rls_addr.ip()) {
            return Err(invalid(
                "rls_addr",
                format!(
                    "{} is neither loopback nor a private address; the rate limit listener takes \
                     no tokens, so anyone who reaches it may charge. Bind it to a private \
                     address, or set rls_allow_public = true",
                    self.rls_addr
                ),
            ));
        }
        self.alert_thresholds()
            .validate()
            .map_err(|e| invalid(e.field, e.problem))?;
        Ok(())
    }

    /// The rate limit domains, checked (under `insecure_dev`, with the
    /// default domain `quotad` for any school).
    pub fn rls_domains(&self) -> Result<Domains, ConfigError> {
        Domains::new(&self.rls_domains, self.insecure_dev, self.hold_ttl_ms_max)
            .map_err(|e| invalid("rls_domains", e.problem))
    }

    pub fn alert_thresholds(&self) -> AlertThresholds {
        AlertThresholds {
            slice_used_percents: self.alert_slice_used_percents.clone(),
            pool_used_percent: self.alert_pool_used_percent,
            anomaly_factor_percent: self.alert_anomaly_factor_percent,
        }
    }

    /// How calls are authenticated: a signing key, or the explicit dev mode.
    pub fn auth_mode(&self) -> Result<AuthMode, ConfigError> {
        let key = match (&self.auth_key, &self.auth_key_file) {
            (Some(key), _) => Some(key.0.trim().as_bytes().to_vec()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Some(text.trim().as_bytes().to_vec())
            }
            (None, None) => None,
        };
        match (key, self.insecure_dev) {
            (Some(_), true) => Err(invalid(
                "insecure_dev",
                "a signing key is configured too; use one or the other",
            )),
            (Some(key), false) => Authenticator::new(&key)
                .map(|a| AuthMode::Key(Arc::new(a)))
                .map_err(|e| invalid("auth_key", e.to_string())),
            (None, true) => Ok(AuthMode::InsecureDev),
            (None, false) => Err(invalid(
                "auth_key",
                "no key to check bearer tokens with: set QUOTAD_AUTH_KEY or auth_key_file \
                 (see README, Roles), or run `quotad serve --insecure-dev` on a laptop",
            )),
        }
    }

    pub fn service_types(&self) -> Result<Vec<ServiceType>, ConfigError> {
        let types = self
            .default_service_types
            .iter()
            .map(|s| {
                ServiceType::parse(s).map_err(|e| invalid("default_service_types", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if types.len() > RuleLimits::default().service_types_per_school_max {
            return Err(invalid(
                "default_service_types",
                "names more than 32 service types",
            ));
        }
        Ok(types)
    }

    pub fn limits(&self) -> RuleLimits {
        RuleLimits {
            idempotency_window_ms: i64::try_from(self.idempotency_window_s.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            hold_ttl_ms_default: self.hold_ttl_ms_default,
            hold_ttl_ms_max: self.hold_ttl_ms_max,
            sync_events_per_batch_max: self.sync_events_per_batch_max,
            ..RuleLimits::default()
        }
    }

    /// The gate's request limit: `request_bytes_max`, raised so that a full
    /// sync batch of the largest events (every id and name at its maximum
    /// length) fits. 1,000 events: 500 KiB. The admin service keeps
    /// `request_bytes_max`.
    pub fn gate_request_bytes_max(&self) -> usize {
        self.request_bytes_max
            .max(self.sync_events_per_batch_max * SYNC_EVENT_BYTES_MAX)
    }

    pub fn wal(&self) -> WalConfig {
        WalConfig {
            durability: self.durability,
            batched_flush_interval_ms: self.batched_flush_interval_ms,
            queue_records_max: self.wal_queue_records_max,
            batch_records_max: self.wal_batch_records_max,
        }
    }

    pub fn engine(&self) -> Result<EngineConfig, ConfigError> {
        let defaults = EngineConfig::default();
        Ok(EngineConfig {
            arbiters: if self.actor_threads == 0 {
                defaults.arbiters
            } else {
                self.actor_threads
            },
            mailbox_capacity: self.mailbox_capacity,
            housekeeping_interval: Duration::from_millis(self.housekeeping_interval_ms),
            limits: self.limits(),
            default_service_types: self.service_types()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(config.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(config.durability, Durability::Sync);
        assert_eq!(config.idempotency_window_s, 8 * 24 * 3600);
        assert_eq!(config.sync_events_per_batch_max, 1_000);
        assert_eq!(config.gate_request_bytes_max(), 512_000);
    }

    #[test]
    fn the_rls_listener_is_private_unless_allowed_public() {
        assert_eq!(Config::default().rls_addr.to_string(), "127.0.0.1:8081");
        for private in [
            "127.0.0.1:8081",
            "10.1.2.3:8081",
            "172.16.0.9:1",
            "192.168.1.1:1",
            "[::1]:8081",
            "[fd00::1]:8081",
            "[fe80::1]:1",
        ] {
            let config = Config {
                rls_addr: private.parse().unwrap(),
                ..Config::default()
            };
            config
                .validate()
                .unwrap_or_else(|e| panic!("{private}: {e}"));
        }
        for public in [
            "0.0.0.0:8081",
            "8.8.8.8:8081",
            "[::]:8081",
            "[2001:db8::1]:1",
            "172.32.0.1:1",
        ] {
            let config = Config {
                rls_addr: public.parse().unwrap(),
                ..Config::default()
            };
            let error = config.validate().unwrap_err().to_string();
            assert!(
                error.contains("rls_addr") && error.contains("rls_allow_public"),
                "{error}"
            );
            Config {
                rls_allow_public: true,
                ..config
            }
            .validate()
            .unwrap();
        }
    }

    #[test]
    fn rls_domains_are_read_from_the_file_and_checked() {
        let text = "[[rls_domains]]\nname = \"gw\"\nschools = [\"oak\"]\nholds = true\n\n\
                    [[rls_domains]]\nname = \"open\"\nschools = [\"*\"]\nunknown_slice = \"allow\"\n";
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let domains = config.rls_domains().unwrap();
        assert_eq!(domains.names().collect::<Vec<_>>(), ["gw", "open"]);
        assert!(domains.get("gw").unwrap().holds);
        let dev = Config {
            insecure_dev: true,
            ..Config::default()
        };
        assert!(dev.rls_domains().unwrap().get("quotad").is_some());
        let bad: Config = toml::from_str("[[rls_domains]]\nname = \"gw\"\n").unwrap();
        let error = bad.validate().unwrap_err().to_string();
        assert!(
            error.contains("rls_domains") && error.contains("schools"),
            "{error}"
        );
    }

    #[test]
    fn the_sync_batch_limit_is_bounded_and_reaches_the_rules() {
        for bad in [0, SYNC_EVENTS_PER_BATCH_LIMIT + 1] {
            let config = Config {
                sync_events_per_batch_max: bad,
                ..Config::default()
            };
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("sync_events_per_batch_max"), "{error}");
        }
        let config = Config {
            sync_events_per_batch_max: 10,
            ..Config::default()
        };
        assert_eq!(config.limits().sync_events_per_batch_max, 10);
        // Small batches never lower the general request limit.
        assert_eq!(config.gate_request_bytes_max(), config.request_bytes_max);
    }

    #[test]
    fn a_file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotad.toml");
        std::fs::write(&path, "durability = \"batched\"\nsnapshot_interval_s = 5\n").unwrap();
        let config = Config::from_file(&path).unwrap();
        assert_eq!(
            (config.durability, config.snapshot_interval_s),
            (Durability::Batched, 5)
        );
        std::fs::write(&path, "durabilty = \"batched\"\n").unwrap();
        assert!(matches!(
            Config::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn bad_settings_are_refused_with_their_name() {
        let config = Config {
            snapshot_interval_s: 0,
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("snapshot_interval_s"));
        let config = Config {
            default_service_types: vec!["Bad-Name".into()],
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default_service_types"));
    }

    #[test]
    fn the_pool_gauges_are_bounded_and_refreshed() {
        let config = Config::default();
        assert_eq!(
            (
                config.metrics_schools_max,
                config.metrics_refresh_interval_ms
            ),
            (100, 10_000)
        );
        let too_many = Config {
            metrics_schools_max: METRICS_SCHOOLS_MAX + 1,
            ..Config::default()
        };
        assert!(too_many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("metrics_schools_max"));
        let never = Config {
            metrics_refresh_interval_ms: 0,
            ..Config::default()
        };
        assert!(never
            .validate()
            .unwrap_err()
            .to_string()
            .contains("metrics_refresh_interval_ms"));
        let none = Config {
            metrics_schools_max: 0,
            ..Config::default()
        };
        none.validate().unwrap();
    }

    #[test]
    fn recovering_from_postgres_is_read_from_the_file_and_needs_a_postgres() {
        let config: Config = toml::from_str("recover_from = \"postgres\"\n").unwrap();
        assert_eq!(config.recover_from, RecoverFrom::Postgres);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("recover_from"), "{error}");
        let config = Config {
            postgres_url: Some(Secret("postgres://quotad@127.0.0.1/quotad".into())),
            ..config
        };
        config.validate().unwrap();
        assert_eq!(Config::default().recover_from, RecoverFrom::Auto);
        assert!(toml::from_str::<Config>("recover_from = \"sled\"\n").is_err());
    }

    #[test]
    fn alert_thresholds_come_from_the_file_and_are_checked() {
        let config: Config =
            toml::from_str("alert_slice_used_percents = [50, 90]\nalert_pool_used_percent = 75\n")
                .unwrap();
        config.validate().unwrap();
        assert_eq!(config.alert_thresholds().slice_used_percents, [50, 90]);
        assert_eq!(config.alert_thresholds().pool_used_percent, 75);
        let config = Config {
            alert_slice_used_percents: vec![90, 50],
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("alert_slice_used_percents"));
    }
}
