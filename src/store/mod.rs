//! Storage: the durable per-room logs and the state beside them.
//!
//! Everything that must survive a restart goes through [`Store`]: message
//! appends, rooms with their details, members and roles, bans and
//! invitations ([`rooms`]), read markers and the idempotency window.
//! Writes arrive as one [`Batch`] per group commit ([`commit`]), so a batch is
//! one sync, whatever the number of rooms in it. Reads (`read_range`,
//! `lookup_idempotent`) are point or range lookups that never wait for the
//! writer.
//!
//! Two implementations: [`sled::SledStore`] (the server's; ARCHITECTURE.md, "Storage") and
//! [`memory::MemoryStore`] (tests and benches).

pub mod commit;
pub mod fold;
pub mod idem;
pub mod memory;
pub mod redis;
pub mod retention;
pub mod rooms;
pub mod sled;

use bytes::Bytes;

pub use self::fold::{Counts, DeletedRecord, Entry, Target};
pub use self::retention::{Trim, TrimRecord};
pub use self::rooms::{BanRecord, InviteRecord, MemberRecord, RoomDetails, RoomWrite};

/// A room's numeric id: the prefix of its messages' keys.
pub type RoomId = u64;

/// Errors from the storage layer. The source error is kept in the message so
/// logs say what went wrong underneath.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("storage failed: {0}")]
    Db(String),
    /// A file next to the database (the data file being synced) failed.
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// Another process (a running chatd) holds the store's lock.
    #[error("data directory {0} is in use by another process (is chatd already running?)")]
    InUse(String),
    /// The data directory holds something that is not a chatd store, or a
    /// value could not be decoded.
    #[error("data directory is not a usable chatd store: {0}")]
    Corrupt(String),
}

/// One message appended to a room's log.
#[derive(Clone, Debug)]
pub struct Append {
    /// Room the message belongs to.
    pub room: RoomId,
    /// Its sequence number, assigned by the room (contiguous from 1).
    pub seq: u64,
    /// The protobuf encoding of the `Message` as delivered to clients.
    pub message: Bytes,
    /// The first half of the idempotency key: [`idempotency_owner`] of the
    /// message's sender and room.
    pub sender: String,
    /// Client idempotency key; empty when the client gave none.
    pub client_msg_id: String,
    /// Server timestamp (Unix ms), kept with the idempotency record.
    pub ts_ms: u64,
    /// What the entry is, for the state kept beside the log ([`fold`]).
    pub entry: Entry,
}

/// What an earlier publish with the same sender and `client_msg_id` got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// Room it was published to.
    pub room: RoomId,
    /// Seq it was given.
    pub seq: u64,
    /// Its server timestamp.
    pub ts_ms: u64,
}

/// A read marker's new position.
#[derive(Clone, Debug)]
pub struct ReadMarker {
    /// User id.
    pub user: String,
    /// Room id.
    pub room: RoomId,
    /// Highest seq the user has read, with the counts through it.
    pub pos: ReadPos,
}

/// A read marker and what the log held through it, which unread counts
/// start from (ARCHITECTURE.md, "Unread counts").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadPos {
    /// Highest seq read.
    pub seq: u64,
    /// Messages (not change entries) with seq <= `seq`.
    pub messages: u64,
    /// Of those, the user's own.
    pub sent: u64,
    /// Of those, by others and mentioning the user.
    pub mentioned: u64,
}

impl ReadPos {
    /// 32 bytes: the four fields, u64 BE each.
    pub fn encode(&self) -> [u8; 32] {
        encode_u64s(&[self.seq, self.messages, self.sent, self.mentioned])
    }

    /// Inverse of [`ReadPos::encode`].
    pub fn decode(v: &[u8]) -> Option<Self> {
        let [seq, messages, sent, mentioned] = decode_u64s(v)?;
        Some(ReadPos { seq, messages, sent, mentioned })
    }
}

/// Everything one group commit writes.
#[derive(Default, Debug)]
pub struct Batch {
    /// Message appends, in seq order within each room.
    pub appends: Vec<Append>,
    /// Changes to rooms' details, members, bans and invitations.
    pub rooms: Vec<RoomWrite>,
    /// Read-marker moves.
    pub read_markers: Vec<ReadMarker>,
    /// Users signed out everywhere: (user, Unix seconds); tokens issued
    /// before are refused from then on.
    pub revocations: Vec<(String, u64)>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty() && self.rooms.is_empty() && self.read_markers.is_empty() && self.revocations.is_empty()
    }
}

