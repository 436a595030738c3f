//! The session core: authentication, limits and request dispatch, shared by
//! every transport (design.md §1). A transport reads frames and hands their
//! bytes to [`Session::on_frame`]; everything the session sends goes into its
//! [`SessionHandle`]'s [`Outbound`] queue, which the transport's writer
//! drains. No chat logic lives in a transport.

pub mod driver;
pub mod join;
pub mod outbound;
mod requests;
pub mod stats;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, FrameError, encode_frame};
use crate::hub::{Hub, UserEntry};
use crate::proto::{self, Body, CloseReason, Envelope, ErrorCode};
use crate::room::{CatchUp, Room};
pub use outbound::{Outbound, OutboundLimits};

/// Messages read from the log per catch-up step.
const CATCH_UP_STEP: u64 = 256;

/// The part of a session that rooms and the fan-out see.
pub struct SessionHandle {
    /// Server-unique id.
    pub id: u64,
    /// Frames waiting for the writer.
    pub outbound: Outbound,
    /// Who, once authenticated: one cell for both, 8 bytes less than two.
    identity: OnceLock<Identity>,
    /// Rooms where this session is catching up from the log; boxed, as
    /// almost every session has none (16 bytes less in every handle).
    #[expect(clippy::box_collection, reason = "a thin pointer: 8 bytes in every handle instead of 24")]
    lagging: Mutex<Option<Box<Vec<Arc<Room>>>>>,
    has_lagging: AtomicBool,
    /// Bounds publishes awaiting their ack.
    pub inflight: Arc<Semaphore>,
    /// Who, from where, and how much.
    pub stats: stats::ConnStats,
    /// The connection task's waker, kept by [`join::join`]: the halves'
    /// wakers wake it, and so does shutdown (the request loop checks the
    /// signal instead of holding a 72-byte waiter on it in every idle
    /// connection's task).
    task: futures_util::task::AtomicWaker,
    /// Which halves of the connection's task are due ([`join`]'s flags).
    wakes: AtomicU8,
    /// Index into [`TRANSPORTS`]: one byte in the padding after
    /// `has_lagging`, where a `&'static str` took 16.
    transport: u8,
}

/// The authenticated user and the device they named in `Hello`.
struct Identity {
    user: Arc<str>,
    device: Box<str>,
}

/// The transports a connection can use, named as in metrics and logs.
const TRANSPORTS: [&str; 3] = ["tcp", "tls", "ws"];

impl SessionHandle {
    /// A handle for a new connection; `transport` is "tcp", "tls" or "ws"
    /// (anything else is taken for "tcp").
    pub fn new(id: u64, limits: &crate::hub::Limits, transport: &'static str, peer: String) -> Self {
        SessionHandle {
            stats: stats::ConnStats::new(peer),
            // Any other name is counted as TCP, as the metrics do.
            transport: TRANSPORTS.iter().position(|t| *t == transport).unwrap_or(0) as u8,
            id,
            outbound: Outbound::new(limits.outbound),
            identity: OnceLock::new(),
            lagging: Mutex::new(None),
            has_lagging: AtomicBool::new(false),
            task: futures_util::task::AtomicWaker::new(),
            wakes: AtomicU8::new(0),
            inflight: Arc::new(Semaphore::new(limits.max_inflight_publishes)),
        }
    }

    /// Ready once `stop` is cancelled or the outbound queue is closed (the
    /// writer gave up on the peer, or said `GoAway`): a request loop must not
    /// keep a session alive that can no longer send anything. Registers no
    /// waker of its own: it must run in the request-loop half of
    /// [`join::join`], which shutdown wakes ([`SessionHandle::wake_reader`])
    /// and which is polled again when the writer half ends.
    pub(crate) fn stopped<'a>(&'a self, stop: &'a CancellationToken) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |_| {
            if stop.is_cancelled() || self.outbound.is_closing() { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    /// Wakes the request loop waiting in [`SessionHandle::stopped`].
    pub fn wake_reader(&self) {
        self.wakes.fetch_or(join::READER, Ordering::AcqRel);
        self.task.wake();
    }

    /// "tcp", "tls" or "ws".
    pub fn transport(&self) -> &'static str {
        TRANSPORTS[usize::from(self.transport)]
    }

