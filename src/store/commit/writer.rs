//! The group commit's writer: gathers what is queued into one batch,
//! refuses writes of an older epoch or made while the store has failed,
//! writes the batch (on its own task when small and unsynced, else on the
//! blocking pool), syncs it as the durability mode says, and hands the
//! outcome to the fan-out in order.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::recovery::Recovery;
use super::{Committed, Durability, MAX_BATCH_OPS, Pending, Write};
use crate::store::{Batch, RoomId, Store, StoreError};

/// The largest batch written on the writer's own task when no sync follows
/// it (durability `batch` or `none`). sled's insert typically copies into
/// its log buffers in memory and its own threads write them out, so a small
/// batch costs less than handing it to the blocking pool and back — two
/// thread wake-ups on the path of every publish. A larger batch still goes
/// to the pool, so an inline write holds up the tasks of this worker for
/// about this many inserts (4.6 µs each in S1 with `none`: 0.15 ms a batch
/// on average; benches/README.md, "Small unsynced commits written inline"), and the writer yields after it when more
/// writes wait. The exceptions: an insert whose leaf is not in sled's cache
/// reads it from disk, as the reads that sessions make on workers already
/// may; and sled writes a log item past a quarter of its segment (128 KiB)
/// — a large value, or a leaf rewritten whole with large values in it — to
/// a file of its own on the calling thread. [`INLINE_WRITE_BYTES`] keeps
/// batches of large messages, whose leaves are the ones that grow past
/// that, off the workers; a small message landing in such a leaf can still
/// cause one. With 1,000 small rooms this once cut throughput by a third
/// (the worker also woke a task for every delivery, and those wake-ups
/// waited behind the writes). Live frames now go straight
/// into idle sockets (`delivery::queue`), and the same load runs
/// as fast inline as on the pool (benches/README.md, "Small unsynced
/// commits written inline").
pub(super) const INLINE_WRITE_OPS: usize = 64;

/// The most message bytes a batch written on the writer's task may hold
/// ([`INLINE_WRITE_OPS`]).
pub(super) const INLINE_WRITE_BYTES: usize = 64 * 1024;

/// The writer's state between batches.
struct Writer<C> {
    store: Arc<dyn Store>,
    durability: Durability,
    out: mpsc::Sender<Committed<C>>,
    failed: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    /// When the store was last synced (`batch` durability).
    last_sync: Instant,
    /// Something was written since the last sync (`batch` durability).
    unsynced: bool,
    recovery: Recovery,
    /// The batch being gathered.
    items: Vec<Pending<C>>,
    metrics: CommitMetrics,
}

/// The group commit's histograms and counters.
struct CommitMetrics {
    batch_size: metrics::Histogram,
    sync_seconds: metrics::Histogram,
    write_seconds: metrics::Histogram,
    failures: metrics::Counter,
}

/// What the writer waits for next, besides writes.
#[derive(Clone, Copy)]
enum Wait {
    /// Nothing: block until a write comes.
    Writes,
    /// A probe of the failed store is due after this long.
    Probe(Duration),
    /// A `batch` sync is due after this long.
    Sync(Duration),
}

