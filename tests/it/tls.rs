//! TLS: the native protocol and wss over rustls, refusals that do not harm
//! the server, handshake deadlines, certificate reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chat_client::{Client, ClientConfig, TlsOptions};
use chatd::proto::ErrorCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

async fn dev_tls_server() -> TestServer {
    TestServer::start_with(|c| {
        c.dev_tls = true;
        c.tls = Some("127.0.0.1:0".parse().unwrap());
        c.handshake_timeout_ms = 500;
    })
    .await
}

fn dev_cert(s: &TestServer) -> PathBuf {
    s.dir.join("tls/dev-cert.pem")
}

async fn tls_client(
    s: &TestServer,
    user: &str,
    ca: &Path,
) -> Result<(Client, chat_client::Events), chat_client::ClientError> {
    let mut c = ClientConfig::new(s.tls.clone().unwrap(), s.token(user));
    c.tls = Some(TlsOptions { ca: Some(ca.to_path_buf()), server_name: Some("localhost".into()) });
    c.reconnect = false;
    Client::connect(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_chat_over_tls() {
    let s = dev_tls_server().await;
    let (ann, mut ann_ev) = tls_client(&s, "ann", &dev_cert(&s)).await.unwrap();
    ann.join("secure").await.unwrap();
    // A plain TCP client in the same room sees the same log.
    let (bob, mut bob_ev) = s.client("bob").await;
    bob.join("secure").await.unwrap();
    let ack = ann.publish("secure", "over tls").await.unwrap();
    assert_eq!(ack.seq, 1);
    assert_eq!(next_message(&mut bob_ev).await.text, "over tls");
    assert_eq!(next_message(&mut ann_ev).await.seq, 1);
    bob.publish("secure", "back over tcp").await.unwrap();
    assert_eq!(next_message(&mut ann_ev).await.text, "back over tcp");
}

/// A TLS stream to `addr` trusting `ca`, with `versions`.
pub(crate) async fn tls_connect(
    addr: &str,
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    chatd::net::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_https_is_wss() {
    let s = dev_tls_server().await;
    let all = [&rustls::version::TLS13, &rustls::version::TLS12];
    let tls = tls_connect(&s.http, &dev_cert(&s), &all, b"http/1.1").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", s.http.rsplit(':').next().unwrap()), tls)
            .await
            .expect("wss upgrade");
    use futures_util::{SinkExt, StreamExt};
    let mut ws = ws;
    let hello = serde_json::json!({"id": "1", "hello": {"protocolVersion": 1, "token": s.token("ann")}});
    ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.to_string().into())).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains("\"welcome\""), "{reply:?}");
    // Plain HTTP on the HTTPS port is refused.
    let mut plain = tokio::net::TcpStream::connect(&s.http).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf)).await.unwrap();
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_certificate_fails_cleanly() {
    let s = dev_tls_server().await;
    let err = tls_client(&s, "ann", &fixture("rsa-cert.pem")).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("TLS handshake") && msg.to_lowercase().contains("certificate"), "{msg}");
    // The server is unharmed.
    tls_client(&s, "ann", &dev_cert(&s)).await.unwrap().0.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_tls_port_and_tls_to_the_plain_port_are_refused() {
    let s = dev_tls_server().await;
    // A Hello frame in the clear, to the TLS port.
    let mut r = Raw::connect(s.tls.as_ref().unwrap()).await;
    r.send_hello(&s.token("ann"), vec![]).await;
    assert!(r.closed().await, "the TLS port drops a plaintext client");
    // A TLS ClientHello to the plain port: its first bytes read as a huge
    // length prefix, refused before anything is allocated.
    let mut r = Raw::connect(&s.addr).await;
    let err = {
        let all = [&rustls::version::TLS13, &rustls::version::TLS12];
        let addr = s.addr.clone();
        let cert = dev_cert(&s);
        tokio::spawn(async move { tls_connect(&addr, &cert, &all, b"chatd/1").await.err() })
    };
    // Our own raw look at the same thing: bytes 16 03 01 ... as a prefix.
    r.send_bytes(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).await;
    r.expect_error(ErrorCode::TooLarge).await;
    assert!(r.closed().await);
    assert!(err.await.unwrap().is_some(), "a TLS client cannot talk to the plain port");
    // Both ports still serve.
    tls_client(&s, "ann", &dev_cert(&s)).await.unwrap().0.ping().await.unwrap();
    s.client("bob").await.0.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_time_out_and_block_no_one() {
    let s = TestServer::start_with(|c| {
        c.dev_tls = true;
        c.tls = Some("127.0.0.1:0".parse().unwrap());
        c.handshake_timeout_ms = 3000;
    })
    .await;
    let tls_addr = s.tls.clone().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(tokio::net::TcpStream::connect(&tls_addr).await.unwrap());
    }
    // A real client is served while twenty handshakes hang...
    tls_client(&s, "ann", &dev_cert(&s)).await.unwrap().0.ping().await.unwrap();
    // ...which are all still open at that point (ordering, not a stopwatch).
    for c in &stalled {
        let mut b = [0u8; 1];
        assert!(matches!(c.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "still waiting");
    }
    // Each stalled connection is closed by the handshake deadline.
    for mut c in stalled {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, c.read(&mut b)).await.expect("closed by the deadline");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_only_refuses_tls12() {
    let s = TestServer::start_with(|c| {
        c.dev_tls = true;
        c.tls13_only = true;
        c.tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = s.tls.clone().unwrap();
    assert!(tls_connect(&addr, &dev_cert(&s), &[&rustls::version::TLS12], b"chatd/1").await.is_err());
    let ok = tls_connect(&addr, &dev_cert(&s), &[&rustls::version::TLS13], b"chatd/1").await.unwrap();
    assert_eq!(ok.get_ref().1.alpn_protocol(), Some(&b"chatd/1"[..]));
    // Without the option both versions are offered.
    let s = dev_tls_server().await;
    tls_connect(s.tls.as_ref().unwrap(), &dev_cert(&s), &[&rustls::version::TLS12], b"chatd/1").await.unwrap();
}

fn install(pair: (&str, &str), dir: &Path) {
    std::fs::copy(fixture(pair.0), dir.join("cert.pem")).unwrap();
    std::fs::copy(fixture(pair.1), dir.join("key.pem")).unwrap();
}

const RSA: (&str, &str) = ("rsa-cert.pem", "rsa-pkcs1-key.pem");
const EC: (&str, &str) = ("ec-cert.pem", "ec-sec1-key.pem");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_the_new_certificate_and_keeps_old_connections() {
    let certs = tempfile::tempdir().unwrap();
    install(RSA, certs.path());
    let s = TestServer::start_with(|c| {
        c.cert = Some(certs.path().join("cert.pem"));
        c.key = Some(certs.path().join("key.pem"));
        c.tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (old, _) = tls_client(&s, "ann", &fixture(RSA.0)).await.unwrap();
    old.join("r").await.unwrap();

    install(EC, certs.path());
    s.server.as_ref().unwrap().reload_tls().unwrap();
    tls_client(&s, "bob", &fixture(EC.0)).await.expect("new connections get the new certificate");
    assert!(tls_client(&s, "bob", &fixture(RSA.0)).await.is_err(), "the old certificate is no longer served");
    assert_eq!(old.publish("r", "still here").await.unwrap().seq, 1, "the old connection keeps working");

    std::fs::write(certs.path().join("cert.pem"), "broken").unwrap();
    let err = s.server.as_ref().unwrap().reload_tls().expect_err("a broken certificate is refused");
    assert!(err.contains("cert.pem"), "{err}");
    tls_client(&s, "bob", &fixture(EC.0)).await.expect("the previous certificate stays in use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    let data = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    install(RSA, certs.path());
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let mut server = Process::start(
        data.path(),
        &["--tls", "127.0.0.1:0", "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()],
    );
    let tls_addr = server.tls.clone().expect("the binary prints its TLS address");
    let connect = |ca: &'static str| {
        let mut c = ClientConfig::new(tls_addr.clone(), server.token("ann"));
        c.tls = Some(TlsOptions { ca: Some(fixture(ca)), server_name: Some("localhost".into()) });
        c.reconnect = false;
        Client::connect(c)
    };
    connect(RSA.0).await.unwrap();
    install(EC, certs.path());
    server.signal("HUP");
    Polling::new(WAIT, 20).until("SIGHUP to load the new certificate", async || connect(EC.0).await.is_ok()).await;
    assert!(connect(RSA.0).await.is_err());
    assert!(server.terminate().success());
}
