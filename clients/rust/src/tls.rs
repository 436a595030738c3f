//! TLS to the server: rustls with the ring provider, trusting either a
//! given PEM file (a private CA or the server's `--dev-tls` certificate) or
//! the system's root certificates, and offering ALPN `chatd/1`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{ClientError, TlsOptions};

/// ALPN id of the native protocol over TLS (the server's `ALPN_NATIVE`).
pub const ALPN: &[u8] = b"chatd/1";

/// The rustls client configuration for `opts`.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ClientError::Connection(format!("CA file {}: {e}", path.display())))?;
            for c in certs {
                roots.add(c).map_err(|e| ClientError::Connection(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err(ClientError::Connection("no trusted certificates (give --ca FILE)".into()));
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Runs the TLS handshake over `tcp`.
pub async fn connect(tcp: TcpStream, addr: &str, opts: &TlsOptions) -> Result<TlsStream<TcpStream>, ClientError> {
    let config = client_config(opts)?;
    let host = match &opts.server_name {
        Some(n) => n.clone(),
        None => host_of(addr).to_string(),
    };
    let name = ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Connection(format!("{host:?} is not a valid TLS server name: {e}")))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Connection(format!("TLS handshake with {addr} failed: {e}")))
}

/// The host part of `host:port` (`[::1]:7401` → `::1`).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_are_cut_from_addresses() {
        assert_eq!(super::host_of("localhost:7401"), "localhost");
        assert_eq!(super::host_of("127.0.0.1:7401"), "127.0.0.1");
        assert_eq!(super::host_of("[::1]:7401"), "::1");
    }
}
