//! Per-connection facts and counters, for `/admin/connections`: who, from
//! where, over what, since when, how much, and how far behind. Updated with
//! relaxed atomics by the connection's own reader and writer.

use std::sync::atomic::{AtomicU64, Ordering};

/// One connection's statistics.
///
/// Every open connection has one, so its strings are boxed slices
/// (benches/README.md, "Idle memory per connection"). The transport, the user
/// and the device are kept by the [`super::Subscriber`].
pub struct ConnStats {
    /// Remote address.
    pub peer: Box<str>,
    /// Unix ms when the connection was accepted.
    pub connected_at_ms: u64,
    /// Unix ms of the last frame received.
    pub last_activity_ms: AtomicU64,
    /// Frames (or WebSocket messages) received.
    pub frames_in: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
}

impl ConnStats {
    /// Statistics of a connection accepted now.
    pub fn new(peer: String) -> Self {
        let now = crate::time::now_ms();
        ConnStats {
            peer: peer.into_boxed_str(),
            connected_at_ms: now,
            last_activity_ms: AtomicU64::new(now),
            frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// Counts a received frame of `bytes`.
    pub fn received(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ms.store(crate::time::now_ms(), Ordering::Relaxed);
    }

    /// Counts a written batch.
    pub fn sent(&self, frames: usize, bytes: usize) {
        self.frames_out.fetch_add(frames as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
