//! The server's store: sled 0.34 with an explicit `fdatasync`.
//!
//! Trees (design.md §4):
//! * `messages` — `room_id ‖ seq` (u64 BE each) → encoded `Message`. One tree
//!   for every room: sled rewrites its meta map for every new tree.
//! * `rooms` — room name → room id.
//! * `members` — `user ‖ 0 ‖ room_id` → empty.
//! * `reads` — `user ‖ 0 ‖ room_id` → read seq (u64 BE).
//! * `idem_journal` — record number (u64 BE) → the idempotency entries of
//!   one group commit (the idempotency window; [`super::idem`] says why it
//!   is a journal with an index in memory and not a record per key).
//! * `meta` — `format` → [`FORMAT`], so a foreign directory is refused. A
//!   store of the previous format ([`FORMAT_1`], a record per key in `idem`)
//!   is upgraded when it opens.
//!
//! Durability: sled's `flush` writes with `sync_file_range`, which does not
//! reach the disk's cache (sled issues 1351, 1452), so `sync` follows it
//! with `fdatasync` on the data file.
//!
//! A group commit is written as single inserts in a fixed order — room
//! names and memberships, then messages (each room's in seq order), then
//! their idempotency journal record, then read markers — not with `apply_batch`.
//! sled recovers a prefix of its log (it stops at the first torn or missing
//! segment), so a crash keeps a prefix of that order: never a message
//! without its room's name, never a gap in a room's seqs, and at most the
//! journal record of the tail missing, which `load` re-indexes. A
//! message kept that was never acknowledged is a publish whose ack was lost:
//! its retry finds it by its idempotency key. `apply_batch` would make each
//! tree's part atomic, but measured twice the cost per insert, and while it
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

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use prost::Message as _;

use super::idem::{self, Entry, IdemIndex, Loc};
use super::{
    Append, Batch, IdempotencyRecord, RoomId, RoomRecord, Snapshot, Store, StoreError, message_key, split_user_key,
    user_key,
};
use crate::proto;

/// Written to `meta/format` in a new store; anything but this and
/// [`FORMAT_1`] is refused.
pub const FORMAT: &[u8] = b"chatd-store-2";

/// The previous format: the idempotency window as one `idem` record per key
/// (`user ‖ 0 ‖ client_msg_id` → [`IdempotencyRecord::encode`]). Upgraded
/// in place when opened.
pub const FORMAT_1: &[u8] = b"chatd-store-1";

/// The tree of the idempotency journal.
const JOURNAL: &str = "idem_journal";

/// `meta` key of the last expiry's cutoff (Unix ms, u64 BE): keyed
/// messages older than it have no journal entry on purpose.
const EXPIRED_BEFORE: &str = "idem_expired_before";

/// How far back `load` looks for messages whose idempotency records were
/// lost in a crash: at least the largest batch the group commit writes.
const REPAIR_WINDOW: u64 = super::commit::MAX_BATCH_OPS as u64;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// The trees of one open sled database.
struct Trees {
    db: sled::Db,
    messages: sled::Tree,
    rooms: sled::Tree,
    members: sled::Tree,
    reads: sled::Tree,
    journal: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, opened once so `sync` is one `fdatasync`.
    data_file: File,
}

