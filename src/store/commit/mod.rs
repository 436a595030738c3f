//! Group commit: one writer turns every pending write from every room into
//! one batch, written in one go and made durable by one sync
//! (ARCHITECTURE.md, "Ack after fsync"; how the sled store writes a batch,
//! and why not with `apply_batch`, is in [`super::sled`]).
//!
//! Sessions hand writes in through a bounded channel, so a publisher that
//! outruns the disk waits for a slot (and, behind it, TCP backpressure slows
//! the client) instead of growing a buffer. The writer runs the blocking
//! store calls on tokio's blocking pool — all but a small batch that no sync
//! follows, which it writes itself (`writer::INLINE_WRITE_OPS` says why) — and
//! passes each committed batch, in order, to the next stage (the fan-out),
//! together with the completions the sessions attached to their writes.
//! While one batch syncs, the next one gathers in the channel: the batch
//! size grows with the load.
//!
//! A failed write or sync is not retried: the batch and everything queued
//! behind it is reported failed, and nothing is ever acknowledged that is
//! not stored. While failed, the writer probes the store (after a second,
//! then less often while it keeps failing). Once a probe succeeds it removes
//! whatever the failed batches left in the store (a write can land and its
//! sync fail: [`Store::truncate`] from a failed batch's first seq in each
//! room) and sends a recovery marker down the pipeline. When the fan-out
//! reaches it, every earlier batch is settled, so it opens a new *epoch* and
//! clears the failure ([`CommitQueue::recovered`]). Each write carries the
//! epoch in force when its seq was assigned; the writer drops writes of an
//! older epoch, and a room seeing a new epoch restarts its seqs
//! from its durable head — so no gap and no reused seq is ever stored.
//!
//! Between two batches the writer can run work that must see the store
//! with no batch half-written and hold up the next one ([`Write::Exclusive`]:
//! the consistent point of an online backup).
//!
//! [`writer`] gathers, writes and syncs batches; [`recovery`] is the
//! failure state machine (probes, the failed tails to remove, the marker).

mod recovery;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Append, ReadMarker, RoomWrite, Store, StoreError};

/// The largest number of writes in one batch.
pub const MAX_BATCH_OPS: usize = 4096;

/// When a write counts as committed (`--durability`; ARCHITECTURE.md, "Ack after fsync").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Ack after the group commit is flushed and fdatasync'ed.
    Fsync,
    /// Ack after the write; sync every `interval`.
    Batch {
        /// Time between syncs.
        interval: Duration,
    },
    /// Never sync explicitly (benchmarks only; a crash loses acked messages).
    None,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Fsync => write!(f, "fsync"),
            Durability::Batch { interval } => write!(f, "batch({}ms)", interval.as_millis()),
            Durability::None => write!(f, "none"),
        }
    }
}

/// One write, as handed to the writer.
#[derive(Debug)]
pub enum Write {
    /// A message append.
    Append(Append),
    /// Changes to rooms' details, members, bans or invitations, written
    /// together in this order.
    Rooms(Vec<RoomWrite>),
    /// A read-marker move.
    ReadMarker(ReadMarker),
    /// A user signed out everywhere at (Unix seconds).
    Revocation(String, u64),
    /// Writes nothing: its completion comes out once everything before it
    /// has been committed (used by shutdown).
    Barrier,
    /// Work on the store between two batches: the writes queued before it
    /// are written (and, with `fsync`, synced) in a batch that it ends, then
    /// it runs on the blocking pool, and no write queued after it is
    /// written until it returns. Its completion comes out with that batch,
    /// before it runs. It is dropped without running when the batch failed
    /// or the store has (its owner sees its channel closed). A backup takes
    /// its consistent point this way (`store::sled::backup`).
    Exclusive(Exclusive),
}

/// The work of a [`Write::Exclusive`].
pub struct Exclusive(Box<dyn FnOnce() + Send>);

impl Exclusive {
    /// Wraps `work`, which should be short: every publish waits for it.
    pub fn new(work: impl FnOnce() + Send + 'static) -> Self {
        Exclusive(Box::new(work))
    }

