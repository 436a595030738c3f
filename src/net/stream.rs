//! Drives one connection over any byte stream: a reader that turns frames
//! into session calls, and a writer task that drains the session's outbound
//! queue with one write per batch.
//!
//! The reader applies the handshake timeout (no `Hello` in time), the idle
//! timeout (a `Ping` after half of it, `GoAway{IDLE_TIMEOUT}` after all of
//! it) and the token's expiry; it stops at `stop_reading` (shutdown). The
//! writer also runs the session's catch-up from the log when its queue has
//! room, and gives up on a peer that accepts nothing for the slow-consumer
//! timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::codec::FrameReader;
use crate::hub::Hub;
use crate::proto::CloseReason;
use crate::session::{Flow, Session, SessionHandle};

/// Messages read from the log per catch-up step.
const CATCH_UP_STEP: u64 = 256;
/// A write buffer grown past this is released once written, so idle
/// connections keep no large buffer.
const KEEP_WRITE_BUF: usize = 64 * 1024;

/// The signals of a graceful shutdown, in the order the server gives them.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking requests (the readers' part of the drain).
    pub stop_reading: CancellationToken,
    /// Every pending write is committed and acked: say `GoAway{SHUTDOWN}`.
    pub go_away: CancellationToken,
    /// Counts the readers still running; shutdown waits for them before it
    /// commits the last writes.
    pub readers: tokio_util::task::TaskTracker,
}

/// How long clients are asked to wait before reconnecting after a shutdown.
const SHUTDOWN_RETRY_AFTER_MS: u32 = 1000;

/// Serves one connection until it closes.
pub async fn serve<R, W>(hub: Arc<Hub>, reader: R, writer: W, transport: &'static str, peer: String, shutdown: Shutdown)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(hub.clone(), transport);
    let handle = session.handle().clone();
    tracing::debug!(session = handle.id, %peer, transport, "connection opened");
    let writer_task = tokio::spawn(write_loop(hub.clone(), handle.clone(), writer));

    let reading = shutdown.readers.token();
    read_loop(&mut session, reader, &shutdown.stop_reading).await;
    drop(reading);
    if shutdown.stop_reading.is_cancelled() && !handle.outbound.is_closing() {
        // Shutdown: acks of the last commits still flow out through the
        // writer; GoAway follows once they are all queued.
        tokio::select! {
            _ = shutdown.go_away.cancelled() => {
                session.go_away_after(CloseReason::Shutdown, "server is shutting down", SHUTDOWN_RETRY_AFTER_MS);
            }
            _ = handle.outbound.closed() => {}
        }
    }
    session.close();
    let _ = writer_task.await;
    tracing::debug!(session = handle.id, %peer, "connection closed");
}

async fn read_loop<R: AsyncRead + Unpin>(session: &mut Session, reader: R, stop: &CancellationToken) {
    let limits = session.hub().limits.clone();
    let mut frames = FrameReader::new(reader, limits.max_frame_bytes);

    // Handshake: exactly one frame, in time.
    let first = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, frames.read_frame()) => r,
        _ = stop.cancelled() => return,
    };
    let flow = match first {
        Err(_) => session.on_handshake_timeout(),
        Ok(Ok(Some(frame))) => session.on_frame(&frame).await,
        Ok(Ok(None)) => Flow::Close,
        Ok(Err(e)) => session.on_frame_error(&e),
    };
    if flow == Flow::Close {
        return;
    }

    let quiet = limits.idle_timeout / 2;
    let mut pinged = false;
    loop {
        let expires_in = session
            .token_expiry()
            .map(|exp| Duration::from_secs(exp.saturating_sub(crate::auth::unix_now())))
            .unwrap_or(Duration::MAX);
        let wait = if pinged { limits.idle_timeout - quiet } else { quiet };
        let next = tokio::select! {
            r = tokio::time::timeout(wait.min(expires_in), frames.read_frame()) => r,
            _ = stop.cancelled() => return,
        };
        let flow = match next {
            Err(_) if expires_in <= wait => session.on_token_expired(),
            Err(_) if pinged => session.on_idle_timeout(),
            Err(_) => {
                session.on_quiet();
                pinged = true;
                Flow::Continue
            }
            Ok(Ok(Some(frame))) => {
                pinged = false;
                session.on_frame(&frame).await
            }
            Ok(Ok(None)) => Flow::Close,
            Ok(Err(e)) => session.on_frame_error(&e),
        };
        if flow == Flow::Close {
            return;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(hub: Arc<Hub>, handle: Arc<SessionHandle>, mut w: W) {
    let mut buf = BytesMut::new();
    let slow = hub.limits.slow_consumer_timeout;
    loop {
        let (n, closing) = handle.outbound.drain_into(&mut buf);
        if n > 0 {
            match tokio::time::timeout(slow, w.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(session = handle.id, error = %e, "write failed");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        session = handle.id,
                        user = handle.user(),
                        "peer accepted nothing for {slow:?}; closing as a slow consumer"
                    );
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
        if handle.is_lagging() {
            if let Some(since) = handle.lagging_since()
                && since.elapsed() > slow
            {
                tracing::warn!(
                    session = handle.id,
                    user = handle.user(),
                    "behind for more than {slow:?}; closing as a slow consumer"
                );
                let g =
                    crate::proto::GoAway::new(CloseReason::SlowConsumer, "could not keep up with the rooms' messages");
                handle.outbound.close_with(Some(crate::codec::encode_frame(&crate::proto::Envelope::push(
                    crate::proto::Body::GoAway(g),
                ))));
                continue;
            }
            match handle.catch_up(&hub, CATCH_UP_STEP) {
                Ok(_) => {
                    if handle.outbound.depth().0 > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::error!(session = handle.id, error = %e, "catch-up from the log failed; closing");
                    let err = crate::session::error_frame(
                        0,
                        crate::proto::ErrorCode::Internal,
                        format!("catch-up failed: {e}"),
                    );
                    handle.outbound.close_with(Some(err));
                    continue;
                }
            }
        }
        handle.outbound.ready().await;
    }
    handle.outbound.close_with(None);
    let _ = w.shutdown().await;
}
