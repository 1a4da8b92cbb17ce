//! Postgres over TLS, each `sslmode` against the test Postgres: the one
//! `scripts/test` starts takes TLS (ssl=on) with a certificate for 127.0.0.1
//! and localhost signed by a CA it makes and names in
//! QUOTAD_TEST_DATABASE_CA, and accepts the role `quotad_tls_only` over TLS
//! only (scripts/lib/throwaway-postgres.sh). A Postgres of your own needs the
//! same to run these.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::common::{self, *};
use crate::fresh_database;
use crate::snapshots::{start_server, wait_for};
use quotad::config::{Config, Secret};
use quotad::proto::ListAlertsRequest;

/// The CA that signed the test Postgres's certificate.
fn server_ca() -> String {
    std::env::var("QUOTAD_TEST_DATABASE_CA").unwrap_or_else(|_| {
        panic!(
            "QUOTAD_TEST_DATABASE_CA is not set: run the tests with scripts/test, whose \
             Postgres takes TLS with a certificate of its own CA, or name the CA of your \
             Postgres's certificate"
        )
    })
}

/// `url` (a test database's, without parameters) with `params`.
fn with(url: &str, params: &str) -> String {
    assert!(!url.contains('?'), "{url} already has parameters");
    format!("{url}?{params}")
}

/// `url` with the host name `host`, still connecting to 127.0.0.1 (libpq's
/// `hostaddr`): the name is what the certificate is checked against.
fn named(url: &str, host: &str, params: &str) -> String {
    assert!(
        url.contains("@127.0.0.1:"),
        "{url}: the test Postgres on 127.0.0.1"
    );
    with(
        &url.replacen("@127.0.0.1:", &format!("@{host}:"), 1),
        &format!("hostaddr=127.0.0.1&{params}"),
    )
}

/// Whether the client's own connection is encrypted, as the server sees it.
async fn encrypted(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn connects_encrypted(url: &str) -> bool {
    let client = quotad::postgres::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    encrypted(&client).await
}

async fn refused(url: &str) -> String {
    match quotad::postgres::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(error) => error.to_string(),
    }
}

/// A CA that signed nothing the test Postgres presents.
fn another_ca(dir: &std::path::Path) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a CA that signed nothing here");
    let path = dir.join("another-ca.pem");
    std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
    path.display().to_string()
}

/// `quotad migrate --database-url url`, as an operator runs it.
fn migrate(url: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
        .args(["migrate", "--database-url", url])
        .env("QUOTAD_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_servers_ca_charges_snapshots_and_reads_over_tls() {
    let (db, url) = fresh_database().await;
    let url = with(
        &url,
        &format!("sslmode=verify-full&sslrootcert={}", server_ca()),
    );
    let migrated = tokio::task::spawn_blocking({
        let url = url.clone();
        move || migrate(&url)
    })
    .await
    .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let (_dir, data) = temp_dir();
    let server = start_server(&data, &url).await;
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "s1", 1000, false).await;
    allocate(&mut admin, "s1", "t1", 100, "normal")
        .await
        .unwrap();
    for i in 0..3 {
        let decision = decide(&mut gate, common::consume("s1", "t1", 2, &format!("e{i}"))).await;
        assert!(decision.allowed, "{decision:?}");
    }
    wait_for(
        &db,
        "SELECT count(*) FROM ai_usage_logs WHERE school_id = 's1'",
        3,
    )
    .await;
    // The analytics reader's connection, too.
    admin
        .list_alerts(ListAlertsRequest {
            school_id: "s1".into(),
        })
        .await
        .unwrap();
    let (plain, tls): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE NOT s.ssl), count(*) FILTER (WHERE s.ssl)
                   FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(plain, 0, "every quotad connection is encrypted");
    assert!(tls >= 2, "the snapshot writer's and the reader's: {tls}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_another_ca_is_refused_and_says_why() {
    let (_, url) = fresh_database().await;
    let (dir, data) = temp_dir();
    let other = another_ca(dir.path());
    let expected = format!(
        "postgres_url: sslmode=verify-full: the server's certificate is not signed by any of \
         the CAs of sslrootcert={other}"
    );
    let url = with(&url, &format!("sslmode=verify-full&sslrootcert={other}"));
    assert_eq!(
        refused(&url).await,
        format!("cannot connect to Postgres: {expected}")
    );
    // verify-ca checks the chain as well, and so does require given a CA (as libpq).
    for mode in ["verify-ca", "require"] {
        let url = url.replace("sslmode=verify-full", &format!("sslmode={mode}"));
        let message = refused(&url).await;
        assert!(
            message.contains(&format!(
                "sslmode={mode}: the server's certificate is not signed"
            )),
            "{message}"
        );
    }

    // What the operator sees: from quotad migrate, and from a server that has
    // nothing to serve without Postgres.
    let migrated = tokio::task::spawn_blocking({
        let url = url.clone();
        move || migrate(&url)
    })
    .await
    .unwrap();
    assert!(!migrated.status.success());
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(stderr.contains(&expected), "{stderr}");
    let listeners = quotad::server::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
        rls: None,
    };
    let config = Config {
        data_dir: data,
        auth_key: Some(Secret(KEY.into())),
        postgres_url: Some(Secret(url)),
        ..Config::default()
    };
    let started = quotad::server::serve(listeners, config, std::future::pending());
    let message = tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("refused at once")
        .expect_err("nothing to serve")
        .to_string();
    assert!(message.contains(&expected), "{message}");
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_and_require_do_not() {
    let (_, url) = fresh_database().await;
    let ca = server_ca();
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert!(connects_encrypted(&named(&url, "localhost", &full)).await);

    let wrong = "quotad-wrong-host.invalid";
    assert_eq!(
        refused(&named(&url, wrong, &full)).await,
        format!(
            "cannot connect to Postgres: postgres_url: sslmode=verify-full: the server's \
             certificate is not valid for host {wrong} (it is for 127.0.0.1, localhost)"
        )
    );
    let chain_only = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert!(connects_encrypted(&named(&url, wrong, &chain_only)).await);
    // require without a CA encrypts and checks nothing, as libpq.
    assert!(connects_encrypted(&named(&url, wrong, "sslmode=require")).await);
}

