//! Room administration: joining and leaving, creating rooms, invitations,
//! removals, bans and roles (ARCHITECTURE.md, "Rooms and roles").
//!
//! Every change goes the same way: take the room's change lock, decide
//! with the room's rules ([`crate::room::gov`]), commit the records through
//! the group commit, and only then apply the change in memory and tell the
//! sessions — so what a client is told has been stored, and a crash never
//! undoes an answered change. The acting user is a parameter, not a
//! session: a transport's request and an application backend's call run
//! the same code.
//!
//! Membership ends at once for every session of the user: each is
//! unsubscribed from the room (under the room's subscriber lock, which the
//! fan-out and a catch-up from the log take too, so neither feeds it past
//! that point) and then gets `Left`, behind whatever was already queued.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{Hub, Refusal, UserEntry};
use crate::codec::encode_frame;
use crate::delivery::Subscriber;
use crate::pipeline::Completion;
use crate::proto::{self, Body, Envelope, ErrorCode, MemberChange, Role, RoomKind};
use crate::room::gov::{self, Action, Membership};
use crate::room::{Access, Room, access_of, valid_room_name};
use crate::store::commit::{Pending, Write};
use crate::store::{BanRecord, InviteRecord, MemberRecord, RoomDetails, RoomWrite};
use crate::time::now_ms;

/// Members listed per page when the request says 0, and the cap.
const MEMBERS_DEFAULT: u32 = 100;
const MEMBERS_MAX: u32 = 1000;
/// Rooms listed per directory page when the request says 0, and the cap.
const ROOMS_DEFAULT: u32 = 50;
const ROOMS_MAX: u32 = 200;
/// Locks serialising room changes, shared by rooms (by id).
pub const CHANGE_LOCKS: usize = 64;
/// Most invitations one `CreateRoom` may carry.
pub const MAX_INVITES_AT_CREATION: usize = 100;
/// Most bytes in a moderation reason.
const MAX_REASON: usize = 512;

/// Bytes left for the items of one reply: a page is cut where the next
/// item would not fit (and says it has more), so no reply exceeds the frame
/// size a client was promised. The first item always goes in.
pub struct Budget {
    left: usize,
    first: bool,
}

impl Budget {
    /// Takes room for `item`; false (taking nothing) when it does not fit.
    pub fn take(&mut self, item: &impl prost::Message) -> bool {
        let len = item.encoded_len() + 8;
        if len > self.left && !std::mem::take(&mut self.first) {
            return false;
        }
        self.first = false;
        self.left = self.left.saturating_sub(len);
        true
    }
}

/// Who makes a change: a user, with that user's rights, or the system (the
/// server API without `actAs`), which may do anything an owner may and also
/// act on the owner.
#[derive(Clone, Debug)]
pub enum Actor {
    /// A user.
    User(Arc<str>),
    /// The application's backend.
    System,
}

impl Actor {
    /// The user id, or "" for the system (a system notice's `sender`, a
    /// change's `by`).
    pub fn id(&self) -> &str {
        match self {
            Actor::User(u) => u,
            Actor::System => "",
        }
    }
}

/// The session a request came from, and its request id: a `Joined` reply
/// must be queued before the room's first live message to it.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    /// The requesting session.
    pub session: &'a Arc<Subscriber>,
    /// The request's envelope id.
    pub request: u64,
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, message)
}

fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Forbidden, message)
}

fn not_found(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::NotFound, message)
}

fn check_name(name: &str) -> Result<(), Refusal> {
    if valid_room_name(name) { Ok(()) } else { Err(bad(format!("invalid room name {name:?}"))) }
}

fn check_user(user: &str) -> Result<(), Refusal> {
    if crate::auth::valid_user_id(user) { Ok(()) } else { Err(bad(format!("invalid user id {user:?}"))) }
}

fn check_reason(reason: &str) -> Result<(), Refusal> {
    if reason.len() <= MAX_REASON { Ok(()) } else { Err(bad(format!("reason is longer than {MAX_REASON} bytes"))) }
}

/// `user`'s membership of `room` with `role`, given `by` (the user
/// themselves for a join, "" when it passed on by itself): what other
/// cluster nodes tell their sessions the change came from.
fn member_write(user: &str, room: &Room, role: Role, since: u64, by: &str) -> RoomWrite {
    RoomWrite::Member {
        user: user.to_string(),
        room: room.id,
        record: MemberRecord { role: role as i32, since, reason: 0, by: by.to_string(), role_ms: now_ms() },
    }
}

/// Why `user`'s invitation to `room` ended, for the other nodes of a
/// cluster.
fn ended_write(user: &str, room: &Room, reason: MemberChange, by: &str) -> RoomWrite {
    RoomWrite::InviteEnded { user: user.to_string(), room: room.id, reason: reason as i32, by: by.to_string() }
}

fn invite_write(user: &str, room: &Room, invite: Option<InviteRecord>) -> RoomWrite {
    RoomWrite::Invite { user: user.to_string(), room: room.id, invite }
}

/// A `Left` body.
pub fn left(room: &str, reason: MemberChange, by: &str) -> proto::Left {
    proto::Left { room: room.to_string(), reason: reason as i32, by: by.to_string() }
}

