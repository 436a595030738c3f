//! Log hygiene: [`Throttle`] keeps a warning that bad input can trigger per
//! frame or per connection (failed logins, refused admin requests, storage
//! errors while serving) to one line per interval, with the number of
//! occurrences it stood for.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets one event through per interval and counts the rest.
pub struct Throttle {
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle letting one event through per `interval_ms`.
    pub const fn new(interval_ms: u64) -> Self {
        Throttle { interval_ms, next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` if this event should be logged, `n` being how many were
    /// suppressed since the last one logged; `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::time::now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.interval_ms, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_event_per_interval_with_the_rest_counted() {
        let t = super::Throttle::new(60_000);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        // Pretend the interval passed.
        t.next_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.allow(), Some(2));
    }
}
