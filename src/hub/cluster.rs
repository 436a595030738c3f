//! Cluster mode in the hub: the node's rooms follow the shared log in Redis
//! (ARCHITECTURE.md, "Cluster mode").
//!
//! A publish is appended by Redis's script ([`RedisLog::append`]), which
//! gives it its seq; it is never given one here. Every entry of a room this
//! node serves — its own and the other nodes' — comes back through the
//! node's [`Feed`], in seq order with every gap filled from the stream, and
//! the applier ([`apply`]) hands it to the local group commit with that
//! seq. From there it takes the single node's path: the local store (the
//! node's replica of the rooms it serves, which history, catch-up, resume
//! and the folds of changes read), the fan-out, and for the node's own
//! publishes the ack, sent once the entry is durable in Redis and offered
//! to the room here.
//!
//! A room is *attached* — subscribed on the feed — once a session of this
//! node needs it; its replica is filled from the stream from where it
//! stands. A client that acted on another node and comes here must see
//! what it saw there: before a `Hello` is answered, its rooms are brought
//! up to their heads in Redis ([`Hub::cluster_sync`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};

use super::publish::Author;
use super::{Hub, Refusal};
use crate::pipeline::{Completion, PublishDone, Publisher};
use crate::proto::{self, ErrorCode};
use crate::room::Room;
use crate::store::commit::{Pending, Write};
use crate::store::redis::feed::{Delivery, Feed};
use crate::store::redis::{AppendError, Appended, ChangeCheck, NewEntry, RedisLog};
use crate::store::{Append, Entry, RoomId};

/// On a user's channel: close their sessions (`disconnect`), after a
/// revocation (`revoke`).
const SIGNOUT: &[u8] = b"disconnect";
const SIGNOUT_REVOKE: &[u8] = b"revoke";

/// How long a `Hello` (or the first use of a room here) waits for the
/// room's replica to reach the head Redis gave, before it is refused with
/// `SERVER_BUSY`.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's side of the cluster: the shared log, the feed, and which of
/// the node's publishes wait for their entry to come back.
pub struct Cluster {
    /// The shared log.
    pub log: Arc<RedisLog>,
    /// The node's subscription to its rooms' entries.
    pub feed: Feed,
    /// The appends queued for the next pipeline ([`appender`]).
    appends: mpsc::UnboundedSender<Job>,
    /// This node's id among the cluster's (presence, ephemeral pushes).
    pub node: String,
    /// The node's store: its replica of the rooms it serves.
    replica: Arc<crate::store::memory::MemoryStore>,
    /// How long a room goes without a session here before it is evicted.
    replica_idle: Duration,
    /// How long this node's presence entries hold unless renewed.
    pub presence_ttl_ms: u64,
    /// Users whose sessions here changed, with the session that started
    /// (not told of itself), for [`share_presence`].
    presence: mpsc::UnboundedSender<PresenceChange>,
    presence_changes: Mutex<Option<mpsc::UnboundedReceiver<PresenceChange>>>,
    inner: Arc<Mutex<Inner>>,
    /// Woken whenever entries handed to the local commit have been fanned
    /// out (the rooms' heads moved).
    applied: Notify,
    /// Entries whose log could not be read as a `Message` (never expected:
    /// only chatd's script writes the log).
    pub malformed: std::sync::atomic::AtomicU64,
}

/// A user whose sessions here changed, and the session that started (it
/// is not told of itself).
type PresenceChange = (Arc<str>, Option<u64>);

#[derive(Default)]
struct Inner {
    /// Rooms subscribed on the feed.
    attached: HashSet<RoomId>,
    /// Per room, the highest seq the fan-out has acknowledged here: an
    /// answer from Redis for a seq at or below it is acked at once.
    acked: HashMap<RoomId, u64>,
    /// The node's publishes appended in Redis whose entry the applier has
    /// not reached yet, by (room, seq).
    waiting: HashMap<(RoomId, u64), Waiter>,
    /// Per room, the first seq delivered after Redis lost entries of it (an
    /// epoch change): a resume from below it cannot be complete.
    lost_before: HashMap<RoomId, u64>,
    /// Users' devices over every node, as last heard (from Redis when a
    /// room is attached, from the presence pushes of the rooms served
    /// here since): who is online in the lists of `Joined` and
    /// `ListMembers`.
    devices: HashMap<Arc<str>, u32>,
    /// Rooms this node stopped serving, their replica dropped
    /// ([`replica_upkeep`]).
    evicted: HashSet<RoomId>,
    /// Rooms served again after an eviction, their replica being refilled
    /// from the stream: the head they had, which it must reach before it
    /// is read.
    cold: HashMap<RoomId, u64>,
    /// Since when a room served here has had no session of this node.
    idle_since: HashMap<RoomId, Instant>,
    /// Requests using a room now (a `Hello`, a session's or the server
    /// API's request): it is not evicted meanwhile.
    pins: HashMap<RoomId, usize>,
    /// Rooms evicted so far.
    evictions: u64,
    /// Per room, this node's appends queued for Redis or on their way:
    /// the room is not evicted before they are answered.
    queued: HashMap<RoomId, usize>,
}

/// A publish appended by this node, answered when its entry is applied.
struct Waiter {
    publisher: Publisher,
    permit: Option<OwnedSemaphorePermit>,
    received: Instant,
}

