//! Drives one connection over any byte stream (plain TCP or TLS), in one
//! task: a [`Source`] that cuts the stream into frames for the session core,
//! and the writer stage ([`writer::run`]) over a [`StreamSink`] that writes
//! the queued frames' bytes with one write per batch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::codec::{FrameError, FrameReader};
use crate::delivery::{Drained, Frame, Outbound, Subscriber};
use crate::hub::Hub;
use crate::session::Session;
use crate::session::driver::{Incoming, Shutdown, Source, serve_requests};
use crate::session::join::{Io, join};
use crate::session::writer::{self, Sink, WriteError, Written};

/// A stream that can say when it has bytes to read without being handed a
/// buffer to read them into.
pub trait Readable {
    /// Whether the read half shares its resource with the write half (see
    /// [`Io::Shared`]).
    const SHARES_IO: bool = false;

    /// Ready when a read would not block (or has an error to report).
    /// A poll function rather than an `async fn`: tokio's `readable()`
    /// future is ~180 bytes, held by every idle connection's task.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Readable for tokio::net::tcp::OwnedReadHalf {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Only the reader polls the read direction, so its waker is the one
        // tokio keeps.
        self.as_ref().poll_read_ready(cx)
    }
}

/// TLS decrypts in records, so readiness of the socket says nothing about
/// plaintext: read at once.
impl<T: Send + Sync> Readable for tokio::io::ReadHalf<T> {
    // tokio-rustls's read may write (an alert, before it fails), leaving
    // the reader's waker in the socket's write slot.
    const SHARES_IO: bool = true;

