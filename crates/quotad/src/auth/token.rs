//! Tokens: JWTs signed with EdDSA or ES256 (checked with public keys, each
//! chosen by the token's `kid`) or with HS256 (a shared key, for a single
//! box), the claims they carry, and the [`Caller`] a verified one names.
//! Pure: the time is passed in.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::keys::{check_public_key_ids, shown, KeyAlgorithm, KeyError, PublicKey, TokenSigner};

use quotad_core::{SchoolId, TeacherId};

/// Shortest signing key, in bytes. An HMAC key shorter than its hash output
/// (32 bytes for SHA-256) weakens it (RFC 7518, section 3.2).
pub const KEY_BYTES_MIN: usize = 32;
/// Longest `authorization` value read, in bytes: a bound on the work an
/// unauthenticated caller can cause before the signature is checked.
pub const HEADER_BYTES_MAX: usize = 16 * 1024;
/// Longest token subject, in bytes.
pub const SUBJECT_BYTES_MAX: usize = quotad_core::ids::ID_BYTES_MAX;
/// Most schools one service token may name.
pub const SCHOOLS_PER_TOKEN_MAX: usize = 256;

/// Why a token was refused, or could not be made. The messages say what is
/// wrong and never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no authorization metadata: send `authorization: Bearer <token>`")]
    Missing,
    #[error(
        "the authorization metadata is not a bearer token: send `authorization: Bearer <token>`"
    )]
    NotBearer,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("the token's signature does not match: it was signed with another key, or altered")]
    BadSignature,
    #[error("the token is unsigned (alg \"none\"): every token must be signed")]
    Unsigned,
    #[error("the token is signed with {algorithm}, but {accepted}")]
    WrongAlgorithm {
        /// The token's `alg`, quoted if printable.
        algorithm: String,
        /// What the key would have accepted.
        accepted: String,
    },
    #[error(
        "the token names no key id (kid): this server checks tokens with public keys, \
         each chosen by the kid in the token's header"
    )]
    MissingKeyId,
    #[error(
        "the token's key id (kid) {kid} is not one of this server's auth_public_keys: it was \
         signed by a key this server does not know, or by one it no longer accepts"
    )]
    UnknownKey {
        /// The token's `kid`, quoted if printable.
        kid: String,
    },
    #[error("the token expired at {expired_at_s} s since the epoch (now {now_s}); get a new one")]
    Expired { expired_at_s: u64, now_s: u64 },
    #[error("unknown role: expected admin, principal, teacher or service")]
    UnknownRole,
    #[error("the signing key is {key_bytes} bytes long; at least {min} are required", min = KEY_BYTES_MIN)]
    KeyTooShort { key_bytes: usize },
    #[error("cannot mint the token: {0}")]
    InvalidClaims(String),
    #[error("cannot sign the token: {0}")]
    Signing(String),
    #[error(
        "this server holds public keys only, which cannot mint tokens: mint with the private \
         key (`quotad token --private-key-file FILE --kid KID`)"
    )]
    PublicKeysOnly,
}

/// What a token lets its bearer be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs quotad: may do everything, for every school.
    Admin,
    /// Runs one school: its pools, allocations and requests.
    Principal,
    /// Reads their own usage, allocations, requests and history, and asks for more.
    Teacher,
    /// The AI proxy: meters usage on the gate, for the schools its token names.
    Service,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Principal, Role::Teacher, Role::Service];

    pub fn parse(value: &str) -> Result<Role, AuthError> {
        match value {
            "admin" => Ok(Role::Admin),
            "principal" => Ok(Role::Principal),
            "teacher" => Ok(Role::Teacher),
            "service" => Ok(Role::Service),
            _ => Err(AuthError::UnknownRole),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Principal => "principal",
            Role::Teacher => "teacher",
            Role::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Role, D::Error> {
        deserializer.deserialize_str(ParseVisitor {
            expecting: "a role",
            parse: |value| Role::parse(value).map_err(|e| e.to_string()),
        })
    }
}

/// Reads a string through a checking parser, with no intermediate `String`.
struct ParseVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> de::Visitor<'_> for ParseVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.parse)(value).map_err(E::custom)
    }
}

