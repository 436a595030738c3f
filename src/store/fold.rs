//! The state the store keeps beside a room's log so that reading it stays
//! one pass (ARCHITECTURE.md, "Message changes"): per changed message a
//! *fold* (its latest content, whether it is deleted, its reactions by
//! key), per reaction a record, per user and room the counters that unread
//! counts are computed from, and per deleted message who sent it and whom
//! it mentioned.
//!
//! Both stores apply a batch's entries here after writing them, in seq
//! order, with [`apply`]: it is idempotent (every record says how far it
//! has applied the log), so the sled store can run it again over the tail
//! of a batch that a crash cut short. Reading folds the record into each
//! message with [`view`]; validation reads [`target`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use super::{RoomId, StoreError, message_key};
use crate::proto::{self, ChangeKind};

/// How many users a reaction lists (the rest are counted).
pub const REACTION_USERS: usize = 20;

/// What an entry of a room's log is, for the state kept beside the log.
#[derive(Clone, Debug)]
pub enum Entry {
    /// A message by `user` ("" for the system) that mentions `mentions`.
    Message {
        /// The sender.
        user: Arc<str>,
        /// Mentioned user ids, deduplicated.
        mentions: Vec<String>,
    },
    /// A change by `user` to the message `target`.
    Change {
        /// Who made the change.
        user: Arc<str>,
        /// The changed message's seq.
        target: u64,
        /// What kind of change.
        kind: ChangeKind,
        /// The reaction key, for reactions.
        key: String,
    },
}

impl Entry {
    /// The entry a stored message is.
    pub fn of(m: &proto::Message) -> Entry {
        match &m.change {
            Some(c) => Entry::Change {
                user: m.sender.as_str().into(),
                target: c.target_seq,
                kind: c.kind(),
                key: c.key.clone(),
            },
            None => Entry::Message { user: m.sender.as_str().into(), mentions: m.mentions.clone() },
        }
    }
}

/// A changed message's folded state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FoldRecord {
    /// The last change entry applied.
    #[prost(uint64, tag = "1")]
    pub folded_seq: u64,
    /// When the last edit was made (0: never edited).
    #[prost(uint64, tag = "2")]
    pub edited_ms: u64,
    /// The text after the last edit.
    #[prost(string, tag = "3")]
    pub text: String,
    /// The data after the last edit.
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
    /// Seqs of the edit entries, erased with the message.
    #[prost(uint64, repeated, tag = "5")]
    pub edit_seqs: Vec<u64>,
    /// Deleted: its content is gone.
    #[prost(bool, tag = "6")]
    pub deleted: bool,
    /// By key, in the order keys were first used.
    #[prost(message, repeated, tag = "7")]
    pub reactions: Vec<ReactionRecord>,
}

/// One key's reactions on a message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReactionRecord {
    /// The reaction key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// How many users reacted with it.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// The earliest [`REACTION_USERS`] users.
    #[prost(string, repeated, tag = "3")]
    pub users: Vec<String>,
}

/// A user's counters in a room (or, for the user "", the room's own:
/// `sent` counts its change entries).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Counts {
    /// Messages the user sent (deleted ones included).
    pub sent: u64,
    /// Messages by others that mention the user (deleted ones included).
    pub mentioned: u64,
    /// The last seq applied to these counters.
    pub through: u64,
}

impl Counts {
    /// 24 bytes: the three fields, u64 BE each.
    pub fn encode(&self) -> [u8; 24] {
        super::encode_u64s(&[self.sent, self.mentioned, self.through])
    }

    /// Inverse of [`Counts::encode`].
    pub fn decode(v: &[u8]) -> Result<Self, StoreError> {
        let [sent, mentioned, through] = super::decode_u64s(v)
            .ok_or_else(|| StoreError::Corrupt(format!("a counters record of {} bytes", v.len())))?;
        Ok(Counts { sent, mentioned, through })
    }
}

/// Who sent a deleted message and whom it mentioned: what unread counts
/// subtract.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeletedRecord {
    /// Who sent the message.
    #[prost(string, tag = "1")]
    pub sender: String,
    /// Whom it mentioned.
    #[prost(string, repeated, tag = "2")]
    pub mentions: Vec<String>,
}

