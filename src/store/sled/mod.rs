//! The server's store: sled 0.34 with an explicit `fdatasync`.
//!
//! Trees (ARCHITECTURE.md, "Storage"):
//! * `messages` — `room_id ‖ first_seq` (u64 BE each) → a [`runs`] value:
//!   the encoded `Message`s of one room that one group commit wrote. One
//!   tree for every room: sled rewrites its meta map for every new tree.
//! * `rooms` — room name → room id (u64 BE) ‖ [`RoomDetails`](super::RoomDetails) (kind, title,
//!   topic, creator).
//! * `members` — `user ‖ 0 ‖ room_id` → [`MemberRecord`]: role and since
//!   when, or (role 0) how the membership ended.
//! * `bans` — `room_id ‖ user` → [`BanRecord`].
//! * `invites` — `user ‖ 0 ‖ room_id` → [`InviteRecord`].
//! * `revocations` — user → Unix seconds (u64 BE): tokens of the user
//!   issued before are refused.
//! * `reads` — `user ‖ 0 ‖ room_id` → [`ReadPos`](super::ReadPos): the read
//!   seq and the counts through it.
//! * `folds`, `reactions`, `counts`, `deleted` — the state beside the log
//!   that [`super::fold`] keeps: a changed message's latest state, who
//!   reacted, per user and room the counters of unread counts, and who
//!   sent each deleted message.
//! * `idem_journal` — record number (u64 BE) → the idempotency entries of
//!   one group commit (the idempotency window; [`crate::store::idem`] says why it
//!   is a journal with an index in memory and not a record per key).
//! * `meta` — `format` → [`FORMAT`], so a foreign directory is refused. A
//!   store of an earlier format ([`FORMAT_2`], without roles; [`FORMAT_1`],
//!   a record per key in `idem`) is upgraded when it opens.
//!
//! Durability: sled's `flush` writes with `sync_file_range`, which does not
//! reach the disk's cache (sled issues 1351, 1452), so `sync` follows it
//! with `fdatasync` on the data file.
//!
//! A group commit is written as single inserts in a fixed order — room
//! names, details, members, bans and invitations, then messages (each
//! room's runs in seq order), then
//! their idempotency journal record, then read markers — not with `apply_batch`.
//! sled recovers a prefix of its log (it stops at the first torn or missing
//! segment), so a crash keeps a prefix of that order: never a message
//! without its room's name, never a gap in a room's seqs, and at most the
//! journal record of the tail missing, which `load` re-indexes. The
//! state beside the log comes after the entries, between an `applying`
//! record and its removal: `load` applies again what a crash may have cut
//! short ([`super::fold::apply`] skips what it had applied). A
//! message kept that was never acknowledged is a publish whose ack was lost:
//! its retry finds it by its idempotency key. `apply_batch` would make each
//! tree's part atomic, but measured twice the cost per insert (benches/README.md,
//! "Group commit as single inserts, not apply_batch"), and while it
//! runs every read in the process waits (sled's global reader/writer lock,
//! which the first `apply_batch` switches on for good) — the idempotency
//! lookup of every publish included. Readers never see a half-written batch
//! either way: history and catch-up read only up to a room's dispatched
//! head.
//!
//! After an I/O error (a full disk) sled fails every later write until it is
//! reopened; the commit writer's probe does that once a scratch file shows
//! the disk takes writes again ([`SledStore::reopen`] says how a failed
//! instance is set aside), so the server recovers in place when space
//! returns.
//!
//! Files: [`trees`] opens the database and checks its format, [`journal`]
//! keeps the idempotency window, [`upgrade`] converts older formats,
//! [`recovery`] reopens the database after a storage failure, and
//! [`compact`] copies the store into fresh files, leaving behind the
//! bytes of what was overwritten or removed.

pub mod backup;
pub mod compact;
mod journal;
mod recovery;
mod runs;
mod trees;
mod trim;
mod upgrade;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, RwLock};

use self::journal::{EXPIRED_BEFORE, decode_record, journal_entries, keep_in_record, record_number};
use self::recovery::check_writable;
pub use self::trees::{FORMAT, FORMAT_1, FORMAT_2, FORMAT_3, FORMAT_4};
use self::trees::{Trees, corrupt_key, decode_message, parse_room_value, room_id_of, room_value};
use super::fold::{self, Counts, DeletedRecord, Entry, Recording, Target, Undo};
use super::idem::{self, IdemIndex, Loc};
use super::{
    BanRecord, Batch, IdempotencyRecord, InviteRecord, MemberRecord, ReadPos, RoomId, RoomRecord, RoomWrite, Snapshot,
    Store, StoreError, Trim, TrimRecord, message_key, split_user_key, user_key,
};
use crate::proto::ChangeKind;

/// The `meta` key of the batch whose state beside the log is being applied.
const APPLYING: &[u8] = b"applying";

