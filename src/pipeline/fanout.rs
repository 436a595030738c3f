//! The fan-out stage: takes committed batches from the group commit, in
//! commit order, and for each room in a batch raises the room's head, offers
//! the messages' shared frames to the room's subscribers (one queue lock and
//! at most one writer wake-up per subscriber per batch), then acknowledges
//! the publishers (and any retry of the same `client_msg_id` that arrived
//! meanwhile). A batch whose fan-out writes many sockets itself is delivered
//! in slices, each acknowledged before the stage yields its worker.
//!
//! Acks are sent only here, so only after the batch is durable. Because one
//! task consumes batches in order and each room's appends are in seq order
//! within the commit queue, every session sees a room's messages in seq
//! order.

use std::sync::Arc;

use tokio::sync::mpsc;

#[cfg(test)]
use super::Publisher;
use super::{Completion, Pipeline, PublishDone};
use crate::delivery::{Run, put_message_frame};
use crate::proto::{self, ErrorCode};
use crate::store::StoreError;
use crate::store::commit::Committed;

/// Runs the fan-out until the group commit stops.
pub async fn run(pipeline: Arc<Pipeline>, mut rx: mpsc::Receiver<Committed<Completion>>) {
    let mut published = Vec::new();
    while let Some(batch) = rx.recv().await {
        if batch.recovered {
            pipeline.commits.recovered();
            continue;
        }
        for c in batch.completions {
            match c {
                Completion::Publish(p) => match &batch.result {
                    Ok(()) => published.push(*p),
                    Err(e) => fail(&pipeline, *p, e),
                },
                Completion::Notify(tx) => {
                    // Whoever waits (a join about to subscribe at the head)
                    // must see every message committed before its write.
                    deliver(&pipeline, &mut published).await;
                    let _ = tx.send(batch.result.clone());
                }
            }
        }
        deliver(&pipeline, &mut published).await;
    }
}

/// A room's messages from one batch are encoded into runs of about this
/// many bytes. A subscriber whose queue took only part of a run keeps all of
/// it alive until written, so a run is kept well below a queue's byte bound.
const RUN_BYTES: usize = 64 * 1024;

/// A message's push frame is its encoding plus at most this much: the
/// length prefix, and the envelope's field key and length (16 bytes is room
/// for both varints).
const FRAME_OVERHEAD: usize = crate::codec::PREFIX_LEN + 16;

/// How many of the frames of these sizes go into the next run: the first,
/// then as many as keep the run within [`RUN_BYTES`].
fn run_len(sizes: impl IntoIterator<Item = usize>) -> usize {
    let (mut total, mut n) = (0, 0);
    for size in sizes {
        if n > 0 && total + size > RUN_BYTES {
            break;
        }
        total += size;
        n += 1;
    }
    n
}

/// Encodes one room's messages (`(seq, encoded Message)` of each item, in
/// seq order) into runs of at most [`RUN_BYTES`] (or one message), and hands
/// each run to `f` with its seqs.
fn encode_runs<T>(items: &[T], message: impl Fn(&T) -> (u64, &[u8]), mut f: impl FnMut(&[u64], &Arc<Run>)) {
    let (mut seqs, mut ends) = (Vec::new(), Vec::new());
    let size = |t: &T| message(t).1.len() + FRAME_OVERHEAD;
    let mut rest = items;
    while !rest.is_empty() {
        let (part, after) = rest.split_at(run_len(rest.iter().map(size)));
        rest = after;
        let mut wire = bytes::BytesMut::with_capacity(part.iter().map(size).sum());
        seqs.clear();
        ends.clear();
        for t in part {
            let (seq, msg) = message(t);
            put_message_frame(msg, &mut wire);
            seqs.push(seq);
            ends.push(wire.len());
        }
        f(&seqs, &Run::new(wire.freeze(), &ends));
    }
}

