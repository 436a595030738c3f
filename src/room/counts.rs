//! A room's unread counters (ARCHITECTURE.md, "Unread counts"): how many
//! change entries its log holds, per user how many messages they sent and
//! how many by others mention them, and who sent each deleted message —
//! raised by the fan-out as entries are committed, recovered from the
//! store's counters at start.
//!
//! A user's unread count is then arithmetic on these and the counts stored
//! with their read marker ([`ReadPos`]): messages after the marker, minus
//! their own, minus deleted ones by others. No log is read to answer
//! `Welcome`, however many rooms the user is in; only a `MarkRead` to a seq
//! below the head reads the few entries between the two.

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::{Counts, DeletedRecord, Entry, ReadPos, TrimRecord};

/// Unread and mention counts above this are reported as this.
pub const UNREAD_CAP: u64 = 9_999;

/// One deleted message, as unread counts need it.
struct Deleted {
    seq: u64,
    sender: Arc<str>,
    mentions: Box<[String]>,
}

/// The counters of one room.
#[derive(Default)]
pub struct RoomCounts {
    /// The last seq counted: counters are raised before the head is, so
    /// this is never below the head clients can see.
    through: u64,
    /// Change entries through `through`.
    changes: u64,
    /// Per user: messages sent, messages by others mentioning them.
    users: HashMap<Arc<str>, (u64, u64)>,
    /// Deleted messages in seq order.
    deleted: Vec<Deleted>,
    /// The counters through the entry before the log's start, once
    /// retention trimmed it: a read marker below counts from there.
    base: Option<TrimRecord>,
}

impl RoomCounts {
    /// Counters for a log that ends at `head`, with `changes` change entries.
    pub fn new(head: u64, changes: u64) -> Self {
        RoomCounts { through: head, changes, ..Default::default() }
    }

    /// Sets the number of change entries (at start).
    pub fn set_changes(&mut self, n: u64) {
        self.changes = n;
    }

    /// Sets a user's counters (at start).
    pub fn set_user(&mut self, user: &str, c: Counts) {
        self.users.insert(user.into(), (c.sent, c.mentioned));
    }

    /// Notes a deleted message (at start, in any order).
    pub fn add_deleted(&mut self, seq: u64, record: DeletedRecord) {
        let at = self.deleted.partition_point(|d| d.seq < seq);
        let d = Deleted { seq, sender: record.sender.into(), mentions: record.mentions.into() };
        self.deleted.insert(at, d);
    }

    /// Counts a committed entry; `erased` is who sent (and whom mentioned)
    /// the message a `Delete` entry deleted.
    pub fn count(&mut self, seq: u64, entry: &Entry, erased: Option<(&Arc<str>, &[String])>) {
        if seq <= self.through {
            return;
        }
        self.through = seq;
        match entry {
            Entry::Message { user, mentions } => {
                if !user.is_empty() {
                    self.user(user).0 += 1;
                }
                for m in mentions.iter().filter(|m| **m != **user) {
                    self.user(m).1 += 1;
                }
            }
            Entry::Change { target, .. } => {
                self.changes += 1;
                if let Some((sender, mentions)) = erased {
                    let at = self.deleted.partition_point(|d| d.seq < *target);
                    let d = Deleted { seq: *target, sender: sender.clone(), mentions: mentions.into() };
                    self.deleted.insert(at, d);
                }
            }
        }
    }

    fn user(&mut self, user: &str) -> &mut (u64, u64) {
        if !self.users.contains_key(user) {
            self.users.insert(user.into(), (0, 0));
        }
        self.users.get_mut(user).expect("inserted")
    }

    /// Retention moved the log's start: markers below it count from the
    /// counters through it, and deleted messages below it no longer count.
    /// A start past what was counted (a cluster node's replica that had
    /// not received the entries trimmed in Redis) makes the base's
    /// counters the room's.
    pub fn set_base(&mut self, base: TrimRecord) {
        let start = base.start();
        self.deleted.drain(..self.deleted.partition_point(|d| d.seq < start));
        if self.through + 1 < start {
            self.through = start - 1;
            self.changes = self.through - base.messages;
            self.users = base.users.iter().map(|u| (u.user.as_str().into(), (u.sent, u.mentioned))).collect();
        }
        self.base = Some(base);
    }

    /// Where a read marker at `seq` counts from: itself, or the counters
    /// through the log's start when it is below it.
    pub fn floor(&self, user: &str, pos: &ReadPos) -> ReadPos {
        match &self.base {
            Some(b) if pos.seq < b.start() - 1 => b.read_pos(user),
            _ => *pos,
        }
    }

