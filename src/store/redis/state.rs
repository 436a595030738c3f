//! What cluster mode keeps in Redis beside the logs: rooms' details,
//! memberships with their roles (and how ended ones ended), bans,
//! invitations, read markers and revocations (ARCHITECTURE.md, "Cluster
//! mode"), written as they change and read back whole when a node starts.
//!
//! A room's state sits under its hash tag with its log: `:details` (the
//! encoded `RoomDetails`), `:members` (user → role, which the append script
//! checks), `:records` (user → the encoded `MemberRecord`, departures
//! included), `:bans`, `:invites` and `:reads` (user → `ReadPos`). Three
//! keys span rooms and so live in slots of their own: `chatd:rooms` (every
//! room's name), `chatd:user:{user}:invites` (the rooms inviting a user)
//! and `chatd:revoked` (user → Unix seconds). Every write sets or removes a
//! value, so writing a batch again after a failure converges on the same
//! state; on one Redis a batch is also one `MULTI`.

use std::collections::HashMap;

use prost::Message as _;
use redis::RedisError;

use super::{RedisLog, room_key};
use crate::store::{BanRecord, InviteRecord, MemberRecord, ReadPos, RoomDetails};

/// The set of every room's name.
const ROOMS: &str = "chatd:rooms";

/// User → Unix seconds of their sign-out everywhere.
const REVOKED: &str = "chatd:revoked";

/// The rooms with a pending invitation for `user`.
fn invites_of(user: &str) -> String {
    format!("chatd:user:{{{user}}}:invites")
}

/// The name under which a feed subscribes to `user`'s state notices: a
/// member or invitee changed in any room. No room is called so (`@` is not
/// in room names).
pub fn user_channel(user: &str) -> String {
    format!("@{user}")
}

/// The name under which a feed subscribes to the notices of rooms created
/// or changed on any node: each names the room (its details, members or
/// bans changed). No room is called so (`*` is not in room names).
pub const REGISTRY_CHANNEL: &str = "*rooms";

/// The rooms `user` is a member of.
fn rooms_of(user: &str) -> String {
    format!("chatd:user:{{{user}}}:rooms")
}

/// One change to the shared state.
#[derive(Clone, Debug)]
pub enum StateWrite<'a> {
    /// A room's details (and its name in the registry).
    Details {
        /// Room name.
        room: &'a str,
        /// Its details.
        details: &'a RoomDetails,
    },
    /// A membership began, changed role or ended (`role = 0`).
    Member {
        /// Room name.
        room: &'a str,
        /// User id.
        user: &'a str,
        /// The new record.
        record: &'a MemberRecord,
    },
    /// A ban placed or lifted.
    Ban {
        /// Room name.
        room: &'a str,
        /// User id.
        user: &'a str,
        /// The ban; `None` lifts it.
        ban: Option<&'a BanRecord>,
    },
    /// An invitation made, or used, declined or withdrawn.
    Invite {
        /// Room name.
        room: &'a str,
        /// The invitee.
        user: &'a str,
        /// The invitation; `None` ends it.
        invite: Option<&'a InviteRecord>,
    },
    /// Why an invitation ended, other than by a join.
    InviteEnded {
        /// Room name.
        room: &'a str,
        /// The invitee.
        user: &'a str,
        /// A `MemberChange`: declined, removed or banned.
        reason: i32,
        /// Who ended it.
        by: &'a str,
    },
    /// A read marker moved.
    ReadMarker {
        /// Room name.
        room: &'a str,
        /// User id.
        user: &'a str,
        /// Its new position.
        pos: ReadPos,
    },
    /// A user signed out everywhere at this Unix second.
    Revocation {
        /// User id.
        user: &'a str,
        /// When.
        secs: u64,
    },
}

impl StateWrite<'_> {
    /// The room it changes, if any.
    pub fn room(&self) -> Option<&str> {
        match self {
            StateWrite::Details { room, .. }
            | StateWrite::Member { room, .. }
            | StateWrite::Ban { room, .. }
            | StateWrite::Invite { room, .. }
            | StateWrite::InviteEnded { room, .. }
            | StateWrite::ReadMarker { room, .. } => Some(room),
            StateWrite::Revocation { .. } => None,
        }
    }
}

