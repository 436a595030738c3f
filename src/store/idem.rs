//! The idempotency window of the sled store: an index in memory, a journal
//! on disk.
//!
//! Why not one sled record per `client_msg_id` (the first design): its key,
//! `user ‖ client_msg_id`, is random, and that insert cost about as much as
//! the message's own — the group commit wrote every published message twice.
//! Replacing it with this journal and index (benches/README.md,
//! "Idempotency journal"): durable publish 91–110k → 136–141k acks/s, fan-out +4% at 64
//! in flight and +12% at 1024, 1,000 rooms +6%.
//!
//! So the window is kept as:
//! * a **journal** in the `idem_journal` tree: one record per group commit
//!   (several for a large one), keyed by an increasing number, holding the
//!   commit's `(room, seq, ts, sender, client_msg_id)` entries. Keys only
//!   grow, so each record lands at the end of the tree; expiry removes
//!   records from the front.
//! * this **index** in memory, rebuilt from the journal when the store
//!   opens: per user, a hash of the `client_msg_id` → `(room, seq)`.
//!
//! The index only points: a lookup reads the message it points at and
//! accepts it only if that message's sender and `client_msg_id` are the
//! ones asked for. So a hash collision, an entry whose message was lost to a
//! crash, or one whose seq was truncated and handed out again never answers
//! wrongly.
//!
//! Memory: about 60 bytes per id in the window, plus ~0.2 KiB for each user
//! with any (a user with few ids has no maps: see [`SMALL_WINDOW`]). A user
//! keeps at most [`MAX_IDS_PER_USER`] ids (proto/README.md, §6: "at least 24 h or
//! 100k ids per user"), so one publisher flooding the server cannot grow it
//! without bound; ordinary users keep everything from the last 24 h.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use super::RoomId;

/// Most ids a user keeps in the window; older ones are forgotten first.
pub const MAX_IDS_PER_USER: usize = 100_000;

/// A journal record is closed when it reaches this size, well under sled's
/// blob threshold (ARCHITECTURE.md, "Storage").
pub const RECORD_BYTES: usize = 16 << 10;

/// Where a published message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Room id.
    pub room: RoomId,
    /// Seq in the room.
    pub seq: u64,
}

/// The inner maps are keyed by a hash already computed with a random key;
/// hashing it again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A user's window is searched by scanning while it holds at most this many
/// ids; past it, it gets hash maps. Most users publish a few messages a day,
/// and the maps would triple what each of them costs.
const SMALL_WINDOW: usize = 16;

/// One user's ids, in publish order.
#[derive(Default)]
struct UserWindow {
    /// Every entry, oldest first: the window itself, and what the per-user
    /// bound drops first.
    order: VecDeque<(u64, Loc)>,
    /// Lookup maps over `order`, once it has grown past [`SMALL_WINDOW`].
    by_hash: Option<Box<ByHash>>,
}

/// The entries of a large window by hash.
#[derive(Default)]
struct ByHash {
    /// Hash of `client_msg_id` → the newest entry with it.
    newest: HashMap<u64, Loc, BuildHasherDefault<PassThrough>>,
    /// Older entries whose hash a newer entry took over: a real 64-bit
    /// collision, or a stale entry (its message truncated) and the retry
    /// that replaced it. Almost always empty.
    displaced: Vec<(u64, Loc)>,
}

impl ByHash {
    fn holds(&self, hash: u64, loc: Loc) -> bool {
        self.newest.get(&hash) == Some(&loc) || self.displaced.contains(&(hash, loc))
    }

    /// Adds an entry not yet held, as the newest with its hash.
    fn add(&mut self, hash: u64, loc: Loc) {
        if let Some(old) = self.newest.insert(hash, loc) {
            self.displaced.push((hash, old));
        }
    }

    /// Drops `(hash, loc)`.
    fn forget(&mut self, hash: u64, loc: Loc) {
        if self.newest.get(&hash) == Some(&loc) {
            match self.displaced.iter().rposition(|(h, _)| *h == hash) {
                Some(i) => {
                    let (_, older) = self.displaced.remove(i);
                    self.newest.insert(hash, older);
                }
                None => {
                    self.newest.remove(&hash);
                }
            }
        } else if let Some(i) = self.displaced.iter().position(|e| *e == (hash, loc)) {
            self.displaced.remove(i);
        }
    }
}

