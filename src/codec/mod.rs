//! Framing: the 4-byte big-endian length prefix that carries one protobuf
//! `Envelope` per frame on TCP and TLS (proto/README.md, §1 "Framing").
//!
//! The server, the Rust client and the load tester all use this one codec.
//! Decoding is check-then-allocate: the announced length is compared with
//! `max_frame_bytes` as soon as the prefix is in, so a 4 GiB prefix costs
//! nothing but an error; and the buffer grows only as bytes arrive (never by
//! the announced length), so a peer that announces 60 KB and trickles bytes
//! holds only what it sent. A complete frame is split off the buffer without
//! a copy. An incomplete frame is a normal state, not an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::Envelope;

/// Length of the frame prefix in bytes.
pub const PREFIX_LEN: usize = 4;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The prefix announced more than the frame limit; nothing was allocated.
    TooLarge {
        /// The limit in force.
        max: usize,
    },
    /// The peer closed the stream in the middle of a frame.
    Truncated,
    /// The underlying stream failed.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { max } => {
                write!(f, "frame length exceeds the limit of {max} bytes")
            }
            FrameError::Truncated => write!(f, "stream ended in the middle of a frame"),
            FrameError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads whole frames from a byte stream.
///
/// The buffer starts small and grows only as large frames arrive, so an idle
/// connection holds a few hundred bytes, not a fixed 8 KiB.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
}

/// Initial read buffer; it grows as data arrives.
const INITIAL_READ_BUF: usize = 512;
/// Most the buffer grows by for one read.
const READ_CHUNK: usize = 16 * 1024;
/// When an idle buffer has grown past this, it is released instead of kept.
const SHRINK_ABOVE: usize = 16 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `io`, refusing frames larger than `max_frame_bytes`.
    pub fn new(io: R, max_frame_bytes: usize) -> Self {
        FrameReader { io, buf: BytesMut::new(), max: max_frame_bytes }
    }

    /// The next complete frame (without its prefix), or `Ok(None)` at a clean
    /// end of stream.
    pub async fn read_frame(&mut self) -> Result<Option<BytesMut>, FrameError> {
        loop {
            if let Some(frame) = self.decode_buffered()? {
                return Ok(Some(frame));
            }
            // What the frame in progress still lacks (or the rest of its
            // prefix); the buffer grows by at most a chunk at a time.
            let missing = match self.announced() {
                Some(n) => PREFIX_LEN + n - self.buf.len(),
                None => PREFIX_LEN - self.buf.len(),
            };
            if self.buf.capacity() == 0 {
                self.buf.reserve(INITIAL_READ_BUF);
            } else if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(missing.clamp(4096, READ_CHUNK));
            }
            let n = self.io.read_buf(&mut self.buf).await.map_err(FrameError::Io)?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
        }
    }

    /// The body length announced by a buffered prefix, if one is in.
    fn announced(&self) -> Option<usize> {
        let head: [u8; PREFIX_LEN] = self.buf.get(..PREFIX_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(head) as usize)
    }

    /// A frame that is already complete in the buffer, without reading.
    pub fn decode_buffered(&mut self) -> Result<Option<BytesMut>, FrameError> {
        let n = match self.announced() {
            None => return Ok(None),
            Some(n) if n > self.max => return Err(FrameError::TooLarge { max: self.max }),
            Some(n) if self.buf.len() < PREFIX_LEN + n => return Ok(None),
            Some(n) => n,
        };
        self.buf.advance(PREFIX_LEN);
        let frame = self.buf.split_to(n);
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = BytesMut::new();
        }
        Ok(Some(frame))
    }

    /// Frees the read buffer if it holds no bytes, so a reader that waits
    /// for readability before its next read (an idle connection) keeps no
    /// buffer meanwhile; the next `read_frame` takes a small one again.
    /// Returns whether the buffer is empty.
    pub fn release_if_empty(&mut self) -> bool {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            true
        } else {
            false
        }
    }

    /// Whether bytes of a next frame are already read (the next
    /// `read_frame` may not have to wait).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The bytes read but not yet returned as a frame. After
    /// [`FrameError::TooLarge`] they start with the refused prefix, which
    /// lets a client tell a peer that is not chatd at all (an HTTP server
    /// answers `HTTP/1.1 400`, whose first four bytes read as ~1.2 GB).
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }
}

/// Appends one frame (prefix + encoded envelope) to `out`.
pub fn put_frame(out: &mut BytesMut, env: &Envelope) {
    let len = env.encoded_len();
    out.reserve(PREFIX_LEN + len);
    out.put_u32(len as u32);
    env.encode(out).expect("reserved enough space");
}

/// One frame (prefix + encoded envelope) as its own buffer.
pub fn encode_frame(env: &Envelope) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + env.encoded_len());
    put_frame(&mut out, env);
    out.freeze()
}

/// The envelope's protobuf encoding without a prefix.
pub fn encode_envelope(env: &Envelope) -> Bytes {
    Bytes::from(env.encode_to_vec())
}

/// Decodes one envelope from the bytes of a frame.
pub fn decode_envelope(frame: &[u8]) -> Result<Envelope, prost::DecodeError> {
    Envelope::decode(frame)
}

