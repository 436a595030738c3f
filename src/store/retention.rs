//! Retention: where a room's log now starts, and what its trimmed part
//! held as unread counts see it (ARCHITECTURE.md, "Retention").
//!
//! A trim removes the oldest entries of a room by age, by count or both
//! ([`Trim`]); seqs are never reused, so the room's head stays where it was
//! even when every entry is gone. The store writes the [`TrimRecord`]
//! first and removes entries after it, so a crash part way leaves entries
//! below the record's start that nothing reads and the next start removes.
//!
//! Unread counts are differences of counters through two seqs (a read
//! marker's and the head's). A marker below the start would count entries
//! no one can read any more, so the record keeps the counters through
//! `start - 1` — every user's messages sent and mentions received there —
//! and a marker below it counts from there instead.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;

use super::{Entry, ReadPos, StoreError};
use crate::proto;

/// What one trim may remove.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trim {
    /// Remove entries below this seq (the count limit: `head - max + 1`).
    pub keep_from: u64,
    /// Remove entries stamped before this time, Unix ms (0: none).
    pub older_than_ms: u64,
    /// Never remove past this seq: the room's dispatched head, above which
    /// entries may still be on their way through the group commit.
    pub head: u64,
}

/// Where a room's log starts and the unread counters through the entry
/// before it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrimRecord {
    /// The first seq kept (0 is taken for 1: nothing was trimmed).
    #[prost(uint64, tag = "1")]
    pub start: u64,
    /// Messages (not change entries) below `start`.
    #[prost(uint64, tag = "2")]
    pub messages: u64,
    /// Per user: messages sent and mentions by others below `start`. In user
    /// order.
    #[prost(message, repeated, tag = "3")]
    pub users: Vec<UserCounts>,
}

/// One user's counters through a trimmed log's start.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserCounts {
    /// The user.
    #[prost(string, tag = "1")]
    pub user: String,
    /// Messages they sent.
    #[prost(uint64, tag = "2")]
    pub sent: u64,
    /// Messages by others that mention them.
    #[prost(uint64, tag = "3")]
    pub mentioned: u64,
}

impl TrimRecord {
    /// The first seq the log holds.
    pub fn start(&self) -> u64 {
        self.start.max(1)
    }

    /// Decodes a stored record.
    pub fn decode_stored(v: &[u8]) -> Result<Self, StoreError> {
        Self::decode(v).map_err(|e| StoreError::Corrupt(format!("trim record does not decode: {e}")))
    }

    /// Where a read marker below the start counts from: the counters
    /// through `start - 1`.
    pub fn read_pos(&self, user: &str) -> ReadPos {
        let (sent, mentioned) = match self.users.binary_search_by(|u| u.user.as_str().cmp(user)) {
            Ok(i) => (self.users[i].sent, self.users[i].mentioned),
            Err(_) => (0, 0),
        };
        ReadPos { seq: self.start() - 1, messages: self.messages, sent, mentioned }
    }

    /// Moves the start over `entries` (the log's entries from the current
    /// start on, in seq order) as far as `trim` allows, counting what it
    /// passes. Returns whether `trim` stopped it (else the entries ran
    /// out first, and more may follow).
    pub fn advance(
        &mut self,
        trim: &Trim,
        entries: impl IntoIterator<Item = (u64, Bytes)>,
    ) -> Result<bool, StoreError> {
        let mut users: BTreeMap<String, (u64, u64)> =
            self.users.drain(..).map(|u| (u.user, (u.sent, u.mentioned))).collect();
        let mut stopped = false;
        for (seq, bytes) in entries {
            if seq < self.start() {
                continue;
            }
            if seq != self.start() {
                return Err(StoreError::Corrupt(format!("log entry {seq} follows {}", self.start() - 1)));
            }
            let m = proto::Message::decode(bytes.as_ref())
                .map_err(|e| StoreError::Corrupt(format!("log entry {seq} does not decode: {e}")))?;
            let expired = m.ts_ms < trim.older_than_ms;
            if seq > trim.head || (seq >= trim.keep_from && !expired) {
                stopped = true;
                break;
            }
            // As the room's counters count (`room::counts`): a message
            // counts for its sender and for those it mentions.
            if let Entry::Message { user, mentions } = Entry::of(&m) {
                self.messages += 1;
                if !user.is_empty() {
                    users.entry(user.to_string()).or_default().0 += 1;
                }
                for u in mentions.iter().filter(|u| **u != *user) {
                    users.entry(u.clone()).or_default().1 += 1;
                }
            }
            self.start = seq + 1;
        }
        self.users = users.into_iter().map(|(user, (sent, mentioned))| UserCounts { user, sent, mentioned }).collect();
        Ok(stopped || self.start() > trim.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{append, change};

    fn entries(appends: &[crate::store::Append]) -> Vec<(u64, Bytes)> {
        appends.iter().map(|a| (a.seq, a.message.clone())).collect()
    }

    #[test]
    fn the_start_moves_by_count_and_by_age_and_counts_what_it_passes() {
        // contract::append stamps seq s at 1000 + s.
        let mut log = vec![append(1, 1, "ann", ""), append(1, 2, "bob", ""), append(1, 3, "ann", "")];
        log.push(change(4, "bob", 1, crate::proto::ChangeKind::ReactionAdd, ""));
        log.push(append(1, 5, "cat", ""));
        let mut rec = TrimRecord::default();
        assert_eq!(rec.start(), 1);
        let stopped = rec.advance(&Trim { keep_from: 3, older_than_ms: 0, head: 5 }, entries(&log)).unwrap();
        assert!(stopped);
        assert_eq!((rec.start(), rec.messages), (3, 2));
        assert_eq!(rec.read_pos("ann"), ReadPos { seq: 2, messages: 2, sent: 1, mentioned: 0 });
        assert_eq!(rec.read_pos("zed"), ReadPos { seq: 2, messages: 2, sent: 0, mentioned: 0 });
        // By age: entries stamped before 1005 go; the change entry (2004) stays.
        let stopped = rec.advance(&Trim { keep_from: 0, older_than_ms: 1005, head: 5 }, entries(&log)).unwrap();
        assert!(stopped);
        assert_eq!((rec.start(), rec.messages), (4, 3));
        assert_eq!(rec.read_pos("ann").sent, 2);
        // Never past the head, even when everything is old; a change entry
        // is not a message.
        let stopped = rec.advance(&Trim { keep_from: 99, older_than_ms: u64::MAX, head: 4 }, entries(&log)).unwrap();
        assert!(stopped);
        assert_eq!((rec.start(), rec.messages), (5, 3));
        let stopped = rec.advance(&Trim { keep_from: 99, older_than_ms: 0, head: 5 }, entries(&log)).unwrap();
        assert!(stopped, "the head is reached");
        assert_eq!((rec.start(), rec.messages), (6, 4));
    }

    #[test]
    fn a_gap_in_the_entries_is_reported() {
        let log = [append(1, 1, "ann", ""), append(1, 3, "ann", "")];
        let err = TrimRecord::default().advance(&Trim { keep_from: 9, older_than_ms: 0, head: 3 }, entries(&log));
        assert!(err.is_err());
    }
}