/// A room as recovered at start.
#[derive(Clone, Debug)]
pub struct RoomRecord {
    /// Room name.
    pub name: String,
    /// Room id.
    pub id: RoomId,
    /// Seq of the last message in its log (0 when empty).
    pub head: u64,
    /// Kind, title, topic, creator.
    pub details: RoomDetails,
}

/// The state recovered at start.
#[derive(Default, Debug)]
pub struct Snapshot {
    /// Every room ever created.
    pub rooms: Vec<RoomRecord>,
    /// (user, room, record) of current members.
    pub memberships: Vec<(String, RoomId, MemberRecord)>,
    /// (room, user, ban) bans in force.
    pub bans: Vec<(RoomId, String, BanRecord)>,
    /// (invitee, room, invitation) pending invitations.
    pub invites: Vec<(String, RoomId, InviteRecord)>,
    /// (user, room, position) read markers.
    pub read_markers: Vec<(String, RoomId, ReadPos)>,
    /// (room, user, counters); user "" holds the room's count of change
    /// entries in `sent`.
    pub counts: Vec<(RoomId, String, Counts)>,
    /// (room, seq, who sent it) of deleted messages.
    pub deleted: Vec<(RoomId, u64, DeletedRecord)>,
    /// (user, Unix seconds) revocations: tokens issued before are refused.
    pub revocations: Vec<(String, u64)>,
    /// Where the logs of rooms that retention trimmed start.
    pub trims: Vec<(RoomId, TrimRecord)>,
}

/// The storage interface of the data path.
///
/// `write` and `sync` are called from one writer at a time (the group commit),
/// on a blocking thread — or, for a small batch that no sync follows, on a
/// runtime worker ([`commit`]), so a small `write` must not block for long;
/// reads may come from any thread concurrently.
pub trait Store: Send + Sync + 'static {
    /// Recovers rooms with their heads and details, memberships, bans,
    /// invitations and read markers.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// How `user`'s membership of `room` ended, if it did (a record with
    /// `role = 0`); `None` for a current member or one who never was.
    fn departure(&self, user: &str, room: RoomId) -> Result<Option<MemberRecord>, StoreError>;

    /// Applies a batch. After `write` the data is visible to readers; it is
    /// durable only after `sync`.
    fn write(&self, batch: &Batch) -> Result<(), StoreError>;

    /// Makes everything written so far durable (flush + fdatasync).
    fn sync(&self) -> Result<(), StoreError>;

    /// Checks that a write can be made durable now (after a failure). A
    /// store that cannot recover in place may reopen itself here.
    fn probe(&self) -> Result<(), StoreError> {
        self.sync()
    }

    /// Removes the messages of `room` with `seq >= from`, and the
    /// idempotency records that point at them; returns how many messages.
    /// After a failed group commit the writer calls this for every room the
    /// batch touched: the batch may be partly in the store although it was
    /// never acknowledged, and its seqs are about to be handed out again.
    fn truncate(&self, room: RoomId, from: u64) -> Result<usize, StoreError>;

    /// The `Message`s of `room` with `from <= seq <= to`, ascending, each
    /// with its latest state folded in as `viewer` sees it
    /// ([`fold::fold_all`]): as stored when nothing changed it.
    fn read_folded(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<fold::Folded>, StoreError>;

    /// [`Store::read_folded`], encoded: what catch-up and resume send.
    fn read_range(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<Bytes>, StoreError> {
        Ok(self.read_folded(room, from, to, viewer)?.into_iter().map(fold::Folded::encoded).collect())
    }

    /// [`Store::read_folded`], decoded: what a history page holds (a
    /// folded message is not encoded only to be decoded again).
    fn read_messages(
        &self,
        room: RoomId,
        from: u64,
        to: u64,
        viewer: &str,
    ) -> Result<Vec<crate::proto::Message>, StoreError> {
        self.read_folded(room, from, to, viewer)?.into_iter().map(fold::Folded::decoded).collect()
    }

    /// The message at `seq` as the target of a change (committed state).
    fn target(&self, room: RoomId, seq: u64) -> Result<Option<Target>, StoreError>;

    /// Whether `user` has reacted with `key` to the message at `seq`.
    fn has_reaction(&self, room: RoomId, seq: u64, key: &str, user: &str) -> Result<bool, StoreError>;

    /// The record of an earlier publish with this sender and key, if it is
    /// still in the window.
    fn lookup_idempotent(&self, sender: &str, client_msg_id: &str) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Drops idempotency records older than `before_ts_ms`; returns how many.
    fn expire_idempotency(&self, before_ts_ms: u64) -> Result<usize, StoreError>;

    /// Removes the oldest entries of `room` as `trim` allows, with what is
    /// kept beside them; returns where the log now starts. Called by one
    /// task at a time ([`crate::hub`]'s retention), never with a head above
    /// the room's dispatched one. Readers must not ask for seqs below the
    /// start it returns.
    fn trim(&self, room: RoomId, trim: &Trim) -> Result<TrimRecord, StoreError>;

    /// Bytes the store occupies on disk (0 for memory).
    fn size_on_disk(&self) -> u64;
}

/// Whose idempotency window a message's `client_msg_id` is in: its
/// sender's, or for a message of the system (sender "") the room's own,
/// `:room` (no user id contains ':'), so the system's keys are per room.
pub fn idempotency_owner<'a>(sender: &'a str, room: &str) -> std::borrow::Cow<'a, str> {
    if sender.is_empty() { std::borrow::Cow::Owned(format!(":{room}")) } else { std::borrow::Cow::Borrowed(sender) }
}

