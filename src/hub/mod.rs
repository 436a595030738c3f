//! The hub: state shared by every session — rooms by name and id, users with
//! their memberships, invitations, read markers and online sessions,
//! publishes whose idempotency key is still in flight, and the handles of
//! the store and the group commit. [`rooms`] is the room administration
//! (join, leave, create, invite, remove, ban, roles) every caller goes
//! through.
//!
//! Lock order, where two are held: a room's change lock (async, across a
//! commit) before a user's `membership` (async); a user's `state` before a
//! room's governance, before its subscribers. The fan-out takes only room
//! subscriber locks.

pub mod changes;
pub mod cluster;
mod history;
pub mod publish;
pub mod repair;
pub mod retention;
pub mod rooms;
mod signout;
mod unread;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::auth::Auth;
use crate::delivery::{Frame, Subscriber};
use crate::idmap::IdMap;
use crate::pipeline::{Completion, Pipeline};
use crate::proto::ErrorCode;
use crate::room::Room;
use crate::store::commit::CommitQueue;
use crate::store::{RoomId, Snapshot, Store, StoreError};

/// A request refused with an error code and a message for the client.
#[derive(Debug)]
pub struct Refusal {
    /// The `Error.code`.
    pub code: ErrorCode,
    /// The `Error.message`.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        static ERRORS: crate::logs::Throttle = crate::logs::Throttle::new(1000);
        if let Some(suppressed) = ERRORS.allow() {
            tracing::error!(error = %e, suppressed, "storage error while serving a request");
        }
        Refusal::new(ErrorCode::Internal, format!("storage error: {e}"))
    }
}

/// Limits and timings that sessions apply (ARCHITECTURE.md, "Limits").
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame accepted or sent.
    pub max_frame_bytes: usize,
    /// Time allowed for `Hello`.
    pub handshake_timeout: Duration,
    /// Silence after which a connection gets `GoAway{IDLE_TIMEOUT}`.
    pub idle_timeout: Duration,
    /// Advertised in `Welcome.heartbeat_ms`.
    pub heartbeat: Duration,
    /// Most messages replayed for one resume cursor.
    pub replay_limit: u64,
    /// Publishes per user per minute (0 = unlimited), refilled continuously.
    pub publish_rate_per_min: u32,
    /// Bucket size of the publish rate limit.
    pub publish_burst: u32,
    /// Publishes of one session awaiting their ack.
    pub max_inflight_publishes: usize,
    /// Outbound queue bounds.
    pub outbound: crate::delivery::OutboundLimits,
    /// How long a session may stay behind before `GoAway{SLOW_CONSUMER}`.
    pub slow_consumer_timeout: Duration,
    /// Sessions one user may have open.
    pub max_sessions_per_user: usize,
    /// Rooms one user may be a member of.
    pub max_rooms_per_user: usize,
    /// Open connections (all transports) before new ones get
    /// `GoAway{CAPACITY}`.
    pub max_connections: usize,
    /// `Join` of an unknown room creates it (public, the joiner owner).
    pub auto_create_rooms: bool,
    /// Pending invitations one user may have.
    pub max_pending_invites_per_user: usize,
    /// Different reaction keys one message may have.
    pub max_reaction_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: crate::proto::DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(30),
            replay_limit: 10_000,
            publish_rate_per_min: 240,
            publish_burst: 240,
            max_inflight_publishes: 4096,
            outbound: Default::default(),
            slow_consumer_timeout: Duration::from_secs(30),
            max_sessions_per_user: 64,
            max_rooms_per_user: 10_000,
            max_connections: 50_000,
            auto_create_rooms: true,
            max_pending_invites_per_user: 1000,
            max_reaction_keys: 64,
        }
    }
}

/// A per-user token bucket for publishes.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What is known about one user.
#[derive(Default)]
pub struct UserState {
    /// Rooms the user is a member of.
    pub rooms: IdMap<Arc<Room>>,
    /// Rooms the user has a pending invitation to (the invitation itself is
    /// in the room's governance).
    pub invited: IdMap<Arc<Room>>,
    /// Read markers by room, with the counts through them.
    pub read: IdMap<crate::store::ReadPos>,
    /// Sessions online.
    pub sessions: Vec<Arc<Subscriber>>,
    bucket: Option<Bucket>,
}

/// One user's entry. `membership` serialises the user's own joins (which
/// wait for the store) so two sessions of one user cannot both pass the
/// rooms-per-user limit.
#[derive(Default)]
pub struct UserEntry {
    /// The user's state.
    pub state: Mutex<UserState>,
    /// Held across a membership change, including its commit.
    pub membership: tokio::sync::Mutex<()>,
}