impl Hub {
    /// Takes the lock that serialises `room`'s changes (held across their
    /// commit): one of [`CHANGE_LOCKS`] shared by rooms, so an idle room
    /// carries no lock of its own; changes are rare and short.
    pub(super) async fn lock_changes(&self, room: &Room) -> tokio::sync::MutexGuard<'_, ()> {
        self.change_locks[(room.id % CHANGE_LOCKS as u64) as usize].lock().await
    }

    /// Submits a write other than a message and waits until it is durable.
    pub async fn commit(&self, write: Write) -> Result<(), Refusal> {
        if let Some(c) = &self.cluster
            && let Some(shared) = super::cluster::Shared::of(&write)
        {
            self.share(c, shared).await?;
        }
        self.commit_here(write).await
    }

    /// [`Hub::commit`] to this node's store only.
    pub(super) async fn commit_here(&self, write: Write) -> Result<(), Refusal> {
        let commits = &self.pipeline.commits;
        if commits.has_failed() {
            return Err(Refusal::new(ErrorCode::ServerBusy, "storage is unavailable"));
        }
        let (tx, rx) = oneshot::channel();
        let permit =
            commits.reserve().await.ok_or_else(|| Refusal::new(ErrorCode::ServerBusy, "server is shutting down"))?;
        permit.send(Pending { write, completion: Completion::Notify(tx), epoch: commits.epoch() });
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Refusal::new(ErrorCode::Internal, format!("not stored: {e}"))),
            Err(_) => Err(Refusal::new(ErrorCode::ServerBusy, "server is shutting down")),
        }
    }

    /// Commits changes to `room`, with its name and details first if they
    /// are not stored yet. A room whose creation fails to commit is
    /// forgotten.
    async fn commit_room(&self, room: &Arc<Room>, mut writes: Vec<RoomWrite>) -> Result<(), Refusal> {
        if !room.is_stored() {
            let details = room.gov().details();
            writes.insert(0, RoomWrite::Details { room: room.id, name: room.name.to_string(), details });
        }
        match self.commit(Write::Rooms(writes)).await {
            Ok(()) => {
                room.mark_stored();
                Ok(())
            }
            Err(e) => {
                self.forget_unstored(room);
                // A write can land and its sync fail: unlike a message's,
                // a room change is not removed again, so it may be in force
                // after a restart. Every change is idempotent: retrying is
                // safe and makes it so now.
                Err(match e.code {
                    ErrorCode::Internal => Refusal::new(
                        ErrorCode::Internal,
                        format!("{}; the change may be in force after a restart: retry it", e.message),
                    ),
                    _ => e,
                })
            }
        }
    }

    /// The room called `name`: `BAD_REQUEST` for an invalid name,
    /// `NOT_FOUND` for an unknown one.
    fn existing(&self, name: &str) -> Result<Arc<Room>, Refusal> {
        check_name(name)?;
        self.room(name).ok_or_else(|| not_found(format!("no room {name}")))
    }

    /// Room changes share the publish rate limit.
    fn take_change_token(&self, entry: &UserEntry) -> Result<(), Refusal> {
        if self.take_publish_token(entry) {
            return Ok(());
        }
        self.metrics.rate_limited("moderation");
        let rate = self.limits.publish_rate_per_min;
        Err(Refusal::new(
            ErrorCode::RateLimited,
            format!("rate limit ({rate} per minute, shared by publishes and room changes) exceeded"),
        ))
    }

    /// Whether `actor` may do `action` to `target` in a room governed by
    /// `g`: the room's rules for a user, anything for the system.
    fn permit(g: &gov::Governance, actor: &Actor, action: Action, target: &str, role: Role) -> Result<(), Refusal> {
        match actor {
            Actor::User(u) => g.check(u, action, target, role).map_err(forbidden),
            Actor::System if g.kind == RoomKind::Direct && matches!(action, Action::Invite | Action::SetRole) => {
                Err(forbidden("a direct conversation has no roles and takes no invitations"))
            }
            Actor::System => Ok(()),
        }
    }

    /// Takes a change from a user's rate limit (the system's calls are
    /// limited per API key instead).
    fn charge(&self, actor: &Actor) -> Result<(), Refusal> {
        match actor {
            Actor::User(u) => self.take_change_token(&self.user(u)),
            Actor::System => Ok(()),
        }
    }

    /// Logs and counts a room administration action.
    fn audit(&self, actor: &str, action: &'static str, target: &str, room: &str, reason: &str) {
        tracing::info!(actor, action, target, room, reason, "room administration");
        self.metrics.moderation(action);
    }

    /// Whether `user` has a session online (without creating an entry):
    /// here, or in cluster mode on any node.
    pub fn is_online(&self, user: &str) -> bool {
        let here = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .is_some_and(|e| !e.lock().sessions.is_empty());
        here || self.cluster.as_ref().is_some_and(|c| c.online_somewhere(user))
    }

    /// The members of `room` online, sorted: those with a session in it
    /// here, and in cluster mode those online on another node.
    fn online_in(&self, room: &Room) -> Vec<String> {
        let mut online = room.online_users();
        if let Some(c) = &self.cluster {
            online.extend(c.online_among(room.gov().members.iter().map(|(u, _)| u)));
            online.sort();
            online.dedup();
        }
        online
    }

    /// Tells every session of the room's members about a change, each with
    /// its own user's role in `info.my_role`.
    pub(super) fn room_update(&self, room: &Room, by: &str, user: &str, change: MemberChange, role: Role) {
        let sessions = room.subscribers();
        if sessions.is_empty() {
            return;
        }
        let mut frames: [Option<Bytes>; 4] = Default::default();
        let mut out = Vec::with_capacity(sessions.len());
        {
            let g = room.gov();
            for s in sessions {
                let viewer = g.role_of(s.user());
                let frame = frames[viewer as usize].get_or_insert_with(|| {
                    encode_frame(&Envelope::push(Body::RoomUpdate(proto::RoomUpdate {
                        info: Some(g.info_as(&room.name, viewer)),
                        by: by.to_string(),
                        user: user.to_string(),
                        change: change as i32,
                        role: role as i32,
                    })))
                });
                out.push((s, frame.clone()));
            }
        }
        // Bounded like ephemeral pushes: a session whose queue is full
        // misses the update (the state is in its next Welcome) rather than
        // growing without bound under a flood of changes.
        for (s, frame) in out {
            let _ = s.outbound.offer(frame);
        }
    }

    /// `Join`: makes `user` a member (creating the room if it is unknown
    /// and `auto_create_rooms` is on) and subscribes all their sessions.
    /// The `Joined` reply goes to `origin`, a `Joined` push to the user's
    /// other sessions.
    pub async fn join(
        &self,
        user: &Arc<str>,
        entry: &Arc<UserEntry>,
        name: &str,
        origin: Option<Origin<'_>>,
    ) -> Result<(), Refusal> {
        check_name(name)?;
        let peer = match access_of(name) {
            Ok(Access::Open) => None,
            Ok(Access::Direct(a, b)) if **user == *a => Some(b),
            Ok(Access::Direct(a, b)) if **user == *b => Some(a),
            Ok(Access::Direct(..)) => {
                return Err(forbidden(format!("{name} is a direct conversation of two other users")));
            }
            Err(why) => return Err(bad(why)),
        };
        loop {
            let room = match self.room(name) {
                Some(room) => room,
                None if peer.is_some() || self.limits.auto_create_rooms => {
                    let kind = if peer.is_some() { RoomKind::Direct } else { RoomKind::Public };
                    let details = RoomDetails {
                        kind: kind as i32,
                        created_by: user.to_string(),
                        created_ms: now_ms(),
                        ..Default::default()
                    };
                    self.room_or_insert(name, &details).0
                }
                None => return Err(not_found(format!("no room {name} (rooms are created with CreateRoom here)"))),
            };
            let _changes = match self.change_lock(&room).await {
                Ok(guard) => guard,
                Err(e) => {
                    self.forget_unstored(&room);
                    return Err(e);
                }
            };
            if !self.is_current(&room) {
                // Its creation failed while this waited: start over.
                continue;
            }
            let _serial = entry.membership.lock().await;
            if entry.lock().rooms.contains_key(&room.id) {
                // Already a member: just the reply.
                if let Some(o) = origin {
                    self.subscribe_sessions(&room, user, entry, Some(o), true);
                }
                return Ok(());
            }
            let (role, invited, peer_joins, since) = {
                let g = room.gov();
                g.may_join(user).map_err(forbidden)?;
                // The first into an empty room owns it, unless the system
                // made it without an owner (its members are added).
                let owns = g.kind != RoomKind::Direct && g.members.is_empty() && !g.created_by.is_empty();
                let role = if owns { Role::Owner } else { Role::Member };
                let peer_joins = peer.filter(|p| !g.members.contains_key(p.as_str()));
                (role, g.invites().contains_key(&**user), peer_joins, g.next_since(now_ms()))
            };
            let max = self.limits.max_rooms_per_user;
            let peer_full = peer_joins.as_ref().is_some_and(|p| self.user(p).lock().rooms.len() >= max);
            if entry.lock().rooms.len() >= max || peer_full {
                self.forget_unstored(&room);
                let who = if peer_full { "the other user is" } else { "you are" };
                return Err(forbidden(format!("{who} a member of {max} rooms already (the limit)")));
            }
            let mut writes = vec![member_write(user, &room, role, since, user)];
            if invited {
                writes.push(invite_write(user, &room, None));
            }
            // The other user of a direct room becomes a member in the same
            // commit, so nothing the joiner does next finds them outside it.
            if let Some(p) = &peer_joins {
                writes.push(member_write(p, &room, Role::Member, since, user));
            }
            self.commit_room(&room, writes).await?;
            let peer_joins: Option<Arc<str>> = peer_joins.map(Into::into);
            if let Some(p) = &peer_joins {
                // Counted in the joiner's reply already.
                room.gov().apply_member(p, Role::Member, since);
            }
            self.admit(&room, user, entry, Membership { role, since }, user, origin);
            if let Some(p) = peer_joins {
                self.admit(&room, &p, &self.user(&p), Membership { role: Role::Member, since }, user, None);
            }
            tracing::debug!(user = %user, room = %name, ?role, "joined");
            return Ok(());
        }
    }

    /// Applies a committed membership: the room's members, the user's
    /// rooms, their sessions' subscriptions (with `Joined`), then tells the
    /// room.
    pub(super) fn admit(
        &self,
        room: &Arc<Room>,
        user: &Arc<str>,
        entry: &UserEntry,
        m: Membership,
        by: &str,
        origin: Option<Origin<'_>>,
    ) {
        room.gov().apply_member(user, m.role, m.since);
        let devices = self.subscribe_sessions(room, user, entry, origin, false);
        self.room_update(room, by, user, MemberChange::Joined, m.role);
        if devices > 0 {
            self.presence(room, user, devices, origin.map(|o| o.session.id));
        }
    }

    /// Subscribes every session of a member to `room` (those already
    /// subscribed stay as they are), queueing `Joined` to each: the reply to
    /// `origin`, a push to the others — or, with `only_origin`, just the
    /// reply. Returns the user's sessions.
    fn subscribe_sessions(
        &self,
        room: &Arc<Room>,
        user: &Arc<str>,
        entry: &UserEntry,
        origin: Option<Origin<'_>>,
        only_origin: bool,
    ) -> usize {
        let mut st = entry.lock();
        st.rooms.insert(room.id, room.clone());
        st.invited.remove(&room.id);
        let read = st.read.get(&room.id).copied().unwrap_or_default();
        let info = room.gov().info(&room.name, user);
        let mut online = self.online_in(room);
        if !st.sessions.is_empty()
            && let Err(i) = online.binary_search_by(|u| u.as_str().cmp(user))
        {
            online.insert(i, user.to_string());
        }
        for s in &st.sessions {
            let mine = origin.filter(|o| o.session.id == s.id);
            if only_origin && mine.is_none() {
                continue;
            }
            let id = mine.map_or(0, |o| o.request);
            // Queued under the room's lock before the subscription exists,
            // so it precedes every live message.
            let reply = |head: u64| {
                let (unread, mentions) = self.unread(room, user, &read, head);
                let state = proto::RoomState {
                    room: room.name.to_string(),
                    head_seq: head,
                    read_seq: read.seq.min(head),
                    info: Some(info.clone()),
                    unread,
                    mentions,
                };
                encode_frame(&Envelope::new(
                    id,
                    Body::Joined(proto::Joined { state: Some(state), online: online.clone() }),
                ))
            };
            room.subscribe_live(s, Some(&reply));
        }
        if let Some(c) = &self.cluster
            && !st.sessions.is_empty()
        {
            // The room's entries must reach this node's sessions from now
            // on (a member with none here needs nothing of it). Attached
            // after they subscribed: a room evicted meanwhile is attached
            // again ([`super::cluster::Cluster`]'s `evict_if_idle`).
            c.attach_now(room);
        }
        st.sessions.len()
    }

    /// `Leave`: ends `user`'s membership; their other sessions get `Left`.
    pub async fn leave(
        &self,
        user: &Arc<str>,
        entry: &Arc<UserEntry>,
        name: &str,
        origin: Option<u64>,
    ) -> Result<proto::Left, Refusal> {
        check_name(name)?;
        let done = left(name, MemberChange::Left, user);
        let Some(room) = self.room(name) else { return Ok(done) };
        let _changes = self.change_lock(&room).await?;
        // Leaving a room one is not in is already done.
        if entry.lock().rooms.contains_key(&room.id) {
            self.depart(&room, user, MemberChange::Left, user, origin, Vec::new()).await?;
            tracing::debug!(user = %user, room = %name, "left");
        }
        Ok(done)
    }

    /// Ends `user`'s membership of `room` (with `writes` in the same
    /// commit): ownership passes on if they owned it, every session of
    /// theirs but `except` gets `Left{reason, by}`, and the room is told.
    /// The caller holds the room's `changes` lock.
    async fn depart(
        &self,
        room: &Arc<Room>,
        user: &str,
        reason: MemberChange,
        by: &str,
        except: Option<u64>,
        mut writes: Vec<RoomWrite>,
    ) -> Result<(), Refusal> {
        let heir = {
            let g = room.gov();
            let owned = g.owner().is_some_and(|o| &**o == user);
            owned.then(|| g.successor(user)).flatten().map(|h| {
                let since = g.members.get(&h).map_or(0, |m| m.since);
                (h, since)
            })
        };
        // The heir is written first: a crash between the two records leaves
        // two owners (resolved on load), never none.
        if let Some((h, since)) = &heir {
            writes.push(member_write(h, room, Role::Owner, *since, ""));
        }
        writes.push(RoomWrite::Member {
            user: user.to_string(),
            room: room.id,
            record: MemberRecord { role: 0, since: 0, reason: reason as i32, by: by.to_string(), role_ms: now_ms() },
        });
        self.commit_room(room, writes).await?;
        if let Some((h, since)) = &heir {
            room.gov().apply_member(h, Role::Owner, *since);
        }
        self.departed_here(room, user, reason, by, except);
        if let Some((h, _)) = heir {
            self.room_update(room, "", &h, MemberChange::RoleChanged, Role::Owner);
        }
        Ok(())
    }

    /// Applies a committed departure: the room's members, the user's
    /// rooms, `Left{reason, by}` to every session of theirs but `except`,
    /// their typing and presence, then tells the room.
    pub(super) fn departed_here(
        &self,
        room: &Arc<Room>,
        user: &str,
        reason: MemberChange,
        by: &str,
        except: Option<u64>,
    ) {
        room.gov().apply_departure(user);
        let entry = self.user(user);
        let user: Arc<str> = user.into();
        {
            let mut st = entry.lock();
            st.rooms.remove(&room.id);
            let frame = encode_frame(&Envelope::push(Body::Left(left(&room.name, reason, by))));
            for s in &st.sessions {
                room.unsubscribe(s.id);
                if Some(s.id) != except {
                    let _ = s.outbound.push(frame.clone());
                }
            }
        }
        if room.is_typing(&user) {
            self.typing(room, &user, false, None);
        }
        self.presence(room, &user, 0, None);
        self.room_update(room, by, &user, reason, Role::Unspecified);
    }

    /// `CreateRoom`: a new room and its invitations. A user creating it
    /// owns it; the system names an `owner`, or none (a room that members
    /// are added to).
    pub async fn create_room(
        &self,
        actor: &Actor,
        c: proto::CreateRoom,
        owner: Option<&str>,
    ) -> Result<proto::RoomInfo, Refusal> {
        check_name(&c.room)?;
        if c.room.starts_with("dm:") {
            return Err(bad("a direct room is made by joining dm:<a>:<b>, not with CreateRoom"));
        }
        let kind = match RoomKind::try_from(c.kind) {
            Ok(RoomKind::Unspecified | RoomKind::Public) => RoomKind::Public,
            Ok(RoomKind::Private) => RoomKind::Private,
            Ok(RoomKind::Direct) => return Err(bad("a direct room is made by joining dm:<a>:<b>")),
            Err(_) => return Err(bad(format!("unknown room kind {}", c.kind))),
        };
        gov::check_texts(Some(&c.title), Some(&c.topic)).map_err(bad)?;
        if c.invite.len() > MAX_INVITES_AT_CREATION {
            return Err(bad(format!("at most {MAX_INVITES_AT_CREATION} invitations with CreateRoom; Invite the rest")));
        }
        let owner: Option<Arc<str>> = match (actor, owner) {
            (Actor::User(u), _) => Some(u.clone()),
            (Actor::System, Some(o)) => {
                check_user(o)?;
                Some(o.into())
            }
            (Actor::System, None) => None,
        };
        let mut seen = std::collections::HashSet::new();
        let mut invitees: Vec<Arc<str>> = Vec::new();
        for u in &c.invite {
            check_user(u)?;
            if owner.as_deref() != Some(u.as_str()) && seen.insert(u.as_str()) {
                invitees.push(u.as_str().into());
            }
        }
        let entry = owner.as_ref().map(|o| self.user(o));
        // One token for the room and one for each invitation.
        for _ in 0..=invitees.len() {
            self.charge(actor)?;
        }
        let now = now_ms();
        let details = RoomDetails {
            kind: kind as i32,
            title: c.title.clone(),
            topic: c.topic.clone(),
            created_by: owner.as_deref().unwrap_or(actor.id()).to_string(),
            created_ms: now,
            ..Default::default()
        };
        let exists = || Refusal::new(ErrorCode::AlreadyExists, format!("room {} already exists", c.room));
        let (room, new) = self.room_or_insert(&c.room, &details);
        if !new {
            return Err(exists());
        }
        let _changes = match self.change_lock(&room).await {
            Ok(guard) => guard,
            Err(e) => {
                self.forget_unstored(&room);
                return Err(e);
            }
        };
        if !self.is_current(&room) || !room.gov().members.is_empty() {
            return Err(exists());
        }
        let _serial = match &entry {
            Some(e) => Some(e.membership.lock().await),
            None => None,
        };
        let max = self.limits.max_rooms_per_user;
        let limit = if entry.as_ref().is_some_and(|e| e.lock().rooms.len() >= max) {
            Err(forbidden(format!("member of {max} rooms already (the limit)")))
        } else {
            self.check_invitees(&invitees)
        };
        if let Err(e) = limit {
            self.forget_unstored(&room);
            return Err(e);
        }
        let mut writes = Vec::new();
        if let Some(o) = &owner {
            writes.push(member_write(o, &room, Role::Owner, now, actor.id()));
        }
        let invite = InviteRecord { by: actor.id().to_string(), ts_ms: now };
        writes.extend(invitees.iter().map(|i| invite_write(i, &room, Some(invite.clone()))));
        self.commit_room(&room, writes).await?;
        if let (Some(o), Some(e)) = (&owner, &entry) {
            self.admit(&room, o, e, Membership { role: Role::Owner, since: now }, actor.id(), None);
        }
        for i in &invitees {
            self.apply_invite(&room, i, &invite);
        }
        self.audit(actor.id(), "create", owner.as_deref().unwrap_or(""), &c.room, "");
        Ok(room.gov().info(&room.name, actor.id()))
    }

    /// Refuses (`CONFLICT`) if an invitee has as many pending invitations
    /// as allowed.
    fn check_invitees(&self, invitees: &[Arc<str>]) -> Result<(), Refusal> {
        let max = self.limits.max_pending_invites_per_user;
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for i in invitees {
            // Looked up, not created: a refused request leaves no entries.
            if users.get(i).is_some_and(|e| e.lock().invited.len() >= max) {
                return Err(Refusal::new(
                    ErrorCode::Conflict,
                    format!("{i} has {max} pending invitations already (the limit)"),
                ));
            }
        }
        Ok(())
    }

    /// Applies a committed invitation: the invitee's sessions get an
    /// `Invitation`, the room a `RoomUpdate`.
    pub(super) fn apply_invite(&self, room: &Arc<Room>, invitee: &Arc<str>, invite: &InviteRecord) {
        let info = {
            let mut g = room.gov();
            g.invites_mut().insert(invitee.clone(), invite.clone());
            g.info_as(&room.name, Role::Unspecified)
        };
        let entry = self.user(invitee);
        let mut st = entry.lock();
        st.invited.insert(room.id, room.clone());
        let push = proto::Invitation {
            room: room.name.to_string(),
            by: invite.by.clone(),
            ts_ms: invite.ts_ms,
            info: Some(info),
        };
        let frame = encode_frame(&Envelope::push(Body::Invitation(push)));
        for s in &st.sessions {
            // Bounded: the invitation is in the next Welcome if missed.
            let _ = s.outbound.offer(frame.clone());
        }
        drop(st);
        self.room_update(room, &invite.by, invitee, MemberChange::Invited, Role::Unspecified);
    }

    /// `UpdateRoom`: changes title and topic (admins and the owner) and
    /// the room's retention (the owner).
    pub async fn update_room(&self, actor: &Actor, u: proto::UpdateRoom) -> Result<proto::RoomInfo, Refusal> {
        let room = self.existing(&u.room)?;
        gov::check_texts(u.title.as_deref(), u.topic.as_deref()).map_err(bad)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        let (details, changed) = {
            let g = room.gov();
            Self::permit(&g, actor, Action::Update, "", Role::Unspecified)?;
            let mut d = g.details();
            d.title = u.title.clone().unwrap_or(d.title);
            d.topic = u.topic.clone().unwrap_or(d.topic);
            d.retention_max_age_ms = u.retention_max_age_ms.unwrap_or(d.retention_max_age_ms);
            d.retention_max_messages = u.retention_max_messages.unwrap_or(d.retention_max_messages);
            let retention = (d.retention_max_age_ms, d.retention_max_messages);
            if retention != g.retention()
                && let Actor::User(user) = actor
                && g.role_of(user) != Role::Owner
            {
                return Err(forbidden(format!("only the owner of {} sets its retention", room.name)));
            }
            let changed = d.title != g.title() || d.topic != g.topic() || retention != g.retention();
            (d, changed)
        };
        if changed {
            let write = RoomWrite::Details { room: room.id, name: room.name.to_string(), details: details.clone() };
            self.commit_room(&room, vec![write]).await?;
            let mut g = room.gov();
            g.set_retention(details.retention_max_age_ms, details.retention_max_messages);
            g.set_texts(details.title, details.topic);
            drop(g);
            self.room_update(&room, actor.id(), "", MemberChange::Unspecified, Role::Unspecified);
            self.audit(actor.id(), "update", "", &room.name, "");
        }
        Ok(room.gov().info(&room.name, actor.id()))
    }

    /// `GetRoom`: the room's details, for those who may see them.
    pub fn get_room(&self, actor: &Actor, name: &str) -> Result<proto::RoomInfo, Refusal> {
        let room = self.existing(name)?;
        let g = room.gov();
        if let Actor::User(u) = actor
            && !g.may_view(u)
        {
            return Err(forbidden(format!("room {name} is not visible to you")));
        }
        Ok(g.info(name, actor.id()))
    }

    /// `Invite`: invites `target` (members of public rooms, admins of
    /// private ones). Inviting a member or someone invited changes nothing.
    pub async fn invite(&self, actor: &Actor, name: &str, target: &str) -> Result<proto::RoomInfo, Refusal> {
        check_user(target)?;
        let room = self.existing(name)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        {
            let g = room.gov();
            Self::permit(&g, actor, Action::Invite, target, Role::Unspecified)?;
            if g.kind == RoomKind::Direct {
                return Err(forbidden("a direct conversation takes no invitations"));
            }
            if g.members.contains_key(target) || g.invites().contains_key(target) {
                return Ok(g.info(name, actor.id()));
            }
            if g.is_banned(target) {
                return Err(Refusal::new(ErrorCode::Conflict, format!("{target} is banned from {name}; unban first")));
            }
        }
        let target: Arc<str> = target.into();
        self.check_invitees(std::slice::from_ref(&target))?;
        let invite = InviteRecord { by: actor.id().to_string(), ts_ms: now_ms() };
        self.commit_room(&room, vec![invite_write(&target, &room, Some(invite.clone()))]).await?;
        self.apply_invite(&room, &target, &invite);
        self.audit(actor.id(), "invite", &target, name, "");
        Ok(room.gov().info(name, actor.id()))
    }

    /// Makes `target` a member of `name` with `role` at once, without an
    /// invitation (the server API): admins and the system; a role above
    /// member also needs the owner's rights. Adding a member with the role
    /// they have changes nothing; with another, it is `SetRole`.
    pub async fn add_member(
        &self,
        actor: &Actor,
        name: &str,
        target: &str,
        role: i32,
    ) -> Result<proto::RoomInfo, Refusal> {
        check_user(target)?;
        let role = match Role::try_from(role) {
            Ok(Role::Unspecified) => Role::Member,
            Ok(r) => r,
            Err(_) => return Err(bad(format!("unknown role {role}"))),
        };
        let room = self.existing(name)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        let target: Arc<str> = target.into();
        let entry = self.user(&target);
        let _serial = entry.membership.lock().await;
        let member = {
            let g = room.gov();
            if g.kind == RoomKind::Direct {
                return Err(forbidden("the members of a direct conversation are its two users"));
            }
            Self::permit(&g, actor, Action::Add, &target, Role::Unspecified)?;
            if role > Role::Member {
                Self::permit(&g, actor, Action::SetRole, &target, role)?;
            }
            match g.members.get(&target) {
                Some(m) if m.role == role => return Ok(g.info(name, actor.id())),
                Some(_) => true,
                None => false,
            }
        };
        if member {
            // A member already: a change of role, by SetRole's rules.
            drop((_serial, _changes));
            return self.set_role(actor, name, &target, role as i32).await;
        }
        let (invited, since) = {
            let g = room.gov();
            if g.is_banned(&target) {
                return Err(Refusal::new(ErrorCode::Conflict, format!("{target} is banned from {name}; unban first")));
            }
            if role == Role::Owner && g.owner().is_some() {
                return Err(Refusal::new(
                    ErrorCode::Conflict,
                    format!("{name} has an owner; add as admin or member and hand ownership on with SetRole"),
                ));
            }
            (g.invites().contains_key(&*target), g.next_since(now_ms()))
        };
        let max = self.limits.max_rooms_per_user;
        if entry.lock().rooms.len() >= max {
            return Err(forbidden(format!("{target} is a member of {max} rooms already (the limit)")));
        }
        let mut writes = vec![member_write(&target, &room, role, since, actor.id())];
        if invited {
            writes.push(invite_write(&target, &room, None));
        }
        self.commit_room(&room, writes).await?;
        self.admit(&room, &target, &entry, Membership { role, since }, actor.id(), None);
        self.audit(actor.id(), "add", &target, name, gov::role_name(role));
        Ok(room.gov().info(name, actor.id()))
    }

    /// `DeclineInvite`: drops `user`'s pending invitation.
    pub async fn decline(
        &self,
        user: &Arc<str>,
        entry: &Arc<UserEntry>,
        name: &str,
    ) -> Result<proto::RoomInfo, Refusal> {
        let none = || not_found(format!("no pending invitation to {name}"));
        let room = self.existing(name).map_err(|e| if e.code == ErrorCode::NotFound { none() } else { e })?;
        self.take_change_token(entry)?;
        let _changes = self.change_lock(&room).await?;
        if !room.gov().invites().contains_key(&**user) {
            return Err(none());
        }
        let ended = ended_write(user, &room, MemberChange::Declined, user);
        self.commit_room(&room, vec![invite_write(user, &room, None), ended]).await?;
        let info = {
            let mut g = room.gov();
            g.invites_mut().remove(&**user);
            g.info(name, user)
        };
        entry.lock().invited.remove(&room.id);
        self.room_update(&room, user, user, MemberChange::Declined, Role::Unspecified);
        self.audit(user, "decline", user, name, "");
        Ok(info)
    }

    /// `RemoveMember` (`ban = false`) and `Ban`: ends `target`'s membership
    /// and withdraws their invitation; a ban also keeps them out.
    pub async fn remove(
        &self,
        actor: &Actor,
        name: &str,
        target: &str,
        reason: &str,
        ban: bool,
    ) -> Result<proto::RoomInfo, Refusal> {
        check_user(target)?;
        check_reason(reason)?;
        let room = self.existing(name)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        let action = if ban { Action::Ban } else { Action::Remove };
        let (member, invited, banned) = {
            let g = room.gov();
            Self::permit(&g, actor, action, target, Role::Unspecified)?;
            (g.members.contains_key(target), g.invites().contains_key(target), g.is_banned(target))
        };
        let change = if ban { MemberChange::Banned } else { MemberChange::Removed };
        let adds_ban = ban && !banned;
        if !member && !invited && !adds_ban {
            return Ok(room.gov().info(name, actor.id()));
        }
        let mut writes = Vec::new();
        if invited {
            writes.push(invite_write(target, &room, None));
            // A member's removal tells them with Left; an invitee's is the
            // withdrawal of their invitation.
            if !member {
                writes.push(ended_write(target, &room, change, actor.id()));
            }
        }
        let record = BanRecord { by: actor.id().to_string(), reason: reason.to_string(), ts_ms: now_ms() };
        if adds_ban {
            writes.push(RoomWrite::Ban { room: room.id, user: target.to_string(), ban: Some(record.clone()) });
        }
        if member {
            // The ban is in the same commit, and in memory before anyone
            // can try to join again (the room's changes lock is held).
            self.depart(&room, target, change, actor.id(), None, writes).await?;
            if adds_ban {
                room.gov().bans_mut().insert(target.into(), record);
            }
        } else {
            self.commit_room(&room, writes).await?;
            {
                let mut g = room.gov();
                g.invites_mut().remove(target);
                if adds_ban {
                    g.bans_mut().insert(target.into(), record);
                }
            }
            if invited {
                // The invitee's sessions drop the invitation.
                let entry = self.user(target);
                let mut st = entry.lock();
                st.invited.remove(&room.id);
                let frame = encode_frame(&Envelope::push(Body::Left(left(name, change, actor.id()))));
                for s in &st.sessions {
                    let _ = s.outbound.push(frame.clone());
                }
            }
            self.room_update(&room, actor.id(), target, change, Role::Unspecified);
        }
        self.audit(actor.id(), action.name(), target, name, reason);
        Ok(room.gov().info(name, actor.id()))
    }

    /// `Unban`.
    pub async fn unban(
        &self,
        actor: &Actor,
        name: &str,
        target: &str,
        reason: &str,
    ) -> Result<proto::RoomInfo, Refusal> {
        check_user(target)?;
        check_reason(reason)?;
        let room = self.existing(name)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        {
            let g = room.gov();
            Self::permit(&g, actor, Action::Unban, target, Role::Unspecified)?;
            if !g.is_banned(target) {
                return Ok(g.info(name, actor.id()));
            }
        }
        self.commit_room(&room, vec![RoomWrite::Ban { room: room.id, user: target.to_string(), ban: None }]).await?;
        room.gov().bans_mut().remove(target);
        self.room_update(&room, actor.id(), target, MemberChange::Unbanned, Role::Unspecified);
        self.audit(actor.id(), "unban", target, name, reason);
        Ok(room.gov().info(name, actor.id()))
    }

    /// `SetRole` (the owner only); `Owner` hands ownership on.
    pub async fn set_role(
        &self,
        actor: &Actor,
        name: &str,
        target: &str,
        role: i32,
    ) -> Result<proto::RoomInfo, Refusal> {
        check_user(target)?;
        let role = match Role::try_from(role) {
            Ok(r @ (Role::Member | Role::Admin | Role::Owner)) => r,
            _ => return Err(bad("role must be ROLE_MEMBER, ROLE_ADMIN or ROLE_OWNER")),
        };
        let room = self.existing(name)?;
        self.charge(actor)?;
        let _changes = self.change_lock(&room).await?;
        let (theirs, previous) = {
            let g = room.gov();
            Self::permit(&g, actor, Action::SetRole, target, role)?;
            let Some(theirs) = g.members.get(target).copied() else {
                return Err(not_found(format!("{target} is not a member of {name}")));
            };
            if theirs.role == role {
                return Ok(g.info(name, actor.id()));
            }
            // Handing ownership on: the owner (the acting user, unless the
            // system acts) steps down to admin.
            let previous = g
                .owner()
                .filter(|o| role == Role::Owner && &***o != target)
                .and_then(|o| g.members.get(o).map(|m| (o.clone(), m.since)));
            (theirs, previous)
        };
        // The new owner is written before the old one steps down: a crash
        // between leaves two owners (resolved on load), never none.
        let mut writes = vec![member_write(target, &room, role, theirs.since, actor.id())];
        if let Some((o, since)) = &previous {
            writes.push(member_write(o, &room, Role::Admin, *since, actor.id()));
        }
        self.commit_room(&room, writes).await?;
        let target: Arc<str> = target.into();
        room.gov().apply_member(&target, role, theirs.since);
        self.room_update(&room, actor.id(), &target, MemberChange::RoleChanged, role);
        if let Some((o, _)) = previous {
            self.room_update(&room, actor.id(), &o, MemberChange::RoleChanged, Role::Admin);
        }
        self.audit(actor.id(), "set_role", &target, name, gov::role_name(role));
        Ok(room.gov().info(name, actor.id()))
    }

    /// `ListMembers`: a page of members in user-id order.
    pub fn list_members(&self, actor: &Actor, l: &proto::ListMembers) -> Result<proto::MemberPage, Refusal> {
        let room = self.existing(&l.room)?;
        let limit = match l.limit {
            0 => MEMBERS_DEFAULT,
            n => n.min(MEMBERS_MAX),
        } as usize;
        let (page, has_more) = {
            let g = room.gov();
            if let Actor::User(u) = actor
                && !g.may_list_members(u)
            {
                return Err(forbidden(format!("room {} is not visible to you", l.room)));
            }
            let mut page: Vec<(Arc<str>, Role)> =
                g.members.after(&l.after_user).take(limit + 1).map(|(u, m)| (u.clone(), m.role)).collect();
            let has_more = page.len() > limit;
            page.truncate(limit);
            (page, has_more)
        };
        let mut fits = self.frame_budget();
        let mut members = Vec::with_capacity(page.len());
        let mut cut = false;
        for (u, role) in page {
            let m = proto::Member { online: self.is_online(&u), user: u.to_string(), role: role as i32 };
            if !fits.take(&m) {
                cut = true;
                break;
            }
            members.push(m);
        }
        Ok(proto::MemberPage { room: l.room.clone(), members, has_more: has_more || cut })
    }

    /// What one reply may hold: `max_frame_bytes` (what `Welcome`
    /// promised), less room for the envelope and the page's other fields.
    pub fn frame_budget(&self) -> Budget {
        Budget { left: self.limits.max_frame_bytes.saturating_sub(512), first: true }
    }

    /// `ListRooms`: a page of the public directory.
    pub fn list_rooms(&self, user: &str, l: &proto::ListRooms) -> Result<proto::RoomList, Refusal> {
        let limit = match l.limit {
            0 => ROOMS_DEFAULT,
            n => n.min(ROOMS_MAX),
        } as usize;
        let query = l.query.to_lowercase();
        let mut rooms: Vec<Arc<Room>> = self.rooms().into_iter().filter(|r| *r.name > *l.after_room).collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(limit.min(rooms.len()));
        let mut has_more = false;
        let mut fits = self.frame_budget();
        for room in rooms {
            let g = room.gov();
            let listed = g.kind == RoomKind::Public
                && room.is_stored()
                && !g.is_banned(user)
                && (query.is_empty()
                    || room.name.to_lowercase().contains(&query)
                    || g.title().to_lowercase().contains(&query));
            if !listed {
                continue;
            }
            let info = g.info(&room.name, user);
            if out.len() == limit || !fits.take(&info) {
                has_more = true;
                break;
            }
            out.push(info);
        }
        Ok(proto::RoomList { rooms: out, has_more })
    }

    /// The `Left` that answers a resume cursor for a room `user` does not
    /// belong to: how their membership ended, if they had one.
    pub async fn departed(&self, user: &str, name: &str) -> Result<proto::Left, Refusal> {
        let record = match (self.room(name), &self.cluster) {
            // This node may not have heard of it yet.
            (_, Some(c)) => {
                c.log.member_record(name, user).await.map_err(super::cluster::unavailable)?.filter(|r| r.role == 0)
            }
            (Some(room), None) => self.store.departure(user, room.id)?,
            (None, None) => None,
        };
        Ok(match record {
            Some(r) => proto::Left { room: name.to_string(), reason: r.reason, by: r.by },
            None => left(name, MemberChange::Unspecified, ""),
        })
    }
}
