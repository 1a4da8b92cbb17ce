use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use quotad_core::{SchoolId, TeacherId};
use quotad_proto::BearerToken;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::interceptor::unix_now_s;
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
        assert_eq!(error, AuthError::Unsigned);
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
    let error = verify(&hs384, NOW_S).unwrap_err();
    assert!(
        matches!(&error, AuthError::WrongAlgorithm { algorithm, .. } if algorithm == "\"HS384\""),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "the token is signed with \"HS384\", but this server accepts only HS256, with its shared key"
    );
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
