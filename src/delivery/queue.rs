//! The per-connection outbound queue: the only place where the fan-out path
//! meets a connection.
//!
//! Live messages are *offered* ([`Outbound::offer`]): if the queue is at its
//! frame or byte bound the offer fails at once and the room marks the
//! subscriber as lagging (it catches up from the log later; ARCHITECTURE.md,
//! "Never wait for a slow recipient"). Replies and control frames are
//! *pushed* ([`Outbound::push`]) and never dropped: the request reader bounds
//! them by waiting ([`Outbound::wait_writable`]) before it takes the next
//! request, so a client that does not read stops being read (TCP
//! backpressure) instead of growing the queue.
//!
//! A plain TCP connection also hands its socket to the queue. A live run
//! offered while the queue is empty and the writer has nothing in hand is
//! written to the socket at once, from the fan-out, without waking the
//! connection's task: with many small rooms nearly every delivery finds its
//! subscriber idle, and waking and polling a task per delivery cost more
//! than the write (benches/README.md, "Write-through to idle sockets").
//! Whatever the socket does not take is queued for the writer as usual, so
//! the order on the wire is the order of the queue. The write itself is the
//! transport's ([`SendNow`], implemented by `net::tcp`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::frame::{Frame, Repr, Run};

/// A socket the fan-out may write to without waiting: implemented by the TCP
/// transport (`net::tcp`), so that this layer names no transport code.
pub trait SendNow {
    /// Sends what the socket takes at once without waiting; 0 when it is
    /// full or failed (the writer meets a failure on its own write).
    fn send_now(&self, data: &[u8]) -> usize;
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

/// A drain of at most this many entries takes the queue's buffer with it: an
/// idle connection keeps none (its last frames were a few replies), while a
/// busy one keeps its buffer instead of regrowing it for every batch.
const SMALL_DRAIN: usize = 16;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// Frames queued (an entry may hold several). At most the frame bound
    /// plus the replies the reader lets through, far below `u32::MAX`; 32
    /// bits keep the queue, which every connection holds, at 48 bytes.
    count: u32,
    /// No more frames are accepted; the writer flushes what is queued and
    /// closes the connection.
    closing: bool,
    /// The writer has taken frames and not yet written them all: nothing may
    /// go to the socket ahead of them.
    writing: bool,
    /// The connection's socket, for live frames written from the fan-out
    /// (plain TCP only; TLS and WebSocket frame their bytes in their writer).
    socket: Option<Arc<OwnedWriteHalf>>,
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

/// Hands every queued entry to `f`, in order, and releases the lock. A small
/// drain is handed over outside the lock and takes the queue's buffer with
/// it; a large one keeps the buffer for the next batch.
fn take_entries(mut q: std::sync::MutexGuard<'_, Queue>, f: impl FnMut(Frame)) {
    if q.frames.len() <= SMALL_DRAIN {
        let taken = std::mem::take(&mut q.frames);
        drop(q);
        taken.into_iter().for_each(f);
    } else {
        q.frames.drain(..).for_each(f);
    }
}

/// Writes frames `from..to` of `run` to `socket` without waiting, counting
/// what it wrote into `offered` (nothing written: the frames are queued as
/// usual). Returns what is left when the socket took some but not all.
fn write_to(socket: &OwnedWriteHalf, run: &Run, from: usize, to: usize, offered: &mut Offered) -> Option<Bytes> {
    let span = run.span(from, to);
    let n = socket.send_now(&run.wire[span.clone()]);
    if n == 0 {
        return None;
    }
    offered.written_bytes = n;
    offered.written = run.msgs[from..to].iter().take_while(|m| m.end - span.start <= n).count();
    (n < span.len()).then(|| Bytes::copy_from_slice(&run.wire[span.start + n..span.end]))
}

/// What [`Outbound::drain_into`] took.
#[derive(Debug)]
pub struct Drained {
    /// How many frames.
    pub frames: usize,
    /// The entry to write when the queue held one (`out` is then
    /// untouched); `None`: the frames are in `out`. The entry itself rather
    /// than a `Bytes` of it: slicing a run would cost one more reference
    /// count.
    pub direct: Option<Frame>,
    /// The queue is closing: write what was taken, then close.
    pub closing: bool,
}

/// What [`Outbound::offer_run`] did with a run's frames.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Offered {
    /// Frames taken, in order from the first offered: queued for the
    /// writer, or written (all or in part) straight to the socket.
    pub taken: usize,
    /// Of those, frames written whole straight to the socket.
    pub written: usize,
    /// Bytes written straight to the socket.
    pub written_bytes: usize,
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

