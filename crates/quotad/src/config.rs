//! quotad's settings: defaults, then a TOML file, then environment variables
//! (`QUOTAD_*`), then command-line flags, each overriding the one before.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use std::sync::Arc;

use crate::auth::{check_public_key_ids, AuthMode, Authenticator, PublicKey, PublicKeyFile};
use crate::engine::EngineConfig;
use crate::rls::{DomainConfig, Domains};
use crate::server::conn::ConnLimits;
use crate::server::tls::TlsFiles;
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
    /// TLS for the gRPC listeners (both or neither): PEM files, reloaded
    /// on SIGHUP and when they change.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Mutual TLS on `grpc_addr`: clients must present a certificate this
    /// CA signed.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Mutual TLS on `rls_addr` (the gateways' listener), which takes no
    /// tokens: the natural way to say which gateways may charge.
    pub rls_tls_client_ca_file: Option<PathBuf>,
    /// Serve `/metrics` over TLS too, with the same certificate (and no
    /// client certificate: a scraper is not a gRPC client).
    pub metrics_tls: bool,
    /// How often the TLS files are checked for a change.
    pub tls_reload_interval_s: u64,
    /// A TLS handshake not done by then closes the connection.
    pub tls_handshake_timeout_ms: u64,
    /// Connections a gRPC listener holds at once; more are closed as soon
    /// as they are accepted.
    pub connections_max: usize,
    /// Of those, from one peer address.
    pub connections_per_ip_max: usize,
    /// Calls one connection may have open at once (HTTP/2
    /// MAX_CONCURRENT_STREAMS): a client waits for a free one.
    pub streams_per_connection_max: u32,
    /// A connection that moved no byte either way for this long is closed.
    pub idle_timeout_s: u64,
    /// The largest header block a request may send (HTTP/2
    /// MAX_HEADER_LIST_SIZE).
    pub header_list_bytes_max: u32,
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
    /// A file holding the shared key that checks and signs bearer tokens
    /// (HS256, at least 32 bytes; surrounding whitespace is ignored), for a
    /// single box: whoever reads it can mint any token. `QUOTAD_AUTH_KEY` may
    /// give the key itself instead. Not with `auth_public_keys`.
    pub auth_key_file: Option<PathBuf>,
    /// The public keys that check EdDSA (Ed25519) and ES256 (P-256) tokens,
    /// each chosen by the `kid` in a token's header: `[[auth_public_keys]]`
    /// tables of `kid` and `file` (PEM). Several, so that a new key can be
    /// added before the old one is removed. quotad never holds the private
    /// keys, so nothing it holds can mint a token.
    pub auth_public_keys: Vec<PublicKeyFile>,
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
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            rls_tls_client_ca_file: None,
            metrics_tls: false,
            tls_reload_interval_s: 10,
            tls_handshake_timeout_ms: 10_000,
            connections_max: 4096,
            connections_per_ip_max: 1024,
            streams_per_connection_max: 128,
            idle_timeout_s: 300,
            header_list_bytes_max: 16 * 1024,
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
            auth_public_keys: Vec::new(),
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

