//! The per-connection outbound queue: the only place where the fan-out path
//! meets a connection.
//!
//! Live messages are *offered* ([`Outbound::offer`]): if the queue is at its
//! frame or byte bound the offer fails at once and the room marks the session
//! as lagging (it catches up from the log later, design.md §5). Replies and
//! control frames are *pushed* ([`Outbound::push`]) and never dropped: the
//! request reader bounds them by waiting ([`Outbound::wait_writable`]) before
//! it takes the next request, so a client that does not read stops being
//! read (TCP backpressure) instead of growing the queue.
//!
//! Each [`Frame`] holds the TCP encoding (length prefix + protobuf
//! envelope); a fanned-out message is one allocation shared by every queue,
//! with a slot for its JSON text that the first WebSocket JSON recipient
//! fills and the others reuse — one encoding per wire format.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// One queued frame.
///
/// A frame for many recipients is one `Arc`: queuing it for a recipient and
/// dropping it after the write are one atomic count each. (As a `Bytes` plus
/// an `Arc` for the JSON slot it was two each, on two cache lines that the
/// fan-out and every writer thread pass back and forth.)
#[derive(Clone, Debug)]
pub struct Frame(Repr);

#[derive(Clone, Debug)]
enum Repr {
    /// A reply or control frame for one connection.
    One(Bytes),
    /// A fanned-out message or room push.
    Shared(Arc<SharedFrame>),
}

#[derive(Debug)]
struct SharedFrame {
    wire: Bytes,
    /// Its JSON text, made by the first WebSocket JSON recipient.
    json: OnceLock<Bytes>,
}

impl Frame {
    /// A frame for many recipients (a fanned-out message).
    pub fn shared(wire: Bytes) -> Self {
        Frame(Repr::Shared(Arc::new(SharedFrame { wire, json: OnceLock::new() })))
    }

    /// Length prefix + protobuf `Envelope`, as written on TCP and TLS.
    pub fn wire(&self) -> &Bytes {
        match &self.0 {
            Repr::One(wire) => wire,
            Repr::Shared(s) => &s.wire,
        }
    }

    /// For a frame shared by many recipients: the slot for its JSON text.
    pub fn json_cell(&self) -> Option<&OnceLock<Bytes>> {
        match &self.0 {
            Repr::One(_) => None,
            Repr::Shared(s) => Some(&s.json),
        }
    }

    /// The protobuf envelope without the length prefix (a WebSocket binary
    /// message).
    pub fn envelope(&self) -> Bytes {
        let wire = self.wire();
        wire.slice(crate::codec::PREFIX_LEN.min(wire.len())..)
    }

    fn len(&self) -> usize {
        self.wire().len()
    }
}

impl From<Bytes> for Frame {
    fn from(wire: Bytes) -> Self {
        Frame(Repr::One(wire))
    }
}

/// Bounds of one queue.
#[derive(Clone, Copy, Debug)]
pub struct OutboundLimits {
    /// Frames queued before live offers fail.
    pub max_frames: usize,
    /// Bytes queued before live offers fail.
    pub max_bytes: usize,
}

/// [`OutboundLimits`] as kept in every queue, in 32 bits each to save 8
/// bytes per connection; a bound past 4 Gi is clamped to it (no queue can
/// usefully be that long).
#[derive(Clone, Copy, Debug)]
struct Bounds {
    max_frames: u32,
    max_bytes: u32,
}

impl Bounds {
    fn frames(&self) -> usize {
        self.max_frames as usize
    }

    fn bytes(&self) -> usize {
        self.max_bytes as usize
    }
}

impl Default for OutboundLimits {
    fn default() -> Self {
        OutboundLimits { max_frames: 8192, max_bytes: 512 * 1024 }
    }
}

/// A drain of at most this many frames takes the queue's buffer with it: an
/// idle connection keeps none (its last frames were a few replies), while a
/// busy one keeps its buffer instead of regrowing it for every batch.
const SMALL_DRAIN: usize = 16;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// No more frames are accepted; the writer flushes what is queued and
    /// closes the connection.
    closing: bool,
}

/// A bounded queue of encoded frames, drained by the connection's writer.
pub struct Outbound {
    queue: Mutex<Queue>,
    /// Wakes the writer when frames arrive or the queue closes.
    ready: Notify,
    /// Wakes the request reader when the writer has made room.
    drained: Notify,
    limits: Bounds,
}

/// The queue is full (for live offers) or closing.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected;

