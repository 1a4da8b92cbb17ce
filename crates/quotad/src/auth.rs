//! Who is calling, and may they do this?
//!
//! Every gRPC call carries `authorization: Bearer <token>`, a JWT signed with
//! HS256 and the key from the config. [`Authenticator::verify`] turns it into a
//! [`Caller`]; [`authorize`] decides, from the caller's role and schools alone,
//! whether an [`Action`] on a school (and teacher) is allowed. Both are pure:
//! the time is passed in, so expiry is tested without a clock, and neither
//! looks at stored data, so a refusal never tells whether another school's or
//! teacher's data exists.
//!
//! [`AuthInterceptor`] runs before every handler: it is the one place that
//! reads the clock, and it leaves the [`Caller`] in the request's extensions,
//! where handlers find it with [`caller`]. [`BearerToken`] is the client side.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

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
    #[error("the token is not signed with HS256, the only algorithm accepted")]
    WrongAlgorithm,
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
}

/// Every authentication failure is UNAUTHENTICATED: the caller should get a
/// valid token. (Only [`Authenticator::verify`] runs on requests; the key and
/// minting errors arise at startup or in tools, never from a client.)
impl From<AuthError> for Status {
    fn from(error: AuthError) -> Status {
        Status::unauthenticated(error.to_string())
    }
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

    fn names_school(&self, school: &SchoolId) -> bool {
        self.schools.contains(school)
    }

    fn is_teacher(&self, teacher: Option<&TeacherId>) -> bool {
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

/// Mints and verifies tokens with one HS256 key.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

/// Never prints the key.
impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authenticator { key: <redacted> }")
    }
}

impl Authenticator {
    /// Refuses a key shorter than [`KEY_BYTES_MIN`].
    pub fn new(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.len() < KEY_BYTES_MIN {
            return Err(AuthError::KeyTooShort {
                key_bytes: secret.len(),
            });
        }
        // Only HS256: a token naming any other algorithm (or "none") is refused
        // before its signature is looked at.
        let mut validation = Validation::new(Algorithm::HS256);
        // jsonwebtoken would compare `exp` with the system clock; `verify`
        // compares it with the time it is given instead, so expiry is
        // deterministic in tests. `exp` stays required.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        // `validate_aud` stays on: a token naming an audience was minted for
        // someone else, as quotad's tokens name none.
        Ok(Authenticator {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// A token for `subject`, valid from `now_s` for `ttl` (whole seconds, at
    /// least one). `schools`: exactly one for a principal or teacher, 1 to
    /// [`SCHOOLS_PER_TOKEN_MAX`] for a service, none for an admin.
    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        schools: &[SchoolId],
        ttl: Duration,
        now_s: u64,
    ) -> Result<String, AuthError> {
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
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))
    }

    /// The caller a `Bearer <token>` value names, if its signature is this
    /// key's, it has not expired at `now_s` (no leeway) and its claims fit its role.
    pub fn verify(&self, header_value: Option<&str>, now_s: u64) -> Result<Caller, AuthError> {
        self.verify_until(header_value, now_s)
            .map(|(caller, _)| caller)
    }

    /// [`Authenticator::verify`], and until when (`exp`) the answer holds.
    fn verify_until(
        &self,
        header_value: Option<&str>,
        now_s: u64,
    ) -> Result<(Caller, u64), AuthError> {
        let token = bearer_token(header_value)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
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
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
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

macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Every RPC of the service, to authorize.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Action {
            $($(#[$doc])* $name,)*
        }

        impl Action {
            /// Every action, in proto order (generated, so none is forgotten).
            pub const ALL: &'static [Action] = &[$(Action::$name,)*];

            /// The RPC's name, as in the proto.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Action::$name => stringify!($name),)*
                }
            }
        }
    };
}

actions! {
    // QuotaGate
    Consume,
    Check,
    Reserve,
    Commit,
    Release,
    GetUsage,
    SyncUsage,
    BulkIncrement,
    // QuotaAdmin
    CreateSchool,
    GetSchool,
    ListSchools,
    UpdateSchoolSettings,
    SetPool,
    SetAllocation,
    BulkSetAllocations,
    RemoveAllocation,
    SetAllocationStatus,
    ListAllocations,
    RequestIncrease,
    ApproveRequest,
    RejectRequest,
    ListRequests,
    ListHistory,
    VerifyHistory,
    GetUsageReport,
    GetUsageRollups,
    GetSuggestions,
    ListAlerts,
}

