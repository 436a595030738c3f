//! Rooms: seq assignment, subscribers, and delivery that never waits.
//!
//! A [`Room`] assigns each publish the next seq (under `log`, in the same
//! critical section that queues the append, so the commit queue holds a
//! room's appends in seq order). Once committed, the fan-out stage
//! (`pipeline::fanout`) offers the message — encoded once, a shared `Bytes` — to
//! every subscribed session with [`Room::fan_out`].
//!
//! Each subscriber has a delivery cursor (`delivered`): the highest seq it
//! has been given. A subscriber is *live* while its queue keeps up; when an
//! offer fails (its queue is full) it becomes *catching up*: the room skips
//! it, and its connection's writer reads the missed messages from the log
//! once the queue drains ([`Room::catch_up`]), switching back to live when it
//! reaches the head. Resume after reconnect is the same mechanism, started at
//! the client's cursor and ended by `Synced`. So a slow session loses
//! nothing, sees no duplicate, and never makes the room or the other members
//! wait (ARCHITECTURE.md, "Never wait for a slow recipient").
//!
//! Ordering invariant: `dispatched` is raised *before* the subscribers are
//! visited, and a catching-up subscriber turns live only under the `subs`
//! lock after seeing `delivered >= dispatched`. Either the fan-out then finds
//! it live and offers the next seq, or the catch-up sees the new head and
//! reads that seq from the log (it was committed before it was dispatched).

pub mod counts;
pub mod gov;
pub mod pending;
pub mod stats;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use crate::codec::encode_frame;
use crate::delivery::{Behind, CatchUp, Frame, Run, Subscriber, message_frame};
use crate::idmap::IdMap;
use crate::proto::{self, Body, Envelope};
use crate::store::{RoomId, Store, StoreError};

/// Whether `name` is a valid room name: `[A-Za-z0-9_.:-]{1,128}`.
pub fn valid_room_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Who may enter a room.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone may join.
    Open,
    /// A direct conversation: only these two users.
    Direct(String, String),
}

/// Classifies a valid room name; `Err` explains a malformed DM name.
pub fn access_of(name: &str) -> Result<Access, &'static str> {
    let Some(rest) = name.strip_prefix("dm:") else {
        return Ok(Access::Open);
    };
    let mut parts = rest.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if crate::auth::valid_user_id(a) && crate::auth::valid_user_id(b) => {
            if a < b {
                Ok(Access::Direct(a.to_string(), b.to_string()))
            } else {
                Err("a direct room is dm:<a>:<b> with two different user ids in sorted order")
            }
        }
        _ => Err("a direct room is dm:<a>:<b> with two user ids"),
    }
}

enum Mode {
    Live,
    CatchingUp {
        /// `Some(complete)`: this catch-up replays a resume cursor and ends
        /// with `Synced{complete}`.
        synced: Option<bool>,
        since: Instant,
    },
}

/// One subscriber's place in a room: how far it has been given the log, and
/// whether it is live or catching up.
struct Subscription {
    session: Arc<Subscriber>,
    delivered: u64,
    mode: Mode,
}

/// One room.
pub struct Room {
    /// Numeric id, the key prefix of its log.
    pub id: RoomId,
    /// Name, as clients know it.
    pub name: Arc<str>,
    /// Next seq to assign, and the commit epoch it belongs to.
    next_seq: Mutex<(u64, u64)>,
    /// Highest seq committed and handed to subscribers: the head that
    /// clients may read.
    dispatched: AtomicU64,
    /// By session id.
    subs: Mutex<IdMap<Subscription>>,
    /// Times a subscriber's queue was full and it fell back to the log.
    slow_consumer_events: AtomicU64,
    /// Users typing now, with when their indicator expires. A `Vec`: a
    /// handful at a time, and it keeps every room 24 bytes smaller.
    typing: Mutex<Vec<(Arc<str>, Instant)>>,
    /// Rates and latency for the admin view.
    pub stats: stats::RoomStats,
    /// Kind, details, members and roles, bans, invitations. Lock order:
    /// a user's state, then this, then `subs`. Changes are serialised by
    /// the hub's change locks (`hub::rooms`), held across their commit.
    gov: Mutex<gov::Governance>,
    /// Whether its name and details are in the store: a room created in
    /// memory is stored with the first change committed to it.
    stored: std::sync::atomic::AtomicBool,
    /// Unread counters, raised by the fan-out.
    counts: Mutex<counts::RoomCounts>,
    /// Changes to its messages on their way through the group commit.
    /// Lock order: this, then `next_seq`.
    pending: Mutex<pending::Pending>,
    /// The first seq its log holds ([`Room::start`]).
    start: AtomicU64,
}

