//! The log: appending with an fsync per message versus group commit (one
//! flush + fdatasync per batch of 1, 16 or 256), on sled in a temporary
//! directory. Per-message figures are the batch time divided by its size.
//! `write_32` isolates the sled write of a group commit (no sync) with and
//! without idempotency keys (the commit's journal record and the in-memory
//! index).

use bytes::Bytes;
use chatd::store::sled::SledStore;
use chatd::store::{Append, Batch, Store};
use divan::Bencher;

fn main() {
    divan::main();
}

fn append(room: u64, seq: u64) -> Append {
    Append {
        room,
        seq,
        message: Bytes::from(vec![9u8; 160]),
        sender: "ann".into(),
        client_msg_id: format!("k{seq}"),
        ts_ms: seq,
        entry: chatd::store::Entry::Message { user: "ann".into(), mentions: Vec::new() },
    }
}

/// The sled writes of a group commit of 32 messages (the batch size S1 at
/// window 64 settles at), without the sync: with idempotency keys spread
/// over the key space as clients' random ids are, and with none.
#[divan::bench(args = [true, false], sample_count = 50, sample_size = 10)]
fn write_32(b: Bencher, idempotency_keys: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 64 << 20).unwrap();
    let mut seq = 0u64;
    b.counter(divan::counter::ItemsCount::new(32usize)).bench_local(|| {
        let mut bt = Batch::default();
        for _ in 0..32 {
            seq += 1;
            let mut a = append(1, seq);
            a.client_msg_id = if idempotency_keys {
                format!("{:016x}", seq.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            } else {
                String::new()
            };
            bt.appends.push(a);
        }
        store.write(&bt).unwrap();
    });
    store.sync().unwrap();
}

#[divan::bench(args = [1, 16, 256], sample_count = 20, sample_size = 1)]
fn group_commit(b: Bencher, batch: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 64 << 20).unwrap();
    let mut seq = 0;
    b.counter(divan::counter::ItemsCount::new(batch)).bench_local(|| {
        let mut bt = Batch::default();
        for _ in 0..batch {
            seq += 1;
            bt.appends.push(append(1, seq));
        }
        store.write(&bt).unwrap();
        store.sync().unwrap();
    });
}

#[divan::bench(args = [16], sample_count = 20, sample_size = 1)]
fn fsync_per_message(b: Bencher, messages: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 64 << 20).unwrap();
    let mut seq = 0;
    b.counter(divan::counter::ItemsCount::new(messages)).bench_local(|| {
        for _ in 0..messages {
            seq += 1;
            let mut bt = Batch::default();
            bt.appends.push(append(1, seq));
            store.write(&bt).unwrap();
            store.sync().unwrap();
        }
    });
}