/// One room's state as read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoomState {
    /// Its details.
    pub details: RoomDetails,
    /// Its head (0 for no entries).
    pub head: u64,
    /// Every user's record: members (`role > 0`) and departures.
    pub records: Vec<(String, MemberRecord)>,
    /// Bans in force.
    pub bans: Vec<(String, BanRecord)>,
    /// Pending invitations.
    pub invites: Vec<(String, InviteRecord)>,
    /// How the last invitation of each invitee ended other than by a join:
    /// (invitee, (`MemberChange`, by)).
    pub ended: Vec<(String, (i32, String))>,
    /// Read markers.
    pub reads: Vec<(String, ReadPos)>,
}

/// Everything read back when a node starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedState {
    /// Rooms by name.
    pub rooms: HashMap<String, RoomState>,
    /// (user, Unix seconds) revocations.
    pub revocations: Vec<(String, u64)>,
}

/// The pipeline of `slot` in `pipes`, started (atomic on one Redis) if new.
fn pipeline_for(pipes: &mut Vec<(String, redis::Pipeline)>, slot: String, atomic: bool) -> &mut redis::Pipeline {
    let i = match pipes.iter().position(|(s, _)| *s == slot) {
        Some(i) => i,
        None => {
            let mut pipe = redis::pipe();
            if atomic {
                pipe.atomic();
            }
            pipes.push((slot, pipe));
            pipes.len() - 1
        }
    };
    &mut pipes[i].1
}

fn malformed(what: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Parse, "malformed chatd state", what))
}

