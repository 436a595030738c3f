//! Backup and restore of the store (`chatd backup`, `chatd restore`;
//! README.md, "Backup and restore").
//!
//! **The point.** A backup is the store as it stood at one *point* between
//! two group commits: every batch committed before it, none after. sled
//! 0.34 has no snapshots, so the point is made in two steps:
//!
//! 1. While no group commit writes ([`SledStore::backup_point`], run as a
//!    [`Write::Exclusive`](crate::store::commit::Write::Exclusive) by a
//!    running server, or directly on a store nobody else has open), every
//!    tree but `messages` is copied into memory whole — rooms, members,
//!    bans, invitations, revocations, read markers, the idempotency
//!    journal, the state beside the log, `meta` — and, per room, the last
//!    key of its log. These trees are small beside the log, so the group
//!    commit (and every publish behind it) waits only for them.
//! 2. Then commits go on, and the log is copied: of each room, the keys up
//!    to its last key at the point. A `messages` key is `room_id ‖ seq`
//!    (u64 BE each), the seq being the first of the entries its value holds,
//!    and a value holds entries of one group commit only, so the keys up to
//!    the point's last are exactly the room's log at the point. Values are
//!    copied as they are, never decoded: the backup does not depend on how
//!    a value holds its entries. A room created after the point is not in
//!    the backup at all (its name is not in the `rooms` copied).
//!
//! The store's `maintenance` lock is held for the whole backup, so no
//! trim (retention, which removes a room's oldest runs and rewrites the
//! run its new start falls in) changes the log while it is copied: it runs
//! in the group commit's writer, which a backup holding the lock may wait
//! for, so it only tries the lock and skips the pass when a backup holds
//! it.
//!
//! What can change below the point while the log is copied: a `Delete`
//! committed after the point overwrites its target's stored content
//! ([`super::super::fold`]), so the backup may hold that message erased.
//! An erased message is marked deleted itself, so it reads as deleted
//! whatever the state beside the log taken at the point says: an erasure
//! is never undone by a restore. Edits and reactions change only the state
//! beside the log and are not affected.
//!
//! **The file.** Big-endian integers throughout:
//!
//! ```text
//! header   "CHATDBAK" ‖ version u32 (1) ‖ point, Unix ms u64 ‖ format length u16 ‖ format marker
//! tree     'T' ‖ name length u16 ‖ name          (the records after it are of this tree)
//! record   'R' ‖ key length u32 ‖ key ‖ value length u32 ‖ value
//! trailer  'E' ‖ records u64 ‖ CRC-32 u32
//! ```
//!
//! The CRC-32 (IEEE) covers every byte before it, and nothing may follow
//! the trailer, so a truncated or altered file is refused. The format
//! marker is the store's (`meta/format`): a restore refuses a marker this
//! build cannot open, and a store of an older format is upgraded when the
//! restored store is opened.
//!
//! **Restore** ([`restore`]) writes the records into a fresh database
//! beside the target (`store.restoring`), checks the trailer, opens the
//! result as a store (which upgrades an older format and finishes what a
//! crash could have left half-applied), syncs it, and only then renames it
//! into place: an interrupted restore leaves no store behind, and the next
//! restore removes its leftovers.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SledStore;
use super::trees::{Blobs, FORMAT, FORMAT_1, FORMAT_2, FORMAT_3, FORMAT_4, open_db};
use crate::store::{Store, StoreError};

/// The first bytes of a backup file.
pub const MAGIC: &[u8; 8] = b"CHATDBAK";

/// The version of the file format this build writes and reads.
pub const VERSION: u32 = 1;

const TREE: u8 = b'T';
const RECORD: u8 = b'R';
const END: u8 = b'E';

/// The log: copied after the point, up to each room's last key at it.
const MESSAGES: &[u8] = b"messages";

/// Records of the log read per hold of the store (the output is written
/// with the store released, so a slow reader of the backup never holds it).
const CHUNK: usize = 1024;