impl Action {
    /// The gate calls that meter usage: the service role's job alone.
    fn meters_usage(self) -> bool {
        matches!(
            self,
            Action::Consume
                | Action::Check
                | Action::Reserve
                | Action::Commit
                | Action::Release
                | Action::SyncUsage
                | Action::BulkIncrement
        )
    }

    fn is_gate(self) -> bool {
        self.meters_usage() || self == Action::GetUsage
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller may not do this. The reason says what the caller's role may do,
/// never what exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} is not allowed: {reason}")]
pub struct Denied {
    pub action: Action,
    pub reason: &'static str,
}

impl From<Denied> for Status {
    fn from(denied: Denied) -> Status {
        Status::permission_denied(denied.to_string())
    }
}

/// Whether `caller` may do `action` on `school` (and, for calls about one
/// teacher, `teacher`). For list calls whose teacher filter is optional, pass
/// the filter: `None` means every teacher. For calls not about one school
/// (`ListSchools`), `school` is not looked at: only an admin may make them.
/// For calls that span every school (`CreateSchool` of a new id is checked
/// with [`authorize`]; `ListSchools` here): only an admin may make them.
pub fn authorize_global(caller: &Caller, action: Action) -> Result<(), Denied> {
    match caller.role {
        Role::Admin => Ok(()),
        _ => Err(Denied {
            action,
            reason: "only an admin may list every school",
        }),
    }
}

pub fn authorize(
    caller: &Caller,
    action: Action,
    school: &SchoolId,
    teacher: Option<&TeacherId>,
) -> Result<(), Denied> {
    let refusal = match caller.role {
        Role::Admin => None,
        Role::Principal => principal_refusal(caller, action, school),
        Role::Teacher => teacher_refusal(caller, action, school, teacher),
        Role::Service => service_refusal(caller, action, school),
    };
    match refusal {
        None => Ok(()),
        Some(reason) => Err(Denied { action, reason }),
    }
}

fn principal_refusal(caller: &Caller, action: Action, school: &SchoolId) -> Option<&'static str> {
    if matches!(action, Action::CreateSchool | Action::ListSchools) {
        return Some("only an admin may create or list schools");
    }
    if action.meters_usage() {
        return Some(
            "a principal may not consume, check, reserve, commit, release or sync units; \
             only the service role may",
        );
    }
    if !caller.names_school(school) {
        return Some("a principal may only act on their own school");
    }
    None
}

fn teacher_refusal(
    caller: &Caller,
    action: Action,
    school: &SchoolId,
    teacher: Option<&TeacherId>,
) -> Option<&'static str> {
    let reason = match action {
        Action::GetUsage | Action::GetUsageReport | Action::GetUsageRollups => {
            "a teacher may only read their own usage"
        }
        Action::ListAllocations => "a teacher may only read their own allocations",
        Action::RequestIncrease => "a teacher may only request increases for themselves",
        Action::ListRequests => "a teacher may only list their own requests",
        Action::ListHistory => "a teacher may only read their own history",
        _ => {
            return Some(
                "a teacher may only read their own usage, allocations, requests and history, \
                 and request increases",
            )
        }
    };
    let own = caller.names_school(school) && caller.is_teacher(teacher);
    (!own).then_some(reason)
}

fn service_refusal(caller: &Caller, action: Action, school: &SchoolId) -> Option<&'static str> {
    if !action.is_gate() {
        return Some(
            "the service role may only call the quota gate: \
             Consume, Check, Reserve, Commit, Release, SyncUsage, BulkIncrement and GetUsage",
        );
    }
    if !caller.names_school(school) {
        return Some("the service role may only act for the schools its token names");
    }
    None
}

/// How the server authenticates.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Every call is [`Caller::dev`], whatever it sends. For local development only.
    InsecureDev,
    /// Every call needs a token signed with this key.
    Key(Arc<Authenticator>),
}