/// A school id read from a token, checked as it is read. (`SchoolId`'s own
/// `Deserialize` trusts its input: it reads what quotad itself wrote.)
struct CheckedSchoolId(SchoolId);

impl<'de> Deserialize<'de> for CheckedSchoolId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParseVisitor {
            expecting: "a school id",
            parse: |value| {
                SchoolId::parse(value)
                    .map(CheckedSchoolId)
                    .map_err(|e| e.to_string())
            },
        })
    }
}

fn deserialize_school<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SchoolId>, D::Error> {
    Ok(Option::<CheckedSchoolId>::deserialize(d)?.map(|school| school.0))
}

fn deserialize_schools<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SchoolId>, D::Error> {
    let schools = Vec::<CheckedSchoolId>::deserialize(d)?;
    Ok(schools.into_iter().map(|school| school.0).collect())
}

/// The claims of a quotad token. School ids are checked as they are read;
/// whether the claims fit the role is checked by `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who: a user id; for a teacher, their teacher id.
    pub sub: Arc<str>,
    pub role: Role,
    /// Principal and teacher: their school. Absent for the other roles.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_school"
    )]
    pub school_id: Option<SchoolId>,
    /// Service: the schools it may serve. Absent for the other roles.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "deserialize_schools"
    )]
    pub schools: Vec<SchoolId>,
    /// Expiry, seconds since the Unix epoch: the token is refused from this second on.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
}

impl Claims {
    /// The claims of a new token for `subject`, valid from `now_s` for `ttl`
    /// (whole seconds, at least one). `schools`: exactly one for a principal
    /// or teacher, 1 to [`SCHOOLS_PER_TOKEN_MAX`] for a service, none for an admin.
    pub(super) fn new(
        subject: &str,
        role: Role,
        schools: &[SchoolId],
        ttl: Duration,
        now_s: u64,
    ) -> Result<Claims, AuthError> {
        let invalid = |problem: String| AuthError::InvalidClaims(problem);
        if ttl.as_secs() == 0 {
            return Err(invalid("the ttl must be at least one second".to_owned()));
        }
        let exp = now_s
            .checked_add(ttl.as_secs())
            .ok_or_else(|| invalid("now + ttl overflows 64 bits of seconds".to_owned()))?;
        let (school_id, schools) = match (role, schools) {
            (Role::Admin, []) => (None, Vec::new()),
            (Role::Admin, _) => {
                return Err(invalid(
                    "an admin token names no schools: an admin may act on all".to_owned(),
                ))
            }
            (Role::Principal | Role::Teacher, [school]) => (Some(school.clone()), Vec::new()),
            (Role::Principal | Role::Teacher, _) => {
                return Err(invalid(format!(
                    "a {role} token names exactly one school; {} given",
                    schools.len()
                )))
            }
            (Role::Service, []) => {
                return Err(invalid(
                    "a service token names at least one school".to_owned(),
                ))
            }
            (Role::Service, _) => (None, schools.to_vec()),
        };
        let claims = Claims {
            sub: Arc::from(subject),
            role,
            school_id,
            schools,
            exp,
            iat: now_s,
        };
        claims.check().map_err(invalid)?;
        Ok(claims)
    }