    /// The authenticated user ("" before `Welcome`).
    pub fn user(&self) -> &str {
        self.identity.get().map_or("", |i| &i.user)
    }

    /// `Hello.device`, once authenticated.
    pub fn device(&self) -> Option<&str> {
        self.identity.get().map(|i| &*i.device)
    }

    /// Records who authenticated, from what device; only the first call
    /// counts.
    fn set_identity(&self, user: Arc<str>, device: &str) {
        let _ = self.identity.set(Identity { user, device: device.into() });
    }

    /// Notes that `room` has messages for this session in the log, and wakes
    /// the writer to fetch them.
    pub fn mark_lagging(&self, room: &Arc<Room>) {
        let mut l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        let rooms = l.get_or_insert_default();
        if !rooms.iter().any(|r| r.id == room.id) {
            rooms.push(room.clone());
        }
        self.has_lagging.store(true, Ordering::Release);
        drop(l);
        self.outbound.wake();
    }

    /// Whether any room is catching up.
    pub fn is_lagging(&self) -> bool {
        self.has_lagging.load(Ordering::Acquire)
    }

    /// One catch-up step for every lagging room; returns the rooms still
    /// behind. Called by the writer when its queue has room.
    pub fn catch_up(&self, hub: &Hub, step: u64) -> Result<usize, crate::store::StoreError> {
        let rooms: Vec<Arc<Room>> =
            self.lagging.lock().unwrap_or_else(|e| e.into_inner()).as_deref().cloned().unwrap_or_default();
        let mut done = Vec::new();
        let mut queued = 0;
        for room in &rooms {
            if !self.outbound.has_room_for_live() {
                break;
            }
            let step = room.catch_up(self, hub.store.as_ref(), step, &mut queued);
            hub.metrics.delivered.increment(queued);
            queued = 0;
            if step? == CatchUp::Done {
                done.push(room.id);
            }
        }
        // A room may have fallen behind again since its step said Done (the
        // fan-out found the queue full); its `mark_lagging` then saw it still
        // listed. Drop only rooms that are live now; the fan-out's
        // `mark_lagging` waits for this lock, so none is lost in between.
        let mut l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        let behind = match l.as_mut() {
            Some(rooms) => {
                rooms.retain(|r| !done.contains(&r.id) || r.lagging_since(self.id).is_some());
                rooms.len()
            }
            None => 0,
        };
        if behind == 0 {
            *l = None;
        }
        self.has_lagging.store(behind > 0, Ordering::Release);
        Ok(behind)
    }

    /// The writer's chores between writes: closes a session that stayed
    /// behind past the slow-consumer timeout, and feeds lagging rooms from
    /// the log. Returns true when frames were queued (write again at once).
    pub fn tend(&self, hub: &Hub) -> bool {
        if !self.is_lagging() {
            return false;
        }
        let slow = hub.limits.slow_consumer_timeout;
        if let Some(since) = self.lagging_since()
            && since.elapsed() > slow
        {
            tracing::warn!(
                session = self.id,
                user = self.user(),
                "behind for more than {slow:?}; closing as a slow consumer"
            );
            let g = proto::GoAway::new(CloseReason::SlowConsumer, "could not keep up with the rooms' messages");
            hub.metrics.close(CloseReason::SlowConsumer);
            hub.metrics.slow_disconnects.increment(1);
            self.outbound.close_with(Some(encode_frame(&Envelope::push(Body::GoAway(g)))));
            return true;
        }
        match self.catch_up(hub, CATCH_UP_STEP) {
            Ok(_) => self.outbound.depth().0 > 0,
            Err(e) => {
                tracing::error!(session = self.id, error = %e, "catch-up from the log failed; closing");
                self.outbound.close_with(Some(error_frame(0, ErrorCode::Internal, format!("catch-up failed: {e}"))));
                true
            }
        }
    }

