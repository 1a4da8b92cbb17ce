//! Connecting to Postgres: the one way every part of quotad does it (the
//! snapshot writer, recovery, the analytics reader, `quotad migrate`, the
//! tests), so that all of them honour the TLS the URL asks for.
//!
//! The URL's libpq parameters decide, as they do for libpq (`psql`):
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it, plain text otherwise | not checked |
//! | `require` | always | not checked; with `sslrootcert`, its chain is (as libpq) |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` (the system's roots without it) |
//! | `verify-full` | always | as `verify-ca`, and valid for the host connected to |
//!
//! `sslrootcert` is a PEM file of CAs, or `system` (the system's roots,
//! which libpq allows with `verify-full` only). tokio-postgres knows
//! `sslmode` disable, prefer and require only, and no `sslrootcert`: both are
//! taken out of the URL here ([`params`]), the rest goes to tokio-postgres,
//! and the certificate check is rustls's ([`tls`]).

mod params;
mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use quotad_proto::error_chain;
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use tls::{Check, Roots};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's "allow" tries plain text first and TLS second, which
            // tokio-postgres cannot do; quietly taking it for another mode
            // would change what is sent in the clear.
            "allow" => {
                return Err(
                    "sslmode=allow is not supported (plain text first, then TLS): use prefer or disable"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether to
    /// insist. The certificate check is ours.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Negotiation;
        match self {
            Self::Disable => Negotiation::Disable,
            Self::Prefer => Negotiation::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Negotiation::Require,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no connection was made. Every message names the setting at fault; none
/// repeats the URL, which may hold a password. tokio-postgres's errors are
/// kept as their whole chain in words: their own `Display` stops at the first
/// link ("db error", "error connecting to server").
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The URL is wrong (an unknown sslmode, an unreadable sslrootcert):
    /// trying again cannot help until it is changed.
    #[error("postgres_url: {0}")]
    Settings(String),
    /// The TLS the URL asks for failed: the server's certificate was refused,
    /// the server does not speak TLS, or the handshake broke off.
    #[error("postgres_url: sslmode={mode}: {reason}")]
    Tls { mode: SslMode, reason: String },
    /// The server (its pg_hba.conf) refused a connection sslmode=disable
    /// made without TLS; it may accept only TLS ones.
    #[error("postgres_url: sslmode=disable: the server refused this connection without TLS: {0}")]
    RefusedWithoutTls(String),
    /// Anything else: the server is out of reach, or refused the user.
    #[error("{0}")]
    Postgres(String),
}

/// A connection's task: it drives the socket, and ends when the client is
/// dropped or the connection fails. Whoever connects spawns it.
pub type ConnectionTask = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// A connection string read: what tokio-postgres is given, and the TLS the
/// string asks for.
struct Settings {
    config: tokio_postgres::Config,
    mode: SslMode,
    check: Check,
    roots: Roots,
}

impl Settings {
    fn parse(url: &str) -> Result<Self, ConnectError> {
        let (rest, params) = params::split(url).map_err(ConnectError::Settings)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| ConnectError::Settings(error_chain(&e)))?;
        let given = params
            .sslmode
            .as_deref()
            .map(SslMode::parse)
            .transpose()
            .map_err(ConnectError::Settings)?;
        let (roots, mode) = match params.sslrootcert.as_deref() {
            // As libpq (16 on): the system's roots check only with the host
            // name, or anyone with a certificate from a public CA passes.
            Some("system") => match given.unwrap_or(SslMode::VerifyFull) {
                SslMode::VerifyFull => (Roots::System, SslMode::VerifyFull),
                weaker => {
                    return Err(ConnectError::Settings(format!(
                        "sslrootcert=system needs sslmode=verify-full, not {weaker}"
                    )))
                }
            },
            Some(path) => (
                Roots::File(PathBuf::from(path)),
                given.unwrap_or(SslMode::Prefer),
            ),
            None => (Roots::System, given.unwrap_or(SslMode::Prefer)),
        };
        let check = match mode {
            SslMode::Disable | SslMode::Prefer => Check::Nothing,
            // libpq: "if a root CA file exists, the behavior of
            // sslmode=require will be the same as that of verify-ca".
            SslMode::Require if matches!(roots, Roots::File(_)) => Check::Chain,
            SslMode::Require => Check::Nothing,
            SslMode::VerifyCa => Check::Chain,
            SslMode::VerifyFull => Check::ChainAndHost,
        };
        config.ssl_mode(mode.negotiation());
        Ok(Self {
            config,
            mode,
            check,
            roots,
        })
    }

    /// The rustls connector, or None when no TLS is to be tried.
    fn connector(&self) -> Result<Option<MakeRustlsConnect>, ConnectError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        match tls::client_config(self.check, &self.roots) {
            Ok(config) => Ok(Some(MakeRustlsConnect::new(config))),
            Err(tls::ConfigError::RootFile(message)) => Err(ConnectError::Settings(message)),
            Err(tls::ConfigError::Tls(reason)) => Err(ConnectError::Tls {
                mode: self.mode,
                reason,
            }),
        }
    }

    /// What a failed connect means, in terms of the settings.
    fn failed(&self, error: tokio_postgres::Error) -> ConnectError {
        if let Some(refused) = rustls_error(&error) {
            return ConnectError::Tls {
                mode: self.mode,
                reason: tls::describe(refused, &self.roots),
            };
        }
        // tokio-postgres does not expose its error kinds; its TLS errors
        // (such as a server that answers the TLS request with "no") are the
        // ones whose message says so.
        if error
            .to_string()
            .starts_with("error performing TLS handshake")
        {
            let cause = std::error::Error::source(&error).map_or_else(String::new, error_chain);
            return ConnectError::Tls {
                mode: self.mode,
                reason: format!("the TLS handshake failed: {cause}"),
            };
        }
        if self.mode == SslMode::Disable
            && error.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
        {
            return ConnectError::RefusedWithoutTls(error_chain(&error));
        }
        ConnectError::Postgres(error_chain(&error))
    }
}

/// The rustls error behind a failed handshake, if that is what failed.
/// tokio-rustls hands it up inside an `io::Error`, whose `source` skips it.
fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if inner.is_some() {
            return inner;
        }
        cause = current.source();
    }
    None
}

/// Connects as `url` says; the caller spawns the connection's task on the
/// runtime it wants it driven by.
pub async fn open(url: &str) -> Result<(Client, ConnectionTask), ConnectError> {
    let settings = Settings::parse(url)?;
    match settings.connector()? {
        None => {
            let (client, connection) = settings
                .config
                .connect(NoTls)
                .await
                .map_err(|e| settings.failed(e))?;
            Ok((client, Box::pin(connection)))
        }
        Some(tls) => {
            let (client, connection) = settings
                .config
                .connect(tls)
                .await
                .map_err(|e| settings.failed(e))?;
            Ok((client, Box::pin(connection)))
        }
    }
}

/// Checks `url` without connecting: its TLS settings and that `sslrootcert`
/// holds a CA. For start-up, so that a mistyped setting is refused at once
/// rather than taken for a Postgres that does not answer.
pub fn check_url(url: &str) -> Result<(), ConnectError> {
    Settings::parse(url)?.connector().map(|_| ())
}

#[cfg(test)]
mod tests;
