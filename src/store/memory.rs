//! An in-memory [`Store`] for tests and benches: the same contract as the
//! sled store, nothing on disk, `sync` is free.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use super::fold::{self, Counts, DeletedRecord, Kv, Recording, Side, Target, Undo};
use super::{
    BanRecord, Batch, IdempotencyRecord, InviteRecord, MemberRecord, ReadPos, RoomDetails, RoomId, RoomRecord,
    RoomWrite, Snapshot, Store, StoreError, Trim, TrimRecord, message_key,
};

#[derive(Default)]
struct Inner {
    messages: BTreeMap<(RoomId, u64), Bytes>,
    rooms: HashMap<String, RoomId>,
    details: HashMap<RoomId, RoomDetails>,
    /// Current members and (role 0) departures.
    members: BTreeMap<(String, RoomId), MemberRecord>,
    bans: BTreeMap<(RoomId, String), BanRecord>,
    invites: BTreeMap<(String, RoomId), InviteRecord>,
    revocations: BTreeMap<String, u64>,
    reads: BTreeMap<(String, RoomId), ReadPos>,
    idem: HashMap<(String, String), IdempotencyRecord>,
    /// The other records of [`Side`], by side and key.
    side: BTreeMap<(Side, Vec<u8>), Vec<u8>>,
    /// What the last batch replaced beside the log.
    undo: Vec<Undo>,
    /// The counters as stored.
    counts: fold::CountsCache,
    /// Where trimmed logs start.
    trims: HashMap<RoomId, TrimRecord>,
}

fn seq_key(key: &[u8]) -> Result<(RoomId, u64), StoreError> {
    let n = |r: std::ops::Range<usize>| key.get(r).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    match (n(0..8), n(8..16)) {
        (Some(room), Some(seq)) if key.len() == 16 => Ok((room, seq)),
        _ => Err(StoreError::Corrupt(format!("malformed key {key:?}"))),
    }
}