impl Cluster {
    /// The cluster side of a node over `log`, whose feed is `feed`.
    /// Starts the node's appender; call within the runtime. Its presence
    /// entries hold for `presence_ttl_ms` unless renewed
    /// ([`presence_upkeep`]).
    pub fn new(
        log: Arc<RedisLog>,
        feed: Feed,
        replica: Arc<crate::store::memory::MemoryStore>,
        presence_ttl_ms: u64,
        replica_idle: Duration,
    ) -> Self {
        let (appends, jobs) = mpsc::unbounded_channel();
        let (presence, presence_changes) = mpsc::unbounded_channel();
        let inner = Arc::new(Mutex::new(Inner::default()));
        // The epoch a room's first append starts: a random id per start.
        tokio::spawn(appender(log.clone(), crate::store::redis::fresh_epoch(), jobs, inner.clone()));
        Cluster {
            log,
            feed,
            appends,
            node: crate::store::redis::fresh_epoch(),
            replica,
            replica_idle,
            presence_ttl_ms,
            presence,
            presence_changes: Mutex::new(Some(presence_changes)),
            inner,
            applied: Notify::new(),
            malformed: Default::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Sends a `Presence` or `Typing` push of `room` to the other nodes
    /// serving it (not stored; lost if Redis is away).
    pub fn share_ephemeral(&self, room: &Room, frame: bytes::Bytes) {
        let (log, node, name) = (self.log.clone(), self.node.clone(), room.name.clone());
        tokio::spawn(async move {
            if let Err(e) = log.publish_ephemeral(&name, &node, &frame).await {
                tracing::debug!(room = %name, error = %e, "a presence or typing push did not reach the other nodes");
            }
        });
    }

    /// Subscribes `room` on the feed unless it is already; its replica is
    /// then filled from where it stands. True when it was not.
    pub fn attach(&self, room: &Room) -> bool {
        let mut inner = self.inner();
        let new = inner.attached.insert(room.id);
        if new {
            inner.idle_since.remove(&room.id);
            // Evicted before: the replica is refilled from the stream's
            // start, and read only once it has the head it had.
            let after = match inner.evicted.remove(&room.id) {
                true => {
                    inner.cold.insert(room.id, room.head());
                    0
                }
                false => room.head(),
            };
            drop(inner);
            self.feed.subscribe(room.name.clone(), after);
        }
        new
    }

    /// Whether `room` is served here and its replica can be read.
    pub fn is_current(&self, room: &Room) -> bool {
        let inner = self.inner();
        inner.attached.contains(&room.id) && !inner.cold.contains_key(&room.id)
    }

    /// Keeps `rooms` from being evicted until the guard is dropped.
    pub fn pin(self: &Arc<Self>, rooms: &[Arc<Room>]) -> Pinned {
        let mut inner = self.inner();
        for room in rooms {
            *inner.pins.entry(room.id).or_default() += 1;
        }
        Pinned { cluster: self.clone(), rooms: rooms.iter().map(|r| r.id).collect() }
    }

    /// (rooms served now, rooms evicted so far).
    pub fn replica_counts(&self) -> (usize, u64) {
        let inner = self.inner();
        (inner.attached.len(), inner.evictions)
    }

    /// Stops serving `room` if no session here has used it for
    /// `replica_idle`: unsubscribed, its replica dropped. Checked under the
    /// room's subscriber lock, so a session subscribing meanwhile either
    /// keeps it or finds it no longer served (and attaches it again).
    fn evict_if_idle(&self, room: &Room, now: Instant) -> bool {
        let evicted = room.if_unsubscribed(|| {
            let mut inner = self.inner();
            let busy = !inner.attached.contains(&room.id)
                || inner.cold.contains_key(&room.id)
                || inner.pins.get(&room.id).is_some_and(|n| *n > 0)
                || inner.queued.get(&room.id).is_some_and(|n| *n > 0)
                || inner.waiting.keys().any(|(r, _)| *r == room.id);
            if busy {
                inner.idle_since.remove(&room.id);
                return false;
            }
            let since = *inner.idle_since.entry(room.id).or_insert(now);
            if now.duration_since(since) < self.replica_idle {
                return false;
            }
            inner.attached.remove(&room.id);
            inner.evicted.insert(room.id);
            inner.idle_since.remove(&room.id);
            inner.acked.remove(&room.id);
            inner.evictions += 1;
            // Under the lock: an attach that follows subscribes after this
            // unsubscribes, and refills after this emptied the replica.
            self.feed.unsubscribe(room.name.clone());
            self.replica.evict(room.id);
            true
        });
        if evicted.is_none() {
            // A session subscribed: not idle.
            self.inner().idle_since.remove(&room.id);
        }
        evicted == Some(true)
    }

    /// Attaches `room` ([`Cluster::attach`]) and, the first time, learns
    /// how many devices its members have online over the cluster (the
    /// presence pushes of the room keep that up to date from then on).
    pub async fn attach_learning(&self, room: &Room) -> Result<(), Refusal> {
        if self.attach(room) {
            self.learn_devices(room).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// [`Cluster::attach`] where it cannot wait: what is online in the
    /// room is learnt meanwhile.
    pub fn attach_now(self: &Arc<Self>, room: &Arc<Room>) {
        if self.attach(room) {
            let (c, room) = (self.clone(), room.clone());
            tokio::spawn(async move {
                if let Err(e) = c.learn_devices(&room).await {
                    tracing::debug!(room = %room.name, error = %e, "who is online in the room is not known yet: Redis unavailable");
                }
            });
        }
    }

    /// Reads the device counts of `room`'s members from Redis.
    async fn learn_devices(&self, room: &Room) -> Result<(), redis::RedisError> {
        let members: Vec<Arc<str>> = room.gov().members.iter().map(|(u, _)| u.clone()).collect();
        let counts = self.log.devices_of(&members).await?;
        let mut inner = self.inner();
        for (user, n) in members.into_iter().zip(counts) {
            inner.devices.insert(user, n);
        }
        Ok(())
    }

    /// `user`'s first session here started (`except`) or their last one
    /// here ended: shared by [`share_presence`].
    pub fn presence_changed(&self, user: &Arc<str>, except: Option<u64>) {
        let _ = self.presence.send((user.clone(), except));
    }

    /// Tells the other nodes to close `user`'s sessions (after a
    /// revocation, written to Redis already).
    pub async fn disconnect_elsewhere(&self, user: &str, revoke: bool) -> Result<(), redis::RedisError> {
        let what = if revoke { SIGNOUT_REVOKE } else { SIGNOUT };
        let channel = crate::store::redis::state::user_channel(user);
        self.log.publish_ephemeral(&channel, &self.node, what).await
    }

    /// Notes `user`'s devices over every node, as just heard.
    pub fn heard_devices(&self, user: &str, devices: u32) {
        let mut inner = self.inner();
        match inner.devices.get_mut(user) {
            Some(n) => *n = devices,
            None if devices > 0 => {
                inner.devices.insert(user.into(), devices);
            }
            None => {}
        }
    }

    /// Those of `users` last heard to be online on some node.
    pub fn online_among<'a>(&self, users: impl Iterator<Item = &'a Arc<str>>) -> Vec<String> {
        let inner = self.inner();
        users.filter(|u| inner.devices.get(&***u).is_some_and(|n| *n > 0)).map(|u| u.to_string()).collect()
    }

    /// Whether `user` was last heard to be online on some node.
    pub fn online_somewhere(&self, user: &str) -> bool {
        self.inner().devices.get(user).is_some_and(|n| *n > 0)
    }

    /// Whether `room` is subscribed on the feed.
    pub fn is_attached(&self, room: &Room) -> bool {
        self.inner().attached.contains(&room.id)
    }

    /// Whether every entry of `room` after `after` is still in the log:
    /// false when Redis lost entries above it (an epoch change).
    pub fn complete_after(&self, room: &Room, after: u64) -> bool {
        self.inner().lost_before.get(&room.id).is_none_or(|first| *first <= after + 1)
    }

    /// Brings `room` here up to `seq` if the log in Redis has it (a
    /// message published through another node a moment ago), within
    /// [`SYNC_TIMEOUT`]; a seq beyond the log's head is left to the caller
    /// to refuse.
    pub(super) async fn catch_up_to(&self, room: &Room, seq: u64) -> Result<(), Refusal> {
        let head = self.log.head(&room.name).await.map_err(unavailable)?.0;
        if seq <= head && !self.reached(room, seq, SYNC_TIMEOUT).await {
            let msg = format!("room {} is still catching up with the cluster; try again", room.name);
            return Err(Refusal::new(ErrorCode::ServerBusy, msg));
        }
        Ok(())
    }

    /// Waits until `room`'s replica here has reached `seq` (false after
    /// `timeout`).
    async fn reached(&self, room: &Room, seq: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let there = || room.head() >= seq && !self.inner().cold.contains_key(&room.id);
            if there() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return there();
            }
        }
    }
}

/// Rooms kept from eviction while a request uses them ([`Cluster::pin`]).
pub struct Pinned {
    cluster: Arc<Cluster>,
    rooms: Vec<RoomId>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut inner = self.cluster.inner();
        for id in &self.rooms {
            if let Some(n) = inner.pins.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    inner.pins.remove(id);
                }
            }
        }
    }
}