/// The longest key or value a backup may hold; a length beyond it is a
/// corrupted file, refused before anything is allocated for it.
const MAX_LEN: u32 = 1 << 30;

/// Store formats a restore accepts: this build's, and the older ones
/// opening upgrades.
const READABLE: &[&[u8]] = &[FORMAT, FORMAT_4, FORMAT_3, FORMAT_2, FORMAT_1];

/// Why a backup or a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the store, or opening the restored one, failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing a file or a stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The input is not a complete, intact backup.
    #[error("not a usable chatd backup: {0}")]
    Invalid(String),
    /// The request cannot be carried out as asked (a target that exists,
    /// a store format this build cannot open).
    #[error("{0}")]
    Refused(String),
}

/// What a backup takes at its point, while no group commit writes.
pub struct Point {
    /// The store's format marker.
    format: Vec<u8>,
    /// Every tree but `messages`, whole, by name.
    trees: Vec<(sled::IVec, Vec<(sled::IVec, sled::IVec)>)>,
    /// Each room's last `messages` key, in key order (a room's keys start
    /// with its id, the first 8 bytes).
    last_keys: Vec<sled::IVec>,
    /// When it was taken (Unix ms).
    at_ms: u64,
    /// How long taking it held up the group commit.
    pub stall: Duration,
}

/// Takes a backup's point; run it where no group commit writes.
pub type TakePoint = Box<dyn FnOnce() -> Result<Point, StoreError> + Send>;

/// What a backup wrote, or a restore read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records (keys) of every tree.
    pub records: u64,
    /// Of those, records of the log.
    pub log_records: u64,
    /// Rooms with a log.
    pub rooms: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// The point, Unix ms.
    pub at_ms: u64,
    /// The store's format marker.
    pub format: String,
    /// How long the group commit waited for the point (0 for a restore).
    pub stall: Duration,
}

impl SledStore {
    /// Takes the point of a backup (module docs): must run while nothing
    /// writes to the store.
    pub fn backup_point(&self) -> Result<Point, StoreError> {
        let started = Instant::now();
        self.with(|t| {
            let format = t.meta.get("format")?.ok_or_else(|| StoreError::Corrupt("no format marker".into()))?;
            let mut trees = Vec::new();
            for name in t.db.tree_names() {
                if name.as_ref() == MESSAGES {
                    continue;
                }
                let records = t.db.open_tree(&name)?.iter().collect::<Result<Vec<_>, _>>()?;
                trees.push((name, records));
            }
            // One step per room: its first key tells the room, its last
            // key is searched from the end of the room's range.
            let mut last_keys = Vec::new();
            let mut from = Vec::new();
            while let Some(kv) = t.messages.range(from.as_slice()..).next() {
                let (first, _) = kv?;
                let room: [u8; 8] = first.get(..8).and_then(|r| r.try_into().ok()).ok_or_else(|| bad_key(&first))?;
                let (last, _) = t.messages.scan_prefix(room).next_back().ok_or_else(|| bad_key(&first))??;
                last_keys.push(last);
                match u64::from_be_bytes(room).checked_add(1) {
                    Some(next) => from = next.to_be_bytes().to_vec(),
                    None => break,
                }
            }
            Ok(Point {
                format: format.to_vec(),
                trees,
                last_keys,
                at_ms: crate::time::now_ms(),
                stall: started.elapsed(),
            })
        })
    }
}