    fn run(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Exclusive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exclusive(..)")
    }
}

/// A write and what to do once it is committed.
pub struct Pending<C> {
    /// The write.
    pub write: Write,
    /// Handed back with the outcome.
    pub completion: C,
    /// The commit epoch the write belongs to ([`CommitQueue::epoch`]).
    pub epoch: u64,
}

/// The outcome of one batch, in the order the writes were submitted.
pub struct Committed<C> {
    /// The writes' completions.
    pub completions: Vec<C>,
    /// `Err` if the batch was not stored.
    pub result: Result<(), Arc<StoreError>>,
    /// Writes in the batch (for metrics and logs).
    pub size: usize,
    /// A recovery marker: the store works again (no completions).
    pub recovered: bool,
}

/// Where sessions submit writes.
pub struct CommitQueue<C> {
    tx: mpsc::Sender<Pending<C>>,
    failed: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
}

impl<C> Clone for CommitQueue<C> {
    fn clone(&self) -> Self {
        CommitQueue { tx: self.tx.clone(), failed: self.failed.clone(), epoch: self.epoch.clone() }
    }
}

impl<C: Send + 'static> CommitQueue<C> {
    /// Waits for a slot in the queue. The permit lets the caller assign a seq
    /// under a room lock and submit in the same critical section, so the
    /// queue's order is each room's seq order.
    pub async fn reserve(&self) -> Option<mpsc::Permit<'_, Pending<C>>> {
        self.tx.reserve().await.ok()
    }

    /// Writes waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The current commit epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Called by the fan-out when it reaches a recovery marker: every batch
    /// before it is settled, so a new epoch starts and writes flow again.
    pub fn recovered(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.failed.store(false, Ordering::Release);
    }

    /// Whether the store has failed (writes are refused until it recovers).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// Starts the writer. It stops when every [`CommitQueue`] is dropped, after
/// committing and syncing what was queued.
pub fn start<C: Send + 'static>(
    store: Arc<dyn Store>,
    durability: Durability,
    queue_len: usize,
    out: mpsc::Sender<Committed<C>>,
) -> (CommitQueue<C>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue_len);
    let failed = Arc::new(AtomicBool::new(false));
    let epoch = Arc::new(AtomicU64::new(0));
    let handle = tokio::spawn(writer::run(store, durability, rx, out, failed.clone(), epoch.clone()));
    (CommitQueue { tx, failed, epoch }, handle)
}

#[cfg(test)]
mod tests {
    use super::writer::{INLINE_WRITE_BYTES, INLINE_WRITE_OPS};
    use super::*;
    use crate::store::Batch;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn writes_come_out_committed_in_submission_order() {
        let store = Arc::new(MemoryStore::new());
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (queue, handle) = start::<u64>(store.clone(), Durability::Fsync, 1024, out_tx);
        for seq in 1..=100u64 {
            let permit = queue.reserve().await.unwrap();
            permit.send(Pending {
                write: Write::Append(crate::store::contract::append(1, seq, "ann", "")),
                completion: seq,
                epoch: queue.epoch(),
            });
        }
        drop(queue);
        let mut seen = Vec::new();
        while let Some(c) = out_rx.recv().await {
            assert!(c.result.is_ok());
            seen.extend(c.completions);
        }
        handle.await.unwrap();
        assert_eq!(seen, (1..=100).collect::<Vec<_>>());
        assert_eq!(store.read_range(1, 1, 1000, "").unwrap().len(), 100);
    }

