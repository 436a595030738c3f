//! Reading a room's log as pages (`History`, and the server API's reading
//! of messages): a seq range, cut to the frame size the client was
//! promised.

use std::sync::Arc;

use prost::Message as _;

use super::{Hub, Refusal};
use crate::proto;
use crate::room::Room;

/// History page size when the request says 0, and the cap.
const HISTORY_DEFAULT: u32 = 100;
const HISTORY_MAX: u32 = 1000;

impl Hub {
    /// The page of `room` that `h` asks for, as `viewer` sees it (who may
    /// read it is the caller's check).
    pub fn history_page(
        &self,
        room: &Arc<Room>,
        h: &proto::History,
        viewer: &str,
    ) -> Result<proto::HistoryPage, Refusal> {
        let head = room.head();
        // Read after the head: a trim that moves the start past a page
        // being read leaves it shorter, never with a hole.
        let start = room.start();
        let limit = u64::from(match h.limit {
            0 => HISTORY_DEFAULT,
            n => n.min(HISTORY_MAX),
        });
        // Seqs are contiguous from the log's start, so a page is a seq range.
        let (from, to, has_more) = if h.forward {
            let after = h.after_seq.max(start - 1);
            let from = after.saturating_add(1);
            let to = head.min(after.saturating_add(limit));
            (from, to, to < head)
        } else {
            let below = if h.before_seq == 0 { head } else { h.before_seq.saturating_sub(1).min(head) };
            let from = below.saturating_sub(limit - 1).max(start);
            (from, below, from > start && below >= start)
        };
        let started = std::time::Instant::now();
        let mut messages =
            if from <= to { room.read_messages(self.store.as_ref(), from, to, viewer)? } else { Vec::new() };
        self.metrics.history_read.record(started.elapsed().as_secs_f64());
        // A page must fit in one frame of max_frame_bytes (what Welcome
        // promised the client): keep the messages nearest the cursor and say
        // there is more. One message always fits (it came in one frame).
        let budget = self.limits.max_frame_bytes.saturating_sub(256);
        let mut used = 0;
        let fits = |m: &proto::Message, used: &mut usize| {
            let len = m.encoded_len() + 8;
            let ok = *used == 0 || *used + len <= budget;
            if ok {
                *used += len;
            }
            ok
        };
        let has_more = if h.forward {
            let keep = messages.iter().take_while(|m| fits(m, &mut used)).count();
            let cut = keep < messages.len();
            messages.truncate(keep);
            has_more || cut
        } else {
            let keep = messages.iter().rev().take_while(|m| fits(m, &mut used)).count();
            let cut = keep < messages.len();
            messages.drain(..messages.len() - keep);
            has_more || cut
        };
        Ok(proto::HistoryPage { room: room.name.to_string(), messages, head_seq: head, has_more, first_seq: start })
    }
}
