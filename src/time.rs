//! Wall-clock time in the units the protocol and the store use. At the
//! bottom of the layers (ARCHITECTURE.md, "Layers"): everything may call it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (message timestamps, statistics).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Now, in Unix seconds (token claims).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