/// Delivers the committed publishes (in commit order), each room's messages
/// encoded once into shared runs and offered by [`Room::fan_out`], then
/// acknowledges them. A batch touching many small rooms is delivered in
/// slices: once the fan-out has written [`crate::room::WRITE_THROUGH_PER_SLICE`]
/// sockets itself, it acknowledges the rooms delivered so far and yields at
/// the next room boundary, then goes on with a fresh budget — so neither the
/// worker nor those publishers' acks wait for all of the batch's sends, and
/// the next slice's small rooms are written from the fan-out again instead
/// of being queued for their writers.
async fn deliver(pipeline: &Pipeline, published: &mut Vec<PublishDone>) {
    if published.is_empty() {
        return;
    }
    // A stable sort keeps each room's messages in seq order.
    published.sort_by_key(|p| p.room.id);
    let m = &pipeline.metrics;
    let mut budget = crate::room::WRITE_THROUGH_PER_SLICE;
    let mut next = 0;
    while next < published.len() {
        let room = &published[next].room;
        let end = next + published[next..].iter().take_while(|p| p.room.id == room.id).count();
        count(room, &published[next..end]);
        encode_runs(
            &published[next..end],
            |p| (p.seq, &p.message[..]),
            |seqs, run| {
                let out = room.fan_out(seqs, run, &mut budget);
                m.delivered.increment(out.delivered);
                // Only plain TCP sockets are written from the fan-out.
                if out.written_bytes > 0 {
                    let tcp = m.transport("tcp");
                    tcp.frames_out.increment(out.written_frames);
                    tcp.bytes_out.increment(out.written_bytes);
                }
            },
        );
        next = end;
        if budget == 0 && next < published.len() {
            acknowledge_all(pipeline, published.drain(..next));
            next = 0;
            tokio::task::yield_now().await;
            budget = crate::room::WRITE_THROUGH_PER_SLICE;
        }
    }
    acknowledge_all(pipeline, published.drain(..));
}

/// Raises the room's unread counters for its committed entries — before
/// its head moves, so counts are never behind what clients can see — and
/// hands its committed changes over to the store's answers
/// ([`crate::room::pending`]).
fn count(room: &crate::room::Room, entries: &[PublishDone]) {
    let mut changes = false;
    {
        let mut counts = room.counts();
        for p in entries {
            counts.count(p.seq, &p.entry, p.erased.as_deref().map(|(s, m)| (s, &m[..])));
            changes |= matches!(p.entry, crate::store::Entry::Change { .. });
        }
    }
    if changes {
        let mut pending = room.pending();
        for p in entries {
            if let crate::store::Entry::Change { target, .. } = p.entry {
                pending.settle(target, p.seq);
            }
        }
    }
}

/// Acknowledges delivered publishes, releasing their in-flight permits.
fn acknowledge_all(pipeline: &Pipeline, delivered: impl ExactSizeIterator<Item = PublishDone>) {
    // Entries another cluster node appended are its to count.
    let mut published = 0;
    for mut p in delivered {
        if p.publisher.is_none()
            && let Some(claimed) = p.claims.as_ref().and_then(|c| c.claim(p.room.id, p.seq))
        {
            (p.publisher, p.permit, p.received) = (Some(claimed.0), claimed.1, claimed.2);
        }
        if p.publisher.is_some() {
            published += 1;
            pipeline.metrics.publish_delivery.record(p.received.elapsed().as_secs_f64());
        }
        acknowledge(pipeline, p);
    }
    pipeline.metrics.published.increment(published);
}

fn acknowledge(pipeline: &Pipeline, p: PublishDone) {
    let m = &pipeline.metrics;
    let ack = |duplicate: bool| proto::PublishAck {
        room: p.room.name.to_string(),
        seq: p.seq,
        ts_ms: p.ts_ms,
        client_msg_id: p.client_msg_id.clone(),
        duplicate,
    };
    let latency = p.received.elapsed();
    if let Some(publisher) = p.publisher {
        publisher.ack(ack(false));
        m.publish_ack.record(latency.as_secs_f64());
    }
    p.room.stats.record_publish(latency, p.ts_ms / 1000);
    if !p.client_msg_id.is_empty() {
        for w in pipeline.in_flight.settle(&p.sender, &p.client_msg_id) {
            m.duplicates.increment(1);
            w.ack(ack(true));
        }
    }
}