impl UserEntry {
    /// Locks the state.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, UserState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the read marker of room `room` to `pos` if that is further
    /// (a marker moved on another cluster node; markers never go back).
    pub fn raise_read_marker(&self, room: RoomId, pos: crate::store::ReadPos) {
        let mut st = self.lock();
        let marker = st.read.get_or_insert(room, Default::default());
        if pos.seq > marker.seq {
            *marker = pos;
        }
    }
}

/// Shared server state.
pub struct Hub {
    /// Limits in force.
    pub limits: Limits,
    /// The store (reads go straight to it; writes through the pipeline's
    /// group commit).
    pub store: Arc<dyn Store>,
    /// The group commit, the fan-out's handles and the idempotency keys in
    /// flight.
    pub pipeline: Arc<Pipeline>,
    /// Token verifier.
    pub auth: Auth,
    /// `Welcome.server`.
    pub server_name: String,
    rooms: RwLock<HashMap<Arc<str>, Arc<Room>>>,
    rooms_by_id: RwLock<HashMap<RoomId, Arc<Room>>>,
    next_room_id: AtomicU64,
    users: Mutex<HashMap<Arc<str>, Arc<UserEntry>>>,
    next_session_id: AtomicU64,
    /// Rooms with a typing indicator on, for the expiry sweep.
    typing_rooms: Mutex<HashMap<RoomId, Arc<Room>>>,
    /// Every open connection, for the admin view.
    connections: Mutex<HashMap<u64, std::sync::Weak<Subscriber>>>,
    /// Metric handles.
    pub metrics: crate::metrics::Metrics,
    /// Serialise room changes ([`rooms`]).
    change_locks: Box<[tokio::sync::Mutex<()>]>,
    /// Users signed out everywhere, and when (Unix seconds).
    revoked: Mutex<HashMap<Arc<str>, u64>>,
    /// The shared log and state, in cluster mode ([`cluster`]).
    cluster: Option<Arc<cluster::Cluster>>,
}

/// The `Presence` push of `user` in `room` with `devices` online (0:
/// offline).
pub fn presence_frame(room: &str, user: &str, devices: u32) -> bytes::Bytes {
    let p = crate::proto::Presence { room: room.to_string(), user: user.to_string(), online: devices > 0, devices };
    crate::codec::encode_frame(&crate::proto::Envelope::push(crate::proto::Body::Presence(p)))
}

/// How long a typing indicator lasts without a refresh.
pub const TYPING_TTL: Duration = Duration::from_secs(6);

