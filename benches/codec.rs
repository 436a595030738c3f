//! Framing and encoding: frame encode/decode across payload sizes, and a
//! fanned-out message encoded once (shared `Bytes`) versus once per
//! recipient.

use bytes::{Bytes, BytesMut};
use chatd::codec::{FrameReader, decode_envelope, encode_frame, put_frame};
use chatd::proto::{Body, Envelope, Message};
use divan::Bencher;

fn main() {
    divan::main();
}

const SIZES: &[usize] = &[0, 100, 1024, 16 * 1024, 64 * 1024 - 128];

fn message(size: usize) -> Envelope {
    Envelope::push(Body::Message(Message {
        room: "general".into(),
        seq: 123_456,
        sender: "ann".into(),
        ts_ms: 1_795_000_000_000,
        client_msg_id: "client-1-42".into(),
        data: Bytes::from(vec![7u8; size]),
        ..Default::default()
    }))
}

#[divan::bench(args = SIZES)]
fn encode_frame_(b: Bencher, size: usize) {
    let env = message(size);
    b.counter(divan::counter::BytesCount::new(size)).bench(|| encode_frame(divan::black_box(&env)));
}

#[divan::bench(args = SIZES)]
fn decode_frame(b: Bencher, size: usize) {
    let frame = encode_frame(&message(size));
    b.counter(divan::counter::BytesCount::new(size)).bench(|| decode_envelope(divan::black_box(&frame[4..])).unwrap());
}

/// The streaming decoder over a buffer of 64 frames.
#[divan::bench(args = [100, 1024])]
fn read_64_frames(b: Bencher, size: usize) {
    let mut wire = BytesMut::new();
    for _ in 0..64 {
        put_frame(&mut wire, &message(size));
    }
    let wire = wire.freeze();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    b.counter(divan::counter::ItemsCount::new(64usize)).bench(|| {
        rt.block_on(async {
            let mut r = FrameReader::new(&wire[..], 1 << 20);
            while let Some(f) = r.read_frame().await.unwrap() {
                divan::black_box(f);
            }
        })
    });
}

/// One message to 100 recipients: encoded once and shared...
#[divan::bench]
fn fan_out_encode_once_100(b: Bencher) {
    let env = message(100);
    b.bench(|| {
        let frame = encode_frame(&env);
        (0..100).map(|_| frame.clone()).collect::<Vec<Bytes>>()
    });
}

/// ...versus encoded for each recipient (what Redis does for pub/sub).
#[divan::bench]
fn fan_out_encode_each_100(b: Bencher) {
    let env = message(100);
    b.bench(|| (0..100).map(|_| encode_frame(&env)).collect::<Vec<Bytes>>());
}