/// The most subscribers a room may have for its fan-out to write to their
/// sockets itself ([`crate::delivery::queue`]); a larger room's
/// messages are queued for the connections' writers, as before. The
/// fan-out holds the room's lock, and the fan-out stage its worker, for
/// each such write (a few µs), which this bounds at ~0.1 ms; and in a busy
/// large room consecutive batches pile up in each writer's queue and go out
/// in one write — 1 room x 100 subscribers at 1,024 in flight (S1) lost
/// ~10% when all 100 were written from the fan-out (benches/README.md,
/// "Write-through to idle sockets"). The usual chat room is small and mostly idle, where the
/// write from the fan-out saves waking a task per delivery.
pub const WRITE_THROUGH_MAX_SUBSCRIBERS: usize = 32;

/// The most sockets the fan-out writes to itself ([`Room::fan_out`]'s
/// `budget`, ~1 ms of sends) before it acknowledges what it has delivered and
/// yields its worker, at the next room boundary (what is left of the room
/// it is in is queued for the writers): a batch touching thousands of small
/// rooms would otherwise keep the fan-out stage on its worker for a send
/// per delivery, and every publisher waiting for the last of them.
pub const WRITE_THROUGH_PER_SLICE: usize = 256;

/// What [`Room::fan_out`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FannedOut {
    /// Deliveries taken by subscribers' queues (or written straight to
    /// their sockets).
    pub delivered: u64,
    /// Frames written straight to TCP sockets, and their bytes: the
    /// writers count the rest when they write it.
    pub written_frames: u64,
    /// Bytes of those (and of frames written in part).
    pub written_bytes: u64,
    /// Subscribers written to.
    pub written_to: usize,
}

impl Room {
    /// A room whose log ends at `head`, with no members yet.
    pub fn new(id: RoomId, name: Arc<str>, head: u64, details: &crate::store::RoomDetails) -> Self {
        Room {
            id,
            name,
            next_seq: Mutex::new((head + 1, 0)),
            dispatched: AtomicU64::new(head),
            subs: Mutex::new(IdMap::default()),
            slow_consumer_events: AtomicU64::new(0),
            typing: Mutex::new(Vec::new()),
            stats: Default::default(),
            gov: Mutex::new(gov::Governance::new(details)),
            stored: std::sync::atomic::AtomicBool::new(false),
            counts: Mutex::new(counts::RoomCounts::new(head, 0)),
            pending: Mutex::new(pending::Pending::default()),
            start: AtomicU64::new(1),
        }
    }

    /// The first seq its log holds: 1, or where retention trimmed it to
    /// (the head + 1 when it removed every entry).
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// Retention moved the log's start (`store::retention`).
    pub fn set_trim(&self, trim: crate::store::TrimRecord) {
        self.start.fetch_max(trim.start(), Ordering::AcqRel);
        self.counts().set_base(trim);
    }

    /// Retention moved the log's start in the cluster's shared log, maybe
    /// past this node's head (it had not received what was trimmed): the
    /// head moves up to the entry before the start, and a live subscriber
    /// below it catches up from the start, its `Synced` saying it is not
    /// complete.
    pub fn follow_trim(self: &Arc<Self>, trim: crate::store::TrimRecord) {
        let start = trim.start();
        self.set_trim(trim);
        self.dispatched.fetch_max(start - 1, Ordering::AcqRel);
        let mut behind = Vec::new();
        for sub in self.subs().values_mut() {
            if matches!(sub.mode, Mode::Live) && sub.delivered + 1 < start {
                sub.mode = Mode::CatchingUp { synced: None, since: Instant::now() };
                behind.push(sub.session.clone());
            }
        }
        for s in behind {
            s.mark_lagging(self.clone());
        }
    }

    /// The room's unread counters.
    pub fn counts(&self) -> std::sync::MutexGuard<'_, counts::RoomCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The changes to its messages on their way.
    pub fn pending(&self) -> std::sync::MutexGuard<'_, pending::Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the room's name and details are stored.
    pub fn is_stored(&self) -> bool {
        self.stored.load(Ordering::Acquire)
    }

    /// Notes that the room's name and details are stored.
    pub fn mark_stored(&self) {
        self.stored.store(true, Ordering::Release);
    }

