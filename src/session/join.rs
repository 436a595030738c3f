//! Runs a connection's request loop and its writer in the connection's one
//! task, and polls each only when something woke it.
//!
//! `tokio::join!` polls both halves whenever the task wakes. For a busy
//! subscriber nearly every wake is for the writer (a committed batch to
//! send), and polling the request loop alongside it — its `select!`, idle
//! timer, socket readiness and shutdown check — cost about as much as the
//! write itself outside the kernel. Here each half gets a waker of its own
//! that marks the half as due and then wakes the task; both wakers point at
//! the connection's [`Subscriber`] (tagged in the pointer's low bits), so
//! they need no allocation of their own. The task's own waker is kept in the
//! handle ([`Subscriber::wake_reader`] wakes the request loop through it
//! at shutdown).
//!
//! Halves that share one resource ([`Io::Shared`]: TLS, whose read half may
//! write an alert to the socket) can leave each other's waker in it; they
//! are both polled on every wake, as `tokio::join!` does. So is the
//! remaining half once the other has finished, whatever woke the task.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use tokio_util::sync::CancellationToken;

use crate::delivery::Subscriber;

impl Subscriber {
    /// Ready once `stop` is cancelled or the outbound queue is closed (the
    /// writer gave up on the peer, or said `GoAway`): a request loop must not
    /// keep a session alive that can no longer send anything. Registers no
    /// waker of its own: it must run in the request-loop half of [`join`],
    /// which shutdown wakes ([`Subscriber::wake_reader`]) and which is polled
    /// again when the writer half ends.
    pub(crate) fn stopped<'a>(&'a self, stop: &'a CancellationToken) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |_| {
            if stop.is_cancelled() || self.outbound.is_closing() { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    /// Wakes the request loop waiting in `Subscriber::stopped`.
    pub fn wake_reader(&self) {
        self.wakes.fetch_or(READER, Ordering::AcqRel);
        self.task.wake();
    }
}

/// The request loop is due to be polled.
pub(super) const READER: u8 = 1;
/// The writer is due to be polled.
pub(super) const WRITER: u8 = 2;

// The tags live in the low bits of the handle's address.
const _: () = assert!(std::mem::align_of::<Subscriber>() > (READER | WRITER) as usize);

/// What the two halves of a connection wait on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Each its own direction of the socket (TCP; WebSocket, whose stream
    /// wakes both directions' wakers on any event).
    Separate,
    /// One resource: a wake may be for either half.
    Shared,
}

/// Runs `reader` and `writer` to completion, each polled only after its own
/// waker was woken (both on the first poll, and on every poll with
/// [`Io::Shared`]). `reader` may wait on `Subscriber::stopped`, which
/// relies on this.
///
/// A future of its own rather than an `async fn`: that would keep its
/// arguments and their pinned copies side by side, and every idle
/// connection's task holds this future.
pub fn join<'a, R, W>(handle: &'a Arc<Subscriber>, io: Io, reader: R, writer: W) -> Join<'a, R, W>
where
    R: Future<Output = ()>,
    W: Future<Output = ()>,
{
    Join { handle, reader, writer, reader_done: false, writer_done: false, first: true, io }
}

/// See [`join`].
pub struct Join<'a, R, W> {
    handle: &'a Arc<Subscriber>,
    reader: R,
    writer: W,
    reader_done: bool,
    writer_done: bool,
    first: bool,
    io: Io,
}

impl<R: Future<Output = ()>, W: Future<Output = ()>> Future for Join<'_, R, W> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `reader` and `writer` are pinned with `self`: they are
        // never moved out or replaced, and `Join` has no `Drop` that could.
        let this = unsafe { self.get_unchecked_mut() };
        let handle = this.handle;
        // Registered before the flags are read: a half woken after the read
        // wakes this waker, so no wake is lost.
        handle.task.register(cx.waker());
        let mut due = handle.wakes.swap(0, Ordering::AcqRel);
        // A finished half may have left its waker where the other half's
        // belonged: every wake then goes to the one still running.
        if std::mem::take(&mut this.first) || this.io == Io::Shared || this.reader_done || this.writer_done {
            due = READER | WRITER;
        }
        if !this.reader_done && due & READER != 0 {
            let waker = half_waker(handle, READER);
            // SAFETY: see above.
            let reader = unsafe { Pin::new_unchecked(&mut this.reader) };
            this.reader_done = reader.poll(&mut Context::from_waker(&waker)).is_ready();
        }
        // The request loop may just have queued a reply or closed the
        // queue: the writer sees it in this same poll.
        if due & WRITER == 0 {
            due |= handle.wakes.fetch_and(!WRITER, Ordering::AcqRel) & WRITER;
        }
        if !this.writer_done && due & WRITER != 0 {
            let waker = half_waker(handle, WRITER);
            // SAFETY: see above.
            let writer = unsafe { Pin::new_unchecked(&mut this.writer) };
            this.writer_done = writer.poll(&mut Context::from_waker(&waker)).is_ready();
            if this.writer_done && !this.reader_done {
                // The connection can carry nothing more: the request loop
                // must see it ([`Subscriber::stopped`]) rather than wait
                // for the peer's next frame.
                cx.waker().wake_by_ref();
            }
        }
        if this.reader_done && this.writer_done { Poll::Ready(()) } else { Poll::Pending }
    }
}

