//! The keys tokens are signed and checked with.
//!
//! Two kinds. **Public keys** (EdDSA with Ed25519, ES256 with P-256): quotad
//! holds only the public half of each, named by a key id (`kid`) that every
//! token carries in its header, so several can be accepted at once while one
//! replaces another; the private half stays wherever tokens are issued
//! (`quotad token --private-key-file`), and nothing quotad holds can mint a
//! token. **A shared HS256 key**: the same secret checks and mints, so
//! whoever can read it can mint an admin token; for a single box only.
//!
//! Keys are read from PEM text here and handed to jsonwebtoken as raw keys
//! (its own PEM reader would add two crates). Nothing here reads a file.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::{Deserialize, Serialize};

use super::token::{AuthError, Claims, Role};
use quotad_core::SchoolId;

/// Longest key id, in bytes.
pub const KID_BYTES_MAX: usize = 64;
/// Most public keys one server accepts: rotation needs two or three.
pub const PUBLIC_KEYS_MAX: usize = 16;

/// How a token is signed: each key signs with exactly one algorithm, and a
/// token is checked only with the algorithm of the key it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// HMAC-SHA256 with the shared key.
    Hs256,
    /// Ed25519 signatures.
    EdDsa,
    /// ECDSA on P-256 with SHA-256.
    Es256,
}

impl KeyAlgorithm {
    /// The name in a token's `alg` header (RFC 7518, RFC 8037).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Hs256 => "HS256",
            KeyAlgorithm::EdDsa => "EdDSA",
            KeyAlgorithm::Es256 => "ES256",
        }
    }

    pub(super) fn jwt(self) -> Algorithm {
        match self {
            KeyAlgorithm::Hs256 => Algorithm::HS256,
            KeyAlgorithm::EdDsa => Algorithm::EdDSA,
            KeyAlgorithm::Es256 => Algorithm::ES256,
        }
    }

    fn key_kind(self) -> &'static str {
        match self {
            KeyAlgorithm::Hs256 => "a shared HS256 key",
            KeyAlgorithm::EdDsa => "an Ed25519 key",
            KeyAlgorithm::Es256 => "a P-256 key",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the `auth_public_keys` setting: a key id and the PEM file
/// holding that key's public half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    /// The `kid` that tokens signed with this key carry.
    pub kid: String,
    /// `-----BEGIN PUBLIC KEY-----` (SubjectPublicKeyInfo), Ed25519 or P-256.
    pub file: PathBuf,
}

/// Why a key or a key id cannot be used. Never quotes key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the key id {0:?} is not 1 to {KID_BYTES_MAX} characters of A-Z, a-z, 0-9, '.', '_' or '-'"
    )]
    BadKid(String),
    #[error("the key id {0:?} is given twice")]
    DuplicateKid(String),
    #[error("{0} public keys are given; at most {PUBLIC_KEYS_MAX} are accepted")]
    TooManyKeys(usize),
    #[error("no public keys are given")]
    NoKeys,
    #[error(
        "this is a private key; quotad checks tokens with the public key alone and must never \
         hold the private one: give it `openssl pkey -in private.pem -pubout` instead"
    )]
    PrivateKeyGiven,
    #[error("this is a public key; minting a token needs the private key it belongs to")]
    PublicKeyGiven,
    #[error("an encrypted private key cannot be read: decrypt it with `openssl pkey` first")]
    Encrypted,
    #[error(
        "not an Ed25519 or P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`, as \
         `openssl pkey -pubout` writes); {0}"
    )]
    NotAPublicKey(&'static str),
    #[error(
        "not an Ed25519 or P-256 private key in PEM (PKCS#8 `-----BEGIN PRIVATE KEY-----`, as \
         `openssl genpkey` writes, or SEC1 `-----BEGIN EC PRIVATE KEY-----`); {0}"
    )]
    NotAPrivateKey(&'static str),
    #[error(
        "the Ed25519 public key is a weak (small-order) point, with which signatures can be forged"
    )]
    WeakKey,
}

/// A key id quotad accepts: short and printable, so that it can be named in
/// an error message as it is.
pub fn check_kid(kid: &str) -> Result<(), KeyError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if kid.is_empty() || kid.len() > KID_BYTES_MAX || !kid.chars().all(allowed) {
        return Err(KeyError::BadKid(kid.to_owned()));
    }
    Ok(())
}

/// The PEM block labelled `label` in `text`, BEGIN and END lines included.
/// (A file may hold more than one block: `openssl ecparam -genkey` writes
/// the curve's parameters before the key.)
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

/// The public half of a signing key, and the key id tokens name it by.
#[derive(Clone)]
pub struct PublicKey {
    kid: Arc<str>,
    algorithm: KeyAlgorithm,
    decoding: DecodingKey,
}

/// Names the key id and the algorithm, not the key.
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey {{ kid: {:?}, {} }}", self.kid, self.algorithm)
    }
}

