//! TLS for the gRPC listeners (rustls): the certificate and key, and an
//! optional client CA that makes it mutual TLS. Reloaded on SIGHUP and when
//! the files change; a connection keeps the configuration it was accepted
//! with, so a reload drops nothing. A reload that fails keeps the previous
//! configuration (and says why).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{setting} {path}: {problem}")]
    File {
        setting: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

/// The files one listener's TLS is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Some: clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
    /// The setting that names `client_ca`, for messages.
    pub client_ca_setting: &'static str,
    /// The application protocols offered (ALPN): h2 for gRPC, http/1.1
    /// too for the metrics endpoint.
    pub alpn: Vec<Vec<u8>>,
}

/// The files' modification times and sizes, to notice a change.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// A listener's TLS configuration, swapped whole on reload.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<TlsAcceptor>>,
    stamps: Arc<Mutex<Stamps>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let acceptor = acceptor(&files)?;
        let stamps = stamps(&files);
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(acceptor)),
            stamps: Arc::new(Mutex::new(stamps)),
        })
    }

    /// The configuration a new connection is accepted with.
    pub fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock only means a panic while swapping one Arc in.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again; on an error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.files);
        let acceptor = acceptor(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(())
    }

    /// Reloads when a file's time or size changed since the last load.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        changed.then(|| self.reload())
    }

    /// Reloads on SIGHUP and when the files change (checked every
    /// `interval`), until the task is dropped. Logs each reload.
    pub async fn follow(self, interval: Duration) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let result = tokio::select! {
                _ = hup => Some(self.reload()),
                _ = tick.tick() => self.reload_if_changed(),
            };
            match result {
                Some(Ok(())) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded")
                }
                Some(Err(error)) => {
                    tracing::error!(%error, "TLS reload failed; the previous certificate stays")
                }
                None => {}
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Stamps {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

fn read_error(setting: &'static str, path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File {
        setting,
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(setting, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(setting, path, e))?;
    if certs.is_empty() {
        return Err(read_error(setting, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let certs = certificates("tls_cert_file", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| read_error("tls_key_file", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            setting: "tls_cert_file",
            problem: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(files.client_ca_setting, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| read_error(files.client_ca_setting, ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| read_error(files.client_ca_setting, ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid {
            setting: "tls_key_file",
            problem: format!("does not go with tls_cert_file: {e}"),
        })?;
    config.alpn_protocols = files.alpn.clone();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