    /// A write that did not complete within the slow-consumer timeout: the
    /// peer accepts nothing, so the connection is given up (no GoAway can be
    /// written to a full socket).
    pub fn write_stalled(&self, hub: &Hub) {
        hub.metrics.slow_disconnects.increment(1);
        let slow = hub.limits.slow_consumer_timeout;
        tracing::warn!(
            session = self.id,
            user = self.user(),
            "peer accepted nothing for {slow:?}; closing as a slow consumer"
        );
    }

    /// The oldest moment a lagging room of this session fell behind.
    pub fn lagging_since(&self) -> Option<std::time::Instant> {
        let l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().flat_map(|rooms| rooms.iter()).filter_map(|r| r.lagging_since(self.id)).min()
    }
}

/// What the transport should do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// The session closed its queue (a `GoAway` or final `Error` is queued):
    /// stop reading; the writer flushes and closes.
    Close,
}

enum State {
    AwaitingHello,
    Ready { user: Arc<str>, entry: Arc<UserEntry>, token_exp: u64 },
    Closed,
}

/// One connection's session state, owned by its reader.
pub struct Session {
    hub: Arc<Hub>,
    handle: Arc<SessionHandle>,
    state: State,
    transport: &'static str,
    /// Token bucket for `Typing` (tokens, last refill).
    typing_bucket: (f64, std::time::Instant),
}

/// `Typing` messages a session may send per second, and in a burst.
const TYPING_PER_SEC: f64 = 4.0;
const TYPING_BURST: f64 = 8.0;

impl Session {
    /// A session for a new connection on `transport` ("tcp", "tls", "ws").
    pub fn new(hub: Arc<Hub>, transport: &'static str, peer: String) -> Self {
        let handle = Arc::new(SessionHandle::new(hub.next_session_id(), &hub.limits, transport, peer));
        hub.register_connection(&handle);
        Session {
            hub,
            handle,
            state: State::AwaitingHello,
            transport,
            typing_bucket: (TYPING_BURST, std::time::Instant::now()),
        }
    }

    /// Counts one received frame or message of `bytes`.
    pub fn count_received(&self, bytes: usize) {
        self.handle.stats.received(bytes);
        let t = self.hub.metrics.transport(self.transport);
        t.frames_in.increment(1);
        t.bytes_in.increment(bytes as u64);
    }

    /// The span of a burst of requests: every line logged while they are
    /// handled carries the connection's ids. The request loop makes one per
    /// burst rather than holding one for the connection's life, because a
    /// live span keeps its formatted fields (~0.5 KiB) on every idle
    /// connection; lines logged outside a request name the session
    /// themselves.
    pub fn span(&self) -> tracing::Span {
        let h = &self.handle;
        let span = tracing::info_span!(
            "conn",
            id = h.id,
            transport = self.transport,
            peer = %h.stats.peer,
            user = tracing::field::Empty
        );
        if let Some(i) = h.identity.get() {
            span.record("user", &*i.user);
        }
        span
    }

    /// The handle the writer drains.
    pub fn handle(&self) -> &Arc<SessionHandle> {
        &self.handle
    }