#[tokio::test]
async fn disable_is_refused_by_a_server_that_takes_only_tls() {
    let (_, url) = fresh_database().await;
    assert!(url.starts_with("postgres://postgres@"), "{url}");
    let tls_only = url.replacen("postgres://postgres@", "postgres://quotad_tls_only@", 1);
    let message = refused(&with(&tls_only, "sslmode=disable")).await;
    assert!(
        message.starts_with(
            "cannot connect to Postgres: postgres_url: sslmode=disable: the server refused this \
             connection without TLS: db error: FATAL: pg_hba.conf rejects connection"
        ) && message.contains("no encryption"),
        "{message}"
    );
    // The same role with TLS is let in.
    let full = format!("sslmode=verify-full&sslrootcert={}", server_ca());
    assert!(connects_encrypted(&with(&tls_only, &full)).await);
    assert!(connects_encrypted(&tls_only).await, "prefer, the default");
}

/// A proxy to the test Postgres that declines TLS, as a server with ssl=off
/// does: it answers a TLS request with "N", then passes the rest through.
async fn server_without_tls(url: &str) -> String {
    let (head, rest) = url.split_once('@').unwrap();
    let (target, db) = rest.split_once('/').unwrap();
    let target = target.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                // SSLRequest: length 8, then the code 80877103.
                const TLS_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
                let mut first = [0u8; 8];
                inbound.read_exact(&mut first).await?;
                let mut outbound = tokio::net::TcpStream::connect(&target).await?;
                if first == TLS_REQUEST {
                    inbound.write_all(b"N").await?;
                } else {
                    outbound.write_all(&first).await?;
                }
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    format!("{head}@{addr}/{db}")
}

#[tokio::test]
async fn prefer_takes_tls_when_offered_and_plain_text_when_not() {
    let (_, url) = fresh_database().await;
    assert!(connects_encrypted(&url).await, "prefer is the default");
    assert!(connects_encrypted(&with(&url, "sslmode=prefer")).await);
    assert!(!connects_encrypted(&with(&url, "sslmode=disable")).await);

    let plain = server_without_tls(&url).await;
    assert!(!connects_encrypted(&plain).await);
    assert!(!connects_encrypted(&with(&plain, "sslmode=prefer")).await);
    let full = format!("sslmode=verify-full&sslrootcert={}", server_ca());
    for params in ["sslmode=require", full.as_str()] {
        let message = refused(&with(&plain, params)).await;
        let mode = params.split('&').next().unwrap();
        assert_eq!(
            message,
            format!(
                "cannot connect to Postgres: postgres_url: {mode}: the TLS handshake failed: \
                 server does not support TLS"
            )
        );
    }
}