/// The sled-backed store.
pub struct SledStore {
    /// `None` only while a failed database is being replaced by a reopened
    /// one (or reopening failed; the next probe tries again).
    trees: RwLock<Option<Trees>>,
    path: PathBuf,
    cache_bytes: u64,
    /// The idempotency window's index (see [`super::idem`]).
    index: Mutex<IdemIndex>,
    /// Number of the next journal record. Only grows, also across a reopen.
    next_record: AtomicU64,
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with a page cache of
    /// `cache_bytes` (sled's 1 GiB default is far too much for a chat node).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
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
        })
    }

    fn index(&self) -> MutexGuard<'_, IdemIndex> {
        // Every change to the index is complete before the next one starts,
        // so a panic elsewhere cannot leave it half-updated.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `entries` as journal records numbered on from `next_record`.
    fn put_journal<'a>(&self, t: &Trees, entries: impl Iterator<Item = Entry<'a>>) -> Result<(), StoreError> {
        write_journal(&t.journal, entries, || self.next_record.fetch_add(1, Ordering::Relaxed))
    }

    /// Re-creates the journal entries lost between the messages and the
    /// journal record of the last group commit before a crash. Messages
    /// older than the last expiry's cutoff are past the window: their
    /// entries were expired, not lost.
    fn repair_idempotency(&self, t: &Trees, room: RoomId, head: u64, expired_before: u64) -> Result<usize, StoreError> {
        let mut lost = Vec::new();
        let from = head.saturating_sub(REPAIR_WINDOW) + 1;
        let range = message_key(room, from)..=message_key(room, head);
        for kv in t.messages.range(range).rev() {
            let (k, v) = kv?;
            let msg = decode_message(&k, &v)?;
            if msg.ts_ms < expired_before {
                break;
            }
            if msg.client_msg_id.is_empty() {
                continue;
            }
            let loc = Loc { room, seq: msg.seq };
            if self.index().candidates(&msg.sender, &msg.client_msg_id).contains(&loc) {
                // Batches are synced in order, so everything older is indexed.
                break;
            }
            lost.push(msg);
        }
        lost.reverse();
        let entries = lost.iter().map(|m| Entry {
            room,
            seq: m.seq,
            ts_ms: m.ts_ms,
            user: &m.sender,
            client_msg_id: &m.client_msg_id,
        });
        self.put_journal(t, entries.clone())?;
        let mut index = self.index();
        for e in entries {
            index.insert(e.user, e.client_msg_id, e.loc());
        }
        Ok(lost.len())
    }

    /// Removes the journal entries of `room` with `seq >= from`. They are
    /// the newest records' (truncation follows a failed commit), so the scan
    /// runs from the end and stops at records older than `oldest_ts_ms`
    /// (less a minute, for a clock that stepped back).
    fn drop_journal_entries(&self, t: &Trees, room: RoomId, from: u64, oldest_ts_ms: u64) -> Result<(), StoreError> {
        let stop_below = oldest_ts_ms.saturating_sub(60_000);
        for kv in t.journal.iter().rev() {
            let (k, v) = kv?;
            let entries = decode_record(&k, &v)?;
            if entries.iter().all(|e| e.ts_ms < stop_below) {
                break;
            }
            if entries.iter().any(|e| e.room == room && e.seq >= from) {
                keep_in_record(&t.journal, &k, entries.iter().filter(|e| !(e.room == room && e.seq >= from)))?;
            }
        }
        Ok(())
    }

    /// Runs `f` on the open database.
    fn with<R>(&self, f: impl FnOnce(&Trees) -> Result<R, StoreError>) -> Result<R, StoreError> {
        match self.trees.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(t) => f(t),
            None => Err(StoreError::Db("the database failed and could not be reopened yet".into())),
        }
    }

    /// Replaces the database with a freshly opened one.
    ///
    /// sled 0.34 keeps the first I/O error it meets (its "global error") and
    /// fails every later write, so after a full disk or an I/O error the only
    /// way back is a new instance. The old one cannot be dropped: its final
    /// flush waits forever for the write that failed (0.34.7,
    /// `make_stable_inner`). So it is leaked — its cache memory and idle
    /// threads stay — and its descriptors of the data file are pointed at
    /// `/dev/null`, which releases its lock on the file and makes sure it can
    /// never write into the reopened database. What the reopened database
    /// holds is what reached the disk; the commit writer then truncates what
    /// was never acknowledged.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut trees = self.trees.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = trees.take() {
            let Trees { db, messages, rooms, members, reads, journal, meta, data_file } = old;
            drop(data_file);
            std::mem::forget((db, messages, rooms, members, reads, journal, meta));
            let detached = detach_file(&self.path.join("db"))?;
            tracing::warn!(path = %self.path.display(), detached, "reopening the database after a storage failure");
        }
        *trees = Some(Trees::open(&self.path, self.cache_bytes)?);
        Ok(())
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Trees {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // A store that existed must still have our format marker after the
        // open: sled recovers an unreadable log as an empty database, and
        // taking that for a new store would silently start over.
        let existed = std::fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let db = open_db(dir, cache_bytes)?;
        let data_file = File::open(dir.join("db"))?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(v) if v.as_ref() == FORMAT => {}
            Some(v) if v.as_ref() == FORMAT_1 => upgrade_from_format_1(&db, &meta, &data_file)?,
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "{} holds store format {:?}, this build reads {:?}",
                    dir.display(),
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(FORMAT)
                )));
            }
            None => {
                let foreign = db.tree_names().iter().any(|n| {
                    let n = n.as_ref();
                    n != b"__sled__default" && n != b"meta" && !db.open_tree(n).map(|t| t.is_empty()).unwrap_or(true)
                }) || !db.is_empty();
                if foreign {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds a sled database that chatd did not create",
                        dir.display()
                    )));
                }
                if existed {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds a sled database whose contents could not be read (corrupted?); \
                         refusing to start over it — move it aside to start with an empty store",
                        dir.display()
                    )));
                }
                meta.insert("format", FORMAT)?;
                db.flush()?;
            }
        }
        Ok(Trees {
            messages: db.open_tree("messages")?,
            rooms: db.open_tree("rooms")?,
            members: db.open_tree("members")?,
            reads: db.open_tree("reads")?,
            journal: db.open_tree(JOURNAL)?,
            meta,
            db,
            data_file,
        })
    }

    fn head_of(&self, room: RoomId) -> Result<u64, StoreError> {
        let range = message_key(room, 0)..=message_key(room, u64::MAX);
        Ok(match self.messages.range(range).next_back() {
            Some(kv) => {
                let (k, _) = kv?;
                u64::from_be_bytes(k[8..16].try_into().map_err(|_| corrupt_key(&k))?)
            }
            None => 0,
        })
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }
}