    /// A store whose writes fail: with an error, or (`true`) by panicking.
    struct FailingStore(bool);
    impl Store for FailingStore {
        fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
            Ok(Default::default())
        }
        fn departure(
            &self,
            _: &str,
            _: crate::store::RoomId,
        ) -> Result<Option<crate::store::MemberRecord>, StoreError> {
            Ok(None)
        }
        fn write(&self, _: &Batch) -> Result<(), StoreError> {
            if self.0 {
                panic!("store bug")
            }
            Err(StoreError::Io(std::io::Error::other("disk full")))
        }
        fn sync(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn truncate(&self, _: u64, _: u64) -> Result<usize, StoreError> {
            Ok(0)
        }
        fn read_folded(&self, _: u64, _: u64, _: u64, _: &str) -> Result<Vec<crate::store::fold::Folded>, StoreError> {
            Ok(vec![])
        }
        fn target(&self, _: u64, _: u64) -> Result<Option<crate::store::Target>, StoreError> {
            Ok(None)
        }
        fn has_reaction(&self, _: u64, _: u64, _: &str, _: &str) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn lookup_idempotent(&self, _: &str, _: &str) -> Result<Option<crate::store::IdempotencyRecord>, StoreError> {
            Ok(None)
        }
        fn expire_idempotency(&self, _: u64) -> Result<usize, StoreError> {
            Ok(0)
        }
        fn trim(&self, _: u64, _: &crate::store::Trim) -> Result<crate::store::TrimRecord, StoreError> {
            Ok(crate::store::TrimRecord::default())
        }
        fn size_on_disk(&self) -> u64 {
            0
        }
    }

    /// Starts a writer over a [`FailingStore`] (panicking if `panics`) and
    /// submits one append (completion 1).
    async fn one_append_to_failing_store(
        panics: bool,
        durability: Durability,
    ) -> (CommitQueue<u64>, tokio::task::JoinHandle<()>, mpsc::Receiver<Committed<u64>>) {
        let (out_tx, out_rx) = mpsc::channel(16);
        let (queue, handle) = start::<u64>(Arc::new(FailingStore(panics)), durability, 16, out_tx);
        queue.reserve().await.unwrap().send(Pending {
            write: Write::Append(crate::store::contract::append(1, 1, "ann", "")),
            completion: 1,
            epoch: 0,
        });
        (queue, handle, out_rx)
    }

    #[tokio::test]
    async fn a_failed_write_fails_its_batch_and_everything_after() {
        // Fsync writes on the blocking pool, None on the writer's task.
        for durability in [Durability::Fsync, Durability::None] {
            let (queue, _h, mut out_rx) = one_append_to_failing_store(false, durability).await;
            let c = out_rx.recv().await.unwrap();
            assert!(c.result.is_err(), "{durability}");
            assert!(queue.has_failed(), "{durability}");
            queue.reserve().await.unwrap().send(Pending { write: Write::Barrier, completion: 2, epoch: 0 });
            assert!(out_rx.recv().await.unwrap().result.is_err(), "{durability}");
        }
    }