/// Writes a backup of `store` to `out`. `at_point` must run the
/// [`TakePoint`] it is given where no group commit writes (in a running
/// server, as a [`Write::Exclusive`](crate::store::commit::Write::Exclusive)),
/// and return its point.
pub fn backup(
    store: &Arc<SledStore>,
    at_point: impl FnOnce(TakePoint) -> Result<Point, BackupError>,
    out: &mut dyn Write,
) -> Result<Summary, BackupError> {
    // Held until the log is copied: nothing removes entries from it
    // meanwhile.
    let _maintenance = store.maintenance();
    let taken = store.clone();
    let point = at_point(Box::new(move || taken.backup_point()))?;
    let mut enc = Encoder::new(out);
    enc.header(point.at_ms, &point.format)?;
    for (name, records) in &point.trees {
        enc.tree(name)?;
        for (k, v) in records {
            enc.record(k, v)?;
        }
    }
    let before_log = enc.records;
    enc.tree(MESSAGES)?;
    for last in &point.last_keys {
        let room = &last[..8];
        let mut from = room.to_vec();
        loop {
            let chunk = store.with(|t| {
                let range = t.messages.range(from.as_slice()..=last.as_ref());
                Ok(range.take(CHUNK).collect::<Result<Vec<_>, _>>()?)
            })?;
            for (k, v) in &chunk {
                enc.record(k, v)?;
            }
            match chunk.last() {
                Some((k, _)) if chunk.len() == CHUNK && k != last => {
                    from = k.to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
    }
    let log_records = enc.records - before_log;
    let bytes = enc.finish()?;
    Ok(Summary {
        records: before_log + log_records,
        log_records,
        rooms: point.last_keys.len() as u64,
        bytes,
        at_ms: point.at_ms,
        format: String::from_utf8_lossy(&point.format).into_owned(),
        stall: point.stall,
    })
}

fn bad_key(k: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("malformed message key {k:?}"))
}

/// Writes the file format, keeping the count and the checksum.
struct Encoder<'a> {
    out: BufWriter<&'a mut dyn Write>,
    crc: crc32fast::Hasher,
    bytes: u64,
    records: u64,
}

impl<'a> Encoder<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        Encoder { out: BufWriter::with_capacity(256 << 10, out), crc: crc32fast::Hasher::new(), bytes: 0, records: 0 }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)
    }

    fn header(&mut self, at_ms: u64, format: &[u8]) -> io::Result<()> {
        self.put(MAGIC)?;
        self.put(&VERSION.to_be_bytes())?;
        self.put(&at_ms.to_be_bytes())?;
        self.put(&(format.len() as u16).to_be_bytes())?;
        self.put(format)
    }

    fn tree(&mut self, name: &[u8]) -> io::Result<()> {
        self.put(&[TREE])?;
        self.put(&(name.len() as u16).to_be_bytes())?;
        self.put(name)
    }

    fn record(&mut self, k: &[u8], v: &[u8]) -> io::Result<()> {
        self.put(&[RECORD])?;
        self.put(&(k.len() as u32).to_be_bytes())?;
        self.put(k)?;
        self.put(&(v.len() as u32).to_be_bytes())?;
        self.put(v)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the trailer and flushes; returns the file's size.
    fn finish(mut self) -> io::Result<u64> {
        self.put(&[END])?;
        self.put(&self.records.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_be_bytes())?;
        self.out.flush()?;
        Ok(self.bytes + 4)
    }
}