fn decode_message(k: &[u8], v: &[u8]) -> Result<proto::Message, StoreError> {
    proto::Message::decode(v).map_err(|e| StoreError::Corrupt(format!("message {k:?} does not decode: {e}")))
}

fn decode_record<'a>(k: &[u8], v: &'a [u8]) -> Result<Vec<Entry<'a>>, StoreError> {
    idem::decode_record(v).ok_or_else(|| StoreError::Corrupt(format!("idempotency journal record {k:?} is malformed")))
}

fn record_number(k: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(k.try_into().map_err(|_| corrupt_key(k))?))
}

/// The journal entries of a batch's appends that carry a key.
fn journal_entries(appends: &[Append]) -> impl Iterator<Item = Entry<'_>> + Clone {
    appends.iter().filter(|a| !a.client_msg_id.is_empty()).map(|a| Entry {
        room: a.room,
        seq: a.seq,
        ts_ms: a.ts_ms,
        user: &a.sender,
        client_msg_id: &a.client_msg_id,
    })
}

/// Writes `entries` as journal records, each closed when it reaches
/// [`idem::RECORD_BYTES`], keyed by the numbers `next` hands out.
fn write_journal<'a>(
    journal: &sled::Tree,
    entries: impl Iterator<Item = Entry<'a>>,
    mut next: impl FnMut() -> u64,
) -> Result<(), StoreError> {
    let mut record = Vec::new();
    for e in entries {
        e.encode(&mut record);
        if record.len() >= idem::RECORD_BYTES {
            journal.insert(&next().to_be_bytes()[..], &record[..])?;
            record.clear();
        }
    }
    if !record.is_empty() {
        journal.insert(&next().to_be_bytes()[..], &record[..])?;
    }
    Ok(())
}

