use std::path::PathBuf;

use super::params::{split, TlsParams};
use super::tls::{describe, Check, Roots};
use super::{check_url, ConnectError, Settings, SslMode};

fn params(sslmode: Option<&str>, sslrootcert: Option<&str>) -> TlsParams {
    TlsParams {
        sslmode: sslmode.map(Into::into),
        sslrootcert: sslrootcert.map(Into::into),
    }
}

#[test]
fn a_url_loses_only_the_tls_parameters() {
    let (rest, found) = split(
        "postgres://u:p@db.example:6432/quotad?application_name=q&sslmode=verify-full\
         &sslrootcert=%2Fetc%2Fca%20file.pem&connect_timeout=5",
    )
    .unwrap();
    assert_eq!(
        rest,
        "postgres://u:p@db.example:6432/quotad?application_name=q&connect_timeout=5"
    );
    assert_eq!(found, params(Some("verify-full"), Some("/etc/ca file.pem")));

    let (rest, found) = split("postgresql://db/quotad?sslmode=require").unwrap();
    assert_eq!(rest, "postgresql://db/quotad");
    assert_eq!(found, params(Some("require"), None));

    let (rest, found) = split("postgres://db/quotad").unwrap();
    assert_eq!(rest, "postgres://db/quotad");
    assert_eq!(found, TlsParams::default());
}

#[test]
fn a_question_mark_in_the_password_is_not_the_query() {
    let (rest, found) = split("postgres://u:a?b@db/quotad?sslmode=disable").unwrap();
    assert_eq!(rest, "postgres://u:a?b@db/quotad");
    assert_eq!(found, params(Some("disable"), None));
    let (rest, found) = split("postgres://u:a?sslmode=x@db/quotad").unwrap();
    assert_eq!(rest, "postgres://u:a?sslmode=x@db/quotad");
    assert_eq!(found, TlsParams::default());
}

#[test]
fn key_value_pairs_lose_only_the_tls_parameters() {
    let (rest, found) = split(
        "host=db.example  user = quotad sslmode=verify-ca sslrootcert='/etc/my ca.pem' \
         password='it\\'s' dbname=q\\ x",
    )
    .unwrap();
    assert_eq!(
        rest,
        "host='db.example' user='quotad' password='it\\'s' dbname='q x'"
    );
    assert_eq!(found, params(Some("verify-ca"), Some("/etc/my ca.pem")));
    // What is left reads as the whole would have.
    let config: tokio_postgres::Config = rest.parse().unwrap();
    assert_eq!(config.get_password(), Some(&b"it's"[..]));
    assert_eq!(config.get_dbname(), Some("q x"));

    assert!(split("host=db sslmode")
        .unwrap_err()
        .contains("`=` expected"));
    assert!(split("host='db").unwrap_err().contains("no closing quote"));
}

fn settings(url: &str) -> Settings {
    Settings::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn refused(url: &str) -> String {
    match Settings::parse(url) {
        Ok(_) => panic!("{url} was accepted"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn each_sslmode_asks_tokio_postgres_for_tls_and_checks_what_libpq_checks() {
    use tokio_postgres::config::SslMode as Negotiation;
    let base = "postgres://u@db/q";
    let cases = [
        ("", SslMode::Prefer, Negotiation::Prefer, Check::Nothing),
        (
            "?sslmode=disable",
            SslMode::Disable,
            Negotiation::Disable,
            Check::Nothing,
        ),
        (
            "?sslmode=prefer",
            SslMode::Prefer,
            Negotiation::Prefer,
            Check::Nothing,
        ),
        (
            "?sslmode=require",
            SslMode::Require,
            Negotiation::Require,
            Check::Nothing,
        ),
        (
            "?sslmode=verify-ca",
            SslMode::VerifyCa,
            Negotiation::Require,
            Check::Chain,
        ),
        (
            "?sslmode=verify-full",
            SslMode::VerifyFull,
            Negotiation::Require,
            Check::ChainAndHost,
        ),
        // libpq: require with a root certificate checks the chain.
        (
            "?sslmode=require&sslrootcert=/ca.pem",
            SslMode::Require,
            Negotiation::Require,
            Check::Chain,
        ),
        (
            "?sslrootcert=/ca.pem",
            SslMode::Prefer,
            Negotiation::Prefer,
            Check::Nothing,
        ),
        (
            "?sslrootcert=system",
            SslMode::VerifyFull,
            Negotiation::Require,
            Check::ChainAndHost,
        ),
    ];
    for (query, mode, negotiation, check) in cases {
        let read = settings(&format!("{base}{query}"));
        assert_eq!(
            (read.mode, read.config.get_ssl_mode(), read.check),
            (mode, negotiation, check),
            "{query}"
        );
    }
    assert_eq!(
        settings("postgres://u@db/q?sslrootcert=/ca.pem").roots,
        Roots::File(PathBuf::from("/ca.pem"))
    );
    assert_eq!(settings("postgres://u@db/q").roots, Roots::System);
    assert_eq!(
        settings("host=db sslmode=verify-full").mode,
        SslMode::VerifyFull
    );
}

#[test]
fn wrong_settings_are_refused_naming_them_and_never_the_password() {
    for (url, expected) in [
        (
            "postgres://u:hunter2@db/q?sslmode=verify_full",
            "postgres_url: sslmode=verify_full is not one of disable, prefer, require, verify-ca, verify-full",
        ),
        ("postgres://u:hunter2@db/q?sslmode=allow", "sslmode=allow is not supported"),
        (
            "postgres://u:hunter2@db/q?sslmode=require&sslrootcert=system",
            "postgres_url: sslrootcert=system needs sslmode=verify-full, not require",
        ),
        ("postgres://u:hunter2@db/q?sslcert=/c.pem", "unknown option `sslcert`"),
    ] {
        let message = refused(url);
        assert!(message.contains(expected), "{url}: {message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}

#[test]
fn an_unusable_sslrootcert_is_named_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for (path, expected) in [
        (&missing, "cannot read it"),
        (&empty, "holds no certificate"),
    ] {
        let url = format!(
            "postgres://u@db/q?sslmode=verify-full&sslrootcert={}",
            path.display()
        );
        let error = check_url(&url).unwrap_err();
        assert!(matches!(error, ConnectError::Settings(_)), "{error:?}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("postgres_url: sslrootcert={}: ", path.display()))
                && message.contains(expected),
            "{message}"
        );
    }
    // Not read when nothing is checked against it.
    check_url(&format!(
        "postgres://u@db/q?sslrootcert={}",
        missing.display()
    ))
    .unwrap();
    check_url("postgres://u@db/q?sslmode=disable").unwrap();
}

#[test]
fn refused_certificates_are_told_in_words() {
    use rustls::pki_types::ServerName;
    use rustls::CertificateError;
    let wrong_host = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
        expected: ServerName::try_from("127.0.0.1").unwrap(),
        presented: vec![
            "DnsName(\"localhost\")".into(),
            "IpAddress(10.0.0.1)".into(),
        ],
    });
    assert_eq!(
        describe(&wrong_host, &Roots::System),
        "the server's certificate is not valid for host 127.0.0.1 (it is for localhost, 10.0.0.1)"
    );
    let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert_eq!(
        describe(&unknown, &Roots::File("/etc/ca.pem".into())),
        "the server's certificate is not signed by any of the CAs of sslrootcert=/etc/ca.pem"
    );
    assert_eq!(
        describe(&unknown, &Roots::System),
        "the server's certificate is not signed by any of the system's root CAs"
    );
}