    /// The room's governance state.
    pub fn gov(&self) -> std::sync::MutexGuard<'_, gov::Governance> {
        self.gov.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every session subscribed now, live or catching up.
    pub fn subscribers(&self) -> Vec<Arc<Subscriber>> {
        self.subs().values().map(|s| s.session.clone()).collect()
    }

    fn typing(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<str>, Instant)>> {
        self.typing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `user` is (or stopped) typing, expiring at `until`.
    /// Returns whether anyone is typing here afterwards.
    pub fn set_typing(&self, user: &Arc<str>, until: Option<Instant>) -> bool {
        let mut t = self.typing();
        let at = t.iter().position(|(u, _)| u == user);
        match (until, at) {
            (Some(until), Some(i)) => t[i].1 = until,
            (Some(until), None) => t.push((user.clone(), until)),
            (None, Some(i)) => {
                t.swap_remove(i);
            }
            (None, None) => {}
        }
        if t.is_empty() {
            *t = Vec::new();
        }
        !t.is_empty()
    }

    /// Removes indicators that expired by `now`; returns their users and
    /// whether anyone is still typing.
    pub fn expire_typing(&self, now: Instant) -> (Vec<Arc<str>>, bool) {
        let mut t = self.typing();
        let expired: Vec<Arc<str>> = t.iter().filter(|(_, at)| *at <= now).map(|(u, _)| u.clone()).collect();
        t.retain(|(_, at)| *at > now);
        if t.is_empty() {
            *t = Vec::new();
        }
        (expired, !t.is_empty())
    }

    /// Whether `user`'s typing indicator is on.
    pub fn is_typing(&self, user: &str) -> bool {
        self.typing().iter().any(|(u, _)| &**u == user)
    }

    /// Times a subscriber of this room fell behind and switched to the log.
    pub fn slow_consumer_events(&self) -> u64 {
        self.slow_consumer_events.load(Ordering::Relaxed)
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, IdMap<Subscription>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The readable head: every seq up to it is durable and in the log.
    pub fn head(&self) -> u64 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Assigns the next seq and runs `submit` with it while holding the seq
    /// lock, so submissions reach the commit queue in seq order.
    ///
    /// `epoch` is the commit epoch (see `store::commit`): after the store
    /// failed and recovered, seqs handed out before are void, and the room
    /// continues from its durable head, which is then its readable head.
    pub fn assign_seq<R>(&self, epoch: u64, submit: impl FnOnce(u64) -> R) -> R {
        let mut state = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        if state.1 != epoch {
            *state = (self.head() + 1, epoch);
        }
        let seq = state.0;
        state.0 += 1;
        submit(seq)
    }

    /// Subscribes `session` live from the current head, first queueing the
    /// frame `reply(head)` (a `Joined`) so it precedes every live message.
    /// Returns the head.
    pub fn subscribe_live(&self, session: &Arc<Subscriber>, reply: Option<&dyn Fn(u64) -> Bytes>) -> u64 {
        let mut subs = self.subs();
        let head = self.head();
        if let Some(reply) = reply {
            let _ = session.outbound.push(reply(head));
        }
        subs.get_or_insert(session.id, Subscription { session: session.clone(), delivered: head, mode: Mode::Live });
        head
    }

    /// Subscribes `session` from `after` (it has every message up to it):
    /// the missed part is read from the log by its writer. With
    /// `synced = Some(complete)` the replay ends with `Synced` (a resume).
    pub fn subscribe_from(self: &Arc<Self>, session: &Arc<Subscriber>, after: u64, synced: Option<bool>) {
        let mut subs = self.subs();
        let after = after.min(self.head());
        let catching_up = synced.is_some() || after < self.head();
        let mode = if catching_up { Mode::CatchingUp { synced, since: Instant::now() } } else { Mode::Live };
        subs.insert(session.id, Subscription { session: session.clone(), delivered: after, mode });
        drop(subs);
        if catching_up {
            session.mark_lagging(self.clone());
        }
    }

    /// Removes `session`; it receives nothing more from this room.
    pub fn unsubscribe(&self, session_id: u64) {
        self.subs().remove(&session_id);
    }

    /// Users with at least one session subscribed, sorted.
    pub fn online_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.subs().values().map(|s| s.session.user().to_string()).collect();
        users.sort();
        users.dedup();
        users
    }

    /// Runs `f` under the subscriber lock if no session is subscribed
    /// (`None` otherwise): a subscription made meanwhile waits for it.
    pub fn if_unsubscribed<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let subs = self.subs();
        subs.is_empty().then(f)
    }

