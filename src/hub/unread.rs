//! Unread and mention counts (proto/README.md, §9 "Unread counts";
//! ARCHITECTURE.md, "Unread counts"): computed from the room's counters
//! ([`crate::room::counts`]) and the counts stored with the user's read
//! marker, without reading the log — except the few entries between a
//! marker set below the head and the head, when it is set.

use super::{Hub, Refusal};
use crate::proto::Message;
use crate::room::Room;
use crate::store::ReadPos;

/// What the entries of a stretch of log hold, as unread counts see it.
#[derive(Default)]
struct Tally {
    messages: u64,
    sent: u64,
    mentioned: u64,
    unread: u64,
    mentions: u64,
}

fn tally(user: &str, entries: &[Message]) -> Tally {
    let mut t = Tally::default();
    for m in entries.iter().filter(|m| m.change.is_none()) {
        let mentions_user = m.mentions.iter().any(|u| u == user);
        t.messages += 1;
        if m.sender == user {
            t.sent += 1;
        } else {
            t.mentioned += u64::from(mentions_user);
            if !m.deleted {
                t.unread += 1;
                t.mentions += u64::from(mentions_user);
            }
        }
    }
    t
}

impl Hub {
    /// `user`'s (unread, mentions) in `room` with their marker at `pos`, as
    /// of `head` (the head their session is subscribed at).
    pub fn unread(&self, room: &Room, user: &str, pos: &ReadPos, head: u64) -> (u64, u64) {
        let (unread, mentions, through) = {
            let c = room.counts();
            let (u, m) = c.unread(user, pos);
            (u, m, c.through())
        };
        if through <= head {
            return (unread, mentions);
        }
        // The fan-out has counted entries it has not yet dispatched: they
        // reach the session live, so they are not unread yet.
        match room.read_messages(self.store.as_ref(), head.max(pos.seq) + 1, through, user) {
            Ok(entries) => {
                let t = tally(user, &entries);
                (unread.saturating_sub(t.unread), mentions.saturating_sub(t.mentions))
            }
            Err(_) => (unread, mentions),
        }
    }

    /// Where a read marker at `seq` (at most the head) stands: the counts
    /// through it, from the room's counters less what the log holds
    /// between it and the last counted seq.
    pub fn read_pos(&self, room: &Room, user: &str, seq: u64) -> Result<ReadPos, Refusal> {
        let (at, floor) = {
            let c = room.counts();
            (c.at_head(user), c.floor(user, &ReadPos { seq, ..ReadPos::default() }))
        };
        if floor.seq > seq {
            // Below the log's start: nothing there can be read any more.
            return Ok(floor);
        }
        if seq >= at.seq {
            return Ok(ReadPos { seq, ..at });
        }
        let t = tally(user, &room.read_messages(self.store.as_ref(), seq + 1, at.seq, user)?);
        Ok(ReadPos {
            seq,
            messages: at.messages.saturating_sub(t.messages),
            sent: at.sent.saturating_sub(t.sent),
            mentioned: at.mentioned.saturating_sub(t.mentioned),
        })
    }
}
