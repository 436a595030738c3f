//! Retention (ARCHITECTURE.md, "Retention"): every `retention_interval_ms`
//! each room's oldest messages past its limits — the room's own
//! (`UpdateRoom`, owner only) or the server's default — are removed from
//! the store, and the room's log then starts later (`first_seq` in
//! `HistoryPage` and `Synced`). Seqs are never reused.

use std::sync::Arc;
use std::time::Duration;

use super::Hub;
use crate::store::Trim;

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
    /// One pass over every room: trims what its retention allows; returns
    /// how many entries were removed.
    pub async fn trim_rooms(&self, default: Retention, now_ms: u64) -> u64 {
        let mut removed = 0;
        for room in self.rooms() {
            let limits = default.over(room.gov().retention());
            if limits == Retention::default() {
                continue;
            }
            let (head, start) = (room.head(), room.start());
            let trim = Trim {
                keep_from: if limits.max_messages > 0 { head.saturating_sub(limits.max_messages) + 1 } else { 0 },
                older_than_ms: if limits.max_age_ms > 0 { now_ms.saturating_sub(limits.max_age_ms) } else { 0 },
                head,
            };
            if start > head || (trim.keep_from <= start && trim.older_than_ms == 0) {
                continue;
            }
            let store = self.store.clone();
            let id = room.id;
            match tokio::task::spawn_blocking(move || store.trim(id, &trim)).await {
                Ok(Ok(rec)) if rec.start() > start => {
                    let n = rec.start() - start;
                    removed += n;
                    self.metrics.retention_removed.increment(n);
                    tracing::info!(room = %room.name, from = start, to = rec.start() - 1, removed = n, "retention trimmed the log");
                    room.set_trim(rec);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(room = %room.name, error = %e, "retention could not trim the log"),
                Err(e) => tracing::warn!(room = %room.name, error = %e, "retention task failed"),
            }
        }
        removed
    }
}

/// Trims every `interval`, for as long as the server runs.
pub async fn run(hub: Arc<Hub>, default: Retention, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        hub.trim_rooms(default, crate::time::now_ms()).await;
    }
}