    /// Sessions subscribed now.
    pub fn subscriber_count(&self) -> usize {
        self.subs().len()
    }

    /// Offers committed messages — the frames of `run`, whose seqs are
    /// `seqs` (increasing; from one committed batch) — to every live
    /// subscriber, each under one lock of its queue; a subscriber whose queue
    /// fills starts catching up from the first message that did not fit.
    /// Never waits. Writes to at most `budget` subscribers' sockets itself
    /// ([`WRITE_THROUGH_MAX_SUBSCRIBERS`]), and takes those from it.
    pub fn fan_out(self: &Arc<Self>, seqs: &[u64], run: &Arc<Run>, budget: &mut usize) -> FannedOut {
        debug_assert_eq!(seqs.len(), run.len());
        let mut out = FannedOut::default();
        let Some(&last) = seqs.last() else { return out };
        self.dispatched.store(last, Ordering::Release);
        let mut lagging = Vec::new();
        {
            let mut subs = self.subs();
            let small = subs.len() <= WRITE_THROUGH_MAX_SUBSCRIBERS;
            for sub in subs.values_mut() {
                if let Mode::Live = sub.mode {
                    let from = seqs.partition_point(|seq| *seq <= sub.delivered);
                    if from == seqs.len() {
                        continue;
                    }
                    let offered = sub.session.outbound.offer_run(run, from, small && *budget > 0);
                    let n = offered.taken;
                    if n > 0 {
                        sub.delivered = seqs[from + n - 1];
                        out.delivered += n as u64;
                    }
                    if offered.written_bytes > 0 {
                        out.written_to += 1;
                        *budget -= 1;
                        sub.session.stats.sent(offered.written, offered.written_bytes);
                        out.written_frames += offered.written as u64;
                        out.written_bytes += offered.written_bytes as u64;
                    }
                    if from + n < seqs.len() {
                        sub.mode = Mode::CatchingUp { synced: None, since: Instant::now() };
                        self.slow_consumer_events.fetch_add(1, Ordering::Relaxed);
                        lagging.push(sub.session.clone());
                    }
                }
            }
        }
        for s in lagging {
            s.mark_lagging(self.clone());
        }
        out
    }

    /// Offers an ephemeral push (typing, read receipt) to every live
    /// subscriber but `except`; a full queue just misses it.
    pub fn broadcast_ephemeral(&self, frame: &Frame, except: Option<u64>) {
        for sub in self.subs().values() {
            if Some(sub.session.id) != except && matches!(sub.mode, Mode::Live) {
                let _ = sub.session.outbound.offer(frame.clone());
            }
        }
    }

    /// Moves `session` towards the head by up to `max` messages read from the
    /// log. Runs on the session's writer. Counts what it queued in `queued`.
    fn catch_up_subscriber(
        &self,
        session: &Subscriber,
        store: &dyn Store,
        max: u64,
        queued: &mut u64,
    ) -> Result<CatchUp, StoreError> {
        let start = self.start();
        let from = {
            let mut subs = self.subs();
            match subs.get_mut(&session.id) {
                Some(Subscription { delivered, mode: Mode::CatchingUp { synced, .. }, .. }) => {
                    if *delivered + 1 < start {
                        // Retention removed what it was still to get: it
                        // goes on from the log's start, and the Synced
                        // that ends its catch-up says so.
                        *delivered = start - 1;
                        *synced = Some(false);
                    }
                    *delivered
                }
                _ => return Ok(CatchUp::Done),
            }
        };
        let head = self.head();
        let frames: Vec<Bytes> = if from < head {
            let to = head.min(from + max);
            let msgs = store.read_range(self.id, from + 1, to, session.user())?;
            if msgs.len() as u64 != to - from && self.start() > from + 1 {
                // A trim moved the start past it while it read.
                return Ok(CatchUp::More);
            }
            if msgs.len() as u64 != to - from {
                return Err(StoreError::Corrupt(format!(
                    "room {} log has {} messages in {}..={}, expected {}",
                    self.name,
                    msgs.len(),
                    from + 1,
                    to,
                    to - from
                )));
            }
            msgs.iter().map(|m| message_frame(m)).collect()
        } else {
            Vec::new()
        };

        let mut subs = self.subs();
        let Some(sub) = subs.get_mut(&session.id) else {
            return Ok(CatchUp::Done);
        };
        let Mode::CatchingUp { synced, .. } = sub.mode else {
            return Ok(CatchUp::Done);
        };
        if sub.delivered != from {
            return Ok(CatchUp::More);
        }
        for f in frames {
            if session.outbound.offer(f).is_err() {
                return Ok(CatchUp::More);
            }
            sub.delivered += 1;
            *queued += 1;
        }
        if sub.delivered < self.head() {
            return Ok(CatchUp::More);
        }
        if let Some(complete) = synced {
            let synced = proto::Synced {
                room: self.name.to_string(),
                head_seq: sub.delivered,
                complete,
                first_seq: self.start(),
            };
            let _ = session.outbound.push(encode_frame(&Envelope::push(Body::Synced(synced))));
        }
        sub.mode = Mode::Live;
        Ok(CatchUp::Done)
    }

