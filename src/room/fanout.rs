//! The fan-out stage: takes committed batches from the group commit, in
//! commit order, and for each message raises the room's head, offers the one
//! shared frame to the room's subscribers, then acknowledges the publisher
//! (and any retry of the same `client_msg_id` that arrived meanwhile).
//!
//! Acks are sent only here, so only after the batch is durable. Because one
//! task consumes batches in order and each room's appends are in seq order
//! within the commit queue, every session sees a room's messages in seq
//! order.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{Room, message_frame};
use crate::codec::encode_frame;
use crate::hub::Hub;
use crate::proto::{self, Body, Envelope, ErrorCode};
use crate::session::SessionHandle;
use crate::session::outbound::Frame;
use crate::store::StoreError;
use crate::store::commit::Committed;

/// What the fan-out does with a write once its batch is committed.
pub enum Completion {
    /// A message: deliver it, then ack the publisher.
    Publish(Box<PublishDone>),
    /// Anything else: wake whoever waits for it.
    Notify(oneshot::Sender<Result<(), Arc<StoreError>>>),
}

/// The parts of a publish needed after its commit.
pub struct PublishDone {
    /// Its room.
    pub room: Arc<Room>,
    /// Assigned seq.
    pub seq: u64,
    /// Server timestamp.
    pub ts_ms: u64,
    /// The encoded `Message`.
    pub message: Bytes,
    /// The publishing session.
    pub session: Arc<SessionHandle>,
    /// Request id of the `Publish`.
    pub request_id: u64,
    /// Idempotency key (empty: none).
    pub client_msg_id: String,
    /// Sender user id.
    pub sender: Arc<str>,
    /// Bounds the publisher's in-flight publishes; released with the ack.
    pub permit: OwnedSemaphorePermit,
    /// When the `Publish` was read, for the latency histograms.
    pub received: std::time::Instant,
}

/// Runs the fan-out until the group commit stops.
pub async fn run(hub: Arc<Hub>, mut rx: mpsc::Receiver<Committed<Completion>>) {
    while let Some(batch) = rx.recv().await {
        if batch.recovered {
            hub.commits.recovered();
            continue;
        }
        for c in batch.completions {
            match c {
                Completion::Publish(p) => match &batch.result {
                    Ok(()) => deliver(&hub, *p),
                    Err(e) => fail(&hub, *p, e),
                },
                Completion::Notify(tx) => {
                    let _ = tx.send(batch.result.clone());
                }
            }
        }
    }
}

fn deliver(hub: &Hub, p: PublishDone) {
    let frame = Frame::shared(message_frame(&p.message));
    let delivered = p.room.fan_out(p.seq, &frame);
    let m = &hub.metrics;
    m.publish_delivery.record(p.received.elapsed().as_secs_f64());
    m.delivered.increment(delivered);
    m.published.increment(1);
    let ack = |id: u64, duplicate: bool| {
        encode_frame(&Envelope::new(
            id,
            Body::PublishAck(proto::PublishAck {
                room: p.room.name.to_string(),
                seq: p.seq,
                ts_ms: p.ts_ms,
                client_msg_id: p.client_msg_id.clone(),
                duplicate,
            }),
        ))
    };
    let _ = p.session.outbound.push(ack(p.request_id, false));
    let latency = p.received.elapsed();
    m.publish_ack.record(latency.as_secs_f64());
    p.room.stats.record_publish(latency, p.ts_ms / 1000);
    if !p.client_msg_id.is_empty() {
        for (session, id) in hub.settle_idempotent(&p.sender, &p.client_msg_id) {
            m.duplicates.increment(1);
            let _ = session.outbound.push(ack(id, true));
        }
    }
}

fn fail(hub: &Hub, p: PublishDone, e: &StoreError) {
    let err = |id| {
        encode_frame(&Envelope::new(
            id,
            Body::Error(proto::Error::new(ErrorCode::Internal, format!("message not stored: {e}"))),
        ))
    };
    hub.metrics.error(ErrorCode::Internal);
    let _ = p.session.outbound.push(err(p.request_id));
    if !p.client_msg_id.is_empty() {
        for (session, id) in hub.settle_idempotent(&p.sender, &p.client_msg_id) {
            let _ = session.outbound.push(err(id));
        }
    }
}