/// Authenticates every call before its handler runs and leaves the
/// [`Caller`] in the request's extensions. A refused token ends the call with
/// UNAUTHENTICATED. On the hot path: one HS256 check, no I/O.
///
/// A proxy sends the same token with every call, so tokens that verified are
/// remembered (by their exact text, until they expire): checking a signature
/// and parsing JSON on every call cost more than the quota decision itself.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    mode: AuthMode,
    verified: Arc<DashMap<Box<str>, (Caller, u64)>>,
}

/// Verified tokens remembered at most; beyond it the memory starts over.
const VERIFIED_TOKENS_MAX: usize = 4096;

impl AuthInterceptor {
    pub fn new(mode: AuthMode) -> Self {
        AuthInterceptor {
            mode,
            verified: Arc::default(),
        }
    }

    fn verify(
        &self,
        authenticator: &Authenticator,
        header_value: Option<&str>,
        now_s: u64,
    ) -> Result<Caller, AuthError> {
        if let Some(value) = header_value {
            if let Some(hit) = self.verified.get(value) {
                let (caller, exp) = hit.value();
                if now_s < *exp {
                    return Ok(caller.clone());
                }
            }
        }
        let (caller, exp) = authenticator.verify_until(header_value, now_s)?;
        if let Some(value) = header_value {
            if self.verified.len() >= VERIFIED_TOKENS_MAX {
                self.verified.clear();
            }
            self.verified
                .insert(Box::from(value), (caller.clone(), exp));
        }
        Ok(caller)
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.mode {
            AuthMode::InsecureDev => Caller::dev(),
            AuthMode::Key(authenticator) => {
                let header_value = match request.metadata().get("authorization") {
                    None => None,
                    Some(value) => Some(value.to_str().map_err(|_| {
                        AuthError::Malformed(
                            "the authorization value is not visible ASCII".to_owned(),
                        )
                    })?),
                };
                self.verify(authenticator, header_value, unix_now_s()?)?
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The one place authentication reads the clock.
fn unix_now_s() -> Result<u64, Status> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| since_epoch.as_secs())
        .map_err(|_| Status::internal("the system clock is before 1970: cannot check token expiry"))
}

/// The caller the [`AuthInterceptor`] left on this request.
pub fn caller<T>(request: &Request<T>) -> Result<&Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::internal("no caller: the auth interceptor is not installed"))
}

/// A client-side interceptor that sends `authorization: Bearer <token>` with
/// every call. The value is marked sensitive, so HTTP/2 never indexes it.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