    /// When `session` started catching up here, if it is.
    fn subscriber_lagging_since(&self, session_id: u64) -> Option<Instant> {
        match self.subs().get(&session_id) {
            Some(Subscription { mode: Mode::CatchingUp { since, .. }, .. }) => Some(*since),
            _ => None,
        }
    }

    /// Decodes a history page of `[from, to]` (both within the head), as
    /// `viewer` sees it.
    pub fn read_messages(
        &self,
        store: &dyn Store,
        from: u64,
        to: u64,
        viewer: &str,
    ) -> Result<Vec<proto::Message>, StoreError> {
        store.read_messages(self.id, from, to, viewer)
    }
}

impl Behind for Room {
    fn key(&self) -> u64 {
        self.id
    }

    fn catch_up(
        &self,
        sub: &Subscriber,
        store: &dyn Store,
        step: u64,
        queued: &mut u64,
    ) -> Result<CatchUp, StoreError> {
        self.catch_up_subscriber(sub, store, step, queued)
    }

    fn lagging_since(&self, sub: u64) -> Option<Instant> {
        self.subscriber_lagging_since(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_small_rooms_fan_out_writes_to_sockets_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let room = Arc::new(Room::new(1, "r".into(), 0, &Default::default()));
        let limits = crate::delivery::OutboundLimits::default();
        let mut peers = Vec::new();
        let mut sessions = Vec::new();
        let frame = message_frame(b"m");
        let run = Run::new(frame.clone(), &[frame.len()]);
        for id in 0..=WRITE_THROUGH_MAX_SUBSCRIBERS as u64 {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let session = Arc::new(Subscriber::new(id, limits, 1, "tcp", "test".into()));
            session.outbound.set_socket(Some(Arc::new(server.into_split().1)));
            peers.push(client);
            sessions.push(session);
        }
        let (last, small) = sessions.split_last().unwrap();
        for s in small {
            room.subscribe_live(s, None);
        }
        let n = small.len() as u64;
        let mut budget = small.len() + 1;
        let out = room.fan_out(&[1], &run, &mut budget);
        let expected = FannedOut {
            delivered: n,
            written_frames: n,
            written_bytes: n * frame.len() as u64,
            written_to: small.len(),
        };
        assert_eq!((out, budget), (expected, 1), "each socket written takes one from the budget");
        assert!(small.iter().all(|s| s.outbound.depth() == (0, 0)), "nothing queued");
        let counted: u64 = small.iter().map(|s| s.stats.frames_out.load(Ordering::Relaxed)).sum();
        assert_eq!(counted, n, "counted per connection");

        let out = room.fan_out(&[2], &run, &mut budget);
        assert_eq!((out.written_to, budget), (1, 0), "the budget spent, the rest are queued");
        let queued = small.iter().filter(|s| s.outbound.depth() == (1, frame.len())).count();
        assert_eq!(queued, small.len() - 1);

        room.subscribe_live(last, None);
        budget = usize::MAX;
        let out = room.fan_out(&[3], &run, &mut budget);
        assert_eq!(out, FannedOut { delivered: n + 1, ..FannedOut::default() }, "one subscriber too many");
        assert_eq!(last.outbound.depth(), (1, frame.len()), "queued for its writer");
    }

    #[test]
    fn room_names_and_direct_rooms() {
        assert!(valid_room_name("general"));
        assert!(valid_room_name("a.b:c-d_e"));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name("has space"));
        assert!(!valid_room_name(&"x".repeat(129)));
        assert_eq!(access_of("general"), Ok(Access::Open));
        assert_eq!(access_of("dm:ann:bob"), Ok(Access::Direct("ann".into(), "bob".into())));
        assert!(access_of("dm:bob:ann").is_err());
        assert!(access_of("dm:ann:ann").is_err());
        assert!(access_of("dm:ann").is_err());
        assert!(access_of("dm:a:b:c").is_err());
    }
}
