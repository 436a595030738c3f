//! Idempotency keys in flight: publishes that are committed (or being
//! committed) but not yet acknowledged, with the retries of the same key
//! that arrived meanwhile. A key is stored durably with its message (the
//! store's idempotency journal); this map covers the moment before that, so
//! a retry racing its original is answered with the original's seq, never
//! stored twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Publisher;

/// A key: the sender and their `client_msg_id`.
pub type Key = (Arc<str>, String);

/// Retries of a key in flight, each answered with the original's ack once
/// it is durable.
pub type Waiters = Vec<Publisher>;

/// The keys in flight.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<Key, Waiters>>);

impl InFlight {
    /// The map, locked. The hub's check looks the key up in the store under
    /// this lock: a key leaves the map only after its message is stored, so
    /// it is always in one or the other.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<Key, Waiters>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the flight of a key; returns the retries waiting for it.
    pub fn settle(&self, sender: &Arc<str>, client_msg_id: &str) -> Waiters {
        let key = (sender.clone(), client_msg_id.to_string());
        self.lock().remove(&key).unwrap_or_default()
    }
}
