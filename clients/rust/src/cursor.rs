//! Per-room delivery order: the part of the client that turns what the
//! server sends (live messages, resume replays, history pages) into each
//! room's messages exactly once and in seq order.
//!
//! A room's cursor is the last seq handed to the application. A message at
//! or below it is a duplicate and dropped; the next seq is delivered; a
//! later one means a gap (a resume that exceeded the server's replay bound,
//! `Synced{complete: false}`), so the room holds further events back and the
//! client pages the gap in with `History` before releasing them.

use std::collections::{HashMap, VecDeque};

use chatd::proto;

/// What the connection should do after an event for a room.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to fetch.
    None,
    /// Fetch messages with seq > `after` (forward history) to fill a gap.
    FetchAfter(u64),
}

/// An event held back behind a gap.
// Nearly every one is a message; boxing it would cost an allocation per
// message received to save a few bytes per rare `Synced`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Held {
    /// A message.
    Message(proto::Message),
    /// A resume's end marker.
    Synced(proto::Synced),
}

#[derive(Default, Debug)]
struct Room {
    last: u64,
    /// `Some` while a gap is being filled: events that arrived behind it.
    held: Option<VecDeque<Held>>,
}

/// Cursors of every room the client knows.
#[derive(Default, Debug)]
pub struct Cursors {
    rooms: HashMap<String, Room>,
}

impl Cursors {
    /// Sets a room's cursor (from `Welcome`, `Joined`, or the application).
    /// Never moves an existing cursor backwards.
    pub fn track(&mut self, room: &str, last: u64) {
        let r = self.rooms.entry(room.to_string()).or_default();
        r.last = r.last.max(last);
    }

    /// Forgets a room (left).
    pub fn forget(&mut self, room: &str) {
        self.rooms.remove(room);
    }

    /// Whether the room is tracked.
    pub fn knows(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// The last seq delivered in `room`.
    pub fn last(&self, room: &str) -> Option<u64> {
        self.rooms.get(room).map(|r| r.last)
    }

    /// Every room with its cursor, for `Hello.resume`.
    pub fn resume(&self) -> Vec<proto::Cursor> {
        let mut v: Vec<_> =
            self.rooms.iter().map(|(room, r)| proto::Cursor { room: room.clone(), after_seq: r.last }).collect();
        v.sort_by(|a, b| a.room.cmp(&b.room));
        v
    }

    /// Forgets any gap fill in progress (the connection was lost; the resume
    /// will replay from the cursor again).
    pub fn reset_gaps(&mut self) {
        for r in self.rooms.values_mut() {
            r.held = None;
        }
    }

    /// Takes a live or replayed message; `out` receives what is deliverable.
    pub fn on_message(&mut self, m: proto::Message, out: &mut Vec<Held>) -> Action {
        let r = self.rooms.entry(m.room.clone()).or_insert_with(|| Room { last: m.seq.saturating_sub(1), held: None });
        if let Some(held) = &mut r.held {
            held.push_back(Held::Message(m));
            return Action::None;
        }
        if m.seq <= r.last {
            return Action::None;
        }
        if m.seq == r.last + 1 {
            r.last = m.seq;
            out.push(Held::Message(m));
            return Action::None;
        }
        let after = r.last;
        r.held = Some(VecDeque::from([Held::Message(m)]));
        Action::FetchAfter(after)
    }

    /// Takes a `Synced`: delivered in order with the room's messages.
    pub fn on_synced(&mut self, s: proto::Synced, out: &mut Vec<Held>) {
        match self.rooms.get_mut(&s.room).and_then(|r| r.held.as_mut()) {
            Some(held) => held.push_back(Held::Synced(s)),
            None => out.push(Held::Synced(s)),
        }
    }

    /// Takes a history page fetched to fill a gap in `room`.
    pub fn on_gap_page(&mut self, room: &str, page: proto::HistoryPage, out: &mut Vec<Held>) -> Action {
        let Some(r) = self.rooms.get_mut(room) else { return Action::None };
        let Some(held) = r.held.as_ref() else { return Action::None };
        // The page fills the gap up to the first held message; the held
        // events then follow in the order the server sent them.
        let first_held = held
            .iter()
            .find_map(|e| match e {
                Held::Message(m) => Some(m.seq),
                Held::Synced(_) => None,
            })
            .unwrap_or(u64::MAX);
        // What retention removed is gone for good: the log starts at
        // `first_seq`.
        if r.last + 1 < page.first_seq && page.first_seq <= first_held {
            r.last = page.first_seq - 1;
        }
        let before = r.last;
        for m in page.messages {
            if m.seq == r.last + 1 && m.seq < first_held {
                r.last = m.seq;
                out.push(Held::Message(m));
            }
        }
        if r.last + 1 < first_held && page.has_more && r.last > before {
            return Action::FetchAfter(r.last);
        }
        for e in r.held.take().unwrap_or_default() {
            match e {
                Held::Message(m) if m.seq <= r.last => {}
                Held::Message(m) => {
                    // A hole the log cannot fill (the page ended before it)
                    // is skipped rather than waited for forever.
                    r.last = m.seq;
                    out.push(Held::Message(m));
                }
                Held::Synced(s) => out.push(Held::Synced(s)),
            }
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, seq: u64) -> proto::Message {
        proto::Message { room: room.into(), seq, ..Default::default() }
    }

    fn seqs(out: &[Held]) -> Vec<u64> {
        out.iter()
            .map(|e| match e {
                Held::Message(m) => m.seq,
                Held::Synced(_) => 0,
            })
            .collect()
    }

    #[test]
    fn duplicates_are_dropped_and_order_kept() {
        let mut c = Cursors::default();
        c.track("r", 2);
        let mut out = Vec::new();
        for s in [1, 2, 3, 3, 4, 2] {
            assert_eq!(c.on_message(msg("r", s), &mut out), Action::None);
        }
        assert_eq!(seqs(&out), vec![3, 4]);
        assert_eq!(c.resume(), vec![proto::Cursor { room: "r".into(), after_seq: 4 }]);
    }

    #[test]
    fn a_gap_is_paged_in_before_later_events_are_released() {
        let mut c = Cursors::default();
        c.track("r", 10);
        let mut out = Vec::new();
        assert_eq!(c.on_message(msg("r", 20), &mut out), Action::FetchAfter(10));
        c.on_message(msg("r", 21), &mut out);
        c.on_synced(proto::Synced { room: "r".into(), head_seq: 21, complete: false, first_seq: 1 }, &mut out);
        c.on_message(msg("r", 22), &mut out);
        assert!(out.is_empty(), "held behind the gap");
        let page1 = proto::HistoryPage {
            first_seq: 1,
            room: "r".into(),
            messages: (11..=15).map(|s| msg("r", s)).collect(),
            head_seq: 22,
            has_more: true,
        };
        assert_eq!(c.on_gap_page("r", page1, &mut out), Action::FetchAfter(15));
        let page2 = proto::HistoryPage {
            first_seq: 1,
            room: "r".into(),
            messages: (16..=22).map(|s| msg("r", s)).collect(),
            head_seq: 22,
            has_more: false,
        };
        assert_eq!(c.on_gap_page("r", page2, &mut out), Action::None);
        assert_eq!(seqs(&out), vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 0, 22]);
        assert_eq!(c.last("r"), Some(22));
    }

    #[test]
    fn an_unknown_room_starts_at_its_first_message() {
        let mut c = Cursors::default();
        let mut out = Vec::new();
        assert_eq!(c.on_message(msg("new", 7), &mut out), Action::None);
        assert_eq!(seqs(&out), vec![7]);
    }
}
