//! TLS (rustls, ring provider): certificates, secure defaults, reload, and
//! the native TLS listener.
//!
//! * Versions: TLS 1.3 and 1.2 (or 1.3 only), rustls' safe cipher suites;
//!   nothing older exists in rustls.
//! * ALPN is set per listener: [`ALPN_NATIVE`] on the framed-protobuf TLS
//!   port, `http/1.1` on HTTPS. A client that offers no ALPN is served.
//! * The handshake runs in the connection's own task under the handshake
//!   timeout, never in the accept loop, so a stalled handshake blocks no one.
//! * [`Certificates::reload`] (SIGHUP) re-reads the files: new connections
//!   get the new certificate, open ones keep theirs; a broken new certificate
//!   is refused with a log line and the old one stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::session::driver::Shutdown;

/// ALPN protocol id of the native protocol over TLS.
pub const ALPN_NATIVE: &[u8] = b"chatd/1";
/// ALPN protocol id of HTTPS (and wss).
pub const ALPN_HTTP: &[u8] = b"http/1.1";

/// A certificate that cannot be used; the message says which file and why.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// Where the certificate comes from and what to offer.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Offer TLS 1.3 only.
    pub tls13_only: bool,
}

/// Installs ring as rustls' process-wide crypto provider (once). Having one
/// explicit provider avoids rustls' run-time panic when a dependency also
/// enables another.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server configurations in force, one per listener kind.
pub struct Certificates {
    settings: TlsSettings,
    native: RwLock<Arc<ServerConfig>>,
    https: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    /// Loads the certificate and key.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        install_crypto_provider();
        let (native, https) = build_both(&settings)?;
        Ok(Certificates { settings, native: RwLock::new(native), https: RwLock::new(https) })
    }

    /// Re-reads the files; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        match build_both(&self.settings) {
            Ok((native, https)) => {
                *self.native.write().unwrap_or_else(|e| e.into_inner()) = native;
                *self.https.write().unwrap_or_else(|e| e.into_inner()) = https;
                tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, cert = %self.settings.cert.display(), "TLS reload refused; the previous certificate stays in use");
                Err(e)
            }
        }
    }

    /// An acceptor for the native TLS listener, with the current certificate.
    pub fn native(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.native.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// An acceptor for HTTPS, with the current certificate.
    pub fn https(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.https.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.settings.cert
    }
}

fn build_both(s: &TlsSettings) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let certs = CertificateDer::pem_file_iter(&s.cert)
        .map_err(|e| TlsError(format!("cannot read certificate {}: {e}", s.cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("certificate {} is not valid PEM: {e}", s.cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", s.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&s.key)
        .map_err(|e| TlsError(format!("cannot read a private key from {}: {e}", s.key.display())))?;
    let build = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
        let versions: &[&rustls::SupportedProtocolVersion] =
            if s.tls13_only { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
        let mut c = ServerConfig::builder_with_protocol_versions(versions)
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| {
                TlsError(format!("{} and {} do not make a usable pair: {e}", s.cert.display(), s.key.display()))
            })?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    };
    Ok((build(ALPN_NATIVE)?, build(ALPN_HTTP)?))
}

/// Creates (once) a self-signed certificate for `localhost` and
/// `127.0.0.1` in `DATA/tls/`, for `--dev-tls`. Returns (cert, key) paths.
pub fn dev_certificate(data_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = data_dir.join("tls");
    let (cert, key) = (dir.join("dev-cert.pem"), dir.join("dev-key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).map_err(|e| TlsError(format!("cannot create {}: {e}", dir.display())))?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError(format!("generating: {e}")))?;
    std::fs::write(&cert, generated.cert.pem()).map_err(|e| TlsError(format!("writing {}: {e}", cert.display())))?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(generated.signing_key.serialize_pem().as_bytes()))
        .map_err(|e| TlsError(format!("writing {}: {e}", key.display())))?;
    Ok((cert, key))
}

/// Accepts TLS connections for the native protocol until `stop_accepting`.
pub async fn accept_loop(
    listener: TcpListener,
    hub: Arc<Hub>,
    certs: Arc<Certificates>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    shutdown: Shutdown,
) {
    let handshake = hub.limits.handshake_timeout;
    super::tcp::accept_each(listener, stop_accepting, move |stream, peer| {
        let (hub, acceptor, shutdown) = (hub.clone(), certs.native(), shutdown.clone());
        tracker.spawn(async move {
            let Some(tls) = handshake_within(acceptor, stream, handshake, &peer).await else { return };
            let (r, w) = tokio::io::split(tls);
            super::stream::serve(hub, r, w, "tls", peer.to_string(), shutdown, None).await;
        });
    })
    .await
}

/// Runs a TLS handshake under a deadline; failures are logged at debug
/// level (scanners and plaintext clients are routine).
pub async fn handshake_within(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    timeout: Duration,
    peer: &std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn keys_in_pkcs8_pkcs1_and_sec1_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = dev_certificate(dir.path()).unwrap();
        let cases = [
            (cert, key, "PKCS#8 (rcgen)"),
            (fixture("rsa-cert.pem"), fixture("rsa-pkcs1-key.pem"), "PKCS#1"),
            (fixture("ec-cert.pem"), fixture("ec-sec1-key.pem"), "SEC1"),
        ];
        for (cert, key, form) in cases {
            let parsed = PrivateKeyDer::from_pem_file(&key).unwrap();
            let kind = match parsed {
                PrivateKeyDer::Pkcs8(_) => "PKCS#8 (rcgen)",
                PrivateKeyDer::Pkcs1(_) => "PKCS#1",
                PrivateKeyDer::Sec1(_) => "SEC1",
                _ => "other",
            };
            assert_eq!(kind, form);
            for tls13_only in [false, true] {
                Certificates::load(TlsSettings { cert: cert.clone(), key: key.clone(), tls13_only })
                    .unwrap_or_else(|e| panic!("{form}: {e}"));
            }
        }
        // A key that does not belong to the certificate is refused.
        let err = Certificates::load(TlsSettings {
            cert: fixture("rsa-cert.pem"),
            key: fixture("ec-sec1-key.pem"),
            tls13_only: false,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("usable pair"), "{err}");
    }

    #[test]
    fn broken_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = dev_certificate(dir.path()).unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err =
            Certificates::load(TlsSettings { cert: bad.clone(), key: key.clone(), tls13_only: false }).err().unwrap();
        assert!(err.to_string().contains("bad.pem"), "{err}");
        let err = Certificates::load(TlsSettings { cert, key: bad, tls13_only: false }).err().unwrap();
        assert!(err.to_string().contains("bad.pem"), "{err}");
    }

    #[test]
    fn a_broken_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = dev_certificate(dir.path()).unwrap();
        let certs = Certificates::load(TlsSettings { cert: cert.clone(), key, tls13_only: false }).unwrap();
        let before = Arc::as_ptr(&certs.native.read().unwrap());
        std::fs::write(&cert, "garbage").unwrap();
        assert!(certs.reload().is_err());
        assert_eq!(Arc::as_ptr(&certs.native.read().unwrap()), before);
    }
}
