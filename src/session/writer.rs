//! The writer's side of a connection that does not depend on the
//! transport: the slow-consumer policy (ARCHITECTURE.md, "Slow consumers")
//! and feeding rooms a subscriber fell behind in from the log.

use crate::codec::encode_frame;
use crate::delivery::Subscriber;
use crate::hub::Hub;
use crate::proto::{self, Body, CloseReason, Envelope, ErrorCode};

/// Messages read from the log per catch-up step.
const CATCH_UP_STEP: u64 = 256;

/// The writer's chores between writes: closes a session that stayed behind
/// past the slow-consumer timeout, and feeds lagging rooms from the log.
/// Returns true when frames were queued (write again at once).
pub fn tend(sub: &Subscriber, hub: &Hub) -> bool {
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
    match sub.catch_up(hub.store.as_ref(), CATCH_UP_STEP) {
        Ok((_, queued)) => {
            hub.metrics.delivered.increment(queued);
            sub.outbound.depth().0 > 0
        }
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
pub fn write_stalled(sub: &Subscriber, hub: &Hub) {
    hub.metrics.slow_disconnects.increment(1);
    let slow = hub.limits.slow_consumer_timeout;
    tracing::warn!(
        session = sub.id,
        user = sub.user(),
        "peer accepted nothing for {slow:?}; closing as a slow consumer"
    );
}
