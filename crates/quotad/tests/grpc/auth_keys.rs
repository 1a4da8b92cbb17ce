//! Public-key tokens through the real gRPC API: EdDSA and ES256 keys made by
//! `openssl` as an operator would, a server that holds only their public
//! halves, rotation across a restart, `quotad token --private-key-file`, and
//! every token such a server must refuse. Also the start-up refusals: a key
//! on the command line, both kinds of key at once, `--insecure-dev` off loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use quotad::auth::{PublicKeyFile, Role, TokenSigner};
use quotad::config::Config;
use quotad::proto::*;
use quotad::server::{serve, Listeners, ServeError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::common::*;

/// A key pair made by `openssl`: its private key file (kept by whoever
/// mints) and its public key file (all quotad is given).
struct KeyPair {
    kid: &'static str,
    private_file: PathBuf,
    public_file: PathBuf,
}

enum Curve {
    Ed25519,
    P256,
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl KeyPair {
    fn generate(dir: &Path, kid: &'static str, curve: Curve) -> KeyPair {
        let private_file = dir.join(format!("{kid}.private.pem"));
        let public_file = dir.join(format!("{kid}.public.pem"));
        let private = private_file.to_str().unwrap();
        match curve {
            Curve::Ed25519 => openssl(&["genpkey", "-algorithm", "ed25519", "-out", private]),
            Curve::P256 => openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                private,
            ]),
        }
        let public = public_file.to_str().unwrap();
        openssl(&["pkey", "-in", private, "-pubout", "-out", public]);
        KeyPair {
            kid,
            private_file,
            public_file,
        }
    }

    fn entry(&self) -> PublicKeyFile {
        PublicKeyFile {
            kid: self.kid.into(),
            file: self.public_file.clone(),
        }
    }

    fn signer_as(&self, kid: &str) -> TokenSigner {
        let pem = std::fs::read_to_string(&self.private_file).unwrap();
        TokenSigner::from_private_key_pem(kid, &pem).unwrap()
    }

    fn token(&self, subject: &str, role: Role, schools: &[&str]) -> String {
        token_signed_by(&self.signer_as(self.kid), subject, role, schools)
    }
}

fn token_signed_by(signer: &TokenSigner, subject: &str, role: Role, schools: &[&str]) -> String {
    let schools: Vec<quotad_core::SchoolId> = schools
        .iter()
        .map(|s| quotad_core::SchoolId::parse(s).unwrap())
        .collect();
    let now_s = now_ms() as u64 / 1000;
    signer
        .mint(subject, role, &schools, Duration::from_secs(3600), now_s)
        .unwrap()
}