impl Kv for Inner {
    fn get(&mut self, side: Side, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(match side {
            Side::Messages => self.messages.get(&seq_key(key)?).map(|v| v.to_vec()),
            _ => self.side.get(&(side, key.to_vec())).cloned(),
        })
    }
    fn put(&mut self, side: Side, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match side {
            Side::Messages => self.messages.insert(seq_key(key)?, Bytes::copy_from_slice(value)).map(|_| ()),
            _ => self.side.insert((side, key.to_vec()), value.to_vec()).map(|_| ()),
        };
        Ok(())
    }
    fn del(&mut self, side: Side, key: &[u8]) -> Result<(), StoreError> {
        match side {
            Side::Messages => self.messages.remove(&seq_key(key)?).map(|_| ()),
            _ => self.side.remove(&(side, key.to_vec())).map(|_| ()),
        };
        Ok(())
    }
    fn range(&mut self, side: Side, start: &[u8], end: &[u8]) -> Result<crate::store::fold::Records, StoreError> {
        Ok(self
            .side
            .range((side, start.to_vec())..(side, end.to_vec()))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
    fn prefix(&mut self, side: Side, prefix: &[u8]) -> Result<crate::store::fold::Records, StoreError> {
        // Messages are never scanned by prefix.
        Ok(self
            .side
            .range((side, prefix.to_vec())..)
            .take_while(|((s, k), _)| *s == side && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Keeps everything in maps behind one lock.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets `room`'s log: its entries and what was folded from them
    /// (a cluster node's replica of a room it no longer serves, read again
    /// from Redis when it does). Its trim record stays.
    pub fn evict(&self, room: RoomId) {
        let mut g = self.lock();
        let entries: Vec<_> = g.messages.range((room, 0)..=(room, u64::MAX)).map(|(k, _)| *k).collect();
        for k in entries {
            g.messages.remove(&k);
        }
        let prefix = room.to_be_bytes();
        let side: Vec<_> = g.side.keys().filter(|(_, k)| k.starts_with(&prefix)).cloned().collect();
        for k in side {
            g.side.remove(&k);
        }
    }

    /// Makes `record` the trim record of `room` — decided elsewhere, as a
    /// cluster node's replica follows the trims made in Redis — and drops
    /// the entries below its start. A record older than the one held
    /// changes nothing.
    pub fn adopt_trim(&self, room: RoomId, record: &TrimRecord) -> Result<(), StoreError> {
        let mut g = self.lock();
        if g.trims.get(&room).is_some_and(|held| held.start() >= record.start()) {
            return Ok(());
        }
        let below: Vec<_> = g.messages.range((room, 0)..(room, record.start())).map(|(k, _)| *k).collect();
        for k in below {
            g.messages.remove(&k);
        }
        fold::forget_below(&mut *g, room, record.start())?;
        g.trims.insert(room, record.clone());
        Ok(())
    }

    fn folded_range(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<fold::Folded>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        let mut g = self.lock();
        let stored: Vec<(u64, Bytes, Option<Vec<u8>>)> = g
            .messages
            .range((room, from)..=(room, to))
            .map(|(k, v)| (k.1, v.clone(), g.side.get(&(Side::Folds, message_key(room, k.1).to_vec())).cloned()))
            .collect();
        fold::fold_all(&mut *g, room, viewer, stored)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves maps that are still
        // consistent (every update is a single insert), so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let g = self.lock();
        let rooms = g
            .rooms
            .iter()
            .map(|(name, &id)| RoomRecord {
                name: name.clone(),
                id,
                head: g
                    .messages
                    .range((id, 0)..=(id, u64::MAX))
                    .next_back()
                    .map_or(0, |((_, s), _)| *s)
                    .max(g.trims.get(&id).map_or(0, |t| t.start() - 1)),
                details: g.details.get(&id).cloned().unwrap_or_default(),
            })
            .collect();
        Ok(Snapshot {
            rooms,
            memberships: g
                .members
                .iter()
                .filter(|(_, m)| m.role != 0)
                .map(|((u, r), m)| (u.clone(), *r, m.clone()))
                .collect(),
            bans: g.bans.iter().map(|((r, u), b)| (*r, u.clone(), b.clone())).collect(),
            invites: g.invites.iter().map(|((u, r), i)| (u.clone(), *r, i.clone())).collect(),
            read_markers: g.reads.iter().map(|((u, r), s)| (u.clone(), *r, *s)).collect(),
            revocations: g.revocations.iter().map(|(u, t)| (u.clone(), *t)).collect(),
            counts: g
                .side
                .range((Side::Counts, Vec::new())..)
                .take_while(|((s, _), _)| *s == Side::Counts)
                .map(|((_, k), v)| {
                    let room = u64::from_be_bytes(
                        k.get(..8)
                            .and_then(|b| b.try_into().ok())
                            .ok_or_else(|| StoreError::Corrupt(format!("key {k:?}")))?,
                    );
                    let user = String::from_utf8_lossy(&k[8..]).into_owned();
                    Ok((room, user, Counts::decode(v)?))
                })
                .collect::<Result<_, StoreError>>()?,
            deleted: g
                .side
                .range((Side::Deleted, Vec::new())..)
                .take_while(|((s, _), _)| *s == Side::Deleted)
                .map(|((_, k), v)| {
                    let (room, seq) = seq_key(k)?;
                    let record = prost::Message::decode(v.as_slice())
                        .map_err(|e| StoreError::Corrupt(format!("a deleted record: {e}")))?;
                    Ok((room, seq, record))
                })
                .collect::<Result<Vec<(RoomId, u64, DeletedRecord)>, StoreError>>()?,
            trims: g.trims.iter().map(|(r, t)| (*r, t.clone())).collect(),
        })
    }

    fn departure(&self, user: &str, room: RoomId) -> Result<Option<MemberRecord>, StoreError> {
        Ok(self.lock().members.get(&(user.to_string(), room)).filter(|m| m.role == 0).cloned())
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut g = self.lock();
        for a in &batch.appends {
            g.messages.insert((a.room, a.seq), a.message.clone());
            if !a.client_msg_id.is_empty() {
                let rec = IdempotencyRecord { room: a.room, seq: a.seq, ts_ms: a.ts_ms };
                g.idem.insert((a.sender.clone(), a.client_msg_id.clone()), rec);
            }
        }
        for w in &batch.rooms {
            match w {
                RoomWrite::Details { room, name, details } => {
                    g.rooms.insert(name.clone(), *room);
                    g.details.insert(*room, details.clone());
                }
                RoomWrite::Member { user, room, record } => {
                    g.members.insert((user.clone(), *room), record.clone());
                }
                RoomWrite::Ban { room, user, ban: Some(b) } => {
                    g.bans.insert((*room, user.clone()), b.clone());
                }
                RoomWrite::Ban { room, user, ban: None } => {
                    g.bans.remove(&(*room, user.clone()));
                }
                RoomWrite::Invite { user, room, invite: Some(i) } => {
                    g.invites.insert((user.clone(), *room), i.clone());
                }
                RoomWrite::Invite { user, room, invite: None } => {
                    g.invites.remove(&(user.clone(), *room));
                }
                RoomWrite::InviteEnded { .. } => {}
            }
        }
        for r in &batch.read_markers {
            g.reads.insert((r.user.clone(), r.room), r.pos);
        }
        for (user, at) in &batch.revocations {
            g.revocations.insert(user.clone(), *at);
        }
        let runs = fold::runs(&batch.appends);
        if !runs.is_empty() {
            let inner = &mut *g;
            let mut undo = std::mem::take(&mut inner.undo);
            let mut cache = std::mem::take(&mut inner.counts);
            undo.clear();
            for (room, entries) in &runs {
                let first = entries[0].0;
                let mut rec = Recording { kv: inner, room: *room, first, log: &mut undo, noted: Default::default() };
                fold::apply(&mut rec, *room, entries, &mut cache)?;
            }
            inner.undo = undo;
            inner.counts = cache;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn truncate(&self, room: RoomId, from: u64) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.counts.clear();
        let mut undo = std::mem::take(&mut inner.undo);
        let undone = fold::undo(inner, &mut undo, room)?;
        inner.undo = undo;
        let tail = g.messages.split_off(&(room, from));
        let (gone, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = tail.into_iter().partition(|((r, _), _)| *r == room);
        g.messages.extend(keep);
        g.idem.retain(|_, rec| !(rec.room == room && gone.contains_key(&(room, rec.seq))));
        if let Some(first) = undone.filter(|f| *f < from) {
            fold::reapply(&mut *g, room, first, from - 1)?;
        }
        Ok(gone.len())
    }

    fn read_folded(&self, room: RoomId, from: u64, to: u64, viewer: &str) -> Result<Vec<fold::Folded>, StoreError> {
        self.folded_range(room, from, to, viewer)
    }

    fn target(&self, room: RoomId, seq: u64) -> Result<Option<Target>, StoreError> {
        fold::target(&mut *self.lock(), room, seq)
    }

    fn has_reaction(&self, room: RoomId, seq: u64, key: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.lock().side.contains_key(&(Side::Reactions, fold::reaction_key(room, seq, key, user))))
    }

    fn lookup_idempotent(&self, sender: &str, client_msg_id: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.lock().idem.get(&(sender.to_string(), client_msg_id.to_string())).copied())
    }

    fn expire_idempotency(&self, before_ts_ms: u64) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let before = g.idem.len();
        g.idem.retain(|_, r| r.ts_ms >= before_ts_ms);
        Ok(before - g.idem.len())
    }

    fn trim(&self, room: RoomId, trim: &Trim) -> Result<TrimRecord, StoreError> {
        let mut g = self.lock();
        let mut rec = g.trims.get(&room).cloned().unwrap_or_default();
        let from = rec.start();
        if from > trim.head {
            return Ok(rec);
        }
        let entries: Vec<(u64, Bytes)> =
            g.messages.range((room, from)..=(room, trim.head)).map(|((_, s), m)| (*s, m.clone())).collect();
        rec.advance(trim, entries)?;
        let below: Vec<_> = g.messages.range((room, 0)..(room, rec.start())).map(|(k, _)| *k).collect();
        for k in below {
            g.messages.remove(&k);
        }
        fold::forget_below(&mut *g, room, rec.start())?;
        g.trims.insert(room, rec.clone());
        Ok(rec)
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::append;

    #[test]
    fn meets_the_store_contract() {
        super::super::contract::exercise(&super::MemoryStore::new());
    }

    #[test]
    fn an_adopted_trim_drops_what_is_below_it_and_an_older_one_nothing() {
        let store = MemoryStore::new();
        let mut b = Batch::default();
        b.appends.extend((1..=6).map(|s| append(1, s, "ann", "")));
        store.write(&b).unwrap();
        let record = TrimRecord { start: 5, messages: 4, users: Vec::new() };
        store.adopt_trim(1, &record).unwrap();
        assert_eq!(store.read_range(1, 1, 6, "ann").unwrap().len(), 2, "5 and 6 remain");
        store.adopt_trim(1, &TrimRecord { start: 3, ..record.clone() }).unwrap();
        let later = store.trim(1, &Trim { keep_from: 6, older_than_ms: 0, head: 6 }).unwrap();
        assert_eq!((later.start(), later.messages), (6, 5), "trims go on from the adopted record");
    }
}
