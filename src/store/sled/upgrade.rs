//! Upgrades of older store formats, done in place when a store opens.

use std::fs::File;

use super::journal::{JOURNAL, write_journal};
use super::trees::{FORMAT, FORMAT_2, FORMAT_3, corrupt_key, room_id_of};
use crate::store::idem::Entry;
use crate::store::{IdempotencyRecord, StoreError, split_user_key};

/// Moves a `FORMAT_1` store's idempotency records into the journal, in
/// timestamp order, then marks the store [`FORMAT_2`]. Written in that
/// order, a crash part way leaves a format-1 store, and the upgrade starts
/// over.
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
    meta.insert("format", FORMAT_2)?;
    db.drop_tree("idem")?;
    db.flush()?;
    data_file.sync_data()?;
    tracing::info!(ids = ids.len(), "store upgraded from chatd-store-1: the idempotency window is now a journal");
    Ok(())
}

/// How far into a room's log the upgrade looks for a member who posted.
const OWNER_SCAN: u64 = 10_000;

/// Gives a `FORMAT_2` store's rooms their details and its members their
/// roles, then marks the store [`FORMAT`]. Every room becomes `PUBLIC`
/// (`dm:` rooms `DIRECT`); its owner is the member whose message comes first
/// in its log (within the first [`OWNER_SCAN`] messages), else the first
/// member in user-id order: that format did not record when members joined.
/// The members' records are rewritten from the keys alone, so a crash part
/// way leaves a format-2 store and the upgrade starts over.
pub(super) fn upgrade_from_format_2(db: &sled::Db, meta: &sled::Tree, data_file: &File) -> Result<(), StoreError> {
    use prost::Message as _;

    use crate::proto::{self, Role, RoomKind};
    use crate::store::{MemberRecord, RoomDetails, message_key, user_key};

    let rooms = db.open_tree("rooms")?;
    let members = db.open_tree("members")?;
    let messages = db.open_tree("messages")?;
    let mut by_room: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for kv in members.iter() {
        let (k, _) = kv?;
        let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
        by_room.entry(room_id_of(room)?).or_default().push(user.to_string());
    }
    let mut upgraded = 0;
    // Collected first: the loop rewrites the values it reads.
    let entries = rooms.iter().collect::<Result<Vec<_>, _>>()?;
    for (k, v) in entries {
        let name = String::from_utf8(k.to_vec()).map_err(|_| corrupt_key(&k))?;
        // The id leads the value in both formats (a crash part way through
        // leaves some rewritten).
        let id = room_id_of(v.get(..8).ok_or_else(|| corrupt_key(&v))?)?;
        let users = by_room.remove(&id).unwrap_or_default();
        let direct = name.starts_with("dm:");
        let mut first_ts = 0;
        let mut owner = None;
        let stored = messages.range(message_key(id, 1)..=message_key(id, OWNER_SCAN));
        for (seq, v) in runs_of(stored)? {
            let m = proto::Message::decode(v.as_ref()).map_err(|_| corrupt_key(&message_key(id, seq)))?;
            if first_ts == 0 {
                first_ts = m.ts_ms;
            }
            if users.contains(&m.sender) {
                owner = Some(m.sender);
                break;
            }
        }
        // Keys are in user-id order.
        let owner = owner.or_else(|| users.first().cloned()).unwrap_or_default();
        let kind = if direct { RoomKind::Direct } else { RoomKind::Public };
        let details = RoomDetails {
            kind: kind as i32,
            title: String::new(),
            topic: String::new(),
            created_by: owner.clone(),
            created_ms: first_ts,
            ..Default::default()
        };
        rooms.insert(&k, super::trees::room_value(id, &details))?;
        for user in &users {
            let role = if !direct && *user == owner { Role::Owner } else { Role::Member };
            let record = MemberRecord { role: role as i32, since: 0, reason: 0, by: String::new(), role_ms: 0 };
            members.insert(user_key(user, &id.to_be_bytes()), record.encode_to_vec())?;
        }
        upgraded += 1;
    }
    meta.insert("format", FORMAT_3)?;
    db.flush()?;
    data_file.sync_data()?;
    tracing::info!(
        rooms = upgraded,
        "store upgraded from chatd-store-2: rooms are public, their oldest members own them"
    );
    Ok(())
}