/// Never prints the token.
impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, AuthError> {
        let not_sendable = || {
            AuthError::Malformed(
                "a bearer token is a non-empty run of visible ASCII characters".to_owned(),
            )
        };
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(not_sendable());
        }
        let mut value =
            AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| not_sendable())?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 bytes: the shortest key accepted.
    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW_S: u64 = 1_750_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn school(id: &str) -> SchoolId {
        SchoolId::parse(id).unwrap()
    }

    fn teacher(id: &str) -> TeacherId {
        TeacherId::parse(id).unwrap()
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(KEY).unwrap()
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn verify(token: &str, now_s: u64) -> Result<Caller, AuthError> {
        authenticator().verify(Some(&bearer(token)), now_s)
    }

    /// Signs any claims with the right key and HS256, to build tokens `mint` refuses to make.
    fn sign_raw(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(KEY);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn is_malformed_about(result: Result<Caller, AuthError>, words: &str) -> bool {
        matches!(result, Err(AuthError::Malformed(m)) if m.contains(words))
    }

    #[test]
    fn every_role_round_trips() {
        let auth = authenticator();
        let cases = [
            ("root", Role::Admin, vec![]),
            ("p-1", Role::Principal, vec![school("A")]),
            ("t1", Role::Teacher, vec![school("A")]),
            ("proxy", Role::Service, vec![school("A"), school("B")]),
        ];
        for (subject, role, schools) in cases {
            let token = auth.mint(subject, role, &schools, HOUR, NOW_S).unwrap();
            let caller = auth.verify(Some(&bearer(&token)), NOW_S).unwrap();
            assert_eq!(
                caller,
                Caller {
                    subject: Arc::from(subject),
                    role,
                    schools
                }
            );
            let expected_teacher = (role == Role::Teacher).then(|| teacher(subject));
            assert_eq!(caller.teacher_id(), expected_teacher);
        }
    }

    #[test]
    fn roles_parse_and_print() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Ok(role));
        }
        assert_eq!(Role::parse("Admin"), Err(AuthError::UnknownRole));
        assert_eq!(Role::parse("root"), Err(AuthError::UnknownRole));
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let token = authenticator()
            .mint("root", Role::Admin, &[], HOUR, NOW_S)
            .unwrap();
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let value = format!("{scheme}  {token}");
            assert!(authenticator().verify(Some(&value), NOW_S).is_ok());
        }
    }

    #[test]
    fn a_token_expires_at_exp_with_no_leeway() {
        let token = authenticator()
            .mint("root", Role::Admin, &[], Duration::from_secs(60), NOW_S)
            .unwrap();
        assert!(verify(&token, NOW_S).is_ok());
        assert!(verify(&token, NOW_S + 59).is_ok());
        let expired = AuthError::Expired {
            expired_at_s: NOW_S + 60,
            now_s: NOW_S + 60,
        };
        assert_eq!(verify(&token, NOW_S + 60), Err(expired));
        assert!(matches!(
            verify(&token, NOW_S + 10_000),
            Err(AuthError::Expired { .. })
        ));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let other = Authenticator::new(b"another key that is 32 bytes lng").unwrap();
        let token = other.mint("root", Role::Admin, &[], HOUR, NOW_S).unwrap();
        let error = verify(&token, NOW_S).unwrap_err();
        assert_eq!(error, AuthError::BadSignature);
        assert!(!error.to_string().contains(&token));
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let auth = authenticator();
        let teacher_token = auth
            .mint("t1", Role::Teacher, &[school("A")], HOUR, NOW_S)
            .unwrap();
        let admin_token = auth.mint("t1", Role::Admin, &[], HOUR, NOW_S).unwrap();
        // The admin claims under the teacher token's signature.
        let teacher_parts: Vec<&str> = teacher_token.split('.').collect();
        let admin_parts: Vec<&str> = admin_token.split('.').collect();
        let forged = [teacher_parts[0], admin_parts[1], teacher_parts[2]].join(".");
        assert_eq!(verify(&forged, NOW_S), Err(AuthError::BadSignature));
    }

    #[test]
    fn only_hs256_is_accepted() {
        let token = authenticator()
            .mint("root", Role::Admin, &[], HOUR, NOW_S)
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        // base64url of {"alg":"none","typ":"JWT"}.
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        for forged in [
            format!("{none_header}.{}.", parts[1]),
            format!("{none_header}.{}.{}", parts[1], parts[2]),
        ] {
            let error = verify(&forged, NOW_S).unwrap_err();
            assert!(matches!(error, AuthError::Malformed(_)), "{error:?}");
            assert!(!error.to_string().contains(&forged));
        }
        let claims =
            serde_json::json!({"sub": "root", "role": "admin", "exp": NOW_S + 60, "iat": NOW_S});
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(KEY),
        )
        .unwrap();
        assert_eq!(verify(&hs384, NOW_S), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn the_header_must_be_a_bearer_token() {
        let auth = authenticator();
        let token = auth.mint("root", Role::Admin, &[], HOUR, NOW_S).unwrap();
        assert_eq!(auth.verify(None, NOW_S), Err(AuthError::Missing));
        assert_eq!(auth.verify(Some(&token), NOW_S), Err(AuthError::NotBearer));
        let basic = format!("Basic {token}");
        assert_eq!(auth.verify(Some(&basic), NOW_S), Err(AuthError::NotBearer));
        assert!(matches!(
            auth.verify(Some("Bearer  "), NOW_S),
            Err(AuthError::NotBearer | AuthError::Malformed(_))
        ));
        assert!(is_malformed_about(
            auth.verify(Some("Bearer not-a-jwt"), NOW_S),
            "three base64url parts"
        ));
        let huge = bearer(&"a".repeat(HEADER_BYTES_MAX));
        assert!(is_malformed_about(
            auth.verify(Some(&huge), NOW_S),
            "bytes long"
        ));
    }

    #[test]
    fn claims_must_fit_the_role() {
        let exp = NOW_S + 60;
        let cases = [
            (
                serde_json::json!({"sub": "x", "role": "superuser", "exp": exp, "iat": NOW_S}),
                "unknown role",
            ),
            (
                serde_json::json!({"sub": "t1", "role": "teacher", "exp": exp, "iat": NOW_S}),
                "teacher token",
            ),
            (
                serde_json::json!({"sub": "p", "role": "principal", "schools": ["A"], "exp": exp, "iat": NOW_S}),
                "principal token",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "school_id": "A", "exp": exp, "iat": NOW_S}),
                "admin token",
            ),
            (
                serde_json::json!({"sub": "x", "role": "service", "exp": exp, "iat": NOW_S}),
                "service token",
            ),
            (
                serde_json::json!({"sub": "x", "role": "service", "schools": [], "exp": exp, "iat": NOW_S}),
                "service token",
            ),
            (
                serde_json::json!({"sub": "x", "role": "service", "schools": ["A", "b c"], "exp": exp, "iat": NOW_S}),
                "school_id",
            ),
            (
                serde_json::json!({"sub": "a teacher", "role": "teacher", "school_id": "A", "exp": exp, "iat": NOW_S}),
                "teacher id",
            ),
            (
                serde_json::json!({"sub": "", "role": "admin", "exp": exp, "iat": NOW_S}),
                "sub claim is empty",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "iat": NOW_S}),
                "missing field `exp`",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "exp": "soon", "iat": NOW_S}),
                "invalid type: string \"soon\", expected u64",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "exp": exp}),
                "missing field `iat`",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "exp": exp, "iat": exp + 1}),
                "iat > exp",
            ),
            (
                serde_json::json!({"sub": "x", "role": "admin", "aud": "other", "exp": exp, "iat": NOW_S}),
                "audience",
            ),
        ];
        for (claims, problem) in cases {
            let result = verify(&sign_raw(claims.clone()), NOW_S);
            assert!(
                is_malformed_about(result.clone(), problem),
                "{claims}: {result:?}"
            );
        }
    }

    #[test]
    fn short_keys_are_refused() {
        let error = Authenticator::new(&[7; 31]).unwrap_err();
        assert_eq!(error, AuthError::KeyTooShort { key_bytes: 31 });
        assert!(error.to_string().contains("at least 32"));
        assert!(Authenticator::new(&[]).is_err());
        assert!(Authenticator::new(&[7; 32]).is_ok());
    }

    #[test]
    fn mint_refuses_schools_that_do_not_fit_the_role() {
        let auth = authenticator();
        let (a, b) = (school("A"), school("B"));
        let refused = [
            ("root", Role::Admin, vec![a.clone()]),
            ("p", Role::Principal, vec![]),
            ("p", Role::Principal, vec![a.clone(), b.clone()]),
            ("t1", Role::Teacher, vec![]),
            ("not a teacher id", Role::Teacher, vec![a.clone()]),
            ("proxy", Role::Service, vec![]),
            (
                "proxy",
                Role::Service,
                vec![a.clone(); SCHOOLS_PER_TOKEN_MAX + 1],
            ),
            ("", Role::Admin, vec![]),
        ];
        for (subject, role, schools) in refused {
            let result = auth.mint(subject, role, &schools, HOUR, NOW_S);
            assert!(
                matches!(result, Err(AuthError::InvalidClaims(_))),
                "{subject} {role} {schools:?}: {result:?}"
            );
        }
        let no_ttl = auth.mint("root", Role::Admin, &[], Duration::from_millis(999), NOW_S);
        assert!(matches!(no_ttl, Err(AuthError::InvalidClaims(_))));
        let overflow = auth.mint("root", Role::Admin, &[], HOUR, u64::MAX);
        assert!(matches!(overflow, Err(AuthError::InvalidClaims(_))));
    }

    #[test]
    fn errors_become_statuses() {
        let status = Status::from(AuthError::BadSignature);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let denied = Denied {
            action: Action::SetPool,
            reason: "a principal may only act on their own school",
        };
        let status = Status::from(denied);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "SetPool is not allowed: a principal may only act on their own school"
        );
    }

    const Y: bool = true;
    const N: bool = false;

    /// Whether each caller may do each action on school A about teacher t1.
    /// Columns, as in `matrix_callers`: admin, principal of A, principal of B,
    /// teacher t1 of A, teacher t2 of A, service for [A], service for [B].
    /// (Y: allowed, N: denied.)
    #[rustfmt::skip]
    const MATRIX: [(Action, [bool; 7]); 28] = [
        //                              ad pA pB t1 t2 sA sB
        (Action::Consume,              [Y, N, N, N, N, Y, N]),
        (Action::Check,                [Y, N, N, N, N, Y, N]),
        (Action::Reserve,              [Y, N, N, N, N, Y, N]),
        (Action::Commit,               [Y, N, N, N, N, Y, N]),
        (Action::Release,              [Y, N, N, N, N, Y, N]),
        (Action::GetUsage,             [Y, Y, N, Y, N, Y, N]),
        (Action::SyncUsage,            [Y, N, N, N, N, Y, N]),
        (Action::BulkIncrement,        [Y, N, N, N, N, Y, N]),
        (Action::CreateSchool,         [Y, N, N, N, N, N, N]),
        (Action::GetSchool,            [Y, Y, N, N, N, N, N]),
        (Action::ListSchools,          [Y, N, N, N, N, N, N]),
        (Action::UpdateSchoolSettings, [Y, Y, N, N, N, N, N]),
        (Action::SetPool,              [Y, Y, N, N, N, N, N]),
        (Action::SetAllocation,        [Y, Y, N, N, N, N, N]),
        (Action::BulkSetAllocations,   [Y, Y, N, N, N, N, N]),
        (Action::RemoveAllocation,     [Y, Y, N, N, N, N, N]),
        (Action::SetAllocationStatus,  [Y, Y, N, N, N, N, N]),
        (Action::ListAllocations,      [Y, Y, N, Y, N, N, N]),
        (Action::RequestIncrease,      [Y, Y, N, Y, N, N, N]),
        (Action::ApproveRequest,       [Y, Y, N, N, N, N, N]),
        (Action::RejectRequest,        [Y, Y, N, N, N, N, N]),
        (Action::ListRequests,         [Y, Y, N, Y, N, N, N]),
        (Action::ListHistory,          [Y, Y, N, Y, N, N, N]),
        (Action::VerifyHistory,        [Y, Y, N, N, N, N, N]),
        (Action::GetUsageReport,       [Y, Y, N, Y, N, N, N]),
        (Action::GetUsageRollups,      [Y, Y, N, Y, N, N, N]),
        (Action::GetSuggestions,       [Y, Y, N, N, N, N, N]),
        (Action::ListAlerts,           [Y, Y, N, N, N, N, N]),
    ];

    fn matrix_callers() -> [Caller; 7] {
        let caller = |subject: &str, role, schools: &[&str]| Caller {
            subject: Arc::from(subject),
            role,
            schools: schools.iter().map(|id| school(id)).collect(),
        };
        [
            caller("root", Role::Admin, &[]),
            caller("pa", Role::Principal, &["A"]),
            caller("pb", Role::Principal, &["B"]),
            caller("t1", Role::Teacher, &["A"]),
            caller("t2", Role::Teacher, &["A"]),
            caller("proxy-a", Role::Service, &["A"]),
            caller("proxy-b", Role::Service, &["B"]),
        ]
    }

    #[test]
    fn the_matrix_covers_every_action_once() {
        let actions: Vec<Action> = MATRIX.iter().map(|(action, _)| *action).collect();
        assert_eq!(actions, Action::ALL);
    }

    #[test]
    fn authorization_matrix() {
        let (a, t1) = (school("A"), teacher("t1"));
        let callers = matrix_callers();
        for (action, expected) in MATRIX {
            for (caller, allowed) in callers.iter().zip(expected) {
                let result = authorize(caller, action, &a, Some(&t1));
                assert_eq!(
                    result.is_ok(),
                    allowed,
                    "{} {} on A/t1: {result:?}",
                    caller.subject,
                    action
                );
            }
        }
    }

    #[test]
    fn a_teacher_may_not_list_every_teacher() {
        let t1 = &matrix_callers()[3];
        for action in [
            Action::GetUsage,
            Action::ListAllocations,
            Action::RequestIncrease,
            Action::ListRequests,
            Action::ListHistory,
            Action::GetUsageReport,
            Action::GetUsageRollups,
        ] {
            assert!(
                authorize(t1, action, &school("A"), None).is_err(),
                "{action}"
            );
            // Their own teacher id in another school is not theirs.
            let elsewhere = authorize(t1, action, &school("B"), Some(&teacher("t1")));
            assert!(elsewhere.is_err(), "{action}");
        }
        let denied = authorize(
            t1,
            Action::ListAllocations,
            &school("A"),
            Some(&teacher("t2")),
        );
        assert_eq!(
            denied.unwrap_err().reason,
            "a teacher may only read their own allocations"
        );
    }

    #[test]
    fn a_refusal_names_no_other_tenant() {
        let principal_b = &matrix_callers()[2];
        let denied = authorize(principal_b, Action::SetPool, &school("A"), None).unwrap_err();
        // The same words whether or not school A exists, and without its id.
        assert_eq!(
            denied.to_string(),
            "SetPool is not allowed: a principal may only act on their own school"
        );
    }

    #[test]
    fn a_service_may_serve_several_schools() {
        let service = Caller {
            subject: Arc::from("proxy"),
            role: Role::Service,
            schools: vec![school("A"), school("B")],
        };
        for id in ["A", "B"] {
            assert!(authorize(&service, Action::Consume, &school(id), Some(&teacher("t"))).is_ok());
        }
        assert!(authorize(&service, Action::Consume, &school("C"), Some(&teacher("t"))).is_err());
        assert!(authorize(&service, Action::GetSchool, &school("A"), None).is_err());
    }

    #[test]
    fn the_interceptor_leaves_the_caller_on_the_request() {
        let now_s = unix_now_s().unwrap();
        let auth = Arc::new(authenticator());
        let token = auth
            .mint("t1", Role::Teacher, &[school("A")], HOUR, now_s)
            .unwrap();
        let mut interceptor = AuthInterceptor::new(AuthMode::Key(auth));
        let mut client = BearerToken::new(&token).unwrap();

        let request = client.call(Request::new(())).unwrap();
        let request = interceptor.call(request).unwrap();
        let caller = caller(&request).unwrap();
        assert_eq!(caller.role, Role::Teacher);
        assert_eq!(caller.teacher_id(), Some(teacher("t1")));

        let refused = interceptor.call(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), AuthError::Missing.to_string());
    }

    #[test]
    fn insecure_dev_mode_makes_every_caller_an_admin() {
        let mut interceptor = AuthInterceptor::new(AuthMode::InsecureDev);
        let request = interceptor.call(Request::new(())).unwrap();
        assert_eq!(caller(&request).unwrap(), &Caller::dev());
        assert_eq!(Caller::dev().role, Role::Admin);
        assert_eq!(&*Caller::dev().subject, "dev");
    }

    #[test]
    fn a_handler_without_the_interceptor_fails_loudly() {
        let status = caller(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status
            .message()
            .contains("auth interceptor is not installed"));
    }

    #[test]
    fn bearer_tokens_must_be_sendable() {
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("a b").is_err());
        assert!(BearerToken::new("caf\u{e9}").is_err());
        let token = BearerToken::new("abc.def.ghi").unwrap();
        assert!(token.0.is_sensitive());
        assert_eq!(format!("{token:?}"), "BearerToken(<redacted>)");
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let authenticator = Arc::new(Authenticator::new(KEY_FOR_CACHE_TEST).unwrap());
        let interceptor = AuthInterceptor::new(AuthMode::Key(authenticator.clone()));
        let now_s = 1_800_000_000;
        let token = authenticator
            .mint(
                "pa",
                Role::Principal,
                &[SchoolId::parse("a").unwrap()],
                Duration::from_secs(60),
                now_s,
            )
            .unwrap();
        let header = format!("Bearer {token}");
        let first = interceptor
            .verify(&authenticator, Some(&header), now_s)
            .unwrap();
        assert_eq!(interceptor.verified.len(), 1);
        let again = interceptor
            .verify(&authenticator, Some(&header), now_s + 59)
            .unwrap();
        assert_eq!(first, again);
        let late = interceptor.verify(&authenticator, Some(&header), now_s + 60);
        assert!(matches!(late, Err(AuthError::Expired { .. })), "{late:?}");
        // A token that differs by one character is not the remembered one.
        let mut forged = header.clone();
        forged.push('x');
        assert!(interceptor
            .verify(&authenticator, Some(&forged), now_s)
            .is_err());
    }

    const KEY_FOR_CACHE_TEST: &[u8] = b"a key of thirty-two bytes or more, for tests";
}