/// Key of a message: `room_id (u64 BE) ‖ seq (u64 BE)`, so one room's log is a
/// contiguous, ordered key range.
pub fn message_key(room: RoomId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&room.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Key of a per-user record: `user ‖ 0x00 ‖ suffix`. User ids never contain
/// a NUL byte (see `auth::valid_user_id`), so one user's records form a
/// prefix range that no other user's share.
pub fn user_key(user: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1 + suffix.len());
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

/// Splits a key made by [`user_key`].
pub fn split_user_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let nul = key.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&key[..nul]).ok()?, &key[nul + 1..]))
}

/// `ns` as big-endian u64s back to back: the fixed-size records of the
/// store (`B` must be 8 × `ns.len()`).
pub fn encode_u64s<const B: usize>(ns: &[u64]) -> [u8; B] {
    debug_assert_eq!(B, ns.len() * 8, "a record of {} u64s in {B} bytes", ns.len());
    let mut v = [0u8; B];
    for (chunk, n) in v.chunks_exact_mut(8).zip(ns) {
        chunk.copy_from_slice(&n.to_be_bytes());
    }
    v
}

/// Inverse of [`encode_u64s`]: `None` unless `v` holds exactly `N` u64s.
pub fn decode_u64s<const N: usize>(v: &[u8]) -> Option<[u64; N]> {
    if v.len() != N * 8 {
        return None;
    }
    let mut ns = [0u64; N];
    for (n, chunk) in ns.iter_mut().zip(v.chunks_exact(8)) {
        *n = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
    }
    Some(ns)
}

impl IdempotencyRecord {
    /// Fixed 24-byte encoding: room, seq, ts (u64 BE each). The value of the
    /// sled store's per-key records in its previous format, read when such a
    /// store is upgraded.
    pub fn encode(&self) -> [u8; 24] {
        encode_u64s(&[self.room, self.seq, self.ts_ms])
    }