    /// A memory store that notes each write's size and the thread it ran
    /// on, and fails the next write when `fail_next` is set.
    #[derive(Default)]
    struct Observed {
        inner: MemoryStore,
        writes: std::sync::Mutex<Vec<(usize, std::thread::ThreadId)>>,
        fail_next: std::sync::atomic::AtomicBool,
    }
    impl Store for Observed {
        fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
            self.inner.load()
        }
        fn departure(
            &self,
            user: &str,
            room: crate::store::RoomId,
        ) -> Result<Option<crate::store::MemberRecord>, StoreError> {
            self.inner.departure(user, room)
        }
        fn write(&self, batch: &Batch) -> Result<(), StoreError> {
            if self.fail_next.swap(false, Ordering::AcqRel) {
                return Err(StoreError::Io(std::io::Error::other("disk full")));
            }
            self.writes.lock().unwrap().push((batch.appends.len(), std::thread::current().id()));
            self.inner.write(batch)
        }
        fn sync(&self) -> Result<(), StoreError> {
            self.inner.sync()
        }
        fn truncate(&self, room: u64, from: u64) -> Result<usize, StoreError> {
            self.inner.truncate(room, from)
        }
        fn read_folded(
            &self,
            room: u64,
            from: u64,
            to: u64,
            viewer: &str,
        ) -> Result<Vec<crate::store::fold::Folded>, StoreError> {
            self.inner.read_folded(room, from, to, viewer)
        }
        fn target(&self, room: u64, seq: u64) -> Result<Option<crate::store::Target>, StoreError> {
            self.inner.target(room, seq)
        }
        fn has_reaction(&self, room: u64, seq: u64, key: &str, user: &str) -> Result<bool, StoreError> {
            self.inner.has_reaction(room, seq, key, user)
        }
        fn lookup_idempotent(
            &self,
            user: &str,
            id: &str,
        ) -> Result<Option<crate::store::IdempotencyRecord>, StoreError> {
            self.inner.lookup_idempotent(user, id)
        }
        fn expire_idempotency(&self, before: u64) -> Result<usize, StoreError> {
            self.inner.expire_idempotency(before)
        }
        fn trim(&self, room: u64, trim: &crate::store::Trim) -> Result<crate::store::TrimRecord, StoreError> {
            self.inner.trim(room, trim)
        }
        fn size_on_disk(&self) -> u64 {
            self.inner.size_on_disk()
        }
    }

    #[tokio::test]
    async fn one_recovery_marker_per_failure_even_with_a_batch_sync_due() {
        // With `batch`, a write left unsynced when the store failed must not
        // turn the sync's timer into a second probe once the marker is out:
        // a second marker would open a second epoch and refuse the writes
        // made in between.
        let store = Arc::new(Observed::default());
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let durability = Durability::Batch { interval: Duration::from_millis(200) };
        let (queue, _h) = start::<u64>(store.clone(), durability, 16, out_tx);
        queue_appends(&queue, 1..=1, 10).await;
        assert!(out_rx.recv().await.unwrap().result.is_ok(), "written, not yet synced");
        store.fail_next.store(true, Ordering::Release);
        queue_appends(&queue, 2..=2, 10).await;
        assert!(out_rx.recv().await.unwrap().result.is_err());
        let marker = tokio::time::timeout(Duration::from_secs(10), out_rx.recv()).await.unwrap().unwrap();
        assert!(marker.recovered, "the store works again after a probe");
        // The fan-out has not reached the marker yet: nothing more comes.
        let more = tokio::time::timeout(Duration::from_millis(600), out_rx.recv()).await;
        assert!(more.is_err(), "a second marker or batch came: {:?}", more.map(|c| c.map(|c| c.recovered)));
        queue.recovered();
        queue_appends(&queue, 2..=2, 10).await;
        assert!(out_rx.recv().await.unwrap().result.is_ok(), "writes flow in the new epoch");
    }

    /// Queues appends to room 1 with seqs `seqs`, each message `len` bytes,
    /// without yielding (so the writer, on this thread, takes them as one
    /// batch).
    async fn queue_appends(queue: &CommitQueue<u64>, seqs: std::ops::RangeInclusive<u64>, len: usize) {
        tokio::task::unconstrained(async {
            for seq in seqs {
                let mut a = crate::store::contract::append(1, seq, "ann", "");
                a.message = bytes::Bytes::from(vec![b'x'; len]);
                queue.reserve().await.unwrap().send(Pending {
                    write: Write::Append(a),
                    completion: seq,
                    epoch: queue.epoch(),
                });
            }
        })
        .await
    }

    #[tokio::test]
    async fn small_unsynced_batches_are_written_on_the_writers_task_and_the_rest_on_the_pool() {
        let (ops, bytes) = (INLINE_WRITE_OPS as u64, INLINE_WRITE_BYTES);
        let hour = Duration::from_secs(3600);
        for durability in [Durability::None, Durability::Batch { interval: hour }, Durability::Fsync] {
            let store = Arc::new(Observed::default());
            let (out_tx, mut out_rx) = mpsc::channel(16);
            let (queue, handle) = start::<u64>(store.clone(), durability, 1024, out_tx);
            // (seqs, message size) of each batch.
            let batches = [
                (1..=ops + 1, 10),                          // one write too many
                (ops + 2..=2 * ops + 1, 10),                // just small enough
                (2 * ops + 2..=2 * ops + 2, 10),            // one write
                (2 * ops + 3..=2 * ops + 4, bytes / 2 + 1), // one byte too many
                (2 * ops + 5..=2 * ops + 6, bytes / 2),     // just small enough
            ];
            for (seqs, len) in batches.clone() {
                queue_appends(&queue, seqs.clone(), len).await;
                let c = out_rx.recv().await.unwrap();
                assert!(c.result.is_ok());
                assert_eq!(c.completions, seqs.collect::<Vec<_>>(), "{durability}");
            }
            drop(queue);
            handle.await.unwrap();
            let here = std::thread::current().id();
            let inline = durability != Durability::Fsync;
            let writes: Vec<(usize, bool)> =
                store.writes.lock().unwrap().iter().map(|&(n, thread)| (n, thread == here)).collect();
            let ops = ops as usize;
            let expected = vec![(ops + 1, false), (ops, inline), (1, inline), (2, false), (2, inline)];
            assert_eq!(writes, expected, "{durability}");
            assert_eq!(store.read_range(1, 1, 1000, "").unwrap().len(), 2 * ops + 6);
        }
    }

    #[tokio::test]
    async fn exclusive_work_runs_between_the_batch_it_ends_and_the_next() {
        let store = Arc::new(Observed::default());
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (queue, handle) = start::<u64>(store.clone(), Durability::Fsync, 1024, out_tx);
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let st = store.clone();
        // All queued before the writer runs (this runtime has one thread):
        // without the exclusive work they would be one batch.
        queue_appends(&queue, 1..=3, 10).await;
        queue.reserve().await.unwrap().send(Pending {
            write: Write::Exclusive(Exclusive::new(move || {
                let _ = seen_tx.send(st.read_range(1, 1, 100, "").unwrap().len());
            })),
            completion: 100,
            epoch: queue.epoch(),
        });
        queue_appends(&queue, 4..=6, 10).await;
        assert_eq!(out_rx.recv().await.unwrap().completions, vec![1, 2, 3, 100]);
        assert_eq!(seen_rx.await.unwrap(), 3, "the work saw the batch before it and nothing after");
        assert_eq!(out_rx.recv().await.unwrap().completions, vec![4, 5, 6]);
        drop(queue);
        handle.await.unwrap();
        let sizes: Vec<usize> = store.writes.lock().unwrap().iter().map(|w| w.0).collect();
        assert_eq!(sizes, vec![3, 3]);
    }

    #[tokio::test]
    async fn exclusive_work_is_dropped_unrun_while_the_store_has_failed() {
        let (queue, _h, mut out_rx) = one_append_to_failing_store(false, Durability::Fsync).await;
        assert!(out_rx.recv().await.unwrap().result.is_err());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        queue.reserve().await.unwrap().send(Pending {
            write: Write::Exclusive(Exclusive::new(move || {
                let _ = tx.send(());
            })),
            completion: 2,
            epoch: queue.epoch(),
        });
        assert!(out_rx.recv().await.unwrap().result.is_err());
        assert!(rx.await.is_err(), "the work never ran");
    }

    /// A panic in the store must not end the writer: the publishes of its
    /// batch would never be answered, and every later one would be refused
    /// as if the server were stopping.
    #[tokio::test]
    async fn a_panic_in_a_write_fails_its_batch_and_the_writer_goes_on() {
        for durability in [Durability::None, Durability::Fsync] {
            let (queue, handle, mut out_rx) = one_append_to_failing_store(true, durability).await;
            let err = out_rx.recv().await.unwrap().result.expect_err("the batch fails").to_string();
            assert!(err.contains("store bug"), "{durability}: {err}");
            assert!(queue.has_failed(), "{durability}");
            queue.reserve().await.unwrap().send(Pending { write: Write::Barrier, completion: 2, epoch: 0 });
            assert!(out_rx.recv().await.unwrap().result.is_err(), "{durability}");
            drop(queue);
            handle.await.expect("the writer ends cleanly");
        }
    }
}
