//! Frames as they wait in the queues: encoded once, shared by every
//! recipient.
//!
//! Each [`Frame`] holds the TCP encoding (length prefix + protobuf
//! envelope). The messages one committed batch adds to a room are encoded
//! once, back to back in one buffer (a [`Run`]), and every subscriber's queue
//! takes a range of it: one reference count per subscriber per batch rather
//! than per message, and a writer whose queue holds just that range writes
//! it straight from the shared buffer. Each message of a run has a slot for
//! its JSON text that the first WebSocket JSON recipient fills and the
//! others reuse — one encoding per wire format (ARCHITECTURE.md, "Encode
//! once").

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::PREFIX_LEN;

/// Field number of `Envelope.message` (checked by a test against prost).
const ENVELOPE_MESSAGE_FIELD: u32 = 18;

/// One queued entry: a reply or control frame, or a range of a [`Run`].
#[derive(Clone, Debug)]
pub struct Frame(pub(super) Repr);

#[derive(Clone, Debug)]
pub(super) enum Repr {
    /// A reply or control frame for one connection.
    One(Bytes),
    /// Messages `from..to` of a run shared by many recipients.
    Run { run: Arc<Run>, from: u32, to: u32 },
}

/// Frames for many recipients, encoded once: a room's messages from one
/// committed batch (or a single room push), their TCP frames back to back.
#[derive(Debug)]
pub struct Run {
    pub(super) wire: Bytes,
    pub(super) msgs: Box<[RunMessage]>,
}

#[derive(Debug)]
pub(super) struct RunMessage {
    /// Where its frame ends in `wire`.
    pub(super) end: usize,
    /// Its JSON text, made by the first WebSocket JSON recipient.
    json: OnceLock<Bytes>,
}

impl Run {
    /// A run of the frames in `wire`, the i-th ending at `ends[i]`
    /// (increasing, the last at `wire.len()`).
    pub fn new(wire: Bytes, ends: &[usize]) -> Arc<Run> {
        debug_assert!(ends.windows(2).all(|w| w[0] <= w[1]) && ends.last() == Some(&wire.len()));
        let msgs = ends.iter().map(|&end| RunMessage { end, json: OnceLock::new() }).collect();
        Arc::new(Run { wire, msgs })
    }

    /// How many frames it holds.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Bytes of all its frames.
    pub fn wire_len(&self) -> usize {
        self.wire.len()
    }

    /// Frame `i`: length prefix + protobuf `Envelope`.
    pub fn frame(&self, i: usize) -> &[u8] {
        &self.wire[self.span(i, i + 1)]
    }

    /// Frames `from..to` in a run of their own (a copy).
    pub(super) fn copy_range(&self, from: usize, to: usize) -> Arc<Run> {
        let span = self.span(from, to);
        let ends: Vec<usize> = self.msgs[from..to].iter().map(|m| m.end - span.start).collect();
        Run::new(Bytes::copy_from_slice(&self.wire[span]), &ends)
    }

    /// Where frames `from..to` (`from < to`) lie in `wire`.
    pub(super) fn span(&self, from: usize, to: usize) -> std::ops::Range<usize> {
        let start = if from == 0 { 0 } else { self.msgs[from - 1].end };
        start..self.msgs[to - 1].end
    }

    /// Bytes of frame `i`.
    pub(super) fn size(&self, i: usize) -> usize {
        self.span(i, i + 1).len()
    }
}

impl Frame {
    /// A frame for many recipients (a room push).
    pub fn shared(wire: Bytes) -> Self {
        let len = wire.len();
        Frame::range(&Run::new(wire, &[len]), 0, 1)
    }

    /// Frames `from..to` of `run`.
    pub(super) fn range(run: &Arc<Run>, from: usize, to: usize) -> Self {
        debug_assert!(from < to && to <= run.len());
        // A run has at most one committed batch of messages (u32 is plenty).
        Frame(Repr::Run { run: run.clone(), from: from as u32, to: to as u32 })
    }

    /// Length prefix + protobuf `Envelope`, as written on TCP and TLS (one
    /// frame after another for a range of several).
    pub fn wire(&self) -> &[u8] {
        match &self.0 {
            Repr::One(wire) => wire,
            Repr::Run { run, from, to } => &run.wire[run.span(*from as usize, *to as usize)],
        }
    }

    /// For a single frame shared by many recipients: the slot for its JSON
    /// text.
    pub fn json_cell(&self) -> Option<&OnceLock<Bytes>> {
        match &self.0 {
            Repr::One(_) => None,
            Repr::Run { run, from, to } => (to - from == 1).then(|| &run.msgs[*from as usize].json),
        }
    }

    /// The protobuf envelope without the length prefix (a WebSocket binary
    /// message) of a single frame.
    pub fn envelope(&self) -> Bytes {
        debug_assert_eq!(self.count(), 1, "one frame is one message");
        let (wire, span) = match &self.0 {
            Repr::One(wire) => (wire, 0..wire.len()),
            Repr::Run { run, from, to } => (&run.wire, run.span(*from as usize, *to as usize)),
        };
        wire.slice((span.start + PREFIX_LEN).min(span.end)..span.end)
    }

    /// How many frames this entry holds.
    pub fn count(&self) -> usize {
        match &self.0 {
            Repr::One(_) => 1,
            Repr::Run { from, to, .. } => (to - from) as usize,
        }
    }

    /// Moves this entry's frames into `out` one by one (for transports
    /// that send each frame as a message of its own).
    pub(super) fn split_into(self, out: &mut Vec<Frame>) {
        match self.0 {
            Repr::Run { run, from, to } if to - from > 1 => {
                out.extend((from..to - 1).map(|i| Frame(Repr::Run { run: run.clone(), from: i, to: i + 1 })));
                out.push(Frame(Repr::Run { run, from: to - 1, to }));
            }
            _ => out.push(self),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.wire().len()
    }
}

impl From<Bytes> for Frame {
    fn from(wire: Bytes) -> Self {
        Frame(Repr::One(wire))
    }
}

/// Wraps an encoded `Message` into a push frame (prefix + `Envelope{id: 0,
/// message}`) without decoding it.
pub fn message_frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + 16 + message.len());
    put_message_frame(message, &mut out);
    out.freeze()
}

/// [`message_frame`], appended to `out`.
pub fn put_message_frame(message: &[u8], out: &mut BytesMut) {
    let mut head = [0u8; 16];
    let mut body = &mut head[..];
    prost::encoding::encode_key(ENVELOPE_MESSAGE_FIELD, prost::encoding::WireType::LengthDelimited, &mut body);
    prost::encoding::encode_varint(message.len() as u64, &mut body);
    let head_len = 16 - body.len();
    let env_len = head_len + message.len();
    out.reserve(PREFIX_LEN + env_len);
    out.put_u32(env_len as u32);
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(message);
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::codec::encode_frame;
    use crate::proto::{self, Body, Envelope};

    #[test]
    fn message_frames_match_a_full_envelope_encoding() {
        let m = proto::Message { room: "r".into(), seq: 9, text: "hi".into(), ..Default::default() };
        let direct = message_frame(&m.encode_to_vec());
        assert_eq!(direct, encode_frame(&Envelope::push(Body::Message(m))));
    }
}