impl Hub {
    /// Builds the hub from the state recovered from `store`.
    pub fn new(
        limits: Limits,
        store: Arc<dyn Store>,
        commits: CommitQueue<Completion>,
        auth: Auth,
        mut snapshot: Snapshot,
    ) -> Self {
        let repaired = repair::repair(&mut snapshot);
        if !repaired.is_empty() {
            let n = repaired.len();
            let batch = crate::store::Batch { rooms: repaired, ..Default::default() };
            match store.write(&batch).and_then(|()| store.sync()) {
                Ok(()) => tracing::warn!(records = n, "repaired room records a crash left mid-change"),
                // In force in memory either way; the next start repairs again.
                Err(e) => tracing::error!(error = %e, records = n, "could not store the repair of room records"),
            }
        }
        let mut rooms = HashMap::new();
        let mut by_id = HashMap::new();
        let mut max_id = 0;
        for r in snapshot.rooms {
            let name: Arc<str> = r.name.into();
            let room = Arc::new(Room::new(r.id, name.clone(), r.head, &r.details));
            room.mark_stored();
            max_id = max_id.max(r.id);
            rooms.insert(name, room.clone());
            by_id.insert(r.id, room);
        }
        let mut users: HashMap<Arc<str>, Arc<UserEntry>> = HashMap::new();
        for (user, room, record) in snapshot.memberships {
            if let Some(room) = by_id.get(&room) {
                let user: Arc<str> = user.into();
                let role = crate::proto::Role::try_from(record.role).unwrap_or(crate::proto::Role::Member);
                room.gov().apply_member(&user, role, record.since);
                users.entry(user).or_default().lock().rooms.insert(room.id, room.clone());
            }
        }
        for (room, user, ban) in snapshot.bans {
            if let Some(room) = by_id.get(&room) {
                room.gov().bans_mut().insert(user.into(), ban);
            }
        }
        for (user, room, invite) in snapshot.invites {
            if let Some(room) = by_id.get(&room) {
                let user: Arc<str> = user.into();
                room.gov().invites_mut().insert(user.clone(), invite);
                users.entry(user).or_default().lock().invited.insert(room.id, room.clone());
            }
        }
        let revoked = snapshot.revocations.into_iter().map(|(u, at)| (Arc::from(u), at)).collect();
        for (user, room, pos) in snapshot.read_markers {
            if let Some(e) = users.get(user.as_str()) {
                e.lock().read.insert(room, pos);
            }
        }
        for (room, user, counts) in snapshot.counts {
            if let Some(room) = by_id.get(&room) {
                let mut c = room.counts();
                if user.is_empty() {
                    c.set_changes(counts.sent);
                } else {
                    c.set_user(&user, counts);
                }
            }
        }
        for (room, seq, record) in snapshot.deleted {
            if let Some(room) = by_id.get(&room) {
                room.counts().add_deleted(seq, record);
            }
        }
        for (room, trim) in snapshot.trims {
            if let Some(room) = by_id.get(&room) {
                room.set_trim(trim);
            }
        }
        let metrics = crate::metrics::Metrics::new();
        Hub {
            limits,
            store,
            pipeline: Arc::new(Pipeline::new(commits, metrics.clone())),
            auth,
            server_name: format!("chatd/{}", env!("CARGO_PKG_VERSION")),
            rooms: RwLock::new(rooms),
            rooms_by_id: RwLock::new(by_id),
            next_room_id: AtomicU64::new(max_id + 1),
            users: Mutex::new(users),
            next_session_id: AtomicU64::new(1),
            typing_rooms: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            metrics,
            change_locks: (0..rooms::CHANGE_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            revoked: Mutex::new(revoked),
            cluster: None,
        }
    }

    /// The hub of a cluster node: rooms follow `cluster`'s shared log.
    pub fn clustered(mut self, cluster: Arc<cluster::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The room called `name`, if it exists.
    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// The room called `name`, or a new one with `details` (in memory
    /// until a room administration commits it; [`Room::is_stored`]). The
    /// flag says whether it is new.
    pub fn room_or_insert(&self, name: &str, details: &crate::store::RoomDetails) -> (Arc<Room>, bool) {
        if let Some(r) = self.room(name) {
            return (r, false);
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rooms.get(name) {
            return (r.clone(), false);
        }
        let id = self.next_room_id.fetch_add(1, Ordering::Relaxed);
        let name: Arc<str> = name.into();
        let room = Arc::new(Room::new(id, name.clone(), 0, details));
        rooms.insert(name, room.clone());
        self.rooms_by_id.write().unwrap_or_else(|e| e.into_inner()).insert(id, room.clone());
        (room, true)
    }

    /// Forgets `room` if it was never stored and has no members: its
    /// creation failed to commit.
    pub fn forget_unstored(&self, room: &Arc<Room>) {
        if room.is_stored() || !room.gov().members.is_empty() {
            return;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        if rooms.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
            rooms.remove(&room.name);
            self.rooms_by_id.write().unwrap_or_else(|e| e.into_inner()).remove(&room.id);
        }
    }

    /// Whether `room` is still the room of its name (not forgotten).
    pub fn is_current(&self, room: &Arc<Room>) -> bool {
        self.room(&room.name).is_some_and(|r| Arc::ptr_eq(&r, room))
    }

    /// The room with id `id`.
    pub fn room_by_id(&self, id: RoomId) -> Option<Arc<Room>> {
        self.rooms_by_id.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    /// Number of rooms known.
    pub fn room_count(&self) -> usize {
        self.rooms.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The entry of `user`, created if new.
    pub fn user(&self, user: &str) -> Arc<UserEntry> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = users.get(user) {
            return e.clone();
        }
        let e = Arc::new(UserEntry::default());
        users.insert(user.into(), e.clone());
        e
    }

    /// Takes one token from `user`'s bucket (publishes and room changes);
    /// false when empty.
    pub fn take_publish_token(&self, entry: &UserEntry) -> bool {
        let rate = self.limits.publish_rate_per_min;
        if rate == 0 {
            return true;
        }
        let burst = f64::from(self.limits.publish_burst.max(1));
        let mut st = entry.lock();
        let now = Instant::now();
        let b = st.bucket.get_or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(rate) / 60.0).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Turns `user`'s typing indicator in `room` on (until the TTL passes) or
    /// off, and tells the room's other sessions (on every node).
    pub fn typing(&self, room: &Arc<Room>, user: &Arc<str>, active: bool, except_session: Option<u64>) {
        let frame = self.typing_here(room, user, active, except_session);
        if let Some(c) = &self.cluster {
            c.share_ephemeral(room, frame);
        }
    }

    /// [`Hub::typing`] on this node only (another node's `Typing` is
    /// applied so: it expires here like a local one). Returns the push.
    pub fn typing_here(
        &self,
        room: &Arc<Room>,
        user: &Arc<str>,
        active: bool,
        except_session: Option<u64>,
    ) -> bytes::Bytes {
        let until = active.then(|| Instant::now() + TYPING_TTL);
        let anyone = room.set_typing(user, until);
        {
            let mut rooms = self.typing_rooms.lock().unwrap_or_else(|e| e.into_inner());
            if anyone {
                rooms.insert(room.id, room.clone());
            } else {
                rooms.remove(&room.id);
            }
        }
        let push = crate::proto::Typing { room: room.name.to_string(), user: user.to_string(), active };
        let frame = crate::codec::encode_frame(&crate::proto::Envelope::push(crate::proto::Body::Typing(push)));
        room.broadcast_ephemeral(&Frame::shared(frame.clone()), except_session);
        frame
    }

    /// Ends typing indicators not refreshed within the TTL (`Typing{active:
    /// false}` to the room). Run about once a second.
    pub fn expire_typing(&self) {
        let rooms: Vec<Arc<Room>> =
            self.typing_rooms.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let now = Instant::now();
        for room in rooms {
            let (expired, anyone) = room.expire_typing(now);
            if !anyone {
                self.typing_rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(&room.id);
            }
            for user in expired {
                let push = crate::proto::Typing { room: room.name.to_string(), user: user.to_string(), active: false };
                let frame = crate::codec::encode_frame(&crate::proto::Envelope::push(crate::proto::Body::Typing(push)));
                room.broadcast_ephemeral(&Frame::shared(frame), None);
            }
        }
    }

    /// Tells `room` that `user` came online (with `devices` sessions) or went
    /// offline, except to the session `except` (on every node).
    pub fn presence(&self, room: &Arc<Room>, user: &str, devices: usize, except: Option<u64>) {
        let frame = presence_frame(&room.name, user, devices as u32);
        room.broadcast_ephemeral(&Frame::shared(frame.clone()), except);
        if let Some(c) = &self.cluster {
            c.share_ephemeral(room, frame);
        }
    }

    /// A session of `user` started (`devices` is then their sessions on
    /// this node) or their last one here ended (`devices` 0): `rooms` are
    /// told, except the session `except`. In cluster mode the count is the
    /// user's over every node, and only the first session anywhere and
    /// the last one are news, as on one node ([`cluster::share_presence`]).
    pub fn session_presence(
        self: &Arc<Self>,
        rooms: Vec<Arc<Room>>,
        user: &Arc<str>,
        devices: usize,
        except: Option<u64>,
    ) {
        match &self.cluster {
            Some(c) => c.presence_changed(user, except),
            None => {
                for room in &rooms {
                    self.presence(room, user, devices, except);
                }
            }
        }
    }

    /// The users with sessions on this node, with how many.
    pub fn online_devices(&self) -> Vec<(String, u32)> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .iter()
            .filter_map(|(u, e)| {
                let n = e.lock().sessions.len();
                (n > 0).then(|| (u.to_string(), n as u32))
            })
            .collect()
    }

    /// Registers an open connection.
    pub fn register_connection(&self, handle: &Arc<Subscriber>) {
        self.metrics.transport(handle.transport()).connections.increment(1.0);
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).insert(handle.id, Arc::downgrade(handle));
    }

    /// Open connections now.
    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forgets a closed connection (idempotent).
    pub fn deregister_connection(&self, id: u64) {
        let removed = self.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if let Some(h) = removed.and_then(|w| w.upgrade()) {
            self.metrics.transport(h.transport()).connections.decrement(1.0);
        }
    }

    /// Every open connection.
    pub fn connections(&self) -> Vec<Arc<Subscriber>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).values().filter_map(|w| w.upgrade()).collect()
    }

    /// Every room.
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.rooms.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Users with at least one session, and the number of sessions.
    pub fn online_counts(&self) -> (usize, usize) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut online = 0;
        let mut sessions = 0;
        for e in users.values() {
            let n = e.lock().sessions.len();
            online += usize::from(n > 0);
            sessions += n;
        }
        (online, sessions)
    }

    /// Every online session (for shutdown).
    pub fn all_sessions(&self) -> Vec<Arc<Subscriber>> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in users.values() {
            for s in &e.lock().sessions {
                if seen.insert(s.id) {
                    out.push(s.clone());
                }
            }
        }
        out
    }
}

/// A hub over the in-memory store, with default limits and no fan-out
/// stage running (tests drive what they need by hand; committed batches are
/// dropped). Call it inside a runtime: it starts the group-commit writer.
#[cfg(test)]
pub(crate) fn test_hub() -> Hub {
    let (out, _) = tokio::sync::mpsc::channel(1);
    let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::new());
    let (commits, _) = crate::store::commit::start(store.clone(), crate::store::commit::Durability::None, 8, out);
    Hub::new(Limits::default(), store, commits, Auth::new(&[7; 32]), Default::default())
}
