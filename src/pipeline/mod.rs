//! The publish pipeline after the append is queued: the group commit's
//! completions, the fan-out stage that delivers committed messages and then
//! acknowledges them, and the idempotency keys in flight between the two
//! (ARCHITECTURE.md, "Data path").
//!
//! Below the hub and above rooms: a session submits a publish through
//! [`Pipeline::commits`] with a [`Completion`]; the group commit
//! (`store::commit`) makes the batch durable and hands the completions to
//! [`fanout::run`], which raises each room's head, offers the messages to
//! the room's subscribers, and only then acks the publishers and any retry
//! of the same key that arrived meanwhile ([`idempotency::InFlight`]).

pub mod fanout;
pub mod idempotency;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::delivery::Subscriber;
use crate::metrics::Metrics;
use crate::room::Room;
use crate::store::StoreError;
use crate::store::commit::CommitQueue;

/// What the pipeline shares between the sessions that submit writes and the
/// fan-out stage that completes them.
pub struct Pipeline {
    /// The group commit's queue: every write to the store goes through it.
    pub commits: CommitQueue<Completion>,
    /// Idempotency keys whose publish is committed but not yet acked.
    pub in_flight: idempotency::InFlight,
    /// Metric handles (the hub's, shared).
    pub metrics: Metrics,
}

impl Pipeline {
    /// A pipeline over `commits`, counting into `metrics`.
    pub fn new(commits: CommitQueue<Completion>, metrics: Metrics) -> Self {
        Pipeline { commits, in_flight: Default::default(), metrics }
    }
}

/// What the fan-out does with a write once its batch is committed.
pub enum Completion {
    /// A message: deliver it, then ack the publisher.
    Publish(Box<PublishDone>),
    /// Anything else: wake whoever waits for it.
    Notify(oneshot::Sender<Result<(), Arc<StoreError>>>),
}

/// Who is answered when a publish is stored: a session (with the request's
/// id) or a server API call.
pub enum Publisher {
    /// The ack, or the error, is queued to the session with this id.
    Session(Arc<Subscriber>, u64),
    /// The ack, or why it failed, goes back through the channel.
    Api(oneshot::Sender<Result<crate::proto::PublishAck, (crate::proto::ErrorCode, String)>>),
}

impl Publisher {
    /// Answers with `ack`.
    pub fn ack(self, ack: crate::proto::PublishAck) {
        match self {
            Publisher::Session(session, id) => {
                let frame =
                    crate::codec::encode_frame(&crate::proto::Envelope::new(id, crate::proto::Body::PublishAck(ack)));
                let _ = session.outbound.push(frame);
            }
            Publisher::Api(tx) => {
                let _ = tx.send(Ok(ack));
            }
        }
    }

    /// Answers that the message was not stored (a failure of the server).
    pub fn fail(self, message: String) {
        self.refuse(crate::proto::ErrorCode::Internal, message);
    }

    /// Answers that the message was not stored, with `code` (`FORBIDDEN`,
    /// `SERVER_BUSY`…) and why.
    pub fn refuse(self, code: crate::proto::ErrorCode, message: String) {
        match self {
            Publisher::Session(session, id) => {
                let error = crate::proto::Error::new(code, message);
                let frame =
                    crate::codec::encode_frame(&crate::proto::Envelope::new(id, crate::proto::Body::Error(error)));
                let _ = session.outbound.push(frame);
            }
            Publisher::Api(tx) => {
                let _ = tx.send(Err((code, message)));
            }
        }
    }
}

/// Who waits for the acknowledgement of entries appended elsewhere than
/// through this pipeline (a cluster node's own publishes come back from
/// Redis; `hub::cluster`): asked by the fan-out when it acknowledges such
/// an entry, so that acks keep the entries' order.
pub trait Claims: Send + Sync {
    /// The publisher of `seq` in `room` waiting for its ack, with its
    /// in-flight permit and when its request was read; `None` if its
    /// answer has not come yet (it is then acked when it does).
    fn claim(
        &self,
        room: crate::store::RoomId,
        seq: u64,
    ) -> Option<(Publisher, Option<OwnedSemaphorePermit>, std::time::Instant)>;
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
    /// Who is answered: nobody for an entry another cluster node appended
    /// (its own publisher is answered there), or whoever `claims` names.
    pub publisher: Option<Publisher>,
    /// Where the publisher of an entry appended elsewhere is found.
    pub claims: Option<Arc<dyn Claims>>,
    /// Idempotency key (empty: none).
    pub client_msg_id: String,
    /// The idempotency key's owner (`store::idempotency_owner`: the sender,
    /// or for the system the room).
    pub sender: Arc<str>,
    /// Bounds a session's in-flight publishes; released with the ack.
    pub permit: Option<OwnedSemaphorePermit>,
    /// When the `Publish` was read, for the latency histograms.
    pub received: std::time::Instant,
    /// What the entry is (for the room's unread counters).
    pub entry: crate::store::Entry,
    /// For a `Delete`: who sent the deleted message, and whom it mentioned.
    pub erased: Option<Box<(Arc<str>, Vec<String>)>>,
}