impl Outbound {
    /// An empty queue with `limits`.
    pub fn new(limits: OutboundLimits) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let limits = Bounds { max_frames: clamp(limits.max_frames), max_bytes: clamp(limits.max_bytes) };
        Outbound { queue: Mutex::new(Queue::default()), ready: Notify::new(), drained: Notify::new(), limits }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a live frame if it fits within the bounds.
    pub fn offer(&self, frame: impl Into<Frame>) -> Result<(), Rejected> {
        self.enqueue(frame.into(), true)
    }

    /// Queues as many of `frames` (in order) as fit within the bounds, under
    /// one lock and with at most one wake-up of the writer; returns how many.
    /// A committed batch reaches each subscriber this way, so the writer
    /// wakes once per batch instead of racing the fan-out frame by frame.
    pub fn offer_many<'a>(&self, frames: impl IntoIterator<Item = &'a Frame>) -> usize {
        let mut q = self.lock();
        if q.closing {
            return 0;
        }
        let was_empty = q.frames.is_empty();
        let mut n = 0;
        for f in frames {
            if q.frames.len() >= self.limits.frames()
                || (q.bytes + f.len() > self.limits.bytes() && !q.frames.is_empty())
            {
                break;
            }
            q.bytes += f.len();
            q.frames.push_back(f.clone());
            n += 1;
        }
        drop(q);
        if was_empty && n > 0 {
            self.ready.notify_one();
        }
        n
    }

    /// Queues a reply or control frame regardless of the bounds. Fails only
    /// when the connection is closing.
    pub fn push(&self, frame: impl Into<Frame>) -> Result<(), Rejected> {
        self.enqueue(frame.into(), false)
    }

    /// Appends a frame (within the bounds if `bounded`) and wakes the
    /// writer when the queue was empty.
    fn enqueue(&self, frame: Frame, bounded: bool) -> Result<(), Rejected> {
        let mut q = self.lock();
        let full = q.frames.len() >= self.limits.frames()
            || (q.bytes + frame.len() > self.limits.bytes() && !q.frames.is_empty());
        if q.closing || (bounded && full) {
            return Err(Rejected);
        }
        let was_empty = q.frames.is_empty();
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Queues a last frame (a `GoAway`, an `Error`) and closes the queue: the
    /// writer sends everything queued, then closes the connection.
    pub fn close_with(&self, last: Option<Bytes>) {
        let mut q = self.lock();
        if q.closing {
            return;
        }
        if let Some(f) = last {
            q.bytes += f.len();
            q.frames.push_back(f.into());
        }
        q.closing = true;
        drop(q);
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// Wakes the writer without queueing anything (there is work for it
    /// elsewhere, e.g. a room to catch up on).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Whether the queue was closed.
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Moves every queued frame into `out` (one write for the writer) and
    /// returns how many there were and whether the queue is closing.
    pub fn drain_into(&self, out: &mut BytesMut) -> (usize, bool) {
        let mut q = self.lock();
        out.reserve(q.bytes);
        let n = q.frames.len();
        q.bytes = 0;
        let closing = q.closing;
        if n <= SMALL_DRAIN {
            // Copied outside the lock, and the queue's buffer goes with it.
            let frames = std::mem::take(&mut q.frames);
            drop(q);
            for f in &frames {
                out.extend_from_slice(f.wire());
            }
        } else {
            for f in q.frames.drain(..) {
                out.extend_from_slice(f.wire());
            }
            drop(q);
        }
        self.drained(n, closing)
    }

    fn drained(&self, n: usize, closing: bool) -> (usize, bool) {
        if n > 0 {
            self.drained.notify_waiters();
        }
        (n, closing)
    }

    /// Moves every queued frame into `out` (for transports that send frames
    /// one message each) and returns whether the queue is closing.
    pub fn drain_frames(&self, out: &mut Vec<Frame>) -> bool {
        let mut q = self.lock();
        let n = q.frames.len();
        if n <= SMALL_DRAIN {
            out.extend(std::mem::take(&mut q.frames));
        } else {
            out.extend(q.frames.drain(..));
        }
        q.bytes = 0;
        let closing = q.closing;
        drop(q);
        if n > 0 {
            self.drained.notify_waiters();
        }
        closing
    }

    /// Resolves when frames are queued, the queue closes, or the writer is
    /// woken. A plain `Notified` rather than an `async fn` around one: each
    /// idle connection's task holds it.
    pub fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Waits until the queue is closed.
    pub async fn closed(&self) {
        loop {
            let waiter = self.drained.notified();
            if self.lock().closing {
                return;
            }
            waiter.await;
        }
    }

    /// Frames and bytes queued now.
    pub fn depth(&self) -> (usize, usize) {
        let q = self.lock();
        (q.frames.len(), q.bytes)
    }

    /// Whether live offers would be refused for lack of room.
    pub fn has_room_for_live(&self) -> bool {
        let q = self.lock();
        q.frames.len() < self.limits.frames() / 2 && q.bytes < self.limits.bytes() / 2
    }

    /// Waits while the queue is over its bounds (the client is not reading),
    /// so the request reader stops taking requests whose replies would pile up.
    pub async fn wait_writable(&self) {
        loop {
            let waiter = self.drained.notified();
            {
                let q = self.lock();
                if q.closing || (q.frames.len() < self.limits.frames() && q.bytes < self.limits.bytes()) {
                    return;
                }
            }
            waiter.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_offers_respect_both_bounds_replies_do_not() {
        let q = Outbound::new(OutboundLimits { max_frames: 3, max_bytes: 10 });
        assert!(q.offer(Bytes::from_static(b"aaaa")).is_ok());
        assert!(q.offer(Bytes::from_static(b"bbbb")).is_ok());
        assert_eq!(q.offer(Bytes::from_static(b"ccc")), Err(Rejected), "byte bound");
        assert!(q.push(Bytes::from_static(b"reply")).is_ok(), "replies are never dropped");
        assert_eq!(q.depth(), (3, 13));
        let mut out = BytesMut::new();
        assert_eq!(q.drain_into(&mut out), (3, false));
        assert_eq!(&out[..], b"aaaabbbbreply");
        assert!(q.offer(Bytes::from_static(b"dd")).is_ok());
    }

    #[test]
    fn offer_many_takes_what_fits_in_order() {
        let q = Outbound::new(OutboundLimits { max_frames: 3, max_bytes: 100 });
        q.push(Bytes::from_static(b"r")).unwrap();
        let frames: Vec<Frame> = [&b"a"[..], b"b", b"c"].iter().map(|f| Frame::from(Bytes::from_static(f))).collect();
        assert_eq!(q.offer_many(&frames), 2, "the frame bound leaves room for two");
        let mut out = BytesMut::new();
        assert_eq!(q.drain_into(&mut out), (3, false));
        assert_eq!(&out[..], b"rab");
        q.close_with(None);
        assert_eq!(q.offer_many(&frames), 0, "nothing once closing");
    }

    #[test]
    fn a_frame_larger_than_the_byte_bound_still_goes_through_an_empty_queue() {
        let q = Outbound::new(OutboundLimits { max_frames: 3, max_bytes: 4 });
        assert!(q.offer(Bytes::from_static(b"0123456789")).is_ok());
        assert_eq!(q.offer(Bytes::from_static(b"x")), Err(Rejected));
    }

    #[test]
    fn closing_refuses_more_but_keeps_the_last_frame() {
        let q = Outbound::new(OutboundLimits::default());
        q.push(Bytes::from_static(b"a")).unwrap();
        q.close_with(Some(Bytes::from_static(b"bye")));
        assert_eq!(q.push(Bytes::from_static(b"late")), Err(Rejected));
        let mut out = BytesMut::new();
        assert_eq!(q.drain_into(&mut out), (2, true));
        assert_eq!(&out[..], b"abye");
    }

    #[test]
    fn small_drains_release_the_buffer_large_ones_keep_it_and_both_keep_order() {
        let q = Outbound::new(OutboundLimits::default());
        for n in [1, SMALL_DRAIN, SMALL_DRAIN + 1, 100] {
            let frames: Vec<Bytes> = (0..n).map(|i| Bytes::from(format!("{i},"))).collect();
            for f in &frames {
                q.push(f.clone()).unwrap();
            }
            let mut out = BytesMut::new();
            assert_eq!(q.drain_into(&mut out), (n, false));
            assert_eq!(out, frames.concat(), "{n} frames in order");
            let kept = q.lock().frames.capacity();
            assert_eq!(kept == 0, n <= SMALL_DRAIN, "{n} frames drained, {kept} slots kept");
            let mut v = Vec::new();
            for f in &frames {
                q.push(f.clone()).unwrap();
            }
            q.drain_frames(&mut v);
            assert_eq!(v.iter().map(|f| f.wire().clone()).collect::<Vec<_>>(), frames);
            q.lock().frames = VecDeque::new();
        }
    }

    #[tokio::test]
    async fn wait_writable_returns_once_drained() {
        let q = std::sync::Arc::new(Outbound::new(OutboundLimits { max_frames: 1, max_bytes: 100 }));
        q.push(Bytes::from_static(b"a")).unwrap();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.wait_writable().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        q.drain_into(&mut BytesMut::new());
        waiter.await.unwrap();
    }
}