    /// The last seq counted.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// Where a read marker at the last seq counted stands.
    pub fn at_head(&self, user: &str) -> ReadPos {
        let (sent, mentioned) = self.users.get(user).copied().unwrap_or_default();
        ReadPos { seq: self.through, messages: self.through - self.changes, sent, mentioned }
    }

    /// `user`'s (unread, mentions) with their marker at `pos`, each capped
    /// at [`UNREAD_CAP`].
    pub fn unread(&self, user: &str, pos: &ReadPos) -> (u64, u64) {
        let pos = &self.floor(user, pos);
        let head = self.at_head(user);
        let after = &self.deleted[self.deleted.partition_point(|d| d.seq <= pos.seq)..];
        let others = after.iter().filter(|d| *d.sender != *user);
        let deleted = others.clone().count() as u64;
        let deleted_mentions = others.filter(|d| d.mentions.iter().any(|m| m == user)).count() as u64;
        let unread = (head.messages.saturating_sub(pos.messages))
            .saturating_sub(head.sent.saturating_sub(pos.sent))
            .saturating_sub(deleted);
        let mentions = head.mentioned.saturating_sub(pos.mentioned).saturating_sub(deleted_mentions);
        (unread.min(UNREAD_CAP), mentions.min(UNREAD_CAP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(user: &str, mentions: &[&str]) -> Entry {
        Entry::Message { user: user.into(), mentions: mentions.iter().map(|m| m.to_string()).collect() }
    }

    #[test]
    fn a_trim_past_what_was_counted_takes_the_records_counters() {
        use crate::store::retention::UserCounts;
        // A replica that counted through 2 adopts a trim to 11: 10
        // entries below it, 8 of them messages, 3 by ann, 2 mentioning bob.
        let mut c = RoomCounts::new(0, 0);
        c.count(1, &msg("ann", &[]), None);
        c.count(2, &msg("ann", &[]), None);
        let users = vec![
            UserCounts { user: "ann".into(), sent: 3, mentioned: 0 },
            UserCounts { user: "bob".into(), sent: 0, mentioned: 2 },
        ];
        c.set_base(TrimRecord { start: 11, messages: 8, users });
        assert_eq!(c.through(), 10);
        assert_eq!(c.at_head("ann"), ReadPos { seq: 10, messages: 8, sent: 3, mentioned: 0 });
        c.count(11, &msg("cat", &["bob"]), None);
        // Bob never read: what remains, one message mentioning him.
        assert_eq!(c.unread("bob", &ReadPos::default()), (1, 1));
        // A base that does not pass the count changes no counter.
        let mut d = RoomCounts::new(0, 0);
        d.count(1, &msg("ann", &[]), None);
        d.count(2, &msg("ann", &[]), None);
        d.set_base(TrimRecord { start: 2, messages: 1, users: Vec::new() });
        assert_eq!(d.at_head("ann"), ReadPos { seq: 2, messages: 2, sent: 2, mentioned: 0 });
    }

    #[test]
    fn unread_counts_others_live_messages_after_the_marker() {
        let mut c = RoomCounts::new(0, 0);
        c.count(1, &msg("ann", &[]), None);
        c.count(2, &msg("bob", &["ann"]), None);
        let at2 = c.at_head("ann");
        c.count(3, &msg("bob", &["ann", "cat"]), None);
        c.count(4, &msg("ann", &["bob"]), None);
        c.count(5, &msg("cat", &[]), None);
        assert_eq!(c.unread("ann", &ReadPos::default()), (3, 2));
        assert_eq!(c.unread("ann", &at2), (2, 1));
        assert_eq!(c.unread("bob", &ReadPos::default()), (3, 1), "ann's message at 4 mentions bob");
        let del =
            Entry::Change { user: "bob".into(), target: 3, kind: crate::proto::ChangeKind::Delete, key: String::new() };
        let mentions = ["ann".to_string(), "cat".to_string()];
        c.count(6, &del, Some((&"bob".into(), &mentions)));
        assert_eq!(c.unread("ann", &at2), (1, 0), "the deleted message and its mention no longer count");
        assert_eq!(c.unread("ann", &ReadPos::default()), (2, 1));
        assert_eq!(c.unread("ann", &c.at_head("ann")), (0, 0));
        assert_eq!(c.unread("cat", &ReadPos::default()), (3, 0));
    }
}
