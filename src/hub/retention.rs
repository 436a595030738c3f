//! Retention (ARCHITECTURE.md, "Retention"): every `retention_interval_ms`
//! each room's oldest messages past its limits — the room's own
//! (`UpdateRoom`, owner only) or the server's default — are removed from
//! the store, and the room's log then starts later (`first_seq` in
//! `HistoryPage` and `Synced`). Seqs are never reused.
//!
//! A trim runs in the group commit's writer, between two batches
//! ([`crate::store::commit::Write::Exclusive`]), one room at a time:
//! nothing else writes while it does, so nothing sled writes for it can be
//! half-made when a batch is synced (sled writes large items to files of
//! their own, which a sync lists first; one created meanwhile by another
//! thread would have its pointer made durable without it). And it is
//! synced at once, whatever the durability mode, so a rewrite of runs is
//! never part of an unsynced stretch of sled's log.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Hub;
use crate::pipeline::Completion;
use crate::room::Room;
use crate::store::commit::{Exclusive, Pending, Write};
use crate::store::{StoreError, Trim};

/// Retention limits; 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove messages older than this (ms).
    pub max_age_ms: u64,
    /// Keep at most this many of the newest messages.
    pub max_messages: u64,
}

/// The most entries one step of a trim removes: a few milliseconds of
/// sled removals and one fsync, which the group commit waits for. A room
/// trimmed for the first time after years takes many steps, and other
/// writes go on between them.
const TRIM_STEP: u64 = 1024;

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
    /// One pass over every room: trims what its retention allows; returns
    /// how many entries were removed.
    pub async fn trim_rooms(&self, default: Retention, now_ms: u64) -> u64 {
        let mut removed = 0;
        for room in self.rooms() {
            removed += match &self.cluster {
                Some(c) => match self.trim_shared(c, &room, default, now_ms).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(room = %room.name, error = %e, "retention could not trim the room's stream in Redis");
                        0
                    }
                },
                None => self.trim_room(&room, default, now_ms).await,
            };
        }
        removed
    }

    /// [`Hub::trim_room`] in cluster mode: the room's stream in Redis is
    /// trimmed, [`TRIM_STEP`] entries at a time, each step's record
    /// computed from the stream and the record before it, so it is the
    /// same whichever node computes it; the nodes serving the room follow
    /// (`store::redis::retention`). Returns how many entries went.
    async fn trim_shared(
        &self,
        c: &super::cluster::Cluster,
        room: &Room,
        default: Retention,
        now_ms: u64,
    ) -> Result<u64, redis::RedisError> {
        let limits = default.over(room.gov().retention());
        if limits == Retention::default() {
            return Ok(0);
        }
        let name = &*room.name;
        let head = c.log.head(name).await?.0;
        let keep_from = if limits.max_messages > 0 { head.saturating_sub(limits.max_messages) + 1 } else { 0 };
        let older_than_ms = if limits.max_age_ms > 0 { now_ms.saturating_sub(limits.max_age_ms) } else { 0 };
        let mut removed = 0;
        loop {
            let record = c.log.trim_record(name).await?;
            let start = record.start();
            if start > head || (keep_from <= start && older_than_ms == 0) {
                break;
            }
            let trim = Trim { keep_from, older_than_ms, head: head.min(start + TRIM_STEP - 1) };
            let entries = c.log.range(name, start, trim.head).await?;
            let mut next = record.clone();
            match entries.first() {
                // Entries Redis lost (an epoch change) are passed over
                // uncounted: no node can count them.
                Some(first) if first.seq > start => next.start = first.seq,
                Some(_) => {
                    // Up to the first gap; the next step passes over it.
                    let run = entries.iter().zip(start..).take_while(|(e, seq)| e.seq == *seq);
                    let run: Vec<(u64, bytes::Bytes)> = run.map(|(e, _)| (e.seq, e.message.clone())).collect();
                    if let Err(e) = next.advance(&trim, run) {
                        tracing::error!(room = name, error = %e, "retention cannot read the room's stream in Redis");
                        break;
                    }
                }
                None if trim.head < head => next.start = trim.head + 1,
                None => break,
            }
            if next.start() <= start {
                break;
            }
            if !c.log.trim_to(name, start, &next).await? {
                // Another node trimmed it meanwhile.
                break;
            }
            let n = next.start() - start;
            removed += n;
            self.metrics.retention_removed.increment(n);
            tracing::info!(
                room = name,
                from = start,
                to = next.start() - 1,
                removed = n,
                "retention trimmed the room's stream in Redis"
            );
        }
        if removed > 0 {
            // What the append script kept of the trimmed messages' changes.
            let start = c.log.log_start(name).await?;
            c.log.forget_changes_below(name, start).await?;
        }
        Ok(removed)
    }

    /// Trims `room` as its retention allows, [`TRIM_STEP`] entries at a
    /// time, each step between two group commits; returns how many went.
    async fn trim_room(&self, room: &Arc<Room>, default: Retention, now_ms: u64) -> u64 {
        let limits = default.over(room.gov().retention());
        if limits == Retention::default() {
            return 0;
        }
        let head = room.head();
        let keep_from = if limits.max_messages > 0 { head.saturating_sub(limits.max_messages) + 1 } else { 0 };
        let older_than_ms = if limits.max_age_ms > 0 { now_ms.saturating_sub(limits.max_age_ms) } else { 0 };
        let mut removed = 0;
        loop {
            let start = room.start();
            if start > head || (keep_from <= start && older_than_ms == 0) {
                return removed;
            }
            // A step at a time: every publish waits while one runs.
            let trim = Trim { keep_from, older_than_ms, head: head.min(start + TRIM_STEP - 1) };
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
                    removed += n;
                    self.metrics.retention_removed.increment(n);
                    tracing::info!(room = %room.name, from = start, to = rec.start() - 1, removed = n, "retention trimmed the log");
                    room.set_trim(rec);
                }
                Some(Ok(_)) | None => return removed,
                Some(Err(e)) => {
                    tracing::warn!(room = %room.name, error = %e, "retention could not trim the log");
                    return removed;
                }
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

/// Trims every `interval`, for as long as the server runs. In cluster mode
/// one node does, holding a lease in Redis for two intervals (another
/// takes over when it stops).
pub async fn run(hub: Arc<Hub>, default: Retention, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(c) = hub.cluster() {
            let lease_ms = 2 * interval.as_millis() as u64;
            match c.log.lead_retention(&c.node, lease_ms).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "retention skipped: Redis unavailable");
                    continue;
                }
            }
        }
        hub.trim_rooms(default, crate::time::now_ms()).await;
    }
}
