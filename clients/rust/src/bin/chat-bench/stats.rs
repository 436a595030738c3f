//! Measurement: what every receiving task records (latency from the send
//! timestamp in the payload, per-room order checks), the shared counters
//! behind the progress line, and the per-second timeline for the plot.
//!
//! Payload layout (little-endian): bytes 0..8 send time in ns since the
//! bench started, 8..16 publisher id, 16..24 the publisher's counter; the
//! rest is filler up to `--size`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Counters shared by every task.
pub struct Shared {
    /// When the bench started (payload timestamps count from here).
    pub start: Instant,
    /// Measuring starts here (after the warm-up)...
    pub measure_from: Instant,
    /// ...and ends here.
    pub measure_until: Instant,
    /// Messages received by subscribers, in the window.
    pub delivered: AtomicU64,
    /// Acks received by publishers, in the window.
    pub acks: AtomicU64,
    /// Error and GoAway frames received.
    pub errors: AtomicU64,
    /// Deliveries per second since `start`.
    pub delivered_timeline: Vec<AtomicU64>,
    /// Acks per second since `start`.
    pub ack_timeline: Vec<AtomicU64>,
    /// Recorders of finished tasks.
    pub finished: Mutex<Vec<Recorder>>,
}

impl Shared {
    /// Counters for a run of `warmup` + `duration`.
    pub fn new(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        let seconds = (warmup + duration).as_secs() as usize + 30;
        Shared {
            start,
            measure_from: start + warmup,
            measure_until: start + warmup + duration,
            delivered: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            delivered_timeline: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            ack_timeline: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            finished: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since `start`.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether `t` is inside the measured window.
    pub fn measuring(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.measure_until
    }

    fn second(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.start).as_secs() as usize
    }

    /// Writes a payload of `size` bytes stamped now.
    pub fn payload(&self, size: usize, publisher: u64, counter: u64) -> bytes::Bytes {
        let mut p = vec![b'.'; size];
        p[0..8].copy_from_slice(&self.now_ns().to_le_bytes());
        p[8..16].copy_from_slice(&publisher.to_le_bytes());
        p[16..24].copy_from_slice(&counter.to_le_bytes());
        bytes::Bytes::from(p)
    }
}

/// What one task saw.
pub struct Recorder {
    /// Delivery latency, µs.
    pub latency: Histogram<u64>,
    /// Publish → ack latency, µs.
    pub ack_latency: Histogram<u64>,
    /// Last seq seen per room.
    last: HashMap<String, u64>,
    /// Messages missing between two received seqs.
    pub gaps: u64,
    /// A seq received twice in a row.
    pub duplicates: u64,
    /// A seq lower than one already received.
    pub out_of_order: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ack_latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            last: HashMap::new(),
            gaps: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }
}

impl Recorder {
    /// Checks a message's place in its room and records its latency.
    pub fn on_message(&mut self, shared: &Shared, room: &str, seq: u64, data: &[u8]) {
        let now = Instant::now();
        self.check_order(room, seq);
        if data.len() >= 8 && shared.measuring(now) {
            let sent = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
            let micros = shared.now_ns().saturating_sub(sent) / 1000;
            let _ = self.latency.record(micros.max(1));
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(slot) = shared.delivered_timeline.get(shared.second(now)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Per-room order: the next seq, never a repeat, never a step back.
    pub fn check_order(&mut self, room: &str, seq: u64) {
        match self.last.get_mut(room) {
            None => {
                self.last.insert(room.to_string(), seq);
            }
            Some(last) => {
                if seq == *last + 1 {
                    *last = seq;
                } else if seq == *last {
                    self.duplicates += 1;
                } else if seq < *last {
                    self.out_of_order += 1;
                } else {
                    self.gaps += seq - *last - 1;
                    *last = seq;
                }
            }
        }
    }

    /// The last seq seen in a room.
    pub fn last(&self, room: &str) -> Option<u64> {
        self.last.get(room).copied()
    }

    /// Records an ack for a publish sent at `sent`.
    pub fn on_ack(&mut self, shared: &Shared, sent: Instant) {
        let now = Instant::now();
        if shared.measuring(now) {
            let _ = self.ack_latency.record((now.duration_since(sent).as_micros() as u64).max(1));
            shared.acks.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(slot) = shared.ack_timeline.get(shared.second(now)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands this task's figures over for the final report.
    pub fn finish(self, shared: &Shared) {
        shared.finished.lock().expect("not poisoned").push(self);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn order_checks() {
        let mut r = super::Recorder::default();
        for s in [5, 6, 7, 7, 6, 10, 11] {
            r.check_order("a", s);
        }
        assert_eq!((r.duplicates, r.out_of_order, r.gaps), (1, 1, 2));
    }
}
