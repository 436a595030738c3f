//! The streaming frame decoder over arbitrary bytes cut at arbitrary points:
//! it never panics, never allocates by an announced length, and cuts the
//! same frames however the stream is split.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use chatd::codec::{FrameError, FrameReader};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` in chunks whose sizes come from `cuts`.
struct Chunks<'a> {
    data: &'a [u8],
    cuts: &'a [u8],
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let want = match self.cuts.split_first() {
            Some((c, rest)) => {
                self.cuts = rest;
                usize::from(*c).max(1)
            }
            None => usize::MAX,
        };
        let n = want.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fn frames(data: &[u8], cuts: &[u8]) -> (Vec<Vec<u8>>, Option<String>) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = FrameReader::new(Chunks { data, cuts }, 4096);
        let mut out = Vec::new();
        loop {
            match r.read_frame().await {
                Ok(Some(f)) => out.push(f.to_vec()),
                Ok(None) => return (out, None),
                Err(FrameError::TooLarge { .. }) => return (out, Some("too large".into())),
                Err(FrameError::Truncated) => return (out, Some("truncated".into())),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let split = input.first().map_or(0, |b| usize::from(*b)).min(input.len().saturating_sub(1));
    let (cuts, data) = input.get(1..).unwrap_or_default().split_at(split);
    let whole = frames(data, &[]);
    let pieces = frames(data, cuts);
    assert_eq!(whole, pieces, "the frames do not depend on how the stream is split");
});