/// Decodes a stored record (one of [`super::rooms`]).
fn decode<T: prost::Message + Default>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    T::decode(v).map_err(|e| StoreError::Corrupt(format!("record {k:?} does not decode: {e}")))
}

/// Key of a ban: `room_id ‖ user`, so one room's bans are a prefix range.
fn ban_key(room: RoomId, user: &str) -> Vec<u8> {
    let mut k = room.to_be_bytes().to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// The sled-backed store.
pub struct SledStore {
    /// `None` only while a failed database is being replaced by a reopened
    /// one (or reopening failed; the next probe tries again).
    trees: RwLock<Option<Trees>>,
    path: PathBuf,
    cache_bytes: u64,
    /// The idempotency window's index (see [`crate::store::idem`]).
    index: Mutex<IdemIndex>,
    /// Number of the next journal record. Only grows, also across a reopen.
    next_record: AtomicU64,
    /// What the last batch's state beside the log replaced: if its commit
    /// fails, `truncate` puts it back.
    undo: Mutex<Vec<Undo>>,
    /// The unread counters as stored (dropped after a truncation).
    counts: Mutex<fold::CountsCache>,
    /// Held by work on the whole log that must not overlap: a trim, a
    /// backup's copy.
    maintenance: Mutex<()>,
    /// Held by everything that rewrites runs below the head: erasing a
    /// deleted message (the group commit), taking a failed batch back, a
    /// trim — each reads a run and writes it again, and one must
    /// not write back what another changed meanwhile.
    rewrites: Mutex<()>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with a page cache of
    /// `cache_bytes` (sled's 1 GiB default is far too much for a chat node).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        if !dir.exists() {
            // Not a new store if a compaction moved it aside.
            compact::recover_interrupted(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let trees = Trees::open(dir, cache_bytes)?;
        let mut index = IdemIndex::new(idem::MAX_IDS_PER_USER);
        let mut next_record = 0;
        for kv in trees.journal.iter() {
            let (k, v) = kv?;
            next_record = record_number(&k)? + 1;
            for e in decode_record(&k, &v)? {
                index.insert(e.user, e.client_msg_id, e.loc());
            }
        }
        if !index.is_empty() {
            tracing::info!(ids = index.len(), "idempotency window loaded");
        }
        Ok(SledStore {
            trees: RwLock::new(Some(trees)),
            path: dir.to_path_buf(),
            cache_bytes,
            index: Mutex::new(index),
            next_record: AtomicU64::new(next_record),
            undo: Mutex::new(Vec::new()),
            counts: Mutex::new(fold::CountsCache::new()),
            maintenance: Mutex::new(()),
            rewrites: Mutex::new(()),
        })
    }

    /// The messages `from..=to` of `room` with their folds merged in as
    /// the log is read: one pass over both trees, whatever the number of
    /// changes.
    fn folded_range(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<fold::Folded>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        self.with(|t| {
            let range = message_key(room, from)..=message_key(room, to);
            let mut folds = t.folds.range(range).peekable();
            let mut stored = Vec::new();
            for (seq, v) in t.entries(room, from, to)? {
                let k = message_key(room, seq);
                if let Some(Err(_)) = folds.peek() {
                    folds.next().expect("peeked")?;
                }
                while folds.next_if(|f| f.as_ref().is_ok_and(|(fk, _)| fk.as_ref() < &k[..])).is_some() {}
                let fold = match folds.next_if(|f| f.as_ref().is_ok_and(|(fk, _)| fk.as_ref() == &k[..])) {
                    Some(f) => Some(f?.1.to_vec()),
                    None => None,
                };
                stored.push((seq, v, fold));
            }
            fold::fold_all(&mut &*t, room, viewer, stored)
        })
    }

    fn undo_log(&self) -> MutexGuard<'_, Vec<Undo>> {
        self.undo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies again the state beside the log of a batch a crash may have
    /// cut short (the `applying` record), then drops the record.
    fn finish_applying(&self, t: &Trees) -> Result<(), StoreError> {
        let Some(v) = t.meta.get(APPLYING)? else { return Ok(()) };
        for run in v.chunks(16) {
            let room = room_id_of(&run[..8])?;
            let first = room_id_of(&run[8..])?;
            let mut stored = Vec::new();
            for (seq, v) in t.entries(room, first, u64::MAX)? {
                let m = decode_message(&message_key(room, seq), &v)?;
                stored.push((seq, Entry::of(&m), v));
            }
            let entries: Vec<_> = stored.iter().map(|(s, e, b)| (*s, e, b)).collect();
            fold::apply(&mut &*t, room, &entries, &mut fold::CountsCache::new())?;
            tracing::info!(
                room,
                from = first,
                entries = entries.len(),
                "re-applied message changes cut short by a crash"
            );
        }
        t.meta.remove(APPLYING)?;
        t.sync()
    }

    fn maintenance(&self) -> MutexGuard<'_, ()> {
        self.maintenance.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The maintenance lock unless a backup holds it: a trim runs in the
    /// group commit's writer, which must not wait for a backup's copy of
    /// the log — it skips a pass instead.
    fn try_maintenance(&self) -> Option<MutexGuard<'_, ()>> {
        match self.maintenance.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn rewrites(&self) -> MutexGuard<'_, ()> {
        self.rewrites.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self) -> MutexGuard<'_, IdemIndex> {
        // Every change to the index is complete before the next one starts,
        // so a panic elsewhere cannot leave it half-updated.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the open database.
    fn with<R>(&self, f: impl FnOnce(&Trees) -> Result<R, StoreError>) -> Result<R, StoreError> {
        match self.trees.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(t) => f(t),
            None => Err(StoreError::Db("the database failed and could not be reopened yet".into())),
        }
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with(|t| {
            let mut snap = Snapshot::default();
            let mut repaired = 0;
            self.finish_applying(t)?;
            let expired_before = t.meta.get(EXPIRED_BEFORE)?.map_or(Ok(0), |v| record_number(&v))?;
            for kv in t.rooms.iter() {
                let (k, v) = kv?;
                let name = String::from_utf8(k.to_vec()).map_err(|_| corrupt_key(&k))?;
                let (id, details) = parse_room_value(&v)?;
                let head = t.head_of(id)?;
                repaired += self.repair_idempotency(t, id, head, expired_before)?;
                snap.rooms.push(RoomRecord { name, id, head, details });
            }
            let mut cleaned = 0;
            for kv in t.trims.iter() {
                let (k, v) = kv?;
                let (room, rec) = (room_id_of(&k)?, TrimRecord::decode_stored(&v)?);
                // What a crash left of a trim.
                cleaned += trim::forget_below(t, room, rec.start())?;
                snap.trims.push((room, rec));
            }
            if cleaned > 0 {
                tracing::info!(records = cleaned, "finished a trim a crash interrupted");
            }
            if repaired > 0 {
                t.sync()?;
                tracing::warn!(repaired, "re-indexed idempotency records lost in a crash");
            }
            for kv in t.members.iter() {
                let (k, v) = kv?;
                let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
                let record: MemberRecord = decode(&k, &v)?;
                if record.role != 0 {
                    snap.memberships.push((user.to_string(), room_id_of(room)?, record));
                }
            }
            for kv in t.bans.iter() {
                let (k, v) = kv?;
                let (room, user) = k.split_at_checked(8).ok_or_else(|| corrupt_key(&k))?;
                let user = std::str::from_utf8(user).map_err(|_| corrupt_key(&k))?;
                snap.bans.push((room_id_of(room)?, user.to_string(), decode::<BanRecord>(&k, &v)?));
            }
            for kv in t.revocations.iter() {
                let (k, v) = kv?;
                let user = String::from_utf8(k.to_vec()).map_err(|_| corrupt_key(&k))?;
                snap.revocations.push((user, room_id_of(&v)?));
            }
            for kv in t.invites.iter() {
                let (k, v) = kv?;
                let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
                snap.invites.push((user.to_string(), room_id_of(room)?, decode::<InviteRecord>(&k, &v)?));
            }
            for kv in t.reads.iter() {
                let (k, v) = kv?;
                let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
                let pos = ReadPos::decode(&v).ok_or_else(|| corrupt_key(&v))?;
                snap.read_markers.push((user.to_string(), room_id_of(room)?, pos));
            }
            for kv in t.counts.iter() {
                let (k, v) = kv?;
                let (room, user) = k.split_at_checked(8).ok_or_else(|| corrupt_key(&k))?;
                let user = std::str::from_utf8(user).map_err(|_| corrupt_key(&k))?;
                snap.counts.push((room_id_of(room)?, user.to_string(), Counts::decode(&v)?));
            }
            for kv in t.deleted.iter() {
                let (k, v) = kv?;
                let seq = room_id_of(k.get(8..16).ok_or_else(|| corrupt_key(&k))?)?;
                snap.deleted.push((room_id_of(&k[..8])?, seq, decode::<DeletedRecord>(&k, &v)?));
            }
            Ok(snap)
        })
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        self.with(|t| {
            // The order is what a crash keeps a prefix of (module docs):
            // rooms and their state first, so a message is never stored for
            // a room whose name could be lost; records after their messages.
            use prost::Message as _;
            for w in &batch.rooms {
                match w {
                    RoomWrite::Details { room, name, details } => {
                        t.rooms.insert(name.as_bytes(), room_value(*room, details))?;
                    }
                    RoomWrite::Member { user, room, record } => {
                        t.members.insert(user_key(user, &room.to_be_bytes()), record.encode_to_vec())?;
                    }
                    RoomWrite::Ban { room, user, ban } => {
                        match ban {
                            Some(b) => t.bans.insert(ban_key(*room, user), b.encode_to_vec())?,
                            None => t.bans.remove(ban_key(*room, user))?,
                        };
                    }
                    RoomWrite::Invite { user, room, invite } => {
                        let key = user_key(user, &room.to_be_bytes());
                        match invite {
                            Some(i) => t.invites.insert(key, i.encode_to_vec())?,
                            None => t.invites.remove(key)?,
                        };
                    }
                    RoomWrite::InviteEnded { .. } => {}
                }
            }
            let runs = fold::runs(&batch.appends);
            if !runs.is_empty() {
                let mut applying = Vec::with_capacity(runs.len() * 16);
                for (room, entries) in &runs {
                    applying.extend_from_slice(&message_key(*room, entries[0].0));
                }
                t.meta.insert(APPLYING, applying)?;
            }
            t.append_runs(&batch.appends)?;
            self.put_journal(t, journal_entries(&batch.appends))?;
            for r in &batch.read_markers {
                t.reads.insert(user_key(&r.user, &r.room.to_be_bytes()), &r.pos.encode()[..])?;
            }
            for (user, at) in &batch.revocations {
                t.revocations.insert(user.as_bytes(), &at.to_be_bytes()[..])?;
            }
            if !runs.is_empty() {
                let erases =
                    batch.appends.iter().any(|a| matches!(a.entry, Entry::Change { kind: ChangeKind::Delete, .. }));
                let _rewrites = erases.then(|| self.rewrites());
                let mut undo = self.undo_log();
                undo.clear();
                let mut cache = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                for (room, entries) in &runs {
                    let first = entries[0].0;
                    let mut rec =
                        Recording { kv: &mut &*t, room: *room, first, log: &mut undo, noted: Default::default() };
                    if let Err(e) = fold::apply(&mut rec, *room, entries, &mut cache) {
                        // What it holds may be ahead of the store now.
                        cache.clear();
                        return Err(e);
                    }
                }
                t.meta.remove(APPLYING)?;
            }
            // In the index once written (readable), as the per-key record
            // was: the hub keeps the key in flight until the sync.
            let mut index = self.index();
            for e in journal_entries(&batch.appends) {
                index.insert(e.user, e.client_msg_id, e.loc());
            }
            Ok(())
        })
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.with(Trees::sync)
    }

    fn departure(&self, user: &str, room: RoomId) -> Result<Option<MemberRecord>, StoreError> {
        self.with(|t| {
            let key = user_key(user, &room.to_be_bytes());
            match t.members.get(&key)? {
                Some(v) => Ok(Some(decode::<MemberRecord>(&key, &v)?).filter(|m| m.role == 0)),
                None => Ok(None),
            }
        })
    }

    fn probe(&self) -> Result<(), StoreError> {
        // Only called after a failure, when the instance is most likely
        // poisoned — and a poisoned instance can block forever in a flush, so
        // it is not asked. A plain file says whether the disk takes writes
        // again; then a fresh instance takes over.
        check_writable(&self.path)?;
        self.reopen()?;
        self.with(|t| {
            t.meta.insert("probe", &crate::time::now_ms().to_be_bytes()[..])?;
            t.sync()
        })
    }

    fn truncate(&self, room: RoomId, from: u64) -> Result<usize, StoreError> {
        self.with(|t| {
            // What the failed batch changed beside the log goes back first
            // (its entries below `from` — the messages it erased — too).
            self.counts.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let _rewrites = self.rewrites();
            let undone = fold::undo(&mut &*t, &mut self.undo_log(), room)?;
            t.meta.remove(APPLYING)?;
            let mut keyed = Vec::new();
            let cut = t.entries(room, from, u64::MAX)?;
            for (seq, v) in &cut {
                let msg = decode_message(&message_key(room, *seq), v)?;
                if !msg.client_msg_id.is_empty() {
                    keyed.push(msg);
                }
            }
            // Journal entries first: a crash in between leaves messages
            // without entries, which `load` re-indexes, never an entry for a
            // seq about to be handed out again — `load`'s repair stops at the
            // first message it finds indexed, so such an entry would hide
            // the messages below it.
            if let Some(oldest) = keyed.iter().map(|m| m.ts_ms).min() {
                self.drop_journal_entries(t, room, from, oldest)?;
            }
            let mut index = self.index();
            for m in &keyed {
                let owner = super::idempotency_owner(&m.sender, &m.room);
                index.remove(&owner, &m.client_msg_id, Loc { room, seq: m.seq });
            }
            drop(index);
            // Then the messages from the newest back, so a crash part way
            // leaves the log contiguous.
            let removed = t.cut_from(room, from)?.len();
            if let Some(first) = undone.filter(|f| *f < from) {
                fold::reapply(&mut &*t, room, first, from - 1)?;
            }
            Ok(removed)
        })
    }

    fn read_folded(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<fold::Folded>, StoreError> {
        self.folded_range(room, from, to, viewer)
    }

    fn target(&self, room: RoomId, seq: u64) -> Result<Option<Target>, StoreError> {
        self.with(|t| fold::target(&mut &*t, room, seq))
    }

    fn has_reaction(&self, room: RoomId, seq: u64, key: &str, user: &str) -> Result<bool, StoreError> {
        self.with(|t| Ok(t.reactions.contains_key(fold::reaction_key(room, seq, key, user))?))
    }

    fn lookup_idempotent(&self, sender: &str, client_msg_id: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let candidates = self.index().candidates(sender, client_msg_id);
        if candidates.is_empty() {
            return Ok(None);
        }
        self.with(|t| {
            for loc in candidates {
                let Some(v) = t.entry(loc.room, loc.seq)? else { continue };
                let msg = decode_message(&message_key(loc.room, loc.seq), &v)?;
                if super::idempotency_owner(&msg.sender, &msg.room) == sender && msg.client_msg_id == client_msg_id {
                    return Ok(Some(IdempotencyRecord { room: loc.room, seq: loc.seq, ts_ms: msg.ts_ms }));
                }
            }
            Ok(None)
        })
    }

    fn expire_idempotency(&self, before_ts_ms: u64) -> Result<usize, StoreError> {
        self.with(|t| {
            let mut expired = 0;
            // Records are in commit order, so the expired ones are at the
            // front; a record partly expired is rewritten with the rest.
            for kv in t.journal.iter() {
                let (k, v) = kv?;
                let entries = decode_record(&k, &v)?;
                if entries.iter().all(|e| e.ts_ms >= before_ts_ms) {
                    break;
                }
                let mut index = self.index();
                for e in entries.iter().filter(|e| e.ts_ms < before_ts_ms) {
                    index.remove(e.user, e.client_msg_id, e.loc());
                    expired += 1;
                }
                drop(index);
                keep_in_record(&t.journal, &k, entries.iter().filter(|e| e.ts_ms >= before_ts_ms))?;
            }
            let recorded = t.meta.get(EXPIRED_BEFORE)?.map_or(Ok(0), |v| record_number(&v))?;
            if before_ts_ms > recorded {
                t.meta.insert(EXPIRED_BEFORE, &before_ts_ms.to_be_bytes()[..])?;
            }
            Ok(expired)
        })
    }

    fn trim(&self, room: RoomId, trim: &Trim) -> Result<TrimRecord, StoreError> {
        self.trim_room(room, trim)
    }

    fn size_on_disk(&self) -> u64 {
        self.with(|t| Ok(t.db.size_on_disk()?)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoomDetails;

    #[test]
    fn meets_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        super::super::contract::exercise(&store);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let mut b = Batch::default();
            b.rooms.push(RoomWrite::Details { room: 7, name: "r".into(), details: RoomDetails::default() });
            b.rooms.push(super::super::contract::member("ann", 7, crate::proto::Role::Owner));
            b.appends.push(super::super::contract::append(7, 1, "ann", "x"));
            store.write(&b).unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.rooms.len(), 1);
        assert_eq!((snap.rooms[0].id, snap.rooms[0].head), (7, 1));
    }

    /// A batch of `ann`'s messages in room 1 with keys `c<seq>`, as the
    /// server encodes them (sender and key inside the message).
    fn keyed_batch(seqs: std::ops::RangeInclusive<u64>, sender: &str) -> Batch {
        let mut b = Batch::default();
        b.rooms.push(RoomWrite::Details { room: 1, name: "r".into(), details: RoomDetails::default() });
        b.rooms.push(super::super::contract::member(sender, 1, crate::proto::Role::Member));
        for seq in seqs {
            b.appends.push(super::super::contract::append(1, seq, sender, &format!("c{seq}")));
        }
        b
    }

    #[test]
    fn lost_idempotency_records_are_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            store.write(&keyed_batch(1..=3, "ann")).unwrap();
            // Simulate the crash window: the journal record of the last
            // commit is gone, its messages are not.
            store.with(|t| Ok(t.journal.clear()?)).unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.lookup_idempotent("ann", "c3").unwrap(), None, "not indexed before load repairs it");
        store.load().unwrap();
        assert_eq!(store.lookup_idempotent("ann", "c3").unwrap().map(|r| r.seq), Some(3));
        assert_eq!(store.lookup_idempotent("ann", "c2").unwrap().map(|r| r.seq), Some(2));
        drop(store);
        // The repair was written to the journal: the next start has it
        // without repairing again.
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.lookup_idempotent("ann", "c1").unwrap().map(|r| r.seq), Some(1));
    }

    #[test]
    fn the_idempotency_window_is_rebuilt_from_the_journal_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            for seq in 1..=300 {
                store.write(&keyed_batch(seq..=seq, "ann")).unwrap();
            }
            store.sync().unwrap();
            assert_eq!(store.expire_idempotency(1000 + 101).unwrap(), 100);
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let seq_of = |k: &str| store.lookup_idempotent("ann", k).unwrap().map(|r| (r.seq, r.ts_ms));
        assert_eq!(seq_of("c100"), None, "expired before the restart");
        assert_eq!(seq_of("c101"), Some((101, 1101)));
        assert_eq!(seq_of("c300"), Some((300, 1300)));
        assert_eq!(store.index().len(), 200);
        assert_eq!(store.lookup_idempotent("bob", "c300").unwrap(), None);
        // New records continue after the old ones rather than overwriting them.
        store.write(&keyed_batch(301..=301, "ann")).unwrap();
        store.sync().unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.index().len(), 201);
    }

    #[test]
    fn a_journal_entry_whose_seq_was_truncated_and_reused_answers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            store.write(&keyed_batch(1..=4, "ann")).unwrap();
            assert_eq!(store.truncate(1, 4).unwrap(), 1);
            store.write(&keyed_batch(4..=4, "bob")).unwrap();
            store.sync().unwrap();
        }
        // The journal still holds ann's entry for seq 4; the message there
        // is bob's now.
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.lookup_idempotent("ann", "c4").unwrap(), None);
        assert_eq!(store.lookup_idempotent("bob", "c4").unwrap().map(|r| r.seq), Some(4));
        assert_eq!(store.lookup_idempotent("ann", "c3").unwrap().map(|r| r.seq), Some(3));
    }

    #[test]
    fn after_a_truncation_a_crash_before_the_journal_record_loses_no_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            store.write(&keyed_batch(1..=2, "ann")).unwrap();
            // A commit that failed: written, never acknowledged, truncated.
            let mut failed = Batch::default();
            failed.appends.push(super::super::contract::append(1, 3, "carol", "k1"));
            failed.appends.push(super::super::contract::append(1, 4, "ann", "c4"));
            store.write(&failed).unwrap();
            assert_eq!(store.truncate(1, 3).unwrap(), 2);
            // The next commit reuses the seqs; a crash keeps its messages but
            // not its journal record.
            store
                .with(|t| {
                    for (seq, user, key) in [(3, "dave", "x"), (4, "ann", "c4"), (5, "carol", "k1")] {
                        let a = super::super::contract::append(1, seq, user, key);
                        t.messages.insert(&message_key(1, seq)[..], a.message.as_ref())?;
                    }
                    Ok(())
                })
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        store.load().unwrap();
        for (user, key, seq) in [("dave", "x", 3), ("ann", "c4", 4), ("carol", "k1", 5), ("ann", "c1", 1)] {
            assert_eq!(store.lookup_idempotent(user, key).unwrap().map(|r| r.seq), Some(seq), "{user}/{key}");
        }
    }

    #[test]
    fn expired_keys_are_not_taken_for_lost_ones_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            store.write(&keyed_batch(1..=3, "ann")).unwrap();
            assert_eq!(store.expire_idempotency(5000).unwrap(), 3);
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        store.load().unwrap();
        assert!(store.index().is_empty(), "expired keys came back");
        assert_eq!(store.lookup_idempotent("ann", "c3").unwrap(), None);
        assert!(store.with(|t| Ok(t.journal.is_empty())).unwrap());
    }

    #[test]
    fn a_store_of_the_previous_format_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Build what the previous release wrote: format 1, one `idem`
            // record per key, no journal.
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            store.write(&keyed_batch(1..=2, "ann")).unwrap();
            store
                .with(|t| {
                    t.journal.clear()?;
                    let old = t.db.open_tree("idem")?;
                    for seq in 1..=2 {
                        let rec = IdempotencyRecord { room: 1, seq, ts_ms: 1000 + seq };
                        old.insert(user_key("ann", format!("c{seq}").as_bytes()), &rec.encode()[..])?;
                    }
                    t.meta.insert("format", FORMAT_1)?;
                    Ok(())
                })
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            store.lookup_idempotent("ann", "c2").unwrap(),
            Some(IdempotencyRecord { room: 1, seq: 2, ts_ms: 1002 })
        );
        assert_eq!(store.lookup_idempotent("ann", "c1").unwrap().map(|r| r.seq), Some(1));
        store
            .with(|t| {
                assert_eq!(t.meta.get("format")?.as_deref(), Some(FORMAT));
                assert!(!t.db.tree_names().iter().any(|n| n.as_ref() == b"idem"), "the old tree is dropped");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn changes_a_crash_cut_short_are_applied_at_the_next_start() {
        use crate::proto::ChangeKind;
        use crate::store::contract::{append, change};
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let mut b = Batch::default();
            b.rooms.push(RoomWrite::Details { room: 3, name: "r3".into(), details: RoomDetails::default() });
            b.appends.push(append(3, 1, "ann", ""));
            b.appends.push(change(2, "ann", 1, ChangeKind::Edit, "fixed"));
            b.appends.push(change(3, "bob", 1, ChangeKind::ReactionAdd, ""));
            store.write(&b).unwrap();
            // What a crash after the entries but before the state beside
            // them leaves: the `applying` record, nothing applied.
            store
                .with(|t| {
                    for tree in [&t.folds, &t.reactions, &t.counts] {
                        tree.clear()?;
                    }
                    t.meta.insert(APPLYING, &message_key(3, 1)[..])?;
                    Ok(())
                })
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        let m = prost::Message::decode(store.read_range(3, 1, 1, "bob").unwrap()[0].as_ref())
            .map(|m: crate::proto::Message| m)
            .unwrap();
        assert_eq!((m.text.as_str(), m.reactions.len(), m.folded_seq), ("fixed", 1, 3));
        assert!(m.reactions[0].mine);
        let mut counts: Vec<_> = snap.counts.iter().map(|(r, u, c)| (*r, u.clone(), c.sent)).collect();
        counts.sort();
        assert_eq!(counts, vec![(3, String::new(), 2), (3, "ann".into(), 1)]);
        assert!(store.with(|t| Ok(t.meta.get(APPLYING)?)).unwrap().is_none(), "the record is dropped");
    }

    #[test]
    fn a_store_without_message_changes_is_upgraded_with_unread_counters() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What the previous release wrote: no counters, read markers
            // as a bare seq.
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let mut b = keyed_batch(1..=2, "ann");
            b.appends.push(super::super::contract::append(1, 3, "bob", ""));
            b.appends.push(super::super::contract::append(1, 4, "ann", ""));
            store.write(&b).unwrap();
            store
                .with(|t| {
                    t.counts.clear()?;
                    t.reads.insert(user_key("bob", &1u64.to_be_bytes()), &2u64.to_be_bytes()[..])?;
                    t.reads.insert(user_key("ann", &1u64.to_be_bytes()), &3u64.to_be_bytes()[..])?;
                    t.meta.insert("format", FORMAT_3)?;
                    Ok(())
                })
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        let mut counts: Vec<_> = snap.counts.iter().map(|(r, u, c)| (*r, u.clone(), c.sent, c.through)).collect();
        counts.sort();
        assert_eq!(counts, vec![(1, "ann".into(), 3, 4), (1, "bob".into(), 1, 3)]);
        let mut reads = snap.read_markers.clone();
        reads.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            reads,
            vec![
                ("ann".into(), 1, ReadPos { seq: 3, messages: 3, sent: 2, mentioned: 0 }),
                ("bob".into(), 1, ReadPos { seq: 2, messages: 2, sent: 0, mentioned: 0 }),
            ]
        );
        assert_eq!(store.with(|t| Ok(t.meta.get("format")?)).unwrap().as_deref(), Some(FORMAT));
    }

    /// Writes what a `FORMAT_2` release wrote for these rooms, members and
    /// messages: `rooms` name → id, `members` keys with empty values, the
    /// log, no `room_info`, `bans` or `invites`.
    pub(crate) fn write_format_2(dir: &Path, rooms: &[(&str, RoomId, &[&str], &[&str])]) {
        let db = sled::Config::new().path(dir).open().unwrap();
        db.open_tree("meta").unwrap().insert("format", FORMAT_2).unwrap();
        let (names, members, messages) =
            (db.open_tree("rooms").unwrap(), db.open_tree("members").unwrap(), db.open_tree("messages").unwrap());
        for (name, id, users, senders) in rooms {
            names.insert(name.as_bytes(), &id.to_be_bytes()[..]).unwrap();
            for u in *users {
                members.insert(user_key(u, &id.to_be_bytes()), &[][..]).unwrap();
            }
            for (i, sender) in senders.iter().enumerate() {
                let seq = i as u64 + 1;
                let m = super::super::contract::encoded(*id, seq, sender, "");
                messages.insert(&message_key(*id, seq)[..], m.as_ref()).unwrap();
            }
        }
        db.flush().unwrap();
    }

    #[test]
    fn a_store_from_before_roles_is_upgraded_with_public_rooms_and_owners() {
        use crate::proto::{Role, RoomKind};
        let dir = tempfile::tempdir().unwrap();
        write_format_2(
            dir.path(),
            &[
                // The first message is by someone who left; the next by bob.
                ("general", 1, &["ann", "bob", "cat"], &["zed", "bob", "ann"]),
                // Nobody posted: the first member in user-id order.
                ("quiet", 2, &["dan", "cat"], &[]),
                ("dm:ann:bob", 3, &["ann", "bob"], &["bob"]),
            ],
        );
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        let mut rooms: Vec<_> = snap
            .rooms
            .iter()
            .map(|r| (r.name.as_str(), r.head, r.details.kind, r.details.created_by.as_str()))
            .collect();
        rooms.sort();
        let (public, direct) = (RoomKind::Public as i32, RoomKind::Direct as i32);
        assert_eq!(
            rooms,
            vec![("dm:ann:bob", 1, direct, "bob"), ("general", 3, public, "bob"), ("quiet", 0, public, "cat")]
        );
        let mut roles: Vec<_> = snap.memberships.iter().map(|(u, r, m)| (*r, u.as_str(), m.role)).collect();
        roles.sort();
        let (owner, member) = (Role::Owner as i32, Role::Member as i32);
        assert_eq!(
            roles,
            vec![
                (1, "ann", member),
                (1, "bob", owner),
                (1, "cat", member),
                (2, "cat", owner),
                (2, "dan", member),
                (3, "ann", member),
                (3, "bob", member)
            ]
        );
        assert_eq!(store.read_range(1, 1, 3, "").unwrap().len(), 3, "the log is untouched");
        let format = store.with(|t| Ok(t.meta.get("format")?)).unwrap();
        assert_eq!(format.as_deref(), Some(FORMAT));
        drop(store);
        // Opened again, it is a current store: nothing is redone.
        let snap = SledStore::open(dir.path(), 8 << 20).unwrap().load().unwrap();
        assert_eq!(snap.memberships.len(), 7);
    }

    #[test]
    fn a_store_of_one_key_per_message_is_read_as_it_is_and_continued_in_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What the previous release wrote: every message under its own
            // key, format 4.
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let b = keyed_batch(1..=5, "ann");
            store.write(&b).unwrap();
            store
                .with(|t| {
                    t.messages.clear()?;
                    for a in &b.appends {
                        t.messages.insert(&message_key(a.room, a.seq)[..], a.message.as_ref())?;
                    }
                    t.meta.insert("format", FORMAT_4)?;
                    Ok(())
                })
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.rooms[0].head, 5);
        assert_eq!(store.lookup_idempotent("ann", "c4").unwrap().map(|r| r.seq), Some(4));
        store.write(&keyed_batch(6..=8, "ann")).unwrap();
        // A failed commit cut back into the old part of the log.
        assert_eq!(store.truncate(1, 4).unwrap(), 5);
        store.write(&keyed_batch(4..=9, "bob")).unwrap();
        store.sync().unwrap();
        drop(store);
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.load().unwrap().rooms[0].head, 9);
        let senders: Vec<(u64, String)> = store
            .read_range(1, 1, 9, "")
            .unwrap()
            .iter()
            .map(|b| <crate::proto::Message as prost::Message>::decode(b.as_ref()).unwrap())
            .map(|m| (m.seq, m.sender))
            .collect();
        let expected: Vec<(u64, String)> =
            (1..=9).map(|s| (s, if s < 4 { "ann" } else { "bob" }.to_string())).collect();
        assert_eq!(senders, expected);
        assert_eq!(store.lookup_idempotent("ann", "c3").unwrap().map(|r| r.seq), Some(3));
        assert_eq!(store.lookup_idempotent("ann", "c4").unwrap(), None, "truncated");
        assert_eq!(store.lookup_idempotent("bob", "c9").unwrap().map(|r| r.seq), Some(9));
        let format = store.with(|t| Ok(t.meta.get("format")?)).unwrap();
        assert_eq!(format.as_deref(), Some(FORMAT));
    }

    #[test]
    fn a_trim_a_crash_cut_short_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            for seqs in [1..=3, 4..=6, 7..=10] {
                store.write(&keyed_batch(seqs, "ann")).unwrap();
            }
            // The crash: the record of a trim to 5 is written, nothing
            // below it removed yet.
            let rec = crate::store::TrimRecord { start: 5, messages: 4, users: Vec::new() };
            store.with(|t| Ok(t.trims.insert(1u64.to_be_bytes(), prost::Message::encode_to_vec(&rec))?)).unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let snap = store.load().unwrap();
        assert_eq!((snap.rooms[0].head, snap.trims[0].1.start()), (10, 5));
        let keys: Vec<u64> = store
            .with(|t| Ok(t.messages.iter().keys().map(|k| room_id_of(&k.unwrap()[8..]).unwrap()).collect()))
            .unwrap();
        assert_eq!(keys, vec![5, 7], "the run 4-6 now starts at 5; the run 1-3 is gone");
        let seqs: Vec<u64> = store.read_messages(1, 5, 10, "").unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (5..=10).collect::<Vec<_>>());
        // The next trim goes on from there.
        let rec = store.trim(1, &crate::store::Trim { keep_from: 8, older_than_ms: 0, head: 10 }).unwrap();
        assert_eq!((rec.start(), rec.messages), (8, 7));
    }

    #[test]
    fn a_store_in_use_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path(), 8 << 20).unwrap();
        let err = SledStore::open(dir.path(), 8 << 20).err().expect("must refuse");
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
    }

    #[test]
    fn a_corrupted_store_is_refused_not_taken_for_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let mut b = Batch::default();
            b.appends.push(super::super::contract::append(1, 1, "ann", "k"));
            store.write(&b).unwrap();
            store.sync().unwrap();
        }
        let db = dir.path().join("db");
        let len = std::fs::metadata(&db).unwrap().len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(151).wrapping_add(7)).collect();
        std::fs::write(&db, garbage).unwrap();
        let err = SledStore::open(dir.path(), 8 << 20).err().expect("a corrupted store must be refused");
        assert!(err.to_string().contains("could not be read"), "{err}");
    }

    #[test]
    fn a_foreign_sled_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert("something", "else").unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 8 << 20).err().expect("must refuse");
        assert!(err.to_string().contains("did not create"), "{err}");
    }
}