/// The waker of one half, borrowing `handle`'s reference (no count is
/// taken; a clone takes one).
fn half_waker(handle: &Arc<Subscriber>, half: u8) -> ManuallyDrop<Waker> {
    let tagged = Arc::as_ptr(handle).map_addr(|a| a | usize::from(half)).cast::<()>();
    // SAFETY: the vtable's functions treat the pointer as a tagged
    // `Arc<Subscriber>`; the borrowed one is never dropped (ManuallyDrop)
    // and `handle` outlives it.
    ManuallyDrop::new(unsafe { Waker::from_raw(RawWaker::new(tagged, &VTABLE)) })
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);

fn untag(tagged: *const ()) -> (*const Subscriber, u8) {
    let tags = usize::from(READER | WRITER);
    (tagged.map_addr(|a| a & !tags).cast::<Subscriber>(), (tagged.addr() & tags) as u8)
}

unsafe fn clone(tagged: *const ()) -> RawWaker {
    // SAFETY: `tagged` came from `half_waker` or a clone, so the handle is
    // alive (the borrowed `Arc` or this waker's own count keeps it).
    unsafe { Arc::increment_strong_count(untag(tagged).0) };
    RawWaker::new(tagged, &VTABLE)
}

unsafe fn wake(tagged: *const ()) {
    // SAFETY: as in `clone`; this waker owns a count, given back after.
    unsafe {
        wake_by_ref(tagged);
        drop_waker(tagged);
    }
}

unsafe fn wake_by_ref(tagged: *const ()) {
    let (handle, half) = untag(tagged);
    // SAFETY: as in `clone`.
    let handle = unsafe { &*handle };
    handle.wakes.fetch_or(half, Ordering::AcqRel);
    handle.task.wake();
}