    /// The hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Takes a token from the session's typing bucket.
    fn take_typing_token(&mut self) -> bool {
        let (tokens, at) = &mut self.typing_bucket;
        let now = std::time::Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * TYPING_PER_SEC).min(TYPING_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether `Welcome` was sent.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// The token's expiry (Unix seconds), once authenticated.
    pub fn token_expiry(&self) -> Option<u64> {
        match &self.state {
            State::Ready { token_exp, .. } => Some(*token_exp),
            _ => None,
        }
    }

    /// Handles one frame's bytes (the envelope, without prefix).
    pub async fn on_frame(&mut self, frame: &[u8]) -> Flow {
        if matches!(self.state, State::Closed) {
            return Flow::Close;
        }
        let env = match codec::decode_envelope(frame) {
            Ok(env) => env,
            Err(e) => {
                let id = codec::peek_request_id(frame).unwrap_or(0);
                tracing::debug!(session = self.handle.id, error = %e, "undecodable frame");
                let message = format!("frame is not a valid Envelope: {e}");
                if matches!(self.state, State::AwaitingHello) {
                    // Nothing is owed to a peer that cannot even say hello.
                    return self.refuse(id, ErrorCode::BadRequest, CloseReason::ProtocolError, message);
                }
                return self.reject(id, ErrorCode::BadRequest, message);
            }
        };
        self.on_envelope(env).await
    }

    /// Handles one decoded envelope.
    pub async fn on_envelope(&mut self, env: Envelope) -> Flow {
        let id = env.id;
        let Some(body) = env.body else {
            return self.reject(id, ErrorCode::BadRequest, "envelope has no body");
        };
        match &self.state {
            State::Closed => Flow::Close,
            State::AwaitingHello => match body {
                Body::Hello(h) => {
                    self.hub.metrics.requests.increment(1);
                    self.hello(id, h)
                }
                other => self.refuse(
                    id,
                    ErrorCode::Unauthenticated,
                    CloseReason::AuthFailed,
                    format!("the first frame must be hello, got {}", other.name()),
                ),
            },
            State::Ready { .. } => {
                if !matches!(body, Body::Pong(_) | Body::Typing(_)) {
                    self.hub.metrics.requests.increment(1);
                }
                // Replies must not pile up for a client that does not read.
                self.handle.outbound.wait_writable().await;
                self.request(id, body).await
            }
        }
    }

    /// A framing violation: `Error{TOO_LARGE}`, `GoAway{PROTOCOL_ERROR}`, close.
    pub fn on_frame_error(&mut self, err: &FrameError) -> Flow {
        match err {
            FrameError::TooLarge { max } => {
                tracing::info!(session = self.handle.id, max, "oversize frame; closing");
                self.refuse(
                    0,
                    ErrorCode::TooLarge,
                    CloseReason::ProtocolError,
                    format!("frame exceeds max_frame_bytes ({max})"),
                )
            }
            FrameError::Truncated | FrameError::Io(_) => {
                self.release();
                Flow::Close
            }
        }
    }

    /// A message that could not be decoded (e.g. invalid JSON).
    pub fn on_malformed(&mut self, id: u64, reason: String) -> Flow {
        tracing::debug!(session = self.handle.id, %reason, "malformed message");
        if matches!(self.state, State::AwaitingHello) {
            return self.refuse(id, ErrorCode::BadRequest, CloseReason::ProtocolError, reason);
        }
        self.reject(id, ErrorCode::BadRequest, reason)
    }

    /// No `Hello` within the handshake timeout.
    pub fn on_handshake_timeout(&mut self) -> Flow {
        let secs = self.hub.limits.handshake_timeout.as_secs_f32();
        tracing::info!(session = self.handle.id, "no hello within {secs}s; closing");
        self.refuse(0, ErrorCode::Unauthenticated, CloseReason::AuthFailed, format!("no hello within {secs}s"))
    }

    /// Silent for half the idle timeout: ask the client to prove it is there.
    pub fn on_quiet(&mut self) {
        let ping = Envelope::push(Body::Ping(proto::Ping { nonce: crate::auth::unix_now() }));
        let _ = self.handle.outbound.push(encode_frame(&ping));
    }

    /// Silent for the whole idle timeout.
    pub fn on_idle_timeout(&mut self) -> Flow {
        tracing::info!(session = self.handle.id, user = self.handle.user(), "idle timeout; closing");
        self.go_away(CloseReason::IdleTimeout, "no frame received within the idle timeout")
    }

    /// The token expired during the session.
    pub fn on_token_expired(&mut self) -> Flow {
        tracing::info!(session = self.handle.id, user = self.handle.user(), "token expired; closing");
        self.go_away(CloseReason::AuthExpired, "token expired; reconnect with a fresh token")
    }

    /// Sends `GoAway` and closes.
    pub fn go_away(&mut self, reason: CloseReason, message: &str) -> Flow {
        self.go_away_after(reason, message, 0)
    }

    /// Sends `GoAway` with a retry hint and closes.
    pub fn go_away_after(&mut self, reason: CloseReason, message: &str, retry_after_ms: u32) -> Flow {
        let mut g = proto::GoAway::new(reason, message);
        g.retry_after_ms = retry_after_ms;
        self.hub.metrics.close(reason);
        self.handle.outbound.close_with(Some(encode_frame(&Envelope::push(Body::GoAway(g)))));
        // Released now, not when the writer has flushed the GoAway: the user
        // is gone from this moment on (presence, limits), and a writer facing
        // a full socket may take up to the slow-consumer timeout.
        self.release();
        Flow::Close
    }

    /// Queues an `Error` reply; the connection stays open.
    fn reject(&mut self, id: u64, code: ErrorCode, message: impl Into<String>) -> Flow {
        let message = message.into();
        tracing::debug!(session = self.handle.id, user = self.handle.user(), request = id, ?code, %message, "request refused");
        self.hub.metrics.error(code);
        let _ = self.handle.outbound.push(error_frame(id, code, message));
        Flow::Continue
    }

    /// Queues an `Error`, then `GoAway{reason}`, and closes.
    fn refuse(&mut self, id: u64, code: ErrorCode, reason: CloseReason, message: String) -> Flow {
        self.hub.metrics.error(code);
        let _ = self.handle.outbound.push(error_frame(id, code, message.clone()));
        self.go_away(reason, &message)
    }

    /// Leaves every room subscription and the user's session list, and says
    /// the user went offline where this was their last session. Runs once
    /// per authenticated session however it ends: whichever of
    /// [`Session::go_away_after`] and [`Session::close`] comes first takes
    /// the `Ready` state, and the other finds `Closed`.
    fn release(&mut self) {
        let State::Ready { entry, user, .. } = std::mem::replace(&mut self.state, State::Closed) else {
            return;
        };
        let mut st = entry.lock();
        st.sessions.retain(|s| s.id != self.handle.id);
        let last = st.sessions.is_empty();
        for room in st.rooms.values() {
            room.unsubscribe(self.handle.id);
            if last {
                if room.is_typing(&user) {
                    self.hub.typing(room, &user, false, None);
                }
                self.hub.presence(room, &user, 0, None);
            }
        }
        drop(st);
        // Last: whoever sees the gauge drop may rely on the presence push
        // being queued to the room already.
        self.hub.metrics.sessions.decrement(1.0);
        tracing::debug!(session = self.handle.id, user = %user, "session released");
    }

    /// Releases the session (if a `GoAway` has not already) and forgets the
    /// connection. Called by the transport when the connection ends, and
    /// again on drop (both steps are idempotent).
    pub fn close(&mut self) {
        self.release();
        self.handle.outbound.close_with(None);
        self.hub.deregister_connection(self.handle.id);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// An `Error` reply frame.
pub fn error_frame(id: u64, code: ErrorCode, message: impl Into<String>) -> Bytes {
    encode_frame(&Envelope::new(id, Body::Error(proto::Error::new(code, message))))
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_handle_stays_in_a_320_byte_allocation() {
        // Idle memory per connection (issue 6): the handle lives in an
        // `Arc` (two counts, 16 bytes, before it). mimalloc's size classes
        // around it are 256, 320 and 384 bytes; at 376 it took 384, now 320.
        let size = std::mem::size_of::<SessionHandle>() + 16;
        assert!(size <= 320, "Arc<SessionHandle> is {size} bytes: past mimalloc's 320-byte class");
    }
}