/// Gives a `FORMAT_3` store the counters unread counts start from, then
/// marks it [`FORMAT`]: one pass over every room's log counts each user's
/// messages, and each read marker gets the counts through it. That format
/// had no change entries and no mentions, so a message is a message and
/// nobody was mentioned. A crash part way leaves a format-3 store, and the
/// upgrade starts over (the counters are rewritten whole).
pub(super) fn upgrade_from_format_3(db: &sled::Db, meta: &sled::Tree, data_file: &File) -> Result<(), StoreError> {
    use std::collections::HashMap;

    use prost::Message as _;

    use crate::proto;
    use crate::store::fold::{Counts, counts_key};
    use crate::store::{ReadPos, message_key};

    let rooms = db.open_tree("rooms")?;
    let messages = db.open_tree("messages")?;
    let reads = db.open_tree("reads")?;
    let counts = db.open_tree("counts")?;
    // Read markers by room, each with its user, in seq order.
    let mut markers: HashMap<u64, Vec<(u64, String)>> = HashMap::new();
    for kv in reads.iter() {
        let (k, v) = kv?;
        let (user, room) = split_user_key(&k).ok_or_else(|| corrupt_key(&k))?;
        // A marker rewritten by an upgrade that a crash interrupted has
        // its counts already.
        let read = match ReadPos::decode(&v) {
            Some(pos) => pos.seq,
            None => room_id_of(&v)?,
        };
        markers.entry(room_id_of(room)?).or_default().push((read, user.to_string()));
    }
    let mut upgraded = 0u64;
    for kv in rooms.iter() {
        let (_, v) = kv?;
        let id = room_id_of(v.get(..8).ok_or_else(|| corrupt_key(&v))?)?;
        let mut at = markers.remove(&id).unwrap_or_default();
        at.sort();
        let mut at = at.into_iter().peekable();
        let mut sent: HashMap<String, Counts> = HashMap::new();
        let mut positions = Vec::new();
        let mut count = 0u64;
        for (seq, v) in runs_of(messages.range(message_key(id, 0)..=message_key(id, u64::MAX)))? {
            let k = message_key(id, seq);
            while let Some((read, user)) = at.next_if(|(read, _)| *read < seq) {
                let own = sent.get(&user).map_or(0, |c| c.sent);
                positions.push((user, ReadPos { seq: read, messages: count, sent: own, mentioned: 0 }));
            }
            let m = proto::Message::decode(v.as_ref()).map_err(|_| corrupt_key(&k))?;
            count += 1;
            if !m.sender.is_empty() {
                let c = sent.entry(m.sender).or_default();
                c.sent += 1;
                c.through = seq;
            }
        }
        for (read, user) in at {
            let own = sent.get(&user).map_or(0, |c| c.sent);
            positions.push((user, ReadPos { seq: read, messages: count, sent: own, mentioned: 0 }));
        }
        for (user, c) in sent {
            counts.insert(counts_key(id, &user), &c.encode()[..])?;
        }
        for (user, pos) in positions {
            reads.insert(crate::store::user_key(&user, &id.to_be_bytes()), &pos.encode()[..])?;
        }
        upgraded += 1;
    }
    meta.insert("format", FORMAT)?;
    db.flush()?;
    data_file.sync_data()?;
    tracing::info!(rooms = upgraded, "store upgraded from chatd-store-3: unread counters computed from the logs");
    Ok(())
}

/// The entries of the stored values `range` yields, `(seq, message)` in
/// seq order, whether stored as runs or one per key (a store that was
/// written partly by this build).
fn runs_of(range: sled::Iter) -> Result<Vec<(u64, bytes::Bytes)>, StoreError> {
    let mut entries = Vec::new();
    for kv in range {
        let (k, v) = kv?;
        entries.extend(super::runs::decode(&k, &v)?);
    }
    Ok(entries)
}