/// Reads the file format, checking the checksum as it goes.
struct Decoder<R> {
    input: R,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<R: BufRead> Decoder<R> {
    fn exact(&mut self, n: usize) -> Result<Vec<u8>, BackupError> {
        let mut buf = Vec::new();
        (&mut self.input).take(n as u64).read_to_end(&mut buf)?;
        if buf.len() < n {
            return Err(BackupError::Invalid(format!(
                "the file ends at byte {} (truncated?)",
                self.bytes + buf.len() as u64
            )));
        }
        self.crc.update(&buf);
        self.bytes += n as u64;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BackupError> {
        Ok(self.exact(N)?.try_into().expect("N bytes"))
    }

    fn len(&mut self, what: &str) -> Result<usize, BackupError> {
        let n = u32::from_be_bytes(self.array()?);
        if n > MAX_LEN {
            return Err(BackupError::Invalid(format!("a {what} of {n} bytes at byte {} (corrupted?)", self.bytes)));
        }
        Ok(n as usize)
    }
}

/// One step of reading a backup.
pub enum Item<'a> {
    /// The records that follow are of the tree of this name.
    Tree(&'a [u8]),
    /// A key and its value.
    Record(&'a [u8], &'a [u8]),
}

/// Reads a backup from `input`, handing each tree and record to `visit`,
/// and checks it whole: nothing handed over may be kept unless this
/// returns `Ok`.
pub fn read(
    input: &mut dyn Read,
    mut visit: impl FnMut(Item<'_>) -> Result<(), BackupError>,
) -> Result<Summary, BackupError> {
    let mut d = Decoder { input: BufReader::with_capacity(256 << 10, input), crc: crc32fast::Hasher::new(), bytes: 0 };
    if d.exact(MAGIC.len()).ok().as_deref() != Some(MAGIC) {
        return Err(BackupError::Invalid("it does not start as a chatd backup does".into()));
    }
    let version = u32::from_be_bytes(d.array()?);
    if version != VERSION {
        return Err(BackupError::Refused(format!(
            "the backup is of file version {version}; this build reads version {VERSION}"
        )));
    }
    let at_ms = u64::from_be_bytes(d.array()?);
    let format_len = u16::from_be_bytes(d.array()?) as usize;
    let format = d.exact(format_len)?;
    if !READABLE.contains(&format.as_slice()) {
        return Err(BackupError::Refused(format!(
            "the backup holds store format {:?}; this build reads {:?} (and upgrades older ones)",
            String::from_utf8_lossy(&format),
            String::from_utf8_lossy(FORMAT)
        )));
    }
    let mut summary = Summary { at_ms, format: String::from_utf8_lossy(&format).into_owned(), ..Default::default() };
    let mut in_log = false;
    let mut in_tree = false;
    let mut last_room: Option<Vec<u8>> = None;
    loop {
        let [tag] = d.array()?;
        match tag {
            TREE => {
                let n = u16::from_be_bytes(d.array()?) as usize;
                let name = d.exact(n)?;
                in_log = name == MESSAGES;
                in_tree = true;
                visit(Item::Tree(&name))?;
            }
            RECORD if in_tree => {
                let n = d.len("key")?;
                let k = d.exact(n)?;
                let n = d.len("value")?;
                let v = d.exact(n)?;
                summary.records += 1;
                if in_log {
                    summary.log_records += 1;
                    let room = k.get(..8).map(<[u8]>::to_vec);
                    if room != last_room {
                        summary.rooms += 1;
                        last_room = room;
                    }
                }
                visit(Item::Record(&k, &v))?;
            }
            END => {
                let records = u64::from_be_bytes(d.array()?);
                let computed = d.crc.clone().finalize();
                let stored = u32::from_be_bytes(d.exact(4)?.try_into().expect("4 bytes"));
                if records != summary.records || stored != computed {
                    return Err(BackupError::Invalid(format!(
                        "its checksum or record count does not match (corrupted?): {records} records \
                         and CRC {stored:08x} stated, {} read with CRC {computed:08x}",
                        summary.records
                    )));
                }
                if d.input.fill_buf()?.is_empty() {
                    summary.bytes = d.bytes;
                    return Ok(summary);
                }
                return Err(BackupError::Invalid(format!("bytes follow its end at byte {}", d.bytes)));
            }
            other => {
                return Err(BackupError::Invalid(format!("unexpected byte {other:#04x} at byte {}", d.bytes - 1)));
            }
        }
    }
}

/// Restores the backup read from `input` as the store in `store` (the
/// `store` directory of a data directory), which must not exist yet or be
/// empty (module docs: "Restore").
pub fn restore(input: &mut dyn Read, store: &Path, cache_bytes: u64) -> Result<Summary, BackupError> {
    let occupied = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some()) || p.is_file();
    if occupied(store) || occupied(&sibling(store, "old")) {
        return Err(BackupError::Refused(format!(
            "{} already holds a store; restore into a new data directory",
            store.display()
        )));
    }
    let temp = sibling(store, "restoring");
    if temp.exists() {
        std::fs::remove_dir_all(&temp)?;
    }
    if let Some(parent) = store.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let restored = write_store(input, &temp, cache_bytes);
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
        return restored;
    }
    if store.exists() {
        std::fs::remove_dir(store)?;
    }
    std::fs::rename(&temp, store)?;
    if let Some(parent) = store.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    restored
}

/// The backup's records into a fresh database in `dir`, then opened as a
/// store (upgraded, finished) and synced.
fn write_store(input: &mut dyn Read, dir: &Path, cache_bytes: u64) -> Result<Summary, BackupError> {
    let summary = {
        let db = open_db(dir, cache_bytes)?;
        let mut tree: Option<sled::Tree> = None;
        let summary = read(input, |item| {
            match item {
                Item::Tree(name) => tree = Some(db.open_tree(name).map_err(StoreError::from)?),
                Item::Record(k, v) => {
                    tree.as_ref().expect("a record follows a tree").insert(k, v).map_err(StoreError::from)?;
                }
            }
            Ok(())
        })?;
        db.flush().map_err(StoreError::from)?;
        // sled syncs neither its blob files nor their directory (`Blobs`).
        Blobs::new(dir).sync()?;
        std::fs::File::open(dir.join("db"))?.sync_all()?;
        summary
    };
    let store = SledStore::open(dir, cache_bytes)?;
    store.load()?;
    store.sync()?;
    drop(store);
    // The names of the files in it, before it is renamed into place.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(summary)
}

/// `store` with `.suffix` added to its name.
fn sibling(store: &Path, suffix: &str) -> PathBuf {
    let name = store.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    store.with_file_name(format!("{name}.{suffix}"))
}

/// Writes `file` through `write`: into `file.tmp` (mode 0600: a backup
/// holds every message), synced and read back whole ([`read`]) before it is
/// renamed into place, so `file` is only ever a complete backup.
pub fn write_file<T>(
    file: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<T, BackupError>,
) -> Result<(T, Summary), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = file.as_os_str().to_owned();
    name.push(".tmp");
    let temp = PathBuf::from(name);
    let result = (|| {
        // A file left by an interrupted backup is not reused: it may have
        // other permissions than a new one gets.
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        let written = write(&mut f)?;
        f.sync_all()?;
        drop(f);
        let summary = read(&mut std::fs::File::open(&temp)?, |_| Ok(()))?;
        std::fs::rename(&temp, file)?;
        let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(parent)?.sync_all()?;
        Ok((written, summary))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::proto::{ChangeKind, Role};
    use crate::store::contract::{append, change, member};
    use crate::store::{Batch, RoomDetails, RoomWrite};

    /// A store with two rooms, members, a changed message and keyed
    /// messages.
    fn filled(dir: &Path) -> Arc<SledStore> {
        let store = Arc::new(SledStore::open(dir, 8 << 20).unwrap());
        let mut b = Batch::default();
        b.rooms.push(RoomWrite::Details { room: 1, name: "one".into(), details: RoomDetails::default() });
        b.rooms.push(RoomWrite::Details { room: 3, name: "three".into(), details: RoomDetails::default() });
        b.rooms.push(member("ann", 1, Role::Owner));
        b.rooms.push(member("bob", 3, Role::Member));
        for seq in 1..=2500 {
            b.appends.push(append(1, seq, "ann", &format!("k{seq}")));
        }
        b.appends.push(append(3, 1, "ann", "x"));
        b.appends.push(change(2, "bob", 1, ChangeKind::ReactionAdd, ""));
        store.write(&b).unwrap();
        store.sync().unwrap();
        store
    }

    /// A tree's records.
    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    /// Every tree of `store` that holds anything, by name.
    fn contents(store: &SledStore) -> BTreeMap<Vec<u8>, Records> {
        store
            .with(|t| {
                let mut all = BTreeMap::new();
                for name in t.db.tree_names() {
                    let records: Vec<_> =
                        t.db.open_tree(&name)?
                            .iter()
                            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                            .collect::<Result<_, _>>()?;
                    if !records.is_empty() {
                        all.insert(name.to_vec(), records);
                    }
                }
                Ok(all)
            })
            .unwrap()
    }

    /// A backup of `store` taken with nothing else writing.
    fn backup_of(store: &Arc<SledStore>) -> (Vec<u8>, Summary) {
        let mut out = Vec::new();
        let summary = backup(store, |take| Ok(take()?), &mut out).unwrap();
        (out, summary)
    }

    #[test]
    fn a_backup_restores_to_the_same_store() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(src.path());
        let (file, summary) = backup_of(&store);
        assert_eq!((summary.rooms, summary.bytes), (2, file.len() as u64));
        assert!(summary.log_records >= 2 && summary.records > summary.log_records, "{summary:?}");
        let target = dst.path().join("store");
        let restored = restore(&mut file.as_slice(), &target, 8 << 20).unwrap();
        assert_eq!(restored, Summary { stall: Duration::ZERO, ..summary });
        let copy = SledStore::open(&target, 8 << 20).unwrap();
        assert_eq!(contents(&copy), contents(&store));
        assert_eq!(copy.lookup_idempotent("ann", "k2000").unwrap().map(|r| r.seq), Some(2000));
        assert!(copy.has_reaction(3, 1, "+1", "bob").unwrap());
        assert!(!dst.path().join("store.restoring").exists());
    }

    #[test]
    fn what_is_committed_after_the_point_is_not_in_the_backup() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(src.path());
        let mut out = Vec::new();
        let summary = backup(
            &store,
            |take| {
                let point = take()?;
                // Commits go on once the point is taken: more of room 1,
                // a new room, a new member.
                let mut b = Batch::default();
                b.rooms.push(RoomWrite::Details { room: 2, name: "two".into(), details: RoomDetails::default() });
                b.rooms.push(member("cat", 1, Role::Member));
                b.appends.push(append(1, 2501, "ann", "late"));
                b.appends.push(append(2, 1, "cat", ""));
                store.write(&b).unwrap();
                Ok(point)
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(summary.rooms, 2, "the room created after the point has no log in it");
        restore(&mut out.as_slice(), &dst.path().join("store"), 8 << 20).unwrap();
        let copy = SledStore::open(&dst.path().join("store"), 8 << 20).unwrap();
        let snap = copy.load().unwrap();
        let mut rooms: Vec<_> = snap.rooms.iter().map(|r| (r.name.as_str(), r.head)).collect();
        rooms.sort();
        assert_eq!(rooms, vec![("one", 2500), ("three", 2)]);
        assert!(snap.memberships.iter().all(|(u, _, _)| u != "cat"));
        assert_eq!(copy.lookup_idempotent("ann", "late").unwrap(), None);
    }

    #[test]
    fn a_trim_while_the_backup_copies_the_log_waits_for_the_next_pass() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(src.path());
        let (go, started) = std::sync::mpsc::channel();
        let trim = crate::store::Trim { keep_from: 2001, older_than_ms: 0, head: 2500 };
        let trimmer = std::thread::spawn({
            let store = store.clone();
            move || {
                started.recv().unwrap();
                store.trim(1, &trim).unwrap()
            }
        });
        let mut out = Vec::new();
        backup(
            &store,
            |take| {
                let point = take()?;
                // It would remove and rewrite runs the copy has not
                // reached: it finds the backup and does nothing.
                go.send(()).unwrap();
                assert_eq!(trimmer.join().unwrap().start(), 1, "skipped while the backup copies");
                Ok(point)
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(store.trim(1, &trim).unwrap().start(), 2001, "the next pass trims");
        restore(&mut out.as_slice(), &dst.path().join("store"), 8 << 20).unwrap();
        let copy = SledStore::open(&dst.path().join("store"), 8 << 20).unwrap();
        copy.load().unwrap();
        let seqs: Vec<u64> = copy.read_messages(1, 1, 2500, "").unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=2500).collect::<Vec<_>>());
    }

    #[test]
    fn a_truncated_backup_is_refused_and_leaves_nothing() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (file, _) = backup_of(&filled(src.path()));
        let target = dst.path().join("store");
        for cut in [0, 5, 30, file.len() / 2, file.len() - 5, file.len() - 1] {
            let err = restore(&mut &file[..cut], &target, 8 << 20).unwrap_err();
            assert!(matches!(err, BackupError::Invalid(_)), "cut at {cut}: {err}");
            assert!(!target.exists() && !dst.path().join("store.restoring").exists(), "cut at {cut}");
        }
        let mut longer = file.clone();
        longer.push(0);
        let err = restore(&mut longer.as_slice(), &target, 8 << 20).unwrap_err();
        assert!(err.to_string().contains("follow its end"), "{err}");
    }