    fn poll_readable(&self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
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
            && let Err(e) = std::future::poll_fn(|cx| self.0.get_ref().poll_readable(cx)).await
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

/// The connection task's hold on its session: takes the socket back from
/// the session's queue when the task ends, however it ends (the queue lives
/// on while rooms still hold the session).
struct Connection(Arc<Subscriber>);

impl std::ops::Deref for Connection {
    type Target = Subscriber;

    fn deref(&self) -> &Subscriber {
        &self.0
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.outbound.set_socket(None);
    }
}

/// A write buffer grown past this is released once written.
const KEEP_WRITE_BUF: usize = 64 * 1024;

/// Serves one connection until it closes. `socket`, for a plain TCP
/// connection, lets the fan-out write live frames to it while the writer is
/// idle ([`crate::delivery::queue`]).
pub fn serve<R, W>(
    hub: Arc<Hub>,
    reader: R,
    writer: W,
    transport: &'static str,
    peer: String,
    shutdown: Shutdown,
    socket: Option<Arc<tokio::net::tcp::OwnedWriteHalf>>,
) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Readable + Unpin + Send + Sync + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(transport, %peer, "connection opened");
    let mut session = Session::new(hub.clone(), transport, peer);
    let mut source = Frames(FrameReader::new(reader, hub.limits.max_frame_bytes));
    // A block, not an `async fn`: an `async fn` keeps its arguments and the
    // locals made from them side by side, and every idle connection's task
    // would hold both copies (~100 bytes).
    let handle = Connection(session.handle().clone());
    if socket.is_some() {
        handle.outbound.set_socket(socket);
    }
    async move {
        // The reader and the writer share the connection's task: a second
        // task per connection costs ~0.3 KiB on every idle one.
        let io = if R::SHARES_IO { Io::Shared } else { Io::Separate };
        join(
            &handle.0,
            io,
            serve_requests(&mut session, &mut source, &shutdown),
            writer::run(&hub, &handle, &mut StreamSink { w: writer, buf: BytesMut::new() }),
        )
        .await;
        tracing::debug!(session = handle.id, "connection closed");
    }
}

/// A byte stream (TCP, TLS) as the writer stage's [`Sink`]: the queued
/// frames' bytes, back to back, in one write.
struct StreamSink<W> {
    w: W,
    /// The batch being written: kept from write to write while busy, freed
    /// when idle (freeing it after every write cost 3-5% in S1 at 1024 in
    /// flight; keeping it on every idle connection costs its size).
    buf: BytesMut,
}

/// The rest of a write that found the stream full.
type SlowWrite<'a> = Pin<Box<dyn Future<Output = Result<Written, WriteError>> + Send + 'a>>;

impl<W> StreamSink<W> {
    /// The outcome of a batch's write; the buffer is kept for the next batch
    /// unless it grew large.
    fn written(
        &mut self,
        r: std::io::Result<()>,
        frames: usize,
        bytes: usize,
        closing: bool,
    ) -> Result<Written, WriteError> {
        r.map_err(|e| WriteError::Failed(e.to_string()))?;
        self.buf.clear();
        if self.buf.capacity() > KEEP_WRITE_BUF {
            self.buf = BytesMut::new();
        }
        Ok(Written { frames, bytes, closing })
    }
}

impl<W: AsyncWrite + Unpin + Send> Sink for StreamSink<W> {
    /// The first attempt writes what the stream takes at once; only when the
    /// stream is full does the rest become a boxed future, with its timer.
    /// The future returned is a closure over a few references, because every
    /// idle connection's task keeps room for it (an `async fn` kept room for
    /// every local of both paths, ~190 bytes).
    fn write(&mut self, queue: &Outbound, deadline: Duration) -> impl Future<Output = Result<Written, WriteError>> {
        let mut this = Some(self);
        let mut rest: Option<SlowWrite<'_>> = None;
        std::future::poll_fn(move |cx| {
            if let Some(rest) = rest.as_mut() {
                return rest.as_mut().poll(cx);
            }
            let me = this.take().expect("polled after completion");
            let Drained { frames, direct, closing } = queue.drain_into(&mut me.buf);
            if frames == 0 {
                return Poll::Ready(Ok(Written { closing, ..Written::default() }));
            }
            // A single entry (a reply, or a range of a run shared with the
            // room's other subscribers) is written from where it is.
            let bytes = direct.as_ref().map_or(me.buf.len(), |f| f.wire().len());
            let mut done = 0;
            let data: &[u8] = direct.as_ref().map_or(&me.buf, Frame::wire);
            if let Some(r) = write_now(&mut me.w, data, &mut done, cx) {
                return Poll::Ready(me.written(r, frames, bytes, closing));
            }
            // Full: wait for the stream, within the deadline.
            let mut slow = Box::pin(async move {
                let data: &[u8] = direct.as_ref().map_or(&me.buf, Frame::wire);
                let w = &mut me.w;
                let r = tokio::time::timeout(deadline, async {
                    w.write_all(&data[done..]).await?;
                    w.flush().await
                })
                .await;
                match r {
                    Ok(r) => me.written(r, frames, bytes, closing),
                    Err(_) => Err(WriteError::Stalled),
                }
            });
            let first = slow.as_mut().poll(cx);
            rest = Some(slow);
            first
        })
    }

    async fn close(&mut self, deadline: Duration) {
        // Bounded: a peer that reads nothing must not hold the task.
        let _ = Box::pin(tokio::time::timeout(deadline, self.w.flush())).await;
    }

    async fn shutdown(&mut self, deadline: Duration) {
        let _ = Box::pin(tokio::time::timeout(deadline, self.w.shutdown())).await;
    }

