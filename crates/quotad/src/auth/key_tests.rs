//! Public-key tokens: EdDSA and ES256, keys chosen by `kid`, and every way a
//! token signed otherwise is refused. Keys are made from fixed bytes, so the
//! tests need no randomness.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::LineEnding;
use quotad_core::SchoolId;

use super::*;

const NOW_S: u64 = 1_750_000_000;
const HOUR: Duration = Duration::from_secs(3600);

/// An Ed25519 key pair made from `seed`: (private PKCS#8 PEM, public PEM).
fn ed25519_pems(seed: u8) -> (String, String) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    (private, public)
}

/// A P-256 key pair made from `seed`: (private PKCS#8 PEM, public PEM).
fn p256_pems(seed: u8) -> (String, String) {
    let key = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    (private, public)
}

fn signer(kid: &str, private_pem: &str) -> TokenSigner {
    TokenSigner::from_private_key_pem(kid, private_pem).unwrap()
}

fn public(kid: &str, public_pem: &str) -> PublicKey {
    PublicKey::from_pem(kid, public_pem).unwrap()
}

/// quotad with an Ed25519 key "ed-1" and a P-256 key "ec-1" (seeds 1 and 2).
fn authenticator() -> Authenticator {
    Authenticator::with_public_keys(vec![
        public("ed-1", &ed25519_pems(1).1),
        public("ec-1", &p256_pems(2).1),
    ])
    .unwrap()
}

fn admin_token(signer: &TokenSigner) -> String {
    signer.mint("root", Role::Admin, &[], HOUR, NOW_S).unwrap()
}

fn verify_with(auth: &Authenticator, token: &str) -> Result<Caller, AuthError> {
    auth.verify(Some(&format!("Bearer {token}")), NOW_S)
}

fn claims() -> serde_json::Value {
    serde_json::json!({"sub": "root", "role": "admin", "exp": NOW_S + 60, "iat": NOW_S})
}

/// A token with this header (as JSON) over the usual claims, and `signature`.
fn with_header(header: serde_json::Value, signature: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(header.to_string());
    let claims = URL_SAFE_NO_PAD.encode(claims().to_string());
    format!("{header}.{claims}.{signature}")
}

#[test]
fn eddsa_and_es256_tokens_are_checked_with_the_key_their_kid_names() {
    let auth = authenticator();
    let school = SchoolId::parse("oak").unwrap();
    for (kid, private, algorithm) in [
        ("ed-1", ed25519_pems(1).0, KeyAlgorithm::EdDsa),
        ("ec-1", p256_pems(2).0, KeyAlgorithm::Es256),
    ] {
        let signer = signer(kid, &private);
        assert_eq!(signer.algorithm(), algorithm);
        assert_eq!(signer.kid(), Some(kid));
        let token = signer
            .mint(
                "p-1",
                Role::Principal,
                std::slice::from_ref(&school),
                HOUR,
                NOW_S,
            )
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid));
        assert_eq!(header.alg, algorithm.jwt());
        let caller = verify_with(&auth, &token).unwrap();
        assert_eq!(caller.role, Role::Principal);
        assert_eq!(caller.schools, std::slice::from_ref(&school));
        assert!(matches!(
            auth.verify(Some(&format!("Bearer {token}")), NOW_S + 3600),
            Err(AuthError::Expired { .. })
        ));
    }
}

#[test]
fn a_sec1_p256_private_key_signs_too() {
    let key = p256::SecretKey::from_slice(&[2; 32]).unwrap();
    // As `openssl ecparam -genkey` writes it: the curve's parameters first.
    let sec1 = format!(
        "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
        key.to_sec1_pem(LineEnding::LF).unwrap().as_str()
    );
    let signer = signer("ec-1", &sec1);
    assert_eq!(signer.algorithm(), KeyAlgorithm::Es256);
    assert!(verify_with(&authenticator(), &admin_token(&signer)).is_ok());
}

#[test]
fn a_token_signed_by_a_key_quotad_does_not_know_is_refused() {
    let auth = authenticator();
    // Another private key under a kid quotad knows: the signature does not match.
    for (kid, private) in [("ed-1", ed25519_pems(9).0), ("ec-1", p256_pems(9).0)] {
        let error = verify_with(&auth, &admin_token(&signer(kid, &private))).unwrap_err();
        assert_eq!(error, AuthError::BadSignature, "{kid}");
    }
    // Under a kid quotad does not know.
    let error = verify_with(&auth, &admin_token(&signer("ed-2", &ed25519_pems(9).0))).unwrap_err();
    assert_eq!(
        error,
        AuthError::UnknownKey {
            kid: "\"ed-2\"".into()
        }
    );
    assert!(
        error
            .to_string()
            .contains("not one of this server's auth_public_keys"),
        "{error}"
    );
    // With no kid at all.
    let unnamed = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims(),
        &EncodingKey::from_ed_der(
            ed25519_dalek::SigningKey::from_bytes(&[1; 32])
                .to_pkcs8_der()
                .unwrap()
                .as_bytes(),
        ),
    )
    .unwrap();
    assert_eq!(verify_with(&auth, &unnamed), Err(AuthError::MissingKeyId));
}

