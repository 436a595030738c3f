//! The transport-independent part of serving a connection: the request loop
//! with its deadlines — `Hello` within the handshake timeout, a `Ping` after
//! half the idle timeout and `GoAway{IDLE_TIMEOUT}` after all of it, and
//! `GoAway{AUTH_EXPIRED}` when the token expires — and the order of a
//! graceful shutdown. A transport supplies a [`Source`] of incoming messages
//! and a writer that drains the session's queue.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::{Flow, Session};
use crate::codec::FrameError;
use crate::proto::{CloseReason, Envelope};

/// One thing a transport received.
pub enum Incoming {
    /// A protobuf-encoded envelope (a TCP frame or a WebSocket binary message).
    Protobuf(bytes::Bytes),
    /// An envelope decoded from JSON (a WebSocket text message), and the
    /// message's size in bytes. Boxed: an `Envelope` is ~150 bytes, and the
    /// request loop of every idle connection holds room for one `Incoming`.
    Json(Box<Envelope>, usize),
    /// A message that could not be decoded; `id` if it could be read.
    Malformed {
        /// Request id, 0 if unknown.
        id: u64,
        /// What was wrong.
        reason: String,
    },
    /// A framing violation (oversize length, truncated frame, I/O error).
    Broken(FrameError),
    /// The peer closed the connection.
    End,
}

/// Where a connection's incoming messages come from.
pub trait Source: Send {
    /// The next message.
    fn next(&mut self) -> impl Future<Output = Incoming> + Send;

    /// Whether part of the next message is already received, so the request
    /// loop is in a burst rather than about to wait (false if unknown).
    fn has_buffered(&self) -> bool {
        false
    }
}

/// The signals of a graceful shutdown, in the order the server gives them.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking requests (the readers' part of the drain).
    pub stop_reading: CancellationToken,
    /// Every pending write is committed and acked: say `GoAway{SHUTDOWN}`.
    pub go_away: CancellationToken,
    /// Counts the readers still running; shutdown waits for them before it
    /// commits the last writes.
    pub readers: TaskTracker,
}

/// How long clients are asked to wait before reconnecting after a shutdown.
const SHUTDOWN_RETRY_AFTER_MS: u32 = 1000;

/// Reads and handles requests until the connection ends or the session
/// closes; at shutdown, waits for the server's signal and says `GoAway`.
pub async fn serve_requests<S: Source>(session: &mut Session, source: &mut S, shutdown: &Shutdown) {
    let max = session.hub().limits.max_connections;
    if session.hub().connection_count() > max {
        static FULL: crate::logs::Throttle = crate::logs::Throttle::new(1000);
        if let Some(suppressed) = FULL.allow() {
            tracing::warn!(max, suppressed, "connection limit reached; refusing new connections");
        }
        session.go_away_after(CloseReason::Capacity, "the server is at its connection limit; try again later", 5000);
        session.close();
        return;
    }
    let reading = shutdown.readers.token();
    read_loop(session, source, &shutdown.stop_reading).await;
    drop(reading);
    let handle = session.handle().clone();
    if shutdown.stop_reading.is_cancelled() && !handle.outbound.is_closing() {
        // Acks of the last commits still flow out through the writer;
        // GoAway follows once they are all queued.
        tokio::select! {
            _ = shutdown.go_away.cancelled() => {
                session.go_away_after(CloseReason::Shutdown, "server is shutting down", SHUTDOWN_RETRY_AFTER_MS);
            }
            _ = handle.outbound.closed() => {}
        }
    }
    session.close();
}

/// Handles one incoming message. A large future (a publish or join in
/// flight): the read loop boxes it, so it is allocated per request instead
/// of sizing every idle connection's task for it.
async fn handle(session: &mut Session, incoming: Incoming) -> Flow {
    match incoming {
        Incoming::Protobuf(frame) => {
            session.count_received(frame.len());
            session.on_frame(&frame).await
        }
        Incoming::Json(env, size) => {
            session.count_received(size);
            session.on_envelope(*env).await
        }
        Incoming::Malformed { id, reason } => session.on_malformed(id, reason),
        Incoming::Broken(e) => session.on_frame_error(&e),
        Incoming::End => Flow::Close,
    }
}

/// The request loop. Every connection's task holds this future for its
/// whole life, so it keeps little across its waits: the limits it needs, not
/// a copy of them all, and request handling in a box of its own.
async fn read_loop<S: Source>(session: &mut Session, source: &mut S, stop: &CancellationToken) {
    let (handshake_timeout, idle_timeout) = {
        let limits = &session.hub().limits;
        (limits.handshake_timeout, limits.idle_timeout)
    };
    let me = session.handle().clone();
    // The span of the requests of the current burst (frames already read),
    // made once per burst and dropped before the loop waits, so an idle
    // connection holds none.
    let mut span: Option<tracing::Span> = None;
    // `stopped` first: a connection whose writer has given up (or a server
    // shutting down) handles no more requests, even ones already received.
    let flow = tokio::select! {
        biased;
        _ = me.stopped(stop) => return,
        r = tokio::time::timeout(handshake_timeout, source.next()) => match r {
            Err(_) => session.on_handshake_timeout(),
            Ok(incoming) => {
                let span = span.insert(session.span()).clone();
                Box::pin(handle(session, incoming).instrument(span)).await
            },
        },
    };
    if flow == Flow::Close {
        return;
    }
    let mut pinged = false;
    loop {
        // Computed in a block so that only the flag outlives the wait.
        let (limit, expiring) = {
            let quiet = idle_timeout / 2;
            let wait = if pinged { idle_timeout - quiet } else { quiet };
            let expires_in = session
                .token_expiry()
                .map(|exp| Duration::from_secs(exp.saturating_sub(crate::auth::unix_now())))
                .unwrap_or(Duration::MAX);
            (wait.min(expires_in), expires_in <= wait)
        };
        if !source.has_buffered() {
            span = None;
        }
        let next = tokio::select! {
            biased;
            _ = me.stopped(stop) => return,
            r = tokio::time::timeout(limit, source.next()) => r,
        };
        let flow = match next {
            Err(_) if expiring => session.on_token_expired(),
            Err(_) if pinged => session.on_idle_timeout(),
            Err(_) => {
                session.on_quiet();
                pinged = true;
                Flow::Continue
            }
            Ok(incoming) => {
                pinged = false;
                let span = span.get_or_insert_with(|| session.span()).clone();
                Box::pin(handle(session, incoming).instrument(span)).await
            }
        };
        if flow == Flow::Close {
            return;
        }
    }
}

/// Wakes every connection's request loop after `Shutdown::stop_reading`
/// was cancelled (see `Subscriber::stopped` in [`super::join`]).
pub fn wake_all_for_shutdown(hub: &crate::hub::Hub) {
    for handle in hub.connections() {
        handle.wake_reader();
    }
}