    /// The rules that `mint` and `verify` share, so that a minted token always verifies.
    fn check(&self) -> Result<(), String> {
        check_subject(&self.sub)?;
        if self.iat > self.exp {
            return Err("it was issued after it expires (iat > exp)".to_owned());
        }
        let role = self.role;
        match (role, &self.school_id, self.schools.len()) {
            (Role::Admin, None, 0) => {}
            (Role::Admin, ..) => {
                return Err("an admin token must carry no school_id and no schools".to_owned())
            }
            (Role::Principal | Role::Teacher, Some(_), 0) => {}
            (Role::Principal | Role::Teacher, ..) => {
                return Err(format!(
                    "a {role} token must carry a school_id and no schools"
                ))
            }
            (Role::Service, None, 1..=SCHOOLS_PER_TOKEN_MAX) => {}
            (Role::Service, ..) => {
                return Err(format!(
                "a service token must carry 1 to {SCHOOLS_PER_TOKEN_MAX} schools and no school_id"
            ))
            }
        }
        if role == Role::Teacher {
            TeacherId::parse(&self.sub)
                .map_err(|e| format!("a teacher token's sub is their teacher id, but: {e}"))?;
        }
        Ok(())
    }
}

fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the sub claim is empty".to_owned());
    }
    if subject.len() > SUBJECT_BYTES_MAX {
        return Err(format!(
            "the sub claim is {} bytes long; at most {SUBJECT_BYTES_MAX} are allowed",
            subject.len()
        ));
    }
    if subject.chars().any(char::is_control) {
        return Err("the sub claim contains control characters".to_owned());
    }
    Ok(())
}

/// An authenticated caller, as its token describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`: a user id; for a teacher, their teacher id.
    pub subject: Arc<str>,
    pub role: Role,
    /// Principal and teacher: exactly their school. Service: the schools it
    /// serves. Admin: empty, meaning all.
    pub schools: Vec<SchoolId>,
}

impl Caller {
    /// The caller every request gets in `--insecure-dev` mode: an admin.
    pub fn dev() -> Caller {
        Caller {
            subject: Arc::from("dev"),
            role: Role::Admin,
            schools: Vec::new(),
        }
    }

    /// A teacher's own teacher id; `None` for the other roles.
    pub fn teacher_id(&self) -> Option<TeacherId> {
        if self.role != Role::Teacher {
            return None;
        }
        TeacherId::parse(&self.subject).ok()
    }

    /// Whether the token names this school (an admin's names none).
    /// Who the audit trail names for a change this caller makes: the token's
    /// subject. In `--insecure-dev` mode nobody is authenticated, so the
    /// client's own `changed_by` is taken (or "dev").
    pub fn author<'a>(&'a self, claimed: &'a str) -> &'a str {
        if *self == Caller::dev() && !claimed.is_empty() {
            claimed
        } else {
            &self.subject
        }
    }

    pub(super) fn names_school(&self, school: &SchoolId) -> bool {
        self.schools.contains(school)
    }

    pub(super) fn is_teacher(&self, teacher: Option<&TeacherId>) -> bool {
        teacher.is_some_and(|teacher| teacher.as_str() == &*self.subject)
    }

    fn from_claims(claims: Claims) -> Caller {
        let schools = match claims.school_id {
            Some(school) => vec![school],
            None => claims.schools,
        };
        Caller {
            subject: claims.sub,
            role: claims.role,
            schools,
        }
    }
}

/// Checks tokens, with public keys (EdDSA, ES256) or with one shared HS256
/// key, which also mints.
pub struct Authenticator {
    keys: VerifyingKeys,
    /// The shared key's signer; `None` with public keys, which cannot mint.
    signer: Option<TokenSigner>,
}

enum VerifyingKeys {
    /// One HS256 key; a token's `kid`, if any, is not looked at. (Boxed:
    /// the variants' sizes would differ tenfold.)
    Shared(Box<(DecodingKey, Validation)>),
    /// Each token names its key by `kid` and is checked with that key's
    /// algorithm alone. At most `PUBLIC_KEYS_MAX`: found by a linear search.
    Public(Vec<(PublicKey, Validation)>),
}

/// Never prints a key.
impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.keys {
            VerifyingKeys::Shared(_) => f.write_str("Authenticator { HS256, key: <redacted> }"),
            VerifyingKeys::Public(keys) => {
                let keys: Vec<&PublicKey> = keys.iter().map(|(key, _)| key).collect();
                write!(f, "Authenticator {{ public keys: {keys:?} }}")
            }
        }
    }
}

