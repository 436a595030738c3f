//! Acknowledged means stored: across a clean restart, a SIGTERM under load,
//! and a SIGKILL under load (the `chatd` binary as a child process).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use chatd::codec::put_frame;
use chatd::proto::{self, Body, Envelope};
use tokio::io::AsyncWriteExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_messages_memberships_markers_and_idempotency() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(tmp.path(), |_| {}).await;
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

    let s = TestServer::start_in(tmp.path(), |_| {}).await;
    let (c, _) = s.client("ann").await;
    let mut rooms = c.welcome().rooms.clone();
    rooms.sort_by(|a, b| a.room.cmp(&b.room));
    assert_eq!(
        rooms,
        vec![
            proto::RoomState { room: "dm:ann:bob".into(), head_seq: 0, read_seq: 0 },
            proto::RoomState { room: "r".into(), head_seq: 100, read_seq: 40 },
        ]
    );
    let again = c.publish_message(p).await.unwrap();
    assert!(again.duplicate && again.seq == 100 && again.ts_ms == last.ts_ms);
    assert_eq!(c.publish("r", "next").await.unwrap().seq, 101, "the seq continues");
    let page =
        c.history(proto::History { room: "r".into(), forward: true, limit: 1000, ..Default::default() }).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=101).collect::<Vec<_>>());
}

/// Publishers pipelining into several rooms, with unique keys; returns the
/// acks received before the connection died, by key.
async fn publish_until_cut(
    addr: String,
    token: String,
    user: String,
    rooms: Vec<String>,
    n: u64,
    acked_so_far: Arc<AtomicUsize>,
) -> HashMap<String, (String, u64)> {
    let mut r = Raw::connect(&addr).await;
    r.hello(&token, vec![]).await;
    for (i, room) in rooms.iter().enumerate() {
        r.call(2 + i as u64, Body::Join(proto::Join { room: room.clone() })).await;
    }
    let mut acks = HashMap::new();
    let mut wire = BytesMut::new();
    for i in 0..n {
        let room = &rooms[i as usize % rooms.len()];
        let p = proto::Publish {
            room: room.clone(),
            client_msg_id: format!("{user}-{i}"),
            text: format!("{i}"),
            ..Default::default()
        };
        put_frame(&mut wire, &Envelope::new(1000 + i, Body::Publish(p)));
    }
    // Write in the background so acks are read while the server ingests.
    let mut w = r.writer;
    tokio::spawn(async move {
        let _ = w.write_all(&wire).await;
        std::future::pending::<()>().await;
    });
    loop {
        let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, r.reader.read_frame()).await else { break };
        if let Ok(Envelope { body: Some(Body::PublishAck(a)), .. }) = chatd::codec::decode_envelope(&f) {
            acks.insert(a.client_msg_id.clone(), (a.room, a.seq));
            acked_so_far.fetch_add(1, Ordering::Relaxed);
            if acks.len() as u64 == n {
                break;
            }
        }
    }
    acks
}

/// Waits until `counter` reaches `n` (or panics after a while).
async fn wait_for_acks(counter: &AtomicUsize, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while counter.load(Ordering::Relaxed) < n {
        assert!(tokio::time::Instant::now() < deadline, "only {} acks arrived", counter.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every acked key is stored exactly once at its acked seq; seqs are
/// contiguous from 1 in every room.
async fn check_log(addr: &str, token: &str, rooms: &[String], acked: &HashMap<String, (String, u64)>) -> usize {
    let mut r = Raw::connect(addr).await;
    r.hello(token, vec![]).await;
    let mut stored = 0;
    let mut seen_keys = HashSet::new();
    for (i, room) in rooms.iter().enumerate() {
        r.call(2 + i as u64 * 100, Body::Join(proto::Join { room: room.clone() })).await;
        let mut after = 0;
        loop {
            let req =
                proto::History { room: room.clone(), after_seq: after, forward: true, limit: 1000, before_seq: 0 };
            let Body::HistoryPage(p) = r.call(3 + i as u64 * 100 + after, Body::History(req)).await else { panic!() };
            for m in &p.messages {
                after += 1;
                assert_eq!(m.seq, after, "room {room}: seqs are contiguous from 1");
                assert!(seen_keys.insert(m.client_msg_id.clone()), "key {} stored twice", m.client_msg_id);
                stored += 1;
            }
            if !p.has_more {
                break;
            }
        }
    }
    for (key, (room, seq)) in acked {
        assert!(seen_keys.contains(key), "acked message {key} ({room} #{seq}) was lost");
    }
    stored
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
    let mut retry = Raw::connect(&server.addr).await;
    retry.hello(&token_for(tmp.path(), "p0"), vec![]).await;
    for i in 0..200u64 {
        let room = &rooms[i as usize % rooms.len()];
        let p = proto::Publish {
            room: room.clone(),
            client_msg_id: format!("p0-{i}"),
            text: format!("{i}"),
            ..Default::default()
        };
        match retry.call(5000 + i, Body::Publish(p)).await {
            Body::PublishAck(a) => {
                if let Some((r, seq)) = acked.get(&format!("p0-{i}")) {
                    assert!(a.duplicate && &a.room == r && a.seq == *seq, "retry of an acked key: {a:?}");
                }
            }
            other => panic!("{other:?}"),
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