/// Runs the writer until every queue handle is dropped; a clean stop leaves
/// everything durable, whatever the mode.
pub(super) async fn run<C: Send + 'static>(
    store: Arc<dyn Store>,
    durability: Durability,
    mut rx: mpsc::Receiver<Pending<C>>,
    out: mpsc::Sender<Committed<C>>,
    failed: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
) {
    let mut w = Writer {
        store,
        durability,
        out,
        failed,
        epoch,
        last_sync: Instant::now(),
        unsynced: false,
        recovery: Recovery::new(),
        items: Vec::with_capacity(64),
        metrics: CommitMetrics {
            batch_size: metrics::histogram!(crate::metrics::COMMIT_BATCH_SIZE),
            sync_seconds: metrics::histogram!(crate::metrics::COMMIT_SYNC_SECONDS),
            write_seconds: metrics::histogram!(crate::metrics::COMMIT_WRITE_SECONDS),
            failures: metrics::counter!(crate::metrics::COMMIT_FAILURES),
        },
    };
    loop {
        let kind = w.next_wait();
        let first = match kind {
            Wait::Writes => rx.recv().await,
            Wait::Probe(wait) | Wait::Sync(wait) => match tokio::time::timeout(wait, rx.recv()).await {
                Ok(item) => item,
                Err(_) => {
                    if w.on_timeout(matches!(kind, Wait::Probe(_))).await.is_break() {
                        break;
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else { break };
        if w.commit(first, &mut rx).await.is_break() {
            break;
        }
    }
    sync_now(&w.store, &w.failed).await;
}

impl<C: Send + 'static> Writer<C> {
    /// What to wait for besides the next write: a probe while the store is
    /// failed (until a recovery marker is on its way), a sync that the
    /// `batch` mode owes.
    fn next_wait(&mut self) -> Wait {
        let failed = self.failed.load(Ordering::Acquire);
        let probe = self.recovery.wait(failed);
        let sync = match self.durability {
            Durability::Batch { interval } if self.unsynced => Some(interval.saturating_sub(self.last_sync.elapsed())),
            _ => None,
        };
        // A failed store is not synced; once the recovery marker is on its
        // way, nothing is probed either until the fan-out has cleared the
        // failure (a second marker would open a second epoch).
        match (failed, probe, sync) {
            (true, Some(wait), _) => Wait::Probe(wait),
            (false, _, Some(wait)) => Wait::Sync(wait),
            _ => Wait::Writes,
        }
    }

    /// No write came within the wait: probe a failed store, or sync.
    async fn on_timeout(&mut self, probe: bool) -> ControlFlow<()> {
        if probe {
            if self.recovery.step(&self.store).await {
                let marker = Committed { completions: Vec::new(), result: Ok(()), size: 0, recovered: true };
                if self.out.send(marker).await.is_err() {
                    return ControlFlow::Break(());
                }
                self.recovery.marker_sent();
            }
        } else {
            self.sync().await;
        }
        ControlFlow::Continue(())
    }

    async fn sync(&mut self) {
        sync_now(&self.store, &self.failed).await;
        self.last_sync = Instant::now();
        self.unsynced = false;
    }

    /// Gathers `first` and whatever else is queued into a batch, commits
    /// it and hands the outcome on. `Break` once the fan-out is gone.
    async fn commit(&mut self, first: Pending<C>, rx: &mut mpsc::Receiver<Pending<C>>) -> ControlFlow<()> {
        self.items.push(first);
        // An exclusive write ends the batch: what is queued after it waits
        // until it has run.
        while self.items.len() < MAX_BATCH_OPS
            && !matches!(self.items.last(), Some(Pending { write: Write::Exclusive(_), .. }))
        {
            match rx.try_recv() {
                Ok(item) => self.items.push(item),
                Err(_) => break,
            }
        }
        // Writes of an older epoch (seqs assigned before a failure) or made
        // while the store is failed are not written: they fail first.
        let current = self.epoch.load(Ordering::Acquire);
        let refuse_all = self.failed.load(Ordering::Acquire);
        let (stale, fresh): (Vec<_>, Vec<_>) = self.items.drain(..).partition(|p| refuse_all || p.epoch != current);
        if !stale.is_empty() {
            let size = stale.len();
            let err = StoreError::Db("storage failed; this write was not stored".into());
            let done = Committed {
                completions: stale.into_iter().map(|p| p.completion).collect(),
                result: Err(Arc::new(err)),
                size,
                recovered: false,
            };
            if self.out.send(done).await.is_err() {
                return ControlFlow::Break(());
            }
        }
        if fresh.is_empty() {
            return ControlFlow::Continue(());
        }
        let size = fresh.len();
        self.metrics.batch_size.record(size as f64);
        let mut batch = Batch::default();
        let mut completions = Vec::with_capacity(size);
        let mut exclusive = None;
        for p in fresh {
            match p.write {
                Write::Append(a) => batch.appends.push(a),
                Write::Rooms(w) => batch.rooms.extend(w),
                Write::ReadMarker(r) => batch.read_markers.push(r),
                Write::Revocation(user, at) => batch.revocations.push((user, at)),
                Write::Barrier => {}
                Write::Exclusive(work) => exclusive = Some(work),
            }
            completions.push(p.completion);
        }
        let (result, inline) = if batch.is_empty() { (Ok(()), false) } else { self.write(batch, size).await };
        if let Durability::Batch { interval } = self.durability
            && self.unsynced
            && self.last_sync.elapsed() >= interval
        {
            self.sync().await;
        }
        let written = result.is_ok();
        if self.out.send(Committed { completions, result, size, recovered: false }).await.is_err() {
            return ControlFlow::Break(());
        }
        // After the batch's outcome went on, so its acks need not wait for
        // the work; a store that failed is not worked on.
        if let Some(work) = exclusive
            && written
            && !self.failed.load(Ordering::Acquire)
            && let Err(e) = tokio::task::spawn_blocking(move || work.run()).await
        {
            tracing::error!(error = %e, "work between two group commits failed");
        }
        // A write on this task did not yield; with more writes waiting (other
        // workers filled the queue meanwhile) the next batch would not either.
        if inline && !rx.is_empty() {
            tokio::task::yield_now().await;
        }
        ControlFlow::Continue(())
    }

    /// Writes (and, with `fsync`, syncs) one batch of `size` writes; says
    /// whether it was written on this task. A failure marks the store failed
    /// and notes the batch's first seq in each room for the recovery.
    async fn write(&mut self, batch: Batch, size: usize) -> (Result<(), Arc<StoreError>>, bool) {
        let mut firsts: HashMap<RoomId, u64> = HashMap::new();
        for a in &batch.appends {
            firsts.entry(a.room).or_insert(a.seq);
        }
        let st = self.store.clone();
        let sync_each = self.durability == Durability::Fsync;
        let inline = !sync_each
            && size <= INLINE_WRITE_OPS
            && batch.appends.iter().map(|a| a.message.len()).sum::<usize>() <= INLINE_WRITE_BYTES;
        let r = if inline {
            let started = Instant::now();
            // A panic in the store fails the batch, as one on the pool does,
            // instead of ending the writer with publishes unanswered.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.write(&batch)))
                .unwrap_or_else(|panic| Err(StoreError::Db(format!("writer panicked: {}", panic_text(&*panic)))));
            if r.is_ok() {
                self.metrics.write_seconds.record(started.elapsed().as_secs_f64());
            }
            r
        } else {
            let sync_seconds = self.metrics.sync_seconds.clone();
            let write_seconds = self.metrics.write_seconds.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                st.write(&batch)?;
                write_seconds.record(started.elapsed().as_secs_f64());
                if sync_each {
                    let started = Instant::now();
                    st.sync()?;
                    sync_seconds.record(started.elapsed().as_secs_f64());
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Db(format!("writer thread failed: {e}"))))
        };
        if let Err(e) = &r {
            self.recovery.batch_failed(firsts);
            self.metrics.failures.increment(1);
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, batch = size, "group commit failed; refusing writes until storage works again");
        }
        self.unsynced |= r.is_ok() && !sync_each;
        (r.map_err(Arc::new), inline)
    }
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

async fn sync_now(store: &Arc<dyn Store>, failed: &AtomicBool) {
    let st = store.clone();
    match tokio::task::spawn_blocking(move || st.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "store sync failed");
        }
        Err(e) => tracing::error!(error = %e, "store sync task failed"),
    }
}
