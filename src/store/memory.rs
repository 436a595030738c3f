//! An in-memory [`Store`] for tests and benches: the same contract as the
//! sled store, nothing on disk, `sync` is free.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use super::{
    BanRecord, Batch, IdempotencyRecord, InviteRecord, MemberRecord, RoomDetails, RoomId, RoomRecord, RoomWrite,
    Snapshot, Store, StoreError,
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
    reads: BTreeMap<(String, RoomId), u64>,
    idem: HashMap<(String, String), IdempotencyRecord>,
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
                head: g.messages.range((id, 0)..=(id, u64::MAX)).next_back().map_or(0, |((_, s), _)| *s),
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
            }
        }
        for r in &batch.read_markers {
            g.reads.insert((r.user.clone(), r.room), r.seq);
        }
        for (user, at) in &batch.revocations {
            g.revocations.insert(user.clone(), *at);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn truncate(&self, room: RoomId, from: u64) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let tail = g.messages.split_off(&(room, from));
        let (gone, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = tail.into_iter().partition(|((r, _), _)| *r == room);
        g.messages.extend(keep);
        g.idem.retain(|_, rec| !(rec.room == room && gone.contains_key(&(room, rec.seq))));
        Ok(gone.len())
    }

    fn read_range(&self, room: RoomId, from: u64, to: u64) -> Result<Vec<Bytes>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        Ok(self.lock().messages.range((room, from)..=(room, to)).map(|(_, v)| v.clone()).collect())
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

    fn size_on_disk(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meets_the_store_contract() {
        super::super::contract::exercise(&super::MemoryStore::new());
    }
}
