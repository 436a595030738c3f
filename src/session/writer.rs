//! The writer stage, one for every transport: drain the connection's queue,
//! write it in one go, count what was written once it is written, give up
//! on a peer that takes nothing within the slow-consumer timeout, close with
//! a reason; between writes, feed the rooms the subscriber fell behind in
//! from the log, and close a subscriber that stays behind too long
//! (ARCHITECTURE.md, "Slow consumers").
//!
//! A transport supplies only a [`Sink`]: how to write what the queue holds
//! (TCP and TLS: the frames' bytes, back to back, in one write; WebSocket: one
//! message per frame, binary or JSON), and how to say goodbye.

use std::future::Future;
use std::time::Duration;

use crate::codec::encode_frame;
use crate::delivery::{Outbound, Subscriber};
use crate::hub::Hub;
use crate::proto::{self, Body, CloseReason, Envelope, ErrorCode};

/// Where a connection's writer puts what its queue holds.
///
/// Each call is given the slow-consumer timeout as `deadline`: a sink that
/// has to wait for its peer must give up after it ([`WriteError::Stalled`]).
/// A sink arms its timer only when it has to wait (every idle connection's
/// task holds the writer's state; a timer is ~120 bytes of it).
pub trait Sink {
    /// Takes what `queue` holds and writes it, all of it, or fails.
    fn write(&mut self, queue: &Outbound, deadline: Duration) -> impl Future<Output = Result<Written, WriteError>>;

    /// The queue was closed and all of it written: send what ends the
    /// connection on this transport (a WebSocket close frame with its code;
    /// a flush on a byte stream).
    fn close(&mut self, deadline: Duration) -> impl Future<Output = ()>;

    /// The writer is done, however it ended: shut the write side (TLS says
    /// `close_notify`, which a full socket would hold forever, hence the
    /// deadline).
    fn shutdown(&mut self, deadline: Duration) -> impl Future<Output = ()>;

    /// Nothing to write: drop buffers an idle connection need not keep.
    fn idle(&mut self) {}
}

/// What one [`Sink::write`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Frames (or WebSocket messages) written.
    pub frames: usize,
    /// Bytes written, as the transport counts them (a WebSocket message's
    /// payload, a frame's prefix and envelope).
    pub bytes: usize,
    /// The queue is closing: everything before the close is written.
    pub closing: bool,
}

/// Why a write did not complete.
#[derive(Debug)]
pub enum WriteError {
    /// The peer accepted nothing for the slow-consumer timeout.
    Stalled,
    /// The transport failed (reset, broken pipe).
    Failed(String),
}

/// Runs the writer until the connection's queue is closed and written, or
/// the transport fails. Frames are counted as sent only once written: a
/// batch lost with the connection was never sent.
pub async fn run<S: Sink>(hub: &Hub, sub: &Subscriber, sink: &mut S) {
    let counters = hub.metrics.transport(sub.transport());
    let deadline = hub.limits.slow_consumer_timeout;
    loop {
        let closing = match sink.write(&sub.outbound, deadline).await {
            Ok(w) => {
                if w.frames > 0 {
                    sub.stats.sent(w.frames, w.bytes);
                    counters.frames_out.increment(w.frames as u64);
                    counters.bytes_out.increment(w.bytes as u64);
                }
                w.closing
            }
            Err(WriteError::Failed(e)) => {
                tracing::debug!(session = sub.id, transport = sub.transport(), error = %e, "write failed");
                break;
            }
            Err(WriteError::Stalled) => {
                write_stalled(sub, hub);
                break;
            }
        };
        if closing {
            sink.close(deadline).await;
            break;
        }
        if tend(sub, hub) {
            continue;
        }
        sink.idle();
        sub.outbound.writer_idle();
        sub.outbound.ready().await;
    }
    sub.outbound.close_with(None);
    sink.shutdown(deadline).await;
}

/// Messages read from the log per catch-up step.
const CATCH_UP_STEP: u64 = 256;

/// The writer's chores between writes: closes a session that stayed behind
/// past the slow-consumer timeout, and feeds lagging rooms from the log.
/// Returns true when frames were queued (write again at once).
fn tend(sub: &Subscriber, hub: &Hub) -> bool {
    if !sub.is_lagging() {
        return false;
    }
    let slow = hub.limits.slow_consumer_timeout;
    if let Some(since) = sub.lagging_since()
        && since.elapsed() > slow
    {
        tracing::warn!(
            session = sub.id,
            user = sub.user(),
            "behind for more than {slow:?}; closing as a slow consumer"
        );
        let g = proto::GoAway::new(CloseReason::SlowConsumer, "could not keep up with the rooms' messages");
        hub.metrics.close(CloseReason::SlowConsumer);
        hub.metrics.slow_disconnects.increment(1);
        sub.outbound.close_with(Some(encode_frame(&Envelope::push(Body::GoAway(g)))));
        return true;
    }
    let mut queued = 0;
    let step = sub.catch_up(hub.store.as_ref(), CATCH_UP_STEP, &mut queued);
    hub.metrics.delivered.increment(queued);
    match step {
        Ok(_) => sub.outbound.depth().0 > 0,
        Err(e) => {
            tracing::error!(session = sub.id, error = %e, "catch-up from the log failed; closing");
            let error = proto::Error::new(ErrorCode::Internal, format!("catch-up failed: {e}"));
            sub.outbound.close_with(Some(encode_frame(&Envelope::push(Body::Error(error)))));
            true
        }
    }
}

/// A write that did not complete within the slow-consumer timeout: the peer
/// accepts nothing, so the connection is given up (no GoAway can be written
/// to a full socket).
fn write_stalled(sub: &Subscriber, hub: &Hub) {
    hub.metrics.slow_disconnects.increment(1);
    let slow = hub.limits.slow_consumer_timeout;
    tracing::warn!(
        session = sub.id,
        user = sub.user(),
        "peer accepted nothing for {slow:?}; closing as a slow consumer"
    );
}
