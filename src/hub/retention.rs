//! Retention (ARCHITECTURE.md, "Retention"): every `retention_interval_ms`
//! each room's oldest messages past its limits — the room's own
//! (`UpdateRoom`, owner only) or the server's default — are removed from
//! the store, and the room's log then starts later (`first_seq` in
//! `HistoryPage` and `Synced`). Seqs are never reused.
//!
//! The same pass has the store merge the small pieces its group commits
//! left of each room's log since the last pass ([`crate::store::Store::merge_runs`]):
//! with many rooms most are a single message, which costs sled about
//! three times its size on disk.
//!
//! Both run in the group commit's writer, between two batches
//! ([`crate::store::commit::Write::Exclusive`]), one room (and a bounded
//! amount of work) at a time: nothing else writes while they do, so
//! nothing sled writes for them can be half-made when a batch is synced
//! (sled writes large items to files of their own, which a sync lists
//! first; one created meanwhile by another thread would have its pointer
//! made durable without it — the power-cut battery found exactly that).
//! And each is synced at once, whatever the durability mode, so a rewrite
//! of runs is never part of an unsynced stretch of sled's log that a power
//! cut could leave half-recovered: with `batch`, the battery once found
//! holes and duplicates after such cuts (while sled's own periodic flush
//! was still on, `store::sled::trees`). One fsync per room merged a pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Hub;
use crate::pipeline::Completion;
use crate::room::Room;
use crate::store::commit::{Exclusive, Pending, Write};
use crate::store::{RoomId, StoreError, Trim};

/// Stored pieces of one room's log a pass reads at most to merge them: a
/// few MiB, so one room does not hold up the others, and a room that
/// grew by more catches up over the next passes.
const MERGE_BUDGET: usize = 4096;

/// Retention limits; 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove messages older than this (ms).
    pub max_age_ms: u64,
    /// Keep at most this many of the newest messages.
    pub max_messages: u64,
}

impl Retention {
    /// The room's own limits where it set them, else these.
    fn over(self, room: (u64, u64)) -> Retention {
        Retention {
            max_age_ms: if room.0 > 0 { room.0 } else { self.max_age_ms },
            max_messages: if room.1 > 0 { room.1 } else { self.max_messages },
        }
    }
}

impl Hub {
    /// One pass over every room: trims what its retention allows, then
    /// merges what was written since `merged` (each room's seq to go on
    /// from); returns how many entries were removed.
    pub async fn tidy_rooms(&self, default: Retention, now_ms: u64, merged: &mut HashMap<RoomId, u64>) -> u64 {
        let mut removed = 0;
        for room in self.rooms() {
            removed += self.trim_room(&room, default, now_ms).await;
            let from = merged.get(&room.id).copied().unwrap_or(0).max(room.start());
            let to = room.head();
            if from >= to {
                continue;
            }
            let store = self.store.clone();
            let id = room.id;
            let merge = move || {
                let merged = store.merge_runs(id, from, to, MERGE_BUDGET)?;
                if merged.1 > 0 {
                    store.sync()?;
                }
                Ok(merged)
            };
            match self.between_commits(merge).await {
                Some(Ok((next, _))) => {
                    merged.insert(id, next);
                }
                Some(Err(e)) => tracing::warn!(room = %room.name, error = %e, "could not merge the log's pieces"),
                None => {}
            }
        }
        removed
    }

    /// Trims `room` as its retention allows; returns how many entries went.
    async fn trim_room(&self, room: &Arc<Room>, default: Retention, now_ms: u64) -> u64 {
        let limits = default.over(room.gov().retention());
        if limits == Retention::default() {
            return 0;
        }
        let (head, start) = (room.head(), room.start());
        let trim = Trim {
            keep_from: if limits.max_messages > 0 { head.saturating_sub(limits.max_messages) + 1 } else { 0 },
            older_than_ms: if limits.max_age_ms > 0 { now_ms.saturating_sub(limits.max_age_ms) } else { 0 },
            head,
        };
        if start > head || (trim.keep_from <= start && trim.older_than_ms == 0) {
            return 0;
        }
        let store = self.store.clone();
        let id = room.id;
        let work = move || {
            let rec = store.trim(id, &trim)?;
            if rec.start() > start {
                store.sync()?;
            }
            Ok(rec)
        };
        match self.between_commits(work).await {
            Some(Ok(rec)) if rec.start() > start => {
                let n = rec.start() - start;
                self.metrics.retention_removed.increment(n);
                tracing::info!(room = %room.name, from = start, to = rec.start() - 1, removed = n, "retention trimmed the log");
                room.set_trim(rec);
                n
            }
            Some(Ok(_)) | None => 0,
            Some(Err(e)) => {
                tracing::warn!(room = %room.name, error = %e, "retention could not trim the log");
                0
            }
        }
    }

    /// Runs `work` in the group commit's writer between two batches; `None`
    /// when storage has failed or the server is stopping (the next pass
    /// tries again).
    async fn between_commits<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Option<Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let exclusive = Exclusive::new(move || {
            let _ = tx.send(work());
        });
        let commits = &self.pipeline.commits;
        // Its completion says only that the batch before it settled.
        let (done, _) = oneshot::channel();
        let slot = commits.reserve().await?;
        slot.send(Pending {
            write: Write::Exclusive(exclusive),
            completion: Completion::Notify(done),
            epoch: commits.epoch(),
        });
        rx.await.ok()
    }
}

/// Trims and merges every `interval`, for as long as the server runs.
pub async fn run(hub: Arc<Hub>, default: Retention, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut merged = HashMap::new();
    loop {
        tick.tick().await;
        hub.tidy_rooms(default, crate::time::now_ms(), &mut merged).await;
    }
}