    fn idle(&mut self) {
        self.buf = BytesMut::new();
    }
}

/// Writes as much of `buf[*done..]` as the stream takes without waiting,
/// then flushes: `Some` when all of it is out (or the write failed), `None`
/// when the stream is full (a wake-up is then registered with `cx`).
///
/// The flush matters for TLS: tokio-rustls accepts plaintext and reports it
/// written while records it could not send yet stay in rustls's buffer, so
/// without it the tail of a batch would wait for the next batch. On TCP it
/// is a no-op.
fn write_now<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    done: &mut usize,
    cx: &mut Context<'_>,
) -> Option<std::io::Result<()>> {
    while *done < buf.len() {
        match Pin::new(&mut *w).poll_write(cx, &buf[*done..]) {
            Poll::Ready(Ok(0)) => return Some(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => *done += n,
            Poll::Ready(Err(e)) => return Some(Err(e)),
            Poll::Pending => return None,
        }
    }
    match Pin::new(&mut *w).poll_flush(cx) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn write_now_noop(w: &mut tokio::io::DuplexStream, buf: &[u8], done: &mut usize) -> Option<std::io::Result<()>> {
        write_now(w, buf, done, &mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn a_write_that_fits_completes_at_once() {
        let (mut w, mut peer) = tokio::io::duplex(4096);
        let mut done = 0;
        assert!(matches!(write_now_noop(&mut w, b"hello", &mut done), Some(Ok(()))));
        assert_eq!(done, 5);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_full_stream_says_so_and_the_write_resumes_where_it_stopped() {
        let (mut w, mut peer) = tokio::io::duplex(64);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut done = 0;
        let mut got = Vec::new();
        loop {
            match write_now_noop(&mut w, &data, &mut done) {
                Some(r) => break r.unwrap(),
                None => {
                    assert_eq!(done - got.len(), 64, "the stream took what fits, then was full");
                    let mut chunk = vec![0u8; 64];
                    peer.read_exact(&mut chunk).await.unwrap();
                    got.extend(chunk);
                }
            }
        }
        let mut rest = vec![0u8; done - got.len()];
        peer.read_exact(&mut rest).await.unwrap();
        got.extend(rest);
        assert_eq!(got, data);
    }

    /// Takes every write into a buffer and sends it only on flush, as
    /// tokio-rustls does with records a full socket did not take.
    #[derive(Default)]
    struct Buffering {
        pending: Vec<u8>,
        sent: Vec<u8>,
    }

    impl AsyncWrite for Buffering {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.pending.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let this = &mut *self;
            this.sent.append(&mut this.pending);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[test]
    fn what_a_stream_buffers_is_flushed_with_the_write() {
        let mut w = Buffering::default();
        let r = write_now(&mut w, b"tail of a batch", &mut 0, &mut Context::from_waker(std::task::Waker::noop()));
        assert!(matches!(r, Some(Ok(()))));
        assert_eq!(w.sent, b"tail of a batch");
    }

    /// Fails every write, as a socket whose peer reset does.
    struct Failing;

    impl AsyncWrite for Failing {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_count_as_sent_once_written_and_not_when_the_write_fails() {
        let hub = crate::hub::test_hub();
        let sent = |h: &Subscriber| {
            use std::sync::atomic::Ordering::Relaxed;
            (h.stats.frames_out.load(Relaxed), h.stats.bytes_out.load(Relaxed))
        };
        for (failing, expected) in [(false, (2, 9)), (true, (0, 0))] {
            let handle = Subscriber::new(1, hub.limits.outbound, 1, "tcp", "test".into());
            handle.outbound.push(bytes::Bytes::from_static(b"four")).unwrap();
            handle.outbound.close_with(Some(bytes::Bytes::from_static(b"five!")));
            if failing {
                writer::run(&hub, &handle, &mut StreamSink { w: Failing, buf: BytesMut::new() }).await;
            } else {
                writer::run(&hub, &handle, &mut StreamSink { w: tokio::io::sink(), buf: BytesMut::new() }).await;
            }
            assert_eq!(sent(&handle), expected, "failing writer: {failing}");
        }
    }

    #[tokio::test]
    async fn a_closed_peer_is_a_write_error() {
        let (mut w, peer) = tokio::io::duplex(64);
        drop(peer);
        assert!(matches!(write_now_noop(&mut w, b"x", &mut 0), Some(Err(_))));
    }
}
