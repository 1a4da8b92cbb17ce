//! quotad on a real network: TLS (refused in plaintext, with a wrong CA,
//! without a client certificate where mutual TLS is on), certificates
//! reloaded without dropping connections, and the limits on what one client
//! may hold (connections per address, idle connections, streams).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quotad::config::{Config, Secret};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::*;

/// A CA that signs certificates for the tests.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses): (cert, key) PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
}

fn write_server_files(dir: &Path, ca: &Ca) -> Files {
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let files = Files {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

fn tls_config(data: &Path, files: &Files) -> Config {
    Config {
        data_dir: data.to_path_buf(),
        auth_key: Some(Secret(KEY.into())),
        tls_cert_file: Some(files.cert.clone()),
        tls_key_file: Some(files.key.clone()),
        ..Config::default()
    }
}

/// A TLS channel trusting `ca`, optionally with a client certificate.
async fn tls_channel(
    addr: SocketAddr,
    ca: &Ca,
    client: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::new(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Waits until the TLS server answers (TestServer cannot probe it).
async fn ready(addr: SocketAddr, ca: &Ca, client: Option<(String, String)>) {
    for _ in 0..200 {
        if let Ok(channel) = tls_channel(addr, ca, client.clone()).await {
            if serving(channel).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("quotad did not answer over TLS on {addr}");
}

async fn serving(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(answer.into_inner().status())
}

#[tokio::test]
async fn with_tls_calls_work_and_plaintext_or_a_wrong_ca_is_refused() {
    let (dir, data) = temp_dir();
    let ca = Ca::new("quotad test CA");
    let files = write_server_files(dir.path(), &ca);
    let server = TestServer::start_with(tls_config(&data, &files)).await;
    ready(server.addr, &ca, None).await;

    let channel = tls_channel(server.addr, &ca, None).await.unwrap();
    assert_eq!(
        serving(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    let bearer = quotad_proto::BearerToken::new(&admin_token()).unwrap();
    let mut admin =
        quotad::proto::quota_admin_client::QuotaAdminClient::with_interceptor(channel, bearer);
    create_school(&mut admin, "oak", 100, false).await;

    // Plaintext: the TLS listener does not speak it.
    let plain = Endpoint::new(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => serving(channel).await.is_err(),
    };
    assert!(refused, "a plaintext call was answered");
    // A client that trusts another CA refuses the server's certificate.
    let other = Ca::new("another CA");
    let wrong = match tls_channel(server.addr, &other, None).await {
        Err(_) => true,
        Ok(channel) => serving(channel).await.is_err(),
    };
    assert!(wrong, "a certificate of an unknown CA was accepted");
    // The rate limit listener has the same certificate.
    let rls = tls_channel(server.rls_addr, &ca, None).await.unwrap();
    assert_eq!(serving(rls).await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn mutual_tls_on_the_rate_limit_listener_needs_a_certificate_of_its_ca() {
    let (dir, data) = temp_dir();
    let ca = Ca::new("server CA");
    let gateways = Ca::new("gateway CA");
    let files = write_server_files(dir.path(), &ca);
    let gateway_ca = dir.path().join("gateways.pem");
    std::fs::write(&gateway_ca, gateways.pem()).unwrap();
    let config = Config {
        rls_tls_client_ca_file: Some(gateway_ca),
        ..tls_config(&data, &files)
    };
    let server = TestServer::start_with(config).await;
    ready(server.addr, &ca, None).await;

    let gateway = gateways.issue(&["gateway-1"]);
    let with_cert = tls_channel(server.rls_addr, &ca, Some(gateway))
        .await
        .unwrap();
    assert_eq!(serving(with_cert).await.unwrap(), ServingStatus::Serving);
    let without = match tls_channel(server.rls_addr, &ca, None).await {
        Err(_) => true,
        Ok(channel) => serving(channel).await.is_err(),
    };
    assert!(without, "a gateway without a certificate was answered");
    let stranger = Ca::new("stranger CA").issue(&["gateway-2"]);
    let foreign = match tls_channel(server.rls_addr, &ca, Some(stranger)).await {
        Err(_) => true,
        Ok(channel) => serving(channel).await.is_err(),
    };
    assert!(foreign, "a certificate of another CA was accepted");
    // The main port has no client CA here: no certificate needed.
    let main = tls_channel(server.addr, &ca, None).await.unwrap();
    assert_eq!(serving(main).await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn a_changed_certificate_is_taken_up_and_open_connections_stay() {
    let (dir, data) = temp_dir();
    let old_ca = Ca::new("old CA");
    let files = write_server_files(dir.path(), &old_ca);
    let config = Config {
        tls_reload_interval_s: 1,
        ..tls_config(&data, &files)
    };
    let server = TestServer::start_with(config).await;
    ready(server.addr, &old_ca, None).await;
    let open = tls_channel(server.addr, &old_ca, None).await.unwrap();
    assert_eq!(serving(open.clone()).await.unwrap(), ServingStatus::Serving);

    let new_ca = Ca::new("new CA");
    // The key first, then the certificate: a check between the two writes
    // fails to pair them and keeps the old configuration, then retries.
    let (cert, key) = new_ca.issue(&["localhost", "127.0.0.1"]);
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    let mut taken_up = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(channel) = tls_channel(server.addr, &new_ca, None).await {
            if serving(channel).await.is_ok() {
                taken_up = true;
                break;
            }
        }
    }
    assert!(taken_up, "the new certificate was not served within 10 s");
    assert_eq!(
        serving(open).await.unwrap(),
        ServingStatus::Serving,
        "the connection made before the reload still works"
    );
}

/// Connects from `local` (a loopback address of its own, so that the
/// server sees another peer).
async fn plain_from(local: &str, addr: SocketAddr) -> Channel {
    Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(local.parse().unwrap()))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

async fn tcp_from(local: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// True when the server closed the connection (EOF or reset) within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut byte)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // The server's HTTP/2 preface: keep reading.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_others_are_still_answered() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(Config {
        data_dir: data,
        auth_key: Some(Secret(KEY.into())),
        connections_per_ip_max: 3,
        idle_timeout_s: 2,
        ..Config::default()
    })
    .await;
    // A hostile client holds three silent connections from 127.0.0.3 (an
    // address of its own: the test server's start-up probe came from
    // 127.0.0.1).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tcp_from("127.0.0.3", server.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = tcp_from("127.0.0.3", server.addr).await;
    assert!(
        closed_within(&mut fourth, Duration::from_secs(1)).await,
        "the fourth connection from one address was kept"
    );
    // Another address is still answered.
    let other = plain_from("127.0.0.2", server.addr).await;
    assert_eq!(serving(other).await.unwrap(), ServingStatus::Serving);
    // The silent ones are closed once idle for 2 s, and the address may
    // connect again.
    for stream in &mut held {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "an idle connection was kept"
        );
    }
    let again = plain_from("127.0.0.3", server.addr).await;
    assert_eq!(serving(again).await.unwrap(), ServingStatus::Serving);
    let metrics = scrape(server.metrics_addr).await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("quotad_connections_refused_total{reason=\"connections_per_ip_max\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_server_advertises_its_limit_of_streams_per_connection() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(Config {
        data_dir: data,
        auth_key: Some(Secret(KEY.into())),
        streams_per_connection_max: 7,
        ..Config::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let client = client.ready().await.unwrap();
    // The SETTINGS frame arrives with the handshake; give it a moment.
    let mut advertised = client.current_max_send_streams();
    for _ in 0..50 {
        if advertised == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        advertised = client.current_max_send_streams();
    }
    assert_eq!(advertised, 7);
}

/// GET /metrics over TLS (HTTP/1.1, as Prometheus scrapes), trusting `ca`.
async fn scrape_tls(addr: SocketAddr, ca: &Ca) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::test]
async fn the_metrics_endpoint_can_use_the_same_certificate() {
    let (dir, data) = temp_dir();
    let ca = Ca::new("quotad test CA");
    let files = write_server_files(dir.path(), &ca);
    let server = TestServer::start_with(Config {
        metrics_tls: true,
        ..tls_config(&data, &files)
    })
    .await;
    ready(server.addr, &ca, None).await;
    let text = scrape_tls(server.metrics_addr, &ca).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
    assert!(text.contains("quotad_connections_open"), "{text:.400}");
    // Plaintext HTTP gets no metrics.
    let mut plain = tokio::net::TcpStream::connect(server.metrics_addr)
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("quotad_"),
        "metrics were served in plaintext"
    );
    // Another CA's client refuses the certificate.
    assert!(scrape_tls(server.metrics_addr, &Ca::new("other"))
        .await
        .is_err());
}