/// 127.0.0.0/8, ::1, or ::ffff:127.x.y.z.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
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
            ("tls_reload_interval_s", self.tls_reload_interval_s),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("connections_max", self.connections_max as u64),
            ("connections_per_ip_max", self.connections_per_ip_max as u64),
            (
                "streams_per_connection_max",
                u64::from(self.streams_per_connection_max),
            ),
            ("idle_timeout_s", self.idle_timeout_s),
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
        self.check_auth_settings()?;
        self.tls_files()?;
        self.metrics_tls_files()?;
        // A mistyped sslmode or an unreadable sslrootcert would otherwise
        // look like a Postgres that does not answer, and quotad would start
        // without it.
        if let Some(url) = &self.postgres_url {
            crate::postgres::check_url(&url.0)
                .map_err(|e| invalid("postgres_url", e.to_string()))?;
        }
        if !(1024..=1024 * 1024).contains(&self.header_list_bytes_max) {
            return Err(invalid(
                "header_list_bytes_max",
                "must be between 1 KiB and 1 MiB",
            ));
        }
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

    /// The TLS files of the main listener and of the rate limit listener;
    /// None: plaintext.
    pub fn tls_files(&self) -> Result<Option<(TlsFiles, TlsFiles)>, ConfigError> {
        let (cert, key) = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (None, None) => {
                for (setting, ca) in [
                    ("tls_client_ca_file", &self.tls_client_ca_file),
                    ("rls_tls_client_ca_file", &self.rls_tls_client_ca_file),
                ] {
                    if ca.is_some() {
                        return Err(invalid(
                            setting,
                            "mutual TLS needs TLS: set tls_cert_file and tls_key_file",
                        ));
                    }
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key_file",
                    "tls_cert_file is set, its key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert_file",
                    "tls_key_file is set, its certificate is not",
                ))
            }
        };
        let files = |client_ca: &Option<PathBuf>, client_ca_setting| TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
            client_ca_setting,
            // gRPC is HTTP/2 only.
            alpn: vec![b"h2".to_vec()],
        };
        Ok(Some((
            files(&self.tls_client_ca_file, "tls_client_ca_file"),
            files(&self.rls_tls_client_ca_file, "rls_tls_client_ca_file"),
        )))
    }

    /// The metrics endpoint's TLS (`metrics_tls`): the gRPC certificate,
    /// no client certificate, HTTP/1.1 or h2. None: plaintext.
    pub fn metrics_tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        if !self.metrics_tls {
            return Ok(None);
        }
        let Some((main, _)) = self.tls_files()? else {
            return Err(invalid(
                "metrics_tls",
                "needs the certificate of the gRPC listeners: set tls_cert_file and tls_key_file",
            ));
        };
        Ok(Some(TlsFiles {
            client_ca: None,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            ..main
        }))
    }

    /// What a client may hold of a gRPC listener.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            connections_max: self.connections_max,
            connections_per_ip_max: self.connections_per_ip_max,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
        }
    }

    pub fn alert_thresholds(&self) -> AlertThresholds {
        AlertThresholds {
            slice_used_percents: self.alert_slice_used_percents.clone(),
            pool_used_percent: self.alert_pool_used_percent,
            anomaly_factor_percent: self.alert_anomaly_factor_percent,
        }
    }

    /// The environment variable that may hold the shared HS256 key itself.
    /// Never a flag: a command line is visible to every user in `ps`.
    pub const AUTH_KEY_ENV: &'static str = "QUOTAD_AUTH_KEY";

    /// The shared key from [`Config::AUTH_KEY_ENV`], if set and not empty
    /// (`docker run -e QUOTAD_AUTH_KEY=` sets it empty).
    pub fn auth_key_from_env() -> Result<Option<Secret>, ConfigError> {
        match std::env::var(Self::AUTH_KEY_ENV) {
            Ok(key) if key.is_empty() => Ok(None),
            Ok(key) => Ok(Some(Secret(key))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(invalid(
                "auth_key",
                format!("{} is not valid UTF-8", Self::AUTH_KEY_ENV),
            )),
        }
    }

    /// The auth settings that can be checked without reading a key file.
    ///
    /// A shared HS256 key and public keys together are refused rather than
    /// both accepted: whoever reads the shared key can mint any token, which
    /// is what the public keys are there to prevent, and two ways in would
    /// leave it to the token's header which one is used. To move from one
    /// to the other, mint new tokens first, then start with the new keys only.
    fn check_auth_settings(&self) -> Result<(), ConfigError> {
        let shared = self.auth_key.is_some() || self.auth_key_file.is_some();
        if self.auth_public_keys.is_empty() {
            return Ok(());
        }
        if shared {
            return Err(invalid(
                "auth_public_keys",
                "a shared HS256 key (QUOTAD_AUTH_KEY or auth_key_file) is set too. Whoever \
                 reads that key can mint any token, which public keys are meant to prevent: \
                 set one or the other (to move to public keys, mint new tokens with `quotad \
                 token --private-key-file`, then remove the shared key)",
            ));
        }
        let kids: Vec<&str> = self
            .auth_public_keys
            .iter()
            .map(|k| k.kid.as_str())
            .collect();
        check_public_key_ids(&kids).map_err(|e| invalid("auth_public_keys", e.to_string()))
    }

    /// The shared HS256 key, from `QUOTAD_AUTH_KEY` or else `auth_key_file`.
    fn shared_auth_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        match (&self.auth_key, &self.auth_key_file) {
            (Some(key), _) => Ok(Some(key.0.trim().as_bytes().to_vec())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok(Some(text.trim().as_bytes().to_vec()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Reads every `auth_public_keys` file.
    fn public_keys(&self) -> Result<Vec<PublicKey>, ConfigError> {
        self.auth_public_keys
            .iter()
            .map(|entry| {
                let text =
                    std::fs::read_to_string(&entry.file).map_err(|source| ConfigError::Read {
                        path: entry.file.clone(),
                        source,
                    })?;
                PublicKey::from_pem(&entry.kid, &text).map_err(|e| {
                    invalid(
                        "auth_public_keys",
                        format!("key {:?} ({}): {e}", entry.kid, entry.file.display()),
                    )
                })
            })
            .collect()
    }

    /// How calls are authenticated: public keys, a shared key, or the
    /// explicit dev mode; exactly one of them.
    pub fn auth_mode(&self) -> Result<AuthMode, ConfigError> {
        self.check_auth_settings()?;
        let shared = self.shared_auth_key()?;
        let public = !self.auth_public_keys.is_empty();
        if self.insecure_dev {
            if shared.is_some() || public {
                return Err(invalid(
                    "insecure_dev",
                    "a signing key is configured too; use one or the other",
                ));
            }
            return Ok(AuthMode::InsecureDev);
        }
        let authenticator =
            match shared {
                // `check_auth_settings` refused a shared key beside public keys.
                Some(key) => {
                    Authenticator::new(&key).map_err(|e| invalid("auth_key", e.to_string()))?
                }
                None if public => Authenticator::with_public_keys(self.public_keys()?)
                    .map_err(|e| invalid("auth_public_keys", e.to_string()))?,
                None => return Err(invalid(
                    "auth_key",
                    "no key to check bearer tokens with: set auth_public_keys, or for a single \
                     box QUOTAD_AUTH_KEY or auth_key_file (see README, Roles), or run `quotad \
                     serve --insecure-dev` on a laptop",
                )),
            };
        Ok(AuthMode::Key(Arc::new(authenticator)))
    }

    /// Under `insecure_dev` every caller is an admin, so quotad listens on
    /// loopback only: refuses any listener that is on (`metrics_on`,
    /// `rls_on`: not turned off by `--no-metrics`, `--no-rls`) and bound to
    /// another address, naming its setting.
    pub fn check_insecure_dev_listeners(
        &self,
        metrics_on: bool,
        rls_on: bool,
    ) -> Result<(), ConfigError> {
        if !self.insecure_dev {
            return Ok(());
        }
        let listeners = [
            ("grpc_addr", self.grpc_addr, true),
            ("metrics_addr", self.metrics_addr, metrics_on),
            ("rls_addr", self.rls_addr, rls_on),
        ];
        for (setting, addr, on) in listeners {
            if on && !is_loopback(addr.ip()) {
                return Err(invalid(
                    setting,
                    format!(
                        "{addr} is not a loopback address, and --insecure-dev accepts every call \
                         without a token, as an admin: bind it to 127.0.0.1 or [::1], or give \
                         quotad keys instead (see README, Roles)"
                    ),
                ));
            }
        }
        Ok(())
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
    fn tls_needs_a_certificate_and_its_key_and_mutual_tls_needs_tls() {
        assert_eq!(Config::default().tls_files().unwrap(), None);
        let half = Config {
            tls_cert_file: Some("cert.pem".into()),
            ..Config::default()
        };
        assert!(half
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tls_key_file"));
        let other_half = Config {
            tls_key_file: Some("key.pem".into()),
            ..Config::default()
        };
        assert!(other_half
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tls_cert_file"));
        let mutual_without_tls = Config {
            rls_tls_client_ca_file: Some("gateways.pem".into()),
            ..Config::default()
        };
        let error = mutual_without_tls.validate().unwrap_err().to_string();
        assert!(error.contains("rls_tls_client_ca_file"), "{error}");
        let both = Config {
            tls_cert_file: Some("cert.pem".into()),
            tls_key_file: Some("key.pem".into()),
            rls_tls_client_ca_file: Some("gateways.pem".into()),
            ..Config::default()
        };
        assert!(Config {
            metrics_tls: true,
            ..Config::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("metrics_tls"));
        let metrics = Config {
            metrics_tls: true,
            ..both.clone()
        };
        let files = metrics.metrics_tls_files().unwrap().unwrap();
        assert_eq!((files.client_ca, files.alpn.len()), (None, 2));
        let (main, rls) = both.tls_files().unwrap().unwrap();
        assert_eq!(
            (main.client_ca, rls.client_ca),
            (None, Some("gateways.pem".into()))
        );
        for bad in [
            Config {
                connections_max: 0,
                ..Config::default()
            },
            Config {
                idle_timeout_s: 0,
                ..Config::default()
            },
            Config {
                header_list_bytes_max: 100,
                ..Config::default()
            },
        ] {
            bad.validate().unwrap_err();
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

    /// An Ed25519 public key in PEM, written to `dir/name`.
    fn public_key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let pem = ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    #[test]
    fn public_keys_are_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let old = public_key_file(dir.path(), "old.pem", 1);
        let new = public_key_file(dir.path(), "new.pem", 2);
        let text = format!(
            "[[auth_public_keys]]\nkid = \"2025-01\"\nfile = {old:?}\n\n\
             [[auth_public_keys]]\nkid = \"2025-07\"\nfile = {new:?}\n"
        );
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        let AuthMode::Key(authenticator) = config.auth_mode().unwrap() else {
            panic!("not keys");
        };
        assert!(format!("{authenticator:?}").contains("2025-07"));

        let same_kid = Config {
            auth_public_keys: vec![config.auth_public_keys[0].clone(); 2],
            ..Config::default()
        };
        let error = same_kid.validate().unwrap_err().to_string();
        assert!(
            error.contains("auth_public_keys") && error.contains("twice"),
            "{error}"
        );
        let missing = Config {
            auth_public_keys: vec![PublicKeyFile {
                kid: "k".into(),
                file: dir.path().join("absent.pem"),
            }],
            ..Config::default()
        };
        let error = missing.auth_mode().unwrap_err().to_string();
        assert!(error.contains("absent.pem"), "{error}");
        let not_a_key = Config {
            auth_public_keys: vec![PublicKeyFile {
                kid: "k".into(),
                file: dir.path().join("old.pem.txt"),
            }],
            ..Config::default()
        };
        std::fs::write(dir.path().join("old.pem.txt"), "hello").unwrap();
        let error = not_a_key.auth_mode().unwrap_err().to_string();
        assert!(
            error.contains("auth_public_keys") && error.contains("\"k\"") && error.contains("PEM"),
            "{error}"
        );
        let unknown_field = "[[auth_public_keys]]\nkid = \"k\"\npath = \"x\"\n";
        assert!(toml::from_str::<Config>(unknown_field).is_err());
    }

    #[test]
    fn a_shared_key_and_public_keys_together_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keys = vec![PublicKeyFile {
            kid: "k".into(),
            file: public_key_file(dir.path(), "k.pem", 1),
        }];
        for shared in [
            Config {
                auth_key: Some(Secret("0123456789abcdef0123456789abcdef".into())),
                ..Config::default()
            },
            Config {
                auth_key_file: Some(dir.path().join("shared.key")),
                ..Config::default()
            },
        ] {
            let both = Config {
                auth_public_keys: keys.clone(),
                ..shared
            };
            for error in [both.validate().unwrap_err(), both.auth_mode().unwrap_err()] {
                let error = error.to_string();
                assert!(
                    error.starts_with("setting auth_public_keys:")
                        && error.contains("mint any token"),
                    "{error}"
                );
            }
        }
        let dev = Config {
            auth_public_keys: keys,
            insecure_dev: true,
            ..Config::default()
        };
        let error = dev.auth_mode().unwrap_err().to_string();
        assert!(error.contains("insecure_dev"), "{error}");
        let error = Config::default().auth_mode().unwrap_err().to_string();
        assert!(
            error.contains("auth_public_keys") && error.contains("--insecure-dev"),
            "{error}"
        );
    }

    #[test]
    fn insecure_dev_listens_on_loopback_only() {
        let dev = |grpc: &str, metrics: &str, rls: &str| Config {
            grpc_addr: grpc.parse().unwrap(),
            metrics_addr: metrics.parse().unwrap(),
            rls_addr: rls.parse().unwrap(),
            insecure_dev: true,
            ..Config::default()
        };
        let local = "127.0.0.1:1";
        for loopback in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            dev(loopback, loopback, loopback)
                .check_insecure_dev_listeners(true, true)
                .unwrap_or_else(|e| panic!("{loopback}: {e}"));
        }
        for public in [
            "0.0.0.0:1",
            "[::]:1",
            "10.0.0.1:1",
            "8.8.8.8:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            let cases = [
                ("grpc_addr", dev(public, local, local)),
                ("metrics_addr", dev(local, public, local)),
                ("rls_addr", dev(local, local, public)),
            ];
            for (setting, config) in cases {
                let error = config
                    .check_insecure_dev_listeners(true, true)
                    .unwrap_err()
                    .to_string();
                assert!(
                    error.starts_with(&format!("setting {setting}:"))
                        && error.contains("loopback")
                        && error.contains("--insecure-dev"),
                    "{error}"
                );
            }
            // A listener turned off is not listening anywhere.
            dev(local, public, public)
                .check_insecure_dev_listeners(false, false)
                .unwrap();
            assert!(dev(public, local, local)
                .check_insecure_dev_listeners(false, false)
                .is_err());
            // With keys, listeners may be anywhere.
            Config {
                insecure_dev: false,
                ..dev(public, public, local)
            }
            .check_insecure_dev_listeners(true, true)
            .unwrap();
        }
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
