//! Runs: one value in the `messages` tree for the consecutive entries of one
//! room that one group commit wrote.
//!
//! An insert into sled costs the same whether it carries 100 bytes or
//! 30 KiB, and one per message was two thirds of a group commit's cycle
//! (ARCHITECTURE.md, "Storage"). So a commit writes each room's entries as
//! runs keyed `room ‖ first_seq` and split above [`RUN_SPLIT`] bytes, which
//! keeps every value well under sled's blob threshold. A run never grows
//! after it is written; a later commit starts a new one.
//!
//! A run is `0x00` then, per entry, its length (varint) and the encoded
//! `Message`. An encoded `Message` can never start with `0x00` (no protobuf
//! field is numbered 0), so a value without the tag is a single message as
//! the one-key-per-message format stored it, and stores of that format are
//! read as they are, with no rewrite.
//!
//! Reads find the run holding a seq with one reverse range scan from
//! `room ‖ seq`; everything above works on seqs as before.

use bytes::{Buf, Bytes};
use prost::encoding::{decode_varint, encode_varint};

use super::trees::{Trees, corrupt_key};
use crate::store::{Append, RoomId, StoreError, message_key};

/// Entries as read from the log: `(seq, encoded Message)`, in seq order.
pub(super) type Entries = Vec<(u64, Bytes)>;

/// Marks a value as a run.
const RUN_TAG: u8 = 0;

/// A run is split before its entries pass this many bytes. sled stores a
/// value past a quarter of its 512 KiB segment in a blob file of its own,
/// and rewrites a whole leaf when one of its values changes; 32 KiB keeps
/// a run far from the first and a leaf rewrite small.
pub(super) const RUN_SPLIT: usize = 32 * 1024;

/// What `chatd compact` merges a room's small runs into. Not [`RUN_SPLIT`]:
/// a leaf of sled's that holds a few large values passes a quarter of a
/// segment and is then written whole, as a blob, each time anything in it
/// changes — the next commit's small run for a neighbouring room included
/// (benches/README.md, "Space on disk").
pub(super) const MERGE_TARGET: usize = 4 * 1024;

/// Encodes entries (consecutive seqs) as one run value.
pub(super) fn encode<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut v = vec![RUN_TAG];
    for e in entries {
        encode_varint(e.len() as u64, &mut v);
        v.extend_from_slice(e);
    }
    v
}

/// The entries of one stored value keyed `room ‖ first`: `(seq, message)`.
pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<Entries, StoreError> {
    let first = seq_of(key)?;
    let value = Bytes::copy_from_slice(value);
    if value.first() != Some(&RUN_TAG) {
        return Ok(vec![(first, value)]);
    }
    let mut entries = Vec::new();
    let mut at = 1;
    while at < value.len() {
        let mut rest = &value[at..];
        let before = rest.remaining();
        let len = decode_varint(&mut rest).map_err(|_| corrupt_key(key))? as usize;
        at += before - rest.remaining();
        let end = at.checked_add(len).filter(|e| *e <= value.len()).ok_or_else(|| corrupt_key(key))?;
        entries.push((first + entries.len() as u64, value.slice(at..end)));
        at = end;
    }
    Ok(entries)
}

/// The seq of the last entry of a stored value, without copying it.
fn last_seq(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    let first = seq_of(key)?;
    if value.first() != Some(&RUN_TAG) {
        return Ok(first);
    }
    let (mut at, mut count) = (1, 0u64);
    while at < value.len() {
        let mut rest = &value[at..];
        let before = rest.remaining();
        let len = decode_varint(&mut rest).map_err(|_| corrupt_key(key))? as usize;
        at += before - rest.remaining() + len;
        count += 1;
    }
    if at != value.len() || count == 0 {
        return Err(corrupt_key(key));
    }
    Ok(first + count - 1)
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    let seq = key.get(8..16).ok_or_else(|| corrupt_key(key))?;
    Ok(u64::from_be_bytes(seq.try_into().map_err(|_| corrupt_key(key))?))
}

