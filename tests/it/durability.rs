//! Acknowledged means stored: across a clean restart, a SIGTERM under load,
//! and a SIGKILL under load (the `chatd` binary as a child process) — for
//! messages and for room administration (an answered removal, ban, creation
//! or invitation is never undone by a crash). The crash battery itself is
//! `battery`; `powerloss` runs it with power cuts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chatd::proto;

use crate::battery::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_messages_memberships_markers_and_idempotency() {
    restart_keeps_everything(chatd::config::DurabilityMode::Fsync).await;
}

/// `batch` and `none` write small group commits on a worker, not on the
/// blocking pool (store::commit): the same through a clean restart, which
/// syncs whatever the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_everything_with_batch_and_none_durability() {
    restart_keeps_everything(chatd::config::DurabilityMode::Batch).await;
    restart_keeps_everything(chatd::config::DurabilityMode::None).await;
}

async fn restart_keeps_everything(durability: chatd::config::DurabilityMode) {
    let mode = |c: &mut chatd::config::Config| {
        c.durability = durability;
        c.batch_sync_ms = 3_600_000;
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(tmp.path(), mode).await;
    let (c, _) = s.client("ann").await;
    c.join("r").await.unwrap();
    c.join("dm:ann:bob").await.unwrap();
    let p =
        proto::Publish { room: "r".into(), client_msg_id: "k-last".into(), text: "last".into(), ..Default::default() };
    for i in 0..99 {
        c.publish("r", &format!("m{i}")).await.unwrap();
    }
    let last = c.publish_message(p.clone()).await.unwrap();
    assert_eq!(last.seq, 100);
    c.mark_read("r", 40).await.unwrap();
    c.close();
    s.stop().await;

    let s = TestServer::start_in(tmp.path(), mode).await;
    let (c, _) = s.client("ann").await;
    let mut rooms: Vec<_> = c.welcome().rooms.iter().map(|r| (r.room.as_str(), r.head_seq, r.read_seq)).collect();
    rooms.sort();
    assert_eq!(rooms, vec![("dm:ann:bob", 0, 0), ("r", 100, 40)]);
    let again = c.publish_message(p).await.unwrap();
    assert!(again.duplicate && again.seq == 100 && again.ts_ms == last.ts_ms);
    assert_eq!(c.publish("r", "next").await.unwrap().seq, 101, "the seq continues");
    let page =
        c.history(proto::History { room: "r".into(), forward: true, limit: 1000, ..Default::default() }).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=101).collect::<Vec<_>>(), "{durability}");
}

/// One publisher pipelining `n` messages round-robin into `rooms`, with keys
/// `user-counter`; returns the acks received before the connection died.
async fn publish_until_cut(
    addr: String,
    token: String,
    user: String,
    rooms: Vec<String>,
    n: u64,
    acked_so_far: Arc<AtomicUsize>,
) -> HashMap<String, (String, u64)> {
    let keys = (0..n).map(|i| (format!("{user}-{i}"), rooms[i as usize % rooms.len()].clone())).collect();
    places(publish_keys(addr, token, keys, acked_so_far, Default::default()).await)
}

/// The audit, asserted clean; returns the number of stored messages.
async fn check_log(addr: &str, token: &str, rooms: &[String], acked: &HashMap<String, (String, u64)>) -> usize {
    let a = audit(addr, token, rooms, acked).await;
    assert!(a.clean(), "the log does not match the acks: {a:?}");
    a.stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let rooms: Vec<String> = (0..3).map(|i| format!("room{i}")).collect();
    let mut server = Process::start(tmp.path(), &[]);
    let addr = server.addr.clone();
    let counter = Arc::new(AtomicUsize::new(0));
    const PER_PUBLISHER: u64 = 200_000;
    let mut tasks = Vec::new();
    for p in 0..3 {
        let user = format!("p{p}");
        let token = token_for(tmp.path(), &user);
        tasks.push(tokio::spawn(publish_until_cut(
            addr.clone(),
            token,
            user,
            rooms.clone(),
            PER_PUBLISHER,
            counter.clone(),
        )));
    }
    // Let acks flow, then kill -9 in the middle of the stream.
    wait_for_acks(&counter, 3000).await;
    server.kill9();
    let mut acked = HashMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() >= 3000, "acks before the kill");
    assert!((acked.len() as u64) < 3 * PER_PUBLISHER, "the kill happened mid-stream");

    let server = Process::start(tmp.path(), &[]);
    let stored = check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
    assert!(stored >= acked.len());
    // Retrying every key after the crash stores nothing twice.
    let (mut retry, _) = server.raw_user("p0").await;
    for i in 0..200u64 {
        let room = &rooms[i as usize % rooms.len()];
        let p = proto::Publish {
            room: room.clone(),
            client_msg_id: format!("p0-{i}"),
            text: format!("{i}"),
            ..Default::default()
        };
        let a = retry.publish_message(p).await;
        if let Some((r, seq)) = acked.get(&format!("p0-{i}")) {
            assert!(a.duplicate && &a.room == r && a.seq == *seq, "retry of an acked key: {a:?}");
        }
    }
    check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_acks_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let rooms = vec!["a".to_string(), "b".to_string()];
    let mut server = Process::start(tmp.path(), &[]);
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in 0..2 {
        let user = format!("t{p}");
        let token = token_for(tmp.path(), &user);
        tasks.push(tokio::spawn(publish_until_cut(
            server.addr.clone(),
            token,
            user,
            rooms.clone(),
            200_000,
            counter.clone(),
        )));
    }
    wait_for_acks(&counter, 2000).await;
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "chatd exits 0 after SIGTERM: {status:?}");
    let mut acked = HashMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(!acked.is_empty());
    let server = Process::start(tmp.path(), &[]);
    check_log(&server.addr, &token_for(tmp.path(), "checker"), &rooms, &acked).await;
}