unsafe fn drop_waker(tagged: *const ()) {
    // SAFETY: as in `clone`; this waker owns the count it gives back.
    unsafe { Arc::decrement_strong_count(untag(tagged).0) };
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use tokio::sync::Notify;

    use super::*;

    /// A task's waker that records whether it was woken.
    struct Woken(AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Polls a future by hand, as the runtime would.
    struct Task<F> {
        future: Pin<Box<F>>,
        woken: Arc<Woken>,
    }

    impl<F: Future<Output = ()>> Task<F> {
        fn new(future: F) -> Self {
            Task { future: Box::pin(future), woken: Arc::new(Woken(AtomicBool::new(false))) }
        }

        fn poll(&mut self) -> Poll<()> {
            self.woken.0.store(false, Ordering::Relaxed);
            let waker = Waker::from(self.woken.clone());
            self.future.as_mut().poll(&mut Context::from_waker(&waker))
        }

        fn is_woken(&self) -> bool {
            self.woken.0.load(Ordering::Relaxed)
        }
    }

    /// A half that counts its polls and finishes after `n` notifications.
    async fn half(polls: &AtomicUsize, notify: &Notify, n: usize) {
        let mut waits = pin!(async {
            for _ in 0..n {
                notify.notified().await;
            }
        });
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            waits.as_mut().poll(cx)
        })
        .await
    }

    fn handle() -> Arc<Subscriber> {
        Arc::new(Subscriber::new(1, Default::default(), 1, "tcp", String::new()))
    }

    fn polls(r: &AtomicUsize, w: &AtomicUsize) -> (usize, usize) {
        (r.load(Ordering::Relaxed), w.load(Ordering::Relaxed))
    }

    #[test]
    fn each_half_is_polled_only_when_its_own_waker_fired() {
        let h = handle();
        let (r, w) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (r_notify, w_notify) = (Notify::new(), Notify::new());
        let mut task = Task::new(join(&h, Io::Separate, half(&r, &r_notify, 2), half(&w, &w_notify, 3)));
        assert!(task.poll().is_pending());
        assert_eq!(polls(&r, &w), (1, 1), "both halves run on the first poll");
        for round in 2..=3 {
            w_notify.notify_one();
            assert!(task.is_woken(), "a half's wake wakes the task");
            assert!(task.poll().is_pending());
            assert_eq!(polls(&r, &w), (1, round), "the request loop is not polled for the writer");
        }
        assert!(!task.is_woken());
        r_notify.notify_one();
        assert!(task.poll().is_pending());
        assert_eq!(polls(&r, &w), (2, 3), "nor the writer for the request loop");
        r_notify.notify_one();
        w_notify.notify_one();
        assert!(task.poll().is_ready(), "both halves woken, both polled, both done");
        drop(task);
        assert_eq!(Arc::strong_count(&h), 1, "no waker kept a count on the handle");
    }

    #[test]
    fn halves_sharing_one_resource_are_both_polled_on_every_wake() {
        let h = handle();
        let (r, w) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (r_notify, w_notify) = (Notify::new(), Notify::new());
        let mut task = Task::new(join(&h, Io::Shared, half(&r, &r_notify, 1), half(&w, &w_notify, 2)));
        assert!(task.poll().is_pending());
        w_notify.notify_one();
        assert!(task.poll().is_pending());
        assert_eq!(polls(&r, &w), (2, 2));
    }

    #[test]
    fn a_writer_woken_by_the_request_loop_runs_in_the_same_poll() {
        let h = handle();
        let (w, w_notify) = (AtomicUsize::new(0), Notify::new());
        let mut replied = false;
        let reader = std::future::poll_fn(|_| {
            // A request handled: its reply queued for the writer.
            if !std::mem::replace(&mut replied, true) {
                w_notify.notify_one();
            }
            Poll::<()>::Pending
        });
        let mut task = Task::new(join(&h, Io::Separate, reader, half(&w, &w_notify, 2)));
        assert!(task.poll().is_pending());
        assert_eq!(w.load(Ordering::Relaxed), 1);
        w_notify.notify_one();
        assert!(task.poll().is_pending());
        assert_eq!(w.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn once_a_half_is_done_any_wake_reaches_the_other() {
        // A TLS read half that wrote an alert on its way to an error left its
        // waker in the socket's write slot, in place of the writer's.
        let h = handle();
        let stale = std::sync::Mutex::new(None::<Waker>);
        let reader = std::future::poll_fn(|cx| {
            *stale.lock().unwrap() = Some(cx.waker().clone());
            Poll::Ready(())
        });
        let writable = AtomicBool::new(false);
        let writer =
            std::future::poll_fn(|_| if writable.load(Ordering::Relaxed) { Poll::Ready(()) } else { Poll::Pending });
        let mut task = Task::new(join(&h, Io::Separate, reader, writer));
        assert!(task.poll().is_pending());
        writable.store(true, Ordering::Relaxed);
        stale.lock().unwrap().take().unwrap().wake();
        assert!(task.is_woken());
        assert!(task.poll().is_ready(), "the writer ran on the finished reader's wake");
    }

    #[test]
    fn a_wake_between_polls_is_not_lost() {
        let h = handle();
        let notify = Notify::new();
        let w = AtomicUsize::new(0);
        let mut task = Task::new(join(&h, Io::Separate, async {}, half(&w, &notify, 1)));
        assert!(task.poll().is_pending());
        notify.notify_one();
        assert!(task.is_woken());
        assert!(task.poll().is_ready());
    }

    #[test]
    fn a_cloned_waker_dropped_unwoken_gives_its_count_back() {
        let h = handle();
        let waker = half_waker(&h, WRITER);
        let clone = (*waker).clone();
        assert_eq!(Arc::strong_count(&h), 2);
        assert!(clone.will_wake(&waker) && !clone.will_wake(&half_waker(&h, READER)), "the halves' wakers differ");
        drop(clone);
        assert_eq!(Arc::strong_count(&h), 1);
        assert_eq!(h.wakes.load(Ordering::Relaxed), 0, "dropping wakes nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn halves_woken_from_other_threads_while_polled_all_finish() {
        // Wakes race the polls from two other threads; a lost one would
        // leave a half waiting for a permit that is already there.
        const N: usize = 20_000;
        let h = handle();
        let (r_sem, w_sem) = (Arc::new(tokio::sync::Semaphore::new(0)), Arc::new(tokio::sync::Semaphore::new(0)));
        let take = |sem: Arc<tokio::sync::Semaphore>| async move {
            for _ in 0..N {
                sem.acquire().await.unwrap().forget();
            }
        };
        let task = {
            let (h, r, w) = (h.clone(), take(r_sem.clone()), take(w_sem.clone()));
            tokio::spawn(async move { join(&h, Io::Separate, r, w).await })
        };
        let feeders: Vec<_> = [r_sem, w_sem]
            .into_iter()
            .map(|sem| {
                std::thread::spawn(move || {
                    for i in 0..N {
                        sem.add_permits(1);
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for f in feeders {
            f.join().unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .expect("both halves finish: no wake was lost")
            .unwrap();
        assert_eq!(Arc::strong_count(&h), 1, "no waker kept a count on the handle");
    }

    #[test]
    fn shutdown_wakes_the_request_loop() {
        let h = handle();
        let stop = tokio_util::sync::CancellationToken::new();
        let (w, w_notify) = (AtomicUsize::new(0), Notify::new());
        let mut task = Task::new(join(&h, Io::Separate, h.stopped(&stop), half(&w, &w_notify, 1)));
        assert!(task.poll().is_pending());
        stop.cancel();
        h.wake_reader();
        assert!(task.is_woken());
        assert!(task.poll().is_pending(), "the request loop is done; the writer still waits");
        assert_eq!(w.load(Ordering::Relaxed), 1, "and was not polled for it");
        w_notify.notify_one();
        assert!(task.poll().is_ready());
    }
}