/// The part of a local write that is shared state.
pub(super) enum Shared<'a> {
    /// Rooms' details, members, bans, invitations.
    Rooms(&'a [crate::store::RoomWrite]),
    /// A read marker.
    ReadMarker(&'a crate::store::ReadMarker),
    /// A user signed out everywhere at (Unix seconds).
    Revocation(&'a str, u64),
}

impl<'a> Shared<'a> {
    /// `write`'s shared part, if it has one.
    pub(super) fn of(write: &'a Write) -> Option<Self> {
        match write {
            Write::Rooms(w) => Some(Shared::Rooms(w)),
            Write::ReadMarker(m) => Some(Shared::ReadMarker(m)),
            Write::Revocation(user, secs) => Some(Shared::Revocation(user, *secs)),
            _ => None,
        }
    }
}

/// One append of `room` less queued ([`Inner::queued`]).
fn unqueue(inner: &Mutex<Inner>, room: RoomId) {
    let mut inner = lock(inner);
    if let Some(n) = inner.queued.get_mut(&room) {
        *n -= 1;
        if *n == 0 {
            inner.queued.remove(&room);
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

impl crate::pipeline::Claims for Cluster {
    fn claim(&self, room: RoomId, seq: u64) -> Option<(Publisher, Option<OwnedSemaphorePermit>, Instant)> {
        let mut inner = self.inner();
        let acked = inner.acked.entry(room).or_default();
        *acked = (*acked).max(seq);
        inner.waiting.remove(&(room, seq)).map(|w| (w.publisher, w.permit, w.received))
    }
}

/// A refusal for a Redis that did not answer.
pub(super) fn unavailable(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(ErrorCode::ServerBusy, format!("the cluster's Redis is unavailable, try again: {e}"))
}

impl Hub {
    /// The cluster side, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Brings `rooms` up to their heads in Redis (attaching them), so that
    /// what a client saw on any node is here before it is answered. A no-op
    /// on a single node.
    pub async fn cluster_sync(&self, rooms: &[Arc<Room>]) -> Result<(), Refusal> {
        let Some(c) = &self.cluster else { return Ok(()) };
        let mut heads = Vec::with_capacity(rooms.len());
        for room in rooms {
            c.attach_learning(room).await?;
            heads.push(c.log.head(&room.name).await.map_err(unavailable)?.0);
        }
        for (room, head) in rooms.iter().zip(heads) {
            if !c.reached(room, head, SYNC_TIMEOUT).await {
                let msg = format!("room {} is still catching up with the cluster; try again", room.name);
                return Err(Refusal::new(ErrorCode::ServerBusy, msg));
            }
        }
        Ok(())
    }

    /// Before a `Hello` with `token`: its user's revocation and rooms as
    /// Redis has them, each room here brought up to its head there
    /// ([`Hub::cluster_sync`]). A token that does not verify is left to the
    /// `Hello` to refuse.
    pub async fn cluster_before_hello(&self, token: &str) -> Result<Option<Pinned>, Refusal> {
        let Some(c) = &self.cluster else { return Ok(None) };
        let Ok(claims) = self.auth.verify(token, crate::auth::unix_now()) else { return Ok(None) };
        let user = claims.sub;
        // Changes to the user's rooms made on other nodes reach this one
        // from now on.
        c.feed.subscribe(crate::store::redis::state::user_channel(&user).into(), 0);
        if let Some(at) = c.log.revoked_at(&user).await.map_err(unavailable)? {
            self.note_revocation(&user, at);
        }
        let mut rooms: Vec<Arc<Room>> = self.user(&user).lock().rooms.values().cloned().collect();
        for name in c.log.rooms_of(&user).await.map_err(unavailable)? {
            if !rooms.iter().any(|r| *r.name == *name) {
                rooms.extend(self.cluster_refresh(&name).await?);
            }
        }
        for name in c.log.invitations_of(&user).await.map_err(unavailable)? {
            if self.room(&name).is_none_or(|r| !c.is_attached(&r)) {
                self.cluster_refresh(&name).await?;
            }
        }
        for room in &rooms {
            if !c.is_attached(room) {
                self.cluster_refresh(&room.name).await?;
            }
        }
        // What the refreshes changed, and the read markers moved elsewhere.
        let entry = self.user(&user);
        let rooms: Vec<Arc<Room>> = entry.lock().rooms.values().cloned().collect();
        // Served until the session has subscribed to them.
        let pinned = c.pin(&rooms);
        for room in &rooms {
            if let Some(pos) = c.log.read_marker(&room.name, &user).await.map_err(unavailable)? {
                entry.raise_read_marker(room.id, pos);
            }
        }
        self.cluster_sync(&rooms).await?;
        Ok(Some(pinned))
    }

    /// Another node disconnected `user`: their sessions here close too,
    /// after the revocation (if any) is read, so that a `Hello` here
    /// either sees it or is closed by it.
    async fn disconnected_elsewhere(&self, user: &str, revoke: bool) {
        let Some(c) = &self.cluster else { return };
        if revoke {
            match c.log.revoked_at(user).await {
                Ok(Some(at)) => self.note_revocation(user, at),
                Ok(None) => {}
                Err(e) => {
                    // The sessions still close; a Hello reads it again.
                    tracing::warn!(user, error = %e, "a revocation made on another node could not be read");
                }
            }
        }
        self.close_sessions(user, revoke);
    }

    /// Reads again every room `user` is a member of or invited to (their
    /// sessions here get what changed).
    async fn cluster_refresh_user(&self, user: &str) -> Result<(), Refusal> {
        let Some(c) = &self.cluster else { return Ok(()) };
        let mut names = c.log.rooms_of(user).await.map_err(unavailable)?;
        names.extend(c.log.invitations_of(user).await.map_err(unavailable)?);
        // And rooms they just left: gone from both lists.
        names.extend(self.user(user).lock().rooms.values().map(|r| r.name.to_string()));
        names.sort_unstable();
        names.dedup();
        for name in names {
            self.cluster_refresh(&name).await?;
        }
        Ok(())
    }

    /// Before a request on the room called `name` — a session's of the
    /// user of `entry`, or the server API's (`None`): a room this node does
    /// not know yet, or does not serve yet, is read from Redis and synced;
    /// one it serves is read again if the user is not a member here (they
    /// may have joined, or been added, through another node). The room is
    /// pinned, not evicted, while the guard returned lives.
    pub async fn cluster_use(&self, name: &str, entry: Option<&super::UserEntry>) -> Result<Option<Pinned>, Refusal> {
        let Some(c) = &self.cluster else { return Ok(None) };
        let (room, served) = match self.room(name) {
            Some(room) if c.is_attached(&room) => {
                if entry.is_some_and(|e| !e.lock().rooms.contains_key(&room.id)) {
                    self.cluster_refresh(name).await?;
                }
                (room, true)
            }
            _ if !crate::room::valid_room_name(name) => return Ok(None),
            _ => match self.cluster_refresh(name).await? {
                Some(room) => (room, false),
                None => return Ok(None),
            },
        };
        let pinned = c.pin(std::slice::from_ref(&room));
        // A room served here is as current as its feed, unless it is being
        // refilled after an eviction.
        if !served || !c.is_current(&room) {
            self.cluster_sync(std::slice::from_ref(&room)).await?;
        }
        Ok(Some(pinned))
    }

    /// Reads again every room this node does not serve (from the registry
    /// in Redis), learning those created on other nodes, without serving
    /// them: the directory lists them as they are, and a room's first use
    /// here starts from them.
    async fn cluster_learn_rooms(&self) -> Result<(), Refusal> {
        let Some(c) = &self.cluster else { return Ok(()) };
        for name in c.log.room_names().await.map_err(unavailable)? {
            self.cluster_learn_room(&name).await?;
        }
        Ok(())
    }

    /// Reads again the room called `name`, which another node created or
    /// changed, unless this node serves it (it hears of its changes on the
    /// room's channel then).
    async fn cluster_learn_room(&self, name: &str) -> Result<(), Refusal> {
        let Some(c) = &self.cluster else { return Ok(()) };
        match self.room(name) {
            Some(room) if c.is_attached(&room) => Ok(()),
            _ => self.cluster_read(name).await.map(|_| ()),
        }
    }

    /// Appends `message` (without seq and time: the script adds both) to
    /// `room` in Redis as the author, with the idempotency key's `owner`:
    /// queued at once for the node's next pipeline of appends (so a
    /// session's publishes keep their order), answered later — once the
    /// entry is back here and offered to the room ([`apply`]), at once for
    /// a duplicate, with `FORBIDDEN` or `SERVER_BUSY` when Redis refused it
    /// or did not answer (a retry with the same key is always safe).
    pub(super) fn append_clustered(
        &self,
        c: &Arc<Cluster>,
        room: &Arc<Room>,
        message: &proto::Message,
        owner: &Arc<str>,
        change: Option<ChangeCheck>,
        author: Author,
    ) -> Result<(), Refusal> {
        let Author { sender, publisher, permit, received } = author;
        c.attach_now(room);
        *c.inner().queued.entry(room.id).or_default() += 1;
        let job = Job {
            message: message.encode_to_vec(),
            member: sender,
            seen: room.head(),
            change,
            answered: Answered {
                pipeline: self.pipeline.clone(),
                room: room.clone(),
                owner: owner.clone(),
                client_msg_id: message.client_msg_id.clone(),
            },
            waiter: Waiter { publisher, permit, received },
        };
        if let Err(refused) = c.appends.send(job) {
            let job = refused.0;
            unqueue(&c.inner, room.id);
            for w in self.pipeline.in_flight.settle(owner, &message.client_msg_id) {
                w.refuse(ErrorCode::ServerBusy, "server is shutting down".into());
            }
            job.waiter.publisher.refuse(ErrorCode::ServerBusy, "server is shutting down".into());
        }
        Ok(())
    }
}

/// Applies another node's `Presence` or `Typing` push to `room` here.
fn ephemeral(hub: &Hub, c: &Cluster, room: &Arc<Room>, push: &[u8]) {
    let Some((node, frame)) = crate::store::redis::presence::parse_ephemeral(push) else { return };
    if node == c.node {
        return;
    }
    let body = crate::codec::decode_envelope(frame.get(crate::codec::PREFIX_LEN..).unwrap_or_default())
        .ok()
        .and_then(|e| e.body);
    match body {
        Some(proto::Body::Typing(t)) => {
            hub.typing_here(room, &Arc::from(t.user), t.active, None);
        }
        Some(proto::Body::Presence(p)) => {
            c.heard_devices(&p.user, p.devices);
            room.broadcast_ephemeral(&crate::delivery::Frame::shared(bytes::Bytes::copy_from_slice(frame)), None);
        }
        Some(proto::Body::ReadReceipt(r)) => {
            // The reader's marker moved on another node: here too, for
            // their sessions' unread counts.
            if let Ok(pos) = hub.read_pos(room, &r.user, r.seq) {
                hub.user(&r.user).raise_read_marker(room.id, pos);
            }
            room.broadcast_ephemeral(&crate::delivery::Frame::shared(bytes::Bytes::copy_from_slice(frame)), None);
        }
        _ => {
            tracing::warn!(room = %room.name, node, "an ephemeral push from another node that is not Presence or Typing")
        }
    }
}

/// Shares the changes of the users' sessions on this node: writes each
/// user's device count here to Redis and, when they came online with no
/// device elsewhere or went offline everywhere, tells their rooms on every
/// node. The changes are handled one batch after another, and each user's
/// count is read when it is written, so that a session that ends just
/// after it started can never leave its user online. A write Redis did not
/// take is tried again a second later. Runs until the hub goes.
pub async fn share_presence(hub: std::sync::Weak<Hub>) {
    let changes = hub.upgrade().and_then(|h| h.cluster.as_ref().and_then(|c| lock_or(&c.presence_changes).take()));
    let Some(mut changes) = changes else { return };
    while let Some((user, except)) = changes.recv().await {
        let mut batch: HashMap<Arc<str>, Option<u64>> = HashMap::from([(user, except)]);
        while let Ok((user, except)) = changes.try_recv() {
            let e = batch.entry(user).or_default();
            *e = except.or(*e);
        }
        let Some(hub) = hub.upgrade() else { return };
        let Some(c) = hub.cluster.clone() else { return };
        let writes = batch.into_iter().map(|(user, except)| {
            let (hub, c) = (&hub, &c);
            async move {
                let (devices, rooms) = {
                    let entry = hub.user(&user);
                    let st = entry.lock();
                    (st.sessions.len() as u32, st.rooms.values().cloned().collect::<Vec<_>>())
                };
                let change = match c.log.set_devices(&c.node, &user, devices, c.presence_ttl_ms).await {
                    Ok(change) => change,
                    Err(e) => {
                        tracing::debug!(user = %user, error = %e, "presence not shared: Redis unavailable; trying again");
                        let c = c.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            c.presence_changed(&user, None);
                        });
                        return;
                    }
                };
                c.heard_devices(&user, change.others + devices);
                let news = change.others == 0 && (change.before == 0) != (devices == 0);
                if news {
                    for room in rooms {
                        let frame = super::presence_frame(&room.name, &user, devices);
                        room.broadcast_ephemeral(&crate::delivery::Frame::shared(frame.clone()), except);
                        c.share_ephemeral(&room, frame);
                    }
                }
            }
        });
        futures_util::future::join_all(writes).await;
    }
}

fn lock_or<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Evicts the rooms no session of this node has used for
/// `cluster_replica_idle_ms`, so that a node's memory holds the rooms its
/// users are in, not every room it ever served. Runs until the hub goes.
pub async fn replica_upkeep(hub: std::sync::Weak<Hub>) {
    loop {
        let Some(hub) = hub.upgrade() else { return };
        let Some(c) = hub.cluster.clone() else { return };
        let every = (c.replica_idle / 4).clamp(Duration::from_millis(25), Duration::from_secs(30));
        let now = Instant::now();
        for room in hub.rooms() {
            if c.evict_if_idle(&room, now) {
                tracing::debug!(room = %room.name, "no session here used the room: no longer served here");
            }
        }
        drop(hub);
        tokio::time::sleep(every).await;
    }
}

/// Keeps this node's presence in Redis alive and reaps the nodes that
/// stopped renewing theirs: their users who are online nowhere else are
/// said to be offline in their rooms, by this node to every node. Runs
/// every third of the TTL until the hub goes.
pub async fn presence_upkeep(hub: std::sync::Weak<Hub>) {
    loop {
        let Some(hub) = hub.upgrade() else { return };
        let Some(c) = hub.cluster.clone() else { return };
        let every = Duration::from_millis((c.presence_ttl_ms / 3).max(100));
        let online = hub.online_devices();
        match c.log.renew_presence(&c.node, &online, c.presence_ttl_ms).await {
            Ok(true) if !online.is_empty() => {
                tracing::warn!(
                    users = online.len(),
                    "this node's presence had run out in Redis (it could not renew it in time): written anew"
                );
                for (user, _) in online {
                    c.presence_changed(&user.into(), None);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "presence not renewed: Redis unavailable"),
        }
        match c.log.reap_nodes().await {
            Ok(offline) => {
                for user in offline {
                    c.heard_devices(&user, 0);
                    let Ok(rooms) = c.log.rooms_of(&user).await else { continue };
                    for name in rooms {
                        if let Some(room) = hub.room(&name) {
                            hub.presence(&room, &user, 0, None);
                        } else if let Err(e) =
                            c.log.publish_ephemeral(&name, &c.node, &super::presence_frame(&name, &user, 0)).await
                        {
                            tracing::debug!(room = name, error = %e, "an offline presence did not reach the other nodes");
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "nodes not reaped: Redis unavailable"),
        }
        drop(hub);
        tokio::time::sleep(every).await;
    }
}

/// An append waiting for the next pipeline.
struct Job {
    message: Vec<u8>,
    member: Arc<str>,
    seen: u64,
    change: Option<ChangeCheck>,
    answered: Answered,
    waiter: Waiter,
}

/// How long a room's change lock in Redis holds if the node holding it
/// dies.
const ROOM_LOCK_TTL_MS: u64 = 5_000;

/// How long a change waits for another node's change of the same room.
const ROOM_LOCK_WAIT: Duration = Duration::from_secs(5);

/// A room's change lock: this node's, and in cluster mode the room's in
/// Redis, released when dropped.
pub(super) struct ChangeGuard<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    shared: Option<(Arc<RedisLog>, Arc<str>, String)>,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        if let Some((log, room, token)) = self.shared.take() {
            tokio::spawn(async move {
                // Expires by itself if this fails.
                if let Err(e) = log.unlock_room(&room, &token).await {
                    tracing::debug!(room = %room, error = %e, "a room's change lock was left to expire");
                }
            });
        }
    }
}

impl Hub {
    /// Serialises changes to `room`: on one node its change lock; on a
    /// cluster node also the room's lock in Redis, after which the room's
    /// state is read again, so that a change is decided on everything
    /// every node changed before it. `SERVER_BUSY` when Redis does not
    /// answer or another node holds the room for too long.
    pub(super) async fn change_lock<'a>(&'a self, room: &Arc<Room>) -> Result<ChangeGuard<'a>, Refusal> {
        let local = self.lock_changes(room).await;
        let Some(c) = &self.cluster else { return Ok(ChangeGuard { _local: local, shared: None }) };
        let token = crate::store::redis::fresh_epoch();
        let deadline = tokio::time::Instant::now() + ROOM_LOCK_WAIT;
        let mut wait = Duration::from_millis(2);
        // Another node's change takes a few round trips: waiting for it
        // with a short backoff costs less than a notice per release.
        while !c.log.lock_room(&room.name, &token, ROOM_LOCK_TTL_MS).await.map_err(unavailable)? {
            if tokio::time::Instant::now() >= deadline {
                let msg = format!("room {} is being changed on another node; try again", room.name);
                return Err(Refusal::new(ErrorCode::ServerBusy, msg));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
        let guard = ChangeGuard { _local: local, shared: Some((c.log.clone(), room.name.clone(), token)) };
        if let Some(state) = c.log.room_state(&room.name).await.map_err(unavailable)? {
            self.apply_state(room, state).await;
        }
        Ok(guard)
    }
}

/// Most appends in one pipeline.
const MAX_PIPELINE: usize = 512;

/// Sends the queued appends to Redis, a pipeline at a time: those queued
/// while one is on its way go together in the next (a group commit of
/// Redis's log), in the order they were queued. Answers are handled in
/// that order too, so a session's acks keep its requests' order.
async fn appender(log: Arc<RedisLog>, epoch: String, mut jobs: mpsc::UnboundedReceiver<Job>, inner: Arc<Mutex<Inner>>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_PIPELINE {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let entries: Vec<NewEntry<'_>> = batch
            .iter()
            .map(|j| NewEntry {
                room: &j.answered.room.name,
                message: &j.message,
                owner: &j.answered.owner,
                client_msg_id: &j.answered.client_msg_id,
                member: &j.member,
                seen: j.seen,
                change: j.change.as_ref(),
            })
            .collect();
        let answers = log.append_all(&entries, &epoch).await;
        drop(entries);
        for (job, answer) in batch.into_iter().zip(answers) {
            let room = job.answered.room.id;
            // Answered, or waiting for its entry (`Inner::waiting`).
            job.answered.answer(&inner, answer, job.waiter);
            unqueue(&inner, room);
        }
    }
}

/// What answering an append needs, once Redis has answered it.
struct Answered {
    pipeline: Arc<crate::pipeline::Pipeline>,
    room: Arc<Room>,
    owner: Arc<str>,
    client_msg_id: String,
}

impl Answered {
    /// Answers at once a refusal, a duplicate, or an entry the fan-out has
    /// acknowledged here already; otherwise the fan-out answers it
    /// ([`Cluster`]'s `Claims`).
    fn answer(self, inner: &Mutex<Inner>, answer: Result<Appended, AppendError>, waiter: Waiter) {
        let Answered { pipeline, room, owner, client_msg_id: cmid } = self;
        let m = &pipeline.metrics;
        let appended = match answer {
            Ok(a) => a,
            Err(e) => {
                let (code, message) = match e {
                    AppendError::Forbidden(msg) => (ErrorCode::Forbidden, msg),
                    AppendError::NotFound(msg) => (ErrorCode::NotFound, msg),
                    AppendError::Unavailable(msg) => {
                        m.cluster_append_failures.increment(1);
                        (ErrorCode::ServerBusy, unavailable(msg).message)
                    }
                    e @ AppendError::NotReplicated { .. } => {
                        m.cluster_append_failures.increment(1);
                        (ErrorCode::ServerBusy, format!("{e}; retry with the same client_msg_id"))
                    }
                };
                m.error(code);
                for w in pipeline.in_flight.settle(&owner, &cmid) {
                    w.refuse(code, message.clone());
                }
                waiter.publisher.refuse(code, message);
                return;
            }
        };
        let ack = |duplicate| proto::PublishAck {
            room: room.name.to_string(),
            seq: appended.seq,
            ts_ms: appended.ts_ms,
            client_msg_id: cmid.clone(),
            duplicate,
        };
        if appended.unchanged {
            // A reaction already as asked: in force, as on one node.
            let ack = proto::PublishAck { ts_ms: 0, ..ack(true) };
            for w in pipeline.in_flight.settle(&owner, &cmid) {
                w.ack(ack.clone());
            }
            waiter.publisher.ack(ack);
            return;
        }
        if appended.duplicate {
            m.duplicates.increment(1);
            for w in pipeline.in_flight.settle(&owner, &cmid) {
                w.ack(ack(true));
            }
            waiter.publisher.ack(ack(true));
            return;
        }
        let now = {
            let mut inner = lock(inner);
            if inner.acked.get(&room.id).is_some_and(|s| *s >= appended.seq) {
                Some(waiter)
            } else {
                inner.waiting.insert((room.id, appended.seq), waiter);
                None
            }
        };
        if let Some(w) = now {
            // The entry came back through the feed and was offered to the
            // room here before Redis's answer arrived.
            m.published.increment(1);
            m.publish_ack.record(w.received.elapsed().as_secs_f64());
            for r in pipeline.in_flight.settle(&owner, &cmid) {
                r.ack(ack(true));
            }
            w.publisher.ack(ack(false));
        }
    }
}

/// Applies the feed's deliveries to the node's rooms until the feed or the
/// local commit stops: each entry goes through the local group commit with
/// the seq Redis gave it, then the fan-out, which answers the node's own
/// publishers.
pub async fn apply(hub: Arc<Hub>, mut deliveries: mpsc::Receiver<Delivery>) {
    let Some(c) = hub.cluster.clone() else { return };
    let (markers, mut marked) = mpsc::unbounded_channel::<oneshot::Receiver<_>>();
    let waker = {
        let c = c.clone();
        tokio::spawn(async move {
            while let Some(rx) = marked.recv().await {
                let _ = rx.await;
                c.applied.notify_waiters();
            }
        })
    };
    let commits = hub.pipeline.commits.clone();
    while let Some(d) = deliveries.recv().await {
        if *d.room == *crate::store::redis::state::REGISTRY_CHANNEL {
            let hub = hub.clone();
            tokio::spawn(async move {
                // Subscribed anew: notices may have been missed.
                let all = if d.state_changed { hub.cluster_learn_rooms().await } else { Ok(()) };
                if let Err(e) = all {
                    tracing::warn!(error = %e.message, "could not read the rooms' registry from Redis");
                }
                for name in d.ephemeral.iter().filter_map(|n| std::str::from_utf8(n).ok()) {
                    if let Err(e) = hub.cluster_learn_room(name).await {
                        tracing::warn!(room = name, error = %e.message, "could not read a changed room from Redis");
                    }
                }
            });
            continue;
        }
        if let Some(user) = d.room.strip_prefix('@') {
            for push in &d.ephemeral {
                let Some((node, what)) = crate::store::redis::presence::parse_ephemeral(push) else { continue };
                if node != c.node {
                    let (hub, user, revoke) = (hub.clone(), user.to_string(), what == SIGNOUT_REVOKE);
                    tokio::spawn(async move { hub.disconnected_elsewhere(&user, revoke).await });
                }
            }
            if d.state_changed {
                let (hub, user) = (hub.clone(), user.to_string());
                tokio::spawn(async move {
                    if let Err(e) = hub.cluster_refresh_user(&user).await {
                        tracing::warn!(user, error = %e.message, "could not read the user's rooms from Redis");
                    }
                });
            }
            continue;
        }
        let Some(room) = hub.room(&d.room) else {
            tracing::warn!(room = %d.room, "entries for a room this node does not know; dropped");
            continue;
        };
        // The room's state first (inline, so that what follows on the
        // channel — a presence after a departure — finds it changed), the
        // pushes without storage after the entries.
        if d.state_changed
            && let Err(e) = hub.cluster_refresh(&d.room).await
        {
            tracing::warn!(room = %d.room, error = %e.message, "could not read the room's state from Redis");
        }
        if d.trimmed {
            // What came before is fanned out first, so the head is not
            // moved back below the start by an older entry.
            let Some(slot) = commits.reserve().await else { return };
            let (tx, rx) = oneshot::channel();
            slot.send(Pending { write: Write::Barrier, completion: Completion::Notify(tx), epoch: commits.epoch() });
            let _ = rx.await;
            hub.follow_trim(&c, &room).await;
        }
        if d.epoch_changed
            && let Some(first) = d.entries.first()
        {
            tracing::error!(
                room = %room.name,
                first_seq = first.seq,
                head = room.head(),
                "Redis lost entries of this room (its epoch changed): resumes from before them are answered with Synced{{complete: false}}"
            );
            hub.metrics.cluster_epoch_changes.increment(1);
            c.inner().lost_before.insert(room.id, first.seq);
        }
        let mut entries = d.entries;
        let cold = c.inner().cold.get(&room.id).copied();
        if let Some(head) = cold {
            // Served again after an eviction: what the room had goes back
            // into the replica only (its sessions had it, its counters
            // count it); the subscription's first delivery brings all of it.
            let refill: Vec<_> = entries.drain(..entries.partition_point(|e| e.seq <= head)).collect();
            hub.refill(&c, &room, refill);
            if d.state_changed {
                c.inner().cold.remove(&room.id);
                c.applied.notify_waiters();
            }
        }
        for e in entries {
            let message = match proto::Message::decode(&e.message[..]) {
                Ok(m) if m.seq == e.seq => m,
                other => {
                    c.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(room = %room.name, seq = e.seq, decoded = other.is_ok(), "a log entry is not a Message of its seq; skipped");
                    continue;
                }
            };
            let entry = Entry::of(&message);
            // A delete's unread bookkeeping needs what it deleted, as the
            // replica has it (nothing if it is deleted already).
            let erased = match &entry {
                Entry::Change { target, kind: proto::ChangeKind::Delete, .. } => {
                    hub.store.target(room.id, *target).ok().flatten().filter(|t| !t.deleted)
                }
                _ => None,
            }
            .map(|t| Box::new((Arc::<str>::from(t.sender), t.mentions)));
            let owner: Arc<str> = crate::store::idempotency_owner(&message.sender, &room.name).into();
            let Some(slot) = commits.reserve().await else { return };
            let claims: Arc<dyn crate::pipeline::Claims> = c.clone();
            slot.send(Pending {
                write: Write::Append(Append {
                    room: room.id,
                    seq: e.seq,
                    message: e.message.clone(),
                    sender: owner.to_string(),
                    client_msg_id: message.client_msg_id.clone(),
                    ts_ms: message.ts_ms,
                    entry: entry.clone(),
                }),
                completion: Completion::Publish(Box::new(PublishDone {
                    room: room.clone(),
                    seq: e.seq,
                    ts_ms: message.ts_ms,
                    message: e.message,
                    publisher: None,
                    claims: Some(claims),
                    client_msg_id: message.client_msg_id,
                    sender: owner,
                    permit: None,
                    received: Instant::now(),
                    entry,
                    erased,
                })),
                epoch: commits.epoch(),
            });
        }
        for push in &d.ephemeral {
            ephemeral(&hub, &c, &room, push);
        }
        // Its completion comes out once the entries above are fanned out.
        let Some(slot) = commits.reserve().await else { return };
        let (tx, rx) = oneshot::channel();
        slot.send(Pending { write: Write::Barrier, completion: Completion::Notify(tx), epoch: commits.epoch() });
        let _ = markers.send(rx);
    }
    drop(markers);
    let _ = waker.await;
}

impl Hub {
    /// Writes `entries` (of a room served again after an eviction, at or
    /// below the head it had) into the replica, without fanning them out.
    fn refill(&self, c: &Cluster, room: &Room, entries: Vec<crate::store::redis::LogEntry>) {
        use crate::store::Store as _;
        let mut batch = crate::store::Batch::default();
        for e in entries {
            let Ok(message) = proto::Message::decode(&e.message[..]) else {
                c.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(room = %room.name, seq = e.seq, "a log entry is not a Message; skipped");
                continue;
            };
            batch.appends.push(Append {
                room: room.id,
                seq: e.seq,
                sender: crate::store::idempotency_owner(&message.sender, &room.name).to_string(),
                client_msg_id: message.client_msg_id.clone(),
                ts_ms: message.ts_ms,
                entry: Entry::of(&message),
                message: e.message,
            });
        }
        if let Err(e) = c.replica.write(&batch) {
            tracing::error!(room = %room.name, error = %e, "the replica could not be refilled");
        }
    }

    /// Retention trimmed `room`'s stream in Redis: the replica here drops
    /// what lies below the new start, and the room starts there (its head
    /// too, if this node had not received what was trimmed). Tried a few
    /// times if Redis does not answer; the next trim notice or
    /// resubscription tries again.
    async fn follow_trim(&self, c: &Cluster, room: &Arc<Room>) {
        for attempt in 1..=3 {
            match c.log.trim_record(&room.name).await {
                Ok(record) if record.start() > room.start() => {
                    let start = record.start();
                    if let Err(e) = c.replica.adopt_trim(room.id, &record) {
                        tracing::error!(room = %room.name, error = %e, "the replica could not follow a trim");
                        return;
                    }
                    room.follow_trim(record);
                    c.applied.notify_waiters();
                    tracing::info!(room = %room.name, start, "the room's log was trimmed in Redis: it starts here now");
                    return;
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(room = %room.name, attempt, error = %e, "could not read a room's trim record");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        }
    }
}

impl Hub {
    /// Writes `write`'s part of the shared state in Redis before it is
    /// committed here, and tells the nodes serving its rooms. A message's
    /// append takes the log's path instead.
    pub(super) async fn share(&self, c: &Cluster, write: Shared<'_>) -> Result<(), Refusal> {
        use crate::store::RoomWrite;
        use crate::store::redis::state::StateWrite;
        let name = |id: RoomId| {
            self.room_by_id(id).map(|r| r.name.clone()).ok_or_else(|| {
                Refusal::new(ErrorCode::Internal, format!("a change to room {id}, which this node does not know"))
            })
        };
        let names = match write {
            Shared::Rooms(writes) => writes
                .iter()
                .map(|w| match w {
                    RoomWrite::Details { room, .. }
                    | RoomWrite::Member { room, .. }
                    | RoomWrite::Ban { room, .. }
                    | RoomWrite::Invite { room, .. }
                    | RoomWrite::InviteEnded { room, .. } => name(*room),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Shared::ReadMarker(m) => vec![name(m.room)?],
            Shared::Revocation(..) => Vec::new(),
        };
        let shared: Vec<StateWrite<'_>> = match write {
            Shared::Rooms(writes) => writes
                .iter()
                .zip(&names)
                .map(|(w, room)| match w {
                    RoomWrite::Details { details, .. } => StateWrite::Details { room, details },
                    RoomWrite::Member { user, record, .. } => StateWrite::Member { room, user, record },
                    RoomWrite::Ban { user, ban, .. } => StateWrite::Ban { room, user, ban: ban.as_ref() },
                    RoomWrite::Invite { user, invite, .. } => {
                        StateWrite::Invite { room, user, invite: invite.as_ref() }
                    }
                    RoomWrite::InviteEnded { user, reason, by, .. } => {
                        StateWrite::InviteEnded { room, user, reason: *reason, by }
                    }
                })
                .collect(),
            Shared::ReadMarker(m) => vec![StateWrite::ReadMarker { room: &names[0], user: &m.user, pos: m.pos }],
            Shared::Revocation(user, secs) => vec![StateWrite::Revocation { user, secs }],
        };
        c.log.write_state(&shared).await.map_err(unavailable)
    }

    /// Makes the room called `name` here what Redis holds — creating it
    /// here if need be, telling the sessions here what changed — and
    /// attaches it. `None` when Redis has no such room.
    pub async fn cluster_refresh(&self, name: &str) -> Result<Option<Arc<Room>>, Refusal> {
        let Some(c) = &self.cluster else { return Ok(self.room(name)) };
        let Some(room) = self.cluster_read(name).await? else { return Ok(None) };
        c.attach_learning(&room).await?;
        Ok(Some(room))
    }

    /// Makes the room called `name` here what Redis holds, creating it
    /// here if need be and telling the sessions here what changed, without
    /// attaching it. `None` when Redis has no such room.
    async fn cluster_read(&self, name: &str) -> Result<Option<Arc<Room>>, Refusal> {
        let Some(c) = &self.cluster else { return Ok(self.room(name)) };
        let room = match self.room(name) {
            Some(room) => room,
            None => {
                let Some(state) = c.log.room_state(name).await.map_err(unavailable)? else { return Ok(None) };
                self.room_or_insert(name, &state.details).0
            }
        };
        // Read under the room's change lock: a change made here meanwhile
        // is in Redis before it is applied here, so what is read is never
        // older than what this node has applied.
        let changes = self.lock_changes(&room).await;
        let Some(state) = c.log.room_state(name).await.map_err(unavailable)? else { return Ok(None) };
        self.apply_state(&room, state).await;
        drop(changes);
        Ok(Some(room))
    }

    /// Creates or updates the room called `name` from its state read from
    /// Redis (a node that starts, a room created elsewhere).
    async fn adopt(&self, name: &str, st: crate::store::redis::state::RoomState) -> Arc<Room> {
        let (room, _) = self.room_or_insert(name, &st.details);
        let _changes = self.lock_changes(&room).await;
        self.apply_state(&room, st).await;
        room
    }

    /// Applies a room's state as read from Redis and stores it here,
    /// telling the sessions here what changed: departures first, then role
    /// changes (the highest role first, as a hand-over is made), then
    /// arrivals. The caller holds the room's change lock.
    async fn apply_state(&self, room: &Arc<Room>, st: crate::store::redis::state::RoomState) {
        use crate::proto::{MemberChange, Role};
        use crate::room::gov::Membership;
        use crate::store::RoomWrite;
        let name = room.name.clone();
        room.mark_stored();
        let mut local = vec![RoomWrite::Details { room: room.id, name: name.to_string(), details: st.details.clone() }];
        let retitled = {
            let mut g = room.gov();
            let before = g.details();
            g.set_texts(st.details.title.clone(), st.details.topic.clone());
            g.set_retention(st.details.retention_max_age_ms, st.details.retention_max_messages);
            g.details() != before
        };
        if retitled {
            self.room_update(room, "", "", MemberChange::Unspecified, Role::Unspecified);
        }
        let (mut gone, mut roles, mut arrivals) = (Vec::new(), Vec::new(), Vec::new());
        for (user, rec) in &st.records {
            let current = room.gov().members.get(user).copied();
            let role = Role::try_from(rec.role).unwrap_or(Role::Member);
            match current {
                Some(_) if rec.role == 0 => gone.push((user, rec)),
                Some(m) if rec.role > 0 && m.role != role => roles.push((user, rec, role, m.since)),
                None if rec.role > 0 => arrivals.push((user, rec, role)),
                _ => {}
            }
            local.push(RoomWrite::Member { user: user.clone(), room: room.id, record: rec.clone() });
        }
        for (user, rec) in gone {
            let reason = MemberChange::try_from(rec.reason).unwrap_or(MemberChange::Left);
            self.departed_here(room, user, reason, &rec.by, None);
        }
        roles.sort_by_key(|(_, _, role, _)| std::cmp::Reverse(*role as i32));
        for (user, rec, role, since) in roles {
            room.gov().apply_member(&Arc::from(user.as_str()), role, since);
            self.room_update(room, &rec.by, user, MemberChange::RoleChanged, role);
        }
        for (user, rec, role) in arrivals {
            // A join's record names the member themselves.
            let by = if rec.by.is_empty() { user } else { &rec.by };
            let m = Membership { role, since: rec.since };
            self.admit(room, &Arc::from(user.as_str()), &self.user(user), m, by, None);
        }
        let (lifted, stale_invites) = {
            let mut g = room.gov();
            let lifted: Vec<Arc<str>> =
                g.bans().keys().filter(|u| !st.bans.iter().any(|(b, _)| **b == ***u)).cloned().collect();
            for u in &lifted {
                g.bans_mut().remove(u);
                local.push(RoomWrite::Ban { room: room.id, user: u.to_string(), ban: None });
            }
            for (u, ban) in &st.bans {
                g.bans_mut().insert(u.as_str().into(), ban.clone());
                local.push(RoomWrite::Ban { room: room.id, user: u.clone(), ban: Some(ban.clone()) });
            }
            let stale: Vec<Arc<str>> =
                g.invites().keys().filter(|u| !st.invites.iter().any(|(i, _)| **i == ***u)).cloned().collect();
            for u in &stale {
                g.invites_mut().remove(u);
                local.push(RoomWrite::Invite { user: u.to_string(), room: room.id, invite: None });
            }
            (lifted, stale)
        };
        for u in lifted {
            self.room_update(room, "", &u, MemberChange::Unbanned, Role::Unspecified);
        }
        for u in stale_invites {
            // Used by a join: the arrival said it all. Declined, or
            // withdrawn by a removal or a ban: as one node tells it.
            let ended = st.ended.iter().find(|(e, _)| **e == *u).map(|(_, r)| r);
            let entry = self.user(&u);
            let mut us = entry.lock();
            us.invited.remove(&room.id);
            let Some((reason, by)) = ended else { continue };
            let reason = MemberChange::try_from(*reason).unwrap_or(MemberChange::Removed);
            if reason != MemberChange::Declined {
                let left = super::rooms::left(&name, reason, by);
                let frame = crate::codec::encode_frame(&proto::Envelope::push(proto::Body::Left(left)));
                for s in &us.sessions {
                    let _ = s.outbound.push(frame.clone());
                }
            }
            drop(us);
            self.room_update(room, by, &u, reason, Role::Unspecified);
        }
        for (u, invite) in &st.invites {
            let known = room.gov().invites().contains_key(u.as_str());
            if !known {
                self.apply_invite(room, &u.as_str().into(), invite);
            }
            local.push(RoomWrite::Invite { user: u.clone(), room: room.id, invite: Some(invite.clone()) });
        }
        for (u, pos) in &st.reads {
            self.user(u).raise_read_marker(room.id, *pos);
        }
        if let Err(e) = self.commit_here(Write::Rooms(local)).await {
            tracing::error!(room = %name, error = %e.message, "could not store the room's state from Redis here");
        }
    }

    /// Loads every room's state and the revocations from Redis into a
    /// node that starts.
    pub async fn cluster_load(&self) -> Result<usize, ::redis::RedisError> {
        let Some(c) = &self.cluster else { return Ok(0) };
        // Rooms created on other nodes from now on.
        c.feed.subscribe(crate::store::redis::state::REGISTRY_CHANNEL.into(), 0);
        let state = c.log.load_state().await?;
        let rooms = state.rooms.len();
        let mut names: Vec<_> = state.rooms.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, room) in names {
            self.adopt(&name, room).await;
        }
        for (user, at) in state.revocations {
            self.note_revocation(&user, at);
        }
        Ok(rooms)
    }
}