    /// Inverse of [`IdempotencyRecord::encode`].
    pub fn decode(v: &[u8]) -> Option<Self> {
        let [room, seq, ts_ms] = decode_u64s(v)?;
        Some(IdempotencyRecord { room, seq, ts_ms })
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! Behaviour every `Store` must have; run against each implementation.

    use std::collections::HashMap;

    use super::*;

    /// The encoded message `append` stores; its text names room and seq.
    pub fn encoded(room: RoomId, seq: u64, sender: &str, cmid: &str) -> Bytes {
        use prost::Message as _;
        let m = crate::proto::Message {
            room: format!("room{room}"),
            seq,
            sender: sender.into(),
            ts_ms: 1000 + seq,
            client_msg_id: cmid.into(),
            text: format!("m{room}-{seq}"),
            ..Default::default()
        };
        Bytes::from(m.encode_to_vec())
    }

    pub fn append(room: RoomId, seq: u64, sender: &str, cmid: &str) -> Append {
        Append {
            room,
            seq,
            message: encoded(room, seq, sender, cmid),
            sender: sender.into(),
            client_msg_id: cmid.into(),
            ts_ms: 1000 + seq,
            entry: Entry::Message { user: sender.into(), mentions: Vec::new() },
        }
    }

    pub fn details(kind: crate::proto::RoomKind, by: &str) -> RoomDetails {
        RoomDetails { kind: kind as i32, created_by: by.into(), created_ms: 5, ..Default::default() }
    }

    pub fn member(user: &str, room: RoomId, role: crate::proto::Role) -> RoomWrite {
        RoomWrite::Member {
            user: user.into(),
            room,
            record: MemberRecord { role: role as i32, since: 9, ..Default::default() },
        }
    }

    pub fn exercise(store: &dyn Store) {
        use crate::proto::{MemberChange, Role, RoomKind};
        let mut b = Batch::default();
        b.rooms.push(RoomWrite::Details { room: 1, name: "general".into(), details: details(RoomKind::Public, "ann") });
        b.rooms.push(member("ann", 1, Role::Owner));
        b.rooms.push(member("bob", 1, Role::Member));
        b.rooms.push(RoomWrite::Details {
            room: 2,
            name: "dm:ann:bob".into(),
            details: details(RoomKind::Direct, "ann"),
        });
        b.rooms.push(member("ann", 2, Role::Member));
        b.rooms.push(RoomWrite::Ban {
            room: 1,
            user: "eve".into(),
            ban: Some(BanRecord { by: "ann".into(), reason: "spam".into(), ts_ms: 3 }),
        });
        b.rooms.push(RoomWrite::Ban { room: 1, user: "mal".into(), ban: Some(BanRecord::default()) });
        b.rooms.push(RoomWrite::Invite {
            user: "cat".into(),
            room: 1,
            invite: Some(InviteRecord { by: "bob".into(), ts_ms: 4 }),
        });
        b.rooms.push(RoomWrite::Invite { user: "dan".into(), room: 1, invite: Some(InviteRecord::default()) });
        for seq in 1..=5 {
            b.appends.push(append(1, seq, "ann", &format!("c{seq}")));
        }
        b.appends.push(append(2, 1, "bob", ""));
        let pos = ReadPos { seq: 3, messages: 3, sent: 0, mentioned: 0 };
        b.read_markers.push(ReadMarker { user: "bob".into(), room: 1, pos });
        b.revocations.push(("eve".into(), 100));
        store.write(&b).unwrap();
        store.sync().unwrap();

        let got = store.read_range(1, 2, 4, "").unwrap();
        let want: Vec<Bytes> = (2..=4).map(|s| encoded(1, s, "ann", &format!("c{s}"))).collect();
        assert_eq!(got, want);
        assert!(store.read_range(1, 6, 9, "").unwrap().is_empty());
        assert_eq!(
            store.lookup_idempotent("ann", "c2").unwrap(),
            Some(IdempotencyRecord { room: 1, seq: 2, ts_ms: 1002 })
        );
        assert_eq!(store.lookup_idempotent("bob", "c2").unwrap(), None);

        let mut leave = Batch::default();
        let removed = MemberRecord { reason: MemberChange::Removed as i32, by: "ann".into(), ..Default::default() };
        leave.rooms.push(RoomWrite::Member { user: "bob".into(), room: 1, record: removed.clone() });
        leave.rooms.push(RoomWrite::Ban { room: 1, user: "mal".into(), ban: None });
        leave.rooms.push(RoomWrite::Invite { user: "dan".into(), room: 1, invite: None });
        let retitled = RoomDetails { title: "General".into(), ..details(RoomKind::Public, "ann") };
        leave.rooms.push(RoomWrite::Details { room: 1, name: "general".into(), details: retitled.clone() });
        store.write(&leave).unwrap();

        let snap = store.load().unwrap();
        let mut rooms: Vec<_> = snap.rooms.iter().map(|r| (r.name.clone(), r.id, r.head, r.details.clone())).collect();
        rooms.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            rooms,
            vec![("dm:ann:bob".into(), 2, 1, details(RoomKind::Direct, "ann")), ("general".into(), 1, 5, retitled)]
        );
        let mut members: Vec<_> = snap.memberships.iter().map(|(u, r, m)| (u.clone(), *r, m.role)).collect();
        members.sort();
        assert_eq!(members, vec![("ann".into(), 1, Role::Owner as i32), ("ann".into(), 2, Role::Member as i32)]);
        assert_eq!(snap.bans, vec![(1, "eve".into(), BanRecord { by: "ann".into(), reason: "spam".into(), ts_ms: 3 })]);
        assert_eq!(snap.invites, vec![("cat".into(), 1, InviteRecord { by: "bob".into(), ts_ms: 4 })]);
        assert_eq!(store.departure("bob", 1).unwrap(), Some(removed));
        assert_eq!(store.departure("ann", 1).unwrap(), None, "a member");
        assert_eq!(store.departure("zed", 1).unwrap(), None, "never a member");
        assert_eq!(snap.read_markers, vec![("bob".into(), 1, pos)]);
        let mut counts: Vec<_> = snap.counts.iter().map(|(r, u, c)| (*r, u.clone(), c.sent)).collect();
        counts.sort();
        assert_eq!(counts, vec![(1, "ann".into(), 5), (2, "bob".into(), 1)]);
        assert_eq!(snap.revocations, vec![("eve".into(), 100)]);

        assert_eq!(store.expire_idempotency(1003).unwrap(), 2);
        assert_eq!(store.lookup_idempotent("ann", "c1").unwrap(), None);
        assert!(store.lookup_idempotent("ann", "c3").unwrap().is_some());

        // A failed commit's tail goes, with its idempotency records; other
        // rooms and earlier messages stay.
        assert_eq!(store.truncate(1, 4).unwrap(), 2);
        assert_eq!(store.read_range(1, 1, 10, "").unwrap().len(), 3);
        assert_eq!(store.lookup_idempotent("ann", "c4").unwrap(), None);
        assert!(store.lookup_idempotent("ann", "c3").unwrap().is_some());
        assert_eq!(store.read_range(2, 1, 1, "").unwrap().len(), 1);
        assert_eq!(store.truncate(1, 4).unwrap(), 0);
        let heads: Vec<_> = store.load().unwrap().rooms.iter().map(|r| (r.id, r.head)).collect();
        assert!(heads.contains(&(1, 3)) && heads.contains(&(2, 1)), "{heads:?}");
        changes(store);
        trims(store);
    }