impl UserWindow {
    /// Whether `(hash, loc)` is in the window.
    fn holds(&self, hash: u64, loc: Loc) -> bool {
        match &self.by_hash {
            Some(maps) => maps.holds(hash, loc),
            None => self.order.contains(&(hash, loc)),
        }
    }

    /// Adds an entry; false when the same entry is already there (the
    /// journal can hold one twice: a retry stored at the seq its failed
    /// first attempt had).
    fn insert(&mut self, hash: u64, loc: Loc) -> bool {
        if self.holds(hash, loc) {
            return false;
        }
        self.order.push_back((hash, loc));
        match &mut self.by_hash {
            Some(maps) => maps.add(hash, loc),
            None if self.order.len() > SMALL_WINDOW => {
                let mut maps = Box::<ByHash>::default();
                for &(h, l) in &self.order {
                    maps.add(h, l);
                }
                self.by_hash = Some(maps);
            }
            None => {}
        }
        true
    }

    /// Removes one entry; false when it is not in the window (never added,
    /// or already dropped by the per-user bound).
    fn remove(&mut self, hash: u64, loc: Loc) -> bool {
        // Checked first: an entry the bound dropped is no longer at the
        // front of `order`, and looking for it there would scan it all.
        if !self.holds(hash, loc) {
            return false;
        }
        let target = (hash, loc);
        // Expiry removes the oldest, truncation the newest.
        if self.order.front() == Some(&target) {
            self.order.pop_front();
        } else if self.order.back() == Some(&target) {
            self.order.pop_back();
        } else if let Some(i) = self.order.iter().position(|e| *e == target) {
            self.order.remove(i);
        }
        if let Some(maps) = &mut self.by_hash {
            maps.forget(hash, loc);
        }
        true
    }

    /// Drops the oldest entry (the per-user bound).
    fn drop_oldest(&mut self) {
        if let Some((hash, loc)) = self.order.pop_front()
            && let Some(maps) = &mut self.by_hash
        {
            maps.forget(hash, loc);
        }
    }

    /// The entries with `hash`, newest first.
    fn with_hash(&self, hash: u64) -> Vec<Loc> {
        match &self.by_hash {
            Some(maps) => match maps.newest.get(&hash) {
                Some(first) => std::iter::once(*first)
                    .chain(maps.displaced.iter().rev().filter(|(h, _)| *h == hash).map(|(_, l)| *l))
                    .collect(),
                None => Vec::new(),
            },
            None => self.order.iter().rev().filter(|(h, _)| *h == hash).map(|(_, l)| *l).collect(),
        }
    }
}

/// The idempotency window in memory.
pub struct IdemIndex {
    hasher: RandomState,
    users: HashMap<Box<str>, UserWindow>,
    per_user: usize,
    len: usize,
}

impl IdemIndex {
    /// An empty index keeping at most `per_user` ids for each user.
    pub fn new(per_user: usize) -> Self {
        IdemIndex { hasher: RandomState::new(), users: HashMap::new(), per_user: per_user.max(1), len: 0 }
    }

    /// Ids in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that `user`'s `client_msg_id` went to `loc`.
    pub fn insert(&mut self, user: &str, client_msg_id: &str, loc: Loc) {
        let hash = self.hasher.hash_one(client_msg_id);
        let window = match self.users.get_mut(user) {
            Some(w) => w,
            None => self.users.entry(user.into()).or_default(),
        };
        if !window.insert(hash, loc) {
            return;
        }
        self.len += 1;
        if window.order.len() > self.per_user {
            window.drop_oldest();
            self.len -= 1;
        }
    }

    /// Where `user`'s `client_msg_id` may have gone, newest first. Each
    /// candidate must be confirmed against the stored message.
    pub fn candidates(&self, user: &str, client_msg_id: &str) -> Vec<Loc> {
        let Some(window) = self.users.get(user) else { return Vec::new() };
        window.with_hash(self.hasher.hash_one(client_msg_id))
    }

    /// Removes the entry for `user`'s `client_msg_id` at `loc`, if it is
    /// still in the window.
    pub fn remove(&mut self, user: &str, client_msg_id: &str, loc: Loc) {
        let hash = self.hasher.hash_one(client_msg_id);
        let Some(window) = self.users.get_mut(user) else { return };
        if window.remove(hash, loc) {
            self.len -= 1;
            if window.order.is_empty() {
                self.users.remove(user);
            }
        }
    }
}

