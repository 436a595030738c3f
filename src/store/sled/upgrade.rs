//! Upgrades of older store formats, done in place when a store opens.

use std::fs::File;

use super::journal::{JOURNAL, write_journal};
use super::trees::{FORMAT, corrupt_key};
use crate::store::idem::Entry;
use crate::store::{IdempotencyRecord, StoreError, split_user_key};

/// Moves a `FORMAT_1` store's idempotency records into the journal, in
/// timestamp order, then marks the store [`FORMAT`]. Written in that order,
/// a crash part way leaves a format-1 store, and the upgrade starts over.
pub(super) fn upgrade_from_format_1(db: &sled::Db, meta: &sled::Tree, data_file: &File) -> Result<(), StoreError> {
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