/// The crash battery (`battery`): ten SIGKILLs at seeded-random moments of
/// a multi-room, multi-publisher load with edits, deletes, reactions, room
/// administration and read markers beside it; after each restart and at the
/// end, everything acknowledged is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_crashes_at_random_moments_lose_no_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let report = Battery {
        dir: tmp.path(),
        flags: &[],
        cuts: 10,
        per_round: 4000,
        kill_after: 200..2700,
        seed: 0x5eed_c0ff_ee00_0001,
        moderated_rooms: 40,
        may_lose: Duration::ZERO,
        after_kill: &|| {},
    }
    .run()
    .await;
    eprintln!("crash battery: {report}");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.lost, vec![0; 10]);
}

/// A store that acknowledges every 25th append without keeping it: the
/// fault the crash battery exists to catch.
struct LossyStore {
    inner: chatd::store::memory::MemoryStore,
    appends: std::sync::atomic::AtomicU64,
}

impl chatd::store::Store for LossyStore {
    fn load(&self) -> Result<chatd::store::Snapshot, chatd::store::StoreError> {
        self.inner.load()
    }
    fn departure(&self, user: &str, room: u64) -> Result<Option<chatd::store::MemberRecord>, chatd::store::StoreError> {
        self.inner.departure(user, room)
    }
    fn write(&self, batch: &chatd::store::Batch) -> Result<(), chatd::store::StoreError> {
        let mut kept = chatd::store::Batch {
            rooms: batch.rooms.clone(),
            read_markers: batch.read_markers.clone(),
            ..Default::default()
        };
        for a in &batch.appends {
            if self.appends.fetch_add(1, Ordering::Relaxed) % 25 != 24 {
                kept.appends.push(a.clone());
            }
        }
        self.inner.write(&kept)
    }
    fn sync(&self) -> Result<(), chatd::store::StoreError> {
        self.inner.sync()
    }
    fn truncate(&self, room: u64, from: u64) -> Result<usize, chatd::store::StoreError> {
        self.inner.truncate(room, from)
    }
    fn read_folded(
        &self,
        room: u64,
        from: u64,
        to: u64,
        viewer: &str,
    ) -> Result<Vec<chatd::store::fold::Folded>, chatd::store::StoreError> {
        self.inner.read_folded(room, from, to, viewer)
    }
    fn target(&self, room: u64, seq: u64) -> Result<Option<chatd::store::Target>, chatd::store::StoreError> {
        self.inner.target(room, seq)
    }
    fn has_reaction(&self, room: u64, seq: u64, key: &str, user: &str) -> Result<bool, chatd::store::StoreError> {
        self.inner.has_reaction(room, seq, key, user)
    }
    fn lookup_idempotent(
        &self,
        s: &str,
        k: &str,
    ) -> Result<Option<chatd::store::IdempotencyRecord>, chatd::store::StoreError> {
        self.inner.lookup_idempotent(s, k)
    }
    fn expire_idempotency(&self, before: u64) -> Result<usize, chatd::store::StoreError> {
        self.inner.expire_idempotency(before)
    }
    fn trim(&self, room: u64, trim: &chatd::store::Trim) -> Result<chatd::store::TrimRecord, chatd::store::StoreError> {
        self.inner.trim(room, trim)
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
}

/// The negative control: the same audit finds the loss when a store
/// acknowledges messages it did not keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_a_store_that_loses_acknowledged_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LossyStore { inner: Default::default(), appends: Default::default() });
    let secret = chatd::auth::load_or_create_secret(tmp.path()).unwrap();
    let server = chatd::server::Server::start_with_store(
        &test_config(tmp.path()),
        store,
        chatd::auth::Auth::new(secret.as_bytes()),
    )
    .await
    .unwrap();
    let addr = server.tcp_addr.to_string();
    let rooms = vec!["lossy".to_string()];
    let keys: Vec<(String, String)> = (0..200).map(|i| (format!("u-{i}"), "lossy".to_string())).collect();
    let acked = places(
        publish_keys(addr.clone(), token_for(tmp.path(), "u"), keys, Arc::new(AtomicUsize::new(0)), Default::default())
            .await,
    );
    assert_eq!(acked.len(), 200, "the faulty store acks everything");
    let a = audit(&addr, &token_for(tmp.path(), "auditor"), &rooms, &acked).await;
    assert!(!a.clean(), "the audit must fail on a store that drops acked messages");
    assert_eq!(a.lost.len(), 8, "every 25th of 200 was dropped: {a:?}");
    server.shutdown().await;
}