    #[test]
    fn a_corrupted_byte_is_refused() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (file, _) = backup_of(&filled(src.path()));
        let target = dst.path().join("store");
        // In the header, a length, a key, a value deep in the log, the trailer.
        for at in [3, 9, 40, file.len() / 2, file.len() - 20, file.len() - 2] {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            let err = restore(&mut bad.as_slice(), &target, 8 << 20).unwrap_err();
            assert!(matches!(err, BackupError::Invalid(_) | BackupError::Refused(_)), "byte {at}: {err}");
            assert!(!target.exists(), "byte {at}");
        }
    }

    #[test]
    fn a_store_format_this_build_cannot_open_is_refused() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut file, _) = backup_of(&filled(src.path()));
        // The marker's last byte, "chatd-store-4" → "chatd-store-9".
        let at = MAGIC.len() + 4 + 8 + 2 + FORMAT.len() - 1;
        file[at] = b'9';
        let err = restore(&mut file.as_slice(), &dst.path().join("store"), 8 << 20).unwrap_err();
        assert!(err.to_string().contains("chatd-store-9"), "{err}");
    }

    #[test]
    fn a_target_that_holds_a_store_is_refused() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (file, _) = backup_of(&filled(src.path()));
        let target = dst.path().join("store");
        drop(filled(&target));
        let before = contents(&SledStore::open(&target, 8 << 20).unwrap());
        let err = restore(&mut file.as_slice(), &target, 8 << 20).unwrap_err();
        assert!(matches!(err, BackupError::Refused(_)) && err.to_string().contains("already holds"), "{err}");
        assert_eq!(contents(&SledStore::open(&target, 8 << 20).unwrap()), before, "untouched");
        // An empty directory is a new store.
        let empty = dst.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        restore(&mut file.as_slice(), &empty, 8 << 20).unwrap();
    }

    #[test]
    fn a_backup_file_is_in_place_only_once_complete() {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(src.path());
        let file = out.path().join("b.chatd");
        let ((), summary) = write_file(&file, |w| {
            backup(&store, |take| Ok(take()?), w)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(summary.rooms, 2);
        assert!(file.exists() && !out.path().join("b.chatd.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // A stream that ends early never replaces anything.
        let err = write_file(&out.path().join("c.chatd"), |w| Ok(w.write_all(&MAGIC[..])?)).unwrap_err();
        assert!(matches!(err, BackupError::Invalid(_)), "{err}");
        assert!(!out.path().join("c.chatd").exists() && !out.path().join("c.chatd.tmp").exists());
        // Nor does what an interrupted one left decide who may read the next.
        let left = out.path().join("d.chatd.tmp");
        std::fs::write(&left, b"left over").unwrap();
        std::fs::set_permissions(&left, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&out.path().join("d.chatd"), |w| backup(&store, |take| Ok(take()?), w)).unwrap();
        let mode = std::fs::metadata(out.path().join("d.chatd")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
