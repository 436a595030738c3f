//! The TCP listener: accepts connections and hands each to the stream
//! driver in its own task; [`accept_each`] is the accept loop that the TLS
//! and HTTPS listeners share.
//!
//! A connection's write half is shared by its [`Writer`] and its session's
//! outbound queue, which writes live frames to it from the fan-out while
//! the writer is idle ([`crate::delivery::queue`], through [`SendNow`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::net::SocketAddr;

use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::SendNow;
use crate::hub::Hub;
use crate::session::driver::Shutdown;

impl SendNow for OwnedWriteHalf {
    fn send_now(&self, data: &[u8]) -> usize {
        // A plain `send` on the non-blocking socket, not tokio's `try_write`:
        // that first reads the socket's readiness word, a cache miss for each
        // of thousands of idle sockets (3.4% of the server in S3). Readiness
        // left stale by a send that filled the socket costs the writer one
        // `send` that finds it full, which then clears it. A failed send
        // other than a full socket counts as nothing sent: the writer meets
        // the error on its own write and closes the connection.
        socket2::SockRef::from(self.as_ref()).send(data).unwrap_or(0)
    }
}

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
        tracker.spawn(serve(hub.clone(), stream, peer.to_string(), shutdown.clone()));
    })
    .await
}

/// Serves one accepted TCP connection until it closes.
pub fn serve(hub: Arc<Hub>, stream: TcpStream, peer: String, shutdown: Shutdown) -> impl Future<Output = ()> + Send {
    let (r, w) = stream.into_split();
    let w = Arc::new(w);
    super::stream::serve(hub, r, Writer(w.clone()), "tcp", peer, shutdown, Some(w))
}

/// The write half of a TCP connection, shared with its session's queue.
pub struct Writer(Arc<OwnedWriteHalf>);

impl Writer {
    fn socket(&self) -> &TcpStream {
        (*self.0).as_ref()
    }
}

impl AsyncWrite for Writer {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket().poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Readiness was stale; `try_write` cleared it, so the next
                // poll registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN now; the shared half would send it only once its last
    /// holder lets go.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(self.socket()).shutdown(std::net::Shutdown::Write))
    }
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