fn fail(pipeline: &Pipeline, p: PublishDone, e: &StoreError) {
    let message = format!("message not stored: {e}");
    pipeline.metrics.error(ErrorCode::Internal);
    if !p.client_msg_id.is_empty() {
        for w in pipeline.in_flight.settle(&p.sender, &p.client_msg_id) {
            w.fail(message.clone());
        }
    }
    if let Some(publisher) = p.publisher {
        publisher.fail(message);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll, Waker};

    use prost::Message as _;

    use bytes::Bytes;

    use super::*;
    use crate::delivery::{Subscriber, message_frame};
    use crate::room::WRITE_THROUGH_PER_SLICE;

    #[tokio::test]
    async fn a_batch_past_the_slice_acks_what_it_delivered_then_yields() {
        let hub = crate::hub::test_hub();
        let limits = hub.limits.outbound;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let publisher = Arc::new(Subscriber::new(0, limits, 1, "tcp", "test".into()));
        let permits = Arc::new(tokio::sync::Semaphore::new(WRITE_THROUGH_PER_SLICE + 1));
        let (mut peers, mut subscribers, mut published) = (Vec::new(), Vec::new(), Vec::new());
        // One message in each of one room more than a slice writes, each
        // room with one subscriber whose socket the fan-out writes to.
        for i in 0..=WRITE_THROUGH_PER_SLICE {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let session = Arc::new(Subscriber::new(i as u64 + 1, limits, 1, "tcp", "test".into()));
            session.outbound.set_socket(Some(Arc::new(server.into_split().1)));
            let (room, _) = hub.room_or_insert(&format!("r{i}"), &Default::default());
            room.subscribe_live(&session, None);
            let message = Bytes::from(
                proto::Message { room: room.name.to_string(), seq: 1, ..Default::default() }.encode_to_vec(),
            );
            published.push(PublishDone {
                room,
                seq: 1,
                ts_ms: 0,
                message,
                publisher: Some(Publisher::Session(publisher.clone(), i as u64)),
                claims: None,
                client_msg_id: String::new(),
                sender: "ann".into(),
                permit: Some(permits.clone().try_acquire_owned().unwrap()),
                received: std::time::Instant::now(),
                entry: crate::store::Entry::Message { user: "ann".into(), mentions: Vec::new() },
                erased: None,
            });
            peers.push(client);
            subscribers.push(session);
        }
        let written = |s: &Subscriber| s.stats.frames_out.load(Ordering::Relaxed);
        let mut delivering = std::pin::pin!(deliver(&hub.pipeline, &mut published));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(delivering.as_mut().poll(&mut cx).is_pending(), "yields once a slice is written");
        let (last, slice) = subscribers.split_last().unwrap();
        assert!(slice.iter().all(|s| written(s) == 1), "a slice of sockets written");
        assert_eq!((written(last), last.outbound.depth().0), (0, 0), "the rest waits for the next slice");
        assert_eq!(publisher.outbound.depth().0, WRITE_THROUGH_PER_SLICE, "the slice's publishes acked");
        assert_eq!(permits.available_permits(), WRITE_THROUGH_PER_SLICE, "their permits released");
        assert_eq!(delivering.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(written(last), 1, "written from the fan-out too, with a fresh budget");
        assert_eq!(publisher.outbound.depth().0, WRITE_THROUGH_PER_SLICE + 1);
        assert_eq!(permits.available_permits(), WRITE_THROUGH_PER_SLICE + 1);
    }

    #[test]
    fn runs_hold_at_least_one_frame_and_stay_within_their_size() {
        assert_eq!(run_len([]), 0);
        assert_eq!(run_len([100; 1000]), RUN_BYTES / 100);
        assert_eq!(run_len([RUN_BYTES + 1, 1]), 1, "a frame larger than a run is a run of its own");
        assert_eq!(run_len([1, RUN_BYTES]), 1);
        assert_eq!(run_len([RUN_BYTES / 2, RUN_BYTES / 2, 1]), 2);
    }

    #[test]
    fn a_rooms_messages_become_runs_of_their_push_frames_in_seq_order() {
        let big = vec![7u8; RUN_BYTES / 2];
        let msgs: Vec<(u64, Vec<u8>)> =
            (10..20).map(|seq| (seq, if seq % 4 == 0 { big.clone() } else { vec![seq as u8; 5] })).collect();
        let mut runs = Vec::new();
        encode_runs(&msgs, |(seq, m)| (*seq, &m[..]), |seqs, run| runs.push((seqs.to_vec(), run.clone())));
        assert!(runs.len() > 1, "the large messages do not fit one run");
        let seqs: Vec<u64> = runs.iter().flat_map(|(s, _)| s.clone()).collect();
        assert_eq!(seqs, (10..20).collect::<Vec<_>>(), "every message once, in order");
        let mut i = 0;
        for (seqs, run) in &runs {
            assert_eq!(seqs.len(), run.len());
            assert!(run.len() == 1 || run.wire_len() <= RUN_BYTES, "a run of {} bytes", run.wire_len());
            for k in 0..run.len() {
                assert_eq!(run.frame(k), &message_frame(&msgs[i].1)[..], "frame of seq {}", msgs[i].0);
                i += 1;
            }
        }
    }
}