    /// Takes as many frames of `run` from `from` on (in order) as fit
    /// within the bounds, under one lock and with at most one wake-up of the
    /// writer. A committed batch reaches each subscriber this way, so the
    /// writer wakes once per batch instead of racing the fan-out frame by
    /// frame. With `write_through`, when the queue is empty, the writer idle
    /// and the socket known, they are written to the socket at once and only
    /// what it does not take is queued (module docs).
    pub fn offer_run(&self, run: &Arc<Run>, from: usize, write_through: bool) -> Offered {
        let mut q = self.lock();
        if q.closing {
            return Offered::default();
        }
        let was_empty = q.frames.is_empty();
        let room = self.limits.frames().saturating_sub(q.count as usize);
        let mut bytes = q.bytes;
        let mut to = from;
        while to < run.len() && to - from < room {
            let size = run.size(to);
            // A frame larger than the byte bound still goes through an
            // empty queue.
            if bytes + size > self.limits.bytes() && !(was_empty && to == from) {
                break;
            }
            bytes += size;
            to += 1;
        }
        let n = to - from;
        let mut offered = Offered { taken: n, ..Offered::default() };
        if n > 0
            && write_through
            && was_empty
            && !q.writing
            && let Some(socket) = &q.socket
        {
            let rest = write_to(socket, run, from, to, &mut offered);
            if offered.written_bytes > 0 {
                // The socket took part of a frame or more: the rest is queued
                // as bytes of its own, ahead of anything offered later.
                if let Some(rest) = rest {
                    q.bytes += rest.len();
                    q.count += (n - offered.written) as u32;
                    q.frames.push_back(Frame(Repr::One(rest)));
                    drop(q);
                    self.ready.notify_one();
                }
                return offered;
            }
        }
        if n > 0 {
            q.bytes = bytes;
            q.count += n as u32;
            // A range shares the run only when it is all of it. Part of one
            // (a subscriber falling behind, or joined mid-batch) is copied:
            // the queue's byte bound counts only what it took, and must
            // bound what it keeps alive.
            let entry = if n == run.len() {
                Frame::range(run, from, to)
            } else {
                Frame::range(&run.copy_range(from, to), 0, n)
            };
            q.frames.push_back(entry);
        }
        drop(q);
        if was_empty && n > 0 {
            self.ready.notify_one();
        }
        offered
    }

    /// Gives the queue the connection's socket for live frames written from
    /// the fan-out, or (`None`) takes it back: a queue outlives its
    /// connection's task as long as a room holds the session, and must not
    /// keep the socket open.
    pub fn set_socket(&self, socket: Option<Arc<OwnedWriteHalf>>) {
        self.lock().socket = socket;
    }

