//! Hostile input against the real binary: many connections sending random
//! and malformed frames, slowloris senders and length-prefix bombs, while a
//! canary keeps chatting. The server must not panic, must answer every bad
//! connection with the documented error or close it, must keep serving the
//! canary and new clients, and must keep its memory bounded.

use bytes::BytesMut;
use chatd::codec::put_frame;
use chatd::proto::{self, Body, CloseReason, Envelope, ErrorCode};
use prost::Message as _;
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// A small deterministic PRNG (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn bytes_upto(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

/// A random envelope: known messages with odd field values, or raw fields.
fn random_envelope(rng: &mut Rng) -> Vec<u8> {
    let room = match rng.below(4) {
        0 => "canary-room".to_string(),
        1 => String::from_utf8_lossy(&rng.bytes_upto(200)).into_owned(),
        2 => "x".repeat(rng.below(300) as usize),
        _ => format!("dm:{}:{}", rng.below(9), rng.below(9)),
    };
    let body = match rng.below(13) {
        0 => Body::Join(proto::Join { room }),
        1 => Body::Leave(proto::Leave { room }),
        2 => Body::Publish(proto::Publish {
            room,
            client_msg_id: "x".repeat(rng.below(400) as usize),
            text: "t".into(),
            data: rng.bytes_upto(2000).into(),
            reply_to: rng.next() % 8,
            mentions: (0..rng.below(60)).map(|i| format!("u{i}")).collect(),
        }),
        9 => Body::Edit(proto::Edit {
            room,
            seq: rng.next() % 8,
            client_msg_id: "e".repeat(rng.below(200) as usize),
            text: "x".repeat(rng.below(70_000) as usize),
            data: Default::default(),
        }),
        10 => Body::Delete(proto::Delete { room, seq: rng.next() % 8, client_msg_id: String::new() }),
        11 => Body::React(proto::React {
            room,
            seq: rng.next() % 8,
            key: String::from_utf8_lossy(&rng.bytes_upto(100)).into_owned(),
            add: rng.below(2) == 0,
            client_msg_id: String::new(),
        }),
        3 => Body::History(proto::History {
            room,
            before_seq: rng.next(),
            after_seq: rng.next(),
            limit: rng.next() as u32,
            forward: rng.below(2) == 0,
        }),
        4 => Body::MarkRead(proto::MarkRead { room, seq: rng.next() }),
        5 => Body::Typing(proto::Typing { room, user: "spoof".into(), active: true }),
        6 => Body::Hello(proto::Hello { protocol_version: rng.next() as u32, token: "t".into(), ..Default::default() }),
        7 => Body::GoAway(proto::GoAway { reason: rng.next() as i32, ..Default::default() }),
        8 => Body::Error(proto::Error { code: rng.next() as i32, message: "?".into() }),
        _ => return rng.bytes_upto(300),
    };
    Envelope::new(rng.next(), body).encode_to_vec()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Reads until the server closes or goes quiet; every frame must decode,
/// and every error must be one the protocol documents.
async fn drain(r: &mut Raw) -> (bool, Vec<Body>) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(3), r.reader.read_frame()).await {
            Err(_) => return (false, got),
            Ok(Ok(Some(f))) => {
                let env = chatd::codec::decode_envelope(&f).expect("everything the server sends decodes");
                if let Some(b) = env.body {
                    got.push(b);
                }
            }
            Ok(_) => return (true, got),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_malformed_frames_on_many_connections_harm_no_one() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Process::start(data.path(), &["--handshake-timeout-ms", "1000"]);
    let pid = server.child.id();
    let rss = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
            * 1024
    };
    // The canary chats throughout.
    let mut canary = server.raw_member("canary", "canary-room").await;
    let rss_before = rss();

    let mut tasks = Vec::new();
    for c in 0..60u64 {
        let addr = server.addr.clone();
        let token = token_for(data.path(), &format!("fuzz{c}"));
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut r = Raw::connect(&addr).await;
            let kind = c % 6;
            let hello = {
                let h = proto::Hello { protocol_version: 1, token: token.clone(), ..Default::default() };
                let mut b = BytesMut::new();
                put_frame(&mut b, &Envelope::new(1, Body::Hello(h)));
                b.to_vec()
            };
            match kind {
                // Pure noise.
                0 => {
                    let n = 64 + rng.below(4000) as usize;
                    r.send_bytes(&rng.bytes(n)).await
                }
                // Well-framed noise before Hello.
                1 => r.send_bytes(&frame(&rng.bytes_upto(500))).await,
                // Hello, then a stream of random envelopes and raw fields.
                2 | 3 => {
                    r.send_bytes(&hello).await;
                    let mut wire = Vec::new();
                    for _ in 0..200 {
                        wire.extend(frame(&random_envelope(&mut rng)));
                    }
                    r.send_bytes(&wire).await;
                }
                // Hello, then an oversize prefix (a 4 GiB bomb).
                4 => {
                    r.send_bytes(&hello).await;
                    r.send_bytes(&u32::MAX.to_be_bytes()).await;
                }
                // Hello, then a truncated frame and a half-close.
                _ => {
                    r.send_bytes(&hello).await;
                    r.send_bytes(&[0, 0, 1, 0, 1, 2, 3]).await;
                    let _ = r.writer.shutdown().await;
                }
            }
            let (closed, got) = drain(&mut r).await;
            for b in &got {
                if let Body::Error(e) = b {
                    assert!(ErrorCode::try_from(e.code).is_ok() && e.code != 0, "documented error codes only: {e:?}");
                }
            }
            match kind {
                0 | 1 => assert!(closed, "noise before Hello is closed"),
                4 => {
                    assert!(got.iter().any(|b| matches!(b, Body::Error(e) if e.code() == ErrorCode::TooLarge)));
                    assert!(
                        got.iter().any(|b| matches!(b, Body::GoAway(g) if g.reason() == CloseReason::ProtocolError))
                    );
                    assert!(closed);
                }
                2 | 3 => {
                    // Garbage after Hello is refused request by request; the
                    // connection stays unless a frame was a framing violation.
                    assert!(got.iter().any(|b| matches!(b, Body::Error(_))), "errors were answered");
                }
                _ => assert!(closed, "a truncated frame at end of stream closes"),
            }
        }));
        // The canary is served promptly throughout.
        if c % 10 == 0 {
            canary.publish("canary-room", &format!("alive {c}")).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Nothing crashed; the canary still chats and new clients are served.
    assert!(server.try_wait_alive(), "the server is still running");
    canary.ping().await;
    let _fresh = server.raw_user("fresh").await;
    let growth = rss().saturating_sub(rss_before);
    assert!(growth < 64 << 20, "memory stays bounded (grew {} KiB)", growth >> 10);
    assert!(!server.log_lines().iter().any(|l| l.contains("panicked")), "no panic in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_prefix_bombs_are_closed_by_the_deadlines() {
    let data = tempfile::tempdir().unwrap();
    let server = Process::start(data.path(), &["--handshake-timeout-ms", "800"]);
    // Prefix bombs under the limit that never send the body.
    let mut bombs = Vec::new();
    for _ in 0..100 {
        let mut r = Raw::connect(&server.addr).await;
        r.send_bytes(&60_000u32.to_be_bytes()).await;
        r.send_bytes(&[0u8; 10]).await;
        bombs.push(r);
    }
    // A slowloris: one byte every 200 ms of a valid Hello.
    let addr = server.addr.clone();
    let token = token_for(data.path(), "slow");
    let loris = tokio::spawn(async move {
        let mut r = Raw::connect(&addr).await;
        let h = proto::Hello { protocol_version: 1, token, ..Default::default() };
        let mut b = BytesMut::new();
        put_frame(&mut b, &Envelope::new(1, Body::Hello(h)));
        let started = std::time::Instant::now();
        for byte in b.iter() {
            if r.writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if started.elapsed() > std::time::Duration::from_secs(5) {
                break;
            }
        }
        (drain(&mut r).await, started.elapsed())
    });
    // Meanwhile a normal client is served at once.
    let (mut ok, _) = server.raw_user("ok").await;
    ok.ping().await;
    for mut b in bombs {
        let (closed, got) = drain(&mut b).await;
        assert!(closed, "a prefix bomb is closed by the handshake deadline");
        assert!(got.iter().any(|x| matches!(x, Body::GoAway(_))), "{got:?}");
    }
    let ((closed, _), took) = loris.await.unwrap();
    assert!(closed, "slowloris closed by the deadline (after {took:?})");
}
