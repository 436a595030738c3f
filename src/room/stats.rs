//! Per-room statistics for `/admin/rooms`: messages per second over the
//! last minute and p99 publish latency, in fixed-size windows (60 one-second
//! slots; two one-minute sets of log₂ latency buckets), so the memory per
//! room is constant however busy it is — and allocated at the room's first
//! publish, so the many rooms that are only joined cost a pointer, not 1 KiB.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets: bucket `b` holds latencies below 2^b µs (b < 32).
const BUCKETS: usize = 32;

struct Windows {
    /// Publishes per second; `stamps[i]` is the second slot `i` counts.
    counts: [u32; 60],
    stamps: [u64; 60],
    /// The minute `current` covers; `previous` is the minute before.
    minute: u64,
    current: [u32; BUCKETS],
    previous: [u32; BUCKETS],
}

impl Default for Windows {
    fn default() -> Self {
        Windows { counts: [0; 60], stamps: [0; 60], minute: 0, current: [0; BUCKETS], previous: [0; BUCKETS] }
    }
}

/// One room's statistics.
#[derive(Default)]
pub struct RoomStats {
    windows: Mutex<Option<Box<Windows>>>,
    /// Requests about this room that got an error.
    pub errors: AtomicU64,
    /// Messages published since start.
    pub published: AtomicU64,
}

/// A snapshot for the admin view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomRates {
    /// Messages per second over the last 60 s.
    pub messages_per_sec: f64,
    /// p99 publish→ack latency over the last one to two minutes, in ms
    /// (upper bound of its log₂ bucket); `None` without publishes.
    pub p99_publish_ms: Option<f64>,
}

impl RoomStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Windows>>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a publish acked after `latency`, at Unix second `now_s`.
    pub fn record_publish(&self, latency: Duration, now_s: u64) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let mut w = self.lock();
        let w = w.get_or_insert_with(Box::default);
        let i = (now_s % 60) as usize;
        if w.stamps[i] != now_s {
            w.stamps[i] = now_s;
            w.counts[i] = 0;
        }
        w.counts[i] = w.counts[i].saturating_add(1);
        let minute = now_s / 60;
        if w.minute != minute {
            w.previous = if w.minute + 1 == minute { w.current } else { [0; BUCKETS] };
            w.current = [0; BUCKETS];
            w.minute = minute;
        }
        let micros = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        let b = ((u32::BITS - micros.leading_zeros()) as usize).min(BUCKETS - 1);
        w.current[b] = w.current[b].saturating_add(1);
    }

    /// The rates as of Unix second `now_s`.
    pub fn rates(&self, now_s: u64) -> RoomRates {
        let w = self.lock();
        let Some(w) = w.as_ref() else {
            return RoomRates { messages_per_sec: 0.0, p99_publish_ms: None };
        };
        let recent: u64 =
            (0..60).filter(|&i| now_s.saturating_sub(w.stamps[i]) < 60).map(|i| u64::from(w.counts[i])).sum();
        let mut buckets = [0u64; BUCKETS];
        let minute = now_s / 60;
        for (b, slot) in buckets.iter_mut().enumerate() {
            if w.minute == minute {
                *slot = u64::from(w.current[b]) + u64::from(w.previous[b]);
            } else if w.minute + 1 == minute {
                *slot = u64::from(w.current[b]);
            }
        }
        let total: u64 = buckets.iter().sum();
        let p99 = (total > 0).then(|| {
            let target = (total * 99).div_ceil(100);
            let mut seen = 0;
            let b = buckets.iter().position(|c| {
                seen += c;
                seen >= target
            });
            (1u64 << b.unwrap_or(BUCKETS - 1)) as f64 / 1000.0
        });
        RoomRates { messages_per_sec: recent as f64 / 60.0, p99_publish_ms: p99 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_without_publishes_holds_no_windows() {
        let s = RoomStats::default();
        assert!(s.lock().is_none());
        assert_eq!(s.rates(60), RoomRates { messages_per_sec: 0.0, p99_publish_ms: None });
        s.record_publish(Duration::from_micros(1), 60);
        assert!(s.lock().is_some());
    }

    #[test]
    fn rate_counts_the_last_minute_only() {
        let s = RoomStats::default();
        for i in 0..120 {
            s.record_publish(Duration::from_micros(500), 1000 + i / 2);
        }
        // 120 publishes over seconds 1000..=1059: all within the minute.
        assert_eq!(s.rates(1059).messages_per_sec, 2.0);
        // 30 seconds later, only seconds 1030..=1059 count.
        assert_eq!(s.rates(1089).messages_per_sec, 1.0);
        assert_eq!(s.rates(1200).messages_per_sec, 0.0);
    }

    #[test]
    fn p99_is_the_bucket_holding_the_99th_percentile() {
        let s = RoomStats::default();
        assert_eq!(s.rates(60).p99_publish_ms, None);
        for _ in 0..990 {
            s.record_publish(Duration::from_micros(300), 60);
        }
        for _ in 0..10 {
            s.record_publish(Duration::from_millis(40), 61);
        }
        // 300 µs is below 2^9 µs = 0.512 ms; 40 ms is below 2^16 µs.
        assert_eq!(s.rates(62).p99_publish_ms, Some(0.512));
        s.record_publish(Duration::from_millis(40), 62);
        assert_eq!(s.rates(62).p99_publish_ms, Some(65.536));
        // Two minutes later the window is empty again.
        assert_eq!(s.rates(240).p99_publish_ms, None);
    }
}