    /// The writer has written everything it took and is about to wait: live
    /// frames may go straight to the socket again.
    pub fn writer_idle(&self) {
        self.lock().writing = false;
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
        let full = q.count as usize >= self.limits.frames()
            || (q.bytes + frame.len() > self.limits.bytes() && !q.frames.is_empty());
        if q.closing || (bounded && full) {
            return Err(Rejected);
        }
        let was_empty = q.frames.is_empty();
        q.bytes += frame.len();
        q.count += frame.count() as u32;
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
            q.count += 1;
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

    /// Takes every queued frame for one write: a single entry as its own
    /// bytes (a reply, or a range of a shared run: written without a copy),
    /// several copied into `out` in order.
    pub fn drain_into(&self, out: &mut BytesMut) -> Drained {
        let mut q = self.lock();
        let entries = q.frames.len();
        let frames = std::mem::take(&mut q.count) as usize;
        let bytes = std::mem::take(&mut q.bytes);
        let closing = q.closing;
        q.writing = frames > 0;
        let mut direct = None;
        if entries > 1 {
            out.reserve(bytes);
        }
        take_entries(q, |f| if entries == 1 { direct = Some(f) } else { out.extend_from_slice(f.wire()) });
        if frames > 0 {
            self.drained.notify_waiters();
        }
        Drained { frames, direct, closing }
    }

    /// Moves every queued frame into `out`, one frame per element (for
    /// transports that send each frame as a message of its own), and returns
    /// whether the queue is closing.
    pub fn drain_frames(&self, out: &mut Vec<Frame>) -> bool {
        let mut q = self.lock();
        let n = q.frames.len();
        q.bytes = 0;
        q.count = 0;
        let closing = q.closing;
        take_entries(q, |f| f.split_into(out));
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
        (q.count as usize, q.bytes)
    }

    /// Whether live offers would be refused for lack of room.
    pub fn has_room_for_live(&self) -> bool {
        let q = self.lock();
        (q.count as usize) < self.limits.frames() / 2 && q.bytes < self.limits.bytes() / 2
    }

    /// Waits while the queue is over its bounds (the client is not reading),
    /// so the request reader stops taking requests whose replies would pile up.
    pub async fn wait_writable(&self) {
        loop {
            let waiter = self.drained.notified();
            {
                let q = self.lock();
                if q.closing || ((q.count as usize) < self.limits.frames() && q.bytes < self.limits.bytes()) {
                    return;
                }
            }
            waiter.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    /// Drains like the TCP writer: the bytes it would write, how many
    /// frames, whether they came without a copy, and whether closing.
    fn drain(q: &Outbound) -> (Vec<u8>, usize, bool, bool) {
        let mut out = BytesMut::new();
        let d = q.drain_into(&mut out);
        let direct = d.direct.is_some();
        if let Some(b) = d.direct {
            assert!(out.is_empty(), "a direct drain leaves the buffer alone");
            out.extend_from_slice(b.wire());
        }
        (out.to_vec(), d.frames, direct, d.closing)
    }

    /// A run of `frames`, as the fan-out builds one.
    fn run_of(frames: &[&[u8]]) -> Arc<Run> {
        let mut ends = Vec::new();
        let mut wire = Vec::new();
        for f in frames {
            wire.extend_from_slice(f);
            ends.push(wire.len());
        }
        Run::new(Bytes::from(wire), &ends)
    }

    #[test]
    fn live_offers_respect_both_bounds_replies_do_not() {
        let q = Outbound::new(OutboundLimits { max_frames: 3, max_bytes: 10 });
        assert!(q.offer(Bytes::from_static(b"aaaa")).is_ok());
        assert!(q.offer(Bytes::from_static(b"bbbb")).is_ok());
        assert_eq!(q.offer(Bytes::from_static(b"ccc")), Err(Rejected), "byte bound");
        assert!(q.push(Bytes::from_static(b"reply")).is_ok(), "replies are never dropped");
        assert_eq!(q.depth(), (3, 13));
        assert_eq!(drain(&q), (b"aaaabbbbreply".to_vec(), 3, false, false));
        assert_eq!(q.depth(), (0, 0));
        assert!(q.offer(Bytes::from_static(b"dd")).is_ok());
    }

    #[test]
    fn offer_run_takes_what_fits_in_order_as_one_entry() {
        let q = Outbound::new(OutboundLimits { max_frames: 3, max_bytes: 100 });
        q.push(Bytes::from_static(b"r")).unwrap();
        let run = run_of(&[b"a", b"b", b"c"]);
        assert_eq!(q.offer_run(&run, 0, true).taken, 2, "the frame bound leaves room for two");
        assert_eq!(q.depth(), (3, 3));
        assert_eq!(q.lock().frames.len(), 2, "the run's frames are one entry");
        assert_eq!(drain(&q), (b"rab".to_vec(), 3, false, false));
        assert_eq!(q.offer_run(&run, 2, true).taken, 1, "the rest, from where the queue stopped");
        assert_eq!(drain(&q), (b"c".to_vec(), 1, true, false));
        q.close_with(None);
        assert_eq!(q.offer_run(&run, 0, true).taken, 0, "nothing once closing");
    }

    #[test]
    fn offer_run_keeps_the_byte_bound() {
        let q = Outbound::new(OutboundLimits { max_frames: 100, max_bytes: 6 });
        let run = run_of(&[b"aa", b"bb", b"cc", b"dd"]);
        assert_eq!(q.offer_run(&run, 1, true).taken, 3, "6 bytes from the second frame on");
        assert_eq!(q.offer_run(&run, 0, true).taken, 0, "a full queue takes nothing");
        assert_eq!(drain(&q), (b"bbccdd".to_vec(), 3, true, false), "one range, written from the run");
        let big = run_of(&[b"x", b"0123456789", b"y"]);
        assert_eq!(
            q.offer_run(&big, 1, true).taken,
            1,
            "a frame over the byte bound still goes through an empty queue"
        );
        assert_eq!(q.offer_run(&big, 2, true).taken, 0);
    }

    #[test]
    fn the_frame_bound_counts_frames_not_entries() {
        let q = Outbound::new(OutboundLimits { max_frames: 4, max_bytes: 100 });
        assert_eq!(q.offer_run(&run_of(&[b"a", b"b", b"c"]), 0, true).taken, 3);
        assert!(!q.has_room_for_live(), "3 of 4 frames queued, in one entry");
        assert!(q.offer(Bytes::from_static(b"d")).is_ok());
        assert_eq!(q.offer(Bytes::from_static(b"e")), Err(Rejected));
        assert_eq!(q.offer_run(&run_of(&[b"f"]), 0, true).taken, 0);
        assert_eq!(q.depth(), (4, 4));
    }

    #[test]
    fn part_of_a_run_is_copied_so_the_queue_keeps_only_what_it_counts() {
        let q = Outbound::new(OutboundLimits { max_frames: 2, max_bytes: 100 });
        let run = run_of(&[b"aa", b"bb", b"cc"]);
        assert_eq!(q.offer_run(&run, 0, true).taken, 2);
        assert_eq!(Arc::strong_count(&run), 1, "the queue holds a copy of the two frames it took");
        assert_eq!(drain(&q), (b"aabb".to_vec(), 2, true, false));
        assert_eq!(q.offer_run(&run, 2, true).taken, 1);
        assert_eq!(Arc::strong_count(&run), 1, "nor of the last one");
        assert_eq!(drain(&q), (b"cc".to_vec(), 1, true, false));
        assert_eq!(q.offer_run(&run, 0, true).taken, 2);
        let whole = run_of(&[b"dd"]);
        let other = Outbound::new(OutboundLimits::default());
        assert_eq!(other.offer_run(&whole, 0, true).taken, 1);
        assert_eq!(Arc::strong_count(&whole), 2, "a whole run is shared, not copied");
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
        assert_eq!(drain(&q), (b"abye".to_vec(), 2, false, true));
    }

    #[test]
    fn per_message_transports_get_each_frame_of_a_run_with_its_json_slot() {
        let run = run_of(&[b"\0\0\0\x01a", b"\0\0\0\x01b", b"\0\0\0\x01c"]);
        let (one, two) = (Outbound::new(OutboundLimits::default()), Outbound::new(OutboundLimits::default()));
        for q in [&one, &two] {
            q.push(Bytes::from_static(b"reply")).unwrap();
            assert_eq!(q.offer_run(&run, 0, true).taken, 3);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        one.drain_frames(&mut a);
        two.drain_frames(&mut b);
        assert_eq!(
            a.iter().map(|f| f.wire().to_vec()).collect::<Vec<_>>(),
            [&b"reply"[..], b"\0\0\0\x01a", b"\0\0\0\x01b", b"\0\0\0\x01c"]
        );
        assert_eq!(a[2].envelope(), Bytes::from_static(b"b"));
        assert!(a[0].json_cell().is_none(), "a reply is encoded for its one recipient");
        for (x, y) in a[1..].iter().zip(&b[1..]) {
            assert!(std::ptr::eq(x.json_cell().unwrap(), y.json_cell().unwrap()), "one JSON slot per message");
        }
        assert!(!std::ptr::eq(a[1].json_cell().unwrap(), a[2].json_cell().unwrap()));
        assert_eq!(one.depth(), (0, 0));
    }

    #[test]
    fn small_drains_release_the_buffer_large_ones_keep_it_and_both_keep_order() {
        let q = Outbound::new(OutboundLimits::default());
        for n in [1, 2, SMALL_DRAIN, SMALL_DRAIN + 1, 100] {
            let frames: Vec<Bytes> = (0..n).map(|i| Bytes::from(format!("{i},"))).collect();
            for f in &frames {
                q.push(f.clone()).unwrap();
            }
            assert_eq!(drain(&q), (frames.concat(), n, n == 1, false), "{n} frames in order");
            let kept = q.lock().frames.capacity();
            assert_eq!(kept == 0, n <= SMALL_DRAIN, "{n} frames drained, {kept} slots kept");
            let mut v = Vec::new();
            for f in &frames {
                q.push(f.clone()).unwrap();
            }
            q.drain_frames(&mut v);
            assert_eq!(v.iter().map(|f| f.wire().to_vec()).collect::<Vec<_>>(), frames);
            q.lock().frames = VecDeque::new();
        }
    }

    /// A connected pair over loopback: the server's side for the queue, the
    /// client's to read from.
    async fn socket_pair() -> (Arc<OwnedWriteHalf>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(server.into_split().1), client)
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::io::AsyncReadExt::read_exact(client, &mut got).await.unwrap();
        got
    }

    /// Whether the writer was woken (without waiting for it).
    fn writer_woken(q: &Outbound) -> bool {
        let mut ready = std::pin::pin!(q.ready());
        let cx = &mut std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(ready.as_mut(), cx).is_ready()
    }

    #[tokio::test]
    async fn an_idle_queue_writes_a_run_to_its_socket_without_waking_the_writer() {
        let (server, mut client) = socket_pair().await;
        let q = Outbound::new(OutboundLimits::default());
        q.set_socket(Some(server));
        let run = run_of(&[b"aa", b"bbb", b"c"]);
        assert_eq!(q.offer_run(&run, 1, true), Offered { taken: 2, written: 2, written_bytes: 4 });
        assert_eq!(q.depth(), (0, 0), "nothing queued");
        assert!(!writer_woken(&q));
        assert_eq!(read_exactly(&mut client, 4).await, b"bbbc");
        assert_eq!(Arc::strong_count(&run), 1, "nothing keeps the run");
    }

    #[tokio::test]
    async fn frames_the_writer_holds_or_that_wait_in_the_queue_go_first() {
        let (server, mut client) = socket_pair().await;
        let q = Outbound::new(OutboundLimits::default());
        q.set_socket(Some(server.clone()));
        q.push(Bytes::from_static(b"reply")).unwrap();
        let run = run_of(&[b"1", b"2"]);
        assert_eq!(q.offer_run(&run, 0, true), Offered { taken: 2, ..Offered::default() }, "queued behind the reply");
        let (taken, ..) = drain(&q);
        assert_eq!(taken, b"reply12");
        assert_eq!(
            q.offer_run(&run_of(&[b"3"]), 0, true),
            Offered { taken: 1, ..Offered::default() },
            "the writer has not written what it took"
        );
        server.try_write(&taken).unwrap();
        assert_eq!(drain(&q).0, b"3");
        server.try_write(b"3").unwrap();
        q.writer_idle();
        assert_eq!(q.offer_run(&run_of(&[b"4"]), 0, true).written, 1, "written once the writer is idle");
        assert_eq!(read_exactly(&mut client, 9).await, b"reply1234");
    }

    #[tokio::test]
    async fn a_full_socket_takes_what_it_can_and_the_rest_is_queued_in_order() {
        let (server, mut client) = socket_pair().await;
        // A small send buffer, and a peer that has not read yet (its receive
        // buffer does not grow): 1 MiB cannot all fit.
        socket2::SockRef::from((*server).as_ref()).set_send_buffer_size(4096).unwrap();
        let q = Outbound::new(OutboundLimits { max_frames: 100, max_bytes: 2 << 20 });
        q.set_socket(Some(server.clone()));
        const FRAME: usize = 256 * 1024;
        let frames: Vec<Vec<u8>> = (0..4u8).map(|i| vec![b'a' + i; FRAME]).collect();
        let run = run_of(&frames.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let first = q.offer_run(&run, 0, true);
        assert_eq!(first.taken, 4);
        assert!(first.written_bytes > 0 && first.written_bytes < run.wire_len(), "{first:?}");
        assert_eq!(first.written, first.written_bytes / FRAME, "whole frames written");
        let rest = run.wire_len() - first.written_bytes;
        assert_eq!(q.depth(), (4 - first.written, rest));
        assert!(writer_woken(&q), "the writer must send the rest");
        let later = run_of(&[b"later"]);
        assert_eq!(q.offer_run(&later, 0, true), Offered { taken: 1, ..Offered::default() }, "queued behind the rest");
        let reader = tokio::spawn(async move { read_exactly(&mut client, 4 * FRAME + 5).await });
        // The writer's part: what was queued, in order.
        let mut out = BytesMut::new();
        let d = q.drain_into(&mut out);
        assert_eq!((d.frames, out.len()), (5 - first.written, rest + 5));
        let mut data = &out[..];
        while !data.is_empty() {
            server.writable().await.unwrap();
            match server.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(reader.await.unwrap(), [frames.concat(), b"later".to_vec()].concat());
    }

    #[tokio::test]
    async fn without_its_socket_or_once_closing_nothing_is_written_from_the_queue() {
        let (server, client) = socket_pair().await;
        let q = Outbound::new(OutboundLimits::default());
        q.set_socket(Some(server.clone()));
        assert_eq!(q.offer_run(&run_of(&[b"a"]), 0, false), Offered { taken: 1, ..Offered::default() }, "not asked to");
        drain(&q);
        q.writer_idle();
        q.set_socket(None);
        assert_eq!(q.offer_run(&run_of(&[b"a"]), 0, true), Offered { taken: 1, ..Offered::default() });
        drain(&q);
        q.writer_idle();
        q.close_with(None);
        assert_eq!(q.offer_run(&run_of(&[b"b"]), 0, true), Offered::default());
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), client.peek(&mut byte)).await;
        assert!(read.is_err(), "nothing reached the socket");
    }

    #[tokio::test]
    async fn wait_writable_returns_once_drained() {
        let q = std::sync::Arc::new(Outbound::new(OutboundLimits { max_frames: 1, max_bytes: 100 }));
        q.push(Bytes::from_static(b"a")).unwrap();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.wait_writable().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drain(&q);
        waiter.await.unwrap();
    }
}
