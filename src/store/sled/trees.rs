//! Opening the database: the trees, the format marker, the file lock.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message as _;

use super::journal::JOURNAL;
use super::upgrade::{upgrade_from_format_1, upgrade_from_format_2, upgrade_from_format_3};
use crate::proto;
use crate::store::fold::{Kv, Side};
use crate::store::{RoomId, StoreError, TrimRecord};

/// Written to `meta/format` in a new store; anything but this,
/// [`FORMAT_4`], [`FORMAT_3`], [`FORMAT_2`] and [`FORMAT_1`] is refused.
pub const FORMAT: &[u8] = b"chatd-store-5";

/// The format before runs ([`super::runs`]): one key per message. This
/// build reads such values as they are, so the upgrade only changes the
/// marker — which an older build then refuses rather than misread a run.
pub const FORMAT_4: &[u8] = b"chatd-store-4";

/// The format before message changes: no `folds`, `reactions`, `counts`
/// or `deleted` trees, and read markers without the counts through them.
/// Upgraded in place when opened.
pub const FORMAT_3: &[u8] = b"chatd-store-3";

/// The format before rooms had kinds and members roles: `rooms` values
/// were the id alone, `members` values empty, and there were no `bans` or
/// `invites` trees.
/// Upgraded in place when opened.
pub const FORMAT_2: &[u8] = b"chatd-store-2";

/// The previous format: the idempotency window as one `idem` record per key
/// (`user ‖ 0 ‖ client_msg_id` → [`IdempotencyRecord::encode`]). Upgraded
/// in place when opened.
pub const FORMAT_1: &[u8] = b"chatd-store-1";

/// The trees of one open sled database.
pub(super) struct Trees {
    pub(super) db: sled::Db,
    pub(super) messages: sled::Tree,
    pub(super) rooms: sled::Tree,
    pub(super) members: sled::Tree,
    pub(super) bans: sled::Tree,
    pub(super) invites: sled::Tree,
    pub(super) revocations: sled::Tree,
    pub(super) reads: sled::Tree,
    pub(super) journal: sled::Tree,
    pub(super) folds: sled::Tree,
    pub(super) reactions: sled::Tree,
    pub(super) reacted: sled::Tree,
    pub(super) counts: sled::Tree,
    pub(super) deleted: sled::Tree,
    pub(super) trims: sled::Tree,
    pub(super) meta: sled::Tree,
    /// sled's data file, opened once so `sync` is one `fdatasync`.
    pub(super) data_file: File,
    /// The log items sled keeps in files of their own.
    pub(super) blobs: Blobs,
}

/// sled's `blobs` directory: a log item too large for its segment (a big
/// value, or a leaf rewritten whole) is written to a file of its own there,
/// named by its LSN, and the log holds a pointer to it. sled 0.34 never
/// syncs that file nor the directory (`pagecache::blob_io::write_blob`), so
/// the `fdatasync` of the data file alone made the pointer durable without
/// what it points to: after a power cut sled's recovery cannot read the
/// blob, ends the log there and removes every blob above — taking every
/// write after it, acknowledged ones included (found by the power-cut
/// battery, tests/it/powerloss.rs). `sync` syncs each new blob file and the
/// directory before the data file.
pub(super) struct Blobs {
    dir: PathBuf,
    /// Blob files synced already; a file is written once, before the log
    /// item pointing to it is flushed.
    synced: Mutex<HashSet<OsString>>,
}

impl Blobs {
    pub(super) fn new(store: &Path) -> Blobs {
        Blobs { dir: store.join("blobs"), synced: Mutex::new(HashSet::new()) }
    }

    /// Syncs every blob file not synced yet, then the directory naming
    /// them. Reads the directory each time: sled keeps few blobs (it
    /// removes those nothing in the log points to any more), and a listing
    /// costs little next to the `fdatasync` that follows.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = HashSet::new();
        let mut new = false;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Removed by sled since the listing: nothing to sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&self.dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

impl Trees {
    pub(super) fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // A store that existed must still have our format marker after the
        // open: sled recovers an unreadable log as an empty database, and
        // taking that for a new store would silently start over.
        let existed = std::fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let db = open_db(dir, cache_bytes)?;
        let data_file = File::open(dir.join("db"))?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(v) if v.as_ref() == FORMAT => {}
            Some(v) if v.as_ref() == FORMAT_1 => {
                upgrade_from_format_1(&db, &meta, &data_file)?;
                upgrade_from_format_2(&db, &meta, &data_file)?;
                upgrade_from_format_3(&db, &meta, &data_file)?;
            }
            Some(v) if v.as_ref() == FORMAT_2 => {
                upgrade_from_format_2(&db, &meta, &data_file)?;
                upgrade_from_format_3(&db, &meta, &data_file)?;
            }
            Some(v) if v.as_ref() == FORMAT_3 => upgrade_from_format_3(&db, &meta, &data_file)?,
            Some(v) if v.as_ref() == FORMAT_4 => {
                meta.insert("format", FORMAT)?;
                db.flush()?;
                data_file.sync_data()?;
                tracing::info!("store upgraded from chatd-store-4: new commits write runs");
            }
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
                // Durable whatever the durability mode: a new store whose
                // marker a power cut took would be refused as unreadable.
                db.flush()?;
                data_file.sync_data()?;
            }
        }
        Ok(Trees {
            messages: db.open_tree("messages")?,
            rooms: db.open_tree("rooms")?,
            members: db.open_tree("members")?,
            bans: db.open_tree("bans")?,
            invites: db.open_tree("invites")?,
            revocations: db.open_tree("revocations")?,
            reads: db.open_tree("reads")?,
            journal: db.open_tree(JOURNAL)?,
            folds: db.open_tree("folds")?,
            reactions: db.open_tree("reactions")?,
            reacted: db.open_tree("reacted")?,
            counts: db.open_tree("counts")?,
            deleted: db.open_tree("deleted")?,
            trims: db.open_tree("trims")?,
            meta,
            db,
            data_file,
            blobs: Blobs::new(dir),
        })
    }

    /// The head of `room`: its last entry, or the entry before its start
    /// when retention removed every one (seqs are never reused).
    pub(super) fn head_of(&self, room: RoomId) -> Result<u64, StoreError> {
        let start = self.trim_of(room)?.map_or(1, |t| t.start());
        Ok(self.last_entry(room)?.max(start - 1))
    }

    /// The trim record of `room`, if retention trimmed it.
    pub(super) fn trim_of(&self, room: RoomId) -> Result<Option<TrimRecord>, StoreError> {
        self.trims.get(room.to_be_bytes())?.map(|v| TrimRecord::decode_stored(&v)).transpose()
    }

    fn side(&self, side: Side) -> &sled::Tree {
        match side {
            Side::Messages => &self.messages,
            Side::Folds => &self.folds,
            Side::Reactions => &self.reactions,
            Side::Reacted => &self.reacted,
            Side::Counts => &self.counts,
            Side::Deleted => &self.deleted,
        }
    }

    /// What the flush wrote, durable: the blob files the log points to
    /// first, then the log.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.blobs.sync()?;
        self.data_file.sync_data()?;
        Ok(())
    }
}