    /// A change entry by `user` of `kind` to `target`, at `seq` of room 3.
    pub fn change(seq: u64, user: &str, target: u64, kind: crate::proto::ChangeKind, text: &str) -> Append {
        use prost::Message as _;
        let m = crate::proto::Message {
            room: "room3".into(),
            seq,
            sender: user.into(),
            ts_ms: 2000 + seq,
            text: text.into(),
            change: Some(crate::proto::MessageChange { target_seq: target, kind: kind as i32, key: "+1".into() }),
            ..Default::default()
        };
        Append {
            room: 3,
            seq,
            message: Bytes::from(m.encode_to_vec()),
            sender: user.into(),
            client_msg_id: String::new(),
            ts_ms: 2000 + seq,
            entry: Entry::Change { user: user.into(), target, kind, key: "+1".into() },
        }
    }

    /// Retention: the start moves, entries and their reactions below it go,
    /// the head stays (also with every entry gone), writing goes on.
    fn trims(store: &dyn Store) {
        use crate::proto::ChangeKind;
        let mut b = Batch::default();
        b.rooms.push(RoomWrite::Details { room: 3, name: "trimmed".into(), details: RoomDetails::default() });
        for seq in 1..=6 {
            b.appends.push(append(3, seq, "ann", ""));
        }
        b.appends.push(change(7, "bob", 2, ChangeKind::ReactionAdd, ""));
        b.appends.push(change(8, "bob", 5, ChangeKind::ReactionAdd, ""));
        store.write(&b).unwrap();
        store.sync().unwrap();
        let seqs = |from, to| -> Vec<u64> {
            let msgs = store.read_messages(3, from, to, "bob").unwrap();
            msgs.iter().map(|m| m.seq).collect()
        };
        let rec = store.trim(3, &Trim { keep_from: 4, older_than_ms: 0, head: 8 }).unwrap();
        assert_eq!((rec.start(), rec.messages), (4, 3));
        assert_eq!(rec.read_pos("ann").sent, 3);
        assert_eq!(seqs(4, 8), vec![4, 5, 6, 7, 8]);
        assert_eq!(seqs(1, 8), vec![4, 5, 6, 7, 8], "nothing below the start");
        assert!(!store.has_reaction(3, 2, "+1", "bob").unwrap(), "its reactions went with it");
        assert!(store.has_reaction(3, 5, "+1", "bob").unwrap());
        assert!(store.target(3, 2).unwrap().is_none());
        // By age: appends are stamped 1000 + seq, changes 2000 + seq.
        let rec = store.trim(3, &Trim { keep_from: 0, older_than_ms: 1006, head: 8 }).unwrap();
        assert_eq!(rec.start(), 6);
        let again = store.trim(3, &Trim { keep_from: 0, older_than_ms: 1006, head: 8 }).unwrap();
        assert_eq!(again, rec, "a trim with nothing to do changes nothing");
        let rec = store.trim(3, &Trim { keep_from: 100, older_than_ms: 0, head: 8 }).unwrap();
        assert_eq!((rec.start(), rec.messages), (9, 6));
        assert_eq!(seqs(1, 8), Vec::<u64>::new());
        let snap = store.load().unwrap();
        let room = snap.rooms.iter().find(|r| r.id == 3).unwrap();
        assert_eq!(room.head, 8, "seqs are never reused");
        assert_eq!(snap.trims.iter().find(|(r, _)| *r == 3).map(|(_, t)| t.start()), Some(9));
        let mut b = Batch::default();
        b.appends.push(append(3, 9, "ann", ""));
        store.write(&b).unwrap();
        assert_eq!(seqs(1, 9), vec![9]);
    }