/// Rewrites journal record `key` with only `kept` of its entries, or
/// removes it when none are left.
fn keep_in_record<'a>(
    journal: &sled::Tree,
    key: &[u8],
    kept: impl Iterator<Item = &'a Entry<'a>>,
) -> Result<(), StoreError> {
    let mut rest = Vec::new();
    for e in kept {
        e.encode(&mut rest);
    }
    if rest.is_empty() {
        journal.remove(key)?;
    } else {
        journal.insert(key, rest)?;
    }
    Ok(())
}

/// Moves a [`FORMAT_1`] store's idempotency records into the journal, in
/// timestamp order, then marks the store [`FORMAT`]. Written in that order,
/// a crash part way leaves a format-1 store, and the upgrade starts over.
fn upgrade_from_format_1(db: &sled::Db, meta: &sled::Tree, data_file: &File) -> Result<(), StoreError> {
    let old = db.open_tree("idem")?;
    let journal = db.open_tree(JOURNAL)?;
    journal.clear()?;
    let mut ids = Vec::new();
    for kv in old.iter() {
        let (k, v) = kv?;
        let (user, key) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
        let key = std::str::from_utf8(key).map_err(|_| corrupt_key(&k))?;
        let rec = IdempotencyRecord::decode(&v).ok_or_else(|| corrupt_key(&k))?;
        ids.push((rec.ts_ms, rec.room, rec.seq, user.to_string(), key.to_string()));
    }
    ids.sort();
    let entries = ids.iter().map(|(ts_ms, room, seq, user, key)| Entry {
        room: *room,
        seq: *seq,
        ts_ms: *ts_ms,
        user,
        client_msg_id: key,
    });
    let mut n = 0u64;
    write_journal(&journal, entries, || {
        n += 1;
        n - 1
    })?;
    meta.insert("format", FORMAT)?;
    db.drop_tree("idem")?;
    db.flush()?;
    data_file.sync_data()?;
    tracing::info!(ids = ids.len(), "store upgraded from chatd-store-1: the idempotency window is now a journal");
    Ok(())
}

/// Free space a recovering store must find before it reopens: a few of
/// sled's I/O buffers, so the fresh instance does not fail (and leak) again
/// at once.
const PROBE_BYTES: usize = 16 << 20;

/// Writes and syncs [`PROBE_BYTES`] in a scratch file in `dir`, then removes it.
fn check_writable(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write as _;
    let path = dir.join("probe.tmp");
    let written = File::create(&path).and_then(|mut f| {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..PROBE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_data()
    });
    let _ = std::fs::remove_file(&path);
    Ok(written?)
}

/// Points every descriptor this process holds on `file` at `/dev/null`
/// (Linux: found through `/proc/self/fd`); returns how many.
fn detach_file(file: &Path) -> Result<usize, StoreError> {
    let target = std::fs::canonicalize(file)?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let mut detached = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::read_link(entry.path()).is_ok_and(|p| p == target) {
            // SAFETY: dup2 replaces the descriptor atomically; the owner (the
            // leaked sled instance) keeps a valid descriptor number, which now
            // refers to /dev/null instead of the database file.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            detached += 1;
        }
    }
    Ok(detached)
}

/// How long `open` waits for the lock of a store that is being closed.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database, waiting briefly for its lock: sled writes its
/// I/O buffers from a thread pool whose last jobs may still hold the file
/// for a moment after the previous owner closed it (a quick restart).
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).open();
        match opened {
            Ok(db) => return Ok(db),
            // sled reports a held lock only as text (config.rs, 0.34.7).
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::InUse(dir.display().to_string()));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(StoreError::Corrupt(format!("cannot open sled database in {}: {e}", dir.display()))),
        }
    }
}

fn corrupt_key(k: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("malformed key {k:?}"))
}

