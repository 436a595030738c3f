//! Fan-out of one committed message to 1, 100 and 10,000 subscribed
//! sessions (bounded outbound queues; nothing waits), over the in-memory
//! store.

use std::sync::Arc;

use chatd::codec::encode_frame;
use chatd::delivery::Run;
use chatd::delivery::Subscriber;
use chatd::delivery::message_frame;
use chatd::hub::Limits;
use chatd::proto::{Body, Envelope, Message};
use chatd::room::Room;
use divan::Bencher;
use prost::Message as _;

fn main() {
    divan::main();
}

#[divan::bench(args = [1, 100, 10_000])]
fn fan_out_one_message(b: Bencher, sessions: usize) {
    let limits = Limits::default();
    let room = Arc::new(Room::new(1, "r".into(), 0, &Default::default()));
    let handles: Vec<Arc<Subscriber>> =
        (0..sessions).map(|i| Arc::new(Subscriber::new(i as u64, limits.outbound, 1, "tcp", String::new()))).collect();
    for h in &handles {
        room.subscribe_live(h, None);
    }
    let msg = Message { room: "r".into(), sender: "ann".into(), data: vec![1u8; 100].into(), ..Default::default() };
    let mut seq = 0;
    let mut sink = bytes::BytesMut::new();
    b.counter(divan::counter::ItemsCount::new(sessions)).bench_local(|| {
        seq += 1;
        let mut m = msg.clone();
        m.seq = seq;
        let frame = message_frame(&m.encode_to_vec());
        let len = frame.len();
        room.fan_out(&[seq], &Run::new(frame, &[len]), &mut 0);
        // Drain like the writers do, so queues never fill.
        for h in &handles {
            sink.clear();
            h.outbound.drain_into(&mut sink);
        }
    });
    divan::black_box(encode_frame(&Envelope::push(Body::Message(msg))));
}
