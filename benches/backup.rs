//! A backup's stall: how long the group commit waits while a backup takes
//! its point (`point`: every tree beside the log copied into memory, each
//! room's last log key), and the whole backup written to nowhere
//! (`whole`), for a store of 100,000 entries in 10 rooms by 50 users, each
//! message with an idempotency key, one entry in ten a reaction, written
//! in group commits of 32 (the idempotency journal holds a record per
//! commit).

use std::sync::Arc;

use bytes::Bytes;
use chatd::proto::{self, ChangeKind};
use chatd::store::sled::SledStore;
use chatd::store::sled::backup::backup;
use chatd::store::{Append, Batch, Entry, Store};
use divan::Bencher;
use prost::Message as _;

fn main() {
    divan::main();
}

const ENTRIES: u64 = 100_000;
const ROOMS: u64 = 10;
const USERS: u64 = 50;

/// The store described in the module docs.
fn filled() -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 64 << 20).unwrap();
    let mut batch = Batch::default();
    for i in 0..ENTRIES {
        let (room, seq) = (i % ROOMS + 1, i / ROOMS + 1);
        let sender = format!("user{}", i % USERS);
        let change = (seq % 10 == 0).then(|| proto::MessageChange {
            target_seq: seq - 1,
            kind: ChangeKind::ReactionAdd as i32,
            key: "+1".into(),
        });
        let client_msg_id = format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let m = proto::Message {
            room: format!("room{room}"),
            seq,
            sender: sender.clone(),
            ts_ms: 1_700_000_000_000 + i,
            client_msg_id: client_msg_id.clone(),
            text: "x".repeat(120),
            change,
            ..Default::default()
        };
        batch.appends.push(Append {
            room,
            seq,
            entry: Entry::of(&m),
            message: Bytes::from(m.encode_to_vec()),
            sender,
            client_msg_id,
            ts_ms: m.ts_ms,
        });
        if batch.appends.len() == 32 {
            store.write(&std::mem::take(&mut batch)).unwrap();
        }
    }
    store.write(&batch).unwrap();
    store.sync().unwrap();
    (dir, Arc::new(store))
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn point(b: Bencher) {
    let (_dir, store) = filled();
    b.bench_local(|| store.backup_point().unwrap());
}

#[divan::bench(sample_count = 5, sample_size = 1)]
fn whole(b: Bencher) {
    let (_dir, store) = filled();
    b.bench_local(|| backup(&store, |take| Ok(take()?), &mut std::io::sink()).unwrap());
}