/// A messages key split into its room and seq.
fn entry_key(key: &[u8]) -> Result<(RoomId, u64), StoreError> {
    match (key.get(..8), key.get(8..16)) {
        (Some(room), Some(seq)) if key.len() == 16 => Ok((room_id_of(room)?, room_id_of(seq)?)),
        _ => Err(corrupt_key(key)),
    }
}

/// The state beside the log reads and rewrites entries one seq at a time;
/// in the messages tree they live in runs ([`super::runs`]).
impl Kv for &Trees {
    fn get(&mut self, side: Side, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if side == Side::Messages {
            let (room, seq) = entry_key(key)?;
            return Ok(self.entry(room, seq)?.map(|m| m.to_vec()));
        }
        Ok(self.side(side).get(key)?.map(|v| v.to_vec()))
    }
    fn put(&mut self, side: Side, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if side == Side::Messages {
            let (room, seq) = entry_key(key)?;
            return self.replace_entry(room, seq, value);
        }
        self.side(side).insert(key, value)?;
        Ok(())
    }
    fn del(&mut self, side: Side, key: &[u8]) -> Result<(), StoreError> {
        if side == Side::Messages {
            // Entries are only rewritten in place (erased) or cut from the
            // end of the log (`Trees::cut_from`), never removed one by one:
            // that would leave a gap.
            return Err(StoreError::Corrupt(format!("refused to remove the single log entry {key:?}")));
        }
        self.side(side).remove(key)?;
        Ok(())
    }
    fn prefix(&mut self, side: Side, prefix: &[u8]) -> Result<crate::store::fold::Records, StoreError> {
        self.side(side)
            .scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }
    fn range(&mut self, side: Side, start: &[u8], end: &[u8]) -> Result<crate::store::fold::Records, StoreError> {
        self.side(side)
            .range(start..end)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }
}

/// How long `open` waits for the lock of a store that is being closed.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database, waiting briefly for its lock: sled writes its
/// I/O buffers from a thread pool whose last jobs may still hold the file
/// for a moment after the previous owner closed it (a quick restart).
pub(super) fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // No periodic flush of sled's own: it ends in an fsync of the data
        // file (0.34.7, flusher.rs) that can make the log's pointer to a
        // blob file durable before the blob (`Blobs`) — after a power cut
        // sled then fails to open the store (ENOENT; the power-cut battery,
        // `batch` durability, 3 runs in 5). chatd flushes itself: every
        // commit (`fsync`), every `batch_sync_ms` (`batch`), at shutdown.
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open();
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

pub(super) fn decode_message(k: &[u8], v: &[u8]) -> Result<proto::Message, StoreError> {
    proto::Message::decode(v).map_err(|e| StoreError::Corrupt(format!("message {k:?} does not decode: {e}")))
}

pub(super) fn corrupt_key(k: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("malformed key {k:?}"))
}

pub(super) fn room_id_of(v: &[u8]) -> Result<RoomId, StoreError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| corrupt_key(v))?))
}

/// A `rooms` value: the id (u64 BE), then the encoded [`RoomDetails`] —
/// one key per room, not a tree of details beside the names.
pub(super) fn room_value(id: RoomId, details: &crate::store::RoomDetails) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    prost::Message::encode(details, &mut v).expect("a Vec grows");
    v
}

/// Splits a `rooms` value into the id and the details.
pub(super) fn parse_room_value(v: &[u8]) -> Result<(RoomId, crate::store::RoomDetails), StoreError> {
    let (id, details) = v.split_at_checked(8).ok_or_else(|| corrupt_key(v))?;
    let details = crate::store::RoomDetails::decode(details)
        .map_err(|e| StoreError::Corrupt(format!("room details {v:?} do not decode: {e}")))?;
    Ok((room_id_of(id)?, details))
}