/// Best-effort read of `Envelope.id` (field 1, varint) from bytes that may
/// not decode as a whole, so an error reply can still name the request.
pub fn peek_request_id(frame: &[u8]) -> Option<u64> {
    let mut buf = frame;
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).ok()?;
        let (field, wire_type) = (key >> 3, key & 7);
        match (field, wire_type) {
            (1, 0) => return prost::encoding::decode_varint(&mut buf).ok(),
            (_, 0) => {
                prost::encoding::decode_varint(&mut buf).ok()?;
            }
            (_, 1) => buf = buf.get(8..)?,
            (_, 5) => buf = buf.get(4..)?,
            (_, 2) => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?;
                buf = buf.get(len..)?;
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Body, Ping, Publish};

    #[tokio::test]
    async fn frames_survive_any_split() {
        let envs: Vec<Envelope> = (1..=5u64)
            .map(|i| {
                Envelope::new(
                    i,
                    Body::Publish(Publish {
                        room: format!("r{i}"),
                        text: "x".repeat(i as usize * 40),
                        ..Default::default()
                    }),
                )
            })
            .collect();
        let mut wire = BytesMut::new();
        for e in &envs {
            put_frame(&mut wire, e);
        }
        let wire = wire.freeze();
        for chunk in [1usize, 2, 3, 7, 64, wire.len()] {
            let (mut tx, rx) = tokio::io::duplex(chunk.max(1));
            let data = wire.clone();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                for piece in data.chunks(chunk) {
                    tx.write_all(piece).await.unwrap();
                }
            });
            let mut reader = FrameReader::new(rx, 1024);
            for e in &envs {
                let f = reader.read_frame().await.unwrap().unwrap();
                assert_eq!(&decode_envelope(&f).unwrap(), e);
            }
            writer.await.unwrap();
            assert!(reader.read_frame().await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn the_buffer_is_released_between_frames_but_never_with_bytes_in_it() {
        let mut bytes = encode_frame(&Envelope::new(1, Body::Ping(Default::default()))).to_vec();
        let first_len = bytes.len();
        let second = encode_frame(&Envelope::new(2, Body::Ping(Default::default())));
        bytes.extend_from_slice(&second[..3]);
        let mut reader = FrameReader::new(&bytes[..], 65536);
        assert!(reader.read_frame().await.unwrap().is_some());
        assert!(!reader.release_if_empty(), "the start of the next frame is kept");
        assert_eq!(reader.buf.len(), 3);
        let mut reader = FrameReader::new(&bytes[..first_len], 65536);
        assert!(reader.read_frame().await.unwrap().is_some());
        assert!(reader.release_if_empty());
        assert_eq!(reader.buf.capacity(), 0, "an idle reader holds no buffer");
    }

    #[tokio::test]
    async fn oversize_prefix_is_refused_before_the_body_arrives() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(rx, 65536);
        assert!(matches!(reader.read_frame().await, Err(FrameError::TooLarge { max: 65536 })));
        assert!(reader.buf.capacity() < 65536, "no allocation sized from the prefix");
    }

    #[tokio::test]
    async fn a_trickled_frame_holds_only_what_arrived() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&60_000u32.to_be_bytes()).await.unwrap();
        tx.write_all(&[1u8; 100]).await.unwrap();
        let mut reader = FrameReader::new(rx, 65536);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), reader.read_frame()).await.is_err());
        assert!(reader.buf.capacity() <= READ_CHUNK, "capacity {} follows the bytes received", reader.buf.capacity());
        // The rest arrives: the frame comes out whole.
        tx.write_all(&vec![1u8; 59_900]).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 60_000);
    }

    #[tokio::test]
    async fn truncated_frame_is_reported() {
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(tx);
        let mut reader = FrameReader::new(rx, 1024);
        assert!(matches!(reader.read_frame().await, Err(FrameError::Truncated)));
    }

    /// The worked example in proto/README.md, byte for byte.
    #[test]
    fn the_documented_join_frame() {
        let env = Envelope::new(1, Body::Join(crate::proto::Join { room: "general".into() }));
        let expected: &[u8] = &[
            0x00, 0x00, 0x00, 0x0d, // length 13
            0x08, 0x01, // field 1 (id), varint 1
            0x62, 0x09, // field 12 (join), length 9
            0x0a, 0x07, b'g', b'e', b'n', b'e', b'r', b'a', b'l', // Join.room = "general"
        ];
        assert_eq!(&encode_frame(&env)[..], expected);
    }

    #[test]
    fn request_id_is_found_in_undecodable_bytes() {
        let env = Envelope::new(77, Body::Ping(Ping { nonce: 3 }));
        let mut bytes = encode_envelope(&env).to_vec();
        assert_eq!(peek_request_id(&bytes), Some(77));
        bytes.extend_from_slice(&[0xff, 0xff]);
        assert!(decode_envelope(&bytes).is_err());
        assert_eq!(peek_request_id(&bytes), Some(77));
        assert_eq!(peek_request_id(&[0xff]), None);
    }
}