    fn decoded(store: &dyn Store, seq: u64, viewer: &str) -> crate::proto::Message {
        use prost::Message as _;
        crate::proto::Message::decode(store.read_range(3, seq, seq, viewer).unwrap()[0].as_ref()).unwrap()
    }

    /// Changes fold into their targets, and a failed commit's changes are
    /// taken back with its entries.
    fn changes(store: &dyn Store) {
        use crate::proto::ChangeKind;
        let mut b = Batch::default();
        b.appends.push(append(3, 1, "ann", ""));
        b.appends.push(append(3, 2, "ann", ""));
        b.appends.push(change(3, "bob", 1, ChangeKind::ReactionAdd, ""));
        store.write(&b).unwrap();
        store.sync().unwrap();
        assert!(store.has_reaction(3, 1, "+1", "bob").unwrap());
        let t = store.target(3, 1).unwrap().unwrap();
        assert_eq!(
            (t.sender.as_str(), t.is_change, t.deleted, t.keys.clone()),
            ("ann", false, false, vec![("+1".into(), 1)])
        );
        assert!(store.target(3, 3).unwrap().unwrap().is_change);
        assert!(store.target(3, 9).unwrap().is_none());
        let m = decoded(store, 1, "bob");
        assert_eq!((m.reactions.len(), m.reactions[0].mine, m.folded_seq), (1, true, 3));
        assert!(!decoded(store, 1, "ann").reactions[0].mine);

        // A batch that edits 1 and deletes 2 fails: taken back whole.
        let mut failed = Batch::default();
        failed.appends.push(change(4, "ann", 1, ChangeKind::Edit, "edited"));
        failed.appends.push(change(5, "ann", 2, ChangeKind::Delete, ""));
        failed.appends.push(append(3, 6, "ann", ""));
        store.write(&failed).unwrap();
        assert_eq!(decoded(store, 1, "").text, "edited");
        assert!(decoded(store, 2, "").deleted);
        assert_eq!(store.truncate(3, 4).unwrap(), 3);
        let (one, two) = (decoded(store, 1, ""), decoded(store, 2, ""));
        assert_eq!((one.text.as_str(), one.edited_ms, one.folded_seq), ("m3-1", 0, 3), "the edit is taken back");
        assert!(!two.deleted && two.text == "m3-2", "the deleted content is back: {two:?}");
        let snap = store.load().unwrap();
        let counts: HashMap<&str, Counts> =
            snap.counts.iter().filter(|(r, _, _)| *r == 3).map(|(_, u, c)| (u.as_str(), *c)).collect();
        assert_eq!(counts["ann"].sent, 2, "the failed batch's message is not counted");
        assert_eq!(counts[""].sent, 1, "one change entry");
        assert!(snap.deleted.iter().all(|(r, _, _)| *r != 3));
    }
}
