//! The session core: authentication, limits and request dispatch, shared by
//! every transport (ARCHITECTURE.md, "Data path"). A transport reads frames
//! and hands their bytes to [`Session::on_frame`]; everything the session
//! sends goes into its [`Subscriber`]'s outbound queue, which the
//! transport's writer drains. No chat logic lives in a transport.

pub mod driver;
pub mod join;
mod requests;
pub mod writer;

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{self, FrameError, encode_frame};
use crate::delivery::Subscriber;
use crate::hub::{Hub, UserEntry};
use crate::proto::{self, Body, CloseReason, Envelope, ErrorCode};

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
    handle: Arc<Subscriber>,
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
        let limits = &hub.limits;
        let handle = Arc::new(Subscriber::new(
            hub.next_session_id(),
            limits.outbound,
            limits.max_inflight_publishes,
            transport,
            peer,
        ));
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
        if !h.user().is_empty() {
            span.record("user", h.user());
        }
        span
    }

    /// The handle the writer drains.
    pub fn handle(&self) -> &Arc<Subscriber> {
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
                    // A cluster node first reads what the user did on others.
                    let pinned = match self.hub.cluster_before_hello(&h.token).await {
                        Ok(pinned) => pinned,
                        Err(r) => return self.refuse(id, r.code, CloseReason::Unspecified, r.message),
                    };
                    let flow = self.hello(id, h).await;
                    drop(pinned);
                    flow
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
        let ping = Envelope::push(Body::Ping(proto::Ping { nonce: crate::time::unix_now() }));
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
            if last && room.is_typing(&user) {
                self.hub.typing(room, &user, false, None);
            }
        }
        if last {
            self.hub.session_presence(st.rooms.values().cloned().collect(), &user, 0, None);
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