impl PublicKey {
    /// Reads a PEM public key (SubjectPublicKeyInfo): Ed25519 signs with
    /// EdDSA, P-256 with ES256. Anything else (RSA, another curve, a private
    /// key, a certificate) is refused and said what it is not.
    pub fn from_pem(kid: &str, pem: &str) -> Result<PublicKey, KeyError> {
        check_kid(kid)?;
        let Some(block) = pem_block(pem, "PUBLIC KEY") else {
            if pem.contains("PRIVATE KEY-----") {
                return Err(KeyError::PrivateKeyGiven);
            }
            return Err(KeyError::NotAPublicKey("no such block was found"));
        };
        let (algorithm, decoding) =
            if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(block) {
                if key.is_weak() {
                    return Err(KeyError::WeakKey);
                }
                // jsonwebtoken's Ed25519 verifier takes the 32 raw bytes.
                (
                    KeyAlgorithm::EdDsa,
                    DecodingKey::from_ed_der(key.as_bytes()),
                )
            } else if let Ok(key) = p256::PublicKey::from_public_key_pem(block) {
                // Its ES256 verifier takes the SEC1 point; the curve checked it.
                let point = key.to_encoded_point(false);
                (
                    KeyAlgorithm::Es256,
                    DecodingKey::from_ec_der(point.as_bytes()),
                )
            } else {
                return Err(KeyError::NotAPublicKey(
                    "the block holds another kind of key (RSA and other curves are not accepted)",
                ));
            };
        Ok(PublicKey {
            kid: Arc::from(kid),
            algorithm,
            decoding,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub(super) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Why a token that names this key but `token_alg` is refused.
    pub(super) fn wrong_algorithm(&self, token_alg: &str) -> AuthError {
        AuthError::WrongAlgorithm {
            algorithm: shown(token_alg, 16),
            accepted: format!(
                "key {:?} is {} and accepts only {}",
                self.kid,
                self.algorithm.key_kind(),
                self.algorithm
            ),
        }
    }
}

/// Checks that `keys` can be accepted together: at least one, at most
/// [`PUBLIC_KEYS_MAX`], every key id valid and distinct.
pub fn check_public_key_ids(kids: &[&str]) -> Result<(), KeyError> {
    if kids.is_empty() {
        return Err(KeyError::NoKeys);
    }
    if kids.len() > PUBLIC_KEYS_MAX {
        return Err(KeyError::TooManyKeys(kids.len()));
    }
    for (i, kid) in kids.iter().enumerate() {
        check_kid(kid)?;
        if kids[..i].contains(kid) {
            return Err(KeyError::DuplicateKid((*kid).to_owned()));
        }
    }
    Ok(())
}

/// Mints tokens: with the shared HS256 key, or with a private key (EdDSA,
/// ES256) whose key id goes in every token's header.
pub struct TokenSigner {
    kid: Option<Arc<str>>,
    algorithm: KeyAlgorithm,
    encoding: EncodingKey,
}

/// Never prints the key.
impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TokenSigner {{ kid: {:?}, {}, key: <redacted> }}",
            self.kid, self.algorithm
        )
    }
}

impl TokenSigner {
    /// The shared key; its length is checked by `Authenticator::new`.
    pub(super) fn hs256(secret: &[u8]) -> TokenSigner {
        TokenSigner {
            kid: None,
            algorithm: KeyAlgorithm::Hs256,
            encoding: EncodingKey::from_secret(secret),
        }
    }

    /// Reads a PEM private key, Ed25519 (EdDSA) or P-256 (ES256), PKCS#8 or
    /// (P-256) SEC1, unencrypted. `kid` is the id quotad knows its public key by.
    pub fn from_private_key_pem(kid: &str, pem: &str) -> Result<TokenSigner, KeyError> {
        check_kid(kid)?;
        let (algorithm, pkcs8) = if let Some(block) = pem_block(pem, "PRIVATE KEY") {
            if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(block) {
                (KeyAlgorithm::EdDsa, key.to_pkcs8_der())
            } else if let Ok(key) = p256::SecretKey::from_pkcs8_pem(block) {
                (KeyAlgorithm::Es256, key.to_pkcs8_der())
            } else {
                return Err(KeyError::NotAPrivateKey(
                    "the block holds another kind of key (RSA and other curves are not accepted)",
                ));
            }
        } else if let Some(block) = pem_block(pem, "EC PRIVATE KEY") {
            let key = p256::SecretKey::from_sec1_pem(block)
                .map_err(|_| KeyError::NotAPrivateKey("the EC key is not on P-256 (prime256v1)"))?;
            (KeyAlgorithm::Es256, key.to_pkcs8_der())
        } else if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(KeyError::Encrypted);
        } else if pem.contains("PUBLIC KEY-----") {
            return Err(KeyError::PublicKeyGiven);
        } else {
            return Err(KeyError::NotAPrivateKey("no such block was found"));
        };
        // Re-encoding a key just read cannot fail but for memory; jsonwebtoken
        // takes PKCS#8 DER for both algorithms.
        let pkcs8 = pkcs8.map_err(|_| KeyError::NotAPrivateKey("it cannot be re-encoded"))?;
        let encoding = match algorithm {
            KeyAlgorithm::Es256 => EncodingKey::from_ec_der(pkcs8.as_bytes()),
            _ => EncodingKey::from_ed_der(pkcs8.as_bytes()),
        };
        Ok(TokenSigner {
            kid: Some(Arc::from(kid)),
            algorithm,
            encoding,
        })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The key id this signer puts in its tokens (none for HS256).
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// A token for `subject`, valid from `now_s` for `ttl` (whole seconds, at
    /// least one). `schools`: exactly one for a principal or teacher, 1 to
    /// `SCHOOLS_PER_TOKEN_MAX` for a service, none for an admin.
    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        schools: &[SchoolId],
        ttl: Duration,
        now_s: u64,
    ) -> Result<String, AuthError> {
        let claims = Claims::new(subject, role, schools, ttl, now_s)?;
        let mut header = Header::new(self.algorithm.jwt());
        header.kid = self.kid.as_deref().map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))
    }
}

/// `value` quoted when it is short and printable, so that an error message
/// can name what a caller sent without echoing arbitrary bytes.
pub(super) fn shown(value: &str, bytes_max: usize) -> String {
    if value.len() <= bytes_max && value.chars().all(|c| c.is_ascii_graphic()) {
        format!("{value:?}")
    } else {
        format!("an unprintable or overlong value ({} bytes)", value.len())
    }
}