fn room_id_of(v: &[u8]) -> Result<RoomId, StoreError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| corrupt_key(v))?))
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with(|t| {
            let mut snap = Snapshot::default();
            let mut repaired = 0;
            let expired_before = t.meta.get(EXPIRED_BEFORE)?.map_or(Ok(0), |v| record_number(&v))?;
            for kv in t.rooms.iter() {
                let (k, v) = kv?;
                let name = String::from_utf8(k.to_vec()).map_err(|_| corrupt_key(&k))?;
                let id = room_id_of(&v)?;
                let head = t.head_of(id)?;
                repaired += self.repair_idempotency(t, id, head, expired_before)?;
                snap.rooms.push(RoomRecord { name, id, head });
            }
            if repaired > 0 {
                t.sync()?;
                tracing::warn!(repaired, "re-indexed idempotency records lost in a crash");
            }
            for kv in t.members.iter() {
                let (k, _) = kv?;
                let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
                snap.memberships.push((user.to_string(), room_id_of(room)?));
            }
            for kv in t.reads.iter() {
                let (k, v) = kv?;
                let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
                snap.read_markers.push((user.to_string(), room_id_of(room)?, room_id_of(&v)?));
            }
            Ok(snap)
        })
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        self.with(|t| {
            // The order is what a crash keeps a prefix of (module docs):
            // rooms and memberships first, so a message is never stored for
            // a room whose name could be lost; records after their messages.
            for m in &batch.memberships {
                t.rooms.insert(m.room_name.as_bytes(), &m.room.to_be_bytes()[..])?;
                let key = user_key(&m.user, &m.room.to_be_bytes());
                if m.member {
                    t.members.insert(key, &[][..])?;
                } else {
                    t.members.remove(key)?;
                }
            }
            for a in &batch.appends {
                t.messages.insert(&message_key(a.room, a.seq)[..], a.message.as_ref())?;
            }
            self.put_journal(t, journal_entries(&batch.appends))?;
            for r in &batch.read_markers {
                t.reads.insert(user_key(&r.user, &r.room.to_be_bytes()), &r.seq.to_be_bytes()[..])?;
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
            let mut messages = Vec::new();
            let mut keyed = Vec::new();
            for kv in t.messages.range(message_key(room, from)..=message_key(room, u64::MAX)) {
                let (k, v) = kv?;
                let msg = decode_message(&k, &v)?;
                if !msg.client_msg_id.is_empty() {
                    keyed.push(msg);
                }
                messages.push(k);
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
                index.remove(&m.sender, &m.client_msg_id, Loc { room, seq: m.seq });
            }
            drop(index);
            // Then the messages from the newest back, so a crash part way
            // leaves the log contiguous.
            for key in messages.iter().rev() {
                t.messages.remove(key)?;
            }
            Ok(messages.len())
        })
    }

    fn read_range(&self, room: RoomId, from: u64, to: u64) -> Result<Vec<Bytes>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        self.with(|t| {
            t.messages
                .range(message_key(room, from)..=message_key(room, to))
                .map(|kv| kv.map(|(_, v)| Bytes::copy_from_slice(&v)).map_err(StoreError::from))
                .collect()
        })
    }

    fn lookup_idempotent(&self, sender: &str, client_msg_id: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let candidates = self.index().candidates(sender, client_msg_id);
        if candidates.is_empty() {
            return Ok(None);
        }
        self.with(|t| {
            for loc in candidates {
                let key = message_key(loc.room, loc.seq);
                let Some(v) = t.messages.get(key)? else { continue };
                let msg = decode_message(&key, &v)?;
                if msg.sender == sender && msg.client_msg_id == client_msg_id {
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

    fn size_on_disk(&self) -> u64 {
        self.with(|t| Ok(t.db.size_on_disk()?)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            b.memberships.push(super::super::MembershipChange {
                user: "ann".into(),
                room_name: "r".into(),
                room: 7,
                member: true,
            });
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
        b.memberships.push(super::super::MembershipChange {
            user: sender.into(),
            room_name: "r".into(),
            room: 1,
            member: true,
        });
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