#[test]
fn a_kid_that_is_not_printable_is_not_echoed() {
    let auth = authenticator();
    for kid in ["ed 1\n", &"k".repeat(KID_BYTES_MAX + 1)] {
        let token = with_header(serde_json::json!({"alg": "EdDSA", "kid": kid}), "c2ln");
        let error = verify_with(&auth, &token).unwrap_err();
        assert!(matches!(error, AuthError::UnknownKey { .. }), "{error:?}");
        assert!(!error.to_string().contains(kid), "{error}");
        assert!(
            error.to_string().contains("unprintable or overlong"),
            "{error}"
        );
    }
}

#[test]
fn a_token_must_use_the_algorithm_of_the_key_it_names() {
    let auth = authenticator();
    // Signed with a P-256 key but naming the Ed25519 key's kid, and the reverse.
    for (kid, private, expected) in [
        (
            "ed-1",
            p256_pems(2).0,
            "key \"ed-1\" is an Ed25519 key and accepts only EdDSA",
        ),
        (
            "ec-1",
            ed25519_pems(1).0,
            "key \"ec-1\" is a P-256 key and accepts only ES256",
        ),
    ] {
        let error = verify_with(&auth, &admin_token(&signer(kid, &private))).unwrap_err();
        let AuthError::WrongAlgorithm { accepted, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(accepted, expected);
    }
    // And the shared-key server takes no public-key token.
    let shared = Authenticator::new(b"0123456789abcdef0123456789abcdef").unwrap();
    let error = verify_with(&shared, &admin_token(&signer("ed-1", &ed25519_pems(1).0)));
    assert!(
        matches!(&error, Err(AuthError::WrongAlgorithm { algorithm, .. }) if algorithm == "\"EdDSA\""),
        "{error:?}"
    );
}

/// The classic confusion: a verifier that takes the token's `alg` at its
/// word would check an HS256 token with the public key's bytes as the HMAC
/// secret, and anyone can compute that.
#[test]
fn an_hs256_token_made_with_a_public_key_as_the_secret_is_refused() {
    let auth = authenticator();
    let (_, ed_public) = ed25519_pems(1);
    let (_, ec_public) = p256_pems(2);
    let ed_raw = ed25519_dalek::SigningKey::from_bytes(&[1; 32])
        .verifying_key()
        .to_bytes();
    let secrets: [(&str, Vec<u8>); 4] = [
        ("ed-1", ed_public.clone().into_bytes()),
        ("ed-1", ed_raw.to_vec()),
        ("ec-1", ec_public.clone().into_bytes()),
        ("ec-1", ec_public.trim().as_bytes().to_vec()),
    ];
    for (kid, secret) in secrets {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        let forged =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        let error = verify_with(&auth, &forged).unwrap_err();
        assert!(
            matches!(&error, AuthError::WrongAlgorithm { algorithm, .. } if algorithm == "\"HS256\""),
            "{kid}: {error:?}"
        );
    }
}

#[test]
fn unsigned_tokens_are_refused() {
    let auth = authenticator();
    let signed = admin_token(&signer("ed-1", &ed25519_pems(1).0));
    let signature = signed.rsplit('.').next().unwrap();
    for alg in ["none", "None", "NONE"] {
        for sig in ["", signature] {
            let token = with_header(serde_json::json!({"alg": alg, "kid": "ed-1"}), sig);
            assert_eq!(
                verify_with(&auth, &token),
                Err(AuthError::Unsigned),
                "{alg}"
            );
        }
    }
    let error = verify_with(&auth, &with_header(serde_json::json!({"alg": "none"}), ""));
    assert_eq!(error, Err(AuthError::Unsigned));
}

#[test]
fn a_header_with_critical_extensions_or_no_alg_is_refused() {
    let auth = authenticator();
    let token = admin_token(&signer("ed-1", &ed25519_pems(1).0));
    let parts: Vec<&str> = token.split('.').collect();
    let crit = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","kid":"ed-1","crit":["exp"],"exp":1}"#);
    let error = verify_with(&auth, &format!("{crit}.{}.{}", parts[1], parts[2])).unwrap_err();
    assert!(
        matches!(&error, AuthError::Malformed(m) if m.contains("crit")),
        "{error:?}"
    );
    let no_alg = with_header(serde_json::json!({"kid": "ed-1"}), parts[2]);
    let error = verify_with(&auth, &no_alg).unwrap_err();
    assert!(
        matches!(&error, AuthError::Malformed(m) if m.contains("alg")),
        "{error:?}"
    );
}

#[test]
fn rotation_accepts_old_and_new_until_the_old_is_removed() {
    let (old_private, old_public) = ed25519_pems(1);
    let (new_private, new_public) = ed25519_pems(3);
    let old_token = admin_token(&signer("2025-01", &old_private));
    let new_token = admin_token(&signer("2025-07", &new_private));
    let both = Authenticator::with_public_keys(vec![
        public("2025-01", &old_public),
        public("2025-07", &new_public),
    ])
    .unwrap();
    assert!(verify_with(&both, &old_token).is_ok());
    assert!(verify_with(&both, &new_token).is_ok());
    let new_only = Authenticator::with_public_keys(vec![public("2025-07", &new_public)]).unwrap();
    assert!(verify_with(&new_only, &new_token).is_ok());
    assert!(matches!(
        verify_with(&new_only, &old_token),
        Err(AuthError::UnknownKey { .. })
    ));
}

#[test]
fn public_keys_cannot_mint() {
    let error = authenticator().mint("root", Role::Admin, &[], HOUR, NOW_S);
    assert_eq!(error, Err(AuthError::PublicKeysOnly));
    assert!(format!("{:?}", authenticator()).contains("ed-1"));
}

#[test]
fn what_is_not_a_public_key_is_refused_and_said_what_it_is() {
    let (ed_private, ed_public) = ed25519_pems(1);
    assert_eq!(
        PublicKey::from_pem("k", &ed_private).unwrap_err(),
        KeyError::PrivateKeyGiven
    );
    assert!(matches!(
        PublicKey::from_pem("k", "not a key"),
        Err(KeyError::NotAPublicKey(_))
    ));
    let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    assert!(matches!(
        PublicKey::from_pem("k", garbage),
        Err(KeyError::NotAPublicKey(_))
    ));
    // The identity point: every signature made with "its" key would verify.
    let weak = ed25519_dalek::VerifyingKey::from_bytes(&{
        let mut identity = [0; 32];
        identity[0] = 1;
        identity
    })
    .unwrap()
    .to_public_key_pem(LineEnding::LF)
    .unwrap();
    assert_eq!(
        PublicKey::from_pem("k", &weak).unwrap_err(),
        KeyError::WeakKey
    );
    assert_eq!(
        PublicKey::from_pem("bad kid", &ed_public).unwrap_err(),
        KeyError::BadKid("bad kid".into())
    );
    let key = PublicKey::from_pem("k", &ed_public).unwrap();
    assert_eq!((key.kid(), key.algorithm()), ("k", KeyAlgorithm::EdDsa));
}

#[test]
fn what_is_not_a_private_key_is_refused_and_said_what_it_is() {
    let (_, ed_public) = ed25519_pems(1);
    assert_eq!(
        TokenSigner::from_private_key_pem("k", &ed_public).unwrap_err(),
        KeyError::PublicKeyGiven
    );
    let encrypted =
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
    assert_eq!(
        TokenSigner::from_private_key_pem("k", encrypted).unwrap_err(),
        KeyError::Encrypted
    );
    let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(matches!(
        TokenSigner::from_private_key_pem("k", garbage),
        Err(KeyError::NotAPrivateKey(_))
    ));
    assert!(matches!(
        TokenSigner::from_private_key_pem("", &ed25519_pems(1).0),
        Err(KeyError::BadKid(_))
    ));
    let debug = format!("{:?}", signer("k", &ed25519_pems(1).0));
    assert!(
        debug.contains("<redacted>") && !debug.contains("PRIVATE"),
        "{debug}"
    );
}

#[test]
fn key_ids_are_checked_together() {
    assert_eq!(check_public_key_ids(&[]), Err(KeyError::NoKeys));
    assert_eq!(
        check_public_key_ids(&["a", "b", "a"]),
        Err(KeyError::DuplicateKid("a".into()))
    );
    let many: Vec<String> = (0..=PUBLIC_KEYS_MAX).map(|i| format!("k{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        check_public_key_ids(&many),
        Err(KeyError::TooManyKeys(PUBLIC_KEYS_MAX + 1))
    );
    assert!(check_public_key_ids(&many[..PUBLIC_KEYS_MAX]).is_ok());
    for bad in ["", "a b", "ä", "k/1", &"k".repeat(KID_BYTES_MAX + 1)] {
        assert!(check_kid(bad).is_err(), "{bad:?}");
    }
    for good in ["2025-07", "k.1_a-B", &"k".repeat(KID_BYTES_MAX)] {
        assert!(check_kid(good).is_ok(), "{good:?}");
    }
    let (_, public_pem) = ed25519_pems(1);
    let twice =
        Authenticator::with_public_keys(vec![public("a", &public_pem), public("a", &public_pem)]);
    assert_eq!(twice.unwrap_err(), KeyError::DuplicateKid("a".into()));
}
