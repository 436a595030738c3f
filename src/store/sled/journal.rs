//! The idempotency journal in sled: records of the keys one group commit
//! stored, loaded into the in-memory index at start (`store::idem` says why
//! it is a journal and not a record per key), repaired after a crash, and
//! trimmed when a failed commit's tail is truncated.

use std::sync::atomic::Ordering;

use super::SledStore;
use super::trees::{Trees, corrupt_key, decode_message};
use crate::store::idem::{self, Entry, Loc};
use crate::store::{Append, RoomId, StoreError, message_key};

/// The tree of the idempotency journal.
pub(super) const JOURNAL: &str = "idem_journal";

/// `meta` key of the last expiry's cutoff (Unix ms, u64 BE): keyed
/// messages older than it have no journal entry on purpose.
pub(super) const EXPIRED_BEFORE: &str = "idem_expired_before";

/// How far back `load` looks for messages whose idempotency records were
/// lost in a crash: at least the largest batch the group commit writes.
const REPAIR_WINDOW: u64 = crate::store::commit::MAX_BATCH_OPS as u64;

impl SledStore {
    /// Writes `entries` as journal records numbered on from `next_record`.
    pub(super) fn put_journal<'a>(
        &self,
        t: &Trees,
        entries: impl Iterator<Item = Entry<'a>>,
    ) -> Result<(), StoreError> {
        write_journal(&t.journal, entries, || self.next_record.fetch_add(1, Ordering::Relaxed))
    }

    /// Re-creates the journal entries lost between the messages and the
    /// journal record of the last group commit before a crash. Messages
    /// older than the last expiry's cutoff are past the window: their
    /// entries were expired, not lost.
    pub(super) fn repair_idempotency(
        &self,
        t: &Trees,
        room: RoomId,
        head: u64,
        expired_before: u64,
    ) -> Result<usize, StoreError> {
        let mut lost = Vec::new();
        let from = head.saturating_sub(REPAIR_WINDOW) + 1;
        for (seq, v) in t.entries(room, from, head)?.into_iter().rev() {
            let msg = decode_message(&message_key(room, seq), &v)?;
            if msg.ts_ms < expired_before {
                break;
            }
            if msg.client_msg_id.is_empty() {
                continue;
            }
            let loc = Loc { room, seq: msg.seq };
            let owner = crate::store::idempotency_owner(&msg.sender, &msg.room);
            if self.index().candidates(&owner, &msg.client_msg_id).contains(&loc) {
                // Batches are synced in order, so everything older is indexed.
                break;
            }
            lost.push(msg);
        }
        lost.reverse();
        let owners: Vec<String> =
            lost.iter().map(|m| crate::store::idempotency_owner(&m.sender, &m.room).into_owned()).collect();
        let entries = lost.iter().zip(&owners).map(|(m, owner)| Entry {
            room,
            seq: m.seq,
            ts_ms: m.ts_ms,
            user: owner,
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
    pub(super) fn drop_journal_entries(
        &self,
        t: &Trees,
        room: RoomId,
        from: u64,
        oldest_ts_ms: u64,
    ) -> Result<(), StoreError> {
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
}

pub(super) fn decode_record<'a>(k: &[u8], v: &'a [u8]) -> Result<Vec<Entry<'a>>, StoreError> {
    idem::decode_record(v).ok_or_else(|| StoreError::Corrupt(format!("idempotency journal record {k:?} is malformed")))
}

pub(super) fn record_number(k: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(k.try_into().map_err(|_| corrupt_key(k))?))
}

/// The journal entries of a batch's appends that carry a key.
pub(super) fn journal_entries(appends: &[Append]) -> impl Iterator<Item = Entry<'_>> + Clone {
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
pub(super) fn write_journal<'a>(
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
pub(super) fn keep_in_record<'a>(
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
