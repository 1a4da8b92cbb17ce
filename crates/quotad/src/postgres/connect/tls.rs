//! rustls for Postgres: the client configuration each certificate check
//! needs, the roots it checks against, and what a failed handshake means in
//! words an operator can act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Nothing: the connection is encrypted, but anyone in the middle can
    /// present any certificate (libpq's `prefer` and `require` without a
    /// root certificate).
    Nothing,
    /// That a trusted CA signed it, whatever host it names (`verify-ca`).
    Chain,
    /// That a trusted CA signed it for the host connected to (`verify-full`).
    ChainAndHost,
}

/// The CAs a certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Roots {
    /// The operating system's store (rustls-native-certs).
    System,
    /// The PEM file `sslrootcert` names.
    File(PathBuf),
}

impl std::fmt::Display for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::System => f.write_str("the system's root CAs"),
            Self::File(path) => write!(f, "the CAs of sslrootcert={}", path.display()),
        }
    }
}

/// Why a client configuration could not be made.
#[derive(Debug)]
pub(super) enum ConfigError {
    /// `sslrootcert` names a file that is missing or holds no usable CA.
    RootFile(String),
    /// Anything else (no system roots, a provider without a protocol).
    Tls(String),
}

/// The client configuration for `check` against `roots` (read now: a CA file
/// replaced on disk is used from the next connection on). Only ring is
/// compiled in, and it is named rather than taken from rustls's process-wide
/// default, which another part of the process could set differently.
pub(super) fn client_config(check: Check, roots: &Roots) -> Result<ClientConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))?;
    let mut config = match check {
        // The stock verifier: the chain, then the host name.
        Check::ChainAndHost => builder
            .with_root_certificates(load_roots(roots)?)
            .with_no_client_auth(),
        Check::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                roots: Some(Arc::new(load_roots(roots)?)),
                algorithms,
            }))
            .with_no_client_auth(),
        Check::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                roots: None,
                algorithms,
            }))
            .with_no_client_auth(),
    };
    // What libpq (17 on) offers: a server that takes direct TLS
    // (sslnegotiation=direct) requires it; others ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, ConfigError> {
    match roots {
        Roots::File(path) => load_root_file(path),
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _unparsable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(ConfigError::Tls(format!(
                    "the system has no root CA to check the server's certificate against{}: name \
                     the server's CA with sslrootcert",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )));
            }
            Ok(store)
        }
    }
}

fn load_root_file(path: &Path) -> Result<RootCertStore, ConfigError> {
    let named =
        |what: String| ConfigError::RootFile(format!("sslrootcert={}: {what}", path.display()));
    let pem = std::fs::read(path).map_err(|e| named(format!("cannot read it: {e}")))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| named(format!("not a PEM file of certificates: {e}")))?;
    if certificates.is_empty() {
        return Err(named("holds no certificate (BEGIN CERTIFICATE)".into()));
    }
    let mut store = RootCertStore::empty();
    for certificate in certificates {
        store
            .add(certificate)
            .map_err(|e| named(format!("a certificate in it cannot be a root CA: {e}")))?;
    }
    Ok(store)
}

/// The certificate checks rustls's stock verifier does not offer: the chain
/// without the host name (`roots`), or nothing at all (None). Either way the
/// handshake's signatures are checked against the certificate's key, so the
/// connection is encrypted to whoever holds that key.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What a failed handshake means, for the error that names the sslmode.
pub(super) fn describe(error: &rustls::Error, roots: &Roots) -> String {
    let rustls::Error::InvalidCertificate(refused) = error else {
        return format!("the TLS handshake failed: {error}");
    };
    match refused {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "the server's certificate is not valid for host {} (it is for {})",
            expected.to_str(),
            presented
                .iter()
                .map(|name| plain_name(name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        CertificateError::NotValidForName => {
            "the server's certificate is not valid for the host connected to".into()
        }
        CertificateError::UnknownIssuer => {
            format!("the server's certificate is not signed by any of {roots}")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the server's certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is not valid yet".into()
        }
        other => format!("the server's certificate was refused: {other}"),
    }
}

/// `localhost` for webpki's `DnsName("localhost")`, `127.0.0.1` for
/// `IpAddress(127.0.0.1)`; anything else as it is.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|name| name.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|name| name.strip_suffix(')'))
        })
        .unwrap_or(presented)
}