/// Splits a group commit's appends into runs: per room, consecutive seqs,
/// at most [`RUN_SPLIT`] bytes each (a larger single message is a run of
/// its own). Rooms keep the order of their first append, and a room's runs
/// are in seq order, so a crash — which keeps a prefix of the inserts —
/// never leaves a gap in a room.
pub(super) fn split(appends: &[Append]) -> Vec<(RoomId, u64, Vec<&[u8]>)> {
    let mut runs: Vec<(RoomId, u64, Vec<&[u8]>)> = Vec::new();
    let mut open: std::collections::HashMap<RoomId, (usize, usize)> = Default::default();
    for a in appends {
        let entry = a.message.as_ref();
        let fits = open.get(&a.room).and_then(|&(i, bytes)| {
            let (_, first, entries) = &runs[i];
            let next = first + entries.len() as u64;
            (next == a.seq && bytes + entry.len() <= RUN_SPLIT).then_some((i, bytes))
        });
        match fits {
            Some((i, bytes)) => {
                runs[i].2.push(entry);
                open.insert(a.room, (i, bytes + entry.len()));
            }
            None => {
                runs.push((a.room, a.seq, vec![entry]));
                open.insert(a.room, (runs.len() - 1, entry.len()));
            }
        }
    }
    runs
}

/// Copies a `messages` tree into `to` with each room's consecutive small
/// runs merged into runs of about [`MERGE_TARGET`] bytes (`chatd compact`:
/// with many rooms a commit leaves one or two messages per room, and sled
/// stores such a small value at about three times its size). Returns the
/// values read and written.
pub(super) fn copy_merged(from: &sled::Tree, to: &sled::Tree) -> Result<(u64, u64), StoreError> {
    let (mut read, mut written) = (0, 0);
    let mut group: Option<(sled::IVec, Vec<Bytes>, usize)> = None;
    let mut flush = |group: &mut Option<(sled::IVec, Vec<Bytes>, usize)>| -> Result<(), StoreError> {
        if let Some((key, entries, _)) = group.take() {
            to.insert(key, encode(entries.iter().map(|m| m.as_ref())))?;
            written += 1;
        }
        Ok(())
    };
    for kv in from.iter() {
        let (k, v) = kv?;
        read += 1;
        let entries = decode(&k, &v)?;
        let bytes: usize = entries.iter().map(|(_, m)| m.len()).sum();
        let joins = group.as_ref().is_some_and(|(gk, ge, gb)| {
            gk[..8] == k[..8]
                && seq_of(gk).is_ok_and(|first| first + ge.len() as u64 == seq_of(&k).unwrap_or(0))
                && gb + bytes <= MERGE_TARGET
        });
        if !joins {
            flush(&mut group)?;
            group = Some((k, Vec::new(), 0));
        }
        let g = group.as_mut().expect("set above");
        g.1.extend(entries.into_iter().map(|(_, m)| m));
        g.2 += bytes;
    }
    flush(&mut group)?;
    Ok((read, written))
}

impl Trees {
    /// Writes a group commit's entries as runs.
    pub(super) fn append_runs(&self, appends: &[Append]) -> Result<(), StoreError> {
        for (room, first, entries) in split(appends) {
            self.messages.insert(&message_key(room, first)[..], encode(entries))?;
        }
        Ok(())
    }

    /// The stored value holding `seq` of `room`: its key and entries.
    fn run_holding(&self, room: RoomId, seq: u64) -> Result<Option<(sled::IVec, Entries)>, StoreError> {
        let Some(kv) = self.messages.range(message_key(room, 0)..=message_key(room, seq)).next_back() else {
            return Ok(None);
        };
        let (k, v) = kv?;
        if last_seq(&k, &v)? < seq {
            return Ok(None);
        }
        let entries = decode(&k, &v)?;
        Ok(Some((k, entries)))
    }