/// quotad in this process with these public keys and no others, gRPC only.
/// (`TestServer` probes readiness with an HS256 token, which this server refuses.)
struct KeyServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl KeyServer {
    /// Ready once `probe` (an admin token it accepts) reads an unknown school.
    async fn start(data_dir: &Path, keys: &[&KeyPair], probe: &str) -> KeyServer {
        let config = Config {
            data_dir: data_dir.to_path_buf(),
            auth_public_keys: keys.iter().map(|key| key.entry()).collect(),
            ..Config::default()
        };
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let listeners = Listeners {
            grpc,
            metrics: None,
            rls: None,
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(listeners, config, async move {
            let _ = rx.await;
        }));
        for _ in 0..200 {
            let (mut admin, _) = clients_as(addr, probe).await;
            let probed = admin
                .get_school(GetSchoolRequest {
                    school_id: "probe".into(),
                })
                .await;
            if probed.is_err_and(|s| s.code() == Code::NotFound) {
                return KeyServer {
                    addr,
                    shutdown: Some(tx),
                    task,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("quotad did not start on {addr}");
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

async fn create(addr: SocketAddr, token: &str, school_id: &str) -> Result<(), tonic::Status> {
    let (mut admin, _) = clients_as(addr, token).await;
    admin
        .create_school(CreateSchoolRequest {
            school_id: school_id.into(),
            name: format!("School {school_id}"),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![PoolUnits {
                service_type: SERVICE.into(),
                cycle_units: 100,
            }],
            changed_by: "test".into(),
            self_service_requests: false,
        })
        .await
        .map(drop)
}

async fn get(addr: SocketAddr, token: &str, school_id: &str) -> Result<School, tonic::Status> {
    let (mut admin, _) = clients_as(addr, token).await;
    admin
        .get_school(GetSchoolRequest {
            school_id: school_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn assert_unauthenticated(result: Result<impl std::fmt::Debug, tonic::Status>, words: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(words), "{}", status.message());
}

#[tokio::test]
async fn eddsa_and_es256_tokens_both_work() {
    let (dir, data) = temp_dir();
    let ed = KeyPair::generate(dir.path(), "ed-2025", Curve::Ed25519);
    let ec = KeyPair::generate(dir.path(), "ec-2025", Curve::P256);
    let ed_admin = ed.token("ops", Role::Admin, &[]);
    let server = KeyServer::start(&data, &[&ed, &ec], &ed_admin).await;

    create(server.addr, &ed_admin, "oak").await.unwrap();
    let ec_admin = ec.token("ops", Role::Admin, &[]);
    create(server.addr, &ec_admin, "elm").await.unwrap();
    // Roles and tenants hold as with any token.
    let ec_principal = ec.token("alice", Role::Principal, &["oak"]);
    assert_eq!(
        get(server.addr, &ec_principal, "oak")
            .await
            .unwrap()
            .school_id,
        "oak"
    );
    let denied = get(server.addr, &ec_principal, "elm").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let ed_service = ed.token("proxy", Role::Service, &["oak"]);
    let (_, mut gate) = clients_as(server.addr, &ed_service).await;
    let decision = gate
        .consume(consume("oak", "t1", 1, "e1"))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert!(!decision.allowed, "no slice yet: {decision:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_token_signed_by_a_private_key_quotad_does_not_know_is_refused() {
    let (dir, data) = temp_dir();
    let known = KeyPair::generate(dir.path(), "known", Curve::Ed25519);
    let known_ec = KeyPair::generate(dir.path(), "known-ec", Curve::P256);
    let stranger = KeyPair::generate(dir.path(), "stranger", Curve::Ed25519);
    let stranger_ec = KeyPair::generate(dir.path(), "stranger-ec", Curve::P256);
    let admin = known.token("ops", Role::Admin, &[]);
    let server = KeyServer::start(&data, &[&known, &known_ec], &admin).await;

    // Another private key under a kid the server knows: the signature is wrong.
    for forged_by in [&stranger, &stranger_ec] {
        for kid in ["known", "known-ec"] {
            let forged = token_signed_by(&forged_by.signer_as(kid), "mallory", Role::Admin, &[]);
            let refused = create(server.addr, &forged, "forged").await;
            let words = match (forged_by.kid, kid) {
                ("stranger", "known") | ("stranger-ec", "known-ec") => "signature does not match",
                _ => "accepts only",
            };
            assert_unauthenticated(refused, words);
        }
    }
    // Under its own kid, which the server does not know.
    let unknown = stranger.token("mallory", Role::Admin, &[]);
    assert_unauthenticated(
        create(server.addr, &unknown, "forged").await,
        "key id (kid) \"stranger\" is not one of this server's auth_public_keys",
    );
    // An HS256 token, as a single-box server would take.
    assert_unauthenticated(
        create(server.addr, &admin_token(), "forged").await,
        "signed with \"HS256\"",
    );
    // An HS256 token whose secret is the server's public key file, and one unsigned.
    let public_pem = std::fs::read(&known.public_file).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("known".into());
    let claims = serde_json::json!({
        "sub": "mallory", "role": "admin", "iat": now_ms() / 1000, "exp": now_ms() / 1000 + 60,
    });
    let confused = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert_unauthenticated(
        create(server.addr, &confused, "forged").await,
        "signed with \"HS256\", but this server accepts only EdDSA and ES256",
    );
    let payload = confused.split('.').nth(1).unwrap();
    // base64url of {"alg":"none","kid":"known"}.
    let unsigned = format!("eyJhbGciOiJub25lIiwia2lkIjoia25vd24ifQ.{payload}.");
    assert_unauthenticated(create(server.addr, &unsigned, "forged").await, "unsigned");

    // Nothing was created by any of them.
    let absent = get(server.addr, &admin, "forged").await.unwrap_err();
    assert_eq!(absent.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn rotation_accepts_the_old_and_new_kid_until_the_old_is_removed() {
    let (dir, data) = temp_dir();
    let old = KeyPair::generate(dir.path(), "2025-01", Curve::Ed25519);
    let new = KeyPair::generate(dir.path(), "2025-07", Curve::P256);
    let old_token = old.token("ops", Role::Admin, &[]);
    let new_token = new.token("ops", Role::Admin, &[]);

    // During the rotation: both keys, both tokens.
    let server = KeyServer::start(&data, &[&old, &new], &old_token).await;
    create(server.addr, &old_token, "oak").await.unwrap();
    create(server.addr, &new_token, "elm").await.unwrap();
    assert_eq!(
        get(server.addr, &new_token, "oak").await.unwrap().school_id,
        "oak"
    );
    assert_eq!(
        get(server.addr, &old_token, "elm").await.unwrap().school_id,
        "elm"
    );
    server.stop().await;

    // The old key removed: a restart with the new one alone.
    let server = KeyServer::start(&data, &[&new], &new_token).await;
    assert_unauthenticated(
        get(server.addr, &old_token, "oak").await,
        "key id (kid) \"2025-01\" is not one of this server's auth_public_keys",
    );
    assert_unauthenticated(create(server.addr, &old_token, "ash").await, "2025-01");
    assert_eq!(
        get(server.addr, &new_token, "oak").await.unwrap().school_id,
        "oak"
    );
    assert_eq!(
        get(server.addr, &new_token, "ash")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    server.stop().await;
}

/// The real binary, with no key from the test's own environment.
fn quotad_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quotad"));
    command
        .env_remove("QUOTAD_AUTH_KEY")
        .env_remove("QUOTAD_AUTH_KEY_FILE")
        .env_remove("QUOTAD_CONFIG")
        .env("QUOTAD_LOG", "warn")
        .stdin(Stdio::null());
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run the quotad binary")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn quotad_token_with_a_private_key_file_mints_a_token_the_server_accepts() {
    let (dir, data) = temp_dir();
    let ed = KeyPair::generate(dir.path(), "ed-1", Curve::Ed25519);
    let ec = KeyPair::generate(dir.path(), "ec-1", Curve::P256);
    let mint = |key: &KeyPair, role: &str, school: Option<&str>| {
        let mut command = quotad_command();
        command
            .args([
                "token",
                "--role",
                role,
                "--subject",
                "alice",
                "--kid",
                key.kid,
            ])
            .arg("--private-key-file")
            .arg(&key.private_file);
        if let Some(school) = school {
            command.args(["--school", school]);
        }
        let output = run(&mut command);
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let admin = mint(&ed, "admin", None);
    let header = jsonwebtoken::decode_header(&admin).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (jsonwebtoken::Algorithm::EdDSA, Some("ed-1"))
    );
    let server = KeyServer::start(&data, &[&ed, &ec], &admin).await;
    create(server.addr, &admin, "oak").await.unwrap();
    let principal = mint(&ec, "principal", Some("oak"));
    assert_eq!(
        jsonwebtoken::decode_header(&principal).unwrap().alg,
        jsonwebtoken::Algorithm::ES256
    );
    assert_eq!(
        get(server.addr, &principal, "oak").await.unwrap().school_id,
        "oak"
    );
    server.stop().await;

    // What `quotad token` refuses: a public key, half of the pair, a key on
    // the command line, and no key at all.
    let output = run(quotad_command()
        .args([
            "token",
            "--role",
            "admin",
            "--subject",
            "x",
            "--kid",
            "ed-1",
        ])
        .arg("--private-key-file")
        .arg(&ed.public_file));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("this is a public key"),
        "{}",
        stderr(&output)
    );
    let output = run(quotad_command().args([
        "token",
        "--role",
        "admin",
        "--subject",
        "x",
        "--kid",
        "ed-1",
    ]));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--private-key-file"),
        "{}",
        stderr(&output)
    );
    let output = run(quotad_command().args([
        "token",
        "--role",
        "admin",
        "--subject",
        "x",
        "--auth-key",
        KEY,
    ]));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("visible to every user in `ps`"),
        "{}",
        stderr(&output)
    );
    let output = run(quotad_command().args(["token", "--role", "admin", "--subject", "x"]));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no key to sign with"),
        "{}",
        stderr(&output)
    );
    // The shared key from the environment still mints (single box).
    let output = run(quotad_command()
        .args(["token", "--role", "admin", "--subject", "x"])
        .env("QUOTAD_AUTH_KEY", KEY));
    assert!(output.status.success(), "{}", stderr(&output));
}

/// `quotad serve` with `args` and `env`: refused before it listens, and why.
fn refused_to_serve(data: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = quotad_command();
    command.arg("serve").arg("--data-dir").arg(data).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = run(&mut command);
    assert!(!output.status.success(), "started: {args:?}");
    assert!(output.stdout.is_empty(), "it listened: {args:?}");
    stderr(&output)
}

#[test]
fn serve_refuses_a_key_on_the_command_line_both_kinds_of_key_and_insecure_dev_off_loopback() {
    let (dir, data) = temp_dir();
    let key = KeyPair::generate(dir.path(), "k1", Curve::Ed25519);
    let local = ["--grpc-addr", "127.0.0.1:0", "--no-metrics", "--no-rls"];

    let error = refused_to_serve(&data, &[&local[..], &["--auth-key", KEY][..]].concat(), &[]);
    assert!(error.contains("--auth-key is not accepted"), "{error}");

    let config_file = dir.path().join("quotad.toml");
    let toml = |file: &Path| format!("[[auth_public_keys]]\nkid = \"k1\"\nfile = {file:?}\n");
    std::fs::write(&config_file, toml(&key.public_file)).unwrap();
    let config = config_file.to_str().unwrap();
    let error = refused_to_serve(
        &data,
        &[&local[..], &["--config", config][..]].concat(),
        &[("QUOTAD_AUTH_KEY", KEY)],
    );
    assert!(
        error.contains("setting auth_public_keys: a shared HS256 key"),
        "{error}"
    );

    // quotad is given the public half only; the private half is refused.
    std::fs::write(&config_file, toml(&key.private_file)).unwrap();
    let error = refused_to_serve(
        &data,
        &[&local[..], &["--config", config][..]].concat(),
        &[],
    );
    assert!(error.contains("this is a private key"), "{error}");

    for (setting, args) in [
        (
            "grpc_addr",
            vec!["--grpc-addr", "0.0.0.0:0", "--no-metrics", "--no-rls"],
        ),
        (
            "metrics_addr",
            vec![
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "0.0.0.0:0",
                "--no-rls",
            ],
        ),
        (
            "rls_addr",
            vec![
                "--grpc-addr",
                "127.0.0.1:0",
                "--no-metrics",
                "--rls-addr",
                "10.0.0.1:0",
            ],
        ),
    ] {
        let error = refused_to_serve(&data, &[&["--insecure-dev"][..], &args[..]].concat(), &[]);
        assert!(
            error.contains(&format!("setting {setting}:")) && error.contains("loopback"),
            "{setting}: {error}"
        );
    }

    // On loopback, with the public listeners turned off, it starts.
    let mut child = quotad_command()
        .args(["serve", "--insecure-dev", "--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "0.0.0.0:0", "--no-metrics", "--no-rls"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.starts_with("quotad listening grpc=127.0.0.1:"),
        "{line:?}"
    );
}