/// The state beside the log, as keyed records (the sled store's trees, the
/// memory store's maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// `room ‖ seq` → encoded `Message`.
    Messages,
    /// `room ‖ seq` → [`FoldRecord`].
    Folds,
    /// `room ‖ seq ‖ key ‖ 0 ‖ user` → seq of the entry that added it.
    Reactions,
    /// `room ‖ user ‖ 0 ‖ seq ‖ key` → nothing: one user's reactions in seq
    /// order, so a page learns which are the reader's (`mine`) in one scan.
    Reacted,
    /// `room ‖ user` → [`Counts`] (user "" for the room's own).
    Counts,
    /// `room ‖ seq` → [`DeletedRecord`].
    Deleted,
}

/// Records as a scan returns them: (key, value) in key order.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// One room's entries of a batch: (seq, what it is, its encoding).
pub type Run<'a> = Vec<(u64, &'a Entry, &'a Bytes)>;

/// Keyed access to the records of [`Side`].
pub trait Kv {
    /// The value at `key`.
    fn get(&mut self, side: Side, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key` to `value`.
    fn put(&mut self, side: Side, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Removes `key`.
    fn del(&mut self, side: Side, key: &[u8]) -> Result<(), StoreError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn prefix(&mut self, side: Side, prefix: &[u8]) -> Result<Records, StoreError>;
    /// Every record with `start <= key < end`, in key order.
    fn range(&mut self, side: Side, start: &[u8], end: &[u8]) -> Result<Records, StoreError>;
    /// Sets `key` to `value`, which replaces `before` (known to the caller).
    fn put_replacing(
        &mut self,
        side: Side,
        key: &[u8],
        value: &[u8],
        before: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let _ = before;
        self.put(side, key, value)
    }
}

/// Key of a user's counters in a room.
pub fn counts_key(room: RoomId, user: &str) -> Vec<u8> {
    let mut k = room.to_be_bytes().to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

/// Prefix of the reactions on one message with one key (or, with `key`
/// `None`, all of its reactions).
fn reaction_prefix(room: RoomId, seq: u64, key: Option<&str>) -> Vec<u8> {
    let mut k = message_key(room, seq).to_vec();
    if let Some(key) = key {
        k.extend_from_slice(key.as_bytes());
        k.push(0);
    }
    k
}

/// Prefix of `user`'s reactions in `room` ([`Side::Reacted`]), followed
/// by the seq from which on.
fn reacted_prefix(room: RoomId, user: &str, seq: u64) -> Vec<u8> {
    let mut k = counts_key(room, user);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Key of one user's reaction in [`Side::Reacted`].
fn reacted_key(room: RoomId, user: &str, seq: u64, key: &str) -> Vec<u8> {
    let mut k = reacted_prefix(room, user, seq);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The reactions of `viewer` on the messages `from..=to` of `room`: (seq,
/// key), in one scan.
pub fn reactions_of(
    kv: &mut dyn Kv,
    room: RoomId,
    viewer: &str,
    from: u64,
    to: u64,
) -> Result<std::collections::HashSet<(u64, String)>, StoreError> {
    let mut mine = std::collections::HashSet::new();
    if viewer.is_empty() {
        return Ok(mine);
    }
    let start = reacted_prefix(room, viewer, from);
    let end = reacted_prefix(room, viewer, to.saturating_add(1));
    let skip = start.len() - 8;
    for (k, _) in kv.range(Side::Reacted, &start, &end)? {
        let Some(seq) = k.get(skip..skip + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else { continue };
        mine.insert((seq, String::from_utf8_lossy(&k[skip + 8..]).into_owned()));
    }
    Ok(mine)
}

/// Removes what is kept beside the log for the entries of `room` below
/// `start` (retention trimmed them): their folds, reactions (with each
/// reactor's index) and deleted-message records. The counters stay: they
/// count from seq 1 ([`super::retention`]). Returns how many records.
pub fn forget_below(kv: &mut dyn Kv, room: RoomId, start: u64) -> Result<usize, StoreError> {
    let (from, to) = (message_key(room, 0), message_key(room, start));
    let mut removed = 0;
    for side in [Side::Folds, Side::Deleted] {
        for (k, _) in kv.range(side, &from, &to)? {
            kv.del(side, &k)?;
            removed += 1;
        }
    }
    for (k, _) in kv.range(Side::Reactions, &from, &to)? {
        let seq = k.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let rest = k.get(16..).unwrap_or_default();
        if let (Some(seq), Some(nul)) = (seq, rest.iter().position(|b| *b == 0)) {
            let key = String::from_utf8_lossy(&rest[..nul]);
            let user = String::from_utf8_lossy(&rest[nul + 1..]);
            kv.del(Side::Reacted, &reacted_key(room, &user, seq, &key))?;
        }
        kv.del(Side::Reactions, &k)?;
        removed += 1;
    }
    Ok(removed)
}

/// Key of one user's reaction.
pub fn reaction_key(room: RoomId, seq: u64, key: &str, user: &str) -> Vec<u8> {
    let mut k = reaction_prefix(room, seq, Some(key));
    k.extend_from_slice(user.as_bytes());
    k
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what} does not decode: {e}"))
}

fn fold_of(kv: &mut dyn Kv, room: RoomId, seq: u64) -> Result<Option<FoldRecord>, StoreError> {
    kv.get(Side::Folds, &message_key(room, seq))?
        .map(|v| FoldRecord::decode(v.as_slice()).map_err(|e| corrupt("a fold record", e)))
        .transpose()
}

fn message_of(kv: &mut dyn Kv, room: RoomId, seq: u64) -> Result<Option<proto::Message>, StoreError> {
    kv.get(Side::Messages, &message_key(room, seq))?
        .map(|v| proto::Message::decode(v.as_slice()).map_err(|e| corrupt("a message", e)))
        .transpose()
}

/// The counters as stored, by [`counts_key`], kept by a store between
/// batches so that raising them costs a write and no read.
pub type CountsCache = HashMap<Vec<u8>, Counts>;

/// Applies the entries of one room's run, in seq order: counters, folds,
/// erasure. Entries already applied (by a run before a crash) are skipped.
pub fn apply(
    kv: &mut dyn Kv,
    room: RoomId,
    entries: &[(u64, &Entry, &Bytes)],
    cache: &mut CountsCache,
) -> Result<(), StoreError> {
    // Counters are read once (from the cache when it has them) and written
    // once per run; the value they replace is what a failed batch's undo
    // puts back.
    let mut counts: HashMap<String, (Counts, Option<Vec<u8>>)> = HashMap::new();
    let mut bump = |kv: &mut dyn Kv, user: &str, seq: u64, f: &dyn Fn(&mut Counts)| -> Result<(), StoreError> {
        if !counts.contains_key(user) {
            let key = counts_key(room, user);
            let before = match cache.get(&key) {
                Some(c) => Some(c.encode().to_vec()),
                None => kv.get(Side::Counts, &key)?,
            };
            let c = before.as_deref().map(Counts::decode).transpose()?.unwrap_or_default();
            counts.insert(user.to_string(), (c, before));
        }
        let (c, _) = counts.get_mut(user).expect("inserted");
        if seq > c.through {
            f(c);
            c.through = seq;
        }
        Ok(())
    };
    // So are folds: a run of reactions to one message decodes and encodes
    // its fold once.
    let mut folds: HashMap<u64, FoldRecord> = HashMap::new();
    for &(seq, entry, bytes) in entries {
        match entry {
            Entry::Message { user, mentions } => {
                if !user.is_empty() {
                    bump(kv, user, seq, &|c| c.sent += 1)?;
                }
                for m in mentions.iter().filter(|m| **m != **user) {
                    bump(kv, m, seq, &|c| c.mentioned += 1)?;
                }
            }
            Entry::Change { user, target, kind, key } => {
                bump(kv, "", seq, &|c| c.sent += 1)?;
                if !folds.contains_key(target) {
                    folds.insert(*target, fold_of(kv, room, *target)?.unwrap_or_default());
                }
                let fold = folds.get_mut(target).expect("inserted");
                let change = Applied { room, seq, user, target: *target, kind: *kind, key };
                apply_change(kv, &change, bytes, fold)?;
            }
        }
    }
    for (target, fold) in folds {
        kv.put(Side::Folds, &message_key(room, target), &fold.encode_to_vec())?;
    }
    for (user, (c, before)) in counts {
        let key = counts_key(room, &user);
        kv.put_replacing(Side::Counts, &key, &c.encode(), before)?;
        cache.insert(key, c);
    }
    Ok(())
}

/// A change entry being applied.
struct Applied<'a> {
    room: RoomId,
    seq: u64,
    user: &'a str,
    target: u64,
    kind: ChangeKind,
    key: &'a str,
}

fn apply_change(kv: &mut dyn Kv, change: &Applied<'_>, bytes: &Bytes, fold: &mut FoldRecord) -> Result<(), StoreError> {
    let Applied { room, seq, user, target, kind, key } = *change;
    if seq <= fold.folded_seq {
        return Ok(());
    }
    fold.folded_seq = seq;
    if !fold.deleted {
        match kind {
            ChangeKind::Edit => {
                let entry = proto::Message::decode(bytes.as_ref()).map_err(|e| corrupt("an edit entry", e))?;
                fold.text = entry.text;
                fold.data = entry.data;
                fold.edited_ms = entry.ts_ms;
                fold.edit_seqs.push(seq);
            }
            ChangeKind::Delete => erase(kv, room, target, fold)?,
            // The hub made the entry only because the reaction was not
            // there (or, to remove, was): applied as it comes, so applying
            // it again after a crash that cut it short in the middle counts
            // it once all the same (the fold's seq says what was applied).
            ChangeKind::ReactionAdd => {
                kv.put(Side::Reactions, &reaction_key(room, target, key, user), &seq.to_be_bytes())?;
                kv.put(Side::Reacted, &reacted_key(room, user, target, key), &[])?;
                let r = match fold.reactions.iter_mut().position(|r| r.key == key) {
                    Some(i) => &mut fold.reactions[i],
                    None => {
                        fold.reactions.push(ReactionRecord { key: key.to_string(), ..Default::default() });
                        fold.reactions.last_mut().expect("pushed")
                    }
                };
                r.count += 1;
                if r.users.len() < REACTION_USERS && !r.users.iter().any(|u| u == user) {
                    r.users.push(user.to_string());
                }
            }
            ChangeKind::ReactionRemove => {
                kv.del(Side::Reactions, &reaction_key(room, target, key, user))?;
                kv.del(Side::Reacted, &reacted_key(room, user, target, key))?;
                if let Some(i) = fold.reactions.iter().position(|r| r.key == key) {
                    let r = &mut fold.reactions[i];
                    r.count = r.count.saturating_sub(1);
                    if r.count == 0 {
                        fold.reactions.remove(i);
                    } else if let Some(u) = r.users.iter().position(|u| u == user) {
                        r.users.remove(u);
                        refill(kv, room, target, r)?;
                    }
                }
            }
            ChangeKind::Unspecified => {}
        }
    }
    Ok(())
}

/// After one of the listed users took back a reaction, lists the earliest
/// of the others who did not.
fn refill(kv: &mut dyn Kv, room: RoomId, target: u64, r: &mut ReactionRecord) -> Result<(), StoreError> {
    if r.users.len() as u32 >= r.count {
        return Ok(());
    }
    let prefix = reaction_prefix(room, target, Some(&r.key));
    let mut others: Vec<(u64, String)> = Vec::new();
    for (k, v) in kv.prefix(Side::Reactions, &prefix)? {
        let user = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if !r.users.contains(&user) {
            let at = u64::from_be_bytes(v.as_slice().try_into().map_err(|_| corrupt("a reaction record", "size"))?);
            others.push((at, user));
        }
    }
    others.sort();
    let room_left = REACTION_USERS - r.users.len();
    // The listed users are the earliest; whoever comes next by the seq of
    // their reaction joins them.
    r.users.extend(others.into_iter().take(room_left).map(|(_, u)| u));
    Ok(())
}

/// Deletes `target`: its content and that of its edits are overwritten,
/// its reactions dropped, and who sent it kept for unread counts.
fn erase(kv: &mut dyn Kv, room: RoomId, target: u64, fold: &mut FoldRecord) -> Result<(), StoreError> {
    fold.deleted = true;
    fold.edited_ms = 0;
    fold.text.clear();
    fold.data = Bytes::new();
    fold.reactions.clear();
    for seq in std::iter::once(target).chain(fold.edit_seqs.iter().copied()) {
        if let Some(mut m) = message_of(kv, room, seq)? {
            if seq == target {
                let record = DeletedRecord { sender: m.sender.clone(), mentions: m.mentions.clone() };
                kv.put(Side::Deleted, &message_key(room, target), &record.encode_to_vec())?;
                // The stored message says so itself: a copy of the log
                // taken without the fold (a backup) still shows it deleted.
                m.deleted = true;
            }
            m.text.clear();
            m.data = Bytes::new();
            kv.put(Side::Messages, &message_key(room, seq), &m.encode_to_vec())?;
        }
    }
    let prefix = reaction_prefix(room, target, None);
    for (k, _) in kv.prefix(Side::Reactions, &prefix)? {
        let rest = &k[prefix.len()..];
        if let Some(nul) = rest.iter().position(|b| *b == 0) {
            let (key, user) = (String::from_utf8_lossy(&rest[..nul]), String::from_utf8_lossy(&rest[nul + 1..]));
            kv.del(Side::Reacted, &reacted_key(room, &user, target, &key))?;
        }
        kv.del(Side::Reactions, &k)?;
    }
    Ok(())
}

/// What validating a change needs to know about its target.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// Who sent it.
    pub sender: String,
    /// Whether it is itself a change entry.
    pub is_change: bool,
    /// Whom it mentions.
    pub mentions: Vec<String>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// The reaction keys on it now, with their counts.
    pub keys: Vec<(String, u32)>,
}

/// The message at `seq`, as a change's target.
pub fn target(kv: &mut dyn Kv, room: RoomId, seq: u64) -> Result<Option<Target>, StoreError> {
    let Some(m) = message_of(kv, room, seq)? else { return Ok(None) };
    let fold = fold_of(kv, room, seq)?.unwrap_or_default();
    Ok(Some(Target {
        sender: m.sender,
        is_change: m.change.is_some(),
        mentions: m.mentions,
        deleted: fold.deleted,
        keys: fold.reactions.into_iter().map(|r| (r.key, r.count)).collect(),
    }))
}

/// A message as read: as stored, or decoded with its fold applied.
pub enum Folded {
    /// Never changed: the stored encoding, as it was delivered.
    Stored(Bytes),
    /// Changed: its latest state.
    Changed(Box<proto::Message>),
}

impl Folded {
    /// Its encoding.
    pub fn encoded(self) -> Bytes {
        match self {
            Folded::Stored(b) => b,
            Folded::Changed(m) => Bytes::from(m.encode_to_vec()),
        }
    }

    /// It, decoded.
    pub fn decoded(self) -> Result<proto::Message, StoreError> {
        match self {
            Folded::Stored(b) => proto::Message::decode(b.as_ref()).map_err(|e| corrupt("a message", e)),
            Folded::Changed(m) => Ok(*m),
        }
    }
}

/// Folds each stored message of `room` (seq, encoding, its fold record if
/// it has one) into its latest state as `viewer` sees it: `mine` comes
/// from one scan of the viewer's reactions over the range, not a lookup
/// per reaction.
pub fn fold_all(
    kv: &mut dyn Kv,
    room: RoomId,
    viewer: &str,
    stored: Vec<(u64, Bytes, Option<Vec<u8>>)>,
) -> Result<Vec<Folded>, StoreError> {
    let (Some(first), Some(last)) = (stored.first().map(|s| s.0), stored.last().map(|s| s.0)) else {
        return Ok(Vec::new());
    };
    let mut mine = None;
    let mut out = Vec::with_capacity(stored.len());
    for (seq, bytes, fold) in stored {
        let Some(fold) = fold else {
            out.push(Folded::Stored(bytes));
            continue;
        };
        let fold = FoldRecord::decode(fold.as_slice()).map_err(|e| corrupt("a fold record", e))?;
        let mut m = proto::Message::decode(bytes.as_ref()).map_err(|e| corrupt("a message", e))?;
        m.folded_seq = fold.folded_seq;
        // An erased message says so itself: a copy of the log taken with
        // the state beside it from before the delete (a backup) still reads
        // as deleted, with nothing of its content.
        m.deleted |= fold.deleted;
        if m.deleted {
            out.push(Folded::Changed(Box::new(m)));
            continue;
        }
        if fold.edited_ms > 0 {
            m.text = fold.text;
            m.data = fold.data;
        }
        m.edited_ms = fold.edited_ms;
        if !fold.reactions.is_empty() && mine.is_none() {
            mine = Some(reactions_of(kv, room, viewer, first, last)?);
        }
        let mine = mine.as_ref();
        m.reactions = fold
            .reactions
            .into_iter()
            .map(|r| {
                let mine = mine.is_some_and(|set| set.contains(&(seq, r.key.clone())));
                proto::Reaction { key: r.key, count: r.count, users: r.users, mine }
            })
            .collect();
        out.push(Folded::Changed(Box::new(m)));
    }
    Ok(out)
}

/// A record as it was before a batch changed it.
#[derive(Debug)]
pub struct Undo {
    room: RoomId,
    first: u64,
    side: Side,
    key: Vec<u8>,
    before: Option<Vec<u8>>,
}

/// A [`Kv`] that notes what each write replaces, so that a batch whose
/// commit failed can be taken back ([`undo`]) along with its log entries.
pub struct Recording<'a> {
    /// The records written to.
    pub kv: &'a mut dyn Kv,
    /// The room whose entries are being applied.
    pub room: RoomId,
    /// The first seq of the run being applied.
    pub first: u64,
    /// Where the replaced records go.
    pub log: &'a mut Vec<Undo>,
    /// The records noted already.
    pub noted: std::collections::HashSet<(Side, Vec<u8>)>,
}

impl Recording<'_> {
    fn note(&mut self, side: Side, key: &[u8], known: Option<Option<Vec<u8>>>) -> Result<(), StoreError> {
        // Taking back restores the first before-image of a key (newest
        // first), so later ones would only cost a read.
        if self.noted.insert((side, key.to_vec())) {
            let before = match known {
                Some(before) => before,
                None => self.kv.get(side, key)?,
            };
            self.log.push(Undo { room: self.room, first: self.first, side, key: key.to_vec(), before });
        }
        Ok(())
    }
}

impl Kv for Recording<'_> {
    fn get(&mut self, side: Side, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.get(side, key)
    }
    fn put(&mut self, side: Side, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.note(side, key, None)?;
        self.kv.put(side, key, value)
    }
    fn put_replacing(
        &mut self,
        side: Side,
        key: &[u8],
        value: &[u8],
        before: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        self.note(side, key, Some(before))?;
        self.kv.put(side, key, value)
    }
    fn del(&mut self, side: Side, key: &[u8]) -> Result<(), StoreError> {
        self.note(side, key, None)?;
        self.kv.del(side, key)
    }
    fn prefix(&mut self, side: Side, prefix: &[u8]) -> Result<Records, StoreError> {
        self.kv.prefix(side, prefix)
    }
    fn range(&mut self, side: Side, start: &[u8], end: &[u8]) -> Result<Records, StoreError> {
        self.kv.range(side, start, end)
    }
}

/// Puts back, newest first, every record of `room` that `log` says a
/// failed batch replaced; the rest of `log` stays. Returns the first seq
/// of the run taken back, if any: the caller applies again what it keeps
/// of it.
pub fn undo(kv: &mut dyn Kv, log: &mut Vec<Undo>, room: RoomId) -> Result<Option<u64>, StoreError> {
    let (mine, rest): (Vec<Undo>, Vec<Undo>) = std::mem::take(log).into_iter().partition(|u| u.room == room);
    *log = rest;
    for u in mine.iter().rev() {
        match &u.before {
            Some(v) => kv.put(u.side, &u.key, v)?,
            None => kv.del(u.side, &u.key)?,
        }
    }
    Ok(mine.iter().map(|u| u.first).min())
}

/// Applies the stored entries of `room` in `from..=to` (what a truncation
/// kept of a run it took back).
pub fn reapply(kv: &mut dyn Kv, room: RoomId, from: u64, to: u64) -> Result<(), StoreError> {
    let mut stored = Vec::new();
    for seq in from..=to {
        if let Some(v) = kv.get(Side::Messages, &message_key(room, seq))? {
            let m = proto::Message::decode(v.as_slice()).map_err(|e| corrupt("a message", e))?;
            stored.push((seq, Entry::of(&m), Bytes::from(v)));
        }
    }
    let entries: Vec<_> = stored.iter().map(|(s, e, b)| (*s, e, b)).collect();
    apply(kv, room, &entries, &mut CountsCache::new())
}

/// Groups a batch's appends by room, in seq order, for [`apply`].
pub fn runs(appends: &[super::Append]) -> Vec<(RoomId, Run<'_>)> {
    let mut runs: Vec<(RoomId, Run<'_>)> = Vec::new();
    let mut at: HashMap<RoomId, usize> = HashMap::new();
    for a in appends {
        let i = *at.entry(a.room).or_insert_with(|| {
            runs.push((a.room, Vec::new()));
            runs.len() - 1
        });
        runs[i].1.push((a.seq, &a.entry, &a.message));
    }
    runs
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Default)]
    struct Maps(BTreeMap<(u8, Vec<u8>), Vec<u8>>);

    fn tag(s: Side) -> u8 {
        s as u8
    }

    impl Kv for Maps {
        fn get(&mut self, side: Side, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.0.get(&(tag(side), key.to_vec())).cloned())
        }
        fn put(&mut self, side: Side, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.0.insert((tag(side), key.to_vec()), value.to_vec());
            Ok(())
        }
        fn del(&mut self, side: Side, key: &[u8]) -> Result<(), StoreError> {
            self.0.remove(&(tag(side), key.to_vec()));
            Ok(())
        }
        fn prefix(&mut self, side: Side, prefix: &[u8]) -> Result<Records, StoreError> {
            Ok(self
                .0
                .range((tag(side), prefix.to_vec())..)
                .take_while(|((s, k), _)| *s == tag(side) && k.starts_with(prefix))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
        fn range(&mut self, side: Side, start: &[u8], end: &[u8]) -> Result<Records, StoreError> {
            Ok(self
                .0
                .range((tag(side), start.to_vec())..(tag(side), end.to_vec()))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    fn react(kv: &mut Maps, seq: u64, user: &str, key: &str, add: bool) {
        let kind = if add { ChangeKind::ReactionAdd } else { ChangeKind::ReactionRemove };
        let e = Entry::Change { user: user.into(), target: 1, kind, key: key.into() };
        apply(kv, 7, &[(seq, &e, &Bytes::new())], &mut CountsCache::new()).unwrap();
    }

    fn folded(kv: &mut Maps, viewer: &str) -> proto::Message {
        let bytes = Bytes::from(kv.get(Side::Messages, &message_key(7, 1)).unwrap().unwrap());
        let fold = kv.get(Side::Folds, &message_key(7, 1)).unwrap();
        let mut all = fold_all(kv, 7, viewer, vec![(1, bytes, fold)]).unwrap();
        all.remove(0).decoded().unwrap()
    }

    fn with_message() -> Maps {
        let mut kv = Maps::default();
        let m = proto::Message { seq: 1, sender: "ann".into(), text: "secret".into(), ..Default::default() };
        kv.put(Side::Messages, &message_key(7, 1), &m.encode_to_vec()).unwrap();
        kv
    }

    #[test]
    fn reactions_count_everyone_list_the_earliest_and_say_mine() {
        let mut kv = with_message();
        for i in 0..25u64 {
            react(&mut kv, 2 + i, &format!("u{i:02}"), "👍", true);
        }
        let m = folded(&mut kv, "u24");
        assert_eq!(m.reactions.len(), 1);
        assert_eq!(m.reactions[0].count, 25);
        assert_eq!(m.reactions[0].users.len(), REACTION_USERS);
        assert!(m.reactions[0].mine, "found beyond the listed users");
        assert!(!folded(&mut kv, "zed").reactions[0].mine);
        react(&mut kv, 31, "u00", "👍", false);
        let r = &folded(&mut kv, "u01").reactions[0];
        assert_eq!((r.count, r.users.first().map(String::as_str)), (24, Some("u01")));
        assert_eq!(r.users.last().map(String::as_str), Some("u20"), "the next earliest is listed");
        // Applied again (a crash cut the run short before its fold was
        // written): counted once.
        let e = Entry::Change { user: "u05".into(), target: 1, kind: ChangeKind::ReactionRemove, key: "👍".into() };
        apply(&mut kv, 7, &[(32, &e, &Bytes::new())], &mut CountsCache::new()).unwrap();
        let fold = kv.get(Side::Folds, &message_key(7, 1)).unwrap();
        kv.del(Side::Folds, &message_key(7, 1)).unwrap();
        kv.put(Side::Folds, &message_key(7, 1), &fold.clone().unwrap()).unwrap();
        apply(&mut kv, 7, &[(32, &e, &Bytes::new())], &mut CountsCache::new()).unwrap();
        assert_eq!(folded(&mut kv, "u01").reactions[0].count, 23);
        assert_eq!(folded(&mut kv, "u01").folded_seq, 32);
    }

    #[test]
    fn deleting_erases_the_message_and_its_edits() {
        let mut kv = with_message();
        let edit = proto::Message { seq: 2, text: "more secret".into(), ts_ms: 55, ..Default::default() };
        kv.put(Side::Messages, &message_key(7, 2), &edit.encode_to_vec()).unwrap();
        let e = Entry::Change { user: "ann".into(), target: 1, kind: ChangeKind::Edit, key: String::new() };
        apply(&mut kv, 7, &[(2, &e, &Bytes::from(edit.encode_to_vec()))], &mut CountsCache::new()).unwrap();
        assert_eq!((folded(&mut kv, "").text.as_str(), folded(&mut kv, "").edited_ms), ("more secret", 55));
        react(&mut kv, 3, "bob", "x", true);
        let d = Entry::Change { user: "ann".into(), target: 1, kind: ChangeKind::Delete, key: String::new() };
        apply(&mut kv, 7, &[(4, &d, &Bytes::new())], &mut CountsCache::new()).unwrap();
        let m = folded(&mut kv, "");
        assert!(m.deleted && m.text.is_empty() && m.reactions.is_empty());
        assert!(kv.0.values().all(|v| !v.windows(6).any(|w| w == b"secret")), "no record holds the content");
        // Applying the same run again (after a crash) changes nothing.
        let before = kv.0.clone();
        apply(
            &mut kv,
            7,
            &[(2, &e, &Bytes::from(edit.encode_to_vec())), (3, &d, &Bytes::new())],
            &mut CountsCache::new(),
        )
        .unwrap();
        assert_eq!(kv.0, before);
    }

    #[test]
    fn an_erased_message_reads_as_deleted_whatever_its_fold_says() {
        // What a backup can hold: the log copied after a delete erased the
        // message, the state beside it from before (edited, reacted to).
        let mut kv = with_message();
        let edit = proto::Message { seq: 2, text: "secret".into(), ts_ms: 55, ..Default::default() };
        let e = Entry::Change { user: "ann".into(), target: 1, kind: ChangeKind::Edit, key: String::new() };
        apply(&mut kv, 7, &[(2, &e, &Bytes::from(edit.encode_to_vec()))], &mut CountsCache::new()).unwrap();
        react(&mut kv, 3, "bob", "x", true);
        let before = kv.0.clone();
        let d = Entry::Change { user: "ann".into(), target: 1, kind: ChangeKind::Delete, key: String::new() };
        apply(&mut kv, 7, &[(4, &d, &Bytes::new())], &mut CountsCache::new()).unwrap();
        let erased = kv.get(Side::Messages, &message_key(7, 1)).unwrap().unwrap();
        kv.0 = before;
        kv.put(Side::Messages, &message_key(7, 1), &erased).unwrap();
        let m = folded(&mut kv, "bob");
        assert!(m.deleted && m.text.is_empty() && m.reactions.is_empty() && m.edited_ms == 0, "{m:?}");
    }
}
