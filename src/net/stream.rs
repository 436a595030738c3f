//! Drives one connection over any byte stream (plain TCP or TLS), in one
//! task: a [`Source`] that cuts the stream into frames for the session core,
//! and a writer that drains the session's outbound queue with one write per
//! batch. The writer also runs the session's catch-up from the log when its
//! queue has room, and gives up on a peer that accepts nothing for the
//! slow-consumer timeout.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::codec::{FrameError, FrameReader};
use crate::hub::Hub;
use crate::session::driver::{Incoming, Shutdown, Source, serve_requests};
use crate::session::{Session, SessionHandle};

/// A write buffer grown past this is released once written, so idle
/// connections keep no large buffer.
const KEEP_WRITE_BUF: usize = 64 * 1024;

/// A stream that can say when it has bytes to read without being handed a
/// buffer to read them into.
pub trait Readable {
    /// Resolves when a read would not block (or has an error to report).
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Readable for tokio::net::tcp::OwnedReadHalf {
    async fn readable(&self) -> std::io::Result<()> {
        tokio::net::tcp::OwnedReadHalf::readable(self).await
    }
}

/// TLS decrypts in records, so readiness of the socket says nothing about
/// plaintext: read at once.
impl<T: Send + Sync> Readable for tokio::io::ReadHalf<T> {
    async fn readable(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Length-prefixed frames from a byte stream.
struct Frames<R>(FrameReader<R>);

impl<R: AsyncRead + Readable + Unpin + Send + Sync> Source for Frames<R> {
    fn has_buffered(&self) -> bool {
        self.0.has_buffered()
    }

    async fn next(&mut self) -> Incoming {
        // Between frames an idle connection keeps no read buffer: wait for
        // bytes first, then take one (~0.5 KiB less per idle connection).
        if self.0.release_if_empty()
            && let Err(e) = self.0.get_ref().readable().await
        {
            return Incoming::Broken(FrameError::Io(e));
        }
        match self.0.read_frame().await {
            Ok(Some(frame)) => Incoming::Protobuf(frame.freeze()),
            Ok(None) => Incoming::End,
            Err(e) => Incoming::Broken(e),
        }
    }
}

/// Serves one connection until it closes.
pub async fn serve<R, W>(hub: Arc<Hub>, reader: R, writer: W, transport: &'static str, peer: String, shutdown: Shutdown)
where
    R: AsyncRead + Readable + Unpin + Send + Sync + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(transport, %peer, "connection opened");
    let mut session = Session::new(hub.clone(), transport, peer);
    let handle = session.handle().clone();
    let mut source = Frames(FrameReader::new(reader, hub.limits.max_frame_bytes));
    // The reader and the writer share the connection's task: a second task
    // per connection costs ~0.3 KiB on every idle one. A wake-up of either
    // polls both, which costs the other a readiness check.
    tokio::join!(serve_requests(&mut session, &mut source, &shutdown), write_loop(hub.clone(), handle.clone(), writer));
    tracing::debug!(session = handle.id, "connection closed");
}

async fn write_loop<W: AsyncWrite + Unpin>(hub: Arc<Hub>, handle: Arc<SessionHandle>, mut w: W) {
    let mut buf = BytesMut::new();
    let slow = hub.limits.slow_consumer_timeout;
    let counters = hub.metrics.transport(handle.stats.transport);
    loop {
        let (n, closing) = handle.outbound.drain_into(&mut buf);
        if n > 0 {
            handle.stats.sent(n, buf.len());
            counters.frames_out.increment(n as u64);
            counters.bytes_out.increment(buf.len() as u64);
            match tokio::time::timeout(slow, w.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(session = handle.id, error = %e, "write failed");
                    break;
                }
                Err(_) => {
                    handle.write_stalled(&hub);
                    break;
                }
            }
            buf.clear();
            if buf.capacity() > KEEP_WRITE_BUF {
                buf = BytesMut::new();
            }
        }
        if closing {
            let _ = w.flush().await;
            break;
        }
        if handle.tend(&hub) {
            continue;
        }
        handle.outbound.ready().await;
    }
    handle.outbound.close_with(None);
    let _ = w.shutdown().await;
}
