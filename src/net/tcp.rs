//! The TCP listener: accepts connections and hands each to the stream
//! driver in its own task; [`accept_each`] is the accept loop that the TLS
//! and HTTPS listeners share.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::session::driver::Shutdown;

/// Pending connections the kernel holds for a listener before `accept`
/// (capped by `net.core.somaxconn`). Thousands of clients reconnect at once
/// after a restart; tokio's default of 1024 drops the rest of such a storm
/// into SYN retransmits (1 s, then 3 s, ...).
const LISTEN_BACKLOG: u32 = 8192;

/// Binds a listener on `addr` with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts until `stop_accepting` is cancelled. Connection tasks are tracked
/// by `tracker` and follow `shutdown`.
pub async fn accept_loop(
    listener: TcpListener,
    hub: Arc<Hub>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    shutdown: Shutdown,
) {
    accept_each(listener, stop_accepting, move |stream, peer| {
        let (r, w) = stream.into_split();
        tracker.spawn(super::stream::serve(hub.clone(), r, w, "tcp", peer.to_string(), shutdown.clone()));
    })
    .await
}

/// The accept loop every listener shares: hands each connection (with
/// `TCP_NODELAY` set) to `on_connection`, which must not wait — it spawns.
/// Accept errors such as running out of file descriptors back off instead
/// of spinning.
pub async fn accept_each(
    listener: TcpListener,
    stop_accepting: CancellationToken,
    mut on_connection: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop_accepting.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                on_connection(stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop_accepting.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