/// What quotad checks besides the signature: `exp` is required and compared
/// by `verify` with the time it is given, not by jsonwebtoken with the
/// system clock, so expiry is deterministic in tests. Only `algorithm`: a
/// token naming any other is refused before its signature is looked at.
fn validation(algorithm: KeyAlgorithm) -> Validation {
    let mut validation = Validation::new(algorithm.jwt());
    validation.validate_exp = false;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp"]);
    // `validate_aud` stays on: a token naming an audience was minted for
    // someone else, as quotad's tokens name none.
    validation
}

impl Authenticator {
    /// One shared HS256 key, which checks and mints: for a single box, since
    /// whatever can check a token can mint an admin one. Refuses a key
    /// shorter than [`KEY_BYTES_MIN`].
    pub fn new(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.len() < KEY_BYTES_MIN {
            return Err(AuthError::KeyTooShort {
                key_bytes: secret.len(),
            });
        }
        Ok(Authenticator {
            keys: VerifyingKeys::Shared(Box::new((
                DecodingKey::from_secret(secret),
                validation(KeyAlgorithm::Hs256),
            ))),
            signer: Some(TokenSigner::hs256(secret)),
        })
    }

    /// Public keys only (1 to `PUBLIC_KEYS_MAX`, distinct key ids): checks
    /// tokens, mints none.
    pub fn with_public_keys(keys: Vec<PublicKey>) -> Result<Self, KeyError> {
        let kids: Vec<&str> = keys.iter().map(PublicKey::kid).collect();
        check_public_key_ids(&kids)?;
        let keys = keys
            .into_iter()
            .map(|key| {
                let validation = validation(key.algorithm());
                (key, validation)
            })
            .collect();
        Ok(Authenticator {
            keys: VerifyingKeys::Public(keys),
            signer: None,
        })
    }

    /// A token for `subject` signed with the shared key (see
    /// [`TokenSigner::mint`]); refused with public keys, which cannot sign.
    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        schools: &[SchoolId],
        ttl: Duration,
        now_s: u64,
    ) -> Result<String, AuthError> {
        self.signer
            .as_ref()
            .ok_or(AuthError::PublicKeysOnly)?
            .mint(subject, role, schools, ttl, now_s)
    }

    /// The caller a `Bearer <token>` value names, if its signature is one of
    /// these keys', it has not expired at `now_s` (no leeway) and its claims fit its role.
    pub fn verify(&self, header_value: Option<&str>, now_s: u64) -> Result<Caller, AuthError> {
        self.verify_until(header_value, now_s)
            .map(|(caller, _)| caller)
    }

    /// [`Authenticator::verify`], and until when (`exp`) the answer holds.
    pub(super) fn verify_until(
        &self,
        header_value: Option<&str>,
        now_s: u64,
    ) -> Result<(Caller, u64), AuthError> {
        let token = bearer_token(header_value)?;
        let (decoding, validation) = self.key_for(&TokenHeader::read(token)?)?;
        let claims = jsonwebtoken::decode::<Claims>(token, decoding, validation)
            .map_err(from_jwt_error)?
            .claims;
        claims.check().map_err(AuthError::Malformed)?;
        // RFC 7519, section 4.1.4: the token is refused on or after `exp`.
        if now_s >= claims.exp {
            return Err(AuthError::Expired {
                expired_at_s: claims.exp,
                now_s,
            });
        }
        let exp = claims.exp;
        Ok((Caller::from_claims(claims), exp))
    }

    /// The key a token is checked with, and how: chosen by the token's `kid`
    /// among these keys alone (never a key the token carries, `jwk` or
    /// `x5c`), and only if the token's `alg` is that key's one algorithm. So
    /// an HS256 token "signed" with a public key as its secret is refused
    /// here, before any signature is computed (and jsonwebtoken refuses a
    /// key of another family again).
    fn key_for(&self, header: &TokenHeader) -> Result<(&DecodingKey, &Validation), AuthError> {
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::Unsigned);
        }
        match &self.keys {
            VerifyingKeys::Shared(key) => {
                if header.alg != KeyAlgorithm::Hs256.as_str() {
                    return Err(AuthError::WrongAlgorithm {
                        algorithm: shown(&header.alg, 16),
                        accepted: "this server accepts only HS256, with its shared key".to_owned(),
                    });
                }
                Ok((&key.0, &key.1))
            }
            VerifyingKeys::Public(keys) => {
                let public = [KeyAlgorithm::EdDsa, KeyAlgorithm::Es256];
                if !public.iter().any(|a| header.alg == a.as_str()) {
                    return Err(AuthError::WrongAlgorithm {
                        algorithm: shown(&header.alg, 16),
                        accepted: "this server accepts only EdDSA and ES256, checked with its \
                                   public keys"
                            .to_owned(),
                    });
                }
                let kid = header.kid.as_deref().ok_or(AuthError::MissingKeyId)?;
                let (key, validation) =
                    keys.iter()
                        .find(|(key, _)| key.kid() == kid)
                        .ok_or_else(|| AuthError::UnknownKey {
                            kid: shown(kid, super::keys::KID_BYTES_MAX),
                        })?;
                if header.alg != key.algorithm().as_str() {
                    return Err(key.wrong_algorithm(&header.alg));
                }
                Ok((key.decoding(), validation))
            }
        }
    }
}