/// One entry of a journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Room id.
    pub room: RoomId,
    /// Seq in the room.
    pub seq: u64,
    /// Server timestamp (Unix ms): what expiry goes by.
    pub ts_ms: u64,
    /// Sender user id (at most 62 bytes, `auth::valid_user_id`).
    pub user: &'a str,
    /// The client's key (at most 128 bytes, checked at publish).
    pub client_msg_id: &'a str,
}

impl Entry<'_> {
    /// Where the entry's message is.
    pub fn loc(&self) -> Loc {
        Loc { room: self.room, seq: self.seq }
    }

    /// Appends the entry to a record: room, seq, ts (u64 BE each), then the
    /// user and the key, each preceded by its length in one byte.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.room.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.ts_ms.to_be_bytes());
        for s in [self.user, self.client_msg_id] {
            let s = &s.as_bytes()[..s.len().min(u8::MAX as usize)];
            out.push(s.len() as u8);
            out.extend_from_slice(s);
        }
    }
}

/// The entries of a journal record; `None` when it is malformed.
pub fn decode_record(mut v: &[u8]) -> Option<Vec<Entry<'_>>> {
    fn u64_at(v: &mut &[u8]) -> Option<u64> {
        let (n, rest) = v.split_first_chunk::<8>()?;
        *v = rest;
        Some(u64::from_be_bytes(*n))
    }
    fn str_at<'a>(v: &mut &'a [u8]) -> Option<&'a str> {
        let (&len, rest) = v.split_first()?;
        let (s, rest) = rest.split_at_checked(len as usize)?;
        *v = rest;
        std::str::from_utf8(s).ok()
    }
    let mut out = Vec::new();
    while !v.is_empty() {
        let room = u64_at(&mut v)?;
        let seq = u64_at(&mut v)?;
        let ts_ms = u64_at(&mut v)?;
        let user = str_at(&mut v)?;
        let client_msg_id = str_at(&mut v)?;
        out.push(Entry { room, seq, ts_ms, user, client_msg_id });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(room: RoomId, seq: u64) -> Loc {
        Loc { room, seq }
    }

    #[test]
    fn finds_what_was_inserted_per_user() {
        let mut ix = IdemIndex::new(10);
        ix.insert("ann", "a", loc(1, 1));
        ix.insert("ann", "b", loc(1, 2));
        ix.insert("bob", "a", loc(2, 1));
        assert_eq!(ix.candidates("ann", "a"), vec![loc(1, 1)]);
        assert_eq!(ix.candidates("bob", "a"), vec![loc(2, 1)]);
        assert!(ix.candidates("ann", "c").is_empty());
        assert!(ix.candidates("cid", "a").is_empty());
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn a_user_keeps_at_most_the_bound_dropping_the_oldest() {
        let mut ix = IdemIndex::new(3);
        for i in 1..=5 {
            ix.insert("ann", &format!("k{i}"), loc(1, i));
        }
        ix.insert("bob", "k1", loc(2, 1));
        assert!(ix.candidates("ann", "k1").is_empty());
        assert!(ix.candidates("ann", "k2").is_empty());
        assert_eq!(ix.candidates("ann", "k3"), vec![loc(1, 3)]);
        assert_eq!(ix.candidates("ann", "k5"), vec![loc(1, 5)]);
        assert_eq!(ix.candidates("bob", "k1"), vec![loc(2, 1)], "another user's ids are not dropped");
        assert_eq!(ix.len(), 4);
        // Removing an entry the bound already dropped changes nothing.
        ix.remove("ann", "k1", loc(1, 1));
        assert_eq!(ix.len(), 4);
    }

    #[test]
    fn a_replaced_entry_is_still_a_candidate_and_comes_back_when_the_newer_goes() {
        let mut ix = IdemIndex::new(10);
        ix.insert("ann", "k", loc(1, 5));
        ix.insert("ann", "k", loc(1, 7));
        assert_eq!(ix.candidates("ann", "k"), vec![loc(1, 7), loc(1, 5)], "newest first");
        ix.remove("ann", "k", loc(1, 7));
        assert_eq!(ix.candidates("ann", "k"), vec![loc(1, 5)]);
        ix.remove("ann", "k", loc(1, 5));
        assert!(ix.candidates("ann", "k").is_empty());
        assert!(ix.is_empty());
        assert!(ix.users.is_empty(), "an empty user window is freed");
    }

    #[test]
    fn the_same_entry_twice_is_kept_once() {
        let mut ix = IdemIndex::new(10);
        ix.insert("ann", "k", loc(1, 4));
        ix.insert("ann", "k", loc(1, 4));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.candidates("ann", "k"), vec![loc(1, 4)]);
        ix.remove("ann", "k", loc(1, 4));
        assert!(ix.candidates("ann", "k").is_empty());
        assert!(ix.is_empty());
    }

    #[test]
    fn removing_the_older_of_two_keeps_the_newer() {
        let mut ix = IdemIndex::new(10);
        ix.insert("ann", "k", loc(1, 5));
        ix.insert("ann", "k", loc(1, 7));
        ix.remove("ann", "k", loc(1, 5));
        assert_eq!(ix.candidates("ann", "k"), vec![loc(1, 7)]);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn records_round_trip_and_malformed_ones_are_refused() {
        let entries = [
            Entry { room: 1, seq: 2, ts_ms: 3, user: "ann", client_msg_id: "k-1" },
            Entry { room: u64::MAX, seq: 9, ts_ms: 10, user: "b", client_msg_id: "" },
        ];
        let mut rec = Vec::new();
        for e in &entries {
            e.encode(&mut rec);
        }
        assert_eq!(decode_record(&rec).unwrap(), entries);
        assert_eq!(decode_record(&[]).unwrap(), vec![]);
        let first_entry = 24 + 1 + "ann".len() + 1 + "k-1".len();
        for cut in 1..rec.len() {
            let decodes = decode_record(&rec[..cut]).is_some();
            assert_eq!(decodes, cut == first_entry, "a record cut at {cut}");
        }
        let mut bad_utf8 = Vec::new();
        Entry { room: 1, seq: 1, ts_ms: 1, user: "a", client_msg_id: "b" }.encode(&mut bad_utf8);
        let last = bad_utf8.len() - 1;
        bad_utf8[last] = 0xff;
        assert!(decode_record(&bad_utf8).is_none());
    }

    #[test]
    fn agrees_with_a_plain_list_through_small_and_large_windows() {
        // A reference model: per user, the entries in order. Random inserts
        // (a few keys, so keys repeat at other seqs), removals of present,
        // absent and dropped entries, and the per-user bound, across the
        // switch from scanning to maps and back down.
        const CAP: usize = 40;
        let mut ix = IdemIndex::new(CAP);
        let mut model: HashMap<&str, Vec<(String, Loc)>> = HashMap::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        for step in 0..20_000 {
            let user = ["ann", "bob", "cid"][next(3) as usize];
            let key = format!("k{}", next(12));
            let l = loc(next(2), next(30));
            let entries = model.entry(user).or_default();
            match next(10) {
                0..=5 => {
                    ix.insert(user, &key, l);
                    if !entries.iter().any(|(k, e)| *k == key && *e == l) {
                        entries.push((key.clone(), l));
                        if entries.len() > CAP {
                            entries.remove(0);
                        }
                    }
                }
                6..=7 if !entries.is_empty() => {
                    // Remove a present entry, oldest or newest or any.
                    let i = match next(3) {
                        0 => 0,
                        1 => entries.len() - 1,
                        _ => next(entries.len() as u64) as usize,
                    };
                    let (k, e) = entries.remove(i);
                    ix.remove(user, &k, e);
                }
                _ => {
                    ix.remove(user, &key, l);
                    entries.retain(|(k, e)| !(*k == key && *e == l));
                }
            }
            for (u, entries) in &model {
                for k in 0..12 {
                    let key = format!("k{k}");
                    let want: Vec<Loc> = entries.iter().rev().filter(|(kk, _)| *kk == key).map(|(_, e)| *e).collect();
                    let mut got = ix.candidates(u, &key);
                    let mut want_sorted = want.clone();
                    got.sort_by_key(|l| (l.room, l.seq));
                    want_sorted.sort_by_key(|l| (l.room, l.seq));
                    assert_eq!(got, want_sorted, "step {step}: {u}/{key}");
                    assert_eq!(ix.candidates(u, &key).first(), want.first(), "step {step}: newest first");
                }
            }
            assert_eq!(ix.len(), model.values().map(Vec::len).sum::<usize>(), "step {step}");
        }
        assert!(ix.users.values().any(|w| w.by_hash.is_some()), "the large form was exercised");
    }
}
