//! The shared half of a connection: what rooms and the fan-out deliver to,
//! what the connection's task and the admin view read.
//!
//! One [`Subscriber`] per connection, in an `Arc` held by the connection's
//! task, by the rooms it is subscribed to and by its user's entry in the
//! hub. Rooms know it only through this type: they offer frames to its
//! [`Outbound`] queue and, when the queue is full, note themselves as
//! [`Behind`] here; the connection's writer then catches those rooms up from
//! the log ([`Subscriber::catch_up`]).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::Semaphore;

use super::queue::{Outbound, OutboundLimits};
use super::stats::ConnStats;
use crate::store::{Store, StoreError};

/// What a catch-up step achieved in one room.
#[derive(Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// The subscriber is live again (or gone).
    Done,
    /// Its queue filled up; call again once it drains.
    More,
}

/// A room in which a subscriber has fallen behind: it can feed the
/// subscriber from the log (implemented by `room::Room`).
pub trait Behind: Send + Sync {
    /// The room's id: a subscriber is behind at most once per room.
    fn key(&self) -> u64;

    /// Queues up to `step` of the messages `sub` missed; adds how many it
    /// queued to `queued`.
    fn catch_up(&self, sub: &Subscriber, store: &dyn Store, step: u64, queued: &mut u64)
    -> Result<CatchUp, StoreError>;

    /// Since when `sub` has been behind here, if it is.
    fn lagging_since(&self, sub: u64) -> Option<Instant>;
}

/// The part of a connection that rooms and the fan-out see.
pub struct Subscriber {
    /// Server-unique id.
    pub id: u64,
    /// Frames waiting for the writer.
    pub outbound: Outbound,
    /// Who, once authenticated: one cell for both, 8 bytes less than two.
    identity: OnceLock<Identity>,
    /// Rooms where this subscriber is catching up from the log.
    lagging: Mutex<LaggingRooms>,
    has_lagging: AtomicBool,
    /// Bounds publishes awaiting their ack.
    pub inflight: Arc<Semaphore>,
    /// Who, from where, and how much.
    pub stats: ConnStats,
    /// The connection task's waker, kept by `session::join`: the halves'
    /// wakers wake it, and so does shutdown (the request loop checks the
    /// signal instead of holding a 72-byte waiter on it in every idle
    /// connection's task).
    pub(crate) task: futures_util::task::AtomicWaker,
    /// Which halves of the connection's task are due (`session::join`'s
    /// flags).
    pub(crate) wakes: AtomicU8,
    /// Index into [`TRANSPORTS`]: one byte in the padding after
    /// `has_lagging`, where a `&'static str` took 16.
    transport: u8,
}

/// Rooms a subscriber is catching up in; the `Vec` boxed, as almost every
/// connection has none (a thin pointer: 16 bytes less in every one).
type LaggingRooms = Option<Box<Vec<Arc<dyn Behind>>>>;

/// The authenticated user and the device they named in `Hello`.
struct Identity {
    user: Arc<str>,
    device: Box<str>,
}

/// The transports a connection can use, named as in metrics and logs.
const TRANSPORTS: [&str; 3] = ["tcp", "tls", "ws"];

impl Subscriber {
    /// A subscriber for a new connection on `transport` ("tcp", "tls" or
    /// "ws"; anything else is taken for "tcp"), with a queue bounded by
    /// `limits` and at most `max_inflight` publishes awaiting their ack.
    pub fn new(id: u64, limits: OutboundLimits, max_inflight: usize, transport: &'static str, peer: String) -> Self {
        Subscriber {
            stats: ConnStats::new(peer),
            // Any other name is counted as TCP, as the metrics do.
            transport: TRANSPORTS.iter().position(|t| *t == transport).unwrap_or(0) as u8,
            id,
            outbound: Outbound::new(limits),
            identity: OnceLock::new(),
            lagging: Mutex::new(None),
            has_lagging: AtomicBool::new(false),
            task: futures_util::task::AtomicWaker::new(),
            wakes: AtomicU8::new(0),
            inflight: Arc::new(Semaphore::new(max_inflight)),
        }
    }

    /// "tcp", "tls" or "ws".
    pub fn transport(&self) -> &'static str {
        TRANSPORTS[usize::from(self.transport)]
    }

    /// The authenticated user ("" before `Welcome`).
    pub fn user(&self) -> &str {
        self.identity.get().map_or("", |i| &i.user)
    }

    /// `Hello.device`, once authenticated.
    pub fn device(&self) -> Option<&str> {
        self.identity.get().map(|i| &*i.device)
    }

    /// Records who authenticated, from what device; only the first call
    /// counts.
    pub fn set_identity(&self, user: Arc<str>, device: &str) {
        let _ = self.identity.set(Identity { user, device: device.into() });
    }

    /// Notes that `room` has messages for this subscriber in the log, and
    /// wakes the writer to fetch them.
    pub fn mark_lagging(&self, room: Arc<dyn Behind>) {
        let mut l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        let rooms = l.get_or_insert_default();
        if !rooms.iter().any(|r| r.key() == room.key()) {
            rooms.push(room);
        }
        self.has_lagging.store(true, Ordering::Release);
        drop(l);
        self.outbound.wake();
    }

    /// Whether any room is catching up.
    pub fn is_lagging(&self) -> bool {
        self.has_lagging.load(Ordering::Acquire)
    }

    /// One catch-up step of at most `step` messages for every lagging room,
    /// while the queue has room. Returns how many rooms are still behind;
    /// adds the messages it queued to `queued`, also when a room's step
    /// fails (what was queued before is written all the same). Called by
    /// the writer.
    pub fn catch_up(&self, store: &dyn Store, step: u64, queued: &mut u64) -> Result<usize, StoreError> {
        let rooms: Vec<Arc<dyn Behind>> =
            self.lagging.lock().unwrap_or_else(|e| e.into_inner()).as_deref().cloned().unwrap_or_default();
        let mut done = Vec::new();
        for room in &rooms {
            if !self.outbound.has_room_for_live() {
                break;
            }
            if room.catch_up(self, store, step, queued)? == CatchUp::Done {
                done.push(room.key());
            }
        }
        // A room may have fallen behind again since its step said Done (the
        // fan-out found the queue full); its `mark_lagging` then saw it still
        // listed. Drop only rooms that are live now; the fan-out's
        // `mark_lagging` waits for this lock, so none is lost in between.
        let mut l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        let behind = match l.as_mut() {
            Some(rooms) => {
                rooms.retain(|r| !done.contains(&r.key()) || r.lagging_since(self.id).is_some());
                rooms.len()
            }
            None => 0,
        };
        if behind == 0 {
            *l = None;
        }
        self.has_lagging.store(behind > 0, Ordering::Release);
        Ok(behind)
    }

    /// The oldest moment a lagging room of this subscriber fell behind.
    pub fn lagging_since(&self) -> Option<Instant> {
        let l = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().flat_map(|rooms| rooms.iter()).filter_map(|r| r.lagging_since(self.id)).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_stays_in_a_320_byte_allocation() {
        // Idle memory per connection: the subscriber lives in an `Arc` (two
        // counts, 16 bytes, before it). mimalloc's size classes around it
        // are 256, 320 and 384 bytes.
        let size = std::mem::size_of::<Subscriber>() + 16;
        assert!(size <= 320, "Arc<Subscriber> is {size} bytes: past mimalloc's 320-byte class");
    }
}