/// What a token's header says about how it is signed, read before any key
/// is chosen. Other header fields are left to jsonwebtoken (which reads the
/// header again: once per token, as verified tokens are remembered).
#[derive(Deserialize)]
struct TokenHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Extensions the signer says must be understood (RFC 7515, 4.1.11):
    /// quotad understands none, so a token naming any is refused.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

impl TokenHeader {
    fn read(token: &str) -> Result<TokenHeader, AuthError> {
        let malformed = |problem: &str| AuthError::Malformed(problem.to_owned());
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("it is not three base64url parts joined by dots"));
        };
        let json = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| malformed("a part is not valid base64url"))?;
        let header: TokenHeader = serde_json::from_slice(&json)
            .map_err(|e| AuthError::Malformed(format!("its header: {e}")))?;
        if header.crit.is_some() {
            return Err(malformed(
                "its header names critical extensions (crit), which quotad does not implement",
            ));
        }
        Ok(header)
    }
}

/// The token in `Bearer <token>`; the scheme is case-insensitive (RFC 7235).
fn bearer_token(header_value: Option<&str>) -> Result<&str, AuthError> {
    let value = header_value.ok_or(AuthError::Missing)?;
    if value.len() > HEADER_BYTES_MAX {
        return Err(AuthError::Malformed(format!(
            "the authorization value is {} bytes long; at most {HEADER_BYTES_MAX} are read",
            value.len()
        )));
    }
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotBearer);
    }
    let token = token.trim_start();
    if token.is_empty() {
        return Err(AuthError::Malformed("the bearer token is empty".to_owned()));
    }
    Ok(token)
}

fn from_jwt_error(error: jsonwebtoken::errors::Error) -> AuthError {
    let malformed = |problem: &str| AuthError::Malformed(problem.to_owned());
    match error.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        // `key_for` has matched the token's algorithm to the key already.
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            malformed("its algorithm does not fit the key")
        }
        ErrorKind::InvalidToken => malformed("it is not three base64url parts joined by dots"),
        ErrorKind::Base64(_) => malformed("a part is not valid base64url"),
        ErrorKind::Utf8(_) => malformed("a part is not UTF-8"),
        // Reports the claim or header field that does not parse, and why.
        ErrorKind::Json(e) => AuthError::Malformed(format!("its header or claims: {e}")),
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Malformed(format!("the {claim} claim is missing"))
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::Malformed(format!("the {claim} claim is not a number of seconds"))
        }
        ErrorKind::InvalidAudience => malformed("it names an audience; quotad's tokens name none"),
        _ => AuthError::Malformed(error.to_string()),
    }
}
