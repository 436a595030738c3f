//! Bounded waits: nothing in these tests waits a fixed time to decide a
//! result; it polls for the outcome until a deadline, and fails there.

use std::time::Duration;

use super::WAIT;

/// How long a bounded wait lasts and how often it looks again.
#[derive(Clone, Copy, Debug)]
pub struct Polling {
    pub within: Duration,
    pub every: Duration,
}

impl Polling {
    /// Within `WAIT`, every 10 ms.
    pub const DEFAULT: Polling = Polling { within: WAIT, every: Duration::from_millis(10) };

    /// Within `within`, every `every_ms` milliseconds (0: at once again,
    /// for a check that paces itself).
    pub const fn new(within: Duration, every_ms: u64) -> Polling {
        Polling { within, every: Duration::from_millis(every_ms) }
    }

    /// Polls `holds` until it returns true; panics, naming `what`, at the
    /// deadline.
    pub async fn until(self, what: &str, mut holds: impl AsyncFnMut() -> bool) {
        wait_for(what, self, async || if holds().await { Ok(()) } else { Err(String::new()) }).await
    }
}

/// Polls `holds` every 10 ms until it returns true; panics, naming `what`
/// (say "the gauge to return to 0"), if it has not within `WAIT`.
pub async fn wait_until(what: &str, holds: impl AsyncFnMut() -> bool) {
    Polling::DEFAULT.until(what, holds).await
}

/// Polls `check` as `polling` says until it returns `Ok`, and returns that
/// value; at the deadline, panics naming `what` and the last `Err` (what
/// was seen instead).
pub async fn wait_for<T>(what: &str, polling: Polling, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + polling.within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => {
                let seen = if seen.is_empty() { seen } else { format!("; {seen}") };
                assert!(tokio::time::Instant::now() < deadline, "waited {:?} for {what}{seen}", polling.within)
            }
        }
        if !polling.every.is_zero() {
            tokio::time::sleep(polling.every).await;
        }
    }
}