/// `field → encoded record` of a hash, decoded and sorted by field.
fn decode_all<T: prost::Message + Default>(
    key: &str,
    raw: HashMap<String, Vec<u8>>,
) -> Result<Vec<(String, T)>, RedisError> {
    let mut out = raw
        .into_iter()
        .map(|(user, v)| {
            T::decode(&v[..]).map(|r| (user.clone(), r)).map_err(|e| malformed(format!("{key} {user}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl RedisLog {
    /// Writes `writes` (in order). Fails as a whole only on one Redis; on
    /// a Redis Cluster a failure may leave a prefix, which the same batch
    /// written again completes.
    pub async fn write_state(&self, writes: &[StateWrite<'_>]) -> Result<(), RedisError> {
        // One pipeline per slot: a Redis Cluster refuses a pipeline whose
        // keys cross slots. On one Redis, one pipeline in one MULTI.
        let mut pipes: Vec<(String, redis::Pipeline)> = Vec::new();
        let single = !self.target.is_cluster();
        macro_rules! on {
            ($slot:expr) => {
                pipeline_for(&mut pipes, if single { String::new() } else { $slot }, single)
            };
        }
        for w in writes {
            match w {
                StateWrite::Details { room, details } => {
                    on!(room_key(room, "")).set(room_key(room, "details"), details.encode_to_vec()).ignore();
                    on!(ROOMS.into()).sadd(ROOMS, *room).ignore();
                }
                StateWrite::Member { room, user, record } => {
                    let pipe = on!(room_key(room, ""));
                    pipe.hset(room_key(room, "records"), *user, record.encode_to_vec()).ignore();
                    if record.role > 0 {
                        pipe.hset(room_key(room, "members"), *user, record.role).ignore();
                        on!(rooms_of(user)).sadd(rooms_of(user), *room).ignore();
                    } else {
                        pipe.hdel(room_key(room, "members"), *user).ignore();
                        on!(rooms_of(user)).srem(rooms_of(user), *room).ignore();
                    }
                }
                StateWrite::Ban { room, user, ban: Some(b) } => {
                    on!(room_key(room, "")).hset(room_key(room, "bans"), *user, b.encode_to_vec()).ignore();
                }
                StateWrite::Ban { room, user, ban: None } => {
                    on!(room_key(room, "")).hdel(room_key(room, "bans"), *user).ignore();
                }
                StateWrite::Invite { room, user, invite: Some(i) } => {
                    let pipe = on!(room_key(room, ""));
                    pipe.hset(room_key(room, "invites"), *user, i.encode_to_vec()).ignore();
                    pipe.hdel(room_key(room, "ended"), *user).ignore();
                    on!(invites_of(user)).sadd(invites_of(user), *room).ignore();
                }
                StateWrite::Invite { room, user, invite: None } => {
                    on!(room_key(room, "")).hdel(room_key(room, "invites"), *user).ignore();
                    on!(invites_of(user)).srem(invites_of(user), *room).ignore();
                }
                StateWrite::InviteEnded { room, user, reason, by } => {
                    on!(room_key(room, "")).hset(room_key(room, "ended"), *user, format!("{reason}:{by}")).ignore();
                }
                StateWrite::ReadMarker { room, user, pos } => {
                    on!(room_key(room, "")).hset(room_key(room, "reads"), *user, pos.encode().to_vec()).ignore();
                }
                StateWrite::Revocation { user, secs } => {
                    on!(REVOKED.into()).hset(REVOKED, *user, *secs).ignore();
                }
            }
        }
        let mut conn = self.connection();
        for (_, pipe) in pipes {
            pipe.exec_async(&mut conn).await?;
        }
        // Then the nodes that serve the rooms read them again (not for a
        // read marker: a session's next Hello reads those).
        let notified = writes.iter().filter(|w| !matches!(w, StateWrite::ReadMarker { .. }));
        let mut rooms: Vec<String> = Vec::new();
        // Every node keeps every room's details, members and bans (the
        // directory, and a room's first use there, read them); the nodes
        // that do not serve a room hear of its changes on the registry.
        let mut registry: Vec<&str> = Vec::new();
        for w in notified {
            rooms.extend(w.room().map(str::to_string));
            if let StateWrite::Details { room, .. } | StateWrite::Member { room, .. } | StateWrite::Ban { room, .. } = w
            {
                registry.push(room);
            }
            // The invitee's or member's own nodes, which may not serve the
            // room yet.
            if let StateWrite::Member { user, .. }
            | StateWrite::Invite { user, .. }
            | StateWrite::InviteEnded { user, .. } = w
            {
                rooms.push(user_channel(user));
            }
        }
        rooms.sort_unstable();
        rooms.dedup();
        let publish = if self.target.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        for room in rooms {
            redis::cmd(publish).arg(room_key(&room, "ch")).arg(super::feed::STATE_NOTICE).exec_async(&mut conn).await?;
        }
        registry.sort_unstable();
        registry.dedup();
        for room in registry {
            redis::cmd(publish).arg(room_key(REGISTRY_CHANNEL, "ch")).arg(room).exec_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Takes `room`'s change lock for `ttl_ms` as `token`; false if
    /// another node holds it.
    pub async fn lock_room(&self, room: &str, token: &str, ttl_ms: u64) -> Result<bool, RedisError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(room_key(room, "lock"))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.connection())
            .await?;
        Ok(set.is_some())
    }

    /// Releases `room`'s change lock if `token` still holds it.
    pub async fn unlock_room(&self, room: &str, token: &str) -> Result<(), RedisError> {
        const RELEASE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        redis::Script::new(RELEASE)
            .key(room_key(room, "lock"))
            .arg(token)
            .invoke_async::<i64>(&mut self.connection())
            .await
            .map(|_| ())
    }

    /// `user`'s read marker in `room`, if they have one.
    pub async fn read_marker(&self, room: &str, user: &str) -> Result<Option<ReadPos>, RedisError> {
        let raw: Option<Vec<u8>> =
            redis::cmd("HGET").arg(room_key(room, "reads")).arg(user).query_async(&mut self.connection()).await?;
        raw.map(|v| ReadPos::decode(&v).ok_or_else(|| malformed(format!("{} {user}", room_key(room, "reads")))))
            .transpose()
    }

    /// `user`'s membership record of `room` (a departure's says how it
    /// ended), if they ever had one.
    pub async fn member_record(&self, room: &str, user: &str) -> Result<Option<MemberRecord>, RedisError> {
        let raw: Option<Vec<u8>> =
            redis::cmd("HGET").arg(room_key(room, "records")).arg(user).query_async(&mut self.connection()).await?;
        raw.map(|v| {
            MemberRecord::decode(&v[..]).map_err(|e| malformed(format!("{} {user}: {e}", room_key(room, "records"))))
        })
        .transpose()
    }

    /// Every room's name.
    pub async fn room_names(&self) -> Result<Vec<String>, RedisError> {
        redis::cmd("SMEMBERS").arg(ROOMS).query_async(&mut self.connection()).await
    }

    /// The rooms `user` is a member of, sorted.
    pub async fn rooms_of(&self, user: &str) -> Result<Vec<String>, RedisError> {
        let mut rooms: Vec<String> =
            redis::cmd("SMEMBERS").arg(rooms_of(user)).query_async(&mut self.connection()).await?;
        rooms.sort();
        Ok(rooms)
    }

    /// When `user` signed out everywhere (Unix seconds), if they did.
    pub async fn revoked_at(&self, user: &str) -> Result<Option<u64>, RedisError> {
        redis::cmd("HGET").arg(REVOKED).arg(user).query_async(&mut self.connection()).await
    }

    /// The rooms with a pending invitation for `user`.
    pub async fn invitations_of(&self, user: &str) -> Result<Vec<String>, RedisError> {
        let mut rooms: Vec<String> =
            redis::cmd("SMEMBERS").arg(invites_of(user)).query_async(&mut self.connection()).await?;
        rooms.sort();
        Ok(rooms)
    }

    /// Reads one room's state; `None` for a room never created.
    pub async fn room_state(&self, room: &str) -> Result<Option<RoomState>, RedisError> {
        let mut conn = self.connection();
        type Records = HashMap<String, Vec<u8>>;
        /// Details, head, then the record hashes, then `:ended`.
        type Read = (Option<Vec<u8>>, Option<u64>, Records, Records, Records, Records, HashMap<String, String>);
        let (details, head, records, bans, invites, reads, ended): Read = redis::pipe()
            .get(room_key(room, "details"))
            .hget(room_key(room, "meta"), "head")
            .hgetall(room_key(room, "records"))
            .hgetall(room_key(room, "bans"))
            .hgetall(room_key(room, "invites"))
            .hgetall(room_key(room, "reads"))
            .hgetall(room_key(room, "ended"))
            .query_async(&mut conn)
            .await?;
        let Some(details) = details else { return Ok(None) };
        let key = |part| room_key(room, part);
        let mut reads = reads
            .into_iter()
            .map(|(user, v)| {
                ReadPos::decode(&v)
                    .map(|p| (user.clone(), p))
                    .ok_or_else(|| malformed(format!("{} {user}", key("reads"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        reads.sort_by(|a, b| a.0.cmp(&b.0));
        let mut ended: Vec<(String, (i32, String))> = ended
            .into_iter()
            .filter_map(|(user, v)| {
                let (reason, by) = v.split_once(':')?;
                Some((user, (reason.parse().ok()?, by.to_string())))
            })
            .collect();
        ended.sort();
        Ok(Some(RoomState {
            details: RoomDetails::decode(&details[..]).map_err(|e| malformed(format!("{}: {e}", key("details"))))?,
            head: head.unwrap_or(0),
            records: decode_all(&key("records"), records)?,
            bans: decode_all(&key("bans"), bans)?,
            invites: decode_all(&key("invites"), invites)?,
            ended,
            reads,
        }))
    }

    /// Reads every room's state and the revocations.
    pub async fn load_state(&self) -> Result<SharedState, RedisError> {
        let mut conn = self.connection();
        let names: Vec<String> = redis::cmd("SMEMBERS").arg(ROOMS).query_async(&mut conn).await?;
        let mut rooms = HashMap::with_capacity(names.len());
        for name in names {
            // A name whose details are missing was registered by a write
            // that failed half-way: the room was never created.
            if let Some(state) = self.room_state(&name).await? {
                rooms.insert(name, state);
            }
        }
        let revoked: HashMap<String, u64> = redis::cmd("HGETALL").arg(REVOKED).query_async(&mut conn).await?;
        let mut revocations: Vec<(String, u64)> = revoked.into_iter().collect();
        revocations.sort();
        Ok(SharedState { rooms, revocations })
    }
}