    /// The stored entry `seq` of `room`.
    pub(super) fn entry(&self, room: RoomId, seq: u64) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .run_holding(room, seq)?
            .and_then(|(_, entries)| entries.into_iter().find(|(s, _)| *s == seq).map(|(_, m)| m)))
    }

    /// Replaces the stored entry `seq` of `room` (erasing a deleted
    /// message's content): its run is written again with the new entry. An
    /// entry not stored yet becomes a run of its own.
    pub(super) fn replace_entry(&self, room: RoomId, seq: u64, message: &[u8]) -> Result<(), StoreError> {
        match self.run_holding(room, seq)? {
            Some((key, entries)) => {
                let run = encode(entries.iter().map(|(s, m)| if *s == seq { message } else { m.as_ref() }));
                self.messages.insert(key, run)?;
            }
            None => {
                self.messages.insert(&message_key(room, seq)[..], encode([message]))?;
            }
        }
        Ok(())
    }

    /// The stored entries `from..=to` of `room`, in seq order.
    pub(super) fn entries(&self, room: RoomId, from: u64, to: u64) -> Result<Entries, StoreError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        // The run holding `from` starts at or before it.
        let start = match self.messages.range(message_key(room, 0)..=message_key(room, from)).next_back() {
            Some(kv) => kv?.0.to_vec(),
            None => message_key(room, from).to_vec(),
        };
        let mut next = from;
        for kv in self.messages.range(start..=message_key(room, to).to_vec()) {
            let (k, v) = kv?;
            // A trim writes the rest of the run its start falls in before
            // it removes that run: an entry may be stored twice meanwhile.
            for (s, m) in decode(&k, &v)? {
                if s >= next && s <= to {
                    out.push((s, m));
                    next = s + 1;
                }
            }
        }
        Ok(out)
    }

    /// The head of `room`: the seq of its last stored entry (0 if none).
    pub(super) fn last_entry(&self, room: RoomId) -> Result<u64, StoreError> {
        match self.messages.range(message_key(room, 0)..=message_key(room, u64::MAX)).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                last_seq(&k, &v)
            }
            None => Ok(0),
        }
    }

    /// Removes the entries of `room` below `start` (retention), oldest run
    /// first; a run that reaches past `start` is written again from
    /// `start` on under its new first seq before the old one goes, so a
    /// crash part way leaves at worst entries below `start`, which readers
    /// never ask for (the trim record is written first). Returns how many
    /// runs it removed.
    pub(super) fn drop_below(&self, room: RoomId, start: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for kv in self.messages.range(message_key(room, 0)..message_key(room, start)) {
            let (k, v) = kv?;
            if last_seq(&k, &v)? >= start {
                let keep: Vec<_> = decode(&k, &v)?.into_iter().filter(|(s, _)| *s >= start).collect();
                self.messages.insert(&message_key(room, start)[..], encode(keep.iter().map(|(_, m)| m.as_ref())))?;
            }
            self.messages.remove(k)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes the entries of `room` from `from` on, newest run first (so a
    /// crash part way leaves the log contiguous); a run that starts below
    /// `from` is cut short. Returns the removed entries in seq order.
    pub(super) fn cut_from(&self, room: RoomId, from: u64) -> Result<Entries, StoreError> {
        let mut runs = Vec::new();
        if let Some((k, entries)) = self.run_holding(room, from)? {
            runs.push((k, entries));
        }
        for kv in self.messages.range(message_key(room, from)..=message_key(room, u64::MAX)) {
            let (k, v) = kv?;
            if runs.first().is_some_and(|(first, _)| *first == k) {
                continue;
            }
            let entries = decode(&k, &v)?;
            runs.push((k, entries));
        }
        let mut removed = Vec::new();
        for (k, entries) in runs.iter().rev() {
            let (keep, cut): (Vec<_>, Vec<_>) = entries.iter().cloned().partition(|(s, _)| *s < from);
            if keep.is_empty() {
                self.messages.remove(k)?;
            } else {
                self.messages.insert(k, encode(keep.iter().map(|(_, m)| m.as_ref())))?;
            }
            removed.push(cut);
        }
        Ok(removed.into_iter().rev().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::append;

    #[test]
    fn a_commit_is_split_into_runs_per_room_in_seq_order_below_the_split_size() {
        let mut appends = Vec::new();
        for seq in 1..=3 {
            appends.push(append(1, seq, "ann", ""));
            appends.push(append(2, seq + 10, "bob", ""));
        }
        // A gap starts a new run (never expected from a commit, but a run
        // must only ever hold consecutive seqs).
        appends.push(append(1, 5, "ann", ""));
        let runs: Vec<_> = split(&appends).iter().map(|(r, f, e)| (*r, *f, e.len())).collect();
        assert_eq!(runs, vec![(1, 1, 3), (2, 11, 3), (1, 5, 1)]);

        let big = |seq| {
            let mut a = append(1, seq, "ann", "");
            a.message = Bytes::from(vec![8u8; RUN_SPLIT / 2 - 1]);
            a
        };
        let appends: Vec<_> = (1..=7).map(big).collect();
        let runs: Vec<_> = split(&appends).iter().map(|(_, f, e)| (*f, e.len())).collect();
        assert_eq!(runs, vec![(1, 2), (3, 2), (5, 2), (7, 1)], "split above {RUN_SPLIT} bytes");
    }

    #[test]
    fn runs_and_single_message_values_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trees::open(dir.path(), 8 << 20).unwrap();
        // Seqs 1-2 as the one-key-per-message format stored them, 3-6 as a run.
        for seq in 1..=2 {
            t.messages.insert(&message_key(4, seq)[..], append(4, seq, "ann", "").message.as_ref()).unwrap();
        }
        let run: Vec<_> = (3..=6).map(|s| append(4, s, "ann", "")).collect();
        t.append_runs(&run).unwrap();
        let seqs = |from, to| t.entries(4, from, to).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!(seqs(1, 6), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs(4, 5), vec![4, 5]);
        assert_eq!(seqs(2, 3), vec![2, 3]);
        assert_eq!(seqs(7, 9), Vec::<u64>::new());
        assert_eq!(t.last_entry(4).unwrap(), 6);
        assert_eq!(t.last_entry(5).unwrap(), 0);
        assert_eq!(t.entry(4, 5).unwrap().unwrap(), append(4, 5, "ann", "").message);
        assert_eq!(t.entry(4, 2).unwrap().unwrap(), append(4, 2, "ann", "").message);
        assert!(t.entry(4, 7).unwrap().is_none());

        t.replace_entry(4, 4, b"\x08\x04").unwrap();
        assert_eq!(t.entry(4, 4).unwrap().unwrap().as_ref(), b"\x08\x04");
        assert_eq!(seqs(1, 6), vec![1, 2, 3, 4, 5, 6], "a replaced entry keeps its run");

        let cut: Vec<_> = t.cut_from(4, 5).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(cut, vec![5, 6]);
        assert_eq!((t.last_entry(4).unwrap(), seqs(1, 9)), (4, vec![1, 2, 3, 4]));
        let cut: Vec<_> = t.cut_from(4, 2).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(cut, vec![2, 3, 4]);
        assert_eq!(seqs(1, 9), vec![1]);
    }

    fn keys(t: &Trees) -> Vec<u64> {
        t.messages.iter().keys().map(|k| seq_of(&k.unwrap()).unwrap()).collect()
    }

    /// Trees with room 4's seqs 1..=n, one run of a message of `size`
    /// bytes per commit.
    fn sized(n: u64, size: usize) -> (tempfile::TempDir, Trees) {
        let dir = tempfile::tempdir().unwrap();
        let t = Trees::open(dir.path(), 8 << 20).unwrap();
        for seq in 1..=n {
            let mut a = append(4, seq, "ann", "");
            a.message = Bytes::from(vec![8u8; size]);
            t.append_runs(&[a]).unwrap();
        }
        (dir, t)
    }

    #[test]
    fn a_compaction_merges_small_runs_per_room_and_reads_the_same() {
        // A run of one 1,000-byte message: four make a merged run.
        let (_dir, t) = sized(10, 1000);
        let more: Vec<_> = (1..=3).map(|s| append(5, s, "bob", "")).collect();
        t.append_runs(&more).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = Trees::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(copy_merged(&t.messages, &copy.messages).unwrap(), (11, 4));
        assert_eq!(keys(&copy), vec![1, 5, 9, 1], "room 4: 1-4, 5-8, 9-10; room 5 as it was");
        assert_eq!(copy.entries(4, 1, 10).unwrap(), t.entries(4, 1, 10).unwrap());
        assert_eq!(copy.entries(5, 1, 3).unwrap(), t.entries(5, 1, 3).unwrap());
        assert_eq!((copy.last_entry(4).unwrap(), copy.last_entry(5).unwrap()), (10, 3));
    }

    #[test]
    fn a_malformed_run_is_reported_not_misread() {
        let key = message_key(1, 1);
        assert!(decode(&key, &[RUN_TAG, 9, 1, 2]).is_err(), "length past the end");
        assert!(last_seq(&key, &[RUN_TAG, 9, 1, 2]).is_err());
        assert!(last_seq(&key, &[RUN_TAG]).is_err(), "an empty run");
    }
}
